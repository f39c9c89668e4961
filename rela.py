"""ReLA: region-based relationship modelling for Generalized Referring Expression Segmentation.

Paper: "GRES: Generalized Referring Expression Segmentation", Chang Liu, Henghui Ding, Xudong Jiang,
CVPR 2023. https://arxiv.org/abs/2306.00968. Release: https://github.com/henghuiding/ReLA (branches
main and original), built on LAVT (https://github.com/yz93/LAVT-RIS). Lab notes: docs/rela.md.

Idea. GRES lets an expression refer to any number of objects, including none. ReLA splits the image
into P×P "regions" that are not a fixed grid: P² learnable region queries collect their own image
features by cross-attention (RIA, Eq. 2), then talk to each other and to the words (RLA, Eq. 3).
Region n predicts a mask M_r^n (its region filter times the mask features F_m) and the probability
x_r^n that it contains a target; the output mask is the x_r-weighted sum of the region masks
(Eq. 1). A "minimap", the ground truth downsampled to P×P, supervises x_r, which ties query n to
image patch n. The mean region feature predicts a no-target label E; a positive E empties the mask.

Symbols (paper -> code), B batch, L words, C channels, H, W map size, N = P² regions:
    F_i   image features of one pixel-decoder level      F_i               (B, H*W, C)
    F_t   language features (BERT, projected to C)       F_t               (B, L, C)
    F_m   mask features (stride 4)                       F_m               (B, C, H/4, W/4)
    Q_r   region-based queries                           query_feat        (N, C) nn.Embedding
    A_ri  region-image attention (Eq. 2)                 A_ri              (B, heads, N, H*W)
    F'_r  region image features (RIA output)             F_r_prime         (B, N, C)
    F_r1  region self-attention output                   F_r1              (B, N, C)
    A_l   region-word attention (Eq. 3)                  A_l               (B, heads, N, L)
    F_r2  language-aware region features                 F_r2              (B, N, C)
    F_r   region features MLP(F'_r + F_r1 + F_r2)        F_r               (B, N, C)
    F_f   region filters                                 F_f               (B, N, C)
    M_r   region masks                                   M_r               (B, N, H/4, W/4)
    x_r   minimap, P×P region probabilities              x_r               (B, N)
    M     output mask, Eq. (1)                           M                 (B, 1, H/4, W/4)
    E     no-target score                                no_target_logits  (B,)
    P     regions per side (Table 4: 4, 8, 10, 12)       cfg.P

Recipe. The paper gives none; RECIPE (end of file) is the release's: AdamW 1e-5, weight decay 0.05,
batch 48, 150k iterations, lr x0.1 at 110k and 140k, gradient-norm clip 0.01, BERT embeddings and
layers 10-11 frozen. The 64 px demo uses train.py's shared demo recipe.

Differences. paper() is the paper, the release where the paper is silent; tiny() is the demo.
The paper is silent, we take the release's choice:
- Attention: 8 heads, 1/sqrt(d), residual + post-LayerNorm in RIA and RLA. paper() and tiny()
- Region queries Q_r: an N(0, 1) nn.Embedding. paper() and tiny() (docs/rela.md#query_feat)
- RIA positions: N(0, 1) query positions + sine keys in Eq. 2. paper() (docs/rela.md#pos_scale)
- Minimap target: bilinear + truncation (cell centres). paper() (docs/rela.md#minimap_rule)
- Language gates: both Linears start at zero, so never open. paper() (docs/rela.md#gate_init)
- Eq. (1) without a bias; PyTorch default init of the heads. paper() (docs/rela.md#prior)
- Decoder: 9 layers (DEC_LAYERS 10 - 1), strides 32, 16, 8 in turn. paper(); tiny(): 3 layers
- Loss: 5 (CE_mask + 0.1 CE_minimap + 0.1 CE_nt), class weights [0.9, 1.1]. paper() and tiny()
The release differs:
- Encoder: we follow the release, LAVT's PWAM in Swin. paper() and tiny() (docs/rela.md#encoder)
- RIA: Eq. 2 unmasked (release: Mask2Former masked attention). paper() and tiny()
- RLA in every layer (main: words in layer 0 only; original: after the last). paper() and tiny()
- Region filters from F'_r, as §4.2 (main: from the post-RLA feature). paper() and tiny()
- Eq. (1) weights x_r (release: logits fg - bg). paper() and tiny() (docs/rela.md#fusion_weight)
- No-target E from the mean F_r (release: mean of per-region outputs). paper() and tiny()
We deviate on purpose:
- Region-language attention ignores [PAD] words (the release attends them). paper() and tiny()
- Pixel decoder: plain transformer layers + FPN (release: MSDeformAttn). paper() and tiny()
- A predicted no-target sets mask_logits to -1e4 (mask_logits_raw keeps M). paper() and tiny()
- ReLA-50pix (Table 6): 50 px at 480×480, scaled with the image area. paper() and tiny()
- Table 2 #1 (split the input image) is not built; hard_split is #2. paper() and tiny()
- Eq. (1) + a learnable bias b started at logit(4%). tiny() only (docs/rela.md#prior)
- The last region-filter layer starts small. tiny() only (docs/rela.md#filter_init_std)
- The minimap head starts at x_r = 4%. tiny() only (docs/rela.md#minimap_prior)
- RIA: a grid-started positional term, region n on cell n. tiny() only (docs/rela.md#pos_scale)
- Minimap target: every cell with a target pixel. tiny() only (docs/rela.md#minimap_rule)
- Language gates that can open (second Linear zero). tiny() only (docs/rela.md#gate_init)
- All BERT layers train (RECIPE["frozen"] has the release's). tiny() only (train.py's recipe)
- Tiny encoders, C = 64; P = 10 on a 2×2 stride-32 map (hard_split warns). tiny() only
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
    "no_minimap": "no minimap supervision: region queries become plain learnable queries "
    "(no grid-started positions either)",
    "no_region_att": "RLA without region self-attention F_r1",
    "no_language_att": "RLA without region-language attention; F_r2 = F'_r * mean word feature",
    "no_encoder_fusion": "Fig. 4 as drawn: plain Swin and BERT, no LAVT pixel-word attention in "
    "the Swin stages (no paper number, see docs/rela.md#encoder)",
}
# Non-boolean switches are Config fields: P (Table 4), no_target_pixels (Table 6 ReLA-50pix).

SWIN_STAGES = ["stage1", "stage2", "stage3", "stage4"]


def _swin_b() -> dict:
    # Swin-B, window 12, 384 pretraining (configs/referring_swin_base.yaml); drop path 0.3 as LAVT.
    return dict(image_size=384, patch_size=4, embed_dim=128, depths=[2, 2, 18, 2],
                num_heads=[4, 8, 16, 32], window_size=12, drop_path_rate=0.3)  # fmt: skip


def _bert_base() -> dict:
    # bert-base-uncased (the released code's text encoder; its pooler is not used).
    return dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, max_position_embeddings=512)  # fmt: skip


def _tiny_swin() -> dict:
    # pretrained/tiny-swin (pretrain.py): 32-256 channels, a 2×2 stride-32 map at 64 px.
    return dict(image_size=64, patch_size=4, embed_dim=32, depths=[2, 2, 2, 2],
                num_heads=[1, 2, 4, 8], window_size=4, mlp_ratio=4.0,
                drop_path_rate=0.0)  # fmt: skip


def _tiny_bert() -> dict:
    # pretrained/tiny-bert (pretrain.py).
    return dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                max_position_embeddings=32)  # fmt: skip


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
    # "release": both gate Linears zero, so each blocks the other's gradient: closed for good.
    # "learnable" (tiny): only the second one zero, closed at the start, they open if useful.
    gate_init: str = "release"
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
    # Where region n looks in RIA. 0: the release (Mask2Former): learnable N(0, 1) query positions
    # added to the queries, sine positions added to the keys' input. > 0 (tiny: 8): a separate
    # term pos_scale · q_pos·pos / sqrt(C) on the scores, q_pos started at cell n's sine position.
    pos_scale: float = 0.0
    # Eq. (1) weights: "prob" = x_r (paper); "logit" = fg - bg minimap logits (released main).
    fusion_weight: str = "prob"
    # --- initialisation (0 = the release's PyTorch defaults; tiny: the demo's 4% foreground) ---
    prior: float = 0.0  # > 0: M = Eq. (1) + a learnable bias b started at logit(prior)
    minimap_prior: float = 0.0  # > 0: the minimap head's fg bias starts at logit(minimap_prior)
    filter_init_std: float = 0.0  # > 0: last region-filter layer N(0, std²) weights, zero bias
    # --- no-target decision ---
    # 0: the no-target head E decides (ReLA). > 0: Table 6 "ReLA-50pix": the head is ignored and a
    # mask with fewer positive pixels than this (counted at 480×480, scaled with the image area)
    # is no-target. The head still trains, so a trained model can be evaluated both ways.
    no_target_pixels: float = 0.0
    # --- losses (released criterion.py) ---
    class_weight: tuple[float, float] = (0.9, 1.1)  # [bg, fg] in all three CE terms
    loss_scale: float = 5.0  # released MASK_WEIGHT, multiplies the whole loss_mask
    minimap_weight: float = 0.1
    # "release": bilinear resize + truncation, a cell-centre sample (see minimap_target).
    # "any" (tiny): a cell is a target cell when it holds any target pixel.
    minimap_rule: str = "release"
    no_target_weight: float = 0.1

    @classmethod
    def paper(cls) -> Config:
        """Swin-B + BERT-base from the Hub, 480 px, 20 tokens, P = 10, 9 decoder layers; the
        release's choices where the paper is silent (the dataclass defaults)."""
        return cls()

    @classmethod
    def tiny(cls) -> Config:
        """The demo: the repository's pretrained tiny Swin + BERT (pretrain.py), 64 px, P = 10,
        and the choices that make it learn in 5000 CPU steps (docs/rela.md, one heading each).

        vision_config / text_config repeat the folders' architectures, so `pretrained=False`
        (--no-pretrained, tests) builds the same encoders with random weights."""
        return cls(
            image_size=64,
            vocab_size=128,  # train.py sets len(tokenizer)
            vision_name="pretrained/tiny-swin",
            text_name="pretrained/tiny-bert",
            vision_config=_tiny_swin(),
            text_config=_tiny_bert(),
            hidden_dim=64,  # = the tiny BERT width; Swin gives 32-256 channels
            encoder_layers=1,
            encoder_ffn=128,
            gn_groups=8,
            dec_layers=3,  # one pass over the three levels
            num_heads=4,
            dec_ffn=128,
            gate_init="learnable",  # docs/rela.md#gate_init
            pos_scale=8.0,  # docs/rela.md#pos_scale
            prior=0.04,  # docs/rela.md#prior
            minimap_prior=0.04,  # docs/rela.md#minimap_prior
            filter_init_std=0.01,  # docs/rela.md#filter_init_std
            minimap_rule="any",  # docs/rela.md#minimap_rule
        )


