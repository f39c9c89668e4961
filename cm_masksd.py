"""CM-MaskSD: Cross-Modality Masked Self-Distillation for Referring Image Segmentation.

Paper: "CM-MaskSD: Cross-Modality Masked Self-Distillation for Referring Image Segmentation",
Wenxuan Wang, Jing Liu, Xingjian He, Yisi Zhang, Chen Chen, Jiachen Shen, Yan Zhang, Jiangyun Li.
IEEE Transactions on Multimedia 2024. https://arxiv.org/abs/2305.11481 · no public code (the
repository https://github.com/Rubics-Xuan/CM-MaskSD holds a README only). The main branch is CRIS
(https://github.com/DerrickWang005/CRIS.pytorch) on CLIP ViT-B/16.

Idea. The main branch is a CRIS segmenter on CLIP: image and text encoders (Eq. 1), a neck that
fuses three ViT layers with the sentence feature, a vision-language decoder that lets every pixel
attend to the words, and a dynamic-kernel projector (Eq. 2). Training adds two masked copies of
the same network (all weights shared). LMVSD ranks the image patches by their correlation with the
sentence, takes the top T = TopK·N and replaces α of them by one learnable token at the embedding
level, runs the image encoder, neck and decoder again and asks the result to match the main
branch's prediction (Eq. 3-5). VMLSD does the same to the words, ranked by their correlation with
the image's class token (Eq. 6-8). Loss = BCE(M_seg, GT) + λ1 BCE(M_LMVSD, M_seg) + λ2
BCE(M_VMLSD, M_seg) (Eq. 9). Inference runs the main branch only: one pass per encoder.

Symbols (paper -> code), shapes with B batch, L tokens, N = h*w patches, C_v / C_t the encoder
widths, P = projection_dim (CLIP's joint space, the paper's C), d the decoder width:
    I, T                      images, input_ids       (B, 3, H, W), (B, L)
    E_I, E_T                  patch / token embeddings (inside the HF encoders; masked by hooks)
    V_local = (v_0..v_N-1)    V_local                 (B, N, P)   last layer, post-LN, projected
    v_global                  v_global                (B, P)      [class] token, post-LN, projected
    W_local = (w_0..w_L-1)    W_local                 (B, L, C_t) words after CLIP's final LN
    w_global                  w_global                (B, P)      [EOS] state, text-projected
    F, F_LMVSD, F_VMLSD       F_vl in segment()       (B, d, h, w) neck (then decoder) output
    M_seg, M_LMVSD, M_VMLSD   M_seg, M_lmvsd, M_vmlsd (B, 1, 4h, 4w) mask logits
    p, q                      p, q                    (B, N), (B, L)  Eq. 3 / Eq. 6
    T = TopK·N, α             T, alpha / cfg.*_topk, cfg.*_alpha
    v', w'                    patch_mask_token, word_mask_token  (C_v,), (C_t,)
    λ1, λ2                    cfg.lmvsd_weight, cfg.vmlsd_weight

Differences from the paper and the released code (one line each; there is no released code):
- Main branch = the CRIS release (neck, decoder with its extra LayerNorms, projector) on HF CLIP.
- Neck taps: hidden_states[4] and [8] (raw residual stream, C_v wide, class token dropped, as
  ETRIS) and the last layer as V_local; `vision_taps` sets the first two.
- Neck: CRIS's FPN without its 2x up-sampling of f5 and 2x2 average pooling of f3, because all ViT
  taps share stride 16; the neck output has stride 16, the logits stride 4 (as CRIS).
- Correlation space: CLIP's joint space: V_local = post_layernorm(patches) @ visual_projection,
  w_global = [EOS] @ text_projection; for Eq. 6 v_global = post_layernorm([class]) @
  visual_projection and every word w_i is text-projected too.
- Correlation normalisation: cosine (both sides L2-normalised, CLIP's own similarity) instead of
  the raw dot product written in Eq. 3 / 6; only the token norms change the ranking.
- The correlation is computed from the main branch's features without gradient (the top-T
  selection is discrete anyway).
- Mask token placement: v' replaces a patch embedding (the conv output) and w' a token embedding
  BEFORE the position embedding is added (SimMIM / BEiT style), so a masked token keeps its
  position; done by a forward hook on the HF embedding layer, without copying library code.
- Rounding: T = ⌊TopK·N + ½⌋ and ⌊α·T + ½⌋ masked tokens (round half up); for words at least one
  is masked whenever T ≥ 1 (with α = 0.1 plain rounding would mask nothing in short sentences).
- N for words counts the real words only: [SOS], [EOS] and padding are never ranked or masked.
- Which α share of the top-T is masked: uniform at random per sample, fresh at every step.
- v' and w' ("randomly initialized learnable tokens") start from N(0, 0.02²).
- Stop-gradient: the distillation target is sigmoid(M_seg).detach() (soft BCE targets); the
  paper does not say, MaskRIS detaches its clean-branch target too.
- Eq. 8 as printed swaps the modalities; we read the prose: W'_local, w'_global = CLIP text
  encoder(W_masked), F_VMLSD = Neck(V_local, w'_global), M_VMLSD = Decoder(F_VMLSD, W'_local).
- The projector's dynamic kernel comes from each branch's own sentence feature (w'_global in
  VMLSD), as CRIS's projector uses the sentence state.
- Decoder words are W_local (CLIP's final LN, no projection, as CRIS); a Linear maps them to d
  only when C_t differs from d (identity for ViT-B/16, whose text width is 512).
- BatchNorm running statistics of the shared neck/projector are updated by all three branches;
  as in CRIS, the neck's BatchNorm1d on the sentence needs training batches of two or more.
- Weight sharing is always on (Table 5's unshared variant is not offered); in eval mode the loss
  is the main BCE only, since the masked branches run in training only.
- Image size 480 (the paper's ablation setting; its main results use 576); CLIP's 14x14 position
  table is resized bicubically by transformers (interpolate_pos_encoding=True). 17 tokens (22 for
  G-Ref: `--set max_tokens=22`). Optimiser and schedule live in train.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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
    "no_lmvsd": "main branch without the language-guided masked visual branch (Table 2)",
    "no_vmlsd": "main branch without the visual-guided masked language branch (Table 2)",
    "random_mask": "mask random patches/words instead of the top-T by correlation (Eq. 3, 6)",
}
# Non-boolean ablations are Config fields: lmvsd_alpha / lmvsd_topk / lmvsd_weight (Table 3),
# vmlsd_alpha / vmlsd_topk / vmlsd_weight (Table 4); both branches off = Table 2's baseline.

# CLIP ViT-B/16 written out, so pretrained=False builds the paper architecture offline.
VIT_B16_VISION = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    patch_size=16,
    image_size=224,
)
VIT_B16_TEXT = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    eos_token_id=2,  # HF's legacy value, as the Hub config: [EOS] is found by argmax of the ids
)


@dataclass
class Config:
    image_size: int = 480  # paper §4.2: 480x480 for the ablations (576 for Table 1)
    max_tokens: int = 17  # paper §4.2 (following CRIS): 17 RefCOCO(+), 22 G-Ref, incl. SOS/EOS
    vocab_size: int = 49408  # CLIP BPE; train.py overwrites it with len(tokenizer)
    threshold: float = 0.35  # paper §4.2: "binarized with a threshold of 0.35"
    pretrained: bool = True  # paper §4.2: "initialized by CLIP"
    vision_name: str = "openai/clip-vit-base-patch16"  # paper §4.2: CLIP ViT-B/16
    text_name: str = "openai/clip-vit-base-patch16"  # text tower + tokenizer (same CLIP)
    vision_config: dict = field(default_factory=lambda: dict(VIT_B16_VISION))
    text_config: dict = field(default_factory=lambda: dict(VIT_B16_TEXT))
    ablate: tuple[str, ...] = ()
    projection_dim: int = 512  # C of Eq. 3 / 6: CLIP ViT-B/16's joint embedding width
    # --- main branch: CRIS neck, decoder and projector (§3.1, Eq. 2) ---
    vision_taps: tuple[int, int] = (4, 8)  # 1-based ViT layers feeding the neck (+ the last)
    neck_dims: tuple[int, int, int] = (256, 512, 1024)  # CRIS fpn_out
    decoder_layers: int = 3  # CRIS: 3 layers, d = neck_dims[1] = 512
    decoder_heads: int = 8
    decoder_ffn: int = 2048
    dropout: float = 0.1
    # --- LMVSD (§3.2, Eq. 3-5, Table 3) ---
    lmvsd_alpha: float = 0.25  # masking ratio α
    lmvsd_topk: float = 0.5  # TopK: share of the patches kept by correlation filtering
    lmvsd_weight: float = 0.75  # λ1 in Eq. 9
    # --- VMLSD (§3.2, Eq. 6-8, Table 4) ---
    vmlsd_alpha: float = 0.1
    vmlsd_topk: float = 0.5
    vmlsd_weight: float = 0.1  # λ2 in Eq. 9

    @classmethod
    def paper(cls) -> Config:
        return cls()

    @classmethod
    def tiny(cls) -> Config:
        return cls(
            image_size=64,
            max_tokens=17,
            vocab_size=128,
            pretrained=False,
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=2,
                patch_size=8,
                image_size=64,
            ),
            # eos_token_id=2 is HF's legacy value: EOS is then found by argmax of the ids.
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
            projection_dim=32,
            vision_taps=(1, 2),
            neck_dims=(16, 32, 64),
            decoder_layers=1,
            decoder_heads=2,
            decoder_ffn=64,
            dropout=0.0,
        )


# ---------------------------------------------------------------------------------------------
# Helpers


def conv_layer(c_in: int, c_out: int, k: int) -> nn.Sequential:
    """CRIS `conv_layer`: k x k convolution (same padding, no bias) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


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


