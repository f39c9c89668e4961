"""ReLA: region-based relationship modelling for Generalized Referring Expression Segmentation.

Paper: "GRES: Generalized Referring Expression Segmentation", Chang Liu, Henghui Ding, Xudong Jiang,
CVPR 2023. https://arxiv.org/abs/2306.00968 (project page https://henghuiding.github.io/GRES)

Idea. GRES lets an expression refer to any number of objects, including none. ReLA splits the image
into P×P "regions" that are not a fixed grid: P² learnable region queries collect their own image
features by cross-attention (RIA, Eq. 2), then talk to each other and to the words (RLA, Eq. 3).
Each region n predicts a mask M_r^n (its region filter times the pixel decoder's mask features) and
a probability x_r^n that it contains a target; the output mask is the x_r-weighted sum of the region
masks (Eq. 1). A "minimap", the ground truth downsampled to P×P, supervises x_r so that query n is
tied to image patch n. The mean region feature predicts a no-target label E; when E is positive the
output mask is emptied.

Reading order: the paper's parts first (§4.2: RIA, RLA, one decoder layer; §4.1: the heads and
Eq. 1), then, set apart, the plumbing they sit on (the released code's language-aware Swin and the
pixel decoder), then the model, its loss, `diagnostics` and the sample panels.

Symbols (paper -> code), shape legend B batch, L words, C channels, H, W map size, N = P² regions:
    F_i        image features of one pixel-decoder level     F_i        (B, H*W, C)
    F_t        language features (BERT, projected to C)      F_t        (B, L, C)
    F_m        mask features (stride 4)                      F_m        (B, C, H/4, W/4)
    Q_r        region-based queries                          query_feat (N, C) (nn.Embedding)
    A_ri       region-image attention (Eq. 2)                A_ri       (B, heads, N, H*W)
    F'_r       region image features (RIA output)            F_r_prime  (B, N, C)
    F_r1       region self-attention output                  F_r1       (B, N, C)
    A_l        region-word attention (Eq. 3)                 A_l        (B, heads, N, L)
    F_r2       language-aware region features                F_r2       (B, N, C)
    F_r        region features MLP(F'_r + F_r1 + F_r2)       F_r        (B, N, C)
    F_f        region filters                                F_f        (B, N, C)
    M_r        region masks                                  M_r        (B, N, H/4, W/4)
    x_r        minimap, P×P region probabilities             x_r        (B, N)
    M          output mask, Eq. (1)                          M          (B, 1, H/4, W/4)
    E          no-target score                               no_target_logits (B,)
    P          regions per side (Table 4: 4, 8, 10, 12)      cfg.P

Training recipe. The paper gives none; RECIPE below is the release's (AdamW 1e-5, weight decay
0.05, batch 48, 150k iterations, lr x0.1 at 110k and 140k, gradient-norm clip 0.01, BERT embeddings
and layers 10-11 frozen). The CPU demo uses train.py's shared demo recipe instead.

Differences from the paper and the released code (github.com/henghuiding/ReLA), one per line.
The paper is silent (we take the release's choice unless stated):
- Attention: 8 heads, 1/sqrt(d) scale, learnable region positions (Eq. 2-3 show none).
- Residual + post-LayerNorm around RIA and RLA: F_r = LN(S + MLP(S)), S = F'_r + F_r1 + F_r2.
- 9 decoder layers (released DEC_LAYERS 10 - 1) reading strides 32, 16, 8 in turn (Mask2Former).
- Pixel decoder: transformer encoder on the stride-32 map + FPN (released: MSDeformAttn, 6 layers).
- Minimap target: the paper says x_r^n is the probability that region n contains targets; we
  mark the cells holding any target pixel. The release resizes bilinearly then truncates (a
  cell-centre sample; minimap_rule="release"): at 64 px it marks a third of those cells, and even
  a perfect x_r then ranks target cells above the others with AUC 0.65.
- Loss: 5 * (CE_mask + 0.1 CE_minimap + 0.1 CE_nt), class weights [0.9, 1.1] (released criterion).
- Filters from the last F'_r, x_r and E from F_r (§4.2 "F_f ... based on F'_r").
The release differs:
- Encoder: Fig. 4 and §4.1 encode image (Swin) and text (BERT) separately and fuse only in ReLA;
  Table 5 lists "LAVT+ReLA" (61.32 gIoU val) as another model than "ReLA" (63.60). The release's
  ReLA is LAVT's language-aware Swin (PWAM + tanh gate in stages 1-3) + the ReLA decoder. We follow
  the release; `--ablate no_encoder_fusion` is the Fig. 4 description (Table 5 rows below).
- Gates: the release zero-inits BOTH gate Linears and never re-inits them, so a gate's gradient is
  exactly zero and its gates stay closed for the whole run (text reaches the decoder only through
  the PWAM outputs). gate_init="release" does that; "learnable" (ours) zero-inits the second only.
- RIA: released = Mask2Former masked attention; ours is Eq. 2 unmasked.
- RLA: released main: language attention in layer 0 only; original: RLA once after the last layer.
- Region-language attention ignores [PAD] words (released: no mask, pads are attended).
- Eq. (1): released weights by raw minimap logits fg - bg (fusion_weight="logit"); ours x_r.
- No-target: released averages per-region MLP outputs; ours an MLP of the mean F_r (paper).
- mask_logits is one map M; the 2-class CE sees logits (0, M), released sees (bg, fg) = same loss.
We deviate on purpose:
- Eq. (1) + a learnable prior bias b (init logit of 4%, the demo's foreground share) and a small
  last filter layer: M starts calibrated (mask CE ~0.2; without: |M| ~ 20-40, CE 19-95).
- The minimap head starts at the same prior (x_r ~ 0.04), as detectors' focal-loss prior init.
- RIA's positions: a separate term pos_scale · q_pos·pos / sqrt(C) on the scores, q_pos starting
  at cell n's sine position (region n starts at cell n); released: sine keys and N(0, 1) query
  positions inside Mask2Former's projections, which start every region looking everywhere.
- gate_init="learnable" by default: the release's closed gates keep the text out of the Swin
  stream for good (it reaches the decoder only through the PWAM outputs).
- All BERT layers train in the demo (RECIPE["frozen"] has the release's frozen ones).
- Inference: mask_logits = -1e4 where E > 0 (mask_logits_raw keeps M for the official FP union).
- ReLA-50pix (Table 6): 50 pixels at the paper's 480×480, scaled with the image area (<1 px at 64).
- tiny(): the shared pretrained tiny Swin (32-256 channels) + BERT (64-d); C = 64, 3 decoder layers;
  P stays 10 although the stride-32 map is 2×2 (so hard_split repeats cells and warns).
- "hard_split" is Table 2 #2 (P×P average pooling in RIA); #1 (split the input image) is not here.

Reference code: https://github.com/henghuiding/ReLA (branches main and original), LAVT's PWAM:
https://github.com/yz93/LAVT-RIS (lib/backbone.py).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, SwinBackbone, SwinConfig

from common import upsample_to, weighted_ce_loss

TEXT_ENCODER = "bert"

ABLATIONS: dict[str, str] = {
    "hard_split": "RIA replaced by average pooling the image feature into P×P cells",
    "no_minimap": "no minimap supervision: region queries become plain learnable queries",
    "no_region_att": "RLA without region self-attention F_r1",
    "no_language_att": "RLA without region-language attention; F_r2 = F'_r * mean word feature",
    "no_encoder_fusion": "plain Swin and BERT, no LAVT pixel-word attention in the Swin stages",
}
# Non-boolean switches are Config fields: P (Table 4), no_target_pixels (Table 6 ReLA-50pix).

SWIN_STAGES = ["stage1", "stage2", "stage3", "stage4"]


def _swin_b() -> dict:
    # Swin-B, window 12, 384 pretraining (configs/referring_swin_base.yaml); drop path 0.3 as LAVT.
    return dict(
        image_size=384,
        patch_size=4,
        embed_dim=128,
        depths=[2, 2, 18, 2],
        num_heads=[4, 8, 16, 32],
        window_size=12,
        drop_path_rate=0.3,
    )


def _bert_base() -> dict:
    # bert-base-uncased (the released code's text encoder; its pooler is not used).
    return dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
    )


@dataclass
class Config:
    image_size: int = 480  # released INPUT.IMAGE_SIZE (plain resize, no augmentation)
    max_tokens: int = 20  # REFERRING.MAX_TOKENS, incl. [CLS]/[SEP]
    vocab_size: int = 30522  # bert-base-uncased; train.py sets len(tokenizer)
    threshold: float = 0.5  # argmax of 2 classes = sigmoid(fg - bg) > 0.5
    pretrained: bool = True
    vision_name: str = "microsoft/swin-base-patch4-window12-384-in22k"
    text_name: str = "bert-base-uncased"
    vision_config: dict = field(default_factory=_swin_b)
    text_config: dict = field(default_factory=_bert_base)
    ablate: tuple[str, ...] = ()
    # --- language-aware Swin (LAVT PWAM, released swin.py) ---
    pwam_dropout: float = 0.0  # LAVT fusion_drop
    # "release": both gate Linears zero (the release: zero gradient, gates closed for good);
    # "learnable": only the second one zero (closed at the start, they open if useful).
    gate_init: str = "learnable"
    # --- pixel decoder ---
    hidden_dim: int = 256  # C: CONVS_DIM = MASK_DIM = decoder HIDDEN_DIM
    encoder_layers: int = 6  # released: 6 deformable layers (ours: plain transformer layers)
    encoder_ffn: int = 1024  # released, hard-coded
    gn_groups: int = 32  # GroupNorm(32) in the released pixel decoder
    # --- ReLAtionship modelling (§4.2) ---
    P: int = 10  # regions per side, N = P² queries (Table 4: 10 is best)
    dec_layers: int = 9  # released DEC_LAYERS 10 - 1
    num_heads: int = 8  # released NHEADS
    dec_ffn: int = 2048  # released DIM_FEEDFORWARD (the MLP of F_r = MLP(...))
    pos_scale: float = 8.0  # sharpness of RIA's positional term (ours, see RIA)
    # Eq. (1) weights: "prob" = x_r (paper); "logit" = fg - bg minimap logits (released main).
    # "logit" trains with this initialisation (demo, 300 steps, release minimap rule: gIoU 40.1,
    # "prob" 39.2); with 0.02-scale identical queries and |M| ~ 20-40 at init it stalled (gIoU 8.8,
    # N-acc 0 after 350 steps).
    fusion_weight: str = "prob"
    prior: float = 0.04  # init only: the mask bias and x_r start at this foreground share
    # --- no-target decision ---
    # 0: the no-target head E decides (ReLA). > 0: Table 6 "ReLA-50pix": the head is ignored and a
    # mask with fewer positive pixels than this (counted at 480×480, scaled with the image area)
    # is no-target. The head still trains, so a trained model can be evaluated both ways.
    no_target_pixels: float = 0.0
    # --- losses (released criterion.py) ---
    class_weight: tuple[float, float] = (0.9, 1.1)  # [bg, fg] in all three CE terms
    loss_scale: float = 5.0  # released MASK_WEIGHT, multiplies the whole loss_mask
    minimap_weight: float = 0.1
    # "any": a cell is a target cell when it holds any target pixel (the paper's "containing
    # targets"); "release": bilinear + truncation, a cell-centre sample (see minimap_target).
    minimap_rule: str = "any"
    no_target_weight: float = 0.1

    @classmethod
    def paper(cls) -> Config:
        """Swin-B + BERT-base from the Hub, 480 px, 20 tokens, P = 10, 9 decoder layers."""
        return cls()

    @classmethod
    def tiny(cls) -> Config:
        """The demo: the repository's pretrained tiny Swin + BERT (pretrain.py), 64 px, P = 10.

        vision_config / text_config repeat the folders' architectures, so `pretrained=False`
        (--no-pretrained, tests) builds the same encoders with random weights."""
        return cls(
            image_size=64,
            vocab_size=128,  # train.py sets len(tokenizer)
            vision_name="pretrained/tiny-swin",
            text_name="pretrained/tiny-bert",
            vision_config=dict(
                image_size=64,
                patch_size=4,
                embed_dim=32,
                depths=[2, 2, 2, 2],
                num_heads=[1, 2, 4, 8],
                window_size=4,
                mlp_ratio=4.0,
                drop_path_rate=0.0,
            ),
            text_config=dict(
                hidden_size=64,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=256,
                max_position_embeddings=32,
            ),
            hidden_dim=64,  # = the tiny BERT width; Swin gives 32-256 channels
            encoder_layers=1,
            encoder_ffn=128,
            gn_groups=8,
            dec_layers=3,  # one pass over the three levels
            num_heads=4,
            dec_ffn=128,
        )


# The paper's ablation tables (gRefCOCO val, Swin-B, numbers in %). Table 2 #4, Table 3 #4 and
# Table 4 "10×10" are the same model, the full ReLA. train.py --row "Table 2 #3" applies a row.


def _pr(p7: float, p8: float, p9: float, cIoU: float, gIoU: float) -> dict[str, float]:
    """The columns of Tables 2-4: Pr@0.7, Pr@0.8, Pr@0.9, cIoU, gIoU (gRefCOCO val)."""
    return {"Prec@0.7": p7, "Prec@0.8": p8, "Prec@0.9": p9, "cIoU": cIoU, "gIoU": gIoU}


_FULL = _pr(74.20, 68.33, 24.68, 62.42, 63.60)  # "ReLA (ours)"
TABLES: dict[str, dict[str, dict]] = {
    "Table 2": {  # Ablation study of RIA design options (gRefCOCO val)
        "#1 hard split, input": {
            "skip": "splits the input image into P×P patches before the encoder (one encoder "
            "pass per patch); this file only pools decoder features (#2)",
            "paper": _pr(63.02, 59.81, 19.26, 54.43, 55.34),
        },
        "#2 hard split, decoder": {
            "ablate": ("hard_split",),
            "paper": _pr(70.34, 65.23, 21.47, 60.08, 60.93),
            "note": "tiny: the stride-32 map is 2×2 < P×P, pooling repeats cells (warns)",
        },
        "#3 w/o minimap": {
            "ablate": ("no_minimap",),
            "paper": _pr(72.19, 66.02, 21.07, 61.30, 62.06),
        },
        "#4 ReLA": {"ablate": (), "paper": _FULL, "baseline": True},
    },
    "Table 3": {  # Ablation study of RLA design options (gRefCOCO val)
        "#1 baseline (F'_r times mean word feature)": {
            "ablate": ("no_region_att", "no_language_att"),
            "paper": _pr(69.94, 61.10, 19.38, 57.24, 58.53),
            "baseline": True,
        },
        "#2 + language att.": {
            "ablate": ("no_region_att",),
            "paper": _pr(72.03, 65.42, 21.04, 59.86, 60.53),
        },
        "#3 + region att.": {
            "ablate": ("no_language_att",),
            "paper": _pr(73.52, 67.01, 23.43, 61.00, 62.38),
            "note": "baseline + region self-attention (the text: +3.85 gIoU over #1)",
        },
        "#4 ReLA": {"ablate": (), "paper": _FULL},
    },
    "Table 4": {  # Ablation study of the number of regions (gRefCOCO val)
        "P=4 4×4 regions": {"set": {"P": 4}, "paper": _pr(68.48, 60.25, 20.33, 56.57, 57.01)},
        "P=8 8×8 regions": {"set": {"P": 8}, "paper": _pr(72.36, 66.85, 23.56, 59.74, 61.23)},
        "P=10 10×10 regions": {"set": {"P": 10}, "paper": _FULL, "baseline": True},
        "P=12 12×12 regions": {"set": {"P": 12}, "paper": _pr(74.14, 67.56, 23.90, 62.02, 63.50)},
    },
    "Table 5": {  # Comparison on gRefCOCO (val); only the two ReLA-decoder rows built here
        "LAVT+ReLA LAVT's encoder, ReLA decoder": {
            "ablate": (),
            "paper": {"cIoU": 61.23, "gIoU": 61.32},
            "note": "this is the release's architecture (its README reports 62.42 / 63.60 for it)",
        },
        "ReLA separate encoders (Fig. 4)": {
            "ablate": ("no_encoder_fusion",),
            "paper": {"cIoU": 62.42, "gIoU": 63.60},
            "baseline": True,
            "note": "the paper's description; the release fuses in the encoder (LAVT+ReLA row)",
        },
        "VLT+ReLA VLT's encoder, ReLA decoder": {
            "skip": "VLT's encoder is not in this repository",
            "paper": {"cIoU": 58.65, "gIoU": 59.43},
        },
    },
    "Table 6": {  # No-target results on gRefCOCO (val)
        "ReLA-50pix no-target head off, <50 px = no-target": {
            "set": {"no_target_pixels": 50.0},
            "paper": {"N-acc": 49.96, "T-acc": 96.28},
            "note": "50 px at 480×480; scaled with the area (<1 px at 64: an empty mask)",
        },
        "ReLA": {"ablate": (), "paper": {"N-acc": 56.37, "T-acc": 96.32}, "baseline": True},
        "MattNet": {"skip": "another method", "paper": {"N-acc": 41.15, "T-acc": 96.13}},
        "VLT": {"skip": "another method", "paper": {"N-acc": 47.17, "T-acc": 95.72}},
        "LAVT": {"skip": "another method", "paper": {"N-acc": 49.32, "T-acc": 96.18}},
    },
}

# The paper gives no recipe: the release's (configs/referring_swin_base.yaml -> referring_R50.yaml
# SOLVER, train_net.py build_optimizer, detectron2 defaults), branch main.
RECIPE = {
    "optimizer": "adamw",  # SOLVER.OPTIMIZER ADAMW
    "lr": 1e-5,  # SOLVER.BASE_LR
    "encoder_lr_factor": 1.0,  # BACKBONE_MULTIPLIER 0.1 is defined but build_optimizer ignores it
    "weight_decay": 0.05,  # SOLVER.WEIGHT_DECAY (0 for norms/embeddings/pos tables in the release)
    "schedule": "step",  # WarmupMultiStepLR (detectron2 default LR_SCHEDULER_NAME)
    "milestones": (110000, 140000),  # SOLVER.STEPS
    "gamma": 0.1,  # detectron2 default SOLVER.GAMMA
    "warmup": 0,  # WARMUP_ITERS 10 with WARMUP_FACTOR 1.0: no warm-up in effect
    "iterations": 150000,  # SOLVER.MAX_ITER
    "batch_size": 48,  # SOLVER.IMS_PER_BATCH (README: 8 GPUs)
    "grad_clip": 0.01,  # CLIP_GRADIENTS full_model, CLIP_VALUE 0.01, L2 norm
    # train_net.py adds only BERT encoder layers 0-9 to the optimizer (LAVT's pattern).
    "frozen": (
        "text_encoder.embeddings",
        "text_encoder.encoder.layer.10",
        "text_encoder.encoder.layer.11",
    ),
}


# ---------------------------------------------------------------------------------------------
# Helpers


def from_pretrained(model_cls, name: str, **kwargs):
    """`model_cls.from_pretrained(name)` for a Hub id or a folder, with one clear line on failure.

    A relative folder is read from the repository (the demo's `pretrained/tiny-*`), so runs and
    checkpoints work from any directory."""
    local = Path(__file__).resolve().parent / name
    if local.is_dir():
        name = str(local)
    try:
        return model_cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError):
        raise RuntimeError(
            f"could not load '{name}': not a folder here and the Hugging Face Hub is unreachable "
            "(no network?). Use --preset tiny, pass a local folder, or --no-pretrained for random "
            "weights."
        ) from None


def sine_position_encoding(h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """DETR's normalised 2-D sine encoding: (h*w, dim), first half y, second half x."""
    y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    quarter = dim // 4
    freq = 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    pos_y = y[:, None] / freq  # (h, dim/4)
    pos_x = x[:, None] / freq  # (w, dim/4)
    pos_y = torch.cat([pos_y.sin(), pos_y.cos()], -1)[:, None].expand(h, w, 2 * quarter)
    pos_x = torch.cat([pos_x.sin(), pos_x.cos()], -1)[None].expand(h, w, 2 * quarter)
    pos = torch.cat([pos_y, pos_x], -1).reshape(h * w, 4 * quarter)  # (h*w, dim')
    return F.pad(pos, (0, dim - 4 * quarter))  # (h*w, dim) if dim is not a multiple of 4


def minimap_target(masks: torch.Tensor, P: int, rule: str = "release") -> torch.Tensor:
    """The minimap GT: (B, H, W) {0,1} -> (B, P*P) long, row-major (query n <-> cell n).

    "any": cell n is 1 when it holds any target pixel, the paper's "x_r^n indicates its
    probability of containing targets" (adaptive max pooling, cells may overlap by a pixel).
    "release": bilinear resize to P×P (align_corners=False, no antialias) then `.long()`:
    truncation, so a cell is 1 only where the interpolated value is exactly 1, in effect a sample
    at the cell centre. At 64 px (6.4 px cells) that marks 3.8% of the cells of targeted gshapes
    samples against 12.4% holding target pixels, and misses 2% of the targets entirely.
    """
    if rule == "any":
        return (F.adaptive_max_pool2d(masks[:, None].float(), P) > 0.5).long().flatten(1)
    small = F.interpolate(masks[:, None].float(), size=(P, P), mode="bilinear", align_corners=False)
    return small.long().flatten(1)  # (B, 1, P, P) -> (B, P*P)


def attention(q, k, v, heads: int, key_mask=None, bias=None):
    """Scaled dot-product attention split into heads; softmax over the KEY axis.

    q (B, N, C), k and v (B, M, C), key_mask (B, M) with 1 = attend, bias (N, M) added to every
    head's scores. Returns (B, N, C) and the attention weights (B, heads, N, M).
    """
    B, N, C = q.shape
    d = C // heads
    q = q.reshape(B, N, heads, d).transpose(1, 2)  # (B, heads, N, d)
    k = k.reshape(B, -1, heads, d).transpose(1, 2)  # (B, heads, M, d)
    v = v.reshape(B, -1, heads, d).transpose(1, 2)  # (B, heads, M, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, heads, N, M)
    if bias is not None:
        scores = scores + bias  # (N, M) broadcast over B and heads
    if key_mask is not None:
        scores = scores.masked_fill(key_mask[:, None, None, :] == 0, float("-inf"))
    A = scores.softmax(-1)  # normalised over keys (pixels for RIA, words for RLA)
    out = (A @ v).transpose(1, 2).reshape(B, N, C)  # (B, heads, N, d) -> (B, N, C)
    return out, A


# ---------------------------------------------------------------------------------------------
# ReLAtionship modelling (§4.2): RIA (Eq. 2), RLA (Eq. 3), one decoder layer


class RIA(nn.Module):
    """Region-Image cross Attention (Fig. 5a): each region query collects its own image area.

    Eq. (2): A_ri = softmax(Q_r σ(F_i W_ik)^T) over the H*W pixels; the gathered features are
    A_ri σ(F_i W_iv). As released (Mask2Former), layer l > 0 queries with the previous layer's F_r
    and adds the gathered features to it: F'_r = LN(F_r + A_ri σ(F_i W_iv)).
    Where region n looks is a separate positional term added to the scores (Eq. 2 has no
    positions): pos_scale · q_pos^n · pos_p / sqrt(C), q_pos^n learnable, pos_p the pixel's sine
    encoding. q_pos starts at the sine encoding of cell n's centre, so region n starts looking at
    cell n, the patch the minimap ties it to (as Anchor-DETR starts its queries on a grid).
    With hard_split (Table 2 #2) A_ri is replaced by a fixed P×P average pooling of σ(F_i W_iv).
    """

    def __init__(self, C: int, heads: int, pos_scale: float = 8.0):
        super().__init__()
        self.W_ik = nn.Linear(C, C)
        self.W_iv = nn.Linear(C, C)
        self.norm = nn.LayerNorm(C)
        self.heads = heads
        self.pos_scale = pos_scale

    def forward(self, F_r, query_pos, F_i, pos, hw: tuple[int, int], hard_split: bool = False):
        """F_r (B, N, C) (Q_r in layer 0), query_pos (N, C), F_i (B, H*W, C), pos (H*W, C).

        Returns F'_r (B, N, C) and A_ri (B, heads, N, H*W) (None with hard_split)."""
        V = F.gelu(self.W_iv(F_i))  # σ(F_i W_iv): (B, H*W, C)
        if hard_split:
            B, _, C = V.shape
            P = math.isqrt(F_r.shape[1])
            grid = V.transpose(1, 2).reshape(B, C, *hw)  # (B, C, H, W)
            gathered = F.adaptive_avg_pool2d(grid, P).flatten(2).transpose(1, 2)  # (B, P*P, C)
            A_ri = None
        else:
            K = F.gelu(self.W_ik(F_i))  # σ(F_i W_ik): (B, H*W, C)
            where = self.pos_scale * query_pos @ pos.T / math.sqrt(pos.shape[-1])  # (N, H*W)
            # Eq. (2): A_ri (B, heads, N, H*W), softmax over pixels; gathered = A_ri V (B, N, C)
            gathered, A_ri = attention(F_r, K, V, self.heads, bias=where)
        return self.norm(F_r + gathered), A_ri  # F'_r (B, N, C)


class RLA(nn.Module):
    """Region-Language cross Attention (Fig. 5b): region-region and region-word interaction.

    F_r1 = self-attention over regions; Eq. (3): A_l = softmax(σ(F'_r W_lq) σ(F_t W_lk)^T) over
    words, F_r2 = A_l F_t; F_r = MLP(F'_r + F_r1 + F_r2) (here with residual + LayerNorm).
    """

    def __init__(self, C: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(C, heads, batch_first=True)
        self.W_lq = nn.Linear(C, C)
        self.W_lk = nn.Linear(C, C)
        self.heads = heads
        self.mlp = nn.Sequential(nn.Linear(C, ffn), nn.ReLU(), nn.Linear(ffn, C))
        self.norm = nn.LayerNorm(C)

    def forward(self, F_r_prime, query_pos, F_t, word_mask, region_att=True, language_att=True):
        """F_r_prime (B, N, C), query_pos (N, C), F_t (B, L, C), word_mask (B, L) -> F_r."""
        S = F_r_prime
        if region_att:
            q = F_r_prime + query_pos  # (B, N, C)
            F_r1 = self.self_attn(q, q, F_r_prime, need_weights=False)[0]  # (B, N, C)
            S = S + F_r1
        if language_att:
            q, k = F.gelu(self.W_lq(F_r_prime)), F.gelu(self.W_lk(F_t))  # (B, N, C), (B, L, C)
            F_r2, _ = attention(q, k, F_t, self.heads, word_mask)  # Eq. (3): F_r2 = A_l F_t
        else:
            # Table 3 baseline fusion: region features times the mean (unpadded) word feature.
            m = word_mask[..., None].to(F_t.dtype)  # (B, L, 1)
            F_r2 = F_r_prime * ((F_t * m).sum(1, keepdim=True) / m.sum(1, keepdim=True))
        S = S + F_r2
        return self.norm(S + self.mlp(S))  # F_r = MLP(F'_r + F_r1 + F_r2)


class ReLALayer(nn.Module):
    """One decoder layer: F'_r = RIA(F_r, F_i); F_r <- RLA(F'_r, F_t)."""

    def __init__(self, C: int, heads: int, ffn: int, pos_scale: float = 8.0):
        super().__init__()
        self.ria = RIA(C, heads, pos_scale)
        self.rla = RLA(C, heads, ffn)

    def forward(self, F_r, query_pos, F_i, pos, hw, F_t, word_mask, ablate=()):
        """F_r (B, N, C) from the previous layer -> (F'_r, F_r), both (B, N, C)."""
        F_r_prime, _ = self.ria(F_r, query_pos, F_i, pos, hw, hard_split="hard_split" in ablate)
        F_r = self.rla(
            F_r_prime,
            query_pos,
            F_t,
            word_mask,
            region_att="no_region_att" not in ablate,
            language_att="no_language_att" not in ablate,
        )
        return F_r_prime, F_r


# ---------------------------------------------------------------------------------------------
# Outputs (§4.1, Fig. 4): region masks M_r, minimap x_r, Eq. (1), no-target score E


def fuse_region_masks(weights: torch.Tensor, M_r: torch.Tensor) -> torch.Tensor:
    """Eq. (1): M = Σ_n x_r^n M_r^n. weights (B, N), M_r (B, N, h, w) -> M (B, 1, h, w)."""
    return torch.einsum("bn,bnhw->bhw", weights, M_r)[:, None]  # Eq. (1)


class RegionHeads(nn.Module):
    """The released heads: 3-layer filter MLP, Linear minimap, 2-layer no-target MLP.

    Initialisation (ours, see the docstring): every region mask starts small (last filter layer
    std 0.01) and M starts at the prior bias, so the mask CE starts near its calibrated value;
    the minimap head starts at the same prior, so x_r ~ 4% and its CE starts calibrated too.
    """

    def __init__(self, C: int, fusion_weight: str, prior: float):
        super().__init__()
        self.fusion_weight = fusion_weight
        self.region_filter = nn.Sequential(
            nn.Linear(C, C), nn.ReLU(), nn.Linear(C, C), nn.ReLU(), nn.Linear(C, C)
        )
        self.minimap_head = nn.Linear(C, 2)  # (bg, fg) logits per region
        self.no_target_head = nn.Sequential(nn.Linear(C, C), nn.ReLU(), nn.Linear(C, 2))
        prior_logit = math.log(prior / (1 - prior))
        self.mask_bias = nn.Parameter(torch.tensor(prior_logit))  # b in M = Σ x_r M_r + b
        nn.init.normal_(self.region_filter[-1].weight, std=0.01)
        nn.init.zeros_(self.region_filter[-1].bias)
        with torch.no_grad():
            self.minimap_head.bias.copy_(torch.tensor([0.0, prior_logit]))

    def forward(self, F_r_prime, F_r, F_m):
        """F_r_prime, F_r (B, N, C), F_m (B, C, h, w) -> M_r (B, N, h, w), minimap logits
        (B, N, 2), x_r (B, N), M (B, 1, h, w), no-target logits (B, 2)."""
        F_f = self.region_filter(F_r_prime)  # region filters from RIA's F'_r (§4.2): (B, N, C)
        M_r = torch.einsum("bnc,bchw->bnhw", F_f, F_m)  # region masks (B, N, h, w)
        minimap_logits = self.minimap_head(F_r)  # (B, N, 2)
        x_r = minimap_logits.softmax(-1)[..., 1]  # P(region n contains a target): (B, N)
        if self.fusion_weight == "prob":
            weights = x_r
        else:  # released main: channel a = Σ_n logit_a^n M_r^n, so fg - bg is this weighting
            weights = minimap_logits[..., 1] - minimap_logits[..., 0]
        M = fuse_region_masks(weights, M_r) + self.mask_bias  # Eq. (1) + prior bias
        nt_logits = self.no_target_head(F_r.mean(1))  # E from the mean region feature: (B, 2)
        return M_r, minimap_logits, x_r, M, nt_logits


# =============================================================================================
# Plumbing the paper builds on (not ReLA's contribution): the released code's language-aware
# Swin (LAVT's PWAM + gate) and a Mask2Former-style pixel decoder.


class PWAM(nn.Module):
    """LAVT pixel-word attention: every pixel gathers words, the result multiplies the pixel.

    Single head, 1×1 Conv1d projections, InstanceNorm1d on the pixel queries and on the output,
    scores scaled by dim**-0.5, padded words pushed to -1e4 (LAVT lib/backbone.py).
    """

    def __init__(self, dim: int, text_dim: int, dropout: float = 0.0):
        super().__init__()
        self.vis_project = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.GELU(), nn.Dropout(dropout))
        self.query = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.InstanceNorm1d(dim))
        self.key = nn.Conv1d(text_dim, dim, 1)
        self.value = nn.Conv1d(text_dim, dim, 1)
        self.out = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.InstanceNorm1d(dim))
        self.project_mm = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.GELU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor):
        """x (B, H*W, C), words (B, L, D), word_mask (B, L) -> fused pixels (B, H*W, C)."""
        x = x.transpose(1, 2)  # (B, C, H*W)
        words = words.transpose(1, 2)  # (B, D, L)
        m = word_mask[:, None, :].to(x.dtype)  # (B, 1, L)
        q = self.query(x).transpose(1, 2)  # (B, H*W, C)
        k = self.key(words) * m  # (B, C, L)
        v = (self.value(words) * m).transpose(1, 2)  # (B, L, C)
        scores = q @ k * q.shape[-1] ** -0.5 + (1e4 * m - 1e4)  # (B, H*W, L), padding -> -1e4
        lang = self.out((scores.softmax(-1) @ v).transpose(1, 2))  # (B, C, H*W)
        return self.project_mm(self.vis_project(x) * lang).transpose(1, 2)  # (B, H*W, C)