# =============================================================================================
# ReLAtionship modelling (§4.2): RIA (Eq. 2), RLA (Eq. 3), one decoder layer


class RIA(nn.Module):
    """Region-Image cross Attention (Fig. 5a): each region query collects its own image area.

    Eq. (2): A_ri = softmax(Q_r σ(F_i W_ik)^T) over the H*W pixels; the gathered features are
    A_ri σ(F_i W_iv). As released (Mask2Former), layer l > 0 queries with the previous layer's F_r
    and adds the gathered features to it: F'_r = LN(F_r + A_ri σ(F_i W_iv)).
    Eq. (2) shows no positions. pos_scale = 0 (paper()): the release's, q_pos^n added to the
    query and the pixel's sine encoding pos_p to the keys' input. pos_scale > 0 (tiny()): a
    separate term pos_scale · q_pos^n·pos_p / sqrt(C) on the scores, with q_pos^n started at cell
    n's centre, so region n starts looking at cell n, the patch the minimap ties it to (as
    Anchor-DETR starts its queries on a grid).
    With hard_split (Table 2 #2) A_ri is replaced by a fixed P×P average pooling of σ(F_i W_iv).
    """

    def __init__(self, C: int, heads: int, pos_scale: float = 0.0):
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
        elif self.pos_scale > 0:
            K = F.gelu(self.W_ik(F_i))  # σ(F_i W_ik): (B, H*W, C)
            where = self.pos_scale * query_pos @ pos.T / math.sqrt(pos.shape[-1])  # (N, H*W)
            # Eq. (2): A_ri (B, heads, N, H*W), softmax over pixels; gathered = A_ri V (B, N, C)
            gathered, A_ri = attention(F_r, K, V, self.heads, bias=where)
        else:
            K = F.gelu(self.W_ik(F_i + pos))  # σ((F_i + pos) W_ik): (B, H*W, C)
            # Eq. (2) with the release's positions: A_ri (B, heads, N, H*W) over pixels
            gathered, A_ri = attention(F_r + query_pos, K, V, self.heads)
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

    def __init__(self, C: int, heads: int, ffn: int, pos_scale: float = 0.0):
        super().__init__()
        self.ria = RIA(C, heads, pos_scale)
        self.rla = RLA(C, heads, ffn)

    def forward(self, F_r, query_pos, F_i, pos, hw, F_t, word_mask, ablate=()):
        """F_r (B, N, C) from the previous layer -> (F'_r, F_r), both (B, N, C)."""
        F_r_prime, _ = self.ria(F_r, query_pos, F_i, pos, hw, hard_split="hard_split" in ablate)
        region_att, language_att = "no_region_att" not in ablate, "no_language_att" not in ablate
        F_r = self.rla(F_r_prime, query_pos, F_t, word_mask, region_att, language_att)
        return F_r_prime, F_r


