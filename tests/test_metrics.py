"""Classification and segmentation metrics against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from tpp_monai.metrics.classification import (
    EpochClassificationMetric, accuracy, auc, auc_ovr, classification_metrics, macro_f1,
)
from tpp_monai.metrics.segmentation import (
    MEDCOSS_EMPTY_HD95, SegmentationMeter, dice_hd95_per_image, hd95_medpy, segmentation_metrics,
)

# binary: positives scored 0.35, 0.8; negatives 0.1, 0.4 -> 3 of 4 pairs ranked right
Y_BIN = [0, 0, 1, 1]
S_BIN = [0.1, 0.4, 0.35, 0.8]
# 3 classes; argmax = 0, 1, 1, 2
Y_MC = [0, 1, 2, 2]
S_MC = [[0.8, 0.1, 0.1], [0.2, 0.5, 0.3], [0.3, 0.4, 0.3], [0.1, 0.2, 0.7]]


def test_binary_hand_computed():
    assert accuracy(Y_BIN, S_BIN) == pytest.approx(0.75)
    assert auc(Y_BIN, S_BIN) == pytest.approx(0.75)
    # class 0: P 2/3 R 1 -> 0.8; class 1: P 1 R 1/2 -> 2/3
    assert macro_f1(Y_BIN, S_BIN) == pytest.approx((0.8 + 2 / 3) / 2)
    # (N, 2) probabilities give the same numbers as positive-class scores
    two = np.stack([1 - np.array(S_BIN), S_BIN], 1)
    assert classification_metrics(Y_BIN, two) == pytest.approx(classification_metrics(Y_BIN, S_BIN))


def test_multiclass_hand_computed():
    assert accuracy(Y_MC, S_MC) == pytest.approx(0.75)
    # OvO AUC: pairs (0,1) -> 1, (0,2) -> 1, (1,2) -> (1 + (0.5 + 1) / 2) / 2 = 0.875
    assert auc(Y_MC, S_MC) == pytest.approx((1 + 1 + 0.875) / 3)
    # F1: class 0 -> 1, class 1 -> 2/3, class 2 -> 2/3
    assert macro_f1(Y_MC, S_MC) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    pct = classification_metrics(torch.tensor(Y_MC), torch.tensor(S_MC), percent=True)
    assert pct["acc"] == pytest.approx(75.0) and pct["auc"] == pytest.approx(95.8333, abs=1e-3)


def test_multiclass_matches_sklearn_and_onehot_labels():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 50)
    s = rng.random((50, 4))
    s /= s.sum(1, keepdims=True)
    # the paper's AUC is MedCoSS's roc_auc_score(multi_class="ovo", average="macro")
    ovo = roc_auc_score(y, s, multi_class="ovo", average="macro")
    ovr = roc_auc_score(y, s, multi_class="ovr", average="macro")
    assert abs(ovo - ovr) > 1e-3  # the data tell the two definitions apart
    assert auc(y, s) == pytest.approx(ovo, abs=1e-12)
    assert auc_ovr(y, s) == pytest.approx(ovr, abs=1e-12)
    assert auc(np.eye(4)[y], s) == pytest.approx(auc(y, s))
    EpochClassificationMetric("auc_ovr")  # the alternative stays available by name


def _ovo_restated(y, s):
    """Hand & Till's M: mean over class pairs of (A(j|k) + A(k|j)) / 2, A by counting ordered pairs."""
    y, s = np.asarray(y), np.asarray(s, float)
    vals = []
    for j in range(s.shape[1]):
        for k in range(j + 1, s.shape[1]):
            def a(c, o):
                pos, neg = s[y == c, c], s[y == o, c]
                return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
            vals.append((a(j, k) + a(k, j)) / 2)
    return float(np.mean(vals))


def test_ovo_auc_matches_pairwise_restatement_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 40)
    s = np.round(rng.random((40, 3)), 1)  # many ties
    s /= s.sum(1, keepdims=True)
    assert auc(y, s) == pytest.approx(_ovo_restated(y, s), abs=1e-12)