def tokens_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h*w, C) -> (B, C, h, w)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def word_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool, True on the real words: not [SOS] (position 0), not [EOS], not padding.

    [EOS] is the largest id in CLIP's vocabulary and argmax returns its first occurrence, which
    matters because HF's CLIP tokenizer pads with [EOS] as well.
    """
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
    eos = input_ids.argmax(dim=-1, keepdim=True)  # (B, 1)
    return attention_mask.bool() & (pos != 0) & (pos != eos)


def round_half_up(x: torch.Tensor) -> torch.Tensor:
    """⌊x + ½⌋ as long: 2.5 -> 3 (Python's round() would give 2)."""
    return torch.floor(x + 0.5).long()


@torch.no_grad()
def correlation(query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Eq. 3 / Eq. 6: query (B, C) · every token (B, N, C) -> (B, N), cosine similarity."""
    query, tokens = F.normalize(query.float(), dim=-1), F.normalize(tokens.float(), dim=-1)
    return torch.einsum("bc,bnc->bn", query, tokens)


@torch.no_grad()
def select_tokens(
    scores: torch.Tensor, valid: torch.Tensor, top_k: float, alpha: float, at_least_one: bool
) -> torch.Tensor:
    """Correlation filtering + random masking (Eq. 3-4 / 6-7) -> (B, N) bool, True = mask.

    Per sample: T = TopK · (number of valid tokens) tokens with the highest score are kept by
    the filter, and α·T of them, chosen uniformly at random, are masked.
    """
    T = round_half_up(top_k * valid.sum(1).float())  # (B,)
    k = round_half_up(alpha * T.float())  # (B,) how many to mask
    if at_least_one:  # words: never a masked branch that masks nothing
        k = torch.where(T > 0, k.clamp(min=1), k)
    scores = scores.float().masked_fill(~valid, float("-inf"))
    rank = scores.argsort(dim=1, descending=True).argsort(dim=1)  # (B, N), 0 = best
    top = rank < T[:, None]  # the T most correlated valid tokens
    # A random order inside the top-T (tokens outside it sort last), the first k are masked.
    shuffle = torch.rand_like(scores).masked_fill(~top, 2.0)
    return shuffle.argsort(dim=1).argsort(dim=1) < k[:, None]


@contextmanager
def replace_embeddings(layer: nn.Module, mask: torch.Tensor, token: torch.Tensor) -> Iterator[None]:
    """Inside the `with` block, outputs of `layer` at the masked positions become `token`.

    Used on CLIP's patch-embedding conv (output (B, C_v, h, w), mask (B, h*w)) and on its token
    embedding (output (B, L, C_t), mask (B, L)): both run before the position embedding is added,
    so the encoder sees "mask token + position" at a masked place (Eq. 4 / 7). With no position
    masked the output is bit-identical to a normal pass.
    """

    def hook(module, inputs, out):
        if out.dim() == 4:  # patch embeddings (B, C_v, h, w)
            where = mask.view(out.shape[0], 1, *out.shape[2:])  # (B, 1, h, w)
            value = token.view(1, -1, 1, 1)
        else:  # token embeddings (B, L, C_t)
            where, value = mask[..., None], token  # (B, L, 1), (C_t,)
        return torch.where(where, value.to(out.dtype), out)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


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


def load_clip(cfg: Config) -> tuple[CLIPModel, CLIPModel]:
    """CLIP for the image and for the text tower (the same model unless the names differ):
    from the Hub / a local dir, or random weights from the configs."""
    if not cfg.pretrained:
        text_config = {**cfg.text_config, "vocab_size": cfg.vocab_size}
        clip = CLIPModel(
            CLIPConfig(
                vision_config=cfg.vision_config,
                text_config=text_config,
                projection_dim=cfg.projection_dim,
            )
        )
        return clip, clip

    # A full CLIPModel checkpoint loads without "unexpected key" reports; we keep its parts.
    vision_clip = from_pretrained(CLIPModel, cfg.vision_name)
    text_clip = (
        vision_clip
        if cfg.text_name == cfg.vision_name
        else from_pretrained(CLIPModel, cfg.text_name)
    )
    return vision_clip, text_clip


# ---------------------------------------------------------------------------------------------
# Blocks, smallest first: the CRIS neck, vision-language decoder and projector (§3.1, Eq. 2)


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

    def __init__(self, P: int, d: int, kernel_size: int = 3):
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


# ---------------------------------------------------------------------------------------------
# The model


class VisualFeatures(NamedTuple):
    taps: tuple[torch.Tensor, torch.Tensor]  # two intermediate ViT layers, (B, C_v, h, w) each
    V_local: torch.Tensor  # (B, N, P)
    v_global: torch.Tensor  # (B, P)
    grid: tuple[int, int]  # (h, w)


class TextFeatures(NamedTuple):
    W_local: torch.Tensor  # (B, L, C_t)
    w_global: torch.Tensor  # (B, P)


class CMMaskSD(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        vision_clip, text_clip = load_clip(cfg)
        # The towers and projections only; CLIP's logit_scale (contrastive temperature) is unused.
        self.vision = vision_clip.vision_model  # CLIPVisionModel: embeddings, encoder, LNs
        self.visual_projection = vision_clip.visual_projection
        self.text = text_clip.text_model  # CLIPTextModel
        self.text_projection = text_clip.text_projection
        C_v, C_t = self.vision.config.hidden_size, self.text.config.hidden_size
        P = self.visual_projection.out_features
        if self.text_projection.out_features != P:
            raise ValueError("cm_masksd: the image and text CLIP must share one projection width")
        num_layers = self.vision.config.num_hidden_layers
        for layer in cfg.vision_taps:
            if not 1 <= layer < num_layers:
                raise ValueError(f"vision tap {layer} outside the ViT's layers 1..{num_layers - 1}")
        self.patch_size = self.vision.config.patch_size

        d = cfg.neck_dims[1]
        self.neck = Neck(C_v, P, cfg.neck_dims)
        self.word_proj = nn.Linear(C_t, d) if C_t != d else nn.Identity()
        self.decoder = VisionLanguageDecoder(
            d, cfg.decoder_layers, cfg.decoder_heads, cfg.decoder_ffn, cfg.dropout
        )
        self.projector = Projector(P, d)

        # Eq. 4 / Eq. 7: one learnable mask token per masked branch ("randomly initialized").
        self.use_lmvsd = "no_lmvsd" not in cfg.ablate
        self.use_vmlsd = "no_vmlsd" not in cfg.ablate
        if self.use_lmvsd:
            self.patch_mask_token = nn.Parameter(0.02 * torch.randn(C_v))  # v'
        if self.use_vmlsd:
            self.word_mask_token = nn.Parameter(0.02 * torch.randn(C_t))  # w'

    # --- Eq. 1: the two CLIP encoders -----------------------------------------------------

    def encode_image(self, images: torch.Tensor) -> VisualFeatures:
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        # interpolate_pos_encoding: CLIP's position table is resized to the input's grid (and
        # left unchanged when the sizes already match).
        out = self.vision(
            pixel_values=images, output_hidden_states=True, interpolate_pos_encoding=True
        )
        # hidden_states[i] = output of layer i (1-based; [0] = the embeddings), (B, 1+N, C_v)
        # with the class token first.
        taps = tuple(tokens_to_map(out.hidden_states[i][:, 1:], h, w) for i in self.cfg.vision_taps)
        tokens = self.visual_projection(self.vision.post_layernorm(out.last_hidden_state))
        return VisualFeatures(taps, tokens[:, 1:], tokens[:, 0], (h, w))  # (B, N, P), (B, P)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        out = self.text(input_ids=input_ids, attention_mask=attention_mask)
        # last_hidden_state is after CLIP's final LayerNorm; pooler_output is its [EOS] state.
        return TextFeatures(out.last_hidden_state, self.text_projection(out.pooler_output))

    # --- Eq. 2 (and the second lines of Eq. 5 / 8): neck, decoder, projector ---------------

    def segment(self, vis: VisualFeatures, txt: TextFeatures, pad_mask) -> torch.Tensor:
        h, w = vis.grid
        v5 = tokens_to_map(vis.V_local, h, w)  # (B, P, h, w)
        F_vl = self.neck(*vis.taps, v5, txt.w_global)  # F = Neck(V_local, w_global)
        F_vl = self.decoder(F_vl, self.word_proj(txt.W_local), pad_mask)  # (B, d, h, w)
        return self.projector(F_vl, txt.w_global)  # M (B, 1, 4h, 4w)

    # --- Eq. 3-5: language-guided masked visual self-distillation ---------------------------

    @torch.no_grad()
    def lmvsd_mask(self, vis: VisualFeatures, txt: TextFeatures) -> torch.Tensor:
        """Eq. 3-4: which patches get v' -> (B, N) bool."""
        p = correlation(txt.w_global, vis.V_local)  # Eq. 3: p_i = w_global · v_i, (B, N)
        if "random_mask" in self.cfg.ablate:
            p = torch.rand_like(p)
        valid = torch.ones_like(p, dtype=torch.bool)
        return select_tokens(p, valid, self.cfg.lmvsd_topk, self.cfg.lmvsd_alpha, False)

    def lmvsd_branch(self, images, patch_mask, txt: TextFeatures, pad_mask) -> torch.Tensor:
        """Eq. 5: V'_local = CLIP image encoder(V_masked), then the shared neck and decoder."""
        with replace_embeddings(
            self.vision.embeddings.patch_embedding, patch_mask, self.patch_mask_token
        ):
            vis_masked = self.encode_image(images)
        return self.segment(vis_masked, txt, pad_mask)  # M_LMVSD

    # --- Eq. 6-8: visual-guided masked language self-distillation ---------------------------

    @torch.no_grad()
    def vmlsd_mask(self, vis: VisualFeatures, txt: TextFeatures, words: torch.Tensor):
        """Eq. 6-7: which words get w' -> (B, L) bool; words (B, L) marks the real words."""
        q = correlation(vis.v_global, self.text_projection(txt.W_local))  # Eq. 6, (B, L)
        if "random_mask" in self.cfg.ablate:
            q = torch.rand_like(q)
        return select_tokens(q, words, self.cfg.vmlsd_topk, self.cfg.vmlsd_alpha, True)

    def vmlsd_branch(self, vis: VisualFeatures, input_ids, attention_mask, word_mask):
        """Eq. 8: W'_local, w'_global = CLIP text encoder(W_masked), then neck and decoder."""
        with replace_embeddings(
            self.text.embeddings.token_embedding, word_mask, self.word_mask_token
        ):
            txt_masked = self.encode_text(input_ids, attention_mask)
        return self.segment(vis, txt_masked, attention_mask == 0)  # M_VMLSD

    def forward(self, images, input_ids, attention_mask, targets=None) -> dict:
        cfg = self.cfg
        pad_mask = attention_mask == 0  # (B, L) True = ignore (HF CLIP pads with [EOS])
        vis = self.encode_image(images)  # Eq. 1
        txt = self.encode_text(input_ids, attention_mask)
        M_seg = self.segment(vis, txt, pad_mask)  # Eq. 2, (B, 1, 4h, 4w)
        out = {"mask_logits": M_seg}
        if targets is None:  # inference: the main branch only
            return out

        losses = {"seg": common.bce_loss(M_seg, targets["masks"])}  # Loss_seg (Eq. 9)
        loss = losses["seg"]
        # The teacher is the main branch's own prediction, without gradient (see docstring).
        teacher = M_seg.detach().sigmoid()
        if self.use_lmvsd:
            patch_mask = self.lmvsd_mask(vis, txt)  # (B, N)
            out["lmvsd_mask"] = patch_mask.view(-1, *vis.grid)  # (B, h, w), for samples.png
            if self.training:
                M_lmvsd = self.lmvsd_branch(images, patch_mask, txt, pad_mask)
                losses["lmvsd"] = common.bce_loss(M_lmvsd, teacher)  # Loss_LMVSD
                loss = loss + cfg.lmvsd_weight * losses["lmvsd"]
        if self.use_vmlsd:
            word_mask = self.vmlsd_mask(vis, txt, word_positions(input_ids, attention_mask))
            out["vmlsd_mask"] = word_mask  # (B, L)
            if self.training:
                M_vmlsd = self.vmlsd_branch(vis, input_ids, attention_mask, word_mask)
                losses["vmlsd"] = common.bce_loss(M_vmlsd, teacher)  # Loss_VMLSD
                loss = loss + cfg.vmlsd_weight * losses["vmlsd"]
        out["losses"], out["loss"] = losses, loss  # Eq. 9: Loss_total
        return out


def build_model(cfg: Config) -> nn.Module:
    for name in cfg.ablate:
        if name not in ABLATIONS:
            raise ValueError(
                f"unknown ablation '{name}' for cm_masksd; choose from {sorted(ABLATIONS)}"
            )
    for name in ("lmvsd_alpha", "lmvsd_topk", "vmlsd_alpha", "vmlsd_topk"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"cm_masksd: {name} must lie in [0, 1], got {getattr(cfg, name)}")
    return CMMaskSD(cfg)


def sample_extra(outputs: dict, i: int, tokenizer) -> tuple[np.ndarray | None, str]:
    """The patch grid LMVSD masks for sample i (1 = replaced by v') and how many patches."""
    if "lmvsd_mask" not in outputs:
        return None, ""
    grid = outputs["lmvsd_mask"][i].float().cpu().numpy()  # (h, w)
    return grid, f"LMVSD masked {int(grid.sum())} patches"


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
    print(
        {k: round(v.item(), 4) for k, v in out["losses"].items()}, f"loss {out['loss'].item():.4f}"
    )