# ---------------------------------------------------------------------------------------------
# Outputs and loss (§4.1, Fig. 4): region masks M_r, minimap x_r, Eq. (1), no-target score E


def fuse_region_masks(weights: torch.Tensor, M_r: torch.Tensor) -> torch.Tensor:
    """Eq. (1): M = Σ_n x_r^n M_r^n. weights (B, N), M_r (B, N, h, w) -> M (B, 1, h, w)."""
    return torch.einsum("bn,bnhw->bhw", weights, M_r)[:, None]  # Eq. (1)


class RegionHeads(nn.Module):
    """The released heads: 3-layer filter MLP, Linear minimap, 2-layer no-target MLP.

    paper(): PyTorch's default initialisation and Eq. (1) as printed, as released. tiny() starts
    calibrated: the last filter layer small (filter_init_std), so every region mask starts near
    0, M = Eq. (1) + b with b at logit(prior), and the minimap head at x_r = minimap_prior.
    """

    def __init__(self, C: int, fusion_weight: str, prior=0.0, minimap_prior=0.0, filter_std=0.0):
        super().__init__()
        self.fusion_weight = fusion_weight
        self.region_filter = nn.Sequential(
            nn.Linear(C, C), nn.ReLU(), nn.Linear(C, C), nn.ReLU(), nn.Linear(C, C)
        )
        self.minimap_head = nn.Linear(C, 2)  # (bg, fg) logits per region
        self.no_target_head = nn.Sequential(nn.Linear(C, C), nn.ReLU(), nn.Linear(C, 2))
        # b in M = Σ x_r M_r + b (tiny() only; Eq. (1) has no bias)
        self.mask_bias = nn.Parameter(torch.tensor(_logit(prior))) if prior > 0 else None
        if filter_std > 0:
            nn.init.normal_(self.region_filter[-1].weight, std=filter_std)
            nn.init.zeros_(self.region_filter[-1].bias)
        if minimap_prior > 0:  # a detector's focal-loss prior init
            with torch.no_grad():
                self.minimap_head.bias.copy_(torch.tensor([0.0, _logit(minimap_prior)]))

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
        M = fuse_region_masks(weights, M_r)  # Eq. (1): (B, 1, h, w)
        if self.mask_bias is not None:
            M = M + self.mask_bias  # tiny(): + the learnable prior bias b
        nt_logits = self.no_target_head(F_r.mean(1))  # E from the mean region feature: (B, 2)
        return M_r, minimap_logits, x_r, M, nt_logits


