"""ASDA: Adaptive Selection based Referring Image Segmentation.

Paper: "Adaptive Selection based Referring Image Segmentation" (Adaptive Selection with Dual
Alignment), Pengfei Yue, Jianghang Lin, ..., Liujuan Cao. ACM Multimedia 2024.
https://doi.org/10.1145/3664647.3680842 · reference code: https://github.com/swagger-coder/ASDA

Idea. CRIS-style methods tap fixed encoder layers whatever the sentence says. ASDA lets the sentence
pick them: for each candidate ViT layer, the sentence feature f_E is multiplied element-wise with
that layer's projected class token; a small selector turns the three products of layers 4-6 (and
of layers 7-9) into a softmax and the argmax picks F_L (and F_M) per sample (AFS, Eq. 1-3). A
Scale-Wise Feature Aggregator fuses the last layer (multiplied with f_E) with the down-sampled F_M
and F_L into F_coarse through thin 32-channel laterals (SFA, Eq. 4-5). The Word Guided Dual-Branch
Aligner keeps words out of F_coarse: one branch turns F_coarse into N_c response masks M' (CFS,
Eq. 6-7), the other lets the visual tokens attend to the words and produces N_c coefficients in
(-1, 1) (WCG, Eq. 8-9); the mask is their weighted sum M = Σ f_coef ⊙ M' (Eq. 10).

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
    F_G, F'_L, F'_M          F_G, F_L_prime, F_M_prime        Eq. 4-5
    F_coarse, F_A            F_coarse, F_A         (B, H*W, dim)
    n, N_c                   cfg.n, cfg.N_c        attention layers in CFS, response masks
    M', F'_K, F_fine         M_prime, F_K, F_fine  (B, N_c, 8H, 8W), (B, H*W, dim), (B, H*W, dim)
    f_coef, M                f_coef, mask_logits   (B, N_c), (B, 1, 8H, 8W)

Differences from the paper and the released code (one line each):
- Selector training: the paper only writes argmax(Linear + softmax); the release never trains it
  (the argmax blocks every gradient, so Φ_T and Φ_as stay at their random init). We train it with
  straight-through Gumbel-softmax (F.gumbel_softmax(hard=True), tau = cfg.gumbel_tau) in training
  and take the plain argmax at eval; `--ablate frozen_selector` restores the release behaviour.
- Eq. 1 multiplies f_E with Φ_T(raw class token), unnormalised, as Eq. 1 and the release do (the
  prose says "cosine similarity"). f_E is the final, layer-normed [EOS] state (no text projection),
  as in the paper; the release compares the class token with the [EOS] state of the same block.
- Φ_T is shared by both groups, each group has its own Φ_as (as the release). Φ_as acts on the
  concatenation [score^4, score^5, score^6] (Eq. 2: Linear(3C -> 3)); the release applies one
  Linear(C -> 1) to each score. `selector = "mlp"` is Linear(3C, C)-ReLU-Linear(C, 3) and
  `"conv"` a width-3 Conv1d across the candidates (Table 5 gives no details).
- SFA as the paper (Eq. 4-5): F_L, F_M are max-pooled to H/4, H/2 (ViTDet-style [31]; ceil, so
  26 -> 7 and 13), reduced to sfa_dim = 32 channels, summed top-down with bilinear up-sampling and
  a 3x3 conv restores dim. The release instead up-samples x9 (x2) and x6 (x4) with transposed
  convs, maps every level to 512, runs a top-down FPN to stride 4 and max-pools back to 26x26.
- Eq. 4 needs f_E in the visual width: a Linear(C_t -> C_v) maps it first (768 vs 512 in ViT-B/16).
- Conv blocks are Conv-BN-ReLU (paper: "Convolution-ReLU"; the release: Conv-BN-LeakyReLU(0.1)).
- Local Visual Attention is pre-norm as Eq. 6 writes it, with a LayerNorm also before the MLP and a
  fixed 2-D sine position added to queries and keys (the release: post-norm, DETR sine positions).
  dim = 512, 8 heads, FFN 512, dropout 0.1 come from the release (the paper gives none of them).
- CFS decoder as Eq. 7: three (x2 nearest up-sampling, 3x3 Conv-BN-ReLU) then a 1x1 conv to N_c
  and a sigmoid, so the output stride is P/8: 2 at the paper preset (208x208 at 416 px, as the
  release), 1 for the tiny preset (P = 8). The release uses ReLU instead of the sigmoid.
- WCG cross-attention uses a key padding mask from attention_mask (the release has none and
  attends to padding). Word features are Linear(C_t -> dim) of the final text states.
- Φ_coef: two 3x3 Conv-BN-ReLU and a 1x1 conv to N_c as the paper, then global average pooling
  (the paper does not say how the map becomes a vector; the release flattens 26*26*32 into a
  Linear, which only works at 416 px), then tanh.
- Loss = focal + Dice, weights 1:1; we use the paper's focal loss with Lin et al.'s alpha = 0.25,
  gamma = 2. The release calls it with alpha = -1, gamma = 0, i.e. plain BCE
  (`--set focal_alpha=-1 focal_gamma=0` reproduces it).
- Position embeddings: transformers interpolates CLIP's 14x14 table bicubically on every forward
  (interpolate_pos_encoding=True); the release resizes it once (bilinear) into a new parameter.
- Text length: 17 tokens (paper: 22 for G-Ref; the release hard-codes 17 everywhere, set
  max_tokens=22 for G-Ref). Both encoders are fine-tuned (the release uses lr/10 for them).
- Table 2's "single-branch" row is `single_branch` (words cross-attend into F_A, one mask decoded
  from F_fine); row (d) without any word branch is `no_wcg`. `no_sfa` is row (c)'s CRIS-style
  concatenation + projection of F_L, F_M, F_G at one scale; `manual_layers` uses layers 6 / 9.
- The tiny preset keeps the paper's layer groups (4-6, 7-9) on a 10-layer, 32-wide ViT, so F_H
  (layer 10) stays distinct from the candidates; the groups are Config fields.
"""