def test_auc_skips_absent_class():
    y = [0, 0, 1, 1]  # class 2 never occurs: only the pair (0, 1) counts
    s = [[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]]
    # p0: class 0 {.7,.3} vs class 1 {.2,.1} -> 1; p1: class 1 {.7,.8} vs class 0 {.2,.6} -> 1
    assert auc(y, s) == pytest.approx(1.0)
    assert auc_ovr(y, s) == pytest.approx(1.0)


def test_ignite_epoch_metric_matches_functions():
    from ignite.engine import Engine

    batches = [(torch.tensor(S_MC[:2]), torch.tensor(Y_MC[:2])), (torch.tensor(S_MC[2:]), torch.tensor(Y_MC[2:]))]
    engine = Engine(lambda e, b: b)
    for name in ("acc", "auc", "f1"):
        EpochClassificationMetric(name).attach(engine, name)
    state = engine.run(batches, max_epochs=1)
    ref = classification_metrics(Y_MC, S_MC)
    for name in ref:
        assert state.metrics[name] == pytest.approx(ref[name])


def _square(r0, c0, n=4, size=8):
    m = torch.zeros(1, size, size, dtype=torch.long)
    m[0, r0:r0 + n, c0:c0 + n] = 1
    return m


def test_dice_hd_hand_computed():
    gt, pred = _square(2, 2), _square(2, 3)  # shifted one column: overlap 4 x 3 = 12
    d, h = dice_hd95_per_image(pred, gt, 2)
    assert d.item() == pytest.approx(2 * 12 / 32)
    assert h.item() == pytest.approx(1.0)
    # single pixels 3 rows and 4 columns apart: distance 5
    a = torch.zeros(1, 8, 8, dtype=torch.long)
    b = a.clone()
    a[0, 0, 0] = 1
    b[0, 3, 4] = 1
    d, h = dice_hd95_per_image(b, a, 2)
    assert d.item() == 0.0 and h.item() == pytest.approx(5.0)
    # logits input: argmax is taken
    logits = torch.stack([-pred.float(), pred.float()], 1)
    assert segmentation_metrics(logits, gt.unsqueeze(1))["dice"] == pytest.approx(0.75)


def test_empty_mask_policy():
    empty = torch.zeros(1, 8, 8, dtype=torch.long)
    some = _square(2, 2)
    diag = math.hypot(8, 8)
    assert [t.item() for t in dice_hd95_per_image(empty, empty, 2)] == [1.0, 0.0]
    # MedCoSS (evaluate.py compute_HD95): exactly one empty mask -> HD95 500, Dice 0
    for a, b in ((some, empty), (empty, some)):
        d, h = dice_hd95_per_image(a, b, 2)
        assert d.item() == 0.0 and h.item() == MEDCOSS_EMPTY_HD95 == 500.0
    d, h = dice_hd95_per_image(some, empty, 2, empty="diagonal")  # the former policy, kept by name
    assert d.item() == 0.0 and h.item() == pytest.approx(diag)
    d, h = dice_hd95_per_image(empty, some, 2, empty="policy")
    assert d.item() == 0.0 and h.item() == pytest.approx(diag)
    d, h = dice_hd95_per_image(empty, some, 2, empty="nan")
    assert math.isnan(d.item()) and math.isnan(h.item())
    # "nan" mode: excluded from the mean; policy mode: averaged in
    pred = torch.cat([_square(2, 3), empty])
    gt = torch.cat([_square(2, 2), some])
    assert segmentation_metrics(pred, gt, empty="nan")["dice"] == pytest.approx(0.75)
    assert segmentation_metrics(pred, gt)["dice"] == pytest.approx(0.375)
    assert segmentation_metrics(pred, gt)["hd95"] == pytest.approx((1.0 + 500.0) / 2)
    assert segmentation_metrics(pred, gt, empty="diagonal")["hd95"] == pytest.approx((1.0 + diag) / 2)


