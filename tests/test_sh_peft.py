import copy
import math

import pytest
import torch
from torch import nn

from tpp_monai.backbones.vit import build_vit
from tpp_monai.peft import apply_peft, get_peft
from tpp_monai.peft.sh_peft import (
    MaskedAdamW, SHPeft, apply_sparse_delta, build_mask, estimate_importance, mask_size, save_sparse_delta,
)


def _linear():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.25, -0.5]]))
        lin.bias.copy_(torch.tensor([1.0, -2.0]))
    return lin


X = [torch.tensor([[1.0, 2.0, -3.0]]), torch.tensor([[0.5, -1.0, 1.0]])]


def _sum_loss(model, x):
    return model(x).sum()  # dL/dW[i, j] = x_j for both rows, dL/db = 1


def test_importance_l1_l2_by_hand():
    lin = _linear()
    w, b = lin.weight.detach().double(), lin.bias.detach().double()
    xs, xq = X[0][0] + X[1][0], X[0][0] ** 2 + X[1][0] ** 2  # (1.5, 1, -2), (1.25, 5, 10)
    # L1: I_td = |sum_b g_b|, I_ta = |w|, scale = sum I_td / sum I_ta
    td_w, td_b = xs.abs().expand(2, 3), torch.tensor([2.0, 2.0], dtype=torch.float64)
    s = (td_w.sum() + td_b.sum()) / (w.abs().sum() + b.abs().sum())  # 13 / 7.25
    imp = estimate_importance(lin, _sum_loss, X, variant="l1")
    assert torch.allclose(imp["weight"].double(), td_w + s * w.abs(), atol=1e-6)
    assert torch.allclose(imp["bias"].double(), td_b + s * b.abs(), atol=1e-6)
    assert float(s) == pytest.approx(13 / 7.25)
    # L2: I_td = sum_b g_b^2, I_ta = w^2; lam = 0.5
    td_w, td_b = xq.expand(2, 3), torch.tensor([2.0, 2.0], dtype=torch.float64)
    s = 0.5 * (td_w.sum() + td_b.sum()) / ((w ** 2).sum() + (b ** 2).sum())
    imp = estimate_importance(lin, _sum_loss, X, variant="l2", lam=0.5)
    assert torch.allclose(imp["weight"].double(), td_w + s * w ** 2, atol=1e-5)
    assert torch.allclose(imp["bias"].double(), td_b + s * b ** 2, atol=1e-5)
    assert lin.weight.grad is None and lin.weight.requires_grad


def test_mask_has_exactly_k_entries():
    imp = {"a": torch.rand(37, 11), "b": torch.rand(5), "c": torch.rand(3, 3, 3)}
    n = 37 * 11 + 5 + 27
    for p in (0.01, 1.0, 3.3, 50.0, 100.0):
        m = build_mask(imp, p)
        k = sum(int(v.sum()) for v in m.values())
        assert k == mask_size(n, p) == min(n, max(1, math.ceil(n * p / 100)))
        sel = torch.cat([imp[x].flatten()[m[x].flatten()] for x in imp])
        rest = torch.cat([imp[x].flatten()[~m[x].flatten()] for x in imp])
        if rest.numel():
            assert sel.min() >= rest.max()


def _setup(top_percent=2.0):
    vit = build_vit("tiny", img_size=32, patch_size=16, depth=2)
    head = nn.Linear(192, 3)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])

    def loss_fn(model, batch):
        return nn.functional.cross_entropy(head(model(batch[0])[:, 0]), batch[1])

    imp = estimate_importance(vit, loss_fn, [(x[:2], y[:2]), (x[2:], y[2:])])
    assert set(imp) == {n for n, _ in vit.named_parameters()}  # all layer types, LayerNorm included
    mask = build_mask(imp, top_percent)
    return vit, head, x, y, loss_fn, mask


def test_unmasked_entries_bit_identical_after_adamw_with_decay():
    vit, head, x, y, loss_fn, mask = _setup()
    before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    apply_peft(vit, "sh_peft", mask=mask)
    m = get_peft(vit)
    opt = MaskedAdamW(vit, lr=1e-2, weight_decay=0.1, extra_params=head.parameters())
    for _ in range(4):
        opt.zero_grad()
        loss_fn(vit, (x, y)).backward()
        for n, p in vit.named_parameters():
            if p.grad is not None:
                assert not p.grad[~mask[n]].any()  # gradient hooks zero unselected entries
        opt.step()
    changed = 0
    for n, p in vit.named_parameters():
        sel = mask[n]
        assert torch.equal(p.detach()[~sel], before[n][~sel]), n
        changed += int((p.detach()[sel] != before[n][sel]).sum())
    assert changed > 0.9 * m.num_selected()


