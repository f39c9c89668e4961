"""Losses and metrics shared by every method (and nothing else).

Shape legend used across the repository: B batch, L words (tokens), C channels, H, W image or
feature-map height and width, N queries / regions / patches.

Losses take logits (never probabilities) and float targets in {0, 1}; a target at another
resolution than the logits is resized with nearest neighbour first (`fit_target`), as CRIS and
ASDA do. Methods that compare at the GT's resolution instead (LAVT, Mask2Former, ReLA) upsample
their logits first (`upsample_to`): on small objects a nearest-shrunk GT loses most pixels.

Metrics follow the official evaluation code of GRES/ReLA (`refer_evaluation.py`), which on data
without no-target expressions reduces to the LAVT definitions (oIoU = ΣI/ΣU, mIoU = mean IoU,
Prec@X with IoU >= X). The CLIP family's official code (CRIS, ASDA: `engine.py`) counts Prec@X
with IoU > X instead: `RISMetrics(prec_strict=True)`. See `RISMetrics`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss as _tv_sigmoid_focal_loss

# ---------------------------------------------------------------------------------------------
# Losses


def fit_target(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Resize a (B, H, W) or (B, 1, H, W) {0,1} target to the logits' (B, 1, h, w) grid.

    Nearest neighbour, so the target stays binary."""
    if target.dim() == 3:
        target = target.unsqueeze(1)  # (B, H, W) -> (B, 1, H, W)
    target = target.to(logits.dtype)
    if target.shape[-2:] != logits.shape[-2:]:
        target = F.interpolate(target, size=logits.shape[-2:], mode="nearest")
    return target


def upsample_to(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) logits -> (B, 1, H, W) at the (B, H, W) target's resolution (bilinear).

    At the 64 px demo a GT shrunk to stride-4 logits by nearest neighbour, upsampled back, scores
    IoU 0.57 against the real masks (stride 2: 0.81): losses on it cap what a model can learn."""
    return F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy with logits. logits (B, 1, h, w); target (B, H, W) in [0, 1]."""
    return F.binary_cross_entropy_with_logits(logits, fit_target(target, logits))


def weighted_ce_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: tuple[float, float] = (0.9, 1.1)
) -> torch.Tensor:
    """2-class cross-entropy with class weights [background, foreground] (LAVT / ReLA: [0.9, 1.1]).

    logits: (B, 2, ...) class scores; target: (B, ...) integer or {0,1} float labels.
    Mean is torch's weighted mean (divided by the sum of the per-element weights), as in the
    released code, which calls `F.cross_entropy(..., weight=...)`.
    """
    w = torch.tensor(weight, dtype=logits.dtype, device=logits.device)
    return F.cross_entropy(logits, target.long(), weight=w)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss on sigmoid probabilities, per sample then averaged over the batch.

    1 - (2 Σ p·g + s) / (Σ p + Σ g + s), with s = 1 as in ASDA's and MaskFormer's code.
    """
    target = fit_target(target, logits).flatten(1)  # (B, h*w)
    prob = logits.sigmoid().flatten(1)  # (B, h*w)
    inter = (prob * target).sum(1)
    return (1 - (2 * inter + smooth) / (prob.sum(1) + target.sum(1) + smooth)).mean()


def sigmoid_focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al., 2017), mean over pixels; torchvision's implementation.

    alpha < 0 disables the class balancing term, gamma = 0 turns it into plain BCE (ASDA's release
    calls it with alpha=-1, gamma=0).
    """
    return _tv_sigmoid_focal_loss(logits, fit_target(target, logits), alpha, gamma, "mean")


