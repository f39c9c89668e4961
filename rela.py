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
output mask is emptied. Image features come from a LAVT-style language-aware Swin (pixel-word
attention + a tanh gate inside every stage), as in the released code.

Symbols (paper -> code), shape legend B batch, L words, C channels, H, W map size, N = P² regions:
    F_i        image features of one pixel-decoder level     F_i        (B, H*W, C)
    F_t        language features (BERT, projected to C)      F_t        (B, L, C)
    F_m        mask features (stride 4)                      F_m        (B, C, H/4, W/4)
    Q_r        region-based queries                          query_feat (N, C)
    A_ri       region-image attention (Eq. 2)                A_ri       (B, heads, N, H*W)
    F'_r       region image features (RIA output)            F_r_prime  (B, N, C)
    F_r1       region self-attention output                  F_r1       (B, N, C)
    A_l        region-word attention (Eq. 3)                 A_l        (B, N, L)
    F_r2       language-aware region features                F_r2       (B, N, C)
    F_r        region features MLP(F'_r + F_r1 + F_r2)       F_r        (B, N, C)
    F_f        region filters                                F_f        (B, N, C)
    M_r        region masks                                  M_r        (B, N, H/4, W/4)
    x_r        minimap, P×P region probabilities             x_r        (B, N)
    M          output mask, Eq. (1)                          M          (B, 1, H/4, W/4)
    E          no-target score                               no_target_logits (B,)
    P          regions per side (Table 4: 4, 8, 10, 12)      cfg.P

Differences from the paper and the released code (github.com/henghuiding/ReLA), one per line:
- Pixel decoder: transformer encoder on the stride-32 map + FPN to stride 4, not MSDeformAttn.
- RLA: Eq. 2-3 in all 9 layers; released main: language att. in layer 0 only; original: RLA at end.
- RIA is unmasked cross-attention (Eq. 2); the released code uses Mask2Former's masked attention.
- Attention: 8 heads, 1/sqrt(d) scale, sine keys, learnable query positions (released; not in Eq.).
- Layers add residual + post-LayerNorm: F_r = LN(S + MLP(S)), S = F'_r + F_r1 + F_r2 (paper MLP(S)).
- Region-language attention ignores [PAD] words (released: no mask, pads are attended).
- Eq. (1) weights by probabilities x_r (paper); released: raw minimap logits, fusion_weight="logit".
- mask_logits is one map M; the 2-class CE sees logits (0, M), released sees (bg, fg) = same loss.
- Filters from the last F'_r, x_r and E from F_r, as §4.2 says (released main: all from F_r).
- No-target head: MLP of the mean region feature (paper); released: mean of per-region MLPs.
- Inference: mask_logits = -1e4 where E > 0 (mask_logits_raw keeps M for the official FP union).
- Loss: 5 * (CE_mask + 0.1 CE_minimap + 0.1 CE_nt), weights [0.9, 1.1], x5 = cfg.loss_scale.
- Minimap target: GT bilinearly resized to P×P then .long() (truncation), as released.
- Encoder: LAVT PWAM + tanh gate before patch merging, gates on stages 1-3, zero-init (as released).
- All BERT layers train (the release never optimises the embeddings and layers 10-11).
- "hard_split" is Table 2 #2 (P×P average pooling in RIA); #1 (split the input image) is not here.

Reference code: https://github.com/henghuiding/ReLA (branches main and original), LAVT's PWAM:
https://github.com/yz93/LAVT-RIS (lib/backbone.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, SwinBackbone, SwinConfig

from common import weighted_ce_loss

TEXT_ENCODER = "bert"

ABLATIONS: dict[str, str] = {
    "hard_split": "RIA replaced by average pooling the image feature into P×P cells (Table 2 #2)",
    "no_minimap": "no minimap supervision: region queries become plain queries (Table 2 #3)",
    "no_region_att": "RLA without region self-attention F_r1 (Table 3 #2, language att. only)",
    "no_language_att": "RLA without region-language attention; F_r2 = F'_r * mean word feature, "
    "the Table 3 baseline fusion (Table 3 #3, region att. only)",
    "no_encoder_fusion": "plain Swin, no LAVT pixel-word attention in the stages "
    "(released-code design choice, not a paper table)",
}
# Non-boolean ablation: P (Table 4: 4, 8, 10, 12) is the Config field `P` (`--set P=8`).

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
    fusion_weight: str = "prob"  # Eq. (1) weights: "prob" = x_r (paper), "logit" (released main)
    # --- losses (released criterion.py) ---
    class_weight: tuple[float, float] = (0.9, 1.1)  # [bg, fg] in all three CE terms
    loss_scale: float = 5.0  # released MASK_WEIGHT, multiplies the whole loss_mask
    minimap_weight: float = 0.1
    no_target_weight: float = 0.1

    @classmethod
    def paper(cls) -> Config:
        """Swin-B + BERT-base from the Hub, 480 px, 20 tokens, P = 10, 9 decoder layers."""
        return cls()

    @classmethod
    def tiny(cls) -> Config:
        """Random-init small encoders for tests and the CPU demo (P stays at the paper's 10)."""
        return cls(
            image_size=64,
            vocab_size=128,
            pretrained=False,
            vision_config=dict(
                image_size=64,
                patch_size=4,
                embed_dim=16,
                depths=[1, 1, 1, 1],
                num_heads=[1, 2, 4, 8],
                window_size=4,
                drop_path_rate=0.0,
            ),
            text_config=dict(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=32,
            ),
            hidden_dim=32,
            encoder_layers=1,
            encoder_ffn=64,
            gn_groups=8,
            dec_layers=3,
            num_heads=4,
            dec_ffn=64,
        )


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


def minimap_target(masks: torch.Tensor, P: int) -> torch.Tensor:
    """The released minimap GT: (B, H, W) {0,1} -> (B, P*P) long, row-major (query n <-> cell n).

    Bilinear resize to P×P (align_corners=False, no antialias) then `.long()`: truncation, so a cell
    is 1 only where the interpolated value is exactly 1 (all its sampled pixels are foreground).
    """
    small = F.interpolate(masks[:, None].float(), size=(P, P), mode="bilinear", align_corners=False)
    return small.long().flatten(1)  # (B, 1, P, P) -> (B, P*P)


def fuse_region_masks(weights: torch.Tensor, M_r: torch.Tensor) -> torch.Tensor:
    """Eq. (1): M = Σ_n x_r^n M_r^n. weights (B, N), M_r (B, N, h, w) -> M (B, 1, h, w)."""
    return torch.einsum("bn,bnhw->bhw", weights, M_r)[:, None]  # Eq. (1)


def attention(q, k, v, heads: int, key_mask=None):
    """Scaled dot-product attention split into heads; softmax over the KEY axis.

    q (B, N, C), k and v (B, M, C), key_mask (B, M) with 1 = attend. Returns (B, N, C) and the
    attention weights (B, heads, N, M) (kept for tests and visualisation).
    """
    B, N, C = q.shape
    d = C // heads
    q = q.reshape(B, N, heads, d).transpose(1, 2)  # (B, heads, N, d)
    k = k.reshape(B, -1, heads, d).transpose(1, 2)  # (B, heads, M, d)
    v = v.reshape(B, -1, heads, d).transpose(1, 2)  # (B, heads, M, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, heads, N, M)
    if key_mask is not None:
        scores = scores.masked_fill(key_mask[:, None, None, :] == 0, float("-inf"))
    A = scores.softmax(-1)  # normalised over keys (pixels for RIA, words for RLA)
    out = (A @ v).transpose(1, 2).reshape(B, N, C)  # (B, heads, N, d) -> (B, N, C)
    return out, A


# ---------------------------------------------------------------------------------------------
# Language-aware Swin encoder (LAVT's PWAM + language gate, as ReLA's released swin.py)


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
    SwinBackbone's own forward). Stage i hands the decoder LayerNorm(F_i), the PWAM output, and
    the next stage gets x + gate(F_i) * F_i.
    """

    def __init__(self, backbone: SwinBackbone, text_dim: int, dropout: float = 0.0):
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
            nn.init.zeros_(gate[2].weight)  # zero-init: training starts from the plain Swin stream
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
            F_i = x
            if fuse:
                F_i = self.pwams[i](x, words, word_mask)  # (B, h*w, C_i)
                if i < len(self.gates):
                    x = x + self.gates[i](F_i) * F_i  # language gate (LAVT "LG")
            F_i = self.backbone.hidden_states_norms[SWIN_STAGES[i]](F_i)
            B, _, C = F_i.shape
            feats.append(F_i.transpose(1, 2).reshape(B, C, h, w))  # (B, h*w, C) -> (B, C, h, w)
            if stage.downsample is not None:
                x = stage.downsample(x, (h, w))  # patch merging: (B, h*w/4, 2C)
                h, w = (h + 1) // 2, (w + 1) // 2
        return feats


# ---------------------------------------------------------------------------------------------
# Pixel decoder: mask features F_m (stride 4) and the three levels F_i that RIA reads


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


# ---------------------------------------------------------------------------------------------
# ReLAtionship modelling (§4.2): RIA (Eq. 2) and RLA (Eq. 3)


class RIA(nn.Module):
    """Region-Image cross Attention (Fig. 5a): each region query collects its own image area.

    Eq. (2): A_ri = softmax(Q_r σ(F_i W_ik)^T) over the H*W pixels; F'_r = A_ri σ(F_i W_iv).
    With hard_split (Table 2 #2) A_ri is replaced by a fixed P×P average pooling of σ(F_i W_iv).
    """

    def __init__(self, C: int, heads: int):
        super().__init__()
        self.W_ik = nn.Linear(C, C)
        self.W_iv = nn.Linear(C, C)
        self.heads = heads

    def forward(self, Q_r, F_i, pos, hw: tuple[int, int], hard_split: bool = False):
        """Q_r (B, N, C) queries (+ position), F_i (B, H*W, C), pos (H*W, C) -> (B, N, C), A_ri."""
        V = F.gelu(self.W_iv(F_i))  # σ(F_i W_iv): (B, H*W, C)
        if hard_split:
            B, _, C = V.shape
            P = math.isqrt(Q_r.shape[1])
            grid = V.transpose(1, 2).reshape(B, C, *hw)  # (B, C, H, W)
            return F.adaptive_avg_pool2d(grid, P).flatten(2).transpose(1, 2), None  # (B, P*P, C)
        K = F.gelu(self.W_ik(F_i + pos))  # σ(F_i W_ik): (B, H*W, C)
        F_r_prime, A_ri = attention(Q_r, K, V, self.heads)  # Eq. (2): A_ri (B, heads, N, H*W)
        return F_r_prime, A_ri


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
        """F_r_prime (B, N, C), query_pos (N, C), F_t (B, L, C), word_mask (B, L) -> (B, N, C)."""
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
    """One decoder layer: F'_r = LN(F_r + RIA(F_r)); F_r <- RLA(F'_r)."""

    def __init__(self, C: int, heads: int, ffn: int):
        super().__init__()
        self.ria = RIA(C, heads)
        self.ria_norm = nn.LayerNorm(C)
        self.rla = RLA(C, heads, ffn)

    def forward(self, F_r, query_pos, F_i, pos, hw, F_t, word_mask, ablate=()):
        """F_r (B, N, C) from the previous layer -> (F'_r, F_r), both (B, N, C)."""
        gathered, _ = self.ria(F_r + query_pos, F_i, pos, hw, hard_split="hard_split" in ablate)
        F_r_prime = self.ria_norm(F_r + gathered)  # (B, N, C)
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
# The model


class ReLA(nn.Module):
    """Fig. 4: language-aware Swin + BERT -> pixel decoder -> ReLAtionship modelling -> Eq. (1)."""

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
        self.vision = LanguageAwareSwin(backbone, text_dim, cfg.pwam_dropout)
        self.pixel_decoder = PixelDecoder(
            backbone.channels, C, cfg.encoder_layers, cfg.num_heads, cfg.encoder_ffn, cfg.gn_groups
        )
        self.text_proj = nn.Linear(text_dim, C)  # F_t in the decoder's width C
        self.query_feat = nn.Parameter(torch.randn(N, C) * 0.02)  # Q_r, region-based queries
        self.query_pos = nn.Parameter(torch.randn(N, C) * 0.02)  # learnable position of region n
        self.layers = nn.ModuleList(
            ReLALayer(C, cfg.num_heads, cfg.dec_ffn) for _ in range(cfg.dec_layers)
        )
        # Heads (released: 3-layer mask MLP, Linear minimap, 2-layer no-target MLP).
        self.region_filter = nn.Sequential(
            nn.Linear(C, C), nn.ReLU(), nn.Linear(C, C), nn.ReLU(), nn.Linear(C, C)
        )
        self.minimap_head = nn.Linear(C, 2)  # (bg, fg) logits per region
        self.no_target_head = nn.Sequential(nn.Linear(C, C), nn.ReLU(), nn.Linear(C, 2))

    def forward(self, images, input_ids, attention_mask, targets=None) -> dict:
        cfg, ablate = self.cfg, self.cfg.ablate
        words = self.text_encoder(input_ids, attention_mask=attention_mask).last_hidden_state
        feats = self.vision(images, words, attention_mask, fuse="no_encoder_fusion" not in ablate)
        F_m, levels = self.pixel_decoder(feats)  # (B, C, H/4, W/4), [s32, s16, s8]
        F_t = self.text_proj(words)  # (B, L, C)

        B = images.shape[0]
        F_r = self.query_feat.expand(B, -1, -1)  # (B, N, C)
        for i, layer in enumerate(self.layers):
            level = levels[i % len(levels)]  # round-robin over strides 32, 16, 8
            h, w = level.shape[-2:]
            F_i = level.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)
            pos = sine_position_encoding(h, w, F_i.shape[-1], F_i.device).to(F_i.dtype)
            F_r_prime, F_r = layer(
                F_r, self.query_pos, F_i, pos, (h, w), F_t, attention_mask, ablate
            )

        F_f = self.region_filter(F_r_prime)  # region filters from RIA's F'_r (§4.2): (B, N, C)
        M_r = torch.einsum("bnc,bchw->bnhw", F_f, F_m)  # region masks (B, N, H/4, W/4)
        minimap_logits = self.minimap_head(F_r)  # (B, N, 2)
        x_r = minimap_logits.softmax(-1)[..., 1]  # P(region n contains a target): (B, N)
        if cfg.fusion_weight == "prob":
            weights = x_r
        else:  # released main: channel a = Σ_n logit_a^n M_r^n, so fg - bg is this weighting
            weights = minimap_logits[..., 1] - minimap_logits[..., 0]
        M = fuse_region_masks(weights, M_r)  # Eq. (1): (B, 1, H/4, W/4)
        nt_logits = self.no_target_head(F_r.mean(1))  # E from the mean region feature: (B, 2)
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
        }
        if targets is not None:
            out["loss"], out["losses"] = self.loss(M, minimap_logits, nt_logits, targets)
        return out

    def loss(self, M, minimap_logits, nt_logits, targets):
        """Released criterion: 5 (CE(M) + 0.1 CE(minimap) + 0.1 CE(no-target)), weights .9/1.1."""
        cfg = self.cfg
        gt = targets["masks"]  # (B, H, W)
        M = F.interpolate(M, size=gt.shape[-2:], mode="bilinear", align_corners=False)
        two_class = torch.cat([torch.zeros_like(M), M], 1)  # (B, 2, H, W): CE = weighted BCE on M
        loss_mask = weighted_ce_loss(two_class, gt, cfg.class_weight)
        loss_minimap = weighted_ce_loss(
            minimap_logits.transpose(1, 2), minimap_target(gt, cfg.P), cfg.class_weight
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
    return ReLA(cfg)


def sample_extra(outputs: dict, i: int, tokenizer) -> tuple[np.ndarray | None, str]:
    """The predicted P×P minimap x_r, captioned with the no-target probability."""
    minimap = outputs["minimap"][i].detach().float().cpu().numpy()  # (P, P)
    p = torch.sigmoid(outputs["no_target_logits"][i].detach().float()).item()
    return minimap, f"no-target p={p:.2f}"


if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = Config.tiny()
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
