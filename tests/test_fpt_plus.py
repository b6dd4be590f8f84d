import math

import pytest
import torch
import torch.nn.functional as F

from tpp_monai.backbones.vit import build_vit
from tpp_monai.peft import PEFT_METHODS, apply_peft, target_parameter_names
from tpp_monai.peft.fpt_plus import CachedFeatureDataset, FeatureCache, collate_cached, FPTPlusClassifier, frozen_features, num_kept_tokens

CFG = dict(reduction=8, side_depth=2, side_num_heads=2, side_img_size=32, side_patch_size=8, num_prompts=4,
           keep_ratio=0.2)


def _model(**overrides):
    vit = build_vit("tiny", img_size=64, patch_size=8, depth=3)
    return FPTPlusClassifier(vit, num_classes=3, **{**CFG, **overrides})


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


def _restated_attention(blk, h):
    """Re-statement of a frozen block's self-attention: q, k, v (B, H, N, hd) and probabilities (B, H, N, N)."""
    x = F.layer_norm(h, h.shape[-1:], blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    q, k, v = F.linear(x, blk.attn.qkv.weight, blk.attn.qkv.bias).chunk(3, dim=-1)
    heads = blk.attn.num_heads
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return q, k, v, probs


@pytest.mark.parametrize("importance", ["global", "cls"])
def test_selected_tokens_are_the_top_20_percent_by_paper_importance_per_head(importance):
    """FPT+: importance = average attention score of the other tokens upon a token (mean over all queries),
    per head; the top floor(0.2 N) of all N tokens (class token ranked like any other) are kept.
    The class-token row stays available as ``importance="cls"``."""
    torch.manual_seed(0)
    model = _model(importance=importance).eval()
    vit = model.frozen
    x = torch.randn(2, 3, 64, 64)
    feats, kept = frozen_features(vit, x, model.layers, 0.2, return_indices=True, importance=importance)
    n_tok = 65  # class token + 8 x 8 patches
    keep = int(0.2 * n_tok)
    assert num_kept_tokens(n_tok, 0.2) == keep == 13
    with torch.no_grad():
        hidden = vit.forward_features(x, return_layers=[1, 2]).hidden_states
        differs_from_other_mode = False
        for j, layer in enumerate(model.layers):
            blk = vit.blocks[layer - 1]
            _, k, v, probs = _restated_attention(blk, hidden[layer - 1])
            heads, hd = k.shape[1], k.shape[-1]
            mean_over_queries = probs.sum(dim=2) / n_tok  # (B, H, N): sum_i A[i, t] / N
            cls_row = probs[:, :, 0, :]
            imp, other = (mean_over_queries, cls_row) if importance == "global" else (cls_row, mean_over_queries)
            k_sel, v_sel = feats[j]
            assert k_sel.shape == v_sel.shape == (2, keep, heads * hd)
            assert kept[j].shape == (2, heads, keep)
            for b in range(2):
                for h in range(heads):
                    idx = kept[j][b, h]
                    want = sorted(range(n_tok), key=lambda t: -imp[b, h, t].item())[:keep]
                    assert sorted(idx.tolist()) == sorted(want)
                    # most important first, and every dropped token ranks below every kept one
                    assert torch.all(imp[b, h, idx][:-1] >= imp[b, h, idx][1:])
                    dropped = torch.ones(n_tok, dtype=torch.bool)
                    dropped[idx] = False
                    assert imp[b, h][dropped].max() <= imp[b, h, idx].min()
                    cols = slice(h * hd, (h + 1) * hd)
                    assert torch.allclose(k_sel[b, :, cols], k[b, h, idx], atol=1e-5)
                    assert torch.allclose(v_sel[b, :, cols], v[b, h, idx], atol=1e-5)
                    other_top = set(other[b, h].topk(keep).indices.tolist())
                    differs_from_other_mode |= other_top != set(idx.tolist())
        assert differs_from_other_mode  # the two definitions select different tokens on this model


def test_token_importance_on_a_hand_made_attention_map():
    from tpp_monai.peft.fpt_plus import token_importance

    # 3 tokens, 1 head: the class token (query 0) looks at token 1, the other queries look at token 2
    attn = torch.tensor([[[[0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.1, 0.1, 0.8]]]])
    assert torch.allclose(token_importance(attn, "global"), torch.tensor([[[0.1, 1.0 / 3, 1.7 / 3]]]))
    assert torch.allclose(token_importance(attn, "cls"), torch.tensor([[[0.1, 0.8, 0.1]]]))
    assert token_importance(attn, "global").argmax().item() == 2
    with pytest.raises(ValueError, match="importance"):
        token_importance(attn, "mean")


def test_chunked_importance_equals_the_full_attention_map():
    from tpp_monai.peft.fpt_plus import attention_importance, token_importance

    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 65, 8), torch.randn(2, 3, 65, 8)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    for mode in ("global", "cls"):
        want = token_importance(probs, mode)
        assert want.shape == (2, 3, 65)
        assert torch.allclose(attention_importance(q, k, mode, chunk=7), want, atol=1e-6)


