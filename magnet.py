"""MagNet: Mask Grounding for Referring Image Segmentation.

Chng, Zheng, Han, Qiu, Huang. CVPR 2024. https://arxiv.org/abs/2312.12198
Released (evaluation-only) code: https://github.com/yxchng/mask-grounding

Idea. MagNet is LAVT (Swin-B + BERT with language fused inside the Swin stages) plus three pieces
that attack the language-image "modality gap" at the level of single words and pixels:
1. Mask Grounding (§3.2, Eq. 1-4), a training-only auxiliary task: some words of the expression
   are replaced by [MASK], the masked text goes through the language encoder a second time, and a
   transformer predictor must recover the hidden words from [language, image, mask-centre] tokens.
   To name the hidden word ("red"? "left"?) it has to look at the referred object, so the language
   features learn which words belong to which image regions.
2. The Cross-modal Alignment Module (CAM, §3.3, Eq. 5-11) at the end of every image and language
   stage: bidirectional pixel-word attention over a pyramid of pooled image maps {1, 2, 3, 6},
   upsampled, concatenated, mixed by an MLP and added back through a tanh gate to BOTH modalities.
3. The Cross-modal Alignment Loss (CAL, §3.4, Eq. 12-14): InfoNCE between L2-normalised decoder
   pixel features: foreground pixels pulled to the foreground mean and to the sentence feature,
   pushed from background pixels (and background pixels pulled to the background mean).
Loss (Eq. 15): 2 BCE + 2 Dice + 0.5 CAL + 1.0 grounding.

Symbols (paper -> code). Shapes: B batch, L words, C channels, H, W feature map, V vocabulary.
    T, I, M            input_ids (B, L), images (B, 3, H, W), GT mask centre `centre` (B, 2)
    T_i, I_i           language / image input of stage i: `o` (B, L, C_t), `x` (B, H*W, C_i)
    O_i, P_i           stage outputs (Eq. 5) before CAM; O, P, C in Eq. 1-4 = masked-text language
                       features, image embedding, mask embedding
    P_i^k              pooled + MLP'd image map at pyramid scale k (Eq. 6)
    O_{i,p2t}, P_{i,t2p}   attention outputs for words / pixels (Eq. 7-9)
    I (Eq. 12-14)      decoder mask features `feat` (B, D, H/4, W/4); I^+ / I^- = `pos` / `neg`
    T_avg              projected mean word feature `t_avg` (B, D)
    tau_1, tau_2       Config.tau_p2p, Config.tau_p2t

Paper tables as switches: --ablate no_mg | mlm_only (Table 3a), no_cam (3e 'None'), no_p2p | no_p2t
(3f); --set cam_scales=1,2 (3e), --set predictor_layers=4 (3c); no_mg,no_cam,no_p2p,no_p2t = the
LAVT baseline of Fig. 7 (with this file's decoder).

Differences from the paper and the released code:
- Decoder: LAVT-style conv decoder to 256-d stride-4 features, not the release's one-query
  Mask2Former (one query and no language input: bulk that is not part of the paper's ideas).
- tau_1 = tau_2 = 0.1 (the paper gives none): the value of the pixel-contrast work [59] it cites.
- Eq. 13-14 are printed without a log; we use InfoNCE's -log, as the contrastive losses it cites.
- Masking: max(1, round(0.15 n)) of the n word tokens, BERT's original rule (ovr-cnn's per-token
  Bernoulli(0.15) leaves ~half of the 3-4-word expressions unmasked); never [CLS]/[SEP]/padding.
- Masked words always become [MASK] (the paper's "learnable mask token"), no 80/10/10: the
  segmentation pass always sees clean text, so there is no pretrain/fine-tune mismatch to fix.
- BERT is split into 4 stages of num_hidden_layers / 4 layers (paper 12/4 = 3, tiny 4/4 = 1);
  Swin stage i, then BERT stage i, then CAM i, the release's interleaving.
- Eq. 1's second language pass is plain BERT (no CAM): "+4.76%" only fits a language-only pass.
- P of Eq. 2 = the decoder's stride-32 256-d map (predictor width 256; the release keeps a
  Linear(768, 256)); image tokens are position-embedded by the mask encoder at their own centres.
- Mask centre M = centre of mass in [0, 1]^2; an empty (no-target) mask gets (-1, -1), off-image.
- Vocabulary head = BERT's MLM head tied to BERT's word embeddings (the release imports it).
- CAM also concatenates a full-resolution branch (the release's PWAM output; Eq. 9 lists only the
  pyramid), and every branch uses LAVT's PWAM form (attended words x projected pixels).
- Eq. 10-11's tanh(MLP(.)) is LAVT's gate x + tanh(gate(F)) * F, F = MLP(concat); random init.
- No image gate after the last stage (nothing reads it, as ReLA); the decoder reads LayerNorm(F).
- GroupNorm instead of LAVT's BatchNorm in the decoder (no train/eval gap at small batches).
- CAL uses every stride-4 pixel, sample by sample (at 480 px up to 52M pixel pairs per sample).

Reference code: https://github.com/yxchng/mask-grounding (eval only), https://github.com/yz93/LAVT-RIS
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, SwinConfig, SwinModel

import common

TEXT_ENCODER = "bert"

ABLATIONS: dict[str, str] = {
    "no_mg": "no Mask Grounding auxiliary task (Table 3a 'Baseline', Fig. 7)",
    "mlm_only": "Mask Grounding with language context only = plain MLM (Table 3a 'MLM')",
    "no_cam": "LAVT's one-way pixel-word attention instead of CAM (Table 3e 'None'); "
    "pyramid subsets via --set cam_scales=1,2",
    "no_p2p": "drop the pixel-to-pixel term of CAL (Table 3f)",
    "no_p2t": "drop the pixel-to-text term of CAL (Table 3f)",
}


@dataclass
class Config:
    image_size: int = 480  # LAVT/MagNet 480x480 resize
    max_tokens: int = 20  # incl. [CLS]/[SEP], as LAVT
    vocab_size: int = 30522  # bert-base-uncased; train.py sets len(tokenizer)
    threshold: float = 0.5
    pretrained: bool = True
    vision_name: str = "microsoft/swin-base-patch4-window12-384-in22k"  # LAVT's Swin-B init
    text_name: str = "bert-base-uncased"
    vision_config: dict = field(  # Swin-B, window 12 (paper §3.2, LAVT)
        default_factory=lambda: dict(
            embed_dim=128,
            depths=[2, 2, 18, 2],
            num_heads=[4, 8, 16, 32],
            window_size=12,
            image_size=384,
            patch_size=4,
        )
    )
    text_config: dict = field(  # BERT-base
        default_factory=lambda: dict(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
        )
    )
    ablate: tuple[str, ...] = ()
    drop_path_rate: float = 0.3  # Swin-B stochastic depth, LAVT
    mask_token_id: int = 103  # [MASK] of bert-base-uncased; train.py sets tokenizer.mask_token_id
    # Cross-modal Alignment Module (§3.3)
    cam_scales: tuple[int, ...] = (1, 2, 3, 6)  # pyramid pooling sizes, Table 3e
    cam_heads: int = 1  # X-MHA heads; paper gives none, the release's PWAMs use one
    cam_mlp_ratio: int = 4  # hidden width of MLP_k (Eq. 6) = ratio * C, as the release
    # Decoder
    decoder_dim: int = 256  # D: mask-feature width C_L (the release's mask_dim 256)
    # Mask Grounding (§3.2)
    mask_ratio: float = 0.15  # fraction of word tokens masked (BERT)
    predictor_layers: int = 8  # Table 3c: 4 / 8 / 12
    predictor_heads: int = 8
    # Cross-modal Alignment Loss (§3.4): temperatures not given in the paper (see docstring)
    tau_p2p: float = 0.1  # tau_1
    tau_p2t: float = 0.1  # tau_2
    # Eq. (15) loss weights
    lambda_bce: float = 2.0
    lambda_dice: float = 2.0
    lambda_cal: float = 0.5
    lambda_grounding: float = 1.0

    @classmethod
    def paper(cls) -> Config:
        return cls()

    @classmethod
    def tiny(cls) -> Config:
        return cls(
            image_size=64,
            vocab_size=128,
            pretrained=False,
            vision_config=dict(
                embed_dim=16,
                depths=[1, 1, 1, 1],
                num_heads=[1, 2, 4, 8],
                window_size=4,
                image_size=64,
                patch_size=4,
            ),
            text_config=dict(
                hidden_size=32,
                num_hidden_layers=4,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=32,
            ),
            drop_path_rate=0.0,
            mask_token_id=4,  # the offline tokenizer's [MASK]
            decoder_dim=32,
            predictor_layers=2,
            predictor_heads=2,
        )


# ---------------------------------------------------------------------------------------------
# Helpers: encoders and masks


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


def build_encoders(cfg: Config) -> tuple[SwinModel, BertModel]:
    """Swin (image) and BERT (language) from the Hub / a local dir, or randomly initialised."""
    if cfg.pretrained:
        swin = from_pretrained(
            SwinModel, cfg.vision_name, add_pooling_layer=False, drop_path_rate=cfg.drop_path_rate
        )
        bert = from_pretrained(BertModel, cfg.text_name, add_pooling_layer=False)
    else:
        swin_cfg = SwinConfig(**cfg.vision_config, drop_path_rate=cfg.drop_path_rate)
        swin = SwinModel(swin_cfg, add_pooling_layer=False)
        bert = BertModel(BertConfig(**cfg.text_config, vocab_size=cfg.vocab_size), False)
    # SwinModel's final LayerNorm normalises its pooled output, which we never compute (we run the
    # stages one by one): frozen on purpose, so it neither decays nor lacks a gradient.
    swin.layernorm.requires_grad_(False)
    return swin, bert


def swin_stage_blocks(stage: nn.Module, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Run the Swin blocks of one stage (transformers 5.23 SwinStage.blocks), no patch merging.

    x: (B, H*W, C) -> (B, H*W, C). always_partition=True keeps the configured window even when the
    map is smaller (what SwinBackbone does; tiny maps would otherwise crash). A SwinLayer returns
    (hidden_states, attn_weights); tests/test_magnet.py checks this against SwinModel's own pass.
    """
    for block in stage.blocks:
        x = block(x, hw, always_partition=True)[0]
    return x


