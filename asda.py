"""ASDA: Adaptive Selection based Referring Image Segmentation (Adaptive Selection with Dual
Alignment). Pengfei Yue, Jianghang Lin, ..., Liujuan Cao. ACM Multimedia 2024.
Paper: https://doi.org/10.1145/3664647.3680842 · release: https://github.com/swagger-coder/ASDA
Lab notes, every measurement behind the choices below: docs/asda.md.

Idea. CRIS-style methods tap fixed encoder layers whatever the sentence says. ASDA lets the
sentence pick them: for each candidate ViT layer, the sentence feature f_E is multiplied
element-wise with that layer's projected class token; a Linear + softmax turns the three products
of layers 4-6 (and of layers 7-9) into scores and the argmax picks F_L (and F_M) per sample (AFS,
Eq. 1-3). A Scale-Wise Feature Aggregator fuses the last layer (multiplied with f_E) with the
down-sampled F_M and F_L into F_coarse through thin 32-channel laterals (SFA, Eq. 4-5). The Word
Guided Dual-Branch Aligner keeps words out of F_coarse: one branch turns F_coarse into N_c response
masks M' (CFS, Eq. 6-7), the other lets the visual tokens attend to the words and produces N_c
coefficients in (-1, 1) (WCG, Eq. 8-9); the mask is their weighted sum M = f_coef ⊗ M' (Eq. 10).
In the demo WCG's words barely move the mask even at N_c = 32: M' already read the sentence
through F_G, so the coefficients have little to choose (docs/asda.md#N_c).

Symbols (paper -> code), shapes with B batch, L tokens, C channels, H, W the patch grid:
    I                        images                (B, 3, H*P, W*P)
    F_V^(i), i = 0..N        patches[i]            (B, H*W, C_v)   hidden state i, no class token
    f_C^(i)                  f_C[:, i]             (B, N+1, C_v)   class token of every layer
    f_T, f_E                 f_T, f_E              (B, L, C_t), (B, C_t)   words, [EOS] state
    Φ_T, Φ_as                afs.Phi_T, afs.Phi_as class-token projection, selectors (no softmax)
    score^l                  score                 (B, 3, C_t)    Eq. 1
    score_L, L (score_M, M)  probs, selected_layers (B, 2, 3), (B, 2)   Eq. 2-3 (1-based layer ids)
    F_L, F_M, F_H            F_L, F_M, F_H         (B, C_v, H, W)
    F~_L, F~_M               F_L_tilde, F_M_tilde  (B, C_v, H/4, W/4), (B, C_v, H/2, W/2)
    Φ_up                     Phi_up                nearest up-sampling to a given size (Eq. 5, 7)
    F_G, F'_L, F'_M          F_G, F_L_prime, F_M_prime        Eq. 4-5
    F_coarse, F_A            F_coarse, F_A         (B, H*W, dim)
    n, N_c                   cfg.n, cfg.N_c        attention layers in CFS, response masks
    M', F'_K, F_fine         M_prime, F_K, F_fine  (B, N_c, 8H, 8W), (B, H*W, dim), (B, H*W, dim)
    f_coef, M                f_coef, mask_logits   (B, N_c), (B, 1, 8H, 8W)

Recipe (§4.2): Adam, lr 5e-5, 30 epochs, x0.1 after epochs 18 and 25, batch 28, 416 px, 17 tokens
(22 for G-Ref), both CLIP ViT-B/16 towers fine-tuned, focal + Dice loss. Tables 3-5 ran 10 epochs
(§4.4): their rows carry "recipe": {"epochs": 10}. RECIPE (at the end) gives each value's source.

Differences, one line each; "both" = paper() and tiny(); (#x) = docs/asda.md#x, the evidence.
The paper is silent (we take the release's choice unless said):
- both: dim 512, 8 heads, FFN 512 (WCG: wcg_ffn_dim 2048), dropout 0.1, CFS decoder width 256.
- both: Φ_coef's N_c maps -> N_c numbers by coef_grid² average-pooled cells + Linear (#coef_grid)
- both: F_L, F_M down-sampled by max pooling (ceil: 26 -> 13, 7), ViTDet-style [31]; our choice.
- both: a fixed 2-D sine position on the Local Visual Attention's queries and keys (as DETR's).
- both: focal + Dice at weights 1:1 (#focal_weight); masks are sigmoid > threshold 0.35 (CRIS).
The release differs (the paper followed unless said):
- both: the release's selector never learns (no gradient through argmax): --ablate frozen_selector
- both: Eq. 1 there multiplies Φ_T(f_C^l) with block l's own [EOS] state; here the final f_E.
- both: Φ_as there is a Linear(C -> 1) per score; here Eq. 2's Linear(3C -> 3) on the concatenation.
- both: SFA there up-samples (transposed convs) into a 512-wide FPN; here Eq. 4-5's 32 channels.
- both: f_E -> C_v by a Linear (release: Linear-BN-LeakyReLU, and a 1x1 ConvBN-LeakyReLU on F_H).
- both: conv blocks Conv-BN-ReLU ("Convolution-ReLU", §3.3); the release's use LeakyReLU(0.1).
- both: CFS decoder as Eq. 7 (release: 2 extra 3x3 convs, a 3x3 last conv, ReLU M') (#response_act)
- both: pre-norm attention as Eq. 6 and 8 write it (release: post-norm, a LayerNorm on F_A).
- both: WCG masks padded words and reads Linear(f_T) (release: no mask, ReLU(Linear) words).
- both: Φ_coef ends in Eq. 9's 1x1 conv and a Linear with bias (release: 3x3 conv, no bias).
- both: focal α 0.25, γ 2 of the cited [32] (release: α -1, γ 0, i.e. BCE) (#focal_weight)
- both: RECIPE is the paper's (release: lr 2.5e-5 x batch/16, 32 epochs, x0.1 at 18, 28, AMP).
- both: the tables' "IoU" ("overall IoU", §4.2) is the release's mIoU; TABLES name it so (#TABLES)
- both: transformers resizes CLIP's positions (bicubic) per forward (release: bilinear, once).
- both: max_tokens 22 for G-Ref is --set max_tokens=22 (release: 17 for every dataset).
We deviate on purpose:
- both: AFS learns by straight-through Gumbel-softmax, F_L sampled from score_L (#gumbel_tau)
- both: Table 2 rows (a)-(d) keep CFS's attention and decode one mask; (b), (c) fuse as CRIS.
- tiny() only: 64 px and the shared tiny CLIP (10 layers of width 64): groups 4-6, 7-9, F_H = 10.
- tiny() only: the aligner at the tiny CLIP's width: dim 64, num_heads 4 (#dim, #num_heads)
- tiny() only: ffn_dim = wcg_ffn_dim = 128 (#ffn_dim, #wcg_ffn_dim); dropout 0 (#dropout)
- tiny() only: decoder_dim 32, dim / 2 as the release's 512 // 2 (#decoder_dim)
- tiny() only: coef_grid 4, the 8x8 patch grid pooled to 4x4 cells (#coef_grid)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
)

import common

TEXT_ENCODER = "clip"

ABLATIONS: dict[str, str] = {
    "no_intermediate": "no intermediate layers: F_coarse from F_G = F_H ⊙ f_E alone (no F_L, F_M)",
    "manual_layers": "fixed F_L, F_M = layers 6 and 9 (CRIS's manual assignment) instead of AFS",
    "frozen_selector": "AFS selector left untrained (random Φ_T, Φ_as; plain argmax), as released",
    "no_sfa": "F_L, F_M, F_G concatenated and projected at one scale instead of SFA (Eq. 4-5)",
    "no_wcg": "no word branch: one mask decoded from F_A, no word attention and no coefficients",
    "single_branch": "words cross-attend into F_A, one mask decoded from F_fine (no M', f_coef)",
}

SELECTORS = ("linear", "mlp", "conv")

# CLIP ViT-B/16 written out, so pretrained=False builds the paper architecture offline.
VIT_B16_VISION = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    patch_size=16,
    image_size=224,
    projection_dim=512,
)
VIT_B16_TEXT = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    projection_dim=512,
)


@dataclass
class Config:
    image_size: int = 416  # §4.2: 416x416 (26x26 patches at P = 16)
    max_tokens: int = 17  # §4.2: 17 for RefCOCO(+), 22 for G-Ref, incl. [SOS]/[EOS]
    vocab_size: int = 49408  # CLIP BPE; train.py overwrites it with len(tokenizer)
    threshold: float = 0.35  # paper silent; release (and CRIS): sigmoid > 0.35
    pretrained: bool = True
    vision_name: str = "openai/clip-vit-base-patch16"  # §4.2: CLIP ViT-B/16
    text_name: str = "openai/clip-vit-base-patch16"
    vision_config: dict = field(default_factory=lambda: dict(VIT_B16_VISION))
    text_config: dict = field(default_factory=lambda: dict(VIT_B16_TEXT))
    ablate: tuple[str, ...] = ()
    # --- Adaptive Feature Selection (§3.3, Eq. 1-3) ---
    low_layers: tuple[int, ...] = (4, 5, 6)  # §3.3: candidates for F_L (1-based ViT layers)
    mid_layers: tuple[int, ...] = (7, 8, 9)  # §3.3: candidates for F_M
    manual_layers: tuple[int, int] = (6, 9)  # §4.4, Table 2 row (b): CRIS's layers 6 and 9
    selector: str = "linear"  # Φ_as: "linear" | "mlp" | "conv" (Table 5; linear is best)
    # Ours (the release never trains the selector): the straight-through Gumbel-softmax
    # temperature. It shapes the backward pass only: the hard pick argmax(logits + noise) does
    # not depend on it.
    gumbel_tau: float = 1.0
    # --- Scale-Wise Feature Aggregator (Eq. 4-5) ---
    sfa_dim: int = 32  # §3.3: laterals reduced to 32 channels
    # --- Word Guided Dual-Branch Aligner (§3.4); widths: paper silent, the release's ---
    dim: int = 512  # C of F_coarse, F_A, F_fine (release f_dim 512)
    num_heads: int = 8  # release: 8 heads in the Local Visual Attention and in WCG
    ffn_dim: int = 512  # Local Visual Attention FFN (release: dim_feedforward = f_dim = 512)
    wcg_ffn_dim: int = 2048  # WCG's FFN (release lang_tf_enc: forward_dim 2048)
    n: int = 2  # §4.2, Table 3: Local Visual Attention layers
    decoder_dim: int = 256  # CFS decoder width (release mask_decoder: 512 // 2)
    N_c: int = 32  # §4.2, Table 4: response masks / coefficients (tiny too: docs/asda.md#N_c)
    coef_grid: int = 26  # Φ_coef pools to coef_grid² cells + Linear (release: flatten 26x26)
    response_act: str = "sigmoid"  # on M' (Eq. 7); "relu": the release's (and YOLACT's)
    dropout: float = 0.1  # release: dropout 0.1 in both attention blocks
    # --- loss (§3.4: "a linear combination of focal loss [32] and dice loss [30]") ---
    focal_alpha: float = 0.25  # the cited focal loss (Lin et al.) defaults; release -1 (none)
    focal_gamma: float = 2.0  # Lin et al.; release 0 (= BCE)
    focal_weight: float = 1.0  # paper silent; release: focal + Dice, 1:1
    dice_weight: float = 1.0

    @classmethod
    def paper(cls) -> Config:
        """§4.2: the field defaults (CLIP ViT-B/16 at 416 px, 17 tokens, N_c = 32, n = 2), the
        release's values where the paper is silent. For G-Ref the paper uses 22 tokens:
        --set max_tokens=22."""
        return cls()

    @classmethod
    def tiny(cls) -> Config:
        """The 64 px demo: the shared tiny CLIP pretrained on the built-in world (pretrain.py)
        and the aligner scaled to its width. Every field set here is a demo choice, named
        `tiny() only` in the module docstring; N_c, n and the 32-channel laterals stay the
        paper's. vision_config / text_config equal the folder's architecture, so
        --no-pretrained builds the same model with random weights."""
        return cls(
            image_size=64,
            max_tokens=17,
            vocab_size=57,  # the built-in world's CLIP tokenizer; train.py sets len(tokenizer)
            pretrained=True,
            vision_name="pretrained/tiny-clip",
            text_name="pretrained/tiny-clip",
            # 10 layers: the paper's groups 4-6 / 7-9 and a distinct F_H (layer 10).
            vision_config=dict(
                hidden_size=64,
                intermediate_size=256,
                num_hidden_layers=10,
                num_attention_heads=4,
                patch_size=8,
                image_size=64,
                projection_dim=64,
            ),
            # bos / eos / pad ids follow the vocabulary (V-2, V-1, V-1): see load_clip.
            text_config=dict(
                hidden_size=64,
                intermediate_size=256,
                num_hidden_layers=4,
                num_attention_heads=4,
                max_position_embeddings=32,
                projection_dim=64,
            ),
            dim=64,  # the tiny CLIP's width (docs/asda.md#dim)
            num_heads=4,  # 16 channels per head, as the tiny CLIP's own 4 heads
            ffn_dim=128,  # twice dim (the release: 1x in the attention, 4x in WCG)
            wcg_ffn_dim=128,
            decoder_dim=32,  # dim / 2, as the release's 512 // 2 (docs/asda.md#decoder_dim)
            coef_grid=4,  # the 8x8 patch grid pooled to 4x4 cells (docs/asda.md#coef_grid)
            dropout=0.0,  # docs/asda.md#dropout
        )


# ---------------------------------------------------------------------------------------------
# The paper's parts in the paper's order: features (§3.2), AFS and SFA (§3.3), WGDA = CFS
# + WCG (§3.4)


class FeatureExtraction(nn.Module):
    """§3.2: layer-wise patch tokens F_V^(i) and class tokens f_C^(i), words f_T and [EOS] f_E."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.vision, self.text = load_clip(cfg)
        # post_layernorm only feeds CLIP's pooled image embedding, which ASDA never uses:
        # frozen on purpose so every trainable parameter receives a gradient.
        self.vision.post_layernorm.requires_grad_(False)
        self.patch_size = self.vision.config.patch_size

    def forward(self, images, input_ids, attention_mask):
        out_v = self.vision(
            pixel_values=images, output_hidden_states=True, interpolate_pos_encoding=True
        )
        # hidden_states[0] = embeddings (after pre_layrnorm), hidden_states[i] = output of layer i.
        patches = [h[:, 1:] for h in out_v.hidden_states]  # N+1 x (B, H*W, C_v)
        f_C = torch.stack([h[:, 0] for h in out_v.hidden_states], dim=1)  # (B, N+1, C_v)
        out_t = self.text(input_ids=input_ids, attention_mask=attention_mask)
        f_T = out_t.last_hidden_state  # (B, L, C_t), after CLIP's final LayerNorm
        # [EOS] is the largest id in CLIP's vocabulary; argmax returns its first occurrence
        # (HF pads with EOS too).
        eos = input_ids.argmax(dim=-1)  # (B,)
        f_E = f_T[torch.arange(f_T.shape[0], device=f_T.device), eos]  # (B, C_t)
        return patches, f_C, f_T, f_E