from __future__ import annotations

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
    "manual_layers": "fixed layers F_L = 6, F_M = 9 instead of AFS (Table 2 row b, manual assign)",
    "no_sfa": "AFS without SFA: F_L, F_M, F_G concatenated + projected at one scale (Table 2 c)",
    "single_branch": "single-branch aligner: words cross-attend into F_A, one mask (Table 2 e)",
    "no_wcg": "CFS only: one mask decoded from F_A, no word branch and no coefficients (Table 2 d)",
    "frozen_selector": "selector left untrained (random Φ_T, Φ_as, plain argmax) as in the release",
}
# Non-boolean ablations are Config fields: N_c (Table 4), n (Table 3), selector (Table 5).

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
    image_size: int = 416  # paper §4.2: 416x416 (26x26 patches at P = 16)
    max_tokens: int = 17  # paper §4.2: 17 for RefCOCO(+), 22 for G-Ref, incl. [SOS]/[EOS]
    vocab_size: int = 49408  # CLIP BPE; train.py overwrites it with len(tokenizer)
    threshold: float = 0.35  # release: sigmoid > 0.35 (CRIS family)
    pretrained: bool = True
    vision_name: str = "openai/clip-vit-base-patch16"  # paper §4.2: CLIP ViT-B/16
    text_name: str = "openai/clip-vit-base-patch16"
    vision_config: dict = field(default_factory=lambda: dict(VIT_B16_VISION))
    text_config: dict = field(default_factory=lambda: dict(VIT_B16_TEXT))
    ablate: tuple[str, ...] = ()
    # --- Adaptive Feature Selection (§3.3, Eq. 1-3) ---
    low_layers: tuple[int, ...] = (4, 5, 6)  # candidates for F_L (1-based ViT layers)
    mid_layers: tuple[int, ...] = (7, 8, 9)  # candidates for F_M
    manual_layers: tuple[int, int] = (6, 9)  # Table 2 row b (used by --ablate manual_layers)
    selector: str = "linear"  # Φ_as: "linear" | "mlp" | "conv" (Table 5; linear is best)
    gumbel_tau: float = 1.0  # straight-through Gumbel-softmax temperature (ours, see docstring)
    # --- Scale-Wise Feature Aggregator (Eq. 4-5) ---
    sfa_dim: int = 32  # paper §3.3: laterals reduced to 32 channels
    # --- Word Guided Dual-Branch Aligner (§3.4) ---
    dim: int = 512  # C of F_coarse, F_A, F_fine (release: 512)
    num_heads: int = 8  # release
    ffn_dim: int = 512  # release: dim_feedforward 512
    n: int = 2  # Local Visual Attention layers (paper §4.2, Table 3)
    decoder_dim: int = 256  # CFS decoder width (release: 512 // 2)
    N_c: int = 32  # response masks / coefficients (paper §4.2, Table 4)
    dropout: float = 0.1  # release transformer dropout
    # --- loss (§3.4: "focal loss and dice loss") ---
    focal_alpha: float = 0.25  # Lin et al. defaults; release -1 (no balancing)
    focal_gamma: float = 2.0  # release 0 (= BCE)
    focal_weight: float = 1.0
    dice_weight: float = 1.0

    @classmethod
    def paper(cls) -> Config:
        """§4.2: the field defaults (CLIP ViT-B/16 at 416 px, 17 tokens, N_c = 32, n = 2).
        For G-Ref the paper uses 22 tokens: --set max_tokens=22."""
        return cls()

    @classmethod
    def tiny(cls) -> Config:
        return cls(
            image_size=64,
            max_tokens=17,
            vocab_size=128,
            pretrained=False,
            # 10 thin layers: the paper's groups 4-6 / 7-9 and a distinct F_H (layer 10).
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=10,
                num_attention_heads=2,
                patch_size=8,
                image_size=64,
            ),
            # eos_token_id=2: HF's legacy value (the repo's convention for tiny CLIP text
            # encoders); ASDA itself finds [EOS] as the argmax of the ids.
            text_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=32,
                bos_token_id=0,
                pad_token_id=1,
                eos_token_id=2,
            ),
            sfa_dim=16,
            dim=32,
            num_heads=2,
            ffn_dim=64,
            decoder_dim=16,
            N_c=8,
            dropout=0.0,
        )


