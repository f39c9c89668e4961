"""CM-MaskSD: Cross-Modality Masked Self-Distillation for Referring Image Segmentation.

Wenxuan Wang, Jing Liu, Xingjian He, Yisi Zhang, Chen Chen, Jiachen Shen, Yan Zhang, Jiangyun Li.
IEEE Transactions on Multimedia 2024. https://arxiv.org/abs/2305.11481 · no public code (the
repository https://github.com/Rubics-Xuan/CM-MaskSD holds a README only); the main branch follows
CRIS (https://github.com/DerrickWang005/CRIS.pytorch). Evidence and runs: docs/cm_masksd.md.

Idea. A CRIS segmenter on CLIP ViT-B/16 (§3.1: the two encoders, Eq. 1; a neck that fuses the
patches with the sentence and a vision-language decoder that lets every pixel read the words,
Eq. 2) trains next to two masked copies of itself that share its weights (§3.2). LMVSD ranks the
patches by their correlation with the sentence (Eq. 3), keeps the top T = TopK·N, replaces α·T of
them, at random, by a learnable token at the embedding level (Eq. 4) and runs the image encoder,
neck and decoder again (Eq. 5). VMLSD does the same to the words, ranked by their correlation with
the image's class token (Eq. 6-8). Eq. 9: Loss = BCE(M_seg, GT) + λ1 BCE(M_LMVSD, M_seg) +
λ2 BCE(M_VMLSD, M_seg). Inference runs the main branch only. The masking teaches something only
if the top-T lies on the referent: `diagnostics` measures that against another sentence's ranking.
In the demo Eq. 3 puts the objects first whatever the sentence, and the tiny CLIP's sentence
moves its referent only a little ahead of the other objects (docs/cm_masksd.md#guidance).

Symbols (paper -> code); B batch, L tokens, N = h*w patches, C_v / C_t the encoder widths,
P = projection_dim (CLIP's joint space, the paper's C), d = neck_dims[1] the decoder width:
    I, T                      images, input_ids       (B, 3, H, W), (B, L)
    E_I, E_T                  patch / token embeddings (inside the HF encoders; masked by hooks)
    V_local = (v_0..v_N-1)    V_local                 (B, N, P)   last layer, post-LN, projected
    v_global                  v_global                (B, P)      [class] token, post-LN, projected
    W_local = (w_0..w_L-1)    W_local                 (B, L, C_t) words after CLIP's final LN
    w_global                  w_global                (B, P)      [EOS] state, text-projected
    taps v3, v4 (+ v5)        VisualFeatures.v3/.v4   (B, C_v, h, w) ViT layers cfg.vision_taps,
                                                      CRIS's C3 / C4 slots; v5 = V_local (C5)
    F, F_LMVSD, F_VMLSD       F_vl in Segmenter       (B, d, h, w) neck (then decoder) output
    M_seg, M_LMVSD, M_VMLSD   M_seg, M_lmvsd, M_vmlsd (B, 1, 4h, 4w) mask logits
    p, q                      p, q                    (B, N), (B, L)  Eq. 3 / Eq. 6
    T = TopK·N                T; TopK = cfg.lmvsd_topk / cfg.vmlsd_topk; `top_T` (B, N) bool
    α, α·T (masked count)     cfg.*_alpha; n_mask (B,) long, `masked` (B, N) bool (Eq. 4 / 7)
    v', w'                    patch_mask_token, word_mask_token  (C_v,), (C_t,)
    λ1, λ2                    cfg.lmvsd_weight, cfg.vmlsd_weight

Recipe (§4.2, RECIPE, `--recipe paper`): Adam, lr 1e-5 cosine after 10 warm-up epochs, 100 epochs,
batch 32, weight decay 5e-4; 480 px for Tables 2-5, Table 1 576 px (ViT-B) / 532 px (ViT-L,
`Config.paper_vit_l()`), carried by its rows' "recipe". The demo uses train.py's DEMO_RECIPE.

Differences; where each applies; the evidence is under docs/cm_masksd.md#<name>.
The paper is silent (one stated choice, `paper()` and `tiny()`):
- Eq. 3 / 6 in CLIP's joint space (projected post-LN tokens), without gradient (#correlation_space)
- mask_count: `paper()` masks ⌊α·T + ½⌋ tokens, at least one, of every sample's top-T (#mask_count)
- T = ⌊TopK·N + ½⌋; words are the real words only, never [SOS], [EOS] or padding (#mask_count)
- Which α·T are masked: uniform at random per sample, fresh at every step (#mask_tokens)
- v' / w' replace an embedding before the position embedding; N(0, 0.02²) start (#mask_tokens)
- The teacher is sigmoid(M_seg).detach(), a soft BCE target at the logits' size (#teacher)
- no_sharing (Table 5): each masked branch gets its own neck, decoder and projector (#no_sharing)
- The projector's kernel comes from each branch's own sentence feature (#no_sharing)
- vision_taps: ViT layers 4 and 8 as CRIS's C3 / C4 (as ETRIS), V_local as C5 (#vision_taps)
The release (CRIS) differs, we follow the paper (`paper()` and `tiny()`):
- CRIS ships ResNet CLIP; the neck reads ViT taps of one stride, no 2x up / pooling (#neck)
- RECIPE is §4.2's, not CRIS's (Adam 1e-4, 50 epochs, step decay at 35) (#recipe)
We deviate on purpose:
- Eq. 8 as printed swaps the modalities; we read the prose (`paper()` and `tiny()`) (#eq8)
- One CLIPModel holds both towers; its projections train at the encoder lr (both) (#one_clip)
- BatchNorm statistics of the shared neck / projector see all three branches (both) (#batchnorm)
- Eval with targets: the loss is Loss_seg, the choices are still made (both) (#diagnostics)
- correlation: `tiny()` only, cosine instead of Eq. 3 / 6's dot product (#correlation)
- mask_count: `tiny()` only, ⌊α·T + u⌋, u ~ U[0, 1), at least one word per batch (#mask_count)
- seg_loss_at: `tiny()` only, M_seg upsampled to the GT (`paper()`: as CRIS) (#seg_loss_at)
- mask_prior: `tiny()` only, the projector starts at the foreground share (#mask_prior)
- decoder_layers: `tiny()` only, 1 (CRIS: 3) (#decoder_layers)
- decoder_ffn: `tiny()` only, 64 (CRIS: 2048) (#decoder_ffn)
- decoder_heads: `tiny()` only, 2 (CRIS: 8) (#decoder_heads)
- neck_dims: `tiny()` only, (16, 32, 64) (CRIS: (256, 512, 1024)) (#neck_dims)
- dropout: `tiny()` only, 0 (CRIS: 0.1) (#dropout)
- vision_name: `tiny()` only, pretrained/tiny-clip at 64 px, taps 3 and 7 (#vision_name)
- Mask tokens enter by two persistent forward hooks, one graph for torch.compile (#hooks)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

import common

TEXT_ENCODER = "clip"

ABLATIONS: dict[str, str] = {
    "no_lmvsd": "main branch without the language-guided masked visual branch (Eq. 3-5)",
    "no_vmlsd": "main branch without the visual-guided masked language branch (Eq. 6-8)",
    "no_sharing": "masked branches get their own neck, decoder and projector (Table 5)",
    "random_mask": "a random top-T instead of the most correlated tokens (Eq. 3 / 6); a control "
    "of ours, not a paper row",
}
# Non-boolean ablations are Config fields: lmvsd_alpha / lmvsd_topk / lmvsd_weight (Table 3),
# vmlsd_alpha / vmlsd_topk / vmlsd_weight (Table 4); both branches off = Table 2's baseline.

# CLIP ViT-B/16 written out, so pretrained=False builds the paper architecture offline. Text
# eos_token_id 2 is HF's legacy value, as the Hub config: [EOS] is found by argmax of the ids.
VIT_B16_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, patch_size=16, image_size=224)  # fmt: skip
VIT_B16_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                    num_attention_heads=8, max_position_embeddings=77, eos_token_id=2)  # fmt: skip
# pretrained/tiny-clip's architecture (tiny()), so pretrained=False builds the same model; its
# [SOS] = V-2 and [EOS] = pad = V-1 are filled in from vocab_size by load_clip.
TINY_VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=10,
                   num_attention_heads=4, patch_size=8, image_size=64)  # fmt: skip
TINY_TEXT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 max_position_embeddings=32)  # fmt: skip


@dataclass
class Config:
    image_size: int = 480  # paper §4.2: 480x480 for the ablations (Table 1's rows: 576 / 532)
    max_tokens: int = 17  # paper §4.2 (following CRIS): 17 RefCOCO(+), 22 G-Ref, incl. SOS/EOS
    vocab_size: int = 49408  # CLIP BPE; train.py overwrites it with len(tokenizer)
    threshold: float = 0.35  # paper §4.2: "binarized with a threshold of 0.35"
    pretrained: bool = True  # paper §4.2: "initialized by CLIP"
    vision_name: str = "openai/clip-vit-base-patch16"  # paper §4.2: CLIP ViT-B/16
    text_name: str = "openai/clip-vit-base-patch16"  # the same CLIP (one model, both towers)
    vision_config: dict = field(default_factory=lambda: dict(VIT_B16_VISION))
    text_config: dict = field(default_factory=lambda: dict(VIT_B16_TEXT))
    ablate: tuple[str, ...] = ()
    projection_dim: int = 512  # C of Eq. 3 / 6: CLIP ViT-B/16's joint embedding width
    # --- main branch: CRIS neck, decoder and projector (§3.1, Eq. 2) ---
    vision_taps: tuple[int, int] = (4, 8)  # 1-based ViT layers v3, v4 (ETRIS); v5 = last layer
    neck_dims: tuple[int, int, int] = (256, 512, 1024)  # CRIS fpn_out
    decoder_layers: int = 3  # CRIS: 3 layers, d = neck_dims[1] = 512
    decoder_heads: int = 8  # CRIS
    decoder_ffn: int = 2048  # CRIS
    dropout: float = 0.1  # CRIS
    # None = CRIS's (PyTorch's default) projector init; p = a calibrated start at foreground p
    mask_prior: float | None = None
    # --- LMVSD (§3.2, Eq. 3-5, Table 3) ---
    lmvsd_alpha: float = 0.25  # masking ratio α
    lmvsd_topk: float = 0.5  # TopK: share of the patches kept by correlation filtering
    lmvsd_weight: float = 0.75  # λ1 in Eq. 9
    # --- VMLSD (§3.2, Eq. 6-8, Table 4) ---
    vmlsd_alpha: float = 0.1
    vmlsd_topk: float = 0.5
    vmlsd_weight: float = 0.1  # λ2 in Eq. 9
    # --- both masked branches ---
    # Eq. 3 / 6: "dot" as printed ("· denotes the dot product"), or "cosine" (unit-length sides)
    correlation: str = "dot"
    # How α·T becomes a count (Eq. 4 / 7): "nearest" = ⌊α·T + ½⌋ and at least one per sample with
    # T > 0; "stochastic" = ⌊α·T + u⌋, u ~ U[0, 1) (E = α·T), VMLSD at least one word per batch
    mask_count: str = "nearest"
    # --- the loss (§3.3, Eq. 9) ---
    # Loss_seg: "logits" = the GT resized (nearest) to M_seg's size, as CRIS; "gt" = M_seg
    # upsampled (bilinear) to the GT's size
    seg_loss_at: str = "logits"

    @classmethod
    def paper(cls) -> Config:
        """CLIP ViT-B/16 at 480 px: the setting of the ablations (Tables 2-5)."""
        return cls()

    @classmethod
    def paper_vit_l(cls) -> Config:
        """Table 1's CLIP ViT-L/14 row at 532 px."""
        return cls(**VIT_L14, image_size=532)  # §4.2 "532×532 for ViT-Large"

    @classmethod
    def tiny(cls) -> Config:
        """The demo: the repository's tiny CLIP pretrained on the synthetic world, at 64 px, and
        every choice made to make it learn on a CPU (docs/cm_masksd.md, one heading each)."""
        return cls(
            image_size=64,
            max_tokens=17,
            vocab_size=57,  # the synthetic world's word-level CLIP tokenizer; train.py sets it
            pretrained=True,
            vision_name="pretrained/tiny-clip",
            text_name="pretrained/tiny-clip",
            vision_config=dict(TINY_VISION),
            text_config=dict(TINY_TEXT),
            projection_dim=64,
            vision_taps=(3, 7),  # a third and two thirds of 10 layers (ViT-B/16: 4 and 8 of 12)
            neck_dims=(16, 32, 64),  # d = 32: the heads run three times per step on a CPU
            decoder_layers=1,  # CRIS: 3
            decoder_heads=2,  # CRIS: 8
            decoder_ffn=64,  # CRIS: 2048
            dropout=0.0,  # CRIS: 0.1
            mask_prior=0.03,  # the shapes' foreground share
            correlation="cosine",  # Eq. 3 / 6 as CLIP compares (the paper: dot product)
            mask_count="stochastic",  # E[n_mask] = α·T on 2-9 word sentences
            seg_loss_at="gt",  # a GT shrunk to 32 x 32 logits loses the small shapes' outline
        )