def bert_extended_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 0/1 -> (B, 1, 1, L) additive mask: 0 for words, a very negative number for padding."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def bert_layers(layers, o: torch.Tensor, ext_mask: torch.Tensor) -> torch.Tensor:
    """Run a slice of BertModel.encoder.layer; in transformers 5.23 a BertLayer returns a tensor."""
    for layer in layers:
        o = layer(o, attention_mask=ext_mask)
    return o


def mask_words(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    ratio: float,
    mask_token_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask(T) of Eq. (1): replace k = max(1, round(ratio * n)) of the n word tokens by [MASK].

    Words are the attended positions except [CLS] (position 0) and [SEP] (the last attended one).
    Returns the masked ids (B, L) and the boolean selection (B, L). A fixed `generator` (CPU) gives
    the same words every call (used for the visualisation in eval mode).
    """
    B, L = input_ids.shape
    valid = attention_mask.bool()
    last = valid.sum(1) - 1  # (B,) index of [SEP]
    position = torch.arange(L, device=input_ids.device)
    words = valid & (position > 0) & (position[None] != last[:, None])  # (B, L)
    n = words.sum(1)
    k = torch.where(n > 0, torch.floor(ratio * n + 0.5).clamp(min=1), torch.zeros_like(n))
    # A random score per word (padding/special get -1); rank the words, keep the k best.
    score = torch.rand(B, L, generator=generator).to(input_ids.device).masked_fill(~words, -1.0)
    rank = score.argsort(1, descending=True).argsort(1)  # (B, L) 0 = highest score
    selected = words & (rank < k[:, None])
    return input_ids.masked_fill(selected, mask_token_id), selected


def mask_centre(masks: torch.Tensor) -> torch.Tensor:
    """M of Eq. (3): centre of mass (x, y) in [0, 1] of each (B, H, W) mask; (-1, -1) if empty."""
    B, H, W = masks.shape
    masks = masks.float()
    ys = (torch.arange(H, device=masks.device) + 0.5) / H  # pixel centres
    xs = (torch.arange(W, device=masks.device) + 0.5) / W
    area = masks.sum((1, 2))  # (B,)
    cx = (masks.sum(1) * xs).sum(1) / area.clamp(min=1e-6)
    cy = (masks.sum(2) * ys).sum(1) / area.clamp(min=1e-6)
    centre = torch.stack([cx, cy], -1)  # (B, 2)
    return torch.where(area[:, None] > 0, centre, torch.full_like(centre, -1.0))


def grid_centres(h: int, w: int, device) -> torch.Tensor:
    """(h*w, 2) normalised (x, y) centres of the cells of an h x w map, row-major."""
    ys = (torch.arange(h, device=device) + 0.5) / h
    xs = (torch.arange(w, device=device) + 0.5) / w
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(h * w, 2)


# ---------------------------------------------------------------------------------------------
# Cross-modal Alignment Module (§3.3, Fig. 4, Eq. 5-11)


class XMHA(nn.Module):
    """Bidirectional cross-modal attention (X-MHA of Eq. 7, GLIP-style [40]).

    One pixel-word similarity A = q(P) k(O)^T is normalised twice: over words (text -> pixels) and
    over pixels (pixels -> text). Each direction is written in LAVT's PWAM form: the attended
    features of the other modality are multiplied element-wise with a projection of the receiving
    features, then projected.
    """

    def __init__(self, c_v: int, c_t: int, dim: int, heads: int, bidirectional: bool):
        super().__init__()
        self.heads, self.bidirectional = heads, bidirectional
        self.q, self.k = nn.Linear(c_v, dim), nn.Linear(c_t, dim)
        self.value_t = nn.Linear(c_t, dim)  # words as values for the pixels
        self.proj_v = nn.Sequential(nn.Linear(c_v, dim), nn.GELU())
        self.out_v = nn.Linear(dim, dim)
        if bidirectional:
            self.value_v = nn.Linear(c_v, dim)  # pixels as values for the words
            self.proj_t = nn.Sequential(nn.Linear(c_t, dim), nn.GELU())
            self.out_t = nn.Linear(dim, dim)

    def forward(self, p: torch.Tensor, o: torch.Tensor, pad: torch.Tensor):
        """p: (B, N, c_v) pixels; o: (B, L, c_t) words; pad: (B, L) True at padding.

        Returns P_t2p (B, N, dim) and O_p2t (B, L, dim) (None when one-way)."""
        B, N, _ = p.shape
        L, h = o.shape[1], self.heads
        q = self.q(p).view(B, N, h, -1).transpose(1, 2)  # (B, h, N, d)
        k = self.k(o).view(B, L, h, -1).transpose(1, 2)  # (B, h, L, d)
        A = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, h, N, L)
        # Text -> pixels: every pixel reads the words (softmax over L, padding excluded).
        attn = A.masked_fill(pad[:, None, None, :], float("-inf")).softmax(-1)
        v = self.value_t(o).view(B, L, h, -1).transpose(1, 2)  # (B, h, L, d)
        lang = (attn @ v).transpose(1, 2).reshape(B, N, -1)  # (B, N, dim)
        p_t2p = self.out_v(self.proj_v(p) * lang)
        if not self.bidirectional:
            return p_t2p, None
        # Pixels -> text: every word reads the pixels (softmax over N, same similarities).
        attn = A.transpose(-1, -2).softmax(-1)  # (B, h, L, N)
        v = self.value_v(p).view(B, N, h, -1).transpose(1, 2)  # (B, h, N, d)
        vis = (attn @ v).transpose(1, 2).reshape(B, L, -1)  # (B, L, dim)
        return p_t2p, self.out_t(self.proj_t(o) * vis)


def tanh_gate(dim: int) -> nn.Sequential:
    """LAVT's language gate: Linear-ReLU-Linear-Tanh, values in (-1, 1) per channel."""
    return nn.Sequential(
        nn.Linear(dim, dim, bias=False), nn.ReLU(), nn.Linear(dim, dim, bias=False), nn.Tanh()
    )


class CAM(nn.Module):
    """Cross-modal Alignment Module at the end of one image + language stage (Eq. 6-11).

    With bidirectional=False and no scales it is LAVT's one-way pixel-word attention + gate
    (the "no_cam" baseline). update_image=False drops the image gate of the last stage, whose
    P_{i+1} has no next stage to feed (ReLA drops it too; LAVT computes it and throws it away).
    """

    def __init__(self, c_v, c_t, scales, heads, mlp_ratio, bidirectional=True, update_image=True):
        super().__init__()
        self.scales, self.bidirectional = tuple(scales), bidirectional
        self.norm_v, self.norm_t = nn.LayerNorm(c_v), nn.LayerNorm(c_t)
        c_k = c_v // 4  # width of a pyramid branch (the release: dim / 4)
        self.full = XMHA(c_v, c_t, c_v, heads, bidirectional)  # full-resolution branch
        # MLP_k of Eq. (6): 3 layers, as the release (C -> r*C -> C -> C/4)
        self.mlp_k = nn.ModuleList(
            nn.Sequential(
                nn.Linear(c_v, mlp_ratio * c_v, bias=False),
                nn.LayerNorm(mlp_ratio * c_v),
                nn.Linear(mlp_ratio * c_v, c_v),
                nn.GELU(),
                nn.Linear(c_v, c_k),
            )
            for _ in self.scales
        )
        self.xmha_k = nn.ModuleList(XMHA(c_k, c_t, c_k, heads, bidirectional) for _ in self.scales)
        c_cat = c_v + len(self.scales) * c_k
        # The 2-layer MLPs of Eq. (10)-(11) that bring the concatenation back to the stage width.
        self.mlp_v = nn.Sequential(
            nn.Linear(c_cat, c_v), nn.LayerNorm(c_v), nn.Linear(c_v, c_v), nn.GELU()
        )
        self.gate_v = tanh_gate(c_v) if update_image else None
        if bidirectional:
            self.mlp_t = nn.Sequential(
                nn.Linear(c_cat, c_t), nn.LayerNorm(c_t), nn.Linear(c_t, c_t), nn.GELU()
            )
            self.gate_t = tanh_gate(c_t)

    def forward(self, P_i, O_i, hw, text_mask):
        """P_i: (B, H*W, C) image stage output; O_i: (B, L, C_t) language stage output;
        text_mask: (B, L) 1 on words. Returns P_{i+1}, O_{i+1} (same shapes) and the fused image
        feature F (B, H*W, C) that the decoder sees."""
        B, N, C = P_i.shape
        H, W = hw
        pad = text_mask == 0
        p, o = self.norm_v(P_i), self.norm_t(O_i)
        p_t2p, o_p2t = self.full(p, o, pad)  # (B, N, C), (B, L, C)
        p_list, o_list = [p_t2p], [o_p2t]
        p_map = p.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        for k, mlp, xmha in zip(self.scales, self.mlp_k, self.xmha_k, strict=True):
            pooled = F.adaptive_avg_pool2d(p_map, k).flatten(2).transpose(1, 2)  # (B, k*k, C)
            P_k = mlp(pooled)  # Eq. (6): (B, k*k, C/4)
            p_k, o_k = xmha(P_k, o, pad)  # Eq. (7): (B, k*k, C/4), (B, L, C/4)
            p_k = p_k.transpose(1, 2).reshape(B, -1, k, k)  # (B, C/4, k, k)
            p_k = F.interpolate(p_k, size=(H, W), mode="bilinear", align_corners=False)  # Up
            p_list.append(p_k.flatten(2).transpose(1, 2))  # (B, N, C/4)
            o_list.append(o_k)
        F_v = self.mlp_v(torch.cat(p_list, -1))  # Eq. (9) concat + MLP: (B, N, C)
        P_next = P_i if self.gate_v is None else P_i + self.gate_v(F_v) * F_v  # Eq. (11)
        if not self.bidirectional:
            return P_next, O_i, F_v
        F_t = self.mlp_t(torch.cat(o_list, -1))  # Eq. (8) concat + MLP: (B, L, C_t)
        O_next = O_i + self.gate_t(F_t) * F_t * text_mask[..., None]  # Eq. (10), words only
        return P_next, O_next, F_v


# ---------------------------------------------------------------------------------------------
# Decoder (LAVT's SimpleDecoding pattern) to stride-4 mask features


def conv_gn_relu(c_in: int, c_out: int, k: int = 3) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False),
        nn.GroupNorm(min(32, c_out // 4), c_out),
        nn.ReLU(),
    ]


class Decoder(nn.Module):
    """Top-down: project stage 4 to D, then [upsample, concat stage i, 2 x conv3x3] for i = 3, 2, 1.

    Returns the mask features I (B, D, H/4, W/4), the mask logits (B, 1, H/4, W/4) and the
    stride-32 image embedding (B, D, H/32, W/32) that Mask Grounding uses as P.
    """

    def __init__(self, dims: list[int], D: int):
        super().__init__()
        self.proj = nn.Sequential(*conv_gn_relu(dims[-1], D, k=1))
        self.fuse = nn.ModuleList(
            nn.Sequential(*conv_gn_relu(D + c, D), *conv_gn_relu(D, D)) for c in dims[-2::-1]
        )
        self.mask_head = nn.Conv2d(D, 1, 1)

    def forward(self, feats: list[torch.Tensor]):
        embedding = y = self.proj(feats[-1])  # (B, D, H/32, W/32)
        for fuse, skip in zip(self.fuse, feats[-2::-1], strict=True):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = fuse(torch.cat([y, skip], 1))  # (B, D, H_i, W_i)
        return y, self.mask_head(y), embedding


# ---------------------------------------------------------------------------------------------
# Mask Grounding (§3.2, Fig. 3, Eq. 1-4)


class MaskGrounding(nn.Module):
    """Masked Token Predictor over Concat([O, P, C]) (Eq. 4) with a BERT-style vocabulary head.

    use_context=False is the "MLM" ablation: the predictor sees the language tokens only.
    """

    def __init__(self, c_t, D, vocab_size, layers, heads, use_context=True):
        super().__init__()
        self.use_context = use_context
        self.lang_proj = nn.Linear(c_t, D)  # language embedding -> image-embedding width
        if use_context:
            # Eq. (3): 2-layer MLP on the (x, y) mask centre; also embeds image-token positions.
            self.mask_encoder = nn.Sequential(nn.Linear(2, D), nn.ReLU(), nn.Linear(D, D))
            self.type_embed = nn.Embedding(3, D)  # language / image / mask token types, as BERT
        layer = nn.TransformerEncoderLayer(
            D, heads, 4 * D, dropout=0.1, activation="gelu", batch_first=True
        )
        self.predictor = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        # BERT's MLM head: dense-GELU-LayerNorm, then the (tied) word-embedding matrix + a bias.
        self.lm_transform = nn.Sequential(nn.Linear(D, c_t), nn.GELU(), nn.LayerNorm(c_t))
        self.lm_bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, O, text_mask, selected, P, centre, word_embeddings):
        """O: (B, L, C_t) masked-text features (Eq. 1); P: (B, D, h, w) image embedding (Eq. 2);
        centre: (B, 2) (Eq. 3); selected: (B, L) masked positions.
        Returns vocabulary logits at the masked positions, (n_masked, V)."""
        B, L, _ = O.shape
        tokens, pad = self.lang_proj(O), text_mask == 0  # (B, L, D)
        if self.use_context:
            h, w = P.shape[-2:]
            tokens = tokens + self.type_embed.weight[0]
            pos = self.mask_encoder(grid_centres(h, w, P.device))  # (h*w, D)
            P = P.flatten(2).transpose(1, 2) + pos + self.type_embed.weight[1]  # (B, h*w, D)
            C = self.mask_encoder(centre)[:, None] + self.type_embed.weight[2]  # (B, 1, D)
            tokens = torch.cat([tokens, P, C], 1)  # Concat([O, P, C]): (B, L + h*w + 1, D)
            pad = torch.cat([pad, pad.new_zeros(B, h * w + 1)], 1)
        out = self.predictor(tokens, src_key_padding_mask=pad)[:, :L]  # (B, L, D)
        h_masked = self.lm_transform(out[selected])  # (n_masked, C_t)
        return h_masked @ word_embeddings.t() + self.lm_bias  # (n_masked, V)