class LanguageAwareSwin(nn.Module):
    """Swin stages with PWAM + tanh gate after each stage's blocks, before patch merging.

    We iterate the stages of transformers' SwinBackbone (5.23: swin.embeddings, then per stage
    encoder.layers[i].blocks and .downsample; tests/test_rela.py checks this against
    SwinBackbone's own forward). Stage i hands the decoder LayerNorm(fused), the PWAM output, and
    the next stage gets x + gate(fused) * fused.
    """

    def __init__(self, backbone: SwinBackbone, text_dim: int, dropout=0.0, gate_init="learnable"):
        super().__init__()
        self.backbone = backbone
        dims = backbone.channels  # [C1, C2, C3, C4] = embed_dim * (1, 2, 4, 8)
        self.pwams = nn.ModuleList(PWAM(d, text_dim, dropout) for d in dims)
        # ReLA gates stages 1-3 only: stage 4's PWAM output goes to the decoder, no next stage.
        self.gates = nn.ModuleList(
            nn.Sequential(
                nn.Linear(d, d, bias=False),
                nn.ReLU(),
                nn.Linear(d, d, bias=False),
                nn.Tanh(),
            )
            for d in dims[:-1]
        )
        for gate in self.gates:
            # Both closed at the start. "release": both Linears zero, so ReLU(0) and the zero
            # second Linear block each other's gradient: the gates never open (the release).
            nn.init.zeros_(gate[2].weight)
            if gate_init == "release":
                nn.init.zeros_(gate[0].weight)
        # SwinModel's final LayerNorm only normalises last_hidden_state, which we never read.
        backbone.swin.layernorm.requires_grad_(False)

    def forward(self, images, words, word_mask, fuse: bool = True) -> list[torch.Tensor]:
        """images (B, 3, H, W) -> 4 maps (B, C_i, H/2^(i+2), W/2^(i+2)), strides 4..32."""
        swin = self.backbone.swin
        x, (h, w) = swin.embeddings(images)  # (B, H/4*W/4, C1)
        feats = []
        for i, stage in enumerate(swin.encoder.layers):
            for block in stage.blocks:
                x = block(x, (h, w), always_partition=True)[0]  # (B, h*w, C_i)
            fused = x
            if fuse:
                fused = self.pwams[i](x, words, word_mask)  # (B, h*w, C_i)
                if i < len(self.gates):
                    x = x + self.gates[i](fused) * fused  # language gate (LAVT "LG")
            fused = self.backbone.hidden_states_norms[SWIN_STAGES[i]](fused)
            B, _, C = fused.shape
            feats.append(fused.transpose(1, 2).reshape(B, C, h, w))  # (B, h*w, C) -> (B, C, h, w)
            if stage.downsample is not None:
                x = stage.downsample(x, (h, w))  # patch merging: (B, h*w/4, 2C)
                h, w = (h + 1) // 2, (w + 1) // 2
        return feats