# ---------------------------------------------------------------------------------------------
# Helpers


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
    """The two CLIP towers: from the Hub / a local dir, or random weights from the configs."""
    if not cfg.pretrained:
        text_config = {**cfg.text_config, "vocab_size": cfg.vocab_size}
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
# Blocks, smallest first


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
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(k * C, C), nn.ReLU(), nn.Linear(C, k))
        elif kind == "conv":  # a width-3 convolution sliding across the candidate layers
            self.net = nn.Conv1d(C, 1, kernel_size=3, padding=1)
        else:
            raise ValueError(f"unknown selector '{kind}' for asda; choose from {SELECTORS}")

    def forward(self, score: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            return self.net(score.transpose(1, 2)).squeeze(1)  # (B, C, k) -> (B, 1, k) -> (B, k)
        return self.net(score.flatten(1))  # (B, k*C) -> (B, k)


class AdaptiveFeatureSelection(nn.Module):
    """AFS (§3.3, Eq. 1-3): pick one layer per group and per sample from sentence-class scores.

    The argmax has no gradient. In training we draw the one-hot with straight-through
    Gumbel-softmax: the forward value is exactly F_V^(argmax), and the backward pass sends
    ⟨∂loss/∂F, F_V^(l)⟩ to every candidate's logit, so Φ_T and Φ_as learn which layer helps.
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
                one_hot = F.gumbel_softmax(logits, tau=self.tau, hard=True)  # (B, k), ST grad
            else:
                one_hot = F.one_hot(logits.argmax(-1), len(idx)).to(logits.dtype)  # (B, k)
            # Eq. 2: F_L = F_V^(L), written as a one-hot mixture so the ST gradient can flow
            candidates = torch.stack([patches[i] for i in idx], dim=1)  # (B, k, H*W, C_v)
            selected.append(torch.einsum("bk,bknc->bnc", one_hot, candidates))  # (B, H*W, C_v)
            layers.append(torch.tensor(idx, device=logits.device)[one_hot.argmax(-1)])  # (B,)
        return selected, torch.stack(layers, dim=1), torch.stack(probs, dim=1)


class ScaleWiseFeatureAggregator(nn.Module):
    """SFA (§3.3, Eq. 4-5): f_E ⊙ F_H, plus down-sampled F_L, F_M through 32-channel laterals."""

    def __init__(self, C_v: int, C_t: int, sfa_dim: int, dim: int):
        super().__init__()
        self.sentence_proj = nn.Linear(C_t, C_v)  # f_E into the visual width for Eq. 4
        self.up_L = conv_bn_relu(C_v, sfa_dim, 1)  # Φ_up's channel reduction for F~_L
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
        # Eq. 5: F'_L = Φ_up(F~_L), up-sampled to F~_M's grid (x2 up to rounding), 32 channels
        F_L_prime = self.up_L(resize(F_L_tilde, F_M_tilde))  # (B, sfa_dim, H/2, W/2)
        # Eq. 5: F'_M = Φ_lateral(F~_M) + F'_L
        F_M_prime = self.lateral_M(F_M_tilde) + F_L_prime  # (B, sfa_dim, H/2, W/2)
        # Eq. 5: F_coarse = Φ_agg(Φ_lateral(F_G) + Φ_up(F'_M)), then flattened
        F_coarse = self.agg(self.lateral_G(F_G) + resize(F_M_prime, F_G))  # (B, dim, H, W)
        return F_coarse.flatten(2).transpose(1, 2)  # (B, H*W, dim)


def resize(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of x (B, C, h, w) to like's spatial size (Φ_up)."""
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class ConcatFusion(nn.Module):
    """Ablation `no_sfa` (Table 2 rows b/c): CRIS-style concatenation + projection, one scale."""

    def __init__(self, C_v: int, C_t: int, dim: int):
        super().__init__()
        self.sentence_proj = nn.Linear(C_t, C_v)
        self.proj = nn.Sequential(conv_bn_relu(3 * C_v, dim, 1), nn.Conv2d(dim, dim, 3, padding=1))

    def forward(self, F_L, F_M, F_H, f_E):
        F_G = F_H * self.sentence_proj(f_E)[:, :, None, None]  # Eq. 4, (B, C_v, H, W)
        F_coarse = self.proj(torch.cat([F_L, F_M, F_G], dim=1))  # (B, 3*C_v, H, W) -> (B, dim, ..)
        return F_coarse.flatten(2).transpose(1, 2)  # (B, H*W, dim)


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
            # Eq. 7: F_A^(i) = conv3x3(up(F_A^(i-1))), i = 1, 2, 3
            x = block(F.interpolate(x, scale_factor=2, mode="nearest"))  # (B, C, 2h, 2w)
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

    def forward(self, F_A, f_T, pad):
        """F_A (B, H*W, dim); f_T (B, L, dim); pad (B, L) bool, True = padding (ignored keys)."""
        t = self.norm_t(f_T)
        # Eq. 8: F'_K = MHCA(LN(F_A), LN(f_T)) + F_A
        F_K = F_A + self.drop(
            self.attn(self.norm_v(F_A), t, t, key_padding_mask=pad, need_weights=False)[0]
        )  # (B, H*W, dim)
        # Eq. 8: F_fine = MLP(F'_K) + F'_K
        return F_K + self.drop(self.mlp(self.norm2(F_K)))


class GatedCoefficientGeneration(nn.Module):
    """Φ_coef (Eq. 9): two 3x3 convs and a 1x1 conv to N_c channels, pooled, then tanh."""

    def __init__(self, dim: int, N_c: int):
        super().__init__()
        self.convs = nn.Sequential(
            conv_bn_relu(dim, dim, 3), conv_bn_relu(dim, dim, 3), nn.Conv2d(dim, N_c, 1)
        )

    def forward(self, F_fine: torch.Tensor) -> torch.Tensor:
        """F_fine (B, dim, H, W) -> f_coef (B, N_c) in (-1, 1)."""
        # Global average pooling turns the N_c maps into one coefficient each (see docstring).
        return torch.tanh(self.convs(F_fine).mean(dim=(2, 3)))  # Eq. 9


def combine_masks(f_coef: torch.Tensor, M_prime: torch.Tensor) -> torch.Tensor:
    """Eq. 10: M = reshape(Σ_k f_coef[k] · M'[k]).

    f_coef (B, N_c), M' (B, N_c, h, w) -> M (B, 1, h, w)."""
    return torch.einsum("bk,bkhw->bhw", f_coef, M_prime).unsqueeze(1)


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

        # §3.3: AFS, or the fixed layers of Table 2 row b
        self.afs = None
        if "manual_layers" not in ablate:
            self.afs = AdaptiveFeatureSelection(C_v, C_t, (cfg.low_layers, cfg.mid_layers), cfg)
        # §3.3: SFA, or the single-scale concatenation of Table 2 rows b/c
        if "no_sfa" in ablate:
            self.fusion = ConcatFusion(C_v, C_t, cfg.dim)
        else:
            self.fusion = ScaleWiseFeatureAggregator(C_v, C_t, cfg.sfa_dim, cfg.dim)

        # §3.4, CFS: n layers of Local Visual Attention and the segmentation decoder
        self.local_attention = nn.ModuleList(
            LocalVisualAttentionLayer(cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.dropout)
            for _ in range(cfg.n)
        )
        self.dual_branch = not ablate & {"single_branch", "no_wcg"}
        self.decoder = SegmentationDecoder(
            cfg.dim, cfg.decoder_dim, cfg.N_c if self.dual_branch else 1
        )
        # §3.4, WCG: word cross-attention (also used by the single-branch ablation) and Φ_coef
        if "no_wcg" not in ablate:
            self.word_proj = nn.Linear(C_t, cfg.dim)  # f_T into the aligner width
            self.word_attention = VisualLanguageAttention(
                cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.dropout
            )
        if self.dual_branch:
            self.coefficients = GatedCoefficientGeneration(cfg.dim, cfg.N_c)

    def forward(self, images, input_ids, attention_mask, targets=None) -> dict:
        """images (B, 3, H*P, W*P), input_ids / attention_mask (B, L) -> dict with
        "mask_logits" (B, 1, 8H, 8W), "selected_layers" (B, 2) long (1-based ids of F_L, F_M),
        "selection_probs" (B, 2, 3) (score_L, score_M; absent with manual_layers) and, given
        targets {"masks": (B, H*P, W*P)}, "loss" and "losses" {"focal", "dice"}."""
        cfg = self.cfg
        B = images.shape[0]
        H = images.shape[-2] // self.features.patch_size
        W = images.shape[-1] // self.features.patch_size
        out = {}

        # §3.2: features of every ViT layer, the words and the sentence
        patches, f_C, f_T, f_E = self.features(images, input_ids, attention_mask)

        # §3.3, Eq. 1-3: F_L from layers 4-6 and F_M from layers 7-9, chosen per sample
        if self.afs is not None:
            (F_L, F_M), layers, probs = self.afs(patches, f_C, f_E)
            out["selection_probs"] = probs  # (B, 2, 3): score_L and score_M
        else:
            F_L, F_M = patches[cfg.manual_layers[0]], patches[cfg.manual_layers[1]]
            layers = torch.tensor(cfg.manual_layers, device=images.device).expand(B, 2)
        out["selected_layers"] = layers  # (B, 2) long, 1-based layer ids
        F_H = patches[self.num_layers]  # highest-level feature: the last layer's output
        F_L, F_M, F_H = (tokens_to_map(x, H, W) for x in (F_L, F_M, F_H))  # (B, C_v, H, W)

        # Eq. 4-5: F_coarse (B, H*W, dim)
        F_coarse = self.fusion(F_L, F_M, F_H, f_E)

        # Eq. 6: CFS Local Visual Attention, n layers -> F_A
        pos = sine_position_2d(H, W, cfg.dim, images.device).to(F_coarse.dtype)  # (H*W, dim)
        F_A = F_coarse
        for layer in self.local_attention:
            F_A = layer(F_A, pos)  # (B, H*W, dim)

        if "no_wcg" in cfg.ablate:  # Table 2 row d: decode the mask from F_A alone
            out["mask_logits"] = self.decoder(tokens_to_map(F_A, H, W))  # (B, 1, 8H, 8W)
        else:
            f_T = self.word_proj(f_T)  # (B, L, dim)
            F_fine = self.word_attention(F_A, f_T, pad=attention_mask == 0)  # Eq. 8
            if self.dual_branch:
                # Eq. 7: response masks M' from F_A (CFS branch); words never enter them
                M_prime = self.decoder(tokens_to_map(F_A, H, W)).sigmoid()  # (B, N_c, 8H, 8W)
                f_coef = self.coefficients(tokens_to_map(F_fine, H, W))  # Eq. 9, (B, N_c)
                out["mask_logits"] = combine_masks(f_coef, M_prime)  # Eq. 10, (B, 1, 8H, 8W)
            else:  # Table 2 row e: single branch, the mask is decoded from the word-fused F_fine
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
    for name in cfg.ablate:
        if name not in ABLATIONS:
            raise ValueError(f"unknown ablation '{name}' for asda; choose from {sorted(ABLATIONS)}")
    if {"single_branch", "no_wcg"} <= set(cfg.ablate):
        raise ValueError("asda: choose one of the ablations 'single_branch' and 'no_wcg'")
    if {"manual_layers", "frozen_selector"} <= set(cfg.ablate):
        raise ValueError("asda: 'manual_layers' has no selector, so 'frozen_selector' is moot")
    if cfg.selector not in SELECTORS:
        raise ValueError(f"unknown selector '{cfg.selector}' for asda; choose from {SELECTORS}")
    return ASDA(cfg)


def sample_extra(outputs: dict, i: int, tokenizer) -> tuple[np.ndarray | None, str]:
    """No extra map; the caption names the layers AFS picked for sample i."""
    low, mid = outputs["selected_layers"][i].tolist()
    return None, f"layers {low} / {mid}"


if __name__ == "__main__":
    cfg = Config.tiny()
    model = build_model(cfg)
    B, L = 2, cfg.max_tokens
    ids = torch.randint(3, cfg.vocab_size - 2, (B, L))
    ids[:, 0], ids[:, 6:] = cfg.vocab_size - 2, cfg.vocab_size - 1  # [SOS] w1..w5 [EOS] pad
    mask = (torch.arange(L) <= 6).long().expand(B, L)
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size)
    targets = {"masks": (torch.rand(B, cfg.image_size, cfg.image_size) > 0.5).float()}
    out = model(images, ids, mask, targets)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M, mask_logits {tuple(out['mask_logits'].shape)}")
    print(f"selected layers {out['selected_layers'].tolist()}, loss {out['loss'].item():.4f}")
