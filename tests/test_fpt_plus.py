import math

import torch
import torch.nn.functional as F

from tpp_monai.backbones.vit import build_vit
from tpp_monai.peft import PEFT_METHODS, apply_peft, target_parameter_names
from tpp_monai.peft.fpt_plus import CachedFeatureDataset, FeatureCache, collate_cached, FPTPlusClassifier, frozen_features, num_kept_tokens

CFG = dict(reduction=8, side_depth=2, side_num_heads=2, side_img_size=32, side_patch_size=8, num_prompts=4,
           keep_ratio=0.2)


def _model():
    vit = build_vit("tiny", img_size=64, patch_size=8, depth=3)
    return FPTPlusClassifier(vit, num_classes=3, **CFG)


def test_registered_and_side_is_the_only_target():
    assert "fpt_plus" in PEFT_METHODS
    model = _model()
    names = target_parameter_names(model.frozen)
    assert names and all(n.startswith("peft_side.") for n in names)
    assert model.side.embed_dim == 192 // 8
    assert model.layers == [2, 3]  # top side_depth layers of the frozen ViT


def test_frozen_branch_keeps_no_graph_and_backward_touches_side_only():
    model = _model().train()
    x = torch.randn(2, 3, 64, 64)
    feats = model.extract(x)
    for k, v in feats:
        assert k.grad_fn is None and not k.requires_grad and v.grad_fn is None and not v.requires_grad
    out = model(x)
    out.sum().backward()
    for n, p in model.frozen.named_parameters():
        if n.startswith("peft_side."):
            assert p.requires_grad
        else:
            assert p.grad is None and not p.requires_grad, n
    assert all(p.grad is not None for p in model.side.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    assert not model.frozen.training


def test_only_top_20_percent_tokens_by_cls_attention():
    model = _model().eval()
    vit = model.frozen
    x = torch.randn(2, 3, 64, 64)
    feats, kept = frozen_features(vit, x, model.layers, 0.2, return_indices=True)
    n = 64
    keep = num_kept_tokens(n, 0.2)
    assert keep == math.ceil(0.2 * n) == 13
    with torch.no_grad():
        hidden = vit.forward_features(x, return_layers=[1, 2]).hidden_states
    for j, layer in enumerate(model.layers):
        k_sel, v_sel = feats[j]
        assert k_sel.shape == v_sel.shape == (2, 1 + keep, 192)
        blk = vit.blocks[layer - 1]
        h = hidden[layer - 1]
        qkv = blk.attn.qkv(blk.norm1(h)).detach()
        q, k, v = qkv.chunk(3, dim=-1)
        heads, hd = blk.attn.num_heads, blk.attn.head_dim
        qh = q.reshape(2, -1, heads, hd).transpose(1, 2)
        kh = k.reshape(2, -1, heads, hd).transpose(1, 2)
        imp = ((qh[:, :, :1] @ kh[:, :, 1:].transpose(-1, -2)) / math.sqrt(hd)).softmax(-1).mean(1)[:, 0]
        top = imp.topk(keep, dim=1).indices
        for b in range(2):
            assert set(kept[j][b].tolist()) == set(top[b].tolist())
            rows = torch.cat([torch.tensor([0]), kept[j][b] + 1])
            assert torch.allclose(k_sel[b], k[b, rows], atol=1e-5)
            assert torch.allclose(v_sel[b], v[b, rows], atol=1e-5)
            # every dropped patch is less important than every kept one
            dropped = torch.ones(n, dtype=torch.bool)
            dropped[kept[j][b]] = False
            assert imp[b][dropped].max() <= imp[b][kept[j][b]].min()


def test_feature_cache_equals_recomputed(tmp_path):
    model = _model().eval()
    images = torch.randn(5, 3, 64, 64)
    data = [{"id": f"img{i}", "image": images[i]} for i in range(5)]
    cache = FeatureCache(tmp_path / "cache", model)
    files = cache.build(data, batch_size=5)
    assert len(files) == 5 and all(f.suffix == ".safetensors" and f.is_file() for f in files)
    ids = ["img3", "img0"]
    cached = cache.get(ids)
    fresh = model.extract(images[[3, 0]])
    for (kc, vc), (kf, vf) in zip(cached, fresh):
        assert torch.allclose(kc, kf, atol=1e-6, rtol=0) and torch.allclose(vc, vf, atol=1e-6, rtol=0)
    # training from the cache gives the same logits as the on-the-fly path
    lr = model.low_res(images[[3, 0]])
    assert torch.allclose(model(image_lr=lr, features=cached), model(images[[3, 0]]), atol=1e-5)
    # rebuilding skips existing files (resumable) and leaves them untouched
    mtime = files[0].stat().st_mtime_ns
    cache.build(data)
    assert files[0].stat().st_mtime_ns == mtime


def test_training_from_cache_updates_side_only(tmp_path):
    model = _model()
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    cache = FeatureCache(tmp_path, model)
    cache.build([(i, images[i]) for i in range(4)], batch_size=2)
    frozen_before = {n: p.clone() for n, p in model.frozen.named_parameters() if not n.startswith("peft_side.")}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    lr_images = model.low_res(images)
    ds = CachedFeatureDataset(cache, [(i, lr_images[i], labels[i]) for i in range(4)])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_cached)
    batch = next(iter(loader))
    for (kb, vb), (kc, vc) in zip(batch["features"], cache.get(range(4))):
        assert torch.equal(kb, kc) and torch.equal(vb, vc)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        b = next(iter(loader))
        loss = F.cross_entropy(model(image_lr=b["image_lr"], features=b["features"]), b["label"])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.frozen.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n])


def test_apply_peft_attaches_side_network():
    vit = build_vit("tiny", img_size=64, patch_size=8, depth=3)
    apply_peft(vit, "fpt_plus", CFG)
    assert hasattr(vit, "peft_side")
    # the frozen ViT's own forward is unchanged (side is not a hook)
    x = torch.randn(1, 3, 64, 64)
    assert vit(x).shape == (1, 65, 192)
