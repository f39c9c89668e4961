"""M3Dec: Multi-Modal Mutual Attention and Iterative Interaction for Referring Image Segmentation.

Chang Liu, Henghui Ding, Yulun Zhang, Xudong Jiang. IEEE Transactions on Image Processing 32,
3054-3065, 2023. https://arxiv.org/abs/2305.15302

Idea. In a generic transformer decoder the words only *weigh* vision features: the output for each
word is a mix of pixels (language-attended vision feature, LAV), so language fades away layer after
layer. Multi-Modal Mutual Attention (M3Att, Eq. 1-2) computes one word-pixel matrix A_mut and
normalises it along both axes: along pixels it gives LAV (one vision vector per word), along words
it gives the vision-attended language feature VAL (one language vector per pixel). Their product
F_mul = F_V^a (F_L^a)^T is a genuinely multi-modal feature. A stack of M3Dec layers (Fig. 3c) uses
it as the value of a cross-attention; Iterative Multi-Modal Interaction (IMI, Eq. 3, Fig. 4) puts
freshly transformed language back in between layers; Language Feature Reconstruction (LFR, Eq. 4,
Fig. 5) is a training-only loss asking the last decoder output to still contain the sentence. A mask
decoder (Fig. 6) uses the decoder's word features as 1x1 kernels over the encoded image.

Pipeline (Fig. 2), with the transformer-backbone row of Table IV (Swin-B + BERT, 480 px):
    image -> Swin pyramid -> stride-16 map F_vis -> N_enc transformer encoder layers -> F_enc
    text  -> BERT -> F_t (one vector per token), F_t' (sentence)
    F_t -> M3Dec layer -> IMI -> M3Dec layer -> IMI -> M3Dec layer -> F_dec   (N_dec = 3)
    (F_dec, F_enc) -> mask decoder -> mask logits (stride 2);  F_dec -> LFR loss (training only)

Symbols (paper -> code). Shapes: B batch, N_t = max_tokens words, C channels, HW pixels of F_enc.
    F_vis, F_enc              F_vis (B, C, H, W), F_enc (B, HW, C)
    F_t, F_t'                 F_t (B, N_t, C), F_t_sent (B, C)
    F_L^k, F_L^v, F_V^k, F_V^v   MutualAttention.key_L / value_L / key_V / value_V outputs
    A_mut (Eq. 1)             A_mut (B, N_t, HW)
    softmax(A_mut), softmax(A_mut^T)   attn_V (B, N_t, HW), attn_L (B, HW, N_t)
    F_V^a (LAV), F_L^a (VAL)  F_V_a (B, N_t, C), F_L_a (B, HW, C)
    F_mul                     F_mul (B, N_t, HW), projected back to (B, N_t, C)
    F_q                       F_q: the query after the layer's self-attention
    F_dec^n, F_l^n, F_i^n, w_ci^n   IterativeInteraction: F_dec, F_l, F_i, w_ci
    W_a^n, W_l'^n (Eq. 3)     IterativeInteraction.W_a, .W_l
    e, W_proj, F_proj, F_rec  LanguageReconstruction.e / .W_proj, F_proj (B, C), F_rec (B, C)
    w_mask, w_rec (Eq. 5)     Config.w_mask = 1, Config.w_rec = 0.1

Ablations (`--ablate a,b`; the number of M3Dec layers is `--set num_dec_layers=1..4`):
    Table I:   num_dec_layers x {shared (default), independent_matrices, generic_attention}
    Table II:  #0 generic_attention,no_imi,no_lfr  #1 no_imi,no_lfr  #2 no_lfr
               #3 imi_fixed_ft,no_lfr  #4 (nothing)
    Table III: vlt_mask_decoder (the "Concate" row is not implemented)

Differences from the paper. No official code exists; every choice below is ours, one line each:
- Encoders: HF SwinBackbone (Swin-B, window 12, 384 in22k) + BertModel, every layer trained; the
  paper's text describes its CNN + bi-LSTM row and does not say what is frozen in the Swin row.
- F_vis: Swin stages 2-4 (strides 8/16/32) fused into one stride-16 map (1x1 conv each, stride 32
  upsampled, stride 8 average-pooled, concat, 1x1 conv), as VLT's neck feeds a 1/16 map to its
  transformer; the paper only says H x W x C.
- The encoder sees vision only (as the text says); VLT's multiplication with the sentence feature
  before the encoder is not used.
- Encoder positional encoding: a fixed 2-D sine encoding added once to the encoder input.
- Transformer layers (encoder, M3Dec, mask decoder): post-norm as in [5], FFN width 4C, dropout
  0.1, ReLU. The M3Dec layer has residual + LayerNorm around each sub-layer and an FFN (Fig. 3c).
- "All linear layers and convolutions are followed by BN and ReLU" (§IV-A) is applied to feature
  layers (text projection, neck, F_mul projection, IMI language transform, LFR reconstruction MLP,
  mask convs except the last one); attention query/key/value projections are plain linears [5].
- F_t = BERT's last hidden states of all tokens ([CLS] and [SEP] included) -> Linear+BN+ReLU to C;
  F_t' = the projected [CLS] state (the paper's final LSTM state).
- M3Att is single-head with the 1/sqrt(C) scale of Eq. 1; the 8 heads are used in the encoder and
  in the self-/cross-attentions.
- Padded words get -inf before every softmax over words (Eq. 2b, Eq. 3, key padding masks); their
  rows still exist so that N_t is fixed.
- The M3Dec cross-attention uses the M3Att output as key and value (the paper names the value).
- The first M3Dec query is F_t without an added positional encoding (BERT already encodes order).
- Independent matrices: two extra key projections give a second A_mut used for VAL (Eq. 2b);
  the first one stays for LAV (Eq. 2a), as §IV-B describes.
- Generic attention (LAV only): M3Att + cross-attention are replaced by one multi-head
  cross-attention from the query to F_enc (the VLT decoder layer).
- IMI: N_dec - 1 blocks, one between each two successive M3Dec layers; F_l^n = Linear+BN+ReLU of
  F_l^{n-1}; Eq. 3 gets a 1/sqrt(C) scale (none is written; without it the softmax saturates at
  C = 256); softmax over the words of F_l^n; w_ci^n initialised to 1.
- IMI* (imi_fixed_ft): F_i^n := F_t for every block, no language pathway (Table II #3).
- LFR: N_t counts the attended tokens [CLS]..[SEP]; e is the sine/cosine embedding of [5]; the three
  reconstruction linears are Linear+BN+ReLU (so F_rec >= 0 like F_proj); average pooling over the
  attended tokens; MSE over channels; no stop-gradient on either side (the paper mentions none).
- Mask decoder: self-attention over F_dec (8 heads, residual + LayerNorm), F_dec rows as 1x1 kernels
  on F_enc -> N_t maps (padded words zeroed), four 3x3 convs (512 channels) with x2 bilinear
  upsampling between them -> logits at stride 2 (VLT's seg_out_stride = 2).
- VLT mask decoder (ablation): the N_t maps come from Linear(C -> HW) + ReLU on F_dec (VLT's
  `Dense(spatial_size)`), same convs; VLT's query-balance gate is left out and the self-attention
  kept, so only the source of the maps changes.
- Fixed size: F_mul (N_t x HW) -> Linear(HW -> C) ties the model to Config.image_size (and the mask
  decoder to max_tokens); other image sizes raise a ValueError, shorter texts are padded to
  max_tokens, longer ones raise.
- Loss: BCE at the logits' resolution with the GT resized nearest (common.bce_loss); threshold 0.5
  (the BERT-family convention of this repository; VLT used 0.35).
- Visualisation: the last layer's LAV map softmax(A_mut) (Eq. 2a) of the word that receives the
  most VAL attention (sum over pixels of softmax(A_mut^T)); with generic attention, the
  head-averaged cross-attention map of the word with the highest peak.
- Recipe (train.py's business): the paper gives Adam, lr 0.005 with step decay, 50 epochs, batch 48
  for its CNN row and nothing specific for the Swin row.

Reference code: none released. Base architecture: VLT (ICCV'21),
https://github.com/henghuiding/Vision-Language-Transformer (TF/Keras).
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

from common import bce_loss

TEXT_ENCODER = "bert"

ABLATIONS: dict[str, str] = {
    "generic_attention": "generic cross-attention (LAV only) instead of M3Att (Table I, II #0)",
    "independent_matrices": "separate A_mut for LAV and VAL instead of one shared matrix (Table I)",
    "no_imi": "no Iterative Multi-Modal Interaction between M3Dec layers (Table II #1)",
    "imi_fixed_ft": "IMI injects the fixed word feature F_t instead of F_i^n (Table II #3, IMI*)",
    "no_lfr": "no Language Feature Reconstruction loss (Table II #2)",
    "vlt_mask_decoder": "VLT mask decoder: maps from F_dec alone, F_enc not used (Table III)",
}

# Swin-B, window 12, pre-trained at 384 px: the architecture of the paper() checkpoint, written out
# so that pretrained=False builds it without a download.
SWIN_B = dict(
    embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12, image_size=384
)


@dataclass
class Config:
    # --- fields every method has ---
    image_size: int = 480  # §IV-A: 480 x 480 for the transformer backbone
    max_tokens: int = 20  # [CLS] + words + [SEP], BERT family of this repository
    vocab_size: int = 30522  # bert-base-uncased; train.py sets len(tokenizer)
    threshold: float = 0.5
    pretrained: bool = True
    vision_name: str = "microsoft/swin-base-patch4-window12-384-in22k"
    text_name: str = "bert-base-uncased"
    vision_config: dict = field(default_factory=lambda: dict(SWIN_B))
    text_config: dict = field(default_factory=dict)  # BertConfig() defaults = bert-base
    ablate: tuple[str, ...] = ()
    # --- M3Dec ---
    hidden_dim: int = 256  # C, §IV-A: 256 for the transformers
    mask_dim: int = 512  # §IV-A: 512 in the mask decoder
    num_heads: int = 8  # §IV-A: 8 heads in all transformer layers
    num_enc_layers: int = 2  # N_enc, §IV-A
    num_dec_layers: int = 3  # N_dec, Table I (1-4), 3 is the default setup
    ffn_dim: int = 1024  # not given; 4C as in [5]
    dropout: float = 0.1  # not given; [5] and VLT use 0.1
    w_ci_init: float = 1.0  # IMI's learnable scalar w_ci (§III-B), initial value not given
    w_mask: float = 1.0  # Eq. (5), §IV-A
    w_rec: float = 0.1  # Eq. (5), §IV-A

    @classmethod
    def paper(cls) -> Config:
        """Swin-B + bert-base-uncased at 480 px, C = 256 / 512, 8 heads, 2 + 3 layers (§IV-A)."""
        return cls()

    @classmethod
    def tiny(cls) -> Config:
        """Random-init small encoders for tests and the CPU demo (64 px -> an 8 x 8 F_enc).

        Swin patch 2 instead of 4: with patch 4, F_enc would be 4 x 4, too coarse for the 8-16 px
        objects of the synthetic world (mIoU 0.13 after 3000 CPU steps against about 0.3 after
        600 with patch 2); the paper has 30 x 30 at 480 px."""
        return cls(
            image_size=64,
            vocab_size=128,
            pretrained=False,
            vision_config=dict(
                image_size=64,
                patch_size=2,
                embed_dim=16,
                depths=[1, 1, 1, 1],
                num_heads=[1, 2, 4, 8],
                window_size=2,
            ),
            text_config=dict(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=32,
            ),
            hidden_dim=32,
            mask_dim=32,
            num_heads=4,
            ffn_dim=64,
            dropout=0.0,
        )


# ---------------------------------------------------------------------------------------------
# Helpers


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


def sine_embedding_1d(n: int, C: int) -> torch.Tensor:
    """The sine/cosine positional embedding of [5]: (n, C), e[p, 2i] = sin(p / 10000^(2i/C)),
    e[p, 2i+1] = cos(p / 10000^(2i/C)). LFR's "cosine positional embedding" e (Eq. 4)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]  # (n, 1)
    freq = torch.exp(torch.arange(0, C, 2, dtype=torch.float32) * (-math.log(10000.0) / C))
    e = torch.zeros(n, C)
    e[:, 0::2] = torch.sin(pos * freq)
    e[:, 1::2] = torch.cos(pos * freq[: C // 2])
    return e


def sine_embedding_2d(h: int, w: int, C: int) -> torch.Tensor:
    """2-D version for the encoder: C/2 channels encode the row, C/2 the column. (h*w, C)."""
    e_y = sine_embedding_1d(h, C // 2)[:, None, :].expand(h, w, C // 2)  # (h, w, C/2)
    e_x = sine_embedding_1d(w, C - C // 2)[None, :, :].expand(h, w, C - C // 2)  # (h, w, C/2)
    return torch.cat([e_y, e_x], dim=-1).reshape(h * w, C)  # (h*w, C)


class LinearBNReLU(nn.Module):
    """Linear -> BatchNorm -> ReLU on a sequence (B, N, C_in) -> (B, N, C_out).

    §IV-A: "All linear layers and convolutions layers are followed by a Batch Normalization and
    ReLU function unless otherwise noticed."
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.linear = nn.Linear(c_in, c_out, bias=False)  # a bias is redundant before BN
        self.bn = nn.BatchNorm1d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)  # (B, N, C_out)
        # BatchNorm1d normalises dim 1, so move channels there and back.
        return F.relu(self.bn(x.transpose(1, 2)).transpose(1, 2))  # (B, N, C_out)


def conv_bn_relu(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


# ---------------------------------------------------------------------------------------------
# Blocks, smallest first


class VisualEncoder(nn.Module):
    """Swin pyramid -> stride-16 map F_vis -> N_enc transformer encoder layers -> F_enc (Fig. 2)."""

    out_features = ["stage2", "stage3", "stage4"]  # strides 8, 16, 32

    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.pretrained:
            self.backbone = from_pretrained(
                SwinBackbone, cfg.vision_name, out_features=self.out_features
            )
        else:
            swin_cfg = SwinConfig(**{**cfg.vision_config, "out_features": self.out_features})
            self.backbone = SwinBackbone(swin_cfg)
        # Frozen on purpose: SwinBackbone wraps a SwinModel whose final LayerNorm only touches
        # last_hidden_state, which the backbone does not return (it has its own per-stage norms).
        self.backbone.swin.layernorm.requires_grad_(False)
        C = cfg.hidden_dim
        # VLT-style neck: every level to C channels, then one fusion conv at stride 16.
        self.lateral = nn.ModuleList(conv_bn_relu(c, C, 1) for c in self.backbone.channels)
        self.fuse = conv_bn_relu(3 * C, C, 1)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                C, cfg.num_heads, cfg.ffn_dim, cfg.dropout, batch_first=True
            )  # post-norm, ReLU FFN as in [5]
            for _ in range(cfg.num_enc_layers)
        )

    @property
    def stride(self) -> int:
        """Stride of F_enc: the patch size times 4 (stage 3 of Swin = 1/16 for patch 4)."""
        return self.backbone.config.patch_size * 4

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """images (B, 3, S, S) -> F_enc (B, HW, C) and the map size (H, W)."""
        f8, f16, f32 = self.backbone(pixel_values=images).feature_maps  # strides 8, 16, 32
        size = f16.shape[-2:]
        f8 = F.adaptive_avg_pool2d(self.lateral[0](f8), size)  # (B, C, H, W), pooled x2
        f16 = self.lateral[1](f16)  # (B, C, H, W)
        f32 = F.interpolate(self.lateral[2](f32), size=size, mode="bilinear", align_corners=False)
        F_vis = self.fuse(torch.cat([f8, f16, f32], dim=1))  # (B, 3C, H, W) -> (B, C, H, W)
        B, C, H, W = F_vis.shape
        x = F_vis.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        x = x + sine_embedding_2d(H, W, C).to(x)  # positional encoding, once at the input
        for layer in self.layers:
            x = layer(x)  # (B, HW, C)
        return x, (H, W)


class MutualAttention(nn.Module):
    """Multi-Modal Mutual Attention, M3Att (§III-A, Eq. 1-2, Fig. 3b).

    One word-pixel matrix A_mut, softmax-normalised along pixels (-> LAV, one vision vector per
    word) and along words (-> VAL, one language vector per pixel); the two are fused as
    F_mul = F_V^a (F_L^a)^T, which has one row per word and one column per *pixel*. The final
    Linear(HW -> C) therefore fixes HW, i.e. the input resolution, at construction time.
    """

    def __init__(self, C: int, HW: int, independent: bool = False):
        super().__init__()
        self.HW = HW
        self.scale = C**-0.5  # 1/sqrt(C), Eq. (1)
        self.key_L, self.value_L = nn.Linear(C, C), nn.Linear(C, C)  # F_L^k, F_L^v
        self.key_V, self.value_V = nn.Linear(C, C), nn.Linear(C, C)  # F_V^k, F_V^v
        self.independent = independent
        if independent:
            # §IV-B: "two extra linear project layers applied on two inputs, generating two A_mut,
            # one for LAV and the other for VAL".
            self.key_L2, self.key_V2 = nn.Linear(C, C), nn.Linear(C, C)
        self.proj = LinearBNReLU(HW, C)  # "project the channel number [HW] back to C"

    def forward(
        self, F_q: torch.Tensor, F_enc: torch.Tensor, pad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """F_q (B, N_t, C) query, F_enc (B, HW, C), pad (B, N_t) True on padding.

        Returns the multi-modal feature (B, N_t, C), attn_V = softmax(A_mut) (B, N_t, HW) and
        attn_L = softmax(A_mut^T) (B, HW, N_t).
        """
        if F_enc.shape[1] != self.HW:
            raise ValueError(
                f"M3Att was built for HW = {self.HW} pixels (F_mul -> C is a Linear of that size), "
                f"got {F_enc.shape[1]}"
            )
        # Eq. (1): A_mut = F_L^k (F_V^k)^T / sqrt(C)
        A_mut = self.key_L(F_q) @ self.key_V(F_enc).transpose(1, 2) * self.scale  # (B, N_t, HW)
        if self.independent:
            A_mut_val = self.key_L2(F_q) @ self.key_V2(F_enc).transpose(1, 2) * self.scale
        else:
            A_mut_val = A_mut  # shared matrix (default setup)
        # Eq. (2a): softmax along the HW axis -> LAV, F_V^a = softmax(A_mut) F_V^v
        attn_V = A_mut.softmax(dim=-1)  # (B, N_t, HW), each word's weights over pixels sum to 1
        F_V_a = attn_V @ self.value_V(F_enc)  # (B, N_t, HW) @ (B, HW, C) -> (B, N_t, C)
        # Eq. (2b): softmax along the N_t axis -> VAL, F_L^a = softmax(A_mut^T) F_L^v
        logits_L = A_mut_val.transpose(1, 2).masked_fill(pad[:, None, :], float("-inf"))
        attn_L = logits_L.softmax(dim=-1)  # (B, HW, N_t), each pixel's weights over words sum to 1
        F_L_a = attn_L @ self.value_L(F_q)  # (B, HW, N_t) @ (B, N_t, C) -> (B, HW, C)
        # Fusion: each LAV vector is a dynamic kernel applied to VAL, F_mul = F_V^a (F_L^a)^T
        F_mul = F_V_a @ F_L_a.transpose(1, 2)  # (B, N_t, C) @ (B, C, HW) -> (B, N_t, HW)
        return self.proj(F_mul), attn_V, attn_L  # (B, N_t, HW) -> (B, N_t, C)


class M3DecLayer(nn.Module):
    """One layer of the Multi-Modal Mutual Decoder (§III-A, Fig. 3c).

    self-attention on the query -> F_q; M3Att(F_q, F_enc) -> multi-modal feature; multi-head
    cross-attention with F_q as query and the multi-modal feature as key/value; FFN. With the
    `generic_attention` ablation the middle part is a plain cross-attention to F_enc (LAV only).
    """

    def __init__(self, cfg: Config, HW: int):
        super().__init__()
        C, heads, p = cfg.hidden_dim, cfg.num_heads, cfg.dropout
        self.generic = "generic_attention" in cfg.ablate
        self.self_attn = nn.MultiheadAttention(C, heads, dropout=p, batch_first=True)
        if not self.generic:
            self.m3att = MutualAttention(C, HW, "independent_matrices" in cfg.ablate)
        self.cross_attn = nn.MultiheadAttention(C, heads, dropout=p, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(C, cfg.ffn_dim), nn.ReLU(), nn.Dropout(p), nn.Linear(cfg.ffn_dim, C)
        )
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(C), nn.LayerNorm(C), nn.LayerNorm(C)
        self.drop = nn.Dropout(p)

    def forward(
        self, query: torch.Tensor, F_enc: torch.Tensor, pad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """query (B, N_t, C), F_enc (B, HW, C), pad (B, N_t) -> output (B, N_t, C), the word->pixel
        attention (B, N_t, HW) and a per-word attention score (B, N_t) for the visualisation."""
        sa = self.self_attn(query, query, query, key_padding_mask=pad, need_weights=False)[0]
        F_q = self.norm1(query + self.drop(sa))  # (B, N_t, C)
        if self.generic:
            # VLT-style layer: words query the vision feature; the output is LAV only.
            out, attn_V = self.cross_attn(F_q, F_enc, F_enc)  # (B, N_t, C), (B, N_t, HW)
            word_scores = attn_V.amax(dim=-1)  # peak of each word's map, (B, N_t)
        else:
            F_m, attn_V, attn_L = self.m3att(F_q, F_enc, pad)  # (B, N_t, C)
            # "we use the multi-modal feature as value input, so that the output can keep its
            # property as a multi-modal feature"
            out = self.cross_attn(F_q, F_m, F_m, key_padding_mask=pad, need_weights=False)[0]
            word_scores = attn_L.sum(dim=1)  # VAL attention each word receives, (B, N_t)
        x = self.norm2(F_q + self.drop(out))  # (B, N_t, C)
        x = self.norm3(x + self.drop(self.ffn(x)))  # (B, N_t, C)
        return x, attn_V, word_scores


class IterativeInteraction(nn.Module):
    """One IMI block between M3Dec layers n and n+1 (§III-B, Eq. 3, Fig. 4).

    A language pathway parallel to the decoder: F_l^n = Linear(F_l^{n-1}) (F_l^0 = F_t); the
    decoder output picks the words it needs, F_i^n = A_l^n ReLU(F_l^n W_l'^n), and gets them back
    as F_dec'^n = BN(F_dec^n + w_ci^n F_i^n). With fixed_language (IMI*, Table II #3) F_i^n = F_t.
    """

    def __init__(self, C: int, w_ci_init: float = 1.0, fixed_language: bool = False):
        super().__init__()
        self.fixed_language = fixed_language
        self.scale = C**-0.5  # NOTE: not in Eq. (3); keeps the softmax out of saturation
        if not fixed_language:
            self.lang_transform = LinearBNReLU(C, C)  # F_l^{n-1} -> F_l^n
            self.W_a = nn.Linear(C, C)  # W_a^n
            self.W_l = nn.Linear(C, C)  # W_l'^n
        self.w_ci = nn.Parameter(torch.tensor(float(w_ci_init)))  # learnable scalar w_ci^n
        self.bn = nn.BatchNorm1d(C)

    def forward(
        self, F_dec: torch.Tensor, F_l_prev: torch.Tensor, pad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """F_dec (B, N_t, C) layer output, F_l_prev (B, N_t, C) previous language feature, pad
        (B, N_t) -> (F_dec' (B, N_t, C) for the next layer, F_l (B, N_t, C) for the next block)."""
        if self.fixed_language:
            F_l = F_i = F_l_prev  # IMI*: every layer receives the same F_t
        else:
            F_l = self.lang_transform(F_l_prev)  # (B, N_t, C)
            # Eq. (3): A_l^n = softmax(ReLU[F_dec^n W_a^n] (F_l^n)^T), over the words of F_l^n
            logits = F.relu(self.W_a(F_dec)) @ F_l.transpose(1, 2) * self.scale  # (B, N_t, N_t)
            A_l = logits.masked_fill(pad[:, None, :], float("-inf")).softmax(dim=-1)
            F_i = A_l @ F.relu(self.W_l(F_l))  # F_i^n = A_l^n F_l'^n, (B, N_t, C)
        # F_dec'^n = BN(F_dec^n + w_ci^n F_i^n)
        F_dec = F_dec + self.w_ci * F_i  # (B, N_t, C)
        return self.bn(F_dec.transpose(1, 2)).transpose(1, 2), F_l


class LanguageReconstruction(nn.Module):
    """Language Feature Reconstruction, LFR (§III-C, Eq. 4, Fig. 5); training only.

    Target: F_proj = 1/(N_t+1) sum ReLU([(F_t + e) (c) F_t'] W_proj), over the N_t attended tokens
    and the sentence feature. Reconstruction: F_rec = AvgPool(three linear layers on F_dec).
    Loss: MSE(F_rec, F_proj).
    """

    def __init__(self, C: int, max_tokens: int):
        super().__init__()
        self.W_proj = nn.Linear(C, C)  # W_proj in R^{C x C}
        self.reconstruct = nn.Sequential(*(LinearBNReLU(C, C) for _ in range(3)))
        self.register_buffer("e", sine_embedding_1d(max_tokens, C), persistent=False)

    def forward(
        self, F_t: torch.Tensor, F_t_sent: torch.Tensor, F_dec: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """F_t (B, N_t, C), F_t_sent (B, C), F_dec (B, N_t, C), keep (B, N_t) float 1 on tokens."""
        X = torch.cat([F_t + self.e, F_t_sent[:, None]], dim=1)  # (F_t + e) (c) F_t', (B, N_t+1, C)
        keep_X = torch.cat([keep, keep.new_ones(keep.shape[0], 1)], dim=1)  # (B, N_t+1)
        # Eq. (4): sum over the sequence, divided by N_t + 1
        F_proj = (F.relu(self.W_proj(X)) * keep_X[..., None]).sum(1) / keep_X.sum(1, True)  # (B, C)
        rec = self.reconstruct(F_dec)  # (B, N_t, C)
        F_rec = (rec * keep[..., None]).sum(1) / keep.sum(1, True)  # average pooling, (B, C)
        return F.mse_loss(F_rec, F_proj)


class MaskDecoder(nn.Module):
    """Mask decoder (§III-D, Fig. 6): self-attention over F_dec, then F_dec's N_t rows act as the
    kernels of a 1x1 convolution over F_enc (N_t maps), then four convolutions with x2 upsampling
    between them (stride 16 -> 2). `vlt_mask_decoder`: the maps come from F_dec alone (Table III).
    """

    def __init__(self, cfg: Config, HW: int):
        super().__init__()
        C, D, N_t = cfg.hidden_dim, cfg.mask_dim, cfg.max_tokens
        self.vlt_style = "vlt_mask_decoder" in cfg.ablate
        self.self_attn = nn.MultiheadAttention(C, cfg.num_heads, cfg.dropout, batch_first=True)
        self.norm = nn.LayerNorm(C)
        if self.vlt_style:
            self.to_maps = nn.Linear(C, HW)  # VLT: Dense(spatial_size, relu) per query
        up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.convs = nn.Sequential(
            conv_bn_relu(N_t, D, 3), up,
            conv_bn_relu(D, D, 3), up,
            conv_bn_relu(D, D, 3), up,
            nn.Conv2d(D, 1, 3, padding=1),  # mask logits: no BN / ReLU on the last one
        )  # fmt: skip

    def forward(
        self, F_dec: torch.Tensor, F_enc: torch.Tensor, pad: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        """F_dec (B, N_t, C), F_enc (B, HW, C), pad (B, N_t), size = (H, W) -> (B, 1, 8H, 8W)."""
        B, N_t, C = F_dec.shape
        sa = self.self_attn(F_dec, F_dec, F_dec, key_padding_mask=pad, need_weights=False)[0]
        kernels = self.norm(F_dec + sa)  # (B, N_t, C)
        if self.vlt_style:
            maps = F.relu(self.to_maps(kernels))  # (B, N_t, HW)
        else:
            # 1x1 convolution whose N_t kernels are the decoder features: sum_c K[n,c] F_enc[p,c]
            maps = kernels @ F_enc.transpose(1, 2)  # (B, N_t, C) @ (B, C, HW) -> (B, N_t, HW)
        maps = maps.masked_fill(pad[..., None], 0.0).view(B, N_t, *size)  # (B, N_t, H, W)
        return self.convs(maps)  # (B, 1, 8H, 8W)


# ---------------------------------------------------------------------------------------------
# The model


class M3Dec(nn.Module):
    """Swin + BERT -> transformer encoder -> M3Dec layers with IMI -> mask decoder (+ LFR)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        C = cfg.hidden_dim
        self.visual_encoder = VisualEncoder(cfg)
        stride = self.visual_encoder.stride
        if cfg.image_size % (2 * stride):
            raise ValueError(
                f"m3dec: image_size must be a multiple of {2 * stride} (twice the stride of "
                f"F_enc), got {cfg.image_size}"
            )
        self.feat_size = cfg.image_size // stride  # F_enc is feat_size x feat_size
        HW = self.feat_size**2
        if cfg.pretrained:
            self.text_encoder = from_pretrained(BertModel, cfg.text_name, add_pooling_layer=False)
        else:
            text_cfg = BertConfig(**{**cfg.text_config, "vocab_size": cfg.vocab_size})
            self.text_encoder = BertModel(text_cfg, add_pooling_layer=False)
        self.text_proj = LinearBNReLU(self.text_encoder.config.hidden_size, C)  # -> F_t
        self.decoder_layers = nn.ModuleList(M3DecLayer(cfg, HW) for _ in range(cfg.num_dec_layers))
        n_imi = 0 if "no_imi" in cfg.ablate else cfg.num_dec_layers - 1  # between layer pairs
        fixed = "imi_fixed_ft" in cfg.ablate
        self.imi = nn.ModuleList(
            IterativeInteraction(C, cfg.w_ci_init, fixed) for _ in range(n_imi)
        )
        self.lfr = None if "no_lfr" in cfg.ablate else LanguageReconstruction(C, cfg.max_tokens)
        self.mask_decoder = MaskDecoder(cfg, HW)

    def _check_inputs(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The architecture has a fixed HW (M3Att's F_mul -> C) and N_t (mask decoder channels)."""
        S = self.cfg.image_size
        if tuple(images.shape[-2:]) != (S, S):
            hw = self.feat_size
            raise ValueError(
                f"m3dec is built for {S}x{S} images: M3Att projects F_mul (N_t x HW, "
                f"HW = {hw}x{hw}) back to C with a Linear of fixed input size, so the resolution "
                f"is part of the architecture. Got {images.shape[-2]}x{images.shape[-1]}; resize "
                f"to image_size or build the model with another image_size."
            )
        L = input_ids.shape[1]
        if L > self.cfg.max_tokens:
            raise ValueError(f"m3dec is built for max_tokens={self.cfg.max_tokens}, got {L} tokens")
        if L < self.cfg.max_tokens:  # pad with [PAD] = 0, attention_mask 0
            input_ids = F.pad(input_ids, (0, self.cfg.max_tokens - L), value=0)
            attention_mask = F.pad(attention_mask, (0, self.cfg.max_tokens - L), value=0)
        return input_ids, attention_mask

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        targets: dict | None = None,
    ) -> dict:
        """images (B, 3, S, S), input_ids / attention_mask (B, L) -> {"mask_logits" (B, 1, S/2,
        S/2), "mutual_attention" (B, H, W), "attended_token_ids" (B,), + "loss", "losses"}."""
        input_ids, attention_mask = self._check_inputs(images, input_ids, attention_mask)
        pad = attention_mask == 0  # (B, N_t), True on padding
        F_enc, size = self.visual_encoder(images)  # (B, HW, C)
        words = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        F_t = self.text_proj(words.last_hidden_state)  # (B, N_t, D_bert) -> (B, N_t, C)
        F_t_sent = F_t[:, 0]  # [CLS] as the sentence feature F_t', (B, C)

        # M3Dec (§III-A) with IMI (§III-B) between successive layers.
        F_dec, F_l = F_t, F_t  # the first query is F_t; F_l^0 = F_t
        for n, layer in enumerate(self.decoder_layers):
            F_dec, attn_V, word_scores = layer(F_dec, F_enc, pad)  # (B, N_t, C)
            if n < len(self.imi):
                F_dec, F_l = self.imi[n](F_dec, F_l, pad)
        logits = self.mask_decoder(F_dec, F_enc, pad, size)  # (B, 1, 8H, 8W)

        out = {"mask_logits": logits}
        out.update(self._most_attended_word(attn_V, word_scores, input_ids, attention_mask, size))
        if targets is not None:
            losses = {"mask": bce_loss(logits, targets["masks"])}
            loss = self.cfg.w_mask * losses["mask"]
            # LFR is a training-only branch: "computationally free during inference" (§III-D)
            if self.lfr is not None and self.training:
                losses["lfr"] = self.lfr(F_t, F_t_sent, F_dec, attention_mask.to(F_t.dtype))
                loss = loss + self.cfg.w_rec * losses["lfr"]  # Eq. (5)
            out["loss"], out["losses"] = loss, losses
        return out

    @staticmethod
    def _most_attended_word(
        attn_V: torch.Tensor,
        word_scores: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        size: tuple[int, int],
    ) -> dict:
        """Last layer's word->pixel map (B, H, W) of the highest-scoring real word and its id."""
        B = input_ids.shape[0]
        rows = torch.arange(B, device=input_ids.device)
        real = attention_mask.bool().clone()  # (B, N_t)
        real[:, 0] = False  # [CLS]
        real[rows, attention_mask.sum(1) - 1] = False  # [SEP] = last attended token
        real = torch.where(real.any(1, keepdim=True), real, attention_mask.bool())  # empty text
        idx = word_scores.detach().masked_fill(~real, float("-inf")).argmax(dim=1)  # (B,)
        amap = attn_V.detach()[rows, idx].reshape(B, *size)  # (B, H, W)
        return {"mutual_attention": amap, "attended_token_ids": input_ids[rows, idx]}


# ---------------------------------------------------------------------------------------------
# Entry points


def build_model(cfg: Config) -> nn.Module:
    unknown = [a for a in cfg.ablate if a not in ABLATIONS]
    if unknown:
        raise ValueError(
            f"unknown ablation '{unknown[0]}' for m3dec; choose from {', '.join(ABLATIONS)}"
        )
    if {"no_imi", "imi_fixed_ft"} <= set(cfg.ablate):
        raise ValueError("m3dec: 'no_imi' and 'imi_fixed_ft' exclude each other")
    if {"generic_attention", "independent_matrices"} <= set(cfg.ablate):
        raise ValueError("m3dec: 'independent_matrices' needs M3Att; drop 'generic_attention'")
    if cfg.num_dec_layers < 1:
        raise ValueError(f"m3dec: num_dec_layers must be >= 1, got {cfg.num_dec_layers}")
    return M3Dec(cfg)


def sample_extra(outputs: dict, i: int, tokenizer) -> tuple[np.ndarray | None, str]:
    """For samples.png: the last M3Dec layer's attention over pixels (Eq. 2a) of the word that
    receives the most attention, captioned with that word."""
    if "mutual_attention" not in outputs:
        return None, ""
    amap = outputs["mutual_attention"][i].float().cpu().numpy()
    token = tokenizer.convert_ids_to_tokens([int(outputs["attended_token_ids"][i])])[0]
    return amap, f"LAV attention (Eq. 2a) of the most attended word '{token}'"


if __name__ == "__main__":  # shape smoke run on the tiny preset
    cfg = Config.tiny()
    model = build_model(cfg)
    B, S, L = 2, cfg.image_size, cfg.max_tokens
    ids = torch.zeros(B, L, dtype=torch.long)
    ids[:, :4] = torch.tensor([2, 5, 6, 3])  # [CLS] w w [SEP]
    out = model(torch.randn(B, 3, S, S), ids, (ids > 0).long(), {"masks": torch.zeros(B, S, S)})
    for k, v in out.items():
        print(k, tuple(v.shape) if torch.is_tensor(v) else {n: x.item() for n, x in v.items()})