def _restated_fusion(fusion, j, k, v):
    """FPT+ fusion re-stated: Dropout(W_o (MHA(LN(P_j), K_j, V_j) + P_j) + b_o) (eval: no dropout)."""
    p = fusion.prompts[j]  # (P, D) at the frozen width
    d = p.shape[-1]
    heads = fusion.num_heads
    hd = d // heads
    q = F.layer_norm(p, (d,), fusion.norm.weight, fusion.norm.bias, fusion.norm.eps)
    out = []
    for b in range(k.shape[0]):
        ctx = []
        for h in range(heads):
            cols = slice(h * hd, (h + 1) * hd)
            a = torch.softmax(q[:, cols] @ k[b, :, cols].T / math.sqrt(hd), dim=-1)
            ctx.append(a @ v[b, :, cols])
        out.append((torch.cat(ctx, dim=-1) + p) @ fusion.out_proj.weight.T + fusion.out_proj.bias)
    return torch.stack(out)


def test_fusion_module_matches_the_paper_equations():
    torch.manual_seed(0)
    model = _model().eval()
    side, fusion = model.side, model.side.fusion
    d_frozen, d_side, layers, n_p = 192, 24, 2, 4
    # one module for all layers: prompts at the frozen width, a LayerNorm (no in-projector), one out-projector
    shapes = {n: tuple(p.shape) for n, p in fusion.named_parameters()}
    assert shapes == {"prompts": (layers, n_p, d_frozen), "norm.weight": (d_frozen,), "norm.bias": (d_frozen,),
                      "out_proj.weight": (d_side, d_frozen), "out_proj.bias": (d_side,)}
    assert fusion.num_heads == model.frozen.blocks[0].attn.num_heads
    assert not any(isinstance(m, torch.nn.Linear) and m.in_features == d_side and m.out_features == d_frozen
                   for m in side.modules())
    with torch.no_grad():
        fusion.prompts.normal_()  # make the residual on the prompts visible (they start at ~1e-6)
        fusion.norm.weight.uniform_(0.5, 1.5)
        fusion.norm.bias.normal_(std=0.1)
    k = [torch.randn(2, 7, d_frozen) for _ in range(layers)]
    v = [torch.randn(2, 7, d_frozen) for _ in range(layers)]
    with torch.no_grad():
        for j in range(layers):
            assert torch.allclose(fusion(j, k[j], v[j]), _restated_fusion(fusion, j, k[j], v[j]), atol=1e-5)
        # side network: fused prompts join each side layer's sequence and are dropped after it
        img = torch.randn(2, 3, 32, 32)
        x = side.embed(img)
        for j, blk in enumerate(side.blocks):
            x = blk(torch.cat([x, _restated_fusion(fusion, j, k[j], v[j])], dim=1))[:, :-n_p]
        want = F.layer_norm(x, (d_side,), side.norm.weight, side.norm.bias, side.norm.eps)[:, 0]
        assert torch.allclose(side(img, list(zip(k, v))), want, atol=1e-5)


def test_prompt_init_dropout_and_parameter_ratio_as_published():
    from tpp_monai.peft.fpt_plus import FPTPlusConfig, FPTSideNetwork

    torch.manual_seed(0)
    cfg = FPTPlusConfig()
    assert (cfg.num_prompts, cfg.side_depth, cfg.reduction, cfg.keep_ratio, cfg.importance) == (16, 6, 8, 0.2, "global")
    side = FPTSideNetwork(cfg, 768, 12)  # ViT-B/16 widths
    prompts = side.fusion.prompts
    assert prompts.shape == (6, 16, 768)
    assert abs(prompts.mean().item()) < 2e-8 and 0.98e-6 < prompts.std().item() < 1.02e-6  # N(0, 1e-6)
    assert side.fusion.dropout.p == 0.5 and side.blocks[0].attn.num_heads == 12
    # dropout 0.5 on the fused prompts: in training each value is either dropped or doubled
    k, v = torch.randn(1, 205, 768), torch.randn(1, 205, 768)
    with torch.no_grad():
        ref = side.fusion.eval()(0, k, v)
        out = side.fusion.train()(0, k, v)
    dropped = out == 0
    assert 0.4 < dropped.float().mean().item() < 0.6
    assert torch.allclose(out[~dropped], 2 * ref[~dropped], atol=1e-6)
    # 1.03% trainable parameters (paper) for ViT-B/16 + side network + a 2-class head
    with torch.device("meta"):
        vit = build_vit("base", img_size=512)
    trainable = sum(p.numel() for p in side.parameters()) + side.embed_dim * 2 + 2
    ratio = 100 * trainable / (trainable + sum(p.numel() for p in vit.parameters()))
    assert round(ratio, 2) == 1.03


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


def test_feature_cache_refuses_files_made_with_other_settings(tmp_path):
    model = _model().eval()
    data = [("a", torch.randn(3, 64, 64))]
    FeatureCache(tmp_path, _model(importance="cls")).build(data)
    with pytest.raises(ValueError, match=r"a\.safetensors.*importance.*overwrite=True"):
        FeatureCache(tmp_path, model).get(["a"])
    with pytest.raises(ValueError, match="importance"):
        FeatureCache(tmp_path, model).build(data)  # never silently reused
    FeatureCache(tmp_path, model).build(data, overwrite=True)
    assert len(FeatureCache(tmp_path, model).get(["a"])) == CFG["side_depth"]


def test_training_from_cache_updates_side_only(tmp_path):
    torch.manual_seed(0)
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