def _conv_gn(c_in: int, c_out: int, k: int, groups: int, relu: bool) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.GroupNorm(groups, c_out)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class PixelDecoder(nn.Module):
    """Transformer encoder on the stride-32 map, then a top-down FPN to strides 16, 8, 4.

    Returns F_m = 1×1 conv of the stride-4 map and the levels [s32, s16, s8] for RIA (Mask2Former's
    round-robin order). No language input here, as in the released code.
    """

    def __init__(self, in_channels: list[int], C: int, layers: int, heads: int, ffn: int, gn: int):
        super().__init__()
        self.input_proj = _conv_gn(in_channels[3], C, 1, gn, relu=False)
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(C, heads, ffn, dropout=0.0, batch_first=True)
            for _ in range(layers)
        )
        # Laterals and outputs for strides 16, 8, 4 (top-down order).
        self.lateral = nn.ModuleList(_conv_gn(c, C, 1, gn, relu=False) for c in in_channels[2::-1])
        self.output = nn.ModuleList(_conv_gn(C, C, 3, gn, relu=True) for _ in range(3))
        self.mask_proj = nn.Conv2d(C, C, 1)

    def forward(self, feats: list[torch.Tensor]):
        y = self.input_proj(feats[3])  # (B, C, H/32, W/32)
        B, C, h, w = y.shape
        pos = sine_position_encoding(h, w, C, y.device).to(y.dtype)  # (h*w, C)
        tokens = y.flatten(2).transpose(1, 2) + pos  # (B, h*w, C), position added once at input
        for layer in self.encoder:
            tokens = layer(tokens)
        y = tokens.transpose(1, 2).reshape(B, C, h, w)  # (B, C, H/32, W/32)
        levels = [y]
        for lateral, output, f in zip(self.lateral, self.output, feats[2::-1], strict=True):
            up = F.interpolate(y, size=f.shape[-2:], mode="bilinear", align_corners=False)
            y = lateral(f) + up  # FPN top-down
            y = output(y)  # (B, C, H/s, W/s) for s = 16, 8, 4
            levels.append(y)
        return self.mask_proj(levels[3]), levels[:3]  # F_m (B, C, H/4, W/4), [s32, s16, s8]