class AdaptiveSelector(nn.Module):
    """Φ_as without its softmax: the k score tokens (B, k, C) -> k selection logits (B, k)."""

    def __init__(self, C: int, k: int, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "linear":  # Eq. 2: one Linear on the concatenation [score^4, score^5, score^6]
            self.net = nn.Linear(k * C, k)
        elif kind == "mlp":  # Table 5 "MLP" (no details given): Linear(3C, C)-ReLU-Linear(C, 3)
            self.net = nn.Sequential(nn.Linear(k * C, C), nn.ReLU(), nn.Linear(C, k))
        elif kind == "conv":  # Table 5 "Conv": a width-3 convolution across the candidates
            self.net = nn.Conv1d(C, 1, kernel_size=3, padding=1)
        else:
            raise ValueError(f"unknown selector '{kind}' for asda; choose from {SELECTORS}")

    def forward(self, score: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            return self.net(score.transpose(1, 2)).squeeze(1)  # (B, C, k) -> (B, 1, k) -> (B, k)
        return self.net(score.flatten(1))  # (B, k*C) -> (B, k)


class AdaptiveFeatureSelection(nn.Module):
    """AFS (§3.3, Eq. 1-3): pick one layer per group and per sample from sentence-class scores.

    Eq. 2's argmax has no gradient (the release never trains Φ_T, Φ_as). In training we draw
    the one-hot with straight-through Gumbel-softmax instead: F.gumbel_softmax(hard=True) picks
    l = argmax(logits + Gumbel noise), a layer SAMPLED from score_L (the argmax of score_L only
    with probability max score_L), and the forward value is exactly that layer's F_V^(l); the
    backward pass sends ⟨∂loss/∂F, F_V^(k)⟩ to every candidate k through the soft sample, so
    Φ_T and Φ_as learn which layer helps. At eval (and with frozen_selector): Eq. 2's argmax.
    """

    def __init__(self, C_v: int, C_t: int, groups: tuple[tuple[int, ...], ...], cfg: Config):
        super().__init__()
        self.groups = groups
        self.tau = cfg.gumbel_tau
        self.frozen = "frozen_selector" in cfg.ablate
        self.Phi_T = nn.Linear(C_v, C_t, bias=False)  # Eq. 1: class token -> width of f_E
        self.Phi_as = nn.ModuleList(AdaptiveSelector(C_t, len(g), cfg.selector) for g in groups)
        if self.frozen:
            # Release behaviour: the selector keeps its random initial weights.
            self.requires_grad_(False)

    def forward(self, patches, f_C, f_E):
        """patches: N+1 x (B, H*W, C_v); f_C (B, N+1, C_v); f_E (B, C_t).

        Returns the selected features (one (B, H*W, C_v) per group), the chosen 1-based layer
        ids (B, n_groups) and the softmax scores (B, n_groups, k)."""
        selected, layers, probs = [], [], []
        for group, Phi_as in zip(self.groups, self.Phi_as, strict=True):
            idx = list(group)
            # Eq. 1: score^l = f_E ⊗ Φ_T(f_C^l), one C_t-vector per candidate layer
            score = f_E[:, None, :] * self.Phi_T(f_C[:, idx])  # (B, k, C_t)
            logits = Phi_as(score).float()  # (B, k); fp32 so the Gumbel noise is exact
            # Eq. 2: score_L = softmax(Linear([score^4, score^5, score^6])); L = argmax
            probs.append(logits.softmax(dim=-1))
            if self.training and not self.frozen:
                # a sample l ~ score_L, not its argmax: one-hot forward, soft (ST) backward
                one_hot = F.gumbel_softmax(logits, tau=self.tau, hard=True)  # (B, k)
            else:
                one_hot = F.one_hot(logits.argmax(-1), len(idx)).to(logits.dtype)  # (B, k)
            # Eq. 2: F_L = F_V^(L), written as a one-hot mixture so the ST gradient can flow
            candidates = torch.stack([patches[i] for i in idx], dim=1)  # (B, k, H*W, C_v)
            selected.append(torch.einsum("bk,bknc->bnc", one_hot, candidates))  # (B, H*W, C_v)
            layers.append(torch.tensor(idx, device=logits.device)[one_hot.argmax(-1)])  # (B,)
        return selected, torch.stack(layers, dim=1), torch.stack(probs, dim=1)


def Phi_up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Φ_up (Eq. 5 and 7): nearest up-sampling of x (B, C, h, w) to `size` (the release's FPN and
    decoder up-sample with nearest too). A size, not a factor: ceil-pooled grids (26 -> 13 -> 7)
    do not double exactly."""
    return F.interpolate(x, size=size, mode="nearest")


class ScaleWiseFeatureAggregator(nn.Module):
    """SFA (§3.3, Eq. 4-5): f_E ⊙ F_H, plus down-sampled F_L, F_M through 32-channel laterals."""

    def __init__(self, C_v: int, C_t: int, sfa_dim: int, dim: int):
        super().__init__()
        self.sentence_proj = nn.Linear(C_t, C_v)  # f_E into the visual width for Eq. 4
        self.reduce_L = conv_bn_relu(C_v, sfa_dim, 1)  # Φ_up's channel reduction to 32 on F~_L
        self.lateral_M = conv_bn_relu(C_v, sfa_dim, 1)  # Φ_lateral on F~_M
        self.lateral_G = conv_bn_relu(C_v, sfa_dim, 1)  # Φ_lateral on F_G (own weights and BN)
        self.agg = nn.Conv2d(sfa_dim, dim, 3, padding=1)  # Φ_agg: 3x3 conv restoring channels

    def forward(self, F_L, F_M, F_H, f_E):
        """F_L, F_M, F_H: (B, C_v, H, W); f_E (B, C_t) -> F_coarse (B, H*W, dim)."""
        # Eq. 4: f_G = f_H ⊙ f_E at every position
        F_G = F_H * self.sentence_proj(f_E)[:, :, None, None]  # (B, C_v, H, W)
        # §3.3: F~_M at H/2, F~_L at H/4 (ceil, so a 26x26 grid gives 13x13 and 7x7)
        F_M_tilde = F.max_pool2d(F_M, 2, ceil_mode=True)  # (B, C_v, H/2, W/2)
        F_L_tilde = F.max_pool2d(F_L, 4, ceil_mode=True)  # (B, C_v, H/4, W/4)
        # Eq. 5: F'_L = Φ_up(F~_L), up-sampled to F~_M's grid with 32 channels
        F_L_prime = self.reduce_L(Phi_up(F_L_tilde, F_M_tilde.shape[-2:]))  # (B, sfa, H/2, W/2)
        # Eq. 5: F'_M = Φ_lateral(F~_M) + F'_L
        F_M_prime = self.lateral_M(F_M_tilde) + F_L_prime  # (B, sfa_dim, H/2, W/2)
        # Eq. 5: F_coarse = Φ_agg(Φ_lateral(F_G) + Φ_up(F'_M)), then flattened
        F_coarse = self.agg(self.lateral_G(F_G) + Phi_up(F_M_prime, F_G.shape[-2:]))
        return F_coarse.flatten(2).transpose(1, 2)  # (B, dim, H, W) -> (B, H*W, dim)


class LocalVisualAttentionLayer(nn.Module):
    """One of the n layers of CFS's Local Visual Attention (Eq. 6), pre-norm."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x (B, H*W, dim); pos (H*W, dim) is added to queries and keys only."""
        h = self.norm1(x)
        # Eq. 6: F_a^(i-1) = MHSA(LN(F)) + F
        x = x + self.drop(self.attn(h + pos, h + pos, h, need_weights=False)[0])  # (B, H*W, dim)
        # Eq. 6: F_a^(i) = MLP(F_a^(i-1)) + F_a^(i-1)
        return x + self.drop(self.mlp(self.norm2(x)))


class SegmentationDecoder(nn.Module):
    """CFS segmentation decoder (Eq. 7): three (x2 up-sampling, 3x3 conv), then a 1x1 conv."""

    def __init__(self, dim: int, decoder_dim: int, out_channels: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            conv_bn_relu(dim if i == 0 else decoder_dim, decoder_dim, 3) for i in range(3)
        )
        self.out = nn.Conv2d(decoder_dim, out_channels, 1)

    def forward(self, F_A: torch.Tensor) -> torch.Tensor:
        """F_A (B, dim, H, W) -> F_A^(4) (B, out_channels, 8H, 8W), before the sigmoid."""
        x = F_A
        for block in self.blocks:
            # Eq. 7: F_A^(i) = conv3x3(Φ_up(F_A^(i-1))), i = 1, 2, 3
            x = block(Phi_up(x, (2 * x.shape[-2], 2 * x.shape[-1])))  # (B, C, 2h, 2w)
        return self.out(x)  # Eq. 7: F_A^(4) = conv1x1(F_A^(3))


class VisualLanguageAttention(nn.Module):
    """WCG's Visual and Language Local Attention (Eq. 8): visual tokens attend to the words."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.norm_v = nn.LayerNorm(dim)
        self.norm_t = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, F_A, words, pad):
        """F_A (B, H*W, dim); words (B, L, dim) = f_T in this width; pad (B, L) bool, True =
        padding (ignored keys)."""
        t = self.norm_t(words)
        # Eq. 8: F'_K = MHCA(LN(F_A), LN(f_T)) + F_A
        F_K = F_A + self.drop(
            self.attn(self.norm_v(F_A), t, t, key_padding_mask=pad, need_weights=False)[0]
        )  # (B, H*W, dim)
        # Eq. 8: F_fine = MLP(F'_K) + F'_K
        return F_K + self.drop(self.mlp(self.norm2(F_K)))


class GatedCoefficientGeneration(nn.Module):
    """Φ_coef (Eq. 9): two 3x3 convs and a 1x1 conv to N_c maps, then one number per map, tanh.

    The maps become numbers through a coef_grid x coef_grid adaptive average pool and a Linear
    over all cells (the release: flatten the 26x26 map + Linear): a coefficient can then depend
    on WHERE its map fires. coef_grid = 0: global average pooling, one cell, no Linear."""

    def __init__(self, dim: int, N_c: int, coef_grid: int):
        super().__init__()
        self.convs = nn.Sequential(
            conv_bn_relu(dim, dim, 3), conv_bn_relu(dim, dim, 3), nn.Conv2d(dim, N_c, 1)
        )
        self.grid = coef_grid
        self.fc = nn.Linear(N_c * coef_grid**2, N_c) if coef_grid else None

    def forward(self, F_fine: torch.Tensor) -> torch.Tensor:
        """F_fine (B, dim, H, W) -> f_coef (B, N_c) in (-1, 1)."""
        maps = self.convs(F_fine)  # (B, N_c, H, W)
        if self.fc is None:
            return torch.tanh(maps.mean(dim=(2, 3)))  # Eq. 9 with global average pooling
        cells = F.adaptive_avg_pool2d(maps, self.grid).flatten(1)  # (B, N_c * grid²)
        return torch.tanh(self.fc(cells))  # Eq. 9, (B, N_c)


def combine_masks(f_coef: torch.Tensor, M_prime: torch.Tensor) -> torch.Tensor:
    """Eq. 10: M = reshape(Σ_k f_coef[k] · M'[k]).

    f_coef (B, N_c), M' (B, N_c, h, w) -> M (B, 1, h, w)."""
    return torch.einsum("bk,bkhw->bhw", f_coef, M_prime).unsqueeze(1)


# ---------------------------------------------------------------------------------------------
# Plumbing: Table 2's single-scale fusion (rows a-c), conv blocks, positions, reshapes, CLIP


class ConcatFusion(nn.Module):
    """CRIS-style fusion at one scale (Table 2 rows a-c): F_G = F_H ⊙ f_E (Eq. 4), concatenated
    with F_L and F_M when given, projected to dim by a 1x1 ConvBN-ReLU and a 3x3 conv."""

    def __init__(self, C_v: int, C_t: int, dim: int, levels: int):
        super().__init__()
        self.sentence_proj = nn.Linear(C_t, C_v)
        self.proj = nn.Sequential(
            conv_bn_relu(levels * C_v, dim, 1), nn.Conv2d(dim, dim, 3, padding=1)
        )

    def forward(self, F_L, F_M, F_H, f_E):
        """F_L, F_M (B, C_v, H, W) or None (row a); F_H (B, C_v, H, W) -> (B, H*W, dim)."""
        F_G = F_H * self.sentence_proj(f_E)[:, :, None, None]  # Eq. 4, (B, C_v, H, W)
        levels = [F_G] if F_L is None else [F_L, F_M, F_G]
        F_coarse = self.proj(torch.cat(levels, dim=1))  # (B, levels*C_v, H, W) -> (B, dim, H, W)
        return F_coarse.flatten(2).transpose(1, 2)  # (B, H*W, dim)


def conv_bn_relu(c_in: int, c_out: int, k: int) -> nn.Sequential:
    """k x k convolution (same padding) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


def sine_position_2d(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """Fixed DETR-style 2-D sine/cosine position code, (h*w, dim); first half y, second half x."""
    d = dim // 2  # channels per axis
    freq = 10000 ** (2 * (torch.arange(d, device=device) // 2) / d)  # (d,)
    y = torch.arange(h, device=device, dtype=torch.float32)[:, None] / freq  # (h, d)
    x = torch.arange(w, device=device, dtype=torch.float32)[:, None] / freq  # (w, d)
    y = torch.cat([y[:, 0::2].sin(), y[:, 1::2].cos()], dim=-1)  # (h, d)
    x = torch.cat([x[:, 0::2].sin(), x[:, 1::2].cos()], dim=-1)  # (w, d)
    pos = torch.cat([y[:, None].expand(h, w, d), x[None].expand(h, w, d)], dim=-1)  # (h, w, 2d)
    return F.pad(pos.flatten(0, 1), (0, dim - 2 * d))  # (h*w, dim); pads an odd dim with 0


def tokens_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h*w, C) -> (B, C, h, w)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


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


def load_clip(cfg: Config) -> tuple[CLIPVisionModel, CLIPTextModel]:
    """The two CLIP towers: from the Hub / a local folder, or random weights from the configs."""
    if not cfg.pretrained:
        # The CLIP tokenizer convention (data.py): <|startoftext|> = V-2, <|endoftext|> = V-1 =
        # pad. The Hub's ViT-B/16 config has its own (legacy) ids; ASDA finds [EOS] by argmax.
        V = cfg.vocab_size
        ids = dict(bos_token_id=V - 2, eos_token_id=V - 1, pad_token_id=V - 1)
        text_config = {**ids, **cfg.text_config, "vocab_size": V}
        return CLIPVisionModel(CLIPVisionConfig(**cfg.vision_config)), CLIPTextModel(
            CLIPTextConfig(**text_config)
        )

    # A full CLIPModel checkpoint loads without "unexpected key" reports; we keep its parts.
    vision_clip = from_pretrained(CLIPModel, cfg.vision_name)
    text_clip = (
        vision_clip
        if cfg.text_name == cfg.vision_name
        else from_pretrained(CLIPModel, cfg.text_name)
    )
    return vision_clip.vision_model, text_clip.text_model


# ---------------------------------------------------------------------------------------------
# The model


class ASDA(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        ablate = set(cfg.ablate)
        self.features = FeatureExtraction(cfg)
        C_v = self.features.vision.config.hidden_size
        C_t = self.features.text.config.hidden_size
        self.num_layers = self.features.vision.config.num_hidden_layers
        for layer in (*cfg.low_layers, *cfg.mid_layers, *cfg.manual_layers):
            if not 1 <= layer <= self.num_layers:
                raise ValueError(f"layer {layer} outside the ViT's 1..{self.num_layers}")

        # §3.3: where F_L, F_M come from: AFS, the fixed layers of row (b), or nowhere (row a)
        self.intermediate = "no_intermediate" not in ablate
        self.adaptive = self.intermediate and "manual_layers" not in ablate
        if self.adaptive:
            self.afs = AdaptiveFeatureSelection(C_v, C_t, (cfg.low_layers, cfg.mid_layers), cfg)
        # §3.3: SFA, or the single-scale concatenation of rows (a)-(c)
        if self.intermediate and "no_sfa" not in ablate:
            self.fusion = ScaleWiseFeatureAggregator(C_v, C_t, cfg.sfa_dim, cfg.dim)
        else:
            self.fusion = ConcatFusion(C_v, C_t, cfg.dim, levels=3 if self.intermediate else 1)

        # §3.4, CFS: n layers of Local Visual Attention and the segmentation decoder
        self.local_attention = nn.ModuleList(
            LocalVisualAttentionLayer(cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.dropout)
            for _ in range(cfg.n)
        )
        # Rows (a)-(e) decode one mask; only the full dual branch decodes N_c response masks.
        self.word_branch = "no_wcg" not in ablate
        self.dual_branch = self.word_branch and "single_branch" not in ablate
        self.decoder = SegmentationDecoder(
            cfg.dim, cfg.decoder_dim, cfg.N_c if self.dual_branch else 1
        )
        # §3.4, WCG: word cross-attention (also used by the single-branch row) and Φ_coef
        if self.word_branch:
            self.word_proj = nn.Linear(C_t, cfg.dim)  # f_T into the aligner width
            self.word_attention = VisualLanguageAttention(
                cfg.dim, cfg.num_heads, cfg.wcg_ffn_dim, cfg.dropout
            )
        if self.dual_branch:
            self.coefficients = GatedCoefficientGeneration(cfg.dim, cfg.N_c, cfg.coef_grid)

    def forward(self, images, input_ids, attention_mask, targets=None) -> dict:
        """images (B, 3, H*P, W*P), input_ids / attention_mask (B, L) -> dict with
        "mask_logits" (B, 1, 8H, 8W); "selected_layers" (B, 2) long, the 1-based ids of F_L, F_M
        (absent in row a); "candidate_layers" (2, k) long; "selection_probs" (B, 2, 3) (score_L,
        score_M; only with AFS); "f_coef" (B, N_c) and "M_prime" (B, N_c, 8H, 8W) (only with the
        dual branch) and, given
        targets {"masks": (B, H*P, W*P)}, "loss" and "losses" {"focal", "dice"}."""
        cfg = self.cfg
        B = images.shape[0]
        H = images.shape[-2] // self.features.patch_size
        W = images.shape[-1] // self.features.patch_size
        out = {}

        # §3.2: features of every ViT layer, the words and the sentence
        patches, f_C, f_T, f_E = self.features(images, input_ids, attention_mask)
        F_H = tokens_to_map(patches[self.num_layers], H, W)  # the last layer, (B, C_v, H, W)

        # §3.3, Eq. 1-3: F_L from layers 4-6 and F_M from layers 7-9, chosen per sample
        F_L = F_M = None
        if self.adaptive:
            (F_L, F_M), layers, probs = self.afs(patches, f_C, f_E)
            out["selection_probs"] = probs  # (B, 2, 3): score_L and score_M
            candidates = (cfg.low_layers, cfg.mid_layers)
            if not self.training and targets is not None:
                # Diagnostics only: the layers the same image gets with the next sample's
                # sentence. If they never change, the selection ignores the text.
                out["selected_layers_text_swap"] = self.afs(patches, f_C, f_E.roll(1, 0))[1]
        elif self.intermediate:  # Table 2 row (b): CRIS's fixed layers
            F_L, F_M = patches[cfg.manual_layers[0]], patches[cfg.manual_layers[1]]
            layers = torch.tensor(cfg.manual_layers, device=images.device).expand(B, 2)
            candidates = tuple((layer,) for layer in cfg.manual_layers)
        if self.intermediate:
            out["selected_layers"] = layers  # (B, 2) long, 1-based layer ids
            # (2, k), on the CPU: only diagnostics() reads it, and a copy to the device would
            # block every training step.
            out["candidate_layers"] = torch.tensor(candidates)
            F_L, F_M = tokens_to_map(F_L, H, W), tokens_to_map(F_M, H, W)  # (B, C_v, H, W)

        # Eq. 4-5: F_coarse (B, H*W, dim)
        F_coarse = self.fusion(F_L, F_M, F_H, f_E)

        # Eq. 6: CFS Local Visual Attention, n layers -> F_A
        pos = sine_position_2d(H, W, cfg.dim, images.device).to(F_coarse.dtype)  # (H*W, dim)
        F_A = F_coarse
        for layer in self.local_attention:
            F_A = layer(F_A, pos)  # (B, H*W, dim)

        if not self.word_branch:  # Table 2 rows (a)-(d): decode the mask from F_A alone
            out["mask_logits"] = self.decoder(tokens_to_map(F_A, H, W))  # (B, 1, 8H, 8W)
        else:
            words = self.word_proj(f_T)  # f_T in the aligner width, (B, L, dim)
            F_fine = self.word_attention(F_A, words, pad=attention_mask == 0)  # Eq. 8
            if self.dual_branch:
                # Eq. 7: response masks M' from F_A (CFS branch); words never enter them
                M_prime = self.decoder(tokens_to_map(F_A, H, W))  # (B, N_c, 8H, 8W)
                M_prime = M_prime.relu() if cfg.response_act == "relu" else M_prime.sigmoid()
                f_coef = self.coefficients(tokens_to_map(F_fine, H, W))  # Eq. 9, (B, N_c)
                out["f_coef"], out["M_prime"] = f_coef, M_prime
                out["mask_logits"] = combine_masks(f_coef, M_prime)  # Eq. 10, (B, 1, 8H, 8W)
                if not self.training and targets is not None:
                    # Diagnostics only: WCG reading the next sample's words (same F_A, same M').
                    # If the mask does not change, the word branch does nothing.
                    pad = (attention_mask == 0).roll(1, 0)
                    F_swap = self.word_attention(F_A, words.roll(1, 0), pad=pad)
                    f_swap = self.coefficients(tokens_to_map(F_swap, H, W))  # (B, N_c)
                    mask = out["mask_logits"].sigmoid() > cfg.threshold  # (B, 1, 8H, 8W)
                    mask_swap = combine_masks(f_swap, M_prime).sigmoid() > cfg.threshold
                    out["f_coef_text_swap"] = f_swap
                    out["wcg_swap_iou"] = common.mask_iou(mask, mask_swap)  # (B,)
            else:  # Table 2 row (e): single branch, the mask is decoded from the word-fused F_fine
                out["mask_logits"] = self.decoder(tokens_to_map(F_fine, H, W))

        if targets is not None:
            logits, masks = out["mask_logits"], targets["masks"]
            # §3.4: focal + Dice on the stride-P/8 logits; the target is resized (nearest)
            focal = common.sigmoid_focal_loss(logits, masks, cfg.focal_alpha, cfg.focal_gamma)
            dice = common.dice_loss(logits, masks)
            out["losses"] = {"focal": focal, "dice": dice}
            out["loss"] = cfg.focal_weight * focal + cfg.dice_weight * dice
        return out


def build_model(cfg: Config) -> nn.Module:
    ablate = set(cfg.ablate)
    for name in ablate:
        if name not in ABLATIONS:
            raise ValueError(f"unknown ablation '{name}' for asda; choose from {sorted(ABLATIONS)}")
    if {"single_branch", "no_wcg"} <= ablate:
        raise ValueError("asda: choose one of the ablations 'single_branch' and 'no_wcg'")
    if {"manual_layers", "frozen_selector"} <= ablate:
        raise ValueError("asda: 'manual_layers' has no selector, so 'frozen_selector' is moot")
    if "no_intermediate" in ablate and ablate & {"manual_layers", "frozen_selector", "no_sfa"}:
        raise ValueError(
            "asda: 'no_intermediate' has no F_L, F_M: 'manual_layers', 'frozen_selector' and "
            "'no_sfa' are moot with it"
        )
    if cfg.response_act not in ("sigmoid", "relu"):
        raise ValueError(f"asda: response_act is 'sigmoid' or 'relu', not {cfg.response_act!r}")
    if cfg.selector not in SELECTORS:
        raise ValueError(f"unknown selector '{cfg.selector}' for asda; choose from {SELECTORS}")
    return ASDA(cfg)


# ---------------------------------------------------------------------------------------------
# The mechanism measured (train.py calls these on eval batches)


# The kinds of referring expression of the built-in world's grammar (data.py), told apart by
# their words; diagnostics() reports the selected layers per kind. Real datasets mix them freely.
EXPRESSION_KINDS = ("attribute", "position", "relation", "ordinal")


def expression_kind(sentence: str) -> str:
    """The built-in grammar's kind of a referring expression, from its words (EXPRESSION_KINDS):
    relation ("left of", "right of", "above", "below"), ordinal ("second", "third"), position
    ("leftmost", "rightmost", "at the top", "at the bottom"), else attribute ("the red circle")."""
    s = sentence.lower()
    if re.search(r"\b(left of|right of|above|below)\b", s):
        return "relation"
    if re.search(r"\b(second|third)\b", s):
        return "ordinal"
    if re.search(r"\b(leftmost|rightmost)\b|\bat the (top|bottom)\b", s):
        return "position"
    return "attribute"


def diagnostics(outputs: dict, batch: dict) -> dict[str, float]:
    """What AFS selects and what WCG's coefficients do, on one eval batch (argmax, as at test):

    entropy_F_L, entropy_F_M   mean entropy of score_L / score_M per sample, in nats (ln 3 = 1.10
                               for three equal candidates; near 0 = saturated, no gradient left)
    layer{l}                   share of the samples whose F_L (or F_M) is layer l, for every
                               candidate l (the two groups have distinct layers)
    layer{l}/{kind}            the same among the samples of one expression kind (NaN when the
                               batch has none of that kind): does the selection follow the text?
    text_swap_F_L, _F_M        share of the samples whose selected layer changes when their
                               sentence is replaced by the next sample's (same image)
    coef_saturated             share of the coefficients with |f_coef| > 0.99: tanh passes no
                               gradient there, so that part of WCG has stopped learning
    coef_spread                std of each coefficient across the batch, mean over the N_c
    coef_text_swap             mean |f_coef - f_coef with the next sample's words| (same F_A)
    wcg_swap_IoU               IoU between the mask and the mask whose coefficients WCG computed
                               from the next sample's words (same M'): 1 = WCG's words do nothing
    response_corr              mean |Pearson correlation| between two response masks M'_k, M'_l
                               of a sample: 1 = the N_c masks are one map (and its complement),
                               so no choice of coefficients can pick one object over another
    Row (a) has no AFS entries; rows without the dual branch have no coef_ / response_ entries."""
    result = {}
    f_coef = outputs.get("f_coef")
    if f_coef is not None:
        f_coef = f_coef.float().cpu()
        result["coef_saturated"] = float((f_coef.abs() > 0.99).float().mean())
        result["coef_spread"] = float(f_coef.std(0).mean()) if len(f_coef) > 1 else math.nan
        if "f_coef_text_swap" in outputs:
            swap = outputs["f_coef_text_swap"].float().cpu()
            result["coef_text_swap"] = float((swap - f_coef).abs().mean())
    if "wcg_swap_iou" in outputs:
        result["wcg_swap_IoU"] = float(outputs["wcg_swap_iou"].float().mean())
    if "M_prime" in outputs and outputs["M_prime"].shape[1] > 1:
        M = outputs["M_prime"].float().flatten(2)  # (B, N_c, h*w)
        M = M - M.mean(-1, keepdim=True)
        M = M / M.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        corr = (M @ M.transpose(1, 2)).abs()  # (B, N_c, N_c)
        N_c = corr.shape[-1]
        off = ~torch.eye(N_c, dtype=torch.bool)
        result["response_corr"] = float(corr[:, off].mean())
    if "selected_layers" not in outputs:
        return result
    selected = outputs["selected_layers"].cpu()  # (B, 2)
    candidates = outputs["candidate_layers"].cpu()  # (2, k)
    kinds = np.array([expression_kind(s) for s in batch["sentence"]])
    probs = outputs.get("selection_probs")  # (B, 2, k) or None
    swapped = outputs.get("selected_layers_text_swap")  # (B, 2) or None
    for g, name in enumerate(("F_L", "F_M")):
        if probs is None:
            result[f"entropy_{name}"] = math.nan
        else:
            p = probs[:, g].float()
            result[f"entropy_{name}"] = float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())
        if swapped is not None:
            changed = swapped[:, g].cpu() != selected[:, g]
            result[f"text_swap_{name}"] = float(changed.float().mean())
        for layer in candidates[g].tolist():
            chosen = (selected[:, g] == layer).numpy()  # (B,) bool
            result[f"layer{layer}"] = float(chosen.mean())
            for kind in EXPRESSION_KINDS:
                of_kind = kinds == kind
                result[f"layer{layer}/{kind}"] = (
                    float(chosen[of_kind].mean()) if of_kind.any() else math.nan
                )
    return result


def sample_extra(outputs: dict, i: int, tokenizer) -> tuple:
    """The response mask M'_k (Eq. 7) with the largest coefficient f_coef[k] (Eq. 9) for sample
    i, captioned with the layers AFS picked and their scores."""
    if "selected_layers" not in outputs:
        caption = "F_H ⊙ f_E only (Table 2 row a)"
    elif "selection_probs" not in outputs:
        caption = "fixed layers F_L = {}, F_M = {}".format(*outputs["selected_layers"][i].tolist())
    else:
        low, mid = outputs["selected_layers"][i].tolist()
        p_low, p_mid = outputs["selection_probs"][i].max(-1).values.tolist()
        caption = f"AFS: F_L = layer {low} (p {p_low:.2f}), F_M = layer {mid} (p {p_mid:.2f})"
    if "f_coef" not in outputs:
        return None, caption
    k = int(outputs["f_coef"][i].argmax())
    M_k = outputs["M_prime"][i, k].float().cpu().numpy()
    return M_k, f"{caption}; M'_{k}, f_coef {float(outputs['f_coef'][i, k]):+.2f}", (0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# The paper's tables and recipe: TABLES (train.py --row), RECIPE (train.py --recipe paper)


def _paper(p50: float, p70: float, p90: float, iou: float) -> dict[str, float]:
    """A row as the tables print it: P@0.5, P@0.7, P@0.9, IoU (%). The tables' "IoU" (called
    overall IoU in §4.2) is the release's mIoU (engine.py: per-sample IoU averaged), the name
    CM-MaskSD's file uses for the same CRIS-family number; its Prec@X counts IoU > X."""
    return {"Prec@0.5": p50, "Prec@0.7": p70, "Prec@0.9": p90, "mIoU": iou}


# The paper's ablations, RefCOCO val. Table 2 also prints testA / testB (in the row notes).
# Tables 3-5 "limit the training ... to only 10 epochs" (§4.4): each row's "recipe" sets
# epochs 10 (train.py --row applies it). Our reading of "limit": RECIPE cut at epoch 10, so the
# decays at 18 and 25 never come. Their default row (n = 2, N_c = 32, Linear) is one build and
# prints one number in all three tables.
_T345 = "10 epochs (§4.4), so lower than Table 2"
TABLES = {
    "Table 2": {
        "(a) baseline: F_H ⊙ f_E to the segmentation decoder": {
            "ablate": ("no_intermediate", "no_wcg"),
            "paper": _paper(76.98, 62.80, 14.92, 66.70),  # RefCOCO val
            "baseline": True,
            "note": "testA 81.40/69.08/15.53/70.02, testB 70.10/53.89/17.21/62.43",
        },
        "(b) (a)+manual assign (layers 6, 9, concatenation)": {
            "ablate": ("manual_layers", "no_sfa", "no_wcg"),
            "paper": _paper(78.86, 66.43, 21.26, 69.38),  # RefCOCO val
            "note": "testA 83.71/73.28/21.97/72.87, testB 73.30/58.82/22.72/65.88",
        },
        "(c) (a)+AFS": {
            "ablate": ("no_sfa", "no_wcg"),
            "paper": _paper(82.32, 71.77, 23.95, 71.78),  # RefCOCO val
            "note": "testA 86.3/77.35/24.02/74.79, testB 75.89/63.49/25.84/67.58",
        },
        "(d) (a)+AFS+SFA": {
            "ablate": ("no_wcg",),
            "paper": _paper(82.37, 72.34, 27.09, 72.39),  # RefCOCO val
            "note": "testA 86.30/77.44/27.68/75.25, testB 76.52/63.47/27.36/67.97",
        },
        "(e) (d)+single-branch": {
            "ablate": ("single_branch",),
            "paper": _paper(85.97, 76.76, 28.72, 74.65),  # RefCOCO val
            "note": "testA 88.45/81.36/28.76/76.54, testB 79.50/68.45/29.55/70.62",
        },
        "(f) (d)+dual-branch (full)": {
            "ablate": (),
            "paper": _paper(86.37, 77.74, 29.80, 75.06),  # RefCOCO val
            "note": "testA 89.28/82.23/29.96/77.14, testB 80.76/69.61/30.14/71.36",
        },
    },
    "Table 3": {  # n, the layers of CFS's Local Visual Attention
        f"n={n} Local Visual Attention layers": {
            "set": {"n": n},
            "paper": _paper(*values),  # RefCOCO val
            "recipe": {"epochs": 10},
            "note": _T345,
            **({"baseline": True} if n == 2 else {}),
        }
        for n, values in (
            (1, (82.38, 71.64, 23.97, 71.72)),
            (2, (83.68, 73.89, 24.94, 72.57)),
            (3, (82.08, 71.94, 25.92, 72.13)),
            (4, (83.0, 72.37, 24.79, 72.57)),
        )
    },
    "Table 4": {  # N_c, the number of response masks and coefficients
        f"N_c={N_c} response masks": {
            "set": {"N_c": N_c},
            "paper": _paper(*values),  # RefCOCO val
            "recipe": {"epochs": 10},
            "note": _T345,
            **({"baseline": True} if N_c == 32 else {}),
        }
        for N_c, values in (
            (16, (79.68, 68.16, 22.2, 70.61)),
            (32, (83.68, 73.89, 24.94, 72.57)),
            (48, (82.46, 71.9, 24.91, 71.92)),
            (64, (82.25, 70.6, 24.25, 71.78)),
        )
    },
    "Table 5": {  # the adaptive selection network Φ_as
        "MLP selector": {
            "set": {"selector": "mlp"},
            "paper": _paper(81.87, 71.25, 23.76, 71.59),  # RefCOCO val
            "recipe": {"epochs": 10},
            "note": _T345,
        },
        "Conv selector": {
            "set": {"selector": "conv"},
            "paper": _paper(82.67, 72.16, 24.88, 72.05),  # RefCOCO val
            "recipe": {"epochs": 10},
            "note": _T345,
        },
        "Linear selector (full model)": {
            "set": {"selector": "linear"},
            "paper": _paper(83.68, 73.89, 24.94, 72.57),  # RefCOCO val
            "recipe": {"epochs": 10},
            "note": _T345,
            "baseline": True,
        },
    },
}

RECIPE = {
    "optimizer": "adam",  # §4.2 "Adam optimizer"; release train.py: torch.optim.Adam
    "lr": 5e-5,  # §4.2; release: 2.5e-5 x total batch / 16 = 4.4e-5 at batch 28
    "encoder_lr_factor": 0.1,  # release train.py: both CLIP towers at lr / 10 (paper silent)
    "weight_decay": 0.0,  # paper silent; release: Adam's default (none)
    "schedule": "step",  # §4.2: "decay the learning rate ... with a decay rate of 0.1"
    "milestones": (18, 25),  # §4.2 (epochs); release train.py: 18 and 28
    "gamma": 0.1,  # §4.2
    "warmup": 0,  # neither the paper nor the release warms up
    "epochs": 30,  # §4.2; release: 32 (Tables 3-5: 10, their rows' "recipe")
    "batch_size": 28,  # §4.2: 28 on 2 RTX 3090 (release train.sh: 14 per GPU x 2)
    "grad_clip": 0.0,  # release engine.py: no clipping (AMP GradScaler only)
    "frozen": (),  # both encoders fine-tuned (release --tunelang, default True)
}


if __name__ == "__main__":
    cfg = Config.tiny()
    cfg.pretrained = False  # the shape smoke run needs no weights
    model = build_model(cfg)
    B, L = 2, cfg.max_tokens
    ids = torch.randint(0, cfg.vocab_size - 2, (B, L))
    ids[:, 0], ids[:, 6:] = cfg.vocab_size - 2, cfg.vocab_size - 1  # [SOS] w1..w5 [EOS] pad
    mask = (torch.arange(L) <= 6).long().expand(B, L)
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size)
    targets = {"masks": (torch.rand(B, cfg.image_size, cfg.image_size) > 0.5).float()}
    out = model(images, ids, mask, targets)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M, mask_logits {tuple(out['mask_logits'].shape)}")
    print(f"selected layers {out['selected_layers'].tolist()}, loss {out['loss'].item():.4f}")