# ---------------------------------------------------------------------------------------------
# §3.2 LMVSD (Eq. 3-4) and VMLSD (Eq. 6-7): correlation filtering and random masking. The masked
# branches themselves (Eq. 5 / 8) are CMMaskSD.lmvsd_branch / vmlsd_branch.


@torch.no_grad()
def correlation(query: torch.Tensor, tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """Eq. 3 / Eq. 6: query (B, C) · every token (B, N, C) -> (B, N); kind "dot" or "cosine"."""
    query, tokens = query.float(), tokens.float()
    if kind == "cosine":  # drops the token norms from the ranking (the query's: one per sample)
        query, tokens = F.normalize(query, dim=-1), F.normalize(tokens, dim=-1)
    return torch.einsum("bc,bnc->bn", query, tokens)


def highest(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, N) bool, True on the k[b] highest scores of row b (k: (B,) long)."""
    order = scores.argsort(dim=1, descending=True)  # (B, N) token indices, best first
    place = torch.arange(scores.shape[1], device=scores.device).expand_as(order)  # 0, 1, 2, ...
    # The token at place j of the order is chosen when j < k.
    return torch.zeros_like(scores, dtype=torch.bool).scatter(1, order, place < k[:, None])


class Choice(NamedTuple):
    top_T: torch.Tensor  # (B, N) bool: the T most correlated tokens (correlation filtering)
    masked: torch.Tensor  # (B, N) bool: the α·T of them replaced by the mask token


@torch.no_grad()
def choose_tokens(scores: torch.Tensor, valid: torch.Tensor, top_k: float, alpha: float,
                  count: str, at_least_one: bool) -> Choice:  # fmt: skip
    """Correlation filtering and random masking (Eq. 3-4 / 6-7), per sample.

    scores (B, N) correlations, valid (B, N) the tokens that may be chosen. T = ⌊TopK·n + ½⌋ of
    the n valid tokens with the highest score form the top-T; n_mask of them, a uniformly random
    subset, are masked. count "nearest": n_mask = ⌊α·T + ½⌋, at least one when T > 0 and α > 0
    (a branch that masks nothing distils nothing: BCE(x, σ(x)) has zero gradient in x).
    count "stochastic": n_mask = ⌊α·T + u⌋, u ~ U[0, 1), so E[n_mask] = α·T; with at_least_one,
    if no sample of the batch masks anything, the sample with the largest draw masks one token.
    """
    n = valid.sum(1)  # (B,)
    T = torch.floor(top_k * n + 0.5).long()  # (B,) ⌊TopK·n + ½⌋
    top_T = highest(scores.float().masked_fill(~valid, float("-inf")), T)  # Eq. 3 / 6
    if count == "nearest":
        n_mask = torch.floor(alpha * T + 0.5).long()  # (B,) ⌊α·T + ½⌋
        n_mask = torch.where((T > 0) & (alpha > 0), n_mask.clamp(min=1), n_mask)
    else:
        draw = alpha * T + torch.rand(T.shape, device=T.device)  # (B,) α·T + u
        n_mask = torch.floor(draw).long()  # (B,) E[n_mask] = α·T
        if at_least_one:
            first = F.one_hot(draw.masked_fill(T == 0, -1.0).argmax(), len(T)).bool() & (T > 0)
            n_mask = torch.where(first & (n_mask.sum() == 0), 1, n_mask)
    # A uniformly random subset of size n_mask of the top-T: the n_mask highest random keys.
    keys = torch.rand(scores.shape, device=scores.device).masked_fill(~top_T, -1.0)
    return Choice(top_T, highest(keys, n_mask))  # Eq. 4 / 7


@torch.no_grad()
def lmvsd_choice(w_global, V_local, cfg: Config) -> tuple[torch.Tensor, Choice]:
    """Eq. 3-4: p_i = w_global · v_i over the N patches (B, N), the top-T, α·T of them masked."""
    p = correlation(w_global, V_local, cfg.correlation)  # Eq. 3, (B, N)
    scores = torch.rand_like(p) if "random_mask" in cfg.ablate else p
    valid = torch.ones_like(p, dtype=torch.bool)
    return p, choose_tokens(
        scores, valid, cfg.lmvsd_topk, cfg.lmvsd_alpha, cfg.mask_count, at_least_one=False
    )


def word_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool, True on the real words: not [SOS] (position 0), not [EOS], not padding.

    [EOS] is the largest id in CLIP's vocabulary and argmax returns its first occurrence, which
    matters because CLIP's tokenizer pads with [EOS] as well.
    """
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
    eos = input_ids.argmax(dim=-1, keepdim=True)  # (B, 1)
    return attention_mask.bool() & (pos != 0) & (pos != eos)


@torch.no_grad()
def vmlsd_choice(v_global, W_local, text_projection: nn.Module, words, cfg: Config) -> Choice:
    """Eq. 6-7: q_i = v_global · w_i over the real words (B, L), the top-T, α·T of them masked.
    The words are text-projected into CLIP's joint space, where v_global lives."""
    q = correlation(v_global, text_projection(W_local), cfg.correlation)  # Eq. 6, (B, L)
    scores = torch.rand_like(q) if "random_mask" in cfg.ablate else q
    return choose_tokens(
        scores, words, cfg.vmlsd_topk, cfg.vmlsd_alpha, cfg.mask_count, at_least_one=True
    )


# ---------------------------------------------------------------------------------------------
# §3.3 Network optimization (Eq. 9)


def seg_loss(M_seg: torch.Tensor, masks: torch.Tensor, at: str) -> torch.Tensor:
    """Loss_seg = BCE(M_seg, GT). M_seg (B, 1, h, w) logits, masks (B, H, W) in {0, 1}."""
    if at == "gt":  # M_seg upsampled (bilinear) to the GT
        return common.bce_loss(common.upsample_to(M_seg, masks), masks)
    return common.bce_loss(M_seg, masks)  # CRIS: the GT resized (nearest) to M_seg's size


def distillation_loss(M_masked: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Loss_LMVSD / Loss_VMLSD = BCE(M_masked, M_seg); teacher = sigmoid(M_seg) without gradient,
    a soft target (B, 1, h, w) at the logits' own size."""
    return common.bce_loss(M_masked, teacher)


# ---------------------------------------------------------------------------------------------
# Plumbing: CRIS's neck, decoder and projector (Eq. 2), then the one CLIP that holds both
# encoders (Eq. 1)


def tokens_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h*w, C) -> (B, C, h, w)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def conv_layer(c_in: int, c_out: int, k: int) -> nn.Sequential:
    """CRIS `conv_layer`: k x k convolution (same padding, no bias) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class CoordConv(nn.Module):
    """CRIS CoordConv: concatenate normalised (x, y) in [-1, 1], then conv_layer 3x3."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = conv_layer(c_in + 2, c_out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
        y, x_ = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
        coord = torch.stack([x_, y]).expand(B, 2, h, w)  # x first, as CRIS
        return self.conv(torch.cat([x, coord], dim=1))  # (B, c_out, h, w)


class Neck(nn.Module):
    """F = Neck(V_local, w_global) (Eq. 2): CRIS's FPN on three ViT taps of equal stride.

    v3, v4 are intermediate ViT layers (C_v), v5 = V_local (P). The sentence enters once, as an
    element-wise product with the projected top tap (CRIS: f5 = BN-ReLU(f5 ⊙ state)); the three
    levels are then fused and given coordinates.
    """

    def __init__(self, C_v: int, P: int, dims: tuple[int, int, int]):
        super().__init__()
        c3, c4, c5 = dims
        self.txt_proj = nn.Sequential(nn.Linear(P, c5, bias=False), nn.BatchNorm1d(c5), nn.ReLU())
        self.f5_proj = conv_layer(P, c5, 1)
        self.f5_norm = nn.Sequential(nn.BatchNorm2d(c5), nn.ReLU())
        self.f4_proj = conv_layer(C_v, c4, 3)
        self.f4_cat = conv_layer(c5 + c4, c4, 1)
        self.f3_proj = conv_layer(C_v, c3, 3)
        self.f3_cat = conv_layer(c3 + c4, c4, 1)
        self.fq5 = conv_layer(c5, c4, 3)
        self.fq4 = conv_layer(c4, c4, 3)
        self.fq3 = conv_layer(c4, c4, 3)
        self.aggregate = conv_layer(3 * c4, c4, 1)
        self.coordconv = nn.Sequential(CoordConv(c4, c4), conv_layer(c4, c4, 3))

    def forward(self, v3, v4, v5, w_global) -> torch.Tensor:
        state = self.txt_proj(w_global)[:, :, None, None]  # (B, c5, 1, 1)
        f5 = self.f5_norm(self.f5_proj(v5) * state)  # (B, c5, h, w): vision ⊙ sentence
        # CRIS up-samples f5 and average-pools f3 here; ViT taps already share one stride.
        f4 = self.f4_cat(torch.cat([self.f4_proj(v4), f5], dim=1))  # (B, c4, h, w)
        f3 = self.f3_cat(torch.cat([self.f3_proj(v3), f4], dim=1))  # (B, c4, h, w)
        fq = torch.cat([self.fq3(f3), self.fq4(f4), self.fq5(f5)], dim=1)  # (B, 3*c4, h, w)
        return self.coordconv(self.aggregate(fq))  # (B, c4, h, w)


def sine_position_1d(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """Transformer sine/cosine positions (length, dim): even channels sin, odd channels cos."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]  # (length, 1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device) * (-np.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2], pe[:, 1::2] = (pos * freq).sin(), (pos * freq).cos()
    return pe


def sine_position_2d(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """CRIS `pos2d` as (h*w, dim): the first half of the channels encodes x, the second half y."""
    x = sine_position_1d(w, dim // 2, device)[None].expand(h, w, dim // 2)
    y = sine_position_1d(h, dim // 2, device)[:, None].expand(h, w, dim // 2)
    return torch.cat([x, y], dim=-1).flatten(0, 1)  # (h*w, dim), row-major like vis.flatten(2)


class DecoderLayer(nn.Module):
    """CRIS decoder layer: pre-norm self-attention and cross-attention to the words, each
    followed by an extra LayerNorm, and an FFN with a LayerNorm inside. Sine positions go to
    queries and keys only."""

    def __init__(self, d: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.self_attn_norm = nn.LayerNorm(d)
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.cross_attn_norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(
            nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(dropout), nn.LayerNorm(ffn), nn.Linear(ffn, d)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, vis, words, vis_pos, word_pos, pad_mask) -> torch.Tensor:
        # vis (B, h*w, d), words (B, L, d), vis_pos (h*w, d), word_pos (L, d), pad_mask (B, L)
        x = self.norm1(vis)
        x = self.self_attn(x + vis_pos, x + vis_pos, x, need_weights=False)[0]  # (B, h*w, d)
        vis = vis + self.dropout(self.self_attn_norm(x))
        x = self.norm2(vis)
        x = self.cross_attn(
            x + vis_pos, words + word_pos, words, key_padding_mask=pad_mask, need_weights=False
        )[0]  # (B, h*w, d): every pixel attends to the words
        vis = vis + self.dropout(self.cross_attn_norm(x))
        return vis + self.dropout(self.ffn(self.norm3(vis)))


class VisionLanguageDecoder(nn.Module):
    """Decoder(F, W_local) (Eq. 2): CRIS's transformer decoder, a final LayerNorm on top."""

    def __init__(self, d: int, layers: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d, heads, ffn, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, F_vl, words, pad_mask) -> torch.Tensor:
        B, d, h, w = F_vl.shape
        vis = F_vl.flatten(2).transpose(1, 2)  # (B, d, h, w) -> (B, h*w, d)
        vis_pos = sine_position_2d(h, w, d, vis.device).to(vis.dtype)  # (h*w, d)
        word_pos = sine_position_1d(words.shape[1], d, vis.device).to(vis.dtype)  # (L, d)
        for layer in self.layers:
            vis = layer(vis, words, vis_pos, word_pos, pad_mask)
        return tokens_to_map(self.norm(vis), h, w)  # (B, d, h, w)


class Projector(nn.Module):
    """CRIS projector: up-sample the decoder map 4x, then a per-sample 3x3 kernel (and bias)
    generated from the sentence feature turns it into mask logits (a dynamic convolution)."""

    def __init__(self, P: int, d: int, prior: float | None, kernel_size: int = 3):
        super().__init__()
        c = d // 2
        self.kernel_size = kernel_size
        self.vis = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear"),
            conv_layer(d, d, 3),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            conv_layer(d, c, 3),
            nn.Conv2d(c, c, 1),
        )
        self.txt = nn.Linear(P, c * kernel_size * kernel_size + 1)  # kernel weights + bias
        if prior is not None:  # calibrated start: every logit begins near log(p / (1 - p))
            with torch.no_grad():
                self.txt.weight[:-1] *= 0.1  # small kernels: the logits' spread starts small
                self.txt.weight[-1].zero_()
                self.txt.bias[-1] = float(np.log(prior / (1 - prior)))

    def forward(self, x: torch.Tensor, w_global: torch.Tensor) -> torch.Tensor:
        x = self.vis(x)  # (B, c, 4h, 4w)
        B, c, H, W = x.shape
        params = self.txt(w_global)  # (B, c*k*k + 1)
        weight = params[:, :-1].reshape(B, c, self.kernel_size, self.kernel_size)
        # One group per sample: (1, B*c, H, W) * B kernels (c, k, k) -> (1, B, H, W)
        out = F.conv2d(
            x.reshape(1, B * c, H, W),
            weight,
            params[:, -1],
            padding=self.kernel_size // 2,
            groups=B,
        )
        return out.transpose(0, 1)  # (B, 1, 4h, 4w)


class Segmenter(nn.Module):
    """Eq. 2 (and the last two lines of Eq. 5 / 8): F = Neck(V_local, w_global), then
    M = Decoder(F, W_local) and CRIS's projector. One instance is shared by the three branches;
    `no_sharing` (Table 5) gives each masked branch its own."""

    def __init__(self, cfg: Config, C_v: int, C_t: int, P: int):
        super().__init__()
        d = cfg.neck_dims[1]
        self.neck = Neck(C_v, P, cfg.neck_dims)
        # Decoder words are W_local (CLIP's final LN, no projection, as CRIS); a Linear maps them
        # to d only when C_t differs from d (identity for ViT-B/16, whose text width is 512).
        self.word_proj = nn.Linear(C_t, d) if C_t != d else nn.Identity()
        self.decoder = VisionLanguageDecoder(
            d, cfg.decoder_layers, cfg.decoder_heads, cfg.decoder_ffn, cfg.dropout
        )
        self.projector = Projector(P, d, cfg.mask_prior)

    def forward(self, vis: VisualFeatures, txt: TextFeatures, pad_mask) -> torch.Tensor:
        h, w = vis.grid
        v5 = tokens_to_map(vis.V_local, h, w)  # (B, P, h, w)
        F_vl = self.neck(vis.v3, vis.v4, v5, txt.w_global)  # F = Neck(V_local, w_global)
        F_vl = self.decoder(F_vl, self.word_proj(txt.W_local), pad_mask)  # (B, d, h, w)
        return self.projector(F_vl, txt.w_global)  # M (B, 1, 4h, 4w)


# Copied from rela.from_pretrained
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


def load_clip(cfg: Config) -> CLIPModel:
    """One CLIP for both towers: from the Hub / a folder, or random weights from the configs."""
    if cfg.vision_name != cfg.text_name:
        raise ValueError(
            "cm_masksd: Eq. 3 / 6 compare the two towers in CLIP's joint space, so the image and "
            f"text encoders must come from one CLIP (got '{cfg.vision_name}', '{cfg.text_name}')"
        )
    if cfg.pretrained:
        return from_pretrained(CLIPModel, cfg.vision_name)
    V = cfg.vocab_size  # CLIP convention unless the config says otherwise: [SOS] V-2, [EOS] V-1
    specials = dict(bos_token_id=V - 2, eos_token_id=V - 1, pad_token_id=V - 1)
    text_config = {**specials, **cfg.text_config, "vocab_size": V}
    return CLIPModel(
        CLIPConfig(
            vision_config=cfg.vision_config,
            text_config=text_config,
            projection_dim=cfg.projection_dim,
        )
    )


class VisualFeatures(NamedTuple):
    v3: torch.Tensor  # ViT layer cfg.vision_taps[0], (B, C_v, h, w): CRIS's C3 slot
    v4: torch.Tensor  # ViT layer cfg.vision_taps[1], (B, C_v, h, w): CRIS's C4 slot
    V_local: torch.Tensor  # (B, N, P): the last layer, CRIS's C5 slot (v5)
    v_global: torch.Tensor  # (B, P)
    grid: tuple[int, int]  # (h, w)


class TextFeatures(NamedTuple):
    W_local: torch.Tensor  # (B, L, C_t)
    w_global: torch.Tensor  # (B, P)


# ---------------------------------------------------------------------------------------------
# The model: the main branch (Eq. 1-2), LMVSD (Eq. 5) and VMLSD (Eq. 8), the loss (Eq. 9)


class CMMaskSD(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        # Both towers and both projections, inside the PreTrainedModel: train.py gives all of
        # them the encoder learning rate. CLIP's logit_scale (contrastive temperature) is unused.
        self.clip = load_clip(cfg)
        self.clip.logit_scale.requires_grad_(False)
        C_v, C_t = self.vision.config.hidden_size, self.text.config.hidden_size
        P = self.visual_projection.out_features
        num_layers = self.vision.config.num_hidden_layers
        for layer in cfg.vision_taps:
            if not 1 <= layer < num_layers:
                raise ValueError(f"vision tap {layer} outside the ViT's layers 1..{num_layers - 1}")
        self.patch_size = self.vision.config.patch_size

        self.use_lmvsd = "no_lmvsd" not in cfg.ablate
        self.use_vmlsd = "no_vmlsd" not in cfg.ablate
        self.segmenter = Segmenter(cfg, C_v, C_t, P)  # main branch (and shared masked branches)
        unshared = "no_sharing" in cfg.ablate
        self.lmvsd_segmenter = Segmenter(cfg, C_v, C_t, P) if unshared and self.use_lmvsd else None
        self.vmlsd_segmenter = Segmenter(cfg, C_v, C_t, P) if unshared and self.use_vmlsd else None

        # Eq. 4 / Eq. 7: one learnable mask token per masked branch ("randomly initialized").
        if self.use_lmvsd:
            self.patch_mask_token = nn.Parameter(0.02 * torch.randn(C_v))  # v'
        if self.use_vmlsd:
            self.word_mask_token = nn.Parameter(0.02 * torch.randn(C_t))  # w'
        # The embedding hooks stay registered; they act only while lmvsd_branch / vmlsd_branch
        # has set a mask, so the main branch and torch.compile see one fixed set of hooks.
        self._patch_mask: torch.Tensor | None = None
        self._word_mask: torch.Tensor | None = None
        self.vision.embeddings.patch_embedding.register_forward_hook(self._mask_patches)
        self.text.embeddings.token_embedding.register_forward_hook(self._mask_words)

    # The parts of the CLIPModel, by the names the paper's figure uses.
    @property
    def vision(self) -> nn.Module:
        return self.clip.vision_model

    @property
    def text(self) -> nn.Module:
        return self.clip.text_model

    @property
    def visual_projection(self) -> nn.Linear:
        return self.clip.visual_projection

    @property
    def text_projection(self) -> nn.Linear:
        return self.clip.text_projection

    # --- §3.1, Eq. 1: the two CLIP encoders ---------------------------------------------------

    def encode_image(self, images: torch.Tensor) -> VisualFeatures:
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        # interpolate_pos_encoding: CLIP's position table is resized to the input's grid (and
        # left unchanged when the sizes already match).
        out = self.vision(
            pixel_values=images, output_hidden_states=True, interpolate_pos_encoding=True
        )
        # hidden_states[i] = output of layer i (1-based; [0] = the embeddings), (B, 1+N, C_v)
        # with the class token first.
        v3, v4 = (tokens_to_map(out.hidden_states[i][:, 1:], h, w) for i in self.cfg.vision_taps)
        tokens = self.visual_projection(self.vision.post_layernorm(out.last_hidden_state))
        return VisualFeatures(v3, v4, tokens[:, 1:], tokens[:, 0], (h, w))  # (B, N, P), (B, P)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        out = self.text(input_ids=input_ids, attention_mask=attention_mask)
        # last_hidden_state is after CLIP's final LayerNorm; pooler_output is its [EOS] state.
        return TextFeatures(out.last_hidden_state, self.text_projection(out.pooler_output))

    def forward(self, images, input_ids, attention_mask, targets=None) -> dict:
        cfg = self.cfg
        pad_mask = attention_mask == 0  # (B, L) True = ignore (CLIP pads with [EOS])
        vis = self.encode_image(images)  # Eq. 1
        txt = self.encode_text(input_ids, attention_mask)
        M_seg = self.segmenter(vis, txt, pad_mask)  # Eq. 2, (B, 1, 4h, 4w)
        out = {"mask_logits": M_seg}
        if targets is None:  # inference: the main branch only
            return out

        losses = {"seg": seg_loss(M_seg, targets["masks"], cfg.seg_loss_at)}  # Loss_seg
        teacher = M_seg.detach().sigmoid()  # the main branch's own prediction, no gradient
        if self.use_lmvsd:
            p, choice = lmvsd_choice(txt.w_global, vis.V_local, cfg)  # Eq. 3-4
            out["lmvsd_p"] = p.view(-1, *vis.grid)  # (B, h, w), for samples.png
            out["lmvsd_top_T"] = choice.top_T.view(-1, *vis.grid)  # (B, h, w), diagnostics
            out["lmvsd_mask"] = choice.masked.view(-1, *vis.grid)
            if self.training:  # the masked branches train; eval only reports their choices
                M_lmvsd = self.lmvsd_branch(images, choice.masked, txt, pad_mask)  # Eq. 5
                losses["lmvsd"] = distillation_loss(M_lmvsd, teacher)  # Loss_LMVSD
            else:  # a control for diagnostics: Eq. 3 with another sample's sentence
                p_other = correlation(txt.w_global.roll(1, dims=0), vis.V_local, cfg.correlation)
                top_other = highest(p_other, choice.top_T.sum(1))  # (B, N)
                out["lmvsd_p_other_text"] = p_other.view(-1, *vis.grid)
                out["lmvsd_top_T_other_text"] = top_other.view(-1, *vis.grid)
        if self.use_vmlsd:
            words = word_positions(input_ids, attention_mask)
            choice = vmlsd_choice(vis.v_global, txt.W_local, self.text_projection, words, cfg)
            out["vmlsd_words"], out["vmlsd_top_T"] = words, choice.top_T  # (B, L) each
            out["vmlsd_mask"] = choice.masked
            out["vmlsd_masked_ids"] = input_ids.masked_fill(~choice.masked, -1)  # samples.png
            if self.training:
                M_vmlsd = self.vmlsd_branch(vis, input_ids, attention_mask, choice.masked)  # Eq. 8
                losses["vmlsd"] = distillation_loss(M_vmlsd, teacher)  # Loss_VMLSD
        weights = {"seg": 1.0, "lmvsd": cfg.lmvsd_weight, "vmlsd": cfg.vmlsd_weight}
        out["losses"] = losses
        out["loss"] = sum(weights[k] * v for k, v in losses.items())  # Eq. 9: Loss_total
        return out

    # --- §3.2, Eq. 5: the LMVSD branch, and Eq. 4's v' inside the image encoder ---------------

    def lmvsd_branch(self, images, patch_mask, txt: TextFeatures, pad_mask) -> torch.Tensor:
        """Eq. 5: V'_local = CLIP image encoder(V_masked), F_LMVSD = Neck(V'_local, w_global),
        M_LMVSD = Decoder(F_LMVSD, W_local)."""
        self._patch_mask = patch_mask  # read by _mask_patches inside the image encoder
        try:
            vis_masked = self.encode_image(images)
        finally:
            self._patch_mask = None
        segmenter = self.segmenter if self.lmvsd_segmenter is None else self.lmvsd_segmenter
        return segmenter(vis_masked, txt, pad_mask)  # M_LMVSD

    def _mask_patches(self, conv, inputs, E_I: torch.Tensor) -> torch.Tensor:
        """Forward hook on CLIP's patch-embedding conv: Eq. 4, V_masked. E_I (B, C_v, h, w) is
        the conv output, before the class token and the position embedding are added."""
        if self._patch_mask is None:  # the main branch
            return E_I
        where = self._patch_mask.view(E_I.shape[0], 1, *E_I.shape[2:])  # (B, 1, h, w)
        return torch.where(where, self.patch_mask_token.view(1, -1, 1, 1).to(E_I.dtype), E_I)

    # --- §3.2, Eq. 8: the VMLSD branch, and Eq. 7's w' inside the text encoder ----------------

    def vmlsd_branch(self, vis: VisualFeatures, input_ids, attention_mask, word_mask):
        """Eq. 8 (as the prose reads it): W'_local, w'_global = CLIP text encoder(W_masked),
        F_VMLSD = Neck(V_local, w'_global), M_VMLSD = Decoder(F_VMLSD, W'_local)."""
        self._word_mask = word_mask  # read by _mask_words inside the text encoder
        try:
            txt_masked = self.encode_text(input_ids, attention_mask)
        finally:
            self._word_mask = None
        segmenter = self.segmenter if self.vmlsd_segmenter is None else self.vmlsd_segmenter
        return segmenter(vis, txt_masked, attention_mask == 0)  # M_VMLSD

    def _mask_words(self, embedding, inputs, E_T: torch.Tensor) -> torch.Tensor:
        """Forward hook on CLIP's token embedding: Eq. 7, W_masked. E_T (B, L, C_t), before the
        position embedding is added."""
        if self._word_mask is None:  # the main branch
            return E_T
        return torch.where(self._word_mask[..., None], self.word_mask_token.to(E_T.dtype), E_T)


CHOICES = {
    "correlation": ("dot", "cosine"),
    "mask_count": ("nearest", "stochastic"),
    "seg_loss_at": ("logits", "gt"),
}


def build_model(cfg: Config) -> nn.Module:
    for name in cfg.ablate:
        if name not in ABLATIONS:
            raise ValueError(
                f"unknown ablation '{name}' for cm_masksd; choose from {sorted(ABLATIONS)}"
            )
    for name in ("lmvsd_alpha", "lmvsd_topk", "vmlsd_alpha", "vmlsd_topk"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"cm_masksd: {name} must lie in [0, 1], got {getattr(cfg, name)}")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(
                f"cm_masksd: {name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}"
            )
    if cfg.mask_prior is not None and not 0 < cfg.mask_prior < 1:
        raise ValueError(f"cm_masksd: mask_prior must lie in (0, 1), got {cfg.mask_prior}")
    return CMMaskSD(cfg)


# ---------------------------------------------------------------------------------------------
# Measuring the mechanism (train.py calls these on eval batches)

# CLIP's image mean / std (data.py normalises CLIP-family images with them).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OBJECT_CHROMA = 0.2  # max - min of RGB in [0, 1]: the world's backgrounds <= 0.1, shapes >= 0.37


def object_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) CLIP-normalised images -> (B, H, W) float, 1 on saturated pixels: the union of
    all objects in the built-in world, which paints saturated shapes on a grey-ish background
    (data._render). On photographs this is not an object mask."""
    mean = images.new_tensor(CLIP_MEAN)[:, None, None]
    std = images.new_tensor(CLIP_STD)[:, None, None]
    rgb = images.float() * std + mean  # (B, 3, H, W) in [0, 1]
    return (rgb.amax(1) - rgb.amin(1) > OBJECT_CHROMA).float()


def referent_auc(scores: torch.Tensor, referent: torch.Tensor, others: torch.Tensor):
    """(B,) weighted AUC: the chance that a referent patch outranks another object's patch.

    scores (B, N) the ranking (Eq. 3); referent, others (B, N) each patch's share of the referent
    and of the other objects, the weights of the two sides. 0.5 = the ranking does not tell the
    referent from the other objects; 1 = every referent patch first."""
    order = scores.argsort(dim=1)  # (B, N) ascending
    t, u = referent.gather(1, order), others.gather(1, order)
    below = u.cumsum(1) - 0.5 * u  # other-object mass ranked below each patch (itself: half)
    return (t * below).sum(1) / (t.sum(1) * u.sum(1)).clamp_min(1e-12)


def diagnostics(outputs: dict, batch: dict) -> dict[str, float]:
    """Does correlation filtering find the referred object? (eval forward with targets)

    lmvsd_target_in_top_T: share of the target's area whose patches are in LMVSD's top-T (each
      patch weighted by the share of its pixels on the target); chance = TopK (0.5).
    lmvsd_target_masked: the same share for the α·T masked patches; chance = α·TopK (0.125).
    lmvsd_target_in_top_T_other_text: the top-T ranked by ANOTHER sample's sentence: what a
      text-blind ranking gets; the gap to lmvsd_target_in_top_T is what the sentence adds.
    lmvsd_referent_auc_among_objects (_other_text): among the patches of the scene's objects
      (object_pixels: the built-in world only), the chance that Eq. 3 ranks a referent patch above
      another object's, with the sample's own (another sample's) sentence; chance 0.5. Objects
      cannot fill this cut, so it says "this object", not "objects".
    vmlsd_masked_word_share: masked words / real words; α·TopK (0.05) up to rounding.
    vmlsd_masked_per_top_T: masked words / top-T words; α (0.1) up to rounding.
    """
    nan = float("nan")
    result = {}
    if "lmvsd_top_T" in outputs:
        top_T, masked = outputs["lmvsd_top_T"], outputs["lmvsd_mask"]  # (B, h, w) bool
        grid = top_T.shape[-2:]
        gt = batch["mask"][:, None].float()  # (B, 1, H, W)
        on_target = F.adaptive_avg_pool2d(gt, grid)[:, 0]  # (B, h, w) in [0, 1]
        area = on_target.flatten(1).sum(1)  # (B,)
        has = area > 0  # no-target samples have nothing to find
        shares = [("in_top_T", top_T), ("masked", masked)]
        if "lmvsd_top_T_other_text" in outputs:
            shares.append(("in_top_T_other_text", outputs["lmvsd_top_T_other_text"]))
        for name, chosen in shares:
            share = (on_target * chosen).flatten(1).sum(1) / area.clamp_min(1e-6)
            result[f"lmvsd_target_{name}"] = share[has].mean().item() if has.any() else nan
        if "lmvsd_p_other_text" in outputs and "image" in batch:
            objects = object_pixels(batch["image"])[:, None]  # (B, 1, H, W)
            on_object = F.adaptive_avg_pool2d(objects, grid)[:, 0]  # (B, h, w)
            others = (on_object - on_target).clamp_min(0).flatten(1)  # (B, N)
            ok = has & (others.sum(1) > 0)
            for name, key in (("", "lmvsd_p"), ("_other_text", "lmvsd_p_other_text")):
                auc = referent_auc(outputs[key].flatten(1).float(), on_target.flatten(1), others)
                result[f"lmvsd_referent_auc_among_objects{name}"] = (
                    auc[ok].mean().item() if ok.any() else nan
                )
    if "vmlsd_mask" in outputs:
        masked = outputs["vmlsd_mask"].sum().item()
        words, top = outputs["vmlsd_words"].sum().item(), outputs["vmlsd_top_T"].sum().item()
        result["vmlsd_masked_word_share"] = masked / words if words else nan
        result["vmlsd_masked_per_top_T"] = masked / top if top else nan
    return result


def sample_extra(outputs: dict, i: int, tokenizer) -> list[tuple]:
    """Panels for samples.png: Eq. 3's correlation p over the patch grid, and LMVSD's choice
    (1 = top-T, 2 = masked by v'), with the word VMLSD masked in the caption."""
    if "lmvsd_p" not in outputs:
        return [(None, "LMVSD off")]
    p = outputs["lmvsd_p"][i].float().cpu().numpy()  # (h, w)
    choice = outputs["lmvsd_top_T"][i].long() + outputs["lmvsd_mask"][i].long()  # 0 / 1 / 2
    caption = f"top-T (1), masked (2): {int(outputs['lmvsd_mask'][i].sum())} patches"
    if "vmlsd_masked_ids" in outputs and tokenizer is not None:
        ids = [int(t) for t in outputs["vmlsd_masked_ids"][i].tolist() if t >= 0]
        caption += "; VMLSD masks " + (" ".join(tokenizer.convert_ids_to_tokens(ids)) or "none")
    return [
        (p, "p = w_global · v_i (Eq. 3), own scale"),  # the ranking is what matters
        (choice.cpu().numpy(), caption, (0, 2)),
    ]


# =============================================================================================
# The paper's tables and recipe (train.py --row "Table 5 2", --recipe paper)

# Table 1's second row: CLIP ViT-L/14 (Config overrides; `Config.paper_vit_l()` adds its 532 px).
VIT_L14 = dict(
    vision_name="openai/clip-vit-large-patch14",
    text_name="openai/clip-vit-large-patch14",
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, patch_size=14, image_size=224),
    text_config=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                     num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                     eos_token_id=2),
    projection_dim=768,
    vision_taps=(8, 16),  # a third and two thirds of 24 layers, as 4 and 8 of ViT-B/16's 12
)  # fmt: skip

_L, _V, _U = "no_lmvsd", "no_vmlsd", "no_sharing"


def _p(pr5: float, pr7: float, pr9: float, iou: float) -> dict[str, float]:
    """The paper's Pr@0.5, Pr@0.7, Pr@0.9 and IoU columns."""
    return {"Prec@0.5": pr5, "Prec@0.7": pr7, "Prec@0.9": pr9, "mIoU": iou}


def _t3(name: str, value: float, *numbers: float) -> dict:
    """A Table 3 row: LMVSD alone, unshared, one hyper-parameter moved."""
    return {"ablate": (_V, _U), "set": {name: value}, "paper": _p(*numbers)}


def _t4(name: str, value: float, *numbers: float) -> dict:
    """A Table 4 row: VMLSD alone, unshared, one hyper-parameter moved."""
    return {"ablate": (_L, _U), "set": {name: value}, "paper": _p(*numbers)}


# RefCOCO val, CLIP ViT-B/16, numbers in %. The paper's "IoU" is CRIS's: the mean of the
# per-expression IoUs (mIoU here; CRIS engine.py); CRIS counts Pr@X as IoU > X. One build carries
# one paper number: Tables 2-4's single-branch rows were measured WITHOUT weight sharing (their
# numbers are Table 5's unshared rows), so they add no_sharing, and each sweep's default row is
# the same build, with the same number, as Table 2's row. Tables 2-5 ran at 480 px (= paper());
# Table 1's rows carry their 576 / 532 px as "recipe".
TABLES: dict[str, dict[str, dict]] = {
    "Table 1": {  # main results, IoU; the paper's only numbers for the full model at full size
        "ViT-B CLIP ViT-B/16 at 576 px": {
            "recipe": {"image_size": 576}, "paper": {"mIoU": 72.18},  # RefCOCO val
            "note": "RefCOCO val/testA/testB 72.18/75.21/67.91, RefCOCO+ 64.47/69.29/56.55, "
            "G-Ref val/test 62.67/62.69", "baseline": True},
        "ViT-L CLIP ViT-L/14 at 532 px": {
            "set": dict(VIT_L14), "recipe": {"image_size": 532},
            "paper": {"mIoU": 74.89},  # RefCOCO val
            "note": "RefCOCO 74.89/77.54/71.28, RefCOCO+ 67.47/71.80/59.91, G-Ref 66.53/66.63"},
    },
    "Table 2": {  # design of masked self-distillation manner
        "baseline no masked branch": {
            "ablate": (_L, _V), "paper": _p(82.73, 70.82, 17.99, 70.45), "baseline": True},
        "+LMVSD LMVSD only (unshared, = Table 5)": {
            "ablate": (_V, _U), "paper": _p(83.90, 73.54, 20.08, 71.45)},
        "+VMLSD VMLSD only (unshared, = Table 5)": {
            "ablate": (_L, _U), "paper": _p(83.09, 71.77, 18.64, 70.98)},
        "+both LMVSD and VMLSD (shared, the full model)": {
            "ablate": (), "paper": _p(83.29, 73.15, 21.45, 71.68)},
    },
    "Table 3": {  # LMVSD alone, unshared; base α 0.25, TopK 0.5, λ1 0.75
        "(a)lambda1=0.1": _t3("lmvsd_weight", 0.1, 83.20, 71.88, 19.40, 70.93),
        "(a)lambda1=0.25": _t3("lmvsd_weight", 0.25, 83.73, 73.03, 19.74, 71.36),
        "(a)lambda1=0.5": _t3("lmvsd_weight", 0.5, 83.51, 72.61, 19.13, 71.17),
        "(a)lambda1=0.75": {**_t3("lmvsd_weight", 0.75, 83.90, 73.54, 20.08, 71.45),
                            "baseline": True},
        "(a)lambda1=1.0": _t3("lmvsd_weight", 1.0, 82.63, 72.53, 20.79, 70.72),
        "(b)alpha=0.1": _t3("lmvsd_alpha", 0.1, 83.18, 73.39, 19.83, 71.12),
        "(b)alpha=0.25": _t3("lmvsd_alpha", 0.25, 83.90, 73.54, 20.08, 71.45),
        "(b)alpha=0.5": _t3("lmvsd_alpha", 0.5, 83.37, 73.34, 20.27, 71.24),
        "(b)alpha=0.75": _t3("lmvsd_alpha", 0.75, 82.78, 72.64, 20.00, 70.79),
        "(c)TopK=0.25": _t3("lmvsd_topk", 0.25, 83.21, 73.41, 20.61, 71.09),
        "(c)TopK=0.5": _t3("lmvsd_topk", 0.5, 83.90, 73.54, 20.08, 71.45),
        "(c)TopK=0.75": _t3("lmvsd_topk", 0.75, 82.88, 73.13, 19.68, 70.93),
        "(c)TopK=1.0": _t3("lmvsd_topk", 1.0, 83.08, 73.13, 20.77, 71.01),
    },
    "Table 4": {  # VMLSD alone, unshared; base α 0.1, TopK 0.5, λ2 0.1
        "(a)lambda2=0.05": _t4("vmlsd_weight", 0.05, 82.76, 71.78, 18.73, 70.58),
        "(a)lambda2=0.1": {**_t4("vmlsd_weight", 0.1, 83.09, 71.77, 18.64, 70.98),
                           "baseline": True},
        "(a)lambda2=0.25": _t4("vmlsd_weight", 0.25, 83.02, 71.40, 18.69, 70.41),
        "(a)lambda2=0.5": _t4("vmlsd_weight", 0.5, 82.34, 70.86, 18.52, 70.02),
        "(a)lambda2=0.75": _t4("vmlsd_weight", 0.75, 81.12, 69.92, 18.17, 69.47),
        "(a)lambda2=1.0": _t4("vmlsd_weight", 1.0, 81.07, 70.25, 17.76, 69.28),
        "(b)alpha=0.05": _t4("vmlsd_alpha", 0.05, 83.26, 71.93, 18.52, 70.71),
        "(b)alpha=0.1": _t4("vmlsd_alpha", 0.1, 83.09, 71.77, 18.64, 70.98),
        "(b)alpha=0.25": _t4("vmlsd_alpha", 0.25, 82.72, 71.11, 18.17, 70.43),
        "(b)alpha=0.5": _t4("vmlsd_alpha", 0.5, 82.82, 71.92, 17.97, 70.51),
        "(b)alpha=0.75": _t4("vmlsd_alpha", 0.75, 82.67, 71.31, 18.24, 70.54),
        "(c)TopK=0.25": _t4("vmlsd_topk", 0.25, 83.22, 72.12, 18.18, 70.68),
        "(c)TopK=0.5": _t4("vmlsd_topk", 0.5, 83.09, 71.77, 18.64, 70.98),
        "(c)TopK=0.75": _t4("vmlsd_topk", 0.75, 82.66, 71.09, 18.07, 70.23),
        "(c)TopK=1.0": _t4("vmlsd_topk", 1.0, 82.92, 71.66, 18.32, 70.57),
    },
    "Table 5": {  # sharing the neck and decoder between the main and the masked branches
        "1 baseline": {"ablate": (_L, _V), "paper": _p(82.73, 70.82, 17.99, 70.45),
                       "baseline": True},
        "2 LMVSD, unshared": {"ablate": (_V, _U), "paper": _p(83.90, 73.54, 20.08, 71.45)},
        "3 LMVSD, shared": {"ablate": (_V,), "paper": _p(83.47, 73.02, 18.53, 71.13)},
        "4 VMLSD, unshared": {"ablate": (_L, _U), "paper": _p(83.09, 71.77, 18.64, 70.98)},
        "5 VMLSD, shared": {"ablate": (_L,), "paper": _p(83.29, 71.80, 18.28, 70.88)},
        "6 both, unshared": {"ablate": (_U,), "paper": _p(83.26, 72.24, 19.03, 71.26)},
        "7 both, shared (the full model)": {"ablate": (), "paper": _p(83.29, 73.15, 21.45, 71.68)},
    },
}  # fmt: skip

RECIPE = {
    "optimizer": "adam",  # §4.2 "The Adam optimizer"
    "lr": 1e-5,  # §4.2 "the initial learning rate is set to 0.00001"
    # §4.2 names one lr for the whole model and there is no release; CRIS (the parent) would
    # give CLIP 0.1x of its base lr 1e-4, i.e. this same 1e-5.
    "encoder_lr_factor": 1.0,
    "weight_decay": 5e-4,  # §4.2 "a weight decay of 0.0005" (Adam's L2, not AdamW)
    "schedule": "cosine",  # §4.2 "with a cosine decay schedule"
    "warmup": 10,  # §4.2 "a warm-up strategy for 10 epochs"
    "epochs": 100,  # §4.2 "to train the model for 100 epochs"
    "batch_size": 32,  # §4.2 "32 batch size"
    "grad_clip": 0.0,  # paper silent; CRIS does not clip (max_norm 0)
    "frozen": (),  # §4.2: CLIP is fine-tuned ("initialized by CLIP"); logit_scale is unused
}


if __name__ == "__main__":  # shape smoke run on the tiny preset (random weights, no files)
    cfg = Config.tiny()
    cfg.pretrained = False
    model = build_model(cfg)
    B, L, V = 2, cfg.max_tokens, cfg.vocab_size
    ids = torch.randint(0, V - 2, (B, L))
    ids[:, 0], ids[:, 6:] = V - 2, V - 1  # [SOS] w1..w5 [EOS] pad
    mask = (torch.arange(L) <= 6).long().expand(B, L)
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size)
    targets = {"masks": (torch.rand(B, cfg.image_size, cfg.image_size) > 0.5).float()}
    out = model(images, ids, mask, targets)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M, mask_logits {tuple(out['mask_logits'].shape)}")
    print({k: round(v.item(), 4) for k, v in out["losses"].items()}, f"loss {out['loss']:.4f}")
