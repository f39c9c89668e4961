"""Losses and metrics of common.py against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

import common


def _mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# Metrics: one hand-computed case per GRES no-target rule, then their mix.

GT_A = _mask([[1, 1, 0, 0]] * 2)  # 4 pixels
PRED_A = _mask([[0, 1, 1, 0]] * 2)  # I = 2, U = 6
EMPTY = torch.zeros(2, 4, dtype=torch.bool)


def _run(pred, gt, gt_nt, pred_nt=None):
    m = common.RISMetrics()
    m.update(
        pred[None],
        gt[None],
        torch.tensor([gt_nt]),
        None if pred_nt is None else torch.tensor([pred_nt]),
    )
    return m


def test_targeted_and_predicted_mask_TN():
    out = _run(PRED_A, GT_A, False).compute()
    assert out["oIoU"] == pytest.approx(2 / 6)
    assert out["mIoU"] == pytest.approx(2 / 6)
    assert out["Prec@0.5"] == 0.0
    assert "N-acc" not in out  # no no-target expression in this split


def test_no_target_predicted_empty_TP():
    m = _run(EMPTY, EMPTY, True)
    out = m.compute()
    assert out["mIoU"] == 1.0  # IoU := 1
    assert float(m.state[m._idx["U"]]) == 0.0  # adds nothing to ΣU
    assert out["N-acc"] == 1.0


def test_no_target_with_head_ignores_predicted_mask_TP():
    # The head says "no target": the official code ignores the (non-empty) mask entirely.
    m = _run(PRED_A, EMPTY, True, pred_nt=True)
    assert m.compute()["mIoU"] == 1.0
    assert float(m.state[m._idx["U"]]) == 0.0


def test_no_target_predicted_mask_FN():
    m = _run(PRED_A, EMPTY, True)
    out = m.compute()
    assert out["mIoU"] == 0.0
    assert float(m.state[m._idx["U"]]) == 4.0  # ΣU += |pred|
    assert out["N-acc"] == 0.0


def test_target_predicted_no_target_FP_keeps_union():
    # Head says no target although there is one: I forced to 0, U keeps |pred ∪ GT| = 6.
    m = _run(PRED_A, GT_A, False, pred_nt=True)
    assert m.compute()["mIoU"] == 0.0
    assert float(m.state[m._idx["I"]]) == 0.0
    assert float(m.state[m._idx["U"]]) == 6.0


def test_mixed_split_matches_hand_computation():
    # 4 samples: TN (I 2, U 6), TN perfect (I 4, U 4), TP (no target), FN (no target, |pred| 4)
    pred = torch.stack([PRED_A, GT_A, EMPTY, PRED_A])
    gt = torch.stack([GT_A, GT_A, EMPTY, EMPTY])
    gt_nt = torch.tensor([False, False, True, True])
    m = common.RISMetrics()
    iou = m.update(pred, gt, gt_nt)
    assert iou.tolist() == pytest.approx([1 / 3, 1.0, 1.0, 0.0])
    out = m.compute()
    assert out["oIoU"] == pytest.approx((2 + 4) / (6 + 4 + 0 + 4))
    assert out["gIoU"] == pytest.approx((1 / 3 + 1 + 1 + 0) / 4)
    assert out["Prec@0.5"] == pytest.approx(1 / 2)  # over the two targeted samples only
    assert out["Prec@0.9"] == pytest.approx(1 / 2)
    assert out["N-acc"] == pytest.approx(1 / 2)  # TP / (TP + FN)
    assert out["T-acc"] == pytest.approx(1.0)  # TN / (TN + FP)
    assert out["n"] == 4


def test_prec_uses_greater_or_equal():
    gt = _mask([[1, 1, 0, 0]])
    pred = _mask([[1, 0, 0, 0]])  # IoU exactly 0.5
    m = common.RISMetrics()
    m.update(pred[None], gt[None])
    assert m.compute()["Prec@0.5"] == 1.0


def test_prec_strict_counts_iou_above_x_only():
    """Five samples whose IoU is exactly 0.5, 0.6, 0.7, 0.8, 0.9 (k of the GT's 10 pixels
    predicted, k = 5..9): IoU >= X (LAVT, ReLA, MagNet) counts the sample at X, IoU > X (CRIS,
    ASDA: prec_strict=True) does not."""
    gt = torch.zeros(5, 10, dtype=torch.bool)
    gt[:] = True
    pred = torch.zeros(5, 10, dtype=torch.bool)
    for i, k in enumerate(range(5, 10)):
        pred[i, :k] = True
    ge, gt_only = common.RISMetrics(), common.RISMetrics(prec_strict=True)
    iou = ge.update(pred, gt)
    assert iou.tolist() == [0.5, 0.6, 0.7, 0.8, 0.9]  # exact in float64
    assert torch.equal(gt_only.update(pred, gt), iou)
    a, b = ge.compute(), gt_only.compute()
    for j, t in enumerate(common.PREC_THRESHOLDS):  # IoU >= t: samples j..4; IoU > t: j+1..4
        assert a[f"Prec@{t}"] == pytest.approx((5 - j) / 5), t
        assert b[f"Prec@{t}"] == pytest.approx((4 - j) / 5), t
    assert a["mIoU"] == b["mIoU"] and a["oIoU"] == b["oIoU"]  # only Prec@X depends on the rule


def test_accumulation_is_order_independent_and_mergeable():
    # Two "ranks" summed state == one pass over everything (what all_reduce does in DDP).
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(6, 5, 5, generator=g) > 0.5
    gt = torch.rand(6, 5, 5, generator=g) > 0.6
    gt[4] = False
    full, a, b = common.RISMetrics(), common.RISMetrics(), common.RISMetrics()
    full.update(pred, gt)
    a.update(pred[:3], gt[:3])
    b.update(pred[3:], gt[3:])
    a.state += b.state
    for k, v in full.compute().items():
        assert a.compute()[k] == pytest.approx(v)
    a.all_reduce()  # no process group: a no-op


# ---------------------------------------------------------------------------------------------
# Losses


def test_bce_resizes_target_nearest():
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.ones(1, 4, 4)
    assert common.bce_loss(logits, target).item() == pytest.approx(math.log(2))


def test_weighted_ce_matches_manual_weighted_mean():
    logits = torch.tensor([[[2.0, -1.0]], [[0.5, 1.0]]]).permute(1, 0, 2)  # (1, 2, 2)
    target = torch.tensor([[0, 1]])
    lp = F.log_softmax(logits, dim=1)
    manual = -(0.9 * lp[0, 0, 0] + 1.1 * lp[0, 1, 1]) / (0.9 + 1.1)
    assert common.weighted_ce_loss(logits, target).item() == pytest.approx(manual.item())


def test_dice_perfect_and_disjoint():
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    perfect = torch.tensor([[[[50.0, -50.0], [-50.0, -50.0]]]])
    assert common.dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    disjoint = -perfect
    # p sums to 3 on the wrong pixels, g sums to 1: 1 - (0 + 1) / (3 + 1 + 1)
    assert common.dice_loss(disjoint, target).item() == pytest.approx(1 - 1 / 5, abs=1e-6)


def test_focal_gamma0_alpha_off_is_bce():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 3, 3, generator=g)
    target = (torch.rand(2, 3, 3, generator=g) > 0.5).float()
    focal = common.sigmoid_focal_loss(logits, target, alpha=-1, gamma=0)
    assert focal.item() == pytest.approx(common.bce_loss(logits, target).item(), rel=1e-6)
    # With gamma > 0 easy pixels are down-weighted, so the loss is smaller.
    assert common.sigmoid_focal_loss(logits, target, alpha=-1, gamma=2).item() < focal.item()