# =============================================================================================
# The model


class ReLA(nn.Module):
    """Fig. 4: Swin + BERT -> pixel decoder -> ReLAtionship modelling -> Eq. (1), E."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        if cfg.pretrained:
            backbone = from_pretrained(
                SwinBackbone,
                cfg.vision_name,
                out_features=SWIN_STAGES,
                drop_path_rate=cfg.vision_config.get("drop_path_rate", 0.0),
            )
            self.text_encoder = from_pretrained(BertModel, cfg.text_name, add_pooling_layer=False)
        else:
            backbone = SwinBackbone(SwinConfig(**cfg.vision_config, out_features=SWIN_STAGES))
            text_config = BertConfig(**{**cfg.text_config, "vocab_size": cfg.vocab_size})
            self.text_encoder = BertModel(text_config, add_pooling_layer=False)
        text_dim = self.text_encoder.config.hidden_size
        C, N = cfg.hidden_dim, cfg.P**2
        self.vision = LanguageAwareSwin(backbone, text_dim, cfg.pwam_dropout, cfg.gate_init)
        self.pixel_decoder = PixelDecoder(
            backbone.channels, C, cfg.encoder_layers, cfg.num_heads, cfg.encoder_ffn, cfg.gn_groups
        )
        self.text_proj = nn.Linear(text_dim, C)  # F_t in the decoder's width C
        # Q_r as released (nn.Embedding, N(0, 1)): N distinct queries from the start.
        # (0.02·randn behind a LayerNorm made all regions start and stay identical.)
        self.query_feat = nn.Embedding(N, C)  # Q_r, region-based queries
        # The position of region n, learnable; it starts at cell n's centre (row-major, as the
        # minimap), in the same sine encoding as the pixels (released: N(0, 1), no grid).
        self.query_pos = nn.Embedding(N, C)
        with torch.no_grad():
            self.query_pos.weight.copy_(sine_position_encoding(cfg.P, cfg.P, C))
        self.layers = nn.ModuleList(
            ReLALayer(C, cfg.num_heads, cfg.dec_ffn, cfg.pos_scale) for _ in range(cfg.dec_layers)
        )
        self.heads = RegionHeads(C, cfg.fusion_weight, cfg.prior)

    def forward(self, images, input_ids, attention_mask, targets=None) -> dict:
        cfg, ablate = self.cfg, self.cfg.ablate
        words = self.text_encoder(input_ids, attention_mask=attention_mask).last_hidden_state
        feats = self.vision(images, words, attention_mask, fuse="no_encoder_fusion" not in ablate)
        F_m, levels = self.pixel_decoder(feats)  # (B, C, H/4, W/4), [s32, s16, s8]
        F_t = self.text_proj(words)  # (B, L, C)

        B = images.shape[0]
        F_r = self.query_feat.weight.expand(B, -1, -1)  # Q_r: (B, N, C)
        query_pos = self.query_pos.weight  # (N, C)
        for i, layer in enumerate(self.layers):
            level = levels[i % len(levels)]  # round-robin over strides 32, 16, 8
            h, w = level.shape[-2:]
            F_i = level.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)
            pos = sine_position_encoding(h, w, F_i.shape[-1], F_i.device).to(F_i.dtype)
            F_r_prime, F_r = layer(F_r, query_pos, F_i, pos, (h, w), F_t, attention_mask, ablate)

        M_r, minimap_logits, x_r, M, nt_logits = self.heads(F_r_prime, F_r, F_m)
        if cfg.no_target_pixels > 0:
            # Table 6 "ReLA-50pix": the head is off; fewer positive pixels than the threshold
            # (at the input size, as train.py thresholds) means no target.
            H, W = images.shape[-2:]
            up = F.interpolate(M.detach().float(), size=(H, W), mode="bilinear")
            count = (up.sigmoid() > cfg.threshold).flatten(1).sum(1)  # (B,)
            min_pixels = cfg.no_target_pixels * H * W / 480**2  # 50 px at the paper's 480×480
            no_target_logits = min_pixels - count.to(M.dtype)  # (B,), > 0 means "no target"
        else:
            no_target_logits = nt_logits[:, 1] - nt_logits[:, 0]  # (B,), > 0 means "no target"

        mask_logits = M
        if not self.training:  # §4.1: a predicted no-target empties the output mask
            # -1e4: sigmoid is exactly 0 and the value fits in bf16/fp16.
            mask_logits = M.masked_fill((no_target_logits > 0)[:, None, None, None], -1e4)
        out = {
            "mask_logits": mask_logits,
            "mask_logits_raw": M,
            "no_target_logits": no_target_logits,
            "minimap": x_r.reshape(B, cfg.P, cfg.P),  # (B, P, P) probabilities
            "M_r": M_r,  # (B, N, H/4, W/4): region masks, for the panels
            "F_r_prime": F_r_prime,  # (B, N, C): for diagnostics
            "F_r": F_r,  # (B, N, C)
        }
        if targets is not None:
            out["loss"], out["losses"] = self.loss(M, minimap_logits, nt_logits, targets)
        return out

    def loss(self, M, minimap_logits, nt_logits, targets):
        """Released criterion: 5 (CE(M) + 0.1 CE(minimap) + 0.1 CE(no-target)), weights .9/1.1."""
        cfg = self.cfg
        gt = targets["masks"]  # (B, H, W)
        M = upsample_to(M, gt)  # (B, 1, H, W): the release upsamples to the GT
        two_class = torch.cat([torch.zeros_like(M), M], 1)  # (B, 2, H, W): CE = weighted BCE on M
        loss_mask = weighted_ce_loss(two_class, gt, cfg.class_weight)
        loss_minimap = weighted_ce_loss(
            minimap_logits.transpose(1, 2),
            minimap_target(gt, cfg.P, cfg.minimap_rule),
            cfg.class_weight,
        )  # (B, 2, N) vs (B, N)
        loss_nt = weighted_ce_loss(nt_logits, targets["no_target"].long(), cfg.class_weight)
        use_minimap = 0.0 if "no_minimap" in cfg.ablate else cfg.minimap_weight
        total = cfg.loss_scale * (
            loss_mask + use_minimap * loss_minimap + cfg.no_target_weight * loss_nt
        )
        losses = {"mask": loss_mask, "minimap": loss_minimap, "no_target": loss_nt}
        return total, {k: v.detach() for k, v in losses.items()}


def build_model(cfg: Config) -> nn.Module:
    for name in cfg.ablate:
        if name not in ABLATIONS:
            raise ValueError(
                f"unknown ablation '{name}' for rela; choose from {', '.join(ABLATIONS)}"
            )
    if cfg.fusion_weight not in ("prob", "logit"):
        raise ValueError(f"fusion_weight must be 'prob' or 'logit', got '{cfg.fusion_weight}'")
    if cfg.minimap_rule not in ("any", "release"):
        raise ValueError(f"minimap_rule must be 'any' or 'release', got '{cfg.minimap_rule}'")
    if cfg.gate_init not in ("learnable", "release"):
        raise ValueError(f"gate_init must be 'learnable' or 'release', got '{cfg.gate_init}'")
    side = cfg.image_size // 32  # the coarsest map RIA reads
    if "hard_split" in cfg.ablate and side < cfg.P:
        warnings.warn(
            f"hard_split: the stride-32 map is {side}×{side}, smaller than P×P = {cfg.P}×{cfg.P}; "
            "average pooling repeats its cells, so several regions see the same features",
            stacklevel=2,
        )
    return ReLA(cfg)


# ---------------------------------------------------------------------------------------------
# The mechanism, measured (train.py: diag/<name>) and drawn (samples.png)


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC (Mann-Whitney U with tied ranks averaged); NaN without both classes."""
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # rank of the last copy of each distinct value (1-based)
    ranks = (last - (counts.double() - 1) / 2)[inverse]  # average rank of tied scores
    return ((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def _mean_pairwise_cosine(feats: torch.Tensor) -> float:
    """feats (B, N, C) -> mean cosine over the N(N-1) pairs of distinct regions, over B."""
    f = F.normalize(feats.float(), dim=-1)
    G = f @ f.transpose(1, 2)  # (B, N, N)
    N = G.shape[-1]
    return ((G.sum((1, 2)) - G.diagonal(dim1=1, dim2=2).sum(-1)) / (N * (N - 1))).mean().item()


def diagnostics(outputs: dict, batch: dict) -> dict[str, float]:
    """Does the minimap find the targets, and are the regions distinct?

    minimap_auc: AUC of x_r against the P×P cells that hold any target pixel, over the cells of
    the batch's targeted samples (1 = every target cell ranks above every other cell, 0.5 = no
    better than chance); minimap_auc_release: the same against the release's cell-centre minimap.
    x_r_target / x_r_other: mean x_r on the cells holding target pixels / elsewhere.
    region_cos / region_cos_prime: mean pairwise cosine of the N region features F_r / F'_r
    (1 = all regions identical).
    """
    x_r = outputs["minimap"].float()  # (B, P, P)
    B, P, _ = x_r.shape
    masks = batch["mask"].to(x_r.device).float()  # (B, H, W)
    cells = minimap_target(masks, P, "any").view(B, P, P) > 0  # (B, P, P): any target pixel
    targeted = cells.flatten(1).any(1)  # (B,)
    scores, labels = x_r[targeted].flatten(), cells[targeted].flatten()
    nan = float("nan")
    return {
        "minimap_auc": _auc(scores, labels),
        "minimap_auc_release": _auc(
            scores, minimap_target(masks, P, "release")[targeted].flatten() > 0
        ),
        "x_r_target": scores[labels].mean().item() if labels.any() else nan,
        "x_r_other": scores[~labels].mean().item() if (~labels).any() else nan,
        "region_cos": _mean_pairwise_cosine(outputs["F_r"]),
        "region_cos_prime": _mean_pairwise_cosine(outputs["F_r_prime"]),
    }


def sample_extra(outputs: dict, i: int, tokenizer) -> list[tuple]:
    """Fig. 7: the predicted minimap x_r (fixed 0-1 scale) and the region masks M_r of the three
    most confident regions (sigmoid, 0-1, side by side, region (row, col) in the caption)."""
    x_r = outputs["minimap"][i].detach().float().cpu()  # (P, P)
    P = x_r.shape[0]
    p_nt = torch.sigmoid(outputs["no_target_logits"][i].detach().float()).item()
    panels = [
        (x_r.numpy(), f"minimap x_r (max {float(x_r.max()):.2f}), no-target p={p_nt:.2f}", (0, 1))
    ]
    top = x_r.flatten().topk(3).indices.tolist()
    M_r = outputs["M_r"][i, top].detach().float().sigmoid().cpu()  # (3, h, w)
    gap = torch.full((M_r.shape[1], 1), float("nan"))  # a blank column between the masks
    montage = torch.cat([M_r[0], gap, M_r[1], gap, M_r[2]], 1).numpy()  # (h, 3w + 2)
    where = " ".join(f"({n // P},{n % P})" for n in top)
    panels.append((montage, f"sigmoid(M_r) of top x_r: {where}", (0, 1)))
    return panels


if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = Config(**{**Config.tiny().__dict__, "pretrained": False})  # no folders needed
    model = build_model(cfg)
    B, L = 2, cfg.max_tokens
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size)
    input_ids = torch.randint(5, cfg.vocab_size, (B, L))
    input_ids[:, 0], input_ids[:, 5], input_ids[:, 6:] = 2, 3, 0  # [CLS] w1..w4 [SEP] [PAD]...
    attention_mask = (input_ids != 0).long()
    targets = {
        "masks": (torch.rand(B, cfg.image_size, cfg.image_size) > 0.5).float(),
        "no_target": torch.tensor([False, True]),
    }
    out = model(images, input_ids, attention_mask, targets)
    for key, value in out.items():
        print(key, tuple(value.shape) if torch.is_tensor(value) else value)
    out["loss"].backward()
    print("params:", sum(p.numel() for p in model.parameters()))