def test_multiclass_per_class_and_batches():
    gt = torch.zeros(1, 8, 8, dtype=torch.long)
    gt[0, :4] = 1
    gt[0, 4:] = 2
    pred = gt.clone()
    pred[0, 3] = 2  # one row of class 1 predicted as class 2
    meter = SegmentationMeter(3, class_names=["a", "b"])
    meter.update(pred, gt)
    meter.update(gt, gt)
    out = meter.aggregate(percent_dice=True)
    # image 1: class a: 2*24/(24+32) = 6/7; class b: 2*32/(40+32) = 8/9; image 2: 1, 1
    assert out["dice_a"] == pytest.approx(100 * (6 / 7 + 1) / 2)
    assert out["dice_b"] == pytest.approx(100 * (8 / 9 + 1) / 2)
    assert out["dice"] == pytest.approx((out["dice_a"] + out["dice_b"]) / 2)
    assert out["hd95_a"] == pytest.approx(0.5)  # image 1: 1 pixel, image 2: 0


def test_matches_monai_meandice_when_not_empty():
    from monai.metrics import DiceMetric

    torch.manual_seed(0)
    gt = (torch.rand(3, 16, 16) > 0.5).long()
    pred = (torch.rand(3, 16, 16) > 0.5).long()
    oh = lambda x: torch.nn.functional.one_hot(x, 2).permute(0, 3, 1, 2).float()  # noqa: E731
    m = DiceMetric(include_background=False, ignore_empty=False)
    m(oh(pred), oh(gt))
    assert segmentation_metrics(pred, gt)["dice"] == pytest.approx(m.aggregate().item(), abs=1e-6)


def test_bad_labels():
    with pytest.raises(ValueError, match="label values"):
        segmentation_metrics(torch.full((1, 4, 4), 3), torch.zeros(1, 4, 4, dtype=torch.long), num_classes=2)


def _medpy_hd95_restated(a: np.ndarray, b: np.ndarray) -> float:
    """medpy.metric.binary.hd95 (connectivity 1, spacing 1) by brute force: surface = pixels with a
    4-neighbour outside the mask (outside the image counts as outside); all surface-to-surface
    Euclidean distances; nearest per surface pixel in both directions; pooled 95th percentile."""
    def border(m):
        q = np.pad(m, 1)
        inner = m & q[:-2, 1:-1] & q[2:, 1:-1] & q[1:-1, :-2] & q[1:-1, 2:]
        return np.argwhere(m & ~inner).astype(float)

    pa, pb = border(a), border(b)
    d = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1))
    return float(np.percentile(np.hstack([d.min(1), d.min(0)]), 95))


def test_hd95_is_medpys_pooled_percentile():
    rng = np.random.default_rng(0)
    differs_from_monai = False
    for i in range(6):
        gt = np.zeros((24, 24), bool)
        pred = np.zeros((24, 24), bool)
        r, c = rng.integers(2, 12, 2)
        gt[r:r + rng.integers(4, 10), c:c + rng.integers(4, 10)] = True
        pred[rng.integers(0, 14):, rng.integers(0, 14):] = rng.random((1, 1)) > -1  # touches the image edge
        pred &= rng.random((24, 24)) > 0.2  # ragged, with holes
        want = _medpy_hd95_restated(pred, gt)
        assert hd95_medpy(pred, gt) == pytest.approx(want, abs=1e-9)
        pt, gtt = torch.from_numpy(pred).long()[None], torch.from_numpy(gt).long()[None]
        assert dice_hd95_per_image(pt, gtt, 2)[1].item() == pytest.approx(want, abs=1e-5)
        monai = dice_hd95_per_image(pt, gtt, 2, hd="monai")[1].item()
        differs_from_monai |= abs(monai - want) > 1e-3
    assert differs_from_monai  # the former (MONAI) definition is a different number