def minimap_target(masks: torch.Tensor, P: int, rule: str = "release") -> torch.Tensor:
    """The minimap GT, "downsampled from M_GT" (§4.1): (B, H, W) {0,1} -> (B, P*P) long,
    row-major (query n <-> cell n).

    "release": bilinear resize to P×P (align_corners=False, no antialias) then `.long()`:
    truncation, so a cell is 1 only where the interpolated value is exactly 1, in effect a sample
    at the cell centre. "any": cell n is 1 when it holds any target pixel (adaptive max pooling,
    cells may overlap by a pixel), x_r^n as "its probability of containing targets".
    """
    if rule == "any":
        return (F.adaptive_max_pool2d(masks[:, None].float(), P) > 0.5).long().flatten(1)
    small = F.interpolate(masks[:, None].float(), size=(P, P), mode="bilinear", align_corners=False)
    return small.long().flatten(1)  # (B, 1, P, P) -> (B, P*P)


# =============================================================================================
# Plumbing the paper builds on (not ReLA's contribution): the released code's language-aware
# Swin (LAVT's PWAM + gate), a Mask2Former-style pixel decoder, and small helpers.


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

    def __init__(self, backbone: SwinBackbone, text_dim: int, dropout=0.0, gate_init="release"):
        super().__init__()
        self.backbone = backbone
        dims = backbone.channels  # [C1, C2, C3, C4] = embed_dim * (1, 2, 4, 8)
        self.pwams = nn.ModuleList(PWAM(d, text_dim, dropout) for d in dims)
        # ReLA gates stages 1-3 only: stage 4's PWAM output goes to the decoder, no next stage.
        self.gates = nn.ModuleList(
            nn.Sequential(
                nn.Linear(d, d, bias=False), nn.ReLU(), nn.Linear(d, d, bias=False), nn.Tanh()
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


def _logit(p: float) -> float:
    """The logit of a probability: the bias that makes a sigmoid start at p."""
    return math.log(p / (1 - p))


# =============================================================================================
# The model


class ReLA(nn.Module):
    """Fig. 4 as released: language-aware Swin + BERT -> pixel decoder -> ReLAtionship
    modelling -> Eq. (1), E (docs/rela.md#encoder)."""

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
        # Q_r as released (nn.Embedding, N(0, 1)): N distinct queries from the start
        # (docs/rela.md#query_feat).
        self.query_feat = nn.Embedding(N, C)  # Q_r, region-based queries
        # The position of region n, learnable, N(0, 1) as released. tiny() (pos_scale > 0) starts
        # it at cell n's centre (row-major, as the minimap) in the pixels' sine encoding; without
        # the minimap (Table 2 #3) nothing ties region n to cell n, so it stays plain.
        self.query_pos = nn.Embedding(N, C)
        grid = cfg.pos_scale > 0 and "no_minimap" not in cfg.ablate
        if grid:
            with torch.no_grad():
                self.query_pos.weight.copy_(sine_position_encoding(cfg.P, cfg.P, C))
        pos_scale = cfg.pos_scale if grid else 0.0
        self.layers = nn.ModuleList(
            ReLALayer(C, cfg.num_heads, cfg.dec_ffn, pos_scale) for _ in range(cfg.dec_layers)
        )
        self.heads = RegionHeads(
            C, cfg.fusion_weight, cfg.prior, cfg.minimap_prior, cfg.filter_init_std
        )

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
    choices = {"fusion_weight": ("prob", "logit"), "minimap_rule": ("release", "any"),
               "gate_init": ("release", "learnable")}  # fmt: skip
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(cfg, name)!r}")
    for name in ("prior", "minimap_prior", "pos_scale", "filter_init_std"):
        value, top = getattr(cfg, name), 1 if "prior" in name else math.inf
        if not 0 <= value < top:
            raise ValueError(f"{name} must be in [0, {top}) (0 = off), got {value}")
    side = cfg.image_size // 32  # the coarsest map RIA reads
    if "hard_split" in cfg.ablate and side < cfg.P:
        warnings.warn(
            f"hard_split: the stride-32 map is {side}×{side}, smaller than P×P = {cfg.P}×{cfg.P}; "
            "average pooling repeats its cells, so several regions see the same features",
            stacklevel=2,
        )
    return ReLA(cfg)


# =============================================================================================
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


def _region_mask_stats(M_r, x_r, masks, k: int = 3) -> dict[str, torch.Tensor]:
    """Are the k most confident regions' masks regional (Fig. 7) or the whole target?

    M_r (B, N, h, w) logits, x_r (B, P, P), masks (B, H, W) -> per sample (B,): the share of
    sigmoid(M_r^n)'s mass inside the 3×3 cells around region n's own cell ("local"), the same
    share for the ground-truth mask (a whole-target map) and for an even map ("even"), the
    mean pairwise cosine of the k masks ("cos", 1 = the k masks are the same map), and the share
    of all N masks' energy in their first singular component ("rank1", 1 = multiples of one map).
    """
    B, N, h, w = M_r.shape
    P = x_r.shape[-1]
    top = x_r.flatten(1).topk(k).indices  # (B, k): the panel's regions
    sig = M_r.float().sigmoid().gather(1, top[..., None, None].expand(-1, -1, h, w))  # (B, k, h, w)
    cell_y = ((torch.arange(h, device=M_r.device) + 0.5) * P / h).floor()  # pixel row -> cell row
    cell_x = ((torch.arange(w, device=M_r.device) + 0.5) * P / w).floor()
    r, c = (top // P).float(), (top % P).float()  # (B, k)
    near = ((cell_y[:, None] - r[..., None, None]).abs() <= 1) & (
        (cell_x[None, :] - c[..., None, None]).abs() <= 1
    )  # (B, k, h, w): the 3×3 cells around each region's own cell
    gt = F.adaptive_avg_pool2d(masks[:, None].float(), (h, w))  # (B, 1, h, w) at M_r's stride

    def share(m):  # (B, k or 1, h, w) -> (B,) mass inside the neighbourhood / all mass
        return ((m * near).sum((2, 3)) / m.sum((2, 3)).clamp_min(1e-12)).mean(1)

    flat = F.normalize(sig.flatten(2), dim=-1)  # (B, k, h*w)
    G = flat @ flat.transpose(1, 2)  # (B, k, k)
    S = torch.linalg.svdvals(M_r.float().flatten(2))  # (B, min(N, h*w))
    return {
        "rank1": S[:, 0] ** 2 / (S**2).sum(1).clamp_min(1e-12),
        "local": share(sig),
        "local_gt": share(gt),
        "local_even": near.float().mean((2, 3)).mean(1),
        "cos": (G.sum((1, 2)) - G.diagonal(dim1=1, dim2=2).sum(-1)) / (k * (k - 1)),
    }


def diagnostics(outputs: dict, batch: dict) -> dict[str, float]:
    """Does the minimap find the targets, are the regions distinct, are region masks regional?

    minimap_auc: AUC of x_r against the P×P cells that hold any target pixel, over the cells of
    the batch's targeted samples (1 = every target cell ranks above every other cell, 0.5 = no
    better than chance); minimap_auc_release: the same against the release's cell-centre minimap.
    x_r_target / x_r_other: mean x_r on the cells holding target pixels / elsewhere.
    region_cos / region_cos_prime: mean pairwise cosine of the N region features F_r / F'_r
    (1 = all regions identical).
    region_mask_local: for the 3 regions of highest x_r (the samples.png panel), the share of
    sigmoid(M_r^n)'s mass within one cell of region n's own cell, on targeted samples; beside it
    region_mask_local_gt (the same share of the ground-truth mask: what whole-target region
    masks get), region_mask_local_even (an even map) and region_mask_cos (pairwise cosine of the
    3 masks, 1 = identical). Regional masks (Fig. 7) put region_mask_local above _gt.
    region_mask_rank1: the share of all N region masks' energy in their first singular component
    (1 = every M_r^n is a multiple of one map).
    """
    x_r = outputs["minimap"].float()  # (B, P, P)
    B, P, _ = x_r.shape
    masks = batch["mask"].to(x_r.device).float()  # (B, H, W)
    cells = minimap_target(masks, P, "any").view(B, P, P) > 0  # (B, P, P): any target pixel
    targeted = cells.flatten(1).any(1)  # (B,)
    scores, labels = x_r[targeted].flatten(), cells[targeted].flatten()
    nan = float("nan")
    out = {
        "minimap_auc": _auc(scores, labels),
        "minimap_auc_release": _auc(
            scores, minimap_target(masks, P, "release")[targeted].flatten() > 0
        ),
        "x_r_target": scores[labels].mean().item() if labels.any() else nan,
        "x_r_other": scores[~labels].mean().item() if (~labels).any() else nan,
        "region_cos": _mean_pairwise_cosine(outputs["F_r"]),
        "region_cos_prime": _mean_pairwise_cosine(outputs["F_r_prime"]),
    }
    if "M_r" in outputs:
        local = _region_mask_stats(outputs["M_r"].detach(), x_r, masks)
        for name, values in local.items():
            out[f"region_mask_{name}"] = values[targeted].mean().item() if targeted.any() else nan
    return out


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


# =============================================================================================
# The paper's tables and the release's recipe (train.py --row, --recipe paper)


def _pr(p7: float, p8: float, p9: float, cIoU: float, gIoU: float) -> dict[str, float]:
    """The columns of Tables 2-4: Pr@0.7, Pr@0.8, Pr@0.9, cIoU, gIoU (gRefCOCO val)."""
    return {"Prec@0.7": p7, "Prec@0.8": p8, "Prec@0.9": p9, "cIoU": cIoU, "gIoU": gIoU}


# gRefCOCO val, Swin-B, numbers in %. One build carries one paper number: the full model, paper()
# itself, is "ReLA (ours)" in Tables 2-6, and that model is LAVT's language-aware Swin + the ReLA
# decoder (docs/rela.md#encoder). The paper states no other setting (image size, schedule) for any
# row, so no row carries "recipe" overrides. train.py --row "Table 2 #3" applies a row.
_FULL = _pr(74.20, 68.33, 24.68, 62.42, 63.60)  # "ReLA (ours)"
TABLES: dict[str, dict[str, dict]] = {
    "Table 2": {  # Ablation study of RIA design options
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
            "note": "plain learnable queries: no minimap loss, and in tiny() no grid-started "
            "positions either",
        },
        "#4 ReLA": {"ablate": (), "paper": _FULL, "baseline": True},
    },
    "Table 3": {  # Ablation study of RLA design options
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
    "Table 4": {  # Ablation study of the number of regions
        "P=4 4×4 regions": {"set": {"P": 4}, "paper": _pr(68.48, 60.25, 20.33, 56.57, 57.01)},
        "P=8 8×8 regions": {"set": {"P": 8}, "paper": _pr(72.36, 66.85, 23.56, 59.74, 61.23)},
        "P=10 10×10 regions": {"set": {"P": 10}, "paper": _FULL, "baseline": True},
        "P=12 12×12 regions": {"set": {"P": 12}, "paper": _pr(74.14, 67.56, 23.90, 62.02, 63.50)},
    },
    "Table 5": {  # Comparison on gRefCOCO; only the ReLA-decoder rows, val
        "ReLA (ours)": {
            "ablate": (),
            "paper": {"cIoU": 62.42, "gIoU": 63.60},
            "baseline": True,
            "note": "LAVT's language-aware Swin + ReLA decoder, as released (docs/rela.md#encoder)",
        },
        "LAVT+ReLA LAVT's encoder, ReLA decoder": {
            "skip": "the paper does not say how it differs from ReLA (ours), which the release "
            "and the authors (henghuiding/ReLA#26) build with LAVT's encoder: here it would be "
            "the same model as the ReLA row with another number (docs/rela.md#encoder)",
            "paper": {"cIoU": 61.23, "gIoU": 61.32},
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