# ---------------------------------------------------------------------------------------------
# Cross-modal Alignment Loss (§3.4, Eq. 12-14)


def _info_nce(pos_sim: torch.Tensor, neg_sim: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over anchors of -log(e^{s+/tau} / (e^{s+/tau} + sum_j e^{s_j/tau})).
    pos_sim: (n,), neg_sim: (n, m)."""
    logits = torch.cat([pos_sim[:, None], neg_sim], 1) / tau  # (n, 1 + m)
    return (torch.logsumexp(logits, 1) - logits[:, 0]).mean()


def cross_modal_alignment_loss(feat, target, t_avg, tau_p2p, tau_p2t, p2p=True, p2t=True):
    """L_P2P (Eq. 13) and L_P2T (Eq. 14), averaged over the samples that have both foreground
    and background pixels. feat: (B, D, h, w) mask features; target: (B, h, w) {0, 1};
    t_avg: (B, D) projected mean word feature (or None when p2t=False). All features are
    L2-normalised before every dot product, the class means I_avg^+ / I_avg^- included."""
    feat = F.normalize(feat.float().flatten(2).transpose(1, 2), dim=-1)  # (B, h*w, D)
    target = target.flatten(1) > 0.5  # (B, h*w)
    zero = feat.sum() * 0  # keeps the graph when no sample counts
    l_p2p, l_p2t, n = zero, zero, 0
    for b in range(feat.shape[0]):
        pos, neg = feat[b][target[b]], feat[b][~target[b]]  # I^+ (P, D), I^- (N, D)
        if len(pos) == 0 or len(neg) == 0:  # no-target or all-target sample: no contrast
            continue
        n += 1
        s_pn = pos @ neg.t()  # (P, N) every I_i^+ . I_j^-
        if p2p:  # Eq. (13): each pixel vs. its own class mean, against the other class
            avg_pos = F.normalize(pos.mean(0), dim=-1)
            avg_neg = F.normalize(neg.mean(0), dim=-1)
            l_p2p = l_p2p + _info_nce(pos @ avg_pos, s_pn, tau_p2p)
            l_p2p = l_p2p + _info_nce(neg @ avg_neg, s_pn.t(), tau_p2p)
        if p2t:  # Eq. (14): foreground pixels vs. the sentence, against background pixels
            t = F.normalize(t_avg[b].float(), dim=-1)
            l_p2t = l_p2t + _info_nce(pos @ t, s_pn, tau_p2t)
    return l_p2p / max(n, 1), l_p2t / max(n, 1)


# ---------------------------------------------------------------------------------------------
# The model


class MagNet(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        ablate = set(cfg.ablate)
        self.swin, self.bert = build_encoders(cfg)
        stages = self.swin.encoder.layers
        n_layers = len(self.bert.encoder.layer)
        if n_layers % len(stages):
            raise ValueError(f"BERT's {n_layers} layers do not split into {len(stages)} stages")
        self.layers_per_stage = n_layers // len(stages)
        dims = [self.swin.config.embed_dim * 2**i for i in range(len(stages))]
        c_t, D = self.bert.config.hidden_size, cfg.decoder_dim
        self.use_p2p, self.use_p2t = "no_p2p" not in ablate, "no_p2t" not in ablate
        no_cam, last = "no_cam" in ablate, len(dims) - 1
        scales = () if no_cam else cfg.cam_scales
        # The last stage's language update only feeds T_avg of L_P2T; its image update feeds
        # nothing (the decoder reads F). Modules whose output nobody reads are not built.
        self.cams = nn.ModuleList(
            CAM(c, c_t, scales, cfg.cam_heads, cfg.cam_mlp_ratio,
                bidirectional=not no_cam and (i < last or self.use_p2t), update_image=i < last)
            for i, c in enumerate(dims)
        )  # fmt: skip
        self.stage_norms = nn.ModuleList(nn.LayerNorm(c) for c in dims)  # LAVT's norm{i}
        self.decoder = Decoder(dims, D)
        self.text_proj = nn.Linear(c_t, D) if self.use_p2t else None  # proj() of T_avg
        self.grounding = None
        if "no_mg" not in ablate:
            vocab = self.bert.config.vocab_size
            self.grounding = MaskGrounding(
                c_t, D, vocab, cfg.predictor_layers, cfg.predictor_heads, "mlm_only" not in ablate
            )

    def encode(self, images, input_ids, attention_mask):
        """Interleaved Swin / BERT stages with a CAM after each (Eq. 5-11).
        Returns the 4 decoder features (B, C_i, H_i, W_i) and the final words (B, L, C_t)."""
        x, (H, W) = self.swin.embeddings(images)  # (B, H*W, C_1), stride 4
        o = self.bert.embeddings(input_ids=input_ids)  # (B, L, C_t)
        ext_mask = bert_extended_mask(attention_mask, o.dtype)
        feats, n = [], self.layers_per_stage
        for i, (stage, cam, norm) in enumerate(
            zip(self.swin.encoder.layers, self.cams, self.stage_norms, strict=True)
        ):
            x = swin_stage_blocks(stage, x, (H, W))  # Eq. (5): P_i
            o = bert_layers(self.bert.encoder.layer[i * n : (i + 1) * n], o, ext_mask)  # O_i
            x, o, F_v = cam(x, o, (H, W), attention_mask)  # Eq. (6)-(11)
            feats.append(norm(F_v).transpose(1, 2).reshape(x.shape[0], -1, H, W))  # (B, C, H, W)
            if stage.downsample is not None:  # Swin patch merging: (B, H*W, C) -> (B, H*W/4, 2C)
                x = stage.downsample(x, (H, W))
                H, W = (H + 1) // 2, (W + 1) // 2
        return feats, o

    def encode_text(self, input_ids, attention_mask):
        """LanguageEncoder of Eq. (1): plain BERT on the masked text (no image fusion)."""
        o = self.bert.embeddings(input_ids=input_ids)
        return bert_layers(self.bert.encoder.layer, o, bert_extended_mask(attention_mask, o.dtype))

    def forward(self, images, input_ids, attention_mask, targets=None):
        """images (B, 3, H, W), input_ids / attention_mask (B, L) -> dict with "mask_logits"
        (B, 1, H/4, W/4); with targets also "loss" and "losses"; in eval mode with targets the
        grounding predictor's top-3 guesses for deterministically masked words ("mg_*")."""
        feats, O = self.encode(images, input_ids, attention_mask)
        feat, logits, embedding = self.decoder(feats)
        out = {"mask_logits": logits}
        if targets is None:
            return out
        masks = targets["masks"].float()  # (B, H, W)
        cfg, training = self.cfg, self.training
        losses = {"bce": common.bce_loss(logits, masks), "dice": common.dice_loss(logits, masks)}
        total = cfg.lambda_bce * losses["bce"] + cfg.lambda_dice * losses["dice"]

        if training and (self.use_p2p or self.use_p2t):  # Eq. (12)-(14)
            t_avg = None
            if self.use_p2t:  # T_avg = proj(mean of the words' features)
                w = attention_mask[..., None].to(O.dtype)
                t_avg = self.text_proj((O * w).sum(1) / w.sum(1).clamp(min=1))  # (B, D)
            target = common.fit_target(masks, logits)[:, 0]  # (B, H/4, W/4), nearest
            l_p2p, l_p2t = cross_modal_alignment_loss(
                feat, target, t_avg, cfg.tau_p2p, cfg.tau_p2t, self.use_p2p, self.use_p2t
            )
            if self.use_p2p:
                losses["p2p"] = l_p2p
            if self.use_p2t:
                losses["p2t"] = l_p2t
            total = total + cfg.lambda_cal * (l_p2p + l_p2t)

        if self.grounding is not None:
            # Eval mode: the same words every time (fixed generator), for samples.png.
            gen = None if training else torch.Generator().manual_seed(0)
            masked_ids, selected = mask_words(
                input_ids, attention_mask, cfg.mask_ratio, cfg.mask_token_id, gen
            )
            O_masked = self.encode_text(masked_ids, attention_mask)  # Eq. (1)
            word_logits = self.grounding(  # Eq. (2)-(4): P = image embedding, C from the centre
                O_masked,
                attention_mask,
                selected,
                embedding,
                mask_centre(masks),
                self.bert.embeddings.word_embeddings.weight,
            )
            if training:
                y_gt = input_ids[selected]  # (n_masked,)
                if len(y_gt):
                    losses["grounding"] = F.cross_entropy(word_logits.float(), y_gt)
                else:  # no word to mask in the whole batch
                    losses["grounding"] = word_logits.sum() * 0
                total = total + cfg.lambda_grounding * losses["grounding"]
            else:
                top3 = torch.zeros(*input_ids.shape, 3, dtype=torch.long, device=input_ids.device)
                top3[selected] = word_logits.topk(min(3, word_logits.shape[-1]), -1).indices
                out.update(mg_selected=selected, mg_input_ids=input_ids, mg_top3=top3)

        out["loss"] = total
        out["losses"] = {k: v.detach() for k, v in losses.items()}
        return out


def build_model(cfg: Config) -> nn.Module:
    unknown = [a for a in cfg.ablate if a not in ABLATIONS]
    if unknown:
        raise ValueError(
            f"unknown ablation '{unknown[0]}' for magnet; choose from {', '.join(ABLATIONS)}"
        )
    return MagNet(cfg)


def sample_extra(outputs: dict, i: int, tokenizer) -> tuple[np.ndarray | None, str]:
    """Caption: the grounding predictor's top-3 guesses for the masked words of sample i."""
    if "mg_selected" not in outputs:
        return None, ""
    selected = outputs["mg_selected"][i].cpu()
    ids, top3 = outputs["mg_input_ids"][i].cpu(), outputs["mg_top3"][i].cpu()
    parts = []
    for pos in torch.nonzero(selected).flatten().tolist():
        word = tokenizer.convert_ids_to_tokens(int(ids[pos]))
        guesses = tokenizer.convert_ids_to_tokens([int(t) for t in top3[pos]])
        parts.append(f"masked '{word}' -> {'/'.join(guesses)}")
    return None, "; ".join(parts)


if __name__ == "__main__":  # shape smoke run on the tiny preset
    cfg = Config.tiny()
    model = build_model(cfg)
    B, L = 2, cfg.max_tokens
    ids = torch.randint(5, cfg.vocab_size, (B, L))
    ids[:, 0], ids[:, 6], ids[:, 7:] = 2, 3, 0  # [CLS] 5 words [SEP] [PAD]...
    am = (ids != 0).long()
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size)
    masks = torch.zeros(B, cfg.image_size, cfg.image_size)
    masks[:, 10:30, 20:40] = 1
    out = model(images, ids, am, {"masks": masks, "no_target": torch.zeros(B, dtype=torch.bool)})
    print({k: tuple(v.shape) for k, v in out.items() if torch.is_tensor(v)})
    print({k: round(float(v), 4) for k, v in out["losses"].items()})