# ---------------------------------------------------------------------------------------------
# Metrics


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of two batches of binary masks (B, ...) -> (B,); two empty masks agree: 1."""
    a, b = a.flatten(1), b.flatten(1)
    inter, union = (a & b).sum(1).double(), (a | b).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


class RISMetrics:
    """Accumulates the referring-segmentation metrics over a split, one expression per sample.

    Per sample (binary prediction and GT at the evaluated resolution), following ReLA's
    `refer_evaluation.py`:

    | GT         | predicted     | name | sample IoU | adds to ΣI | adds to ΣU    |
    |------------|---------------|------|------------|------------|---------------|
    | no target  | no target     | TP   | 1          | 0          | 0             |
    | no target  | a mask        | FN   | 0          | 0          | abs(pred)     |
    | target     | no target     | FP   | 0          | 0          | abs(pred∪GT)  |
    | target     | a mask        | TN   | I/U        | I          | U             |

    ("Predicted no target" is the method's no-target head when it has one, else an empty mask.
    With a head, the FP row keeps the predicted mask in the union, as the official code does.)

    compute() returns oIoU (= cIoU) = ΣI/ΣU, mIoU (= gIoU) = mean sample IoU, Prec@X over
    targeted samples only and, only when the split has no-target expressions,
    N-acc = TP/(TP+FN) and T-acc = TN/(TN+FP). All state is sums and counts in one float64
    tensor, so `all_reduce()` merges DDP ranks exactly.

    Prec@X counts IoU >= X, as the Swin/BERT family's official code does (LAVT and MagNet
    `test.py`, ReLA `refer_evaluation.py`); prec_strict=True counts IoU > X, as the CLIP family's
    does (CRIS and ASDA `engine.py`). The two differ only on samples whose IoU is exactly X.
    """

    # Layout of the state vector.
    _NAMES = ("I", "U", "iou_sum", "n", "n_target", "TP", "FN", "FP", "TN") + tuple(
        f"prec@{t}" for t in PREC_THRESHOLDS
    )

    def __init__(self, device: torch.device | str = "cpu", prec_strict: bool = False):
        self.prec_strict = prec_strict  # Prec@X: IoU > X (CRIS, ASDA) instead of IoU >= X
        self.state = torch.zeros(len(self._NAMES), dtype=torch.float64, device=device)
        self._idx = {k: i for i, k in enumerate(self._NAMES)}

    def _add(self, name: str, value: torch.Tensor | float) -> None:
        self.state[self._idx[name]] += value

    @torch.no_grad()
    def update(
        self,
        pred: torch.Tensor,
        gt: torch.Tensor,
        gt_no_target: torch.Tensor | None = None,
        pred_no_target: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Add a batch. pred, gt: (B, H, W) bool or {0,1}; gt/pred_no_target: (B,) bool.

        gt_no_target defaults to "GT mask is empty"; pred_no_target defaults to "predicted mask is
        empty" (methods without a no-target head). Returns the per-sample IoU (B,) float64.
        """
        pred, gt = pred.bool().flatten(1), gt.bool().flatten(1)  # (B, H*W)
        if gt_no_target is None:
            gt_no_target = ~gt.any(1)
        if pred_no_target is None:
            pred_no_target = ~pred.any(1)
        gt_nt, pred_nt = gt_no_target.bool(), pred_no_target.bool()
        inter = (pred & gt).sum(1).double()  # (B,)
        union = (pred | gt).sum(1).double()  # (B,)
        n_pred = pred.sum(1).double()

        tp = gt_nt & pred_nt
        fn = gt_nt & ~pred_nt
        fp = ~gt_nt & pred_nt
        tn = ~gt_nt & ~pred_nt
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))
        iou = torch.where(tp, torch.ones_like(iou), iou)
        iou = torch.where(fn | fp, torch.zeros_like(iou), iou)

        self._add("I", (inter * tn).sum())
        self._add("U", (union * tn).sum() + (n_pred * fn).sum() + (union * fp).sum())
        self._add("iou_sum", iou.sum())
        self._add("n", float(len(iou)))
        self._add("n_target", (~gt_nt).sum())
        for name, m in (("TP", tp), ("FN", fn), ("FP", fp), ("TN", tn)):
            self._add(name, m.sum())
        for t in PREC_THRESHOLDS:
            passed = iou > t if self.prec_strict else iou >= t
            self._add(f"prec@{t}", (passed & ~gt_nt).sum())
        return iou

    def all_reduce(self) -> None:
        """Sum the state over DDP ranks (no-op when torch.distributed is not initialised)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.state)

    def compute(self) -> dict[str, float]:
        s = {k: float(self.state[i]) for k, i in self._idx.items()}
        out = {
            "oIoU": s["I"] / s["U"] if s["U"] > 0 else 0.0,
            "mIoU": s["iou_sum"] / s["n"] if s["n"] > 0 else 0.0,
        }
        out["cIoU"], out["gIoU"] = out["oIoU"], out["mIoU"]  # GRES names for the same numbers
        for t in PREC_THRESHOLDS:
            out[f"Prec@{t}"] = s[f"prec@{t}"] / s["n_target"] if s["n_target"] > 0 else 0.0
        if s["TP"] + s["FN"] > 0:  # the split has no-target expressions
            out["N-acc"] = s["TP"] / (s["TP"] + s["FN"])
            out["T-acc"] = s["TN"] / (s["TN"] + s["FP"]) if s["TN"] + s["FP"] > 0 else 0.0
        out["n"] = int(s["n"])
        return out