def test_full_mask_matches_torch_adamw():
    lin, ref = _linear(), _linear()
    apply_peft(lin, SHPeft(mask={n: torch.ones_like(p, dtype=torch.bool) for n, p in lin.named_parameters()}))
    opt = MaskedAdamW(lin, lr=0.1, weight_decay=0.3)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=0.1, weight_decay=0.3)
    for x in X * 2:
        for mod, o in ((lin, opt), (ref, opt_ref)):
            o.zero_grad()
            (mod(x) ** 2).sum().backward()
            o.step()
    for a, b in zip(lin.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_sparse_delta_round_trip_exact(tmp_path):
    vit, head, x, y, loss_fn, mask = _setup(1.0)
    fresh = copy.deepcopy(vit)
    apply_peft(vit, "sh_peft", mask=mask)
    opt = MaskedAdamW(vit, lr=1e-2, weight_decay=0.05)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(vit, (x, y)).backward()
        opt.step()
    path = save_sparse_delta(vit, tmp_path / "delta.safetensors")
    assert (tmp_path / "delta.safetensors").stat().st_size < 0.1 * sum(p.numel() * 4 for p in vit.parameters())
    assert not torch.equal(fresh(x), vit(x))
    apply_sparse_delta(fresh, path)
    vit.eval(), fresh.eval()
    assert torch.equal(fresh(x), vit(x))
    for (n, a), (_, b) in zip(vit.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n


def test_inject_without_mask_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs a mask"):
        apply_peft(build_vit("tiny", img_size=32, depth=1), "sh_peft")


def test_protect_makes_a_stock_optimizer_exact():
    vit, head, x, y, loss_fn, mask = _setup()
    before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    m = apply_peft(vit, "sh_peft", mask=mask)
    params = [p for p in vit.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.1)
    m.protect(vit, opt)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(vit, (x, y)).backward()
        opt.step()
    for n, p in vit.named_parameters():
        assert torch.equal(p.detach()[~mask[n]], before[n][~mask[n]]), n
    assert any(not torch.equal(p.detach()[mask[n]], before[n][mask[n]]) for n, p in vit.named_parameters())


# ------------------------------------------------------------------ the paper's optimiser (issue 23.6)
def _masked_model(seed: int = 0):
    torch.manual_seed(seed)
    vit = build_vit("tiny", img_size=16, patch_size=8, depth=1)
    imp = estimate_importance(vit, lambda m, x: m(x).pow(2).mean(), [torch.randn(2, 3, 16, 16)])
    apply_peft(vit, SHPeft(mask=build_mask(imp, 5.0)))
    return vit


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_masked_sgd_equals_torch_sgd_on_the_selected_entries(wd):
    """MaskedSGD = torch.optim.SGD(momentum 0.9[, weight decay]) on the selected entries (the reference is
    torch's own SGD on a copy, whose unselected entries are then put back); unselected entries bit-identical."""
    from tpp_monai.peft.sh_peft import MaskedSGD

    ours = _masked_model()
    ref = copy.deepcopy(ours)
    start = {n: p.detach().clone() for n, p in ours.named_parameters()}
    masks = get_peft(ours).mask
    opt = MaskedSGD(ours, lr=1e-2, momentum=0.9, weight_decay=wd)
    ref_params = [p for n, p in ref.named_parameters() if n in masks]
    ref_opt = torch.optim.SGD(ref_params, lr=1e-2, momentum=0.9, weight_decay=wd)
    get_peft(ref).protect(ref, ref_opt)  # restores the unselected entries after each stock step
    torch.manual_seed(1)
    for _ in range(4):
        x = torch.randn(2, 3, 16, 16)
        for m, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    rp = dict(ref.named_parameters())
    moved = 0
    for n, p in ours.named_parameters():
        if n not in masks:
            assert torch.equal(p, start[n]), n
            continue
        m = masks[n]
        assert torch.equal(p[~m], start[n][~m]), n  # never written
        assert torch.allclose(p[m], rp[n][m], atol=1e-7, rtol=1e-6), n  # same per-element arithmetic
        moved += int((p[m] != start[n][m]).sum())
    assert moved > 0


def test_sh_peft_defaults_are_the_papers():
    """SH-PEFT: SGD, lr 1e-3, cosine, batch 64, importance within one epoch."""
    from tpp_monai.peft.sh_peft import PAPER_DEFAULTS, MaskedSGD, build_sh_optimizer

    assert PAPER_DEFAULTS["optimizer"] == "sgd" and PAPER_DEFAULTS["lr"] == 1e-3
    assert PAPER_DEFAULTS["schedule"] == "cosine" and PAPER_DEFAULTS["batch_size"] == 64
    assert PAPER_DEFAULTS["importance_epochs"] == 1
    opt = build_sh_optimizer(_masked_model())
    assert isinstance(opt, MaskedSGD) and opt.param_groups[0]["lr"] == 1e-3
    assert isinstance(build_sh_optimizer(_masked_model(), optimizer="adamw"), MaskedAdamW)
