"""MagNet: Mask Grounding for Referring Image Segmentation.

Chng, Zheng, Han, Qiu, Huang. CVPR 2024. https://arxiv.org/abs/2312.12198
Release (evaluation only, no training code): https://github.com/yxchng/mask-grounding, built on
LAVT (https://github.com/yz93/LAVT-RIS). Lab notes, every measurement and its command:
docs/magnet.md.

Idea. MagNet is LAVT (Swin-B + BERT, language fused inside the Swin stages) plus three pieces that
attack the language-image "modality gap" at the level of single words and pixels:
1. Mask Grounding (§3.2, Eq. 1-4), a training-only auxiliary task: some words become [MASK], the
   masked text goes through BERT a second time, and a transformer predicts the hidden words from
   [language, image, mask-centre] tokens. To name the hidden word ("red"? "left"?) it has to look
   at the referred object, so the language features learn which words belong to which regions.
2. The Cross-modal Alignment Module (CAM, §3.3, Eq. 5-11) after every image and language stage:
   pixel-word attention both ways over a pyramid of pooled image maps {1, 2, 3, 6}, upsampled,
   concatenated, mixed by an MLP and added back to BOTH modalities through a tanh gate.
3. The Cross-modal Alignment Loss (CAL, §3.4, Eq. 12-14): InfoNCE on L2-normalised mask features;
   foreground pixels are pulled to their mean and to the sentence, pushed from the background
   pixels (and background pixels pulled to their mean).
Loss (Eq. 15): 2 BCE + 2 Dice + 0.5 CAL + 1.0 grounding.

Symbols (paper -> code). B batch, L words, N pixels of a map, V vocabulary; widths d_i (image
stage i), d_t (language), D (decoder), D_g (predictor); C is only Eq. 3's mask embedding.
    T, I, M (Eq. 1-3)   input_ids (B, L), images (B, 3, H, W), GT mask centre (B, 2)
    O_i, P_i            stage i's words `o` (B, L, d_t) and pixels `x` (B, N, d_i), Eq. 5
    O, P, C (Eq. 1-4)   masked-text features `O_masked` (B, L, d_t); text-free image features `P`
                        (B, d_s, g, g); mask embedding `C` (B, 1, D_g)
    P_i^k               pooled + MLP'd image map at pyramid scale k (Eq. 6): `P_k`
    O_{i,p2t}, P_{i,t2p}  attention outputs for words / pixels (Eq. 7-9): `o_p2t`, `p_t2p`
    I (Eq. 12-14)       mask features `I` (B, D, H/4, W/4); I^+ / I^- = `pos` / `neg`
    T_avg, tau_1, tau_2 projected mean word feature `t_avg` (B, D); tau_p2p, tau_p2t

Recipe (RECIPE, end of file; the release says "follow LAVT"): AdamW lr 5e-5 everywhere, wd 0.01,
poly 0.9, 40 epochs, batch 32, 480 px, BERT's embeddings and last two layers frozen. Table 3 rows:
224 px, 10 epochs (TABLES). The 64 px demo uses train.py's demo recipe.

Differences. paper() is the paper, the release where it is silent; tiny() is the 64 px demo.
The paper is silent (ours unless a source is named):
- Each word hidden with p = 0.15 (ovr-cnn, the authors' pointer). paper() (docs/magnet.md#mask_rule)
- [MASK]: Mask Grounding's own parameter, not BERT's. paper() (docs/magnet.md#own_mask_token)
- Masked words always become [MASK], no 80/10/10. paper() and tiny() (docs/magnet.md#mask_rule)
- P of Eq. 2: stage 1's text-free output. paper() and tiny() (docs/magnet.md#grounding_stage)
- O, P, C projected to D_g; image tokens carry the mask encoder of their centres. paper() and tiny()
- M = centre of mass in [0, 1]^2, (-1, -1) for an empty mask. paper() and tiny()
- Vocabulary head: untied BertLMPredictionHead. paper() and tiny() (docs/magnet.md#vocab_head)
- Eq. 1's second language pass is plain BERT (no CAM): "+4.76%" fits only that. paper() and tiny()
- tau_1 = tau_2 = 0.1, the value of the pixel-contrast work [59]. paper() and tiny()
- Eq. 13-14 with InfoNCE's -log (printed without). paper() and tiny()
- CAL on all stride-4 pixels; fixed shapes compiled. paper() and tiny() (docs/magnet.md#compile)
- Table 3a MaskedVLM = grounding without the mask signal (no masked vision). paper() and tiny()
The release differs (our choice first):
- Decoder: conv FPN + 1 query layer (release: 9). paper() and tiny() (docs/magnet.md#decoder)
- CAM updates the image with the gated mixer output, Eq. 11 (release: PWAM's). paper() and tiny()
- CAM's language side runs the pyramid, Eq. 7-8 (release: one full-res PWAM). paper() and tiny()
- CAM also concatenates the full-res branch; branches in LAVT's PWAM form. paper() and tiny()
- The decoder reads LayerNorm(mixer output), LAVT's norm{i} (release: none). paper() and tiny()
- Eq. 10-11's tanh(MLP(.)): LAVT's gate x + tanh(gate(F)) * F, random init. paper() and tiny()
- no_cam (LAVT) keeps BERT interleaved (LAVT: the final BERT output). paper() and tiny()
- GroupNorm in the decoder (LAVT: BatchNorm; no train/eval gap). paper() and tiny()
- No image gate after the last stage (nothing reads it). paper() and tiny()
- Eq. 14 prints I_avg where T_avg (the projected sentence) is meant. paper() and tiny()
- Mask head: Mask2Former's dot product, default init, no bias. paper() (docs/magnet.md#mask_prior)
We deviate on purpose (the 64 px demo):
- Tiny encoders; BERT 4 layers, one per CAM stage (paper 12 = 3 per stage). tiny() only
- Exactly max(1, round(0.15 n)) words hidden (mask_rule). tiny() only (docs/magnet.md#mask_rule)
- [MASK] is BERT's own row (the demo freezes nothing). tiny() only (docs/magnet.md#own_mask_token)
- Articles are never hidden (hide_articles). tiny() only (docs/magnet.md#hide_articles)
- Two C tokens, the centre's and Table 3b's Average. tiny() only (docs/magnet.md#mask_input)
- The centre's C also on every word token. tiny() only (docs/magnet.md#centre_on_words)
- lambda_cal ramps from 0 over 500 steps (cal_warmup). tiny() only (docs/magnet.md#cal_warmup)
- Mask head starts at p = 0.03 (mask_prior). tiny() only (docs/magnet.md#mask_prior)
- Predictor: 2 layers, 4 heads, D_g 64. tiny() only (docs/magnet.md#predictor_layers)
- P pooled to 8 x 8, decoder width 32, no drop path. tiny() only (docs/magnet.md#grounding_grid)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, SwinConfig, SwinModel

import common

TEXT_ENCODER = "bert"

ABLATIONS: dict[str, str] = {
    "no_mg": "no Mask Grounding auxiliary task",
    "mlm_only": "Mask Grounding with language context only = plain masked language modelling",
    "no_cam": "LAVT's one-way pixel-word attention + gate instead of CAM",
    "no_p2p": "drop the pixel-to-pixel term of CAL",
    "no_p2t": "drop the pixel-to-text term of CAL",
}


@dataclass
class Config:
    image_size: int = 480  # LAVT/MagNet 480x480 resize
    max_tokens: int = 20  # incl. [CLS]/[SEP], as LAVT
    vocab_size: int = 30522  # bert-base-uncased; train.py sets len(tokenizer)
    threshold: float = 0.5  # sigmoid > 0.5, the release
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
        )  # fmt: skip
    )
    text_config: dict = field(  # BERT-base: 12 layers, 3 per CAM stage (§3.3)
        default_factory=lambda: dict(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
        )
    )
    ablate: tuple[str, ...] = ()
    drop_path_rate: float = 0.3  # Swin-B stochastic depth, LAVT
    mask_token_id: int = 103  # [MASK] of bert-base-uncased; train.py sets tokenizer.mask_token_id
    # Mask Grounding (§3.2)
    mask_ratio: float = 0.15  # share of the words hidden (ovr-cnn, BERT)
    mask_rule: str = "bernoulli"  # each word with p = mask_ratio (ovr-cnn); "count": exactly k
    own_mask_token: bool = True  # "a special learnable mask token", outside bert.embeddings
    hide_articles: bool = True  # the paper hides any word; False never hides "a" / "an" / "the"
    article_ids: tuple[int, ...] = (1037, 2019, 1996)  # bert-base-uncased; train.py re-reads them
    mask_input: str = "centre"  # Table 3b: "centre" | "average" | "centre+average" | "none" (3a)
    centre_on_words: bool = False  # the centre's C, if any, also added to every word token
    grounding_grid: int = 15  # P pooled to 15 x 15 cells (stride 32 at 480 px)
    grounding_stage: int = 1  # P = the text-free Swin pass up to this stage (1: no extra cost)
    predictor_dim: int = 256  # D_g (the release's Linear(768, 256))
    predictor_layers: int = 8  # Table 3c: 4 / 8 / 12
    predictor_heads: int = 8
    # Cross-modal Alignment Module (§3.3)
    cam_scales: tuple[int, ...] = (1, 2, 3, 6)  # pyramid pooling sizes, Table 3e
    cam_heads: int = 1  # X-MHA heads; paper gives none, the release's PWAMs use one
    cam_mlp_ratio: int = 4  # hidden width of MLP_k (Eq. 6) = ratio * d_i, as the release
    # Cross-modal Alignment Loss (§3.4): temperatures not given in the paper
    tau_p2p: float = 0.1  # tau_1
    tau_p2t: float = 0.1  # tau_2
    cal_warmup: int = 0  # steps over which lambda_cal ramps from 0 (paper: none)
    # Decoder
    decoder_dim: int = 256  # D: mask-feature width C_L (the release's mask_dim 256)
    decoder_heads: int = 8  # the one query's cross-attention heads (the release's Mask2Former)
    mask_prior: float | None = None  # initial foreground share of the mask head; None: default init
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
        """The 64 px demo: the shared tiny Swin and BERT pretrained on the synthetic world, and
        the demo's choices (module docstring, "We deviate on purpose"; docs/magnet.md)."""
        return cls(
            image_size=64,
            vocab_size=60,  # the world's word-level BERT tokenizer; train.py sets len(tokenizer)
            vision_name="pretrained/tiny-swin",
            text_name="pretrained/tiny-bert",
            vision_config=dict(  # = pretrained/tiny-swin, for --no-pretrained
                image_size=64,
                patch_size=4,
                num_channels=3,
                embed_dim=32,
                depths=[2, 2, 2, 2],
                num_heads=[1, 2, 4, 8],
                window_size=4,
                mlp_ratio=4.0,
            ),  # fmt: skip
            text_config=dict(  # = pretrained/tiny-bert: 4 layers, one per CAM stage
                hidden_size=64,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=256,
                max_position_embeddings=32,
            ),  # fmt: skip
            drop_path_rate=0.0,
            mask_token_id=4,  # the offline tokenizer's [MASK]
            mask_rule="count",  # every expression hides a word
            own_mask_token=False,  # BERT's [MASK] row (the demo recipe freezes nothing)
            hide_articles=False,  # a third of the demo's words are "the"
            article_ids=(9, 51),  # the offline tokenizer's "a", "the"
            mask_input="centre+average",  # the paper's C and Table 3b's
            centre_on_words=True,
            grounding_grid=8,  # stride 8 at 64 px
            predictor_dim=64,
            predictor_layers=2,
            predictor_heads=4,
            decoder_dim=32,
            decoder_heads=4,
            mask_prior=0.03,  # the demo's foreground share
            cal_warmup=500,
        )


# ---------------------------------------------------------------------------------------------
# Mask Grounding (§3.2, Fig. 3, Eq. 1-4)


def mask_words(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    ratio: float,
    mask_token_id: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
    never: tuple[int, ...] = (),
    rule: str = "count",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask(T) of Eq. (1): replace words by [MASK]. rule "bernoulli": each of the n word tokens
    with probability `ratio` (ovr-cnn); "count": exactly k = max(1, round(ratio * n)) of them.

    Words are the attended positions except [CLS] (position 0), [SEP] (the last attended one) and
    the token ids in `never` (the demo's articles).
    Returns the masked ids (B, L) and the boolean selection (B, L). A fixed `generator` (CPU) gives
    the same words every call; a list of them, one per sentence, gives each sentence the same words
    in any batch (the diagnostics in eval mode).
    """
    B, L = input_ids.shape
    valid = attention_mask.bool()
    last = valid.sum(1) - 1  # (B,) index of [SEP]
    position = torch.arange(L, device=input_ids.device)
    words = valid & (position > 0) & (position[None] != last[:, None])  # (B, L)
    words &= ~torch.isin(input_ids, input_ids.new_tensor(never))  # (B, L)
    n = words.sum(1)
    k = torch.where(n > 0, torch.floor(ratio * n + 0.5).clamp(min=1), torch.zeros_like(n))
    # A random score per word (padding/special get -1); rank the words, keep the k best.
    if isinstance(generator, list):  # one per sentence: its words do not depend on the batch
        score = torch.stack([torch.rand(L, generator=g) for g in generator])  # (B, L)
    else:
        score = torch.rand(B, L, generator=generator)
    score = score.to(input_ids.device)
    if rule == "bernoulli":
        selected = words & (score < ratio)
        return input_ids.masked_fill(selected, mask_token_id), selected
    if rule != "count":
        raise ValueError(f"mask_rule must be bernoulli or count, not {rule!r}")
    score = score.masked_fill(~words, -1.0)
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


def mlp2(d_in: int, d: int) -> nn.Sequential:
    """The 2-layer MLP of the mask encoder (§3.2)."""
    return nn.Sequential(nn.Linear(d_in, d), nn.ReLU(), nn.Linear(d, d))


class MaskGrounding(nn.Module):
    """Masked Token Predictor over Concat([O, P, C]) (Eq. 4) with a BERT-style vocabulary head.

    use_image=False is the "MLM" ablation (language tokens only). mask_input: "centre" (the paper:
    C = MaskEncoder(centre of the GT mask)), "average" (Table 3b: C from the image features
    averaged inside the GT mask), "centre+average" (both, as two tokens: tiny()) or "none" (no C
    token: the "MaskedVLM" row of Table 3a). centre_on_words (tiny()) also adds the centre's C to
    every word token, so [MASK] reads the target's position without first finding the C token.
    """

    def __init__(
        self, d_img, d_t, D_g, vocab_size, layers, heads, use_image, mask_input, centre_on_words,
        mask_token=None,
    ):  # fmt: skip
        super().__init__()
        if mask_input not in ("centre", "average", "centre+average", "none"):
            raise ValueError(
                f"mask_input must be centre, average, centre+average or none, not {mask_input!r}"
            )
        self.use_image, self.mask_input = use_image, mask_input
        self.centre_on_words = centre_on_words
        if mask_token is not None:  # §3.2 "a special learnable mask token" (d_t,), own_mask_token
            self.mask_token = nn.Parameter(mask_token.detach().clone())
        self.lang_proj = nn.Linear(d_t, D_g)  # language embedding -> predictor width
        if use_image:
            self.image_proj = nn.Linear(d_img, D_g)
            # Eq. (3): 2-layer MLP on the (x, y) mask centre; it also embeds the image tokens'
            # own centres, so C and the image tokens share one frame of reference.
            self.mask_encoder = mlp2(2, D_g)
            if mask_input in ("average", "centre+average"):
                self.average_encoder = mlp2(D_g, D_g)
            self.type_embed = nn.Embedding(3, D_g)  # language / image / mask token types, as BERT
        layer = nn.TransformerEncoderLayer(
            D_g, heads, 4 * D_g, dropout=0.1, activation="gelu", batch_first=True
        )
        self.predictor = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        # BERT's MLM head as a standalone BertLMPredictionHead (which the release imports):
        # dense-GELU-LayerNorm, then its own Linear to the vocabulary, not tied to BERT's word
        # embeddings (tied, the demo learnt colours far slower: docs/magnet.md#vocab_head).
        self.lm_transform = nn.Sequential(nn.Linear(D_g, d_t), nn.GELU(), nn.LayerNorm(d_t))
        self.vocab_head = nn.Linear(d_t, vocab_size)

    def forward(self, O, text_mask, selected, P, masks):
        """O: (B, L, d_t) masked-text features (Eq. 1); P: (B, d_img, g, g) text-free image
        embedding (Eq. 2); masks: (B, H, W) GT masks, M = their centres (Eq. 3); selected: (B, L)
        masked positions, or None for every position. Returns vocabulary logits at the masked
        positions, (n_masked, V), or at every position, (B, L, V)."""
        B, L, _ = O.shape
        tokens, pad = self.lang_proj(O), text_mask == 0  # (B, L, D_g)
        if self.use_image:
            g = P.shape[-1]
            tokens = tokens + self.type_embed.weight[0]
            pos = self.mask_encoder(grid_centres(g, g, P.device))  # (g*g, D_g)
            P = self.image_proj(P.flatten(2).transpose(1, 2))  # (B, g*g, D_g)
            context = [P + pos + self.type_embed.weight[1]]
            if self.mask_input in ("centre", "centre+average"):
                C = self.mask_encoder(mask_centre(masks))[:, None]  # Eq. (3): (B, 1, D_g)
                context.append(C + self.type_embed.weight[2])
                if self.centre_on_words:  # the demo: C on every word too, as a bias
                    tokens = tokens + C  # (B, L, D_g)
            if self.mask_input in ("average", "centre+average"):  # Table 3b "Average"
                cell = F.adaptive_avg_pool2d(masks[:, None].float(), g).flatten(1)  # (B, g*g)
                avg = (cell[..., None] * P).sum(1) / cell.sum(1, keepdim=True).clamp(min=1e-6)
                C = self.average_encoder(avg)[:, None]  # (B, 1, D_g)
                context.append(C + self.type_embed.weight[2])
            context = torch.cat(context, 1)  # (B, g*g + 0..2, D_g)
            tokens = torch.cat([tokens, context], 1)  # Concat([O, P, C])
            pad = torch.cat([pad, pad.new_zeros(B, context.shape[1])], 1)
        out = self.predictor(tokens, src_key_padding_mask=pad)[:, :L]  # (B, L, D_g)
        if selected is not None:  # only the masked positions: (n_masked, D_g)
            out = out[selected]
        return self.vocab_head(self.lm_transform(out))  # (n_masked, V), or (B, L, V)


# ---------------------------------------------------------------------------------------------
# Cross-modal Alignment Module (§3.3, Fig. 4, Eq. 5-11)


class XMHA(nn.Module):
    """Bidirectional cross-modal attention (X-MHA of Eq. 7, GLIP-style [40]).

    One pixel-word similarity A = q(P) k(O)^T is normalised twice: over words (text -> pixels) and
    over pixels (pixels -> text). Each direction is written in LAVT's PWAM form: the attended
    features of the other modality are multiplied element-wise with a projection of the receiving
    features, then projected.
    """

    def __init__(self, d_v: int, d_t: int, dim: int, heads: int, bidirectional: bool):
        super().__init__()
        self.heads, self.bidirectional = heads, bidirectional
        self.q, self.k = nn.Linear(d_v, dim), nn.Linear(d_t, dim)
        self.value_t = nn.Linear(d_t, dim)  # words as values for the pixels
        self.proj_v = nn.Sequential(nn.Linear(d_v, dim), nn.GELU())
        self.out_v = nn.Linear(dim, dim)
        if bidirectional:
            self.value_v = nn.Linear(d_v, dim)  # pixels as values for the words
            self.proj_t = nn.Sequential(nn.Linear(d_t, dim), nn.GELU())
            self.out_t = nn.Linear(dim, dim)

    def forward(self, p: torch.Tensor, o: torch.Tensor, pad: torch.Tensor):
        """p: (B, N, d_v) pixels; o: (B, L, d_t) words; pad: (B, L) True at padding.

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

    def __init__(self, d_v, d_t, scales, heads, mlp_ratio, bidirectional=True, update_image=True):
        super().__init__()
        self.scales, self.bidirectional = tuple(scales), bidirectional
        self.norm_v, self.norm_t = nn.LayerNorm(d_v), nn.LayerNorm(d_t)
        d_k = d_v // 4  # width of a pyramid branch (the release: dim / 4)
        self.full = XMHA(d_v, d_t, d_v, heads, bidirectional)  # full-resolution branch
        # MLP_k of Eq. (6): 3 layers, as the release (d -> r*d -> d -> d/4)
        self.mlp_k = nn.ModuleList(
            nn.Sequential(
                nn.Linear(d_v, mlp_ratio * d_v, bias=False),
                nn.LayerNorm(mlp_ratio * d_v),
                nn.Linear(mlp_ratio * d_v, d_v),
                nn.GELU(),
                nn.Linear(d_v, d_k),
            )
            for _ in self.scales
        )
        self.xmha_k = nn.ModuleList(XMHA(d_k, d_t, d_k, heads, bidirectional) for _ in self.scales)
        d_cat = d_v + len(self.scales) * d_k
        # The 2-layer MLPs of Eq. (10)-(11) that bring the concatenation back to the stage width.
        self.mlp_v = nn.Sequential(
            nn.Linear(d_cat, d_v), nn.LayerNorm(d_v), nn.Linear(d_v, d_v), nn.GELU()
        )
        self.gate_v = tanh_gate(d_v) if update_image else None
        if bidirectional:
            self.mlp_t = nn.Sequential(
                nn.Linear(d_cat, d_t), nn.LayerNorm(d_t), nn.Linear(d_t, d_t), nn.GELU()
            )
            self.gate_t = tanh_gate(d_t)

    def forward(self, P_i, O_i, hw, text_mask):
        """P_i: (B, N, d_v) image stage output; O_i: (B, L, d_t) language stage output;
        text_mask: (B, L) 1 on words. Returns P_{i+1}, O_{i+1} (same shapes) and the fused image
        feature F_v (B, N, d_v) that the decoder sees."""
        B, N, d = P_i.shape
        H, W = hw
        pad = text_mask == 0
        p, o = self.norm_v(P_i), self.norm_t(O_i)
        p_t2p, o_p2t = self.full(p, o, pad)  # (B, N, d), (B, L, d)
        p_list, o_list = [p_t2p], [o_p2t]
        p_map = p.transpose(1, 2).reshape(B, d, H, W)  # (B, d, H, W)
        for k, mlp, xmha in zip(self.scales, self.mlp_k, self.xmha_k, strict=True):
            pooled = F.adaptive_avg_pool2d(p_map, k).flatten(2).transpose(1, 2)  # (B, k*k, d)
            P_k = mlp(pooled)  # Eq. (6): (B, k*k, d/4)
            p_k, o_k = xmha(P_k, o, pad)  # Eq. (7): (B, k*k, d/4), (B, L, d/4)
            p_k = p_k.transpose(1, 2).reshape(B, -1, k, k)  # (B, d/4, k, k)
            p_k = F.interpolate(p_k, size=(H, W), mode="bilinear", align_corners=False)  # Up
            p_list.append(p_k.flatten(2).transpose(1, 2))  # (B, N, d/4)
            o_list.append(o_k)
        F_v = self.mlp_v(torch.cat(p_list, -1))  # Eq. (9) concat + MLP: (B, N, d)
        P_next = P_i if self.gate_v is None else P_i + self.gate_v(F_v) * F_v  # Eq. (11)
        if not self.bidirectional:
            return P_next, O_i, F_v
        F_t = self.mlp_t(torch.cat(o_list, -1))  # Eq. (8) concat + MLP: (B, L, d_t)
        O_next = O_i + self.gate_t(F_t) * F_t * text_mask[..., None]  # Eq. (10), words only
        return P_next, O_next, F_v


# ---------------------------------------------------------------------------------------------
# Cross-modal Alignment Loss (§3.4, Eq. 12-14)


def _info_nce(pos_sim: torch.Tensor, neg_sim: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over anchors of -log(e^{s+/tau} / (e^{s+/tau} + sum_j e^{s_j/tau})).
    pos_sim: (n,), neg_sim: (n, m)."""
    logits = torch.cat([pos_sim[:, None], neg_sim], 1) / tau  # (n, 1 + m)
    return (torch.logsumexp(logits, 1) - logits[:, 0]).mean()


def cross_modal_alignment_loss(I, target, t_avg, tau_p2p, tau_p2t, p2p=True, p2t=True):
    """L_P2P (Eq. 13) and L_P2T (Eq. 14), averaged over the samples that have both foreground
    and background pixels. I: (B, D, h, w) mask features; target: (B, h, w) {0, 1};
    t_avg: (B, D) projected mean word feature (or None when p2t=False). All features are
    L2-normalised before every dot product, the class means I_avg^+ / I_avg^- included."""
    I = F.normalize(I.float().flatten(2).transpose(1, 2), dim=-1)  # (B, h*w, D)
    target = target.flatten(1) > 0.5  # (B, h*w)
    if torch.compiler.is_compiling():  # the same sums over fixed shapes (no graph break)
        return _cal_fixed_shapes(I, target, t_avg, tau_p2p, tau_p2t, p2p, p2t)
    zero = I.sum() * 0  # keeps the graph when no sample counts
    l_p2p, l_p2t, n = zero, zero, 0
    for b in range(I.shape[0]):
        pos, neg = I[b][target[b]], I[b][~target[b]]  # I^+ (|P|, D), I^- (|N|, D)
        if len(pos) == 0 or len(neg) == 0:  # no-target or all-target sample: no contrast
            continue
        n += 1
        s_pn = pos @ neg.t()  # (|P|, |N|) every I_i^+ . I_j^-
        if p2p:  # Eq. (13): each pixel vs. its own class mean, against the other class
            avg_pos = F.normalize(pos.mean(0), dim=-1)
            avg_neg = F.normalize(neg.mean(0), dim=-1)
            l_p2p = l_p2p + _info_nce(pos @ avg_pos, s_pn, tau_p2p)
            l_p2p = l_p2p + _info_nce(neg @ avg_neg, s_pn.t(), tau_p2p)
        if p2t:  # Eq. (14) with T_avg: foreground pixels vs. the sentence, against background
            t = F.normalize(t_avg[b].float(), dim=-1)
            l_p2t = l_p2t + _info_nce(pos @ t, s_pn, tau_p2t)
    return l_p2p / max(n, 1), l_p2t / max(n, 1)


def _cal_fixed_shapes(I, target, t_avg, tau_p2p, tau_p2t, p2p, p2t):
    """cross_modal_alignment_loss for torch.compile: every anchor against every pixel, the other
    class picked by a mask instead of by indexing (whose output size depends on the data). Same
    maths, other rounding; h*w x h*w similarities per sample instead of |P| x |N|.
    I: (B, N, D) L2-normalised; target: (B, N) bool."""
    fg, bg = target.float(), (~target).float()  # (B, N)
    n_fg, n_bg = fg.sum(1), bg.sum(1)  # (B,) |P|, |N|
    valid = ((n_fg > 0) & (n_bg > 0)).float()  # samples with a contrast
    S = I @ I.transpose(1, 2)  # (B, N, N) every I_i . I_j
    S_fg = S.masked_fill(~target[:, None, :], float("-inf"))  # columns: foreground only
    S_bg = S.masked_fill(target[:, None, :], float("-inf"))  # columns: background only

    def info_nce(pos_sim, neg_sim, anchors, n_anchors, tau):  # mean over the anchors' rows
        logits = torch.cat([pos_sim[..., None], neg_sim], -1) / tau  # (B, N, 1 + N)
        per_pixel = torch.logsumexp(logits, -1) - logits[..., 0]  # (B, N)
        return (per_pixel * anchors).sum(1) / n_anchors.clamp(min=1)  # (B,)

    n = valid.sum().clamp(min=1)
    l_p2p = l_p2t = I.sum() * 0
    if p2p:  # Eq. (13)
        avg_pos = F.normalize((fg[..., None] * I).sum(1), dim=-1)  # (B, D) I_avg^+
        avg_neg = F.normalize((bg[..., None] * I).sum(1), dim=-1)  # (B, D) I_avg^-
        fg_term = info_nce((I * avg_pos[:, None]).sum(-1), S_bg, fg, n_fg, tau_p2p)
        bg_term = info_nce((I * avg_neg[:, None]).sum(-1), S_fg, bg, n_bg, tau_p2p)
        l_p2p = ((fg_term + bg_term) * valid).sum() / n
    if p2t:  # Eq. (14)
        t = F.normalize(t_avg.float(), dim=-1)  # (B, D)
        l_p2t = (info_nce((I * t[:, None]).sum(-1), S_bg, fg, n_fg, tau_p2t) * valid).sum() / n
    return l_p2p, l_p2t


# ---------------------------------------------------------------------------------------------
# Plumbing: the Hugging Face encoders, run stage by stage


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
    """Swin (image) and BERT (language) from the Hub / a folder, or randomly initialised.

    A Swin classification checkpoint (pretrained/tiny-swin, the Hub's Swin) loads into SwinModel
    without its classifier."""
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

    x: (B, H*W, d) -> (B, H*W, d). always_partition=True keeps the configured window even when the
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


# ---------------------------------------------------------------------------------------------
# Plumbing: decoder (LAVT's SimpleDecoding pattern) to stride-4 mask features


def conv_gn_relu(c_in: int, c_out: int, k: int = 3) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False),
        nn.GroupNorm(min(32, c_out // 4), c_out),
        nn.ReLU(),
    ]


class Decoder(nn.Module):
    """Top-down: project stage 4 to D, then [upsample, concat stage i, 2 x conv3x3] for i = 3, 2, 1;
    the release's signed 1x1 "mask features" conv; a one-query mask head on them (the release's
    one-query Mask2Former, one layer): the query reads the mask features by cross-attention, and
    the mask is its embedding dotted with every pixel's feature.

    Returns the mask features I (B, D, H/4, W/4) and the mask logits (B, 1, H/4, W/4). CAL reads
    I. Two things make CAL and the mask agree: I is signed (on ReLU outputs every cosine is >= 0,
    foreground and background cannot point apart), and the mask is a per-sample direction in I
    (CAL clusters each sample's target around its own mean, a direction that a fixed 1x1 mask head
    could not follow).
    """

    def __init__(self, dims: list[int], D: int, heads: int, mask_prior: float | None):
        super().__init__()
        self.proj = nn.Sequential(*conv_gn_relu(dims[-1], D, k=1))
        self.fuse = nn.ModuleList(
            nn.Sequential(*conv_gn_relu(D + c, D), *conv_gn_relu(D, D)) for c in dims[-2::-1]
        )
        self.mask_features = nn.Conv2d(D, D, 1)
        # Mask2Former's query layer (cross-attention, FFN, post-norms) and 3-layer mask MLP.
        self.query = nn.Parameter(torch.randn(1, 1, D))
        self.cross_attn = nn.MultiheadAttention(D, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(D, 4 * D), nn.ReLU(), nn.Linear(4 * D, D))
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.mask_embed = nn.Sequential(
            nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D)
        )
        self.mask_bias = None  # Mask2Former: mask = embedding . I, no bias, default init
        if mask_prior is not None:  # start near "p = mask_prior everywhere": a small last layer,
            nn.init.normal_(self.mask_embed[-1].weight, std=0.01)  # the prior in a learnt bias
            nn.init.zeros_(self.mask_embed[-1].bias)
            self.mask_bias = nn.Parameter(torch.tensor(math.log(mask_prior / (1 - mask_prior))))

    def forward(self, feats: list[torch.Tensor]):
        y = self.proj(feats[-1])  # (B, D, H/32, W/32)
        for fuse, skip in zip(self.fuse, feats[-2::-1], strict=True):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = fuse(torch.cat([y, skip], 1))  # (B, D, H_i, W_i)
        I = self.mask_features(y)  # (B, D, H/4, W/4), signed
        pixels = I.flatten(2).transpose(1, 2)  # (B, H/4 * W/4, D)
        q = self.query.expand(len(I), -1, -1)  # (B, 1, D)
        q = self.norm1(q + self.cross_attn(q, pixels, pixels, need_weights=False)[0])
        q = self.norm2(q + self.ffn(q))  # (B, 1, D)
        e = self.mask_embed(q)  # (B, 1, D)
        logits = torch.einsum("bqd,bdhw->bqhw", e, I)  # (B, 1, H/4, W/4)
        if self.mask_bias is not None:
            logits = logits + self.mask_bias
        return I, logits


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
        d_t, D = self.bert.config.hidden_size, cfg.decoder_dim
        self.use_p2p, self.use_p2t = "no_p2p" not in ablate, "no_p2t" not in ablate
        no_cam, last = "no_cam" in ablate, len(dims) - 1
        scales = () if no_cam else cfg.cam_scales
        # The last stage's language update only feeds T_avg of L_P2T; its image update feeds
        # nothing (the decoder reads F_v). Modules whose output nobody reads are not built.
        self.cams = nn.ModuleList(
            CAM(d, d_t, scales, cfg.cam_heads, cfg.cam_mlp_ratio,
                bidirectional=not no_cam and (i < last or self.use_p2t), update_image=i < last)
            for i, d in enumerate(dims)
        )  # fmt: skip
        self.stage_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)  # LAVT's norm{i}
        self.decoder = Decoder(dims, D, cfg.decoder_heads, cfg.mask_prior)
        self.text_proj = nn.Linear(d_t, D) if self.use_p2t else None  # proj() of T_avg
        self.grounding = None
        if not 1 <= cfg.grounding_stage <= len(dims):
            raise ValueError(f"grounding_stage must be 1..{len(dims)}, not {cfg.grounding_stage}")
        if "no_mg" not in ablate:
            # own_mask_token starts from BERT's (pretrained) [MASK] embedding.
            words = self.bert.embeddings.word_embeddings.weight  # (V, d_t)
            mask_token = words[cfg.mask_token_id] if cfg.own_mask_token else None
            self.grounding = MaskGrounding(
                dims[cfg.grounding_stage - 1], d_t, cfg.predictor_dim, self.bert.config.vocab_size,
                cfg.predictor_layers, cfg.predictor_heads, "mlm_only" not in ablate,
                cfg.mask_input, cfg.centre_on_words, mask_token,
            )  # fmt: skip
        # Training steps taken, for the CAL warm-up (saved with the weights, so resuming is exact).
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def encode(self, images, input_ids, attention_mask):
        """Interleaved Swin / BERT stages with a CAM after each (Eq. 5-11).
        Returns the 4 decoder features (B, d_i, H_i, W_i), the final words O (B, L, d_t) and the
        text-free image embedding P (B, d_s, H_s, W_s): P_1 before CAM 1 for grounding_stage 1;
        None when nothing reads it (no Mask Grounding)."""
        x, (H, W) = self.swin.embeddings(images)  # (B, N, d_1), stride 4
        o = self.bert.embeddings(input_ids=input_ids)  # (B, L, d_t)
        ext_mask = bert_extended_mask(attention_mask, o.dtype)
        feats, n, B, P = [], self.layers_per_stage, x.shape[0], None
        for i, (stage, cam, norm) in enumerate(
            zip(self.swin.encoder.layers, self.cams, self.stage_norms, strict=True)
        ):
            x = swin_stage_blocks(stage, x, (H, W))  # Eq. (5): P_i
            if i == 0 and self.grounding is not None:  # Eq. (2): no word has touched x yet
                P = self.text_free_image(x, (H, W))  # (B, d_s, H_s, W_s)
            o = bert_layers(self.bert.encoder.layer[i * n : (i + 1) * n], o, ext_mask)  # O_i
            x, o, F_v = cam(x, o, (H, W), attention_mask)  # Eq. (6)-(11)
            feats.append(norm(F_v).transpose(1, 2).reshape(B, -1, H, W))  # (B, d_i, H_i, W_i)
            if stage.downsample is not None:  # Swin patch merging: (B, N, d) -> (B, N/4, 2d)
                x = stage.downsample(x, (H, W))
                H, W = (H + 1) // 2, (W + 1) // 2
        return feats, o, P

    def text_free_image(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """P of Eq. (2): stage 1's output x (B, N, d_1), before CAM 1, carried through Swin stages
        2..grounding_stage without any CAM (a partial second pass: stages 2+ see 4x fewer tokens
        each). Returns (B, d_s, H_s, W_s)."""
        (H, W), stages = hw, self.swin.encoder.layers
        for stage, prev in zip(stages[1 : self.cfg.grounding_stage], stages, strict=False):
            x = prev.downsample(x, (H, W))  # (B, N/4, 2d)
            H, W = (H + 1) // 2, (W + 1) // 2
            x = swin_stage_blocks(stage, x, (H, W))
        return x.transpose(1, 2).reshape(x.shape[0], -1, H, W)

    def encode_text(self, input_ids, attention_mask, selected):
        """LanguageEncoder of Eq. (1): plain BERT on the masked text (no image fusion). With
        own_mask_token the masked positions (B, L) read Mask Grounding's [MASK] embedding instead
        of BERT's [MASK] row (which LAVT's recipe freezes with the rest of bert.embeddings)."""
        if self.cfg.own_mask_token:
            words = self.bert.embeddings.word_embeddings(input_ids)  # (B, L, d_t)
            words = torch.where(selected[..., None], self.grounding.mask_token, words)
            o = self.bert.embeddings(inputs_embeds=words)
        else:
            o = self.bert.embeddings(input_ids=input_ids)
        return bert_layers(self.bert.encoder.layer, o, bert_extended_mask(attention_mask, o.dtype))

    def forward(self, images, input_ids, attention_mask, targets=None):
        """images (B, 3, H, W), input_ids / attention_mask (B, L) -> {"mask_logits" (B, 1, H/4,
        W/4)}; with targets also "loss", "losses" and what diagnostics reads ("mg_*", "cal_*")."""
        feats, O, P = self.encode(images, input_ids, attention_mask)
        I, logits = self.decoder(feats)
        out = {"mask_logits": logits}
        if targets is None:
            return out
        cfg = self.cfg
        masks = targets["masks"].float()  # (B, H, W)
        losses = self.segmentation_loss(logits, masks)
        total = cfg.lambda_bce * losses["bce"] + cfg.lambda_dice * losses["dice"]
        if self.use_p2p or self.use_p2t:
            cal = self.alignment_loss(I, O, attention_mask, masks, logits, out)
            losses.update(cal)
            # On the device: int(self.step) would stall every training step on a host sync.
            warm = ((self.step + 1) / cfg.cal_warmup).clamp(max=1.0) if cfg.cal_warmup else 1.0
            total = total + warm * cfg.lambda_cal * sum(cal.values())
        if self.grounding is not None:
            losses["grounding"] = self.grounding_loss(P, input_ids, attention_mask, masks, out)
            total = total + cfg.lambda_grounding * losses["grounding"]
        if self.training:  # a new tensor, not step += 1: the compiled backward may read the old
            self.step = self.step + 1  # step (AOTAutograd saves it), which must stay unchanged
        out["loss"] = total
        out["losses"] = {k: v.detach() for k, v in losses.items()}
        return out

    def segmentation_loss(self, logits, masks) -> dict[str, torch.Tensor]:
        """BCE + Dice (Eq. 15's first two terms) on the stride-4 logits upsampled to the GT's
        resolution, as LAVT (its output is upsampled to the input) and Mask2Former (points sampled
        from the upsampled logits) compare with the full-resolution mask. A GT shrunk to the
        logits by nearest neighbour loses small objects (docs/magnet.md#segmentation_loss)."""
        logits = common.upsample_to(logits, masks)  # (B, 1, H, W)
        return {"bce": common.bce_loss(logits, masks), "dice": common.dice_loss(logits, masks)}

    def alignment_loss(self, I, O, attention_mask, masks, logits, out) -> dict[str, torch.Tensor]:
        """CAL (Eq. 12-14) on the mask features I. In eval mode it also leaves the pixel-to-text
        cosine map in `out` for the sample panels."""
        t_avg = None
        if self.use_p2t:  # T_avg = proj(mean of the words' features)
            w = attention_mask[..., None].to(O.dtype)
            t_avg = self.text_proj((O * w).sum(1) / w.sum(1).clamp(min=1))  # (B, D)
            if not self.training:
                cos = (
                    F.normalize(I.float(), dim=1)
                    * F.normalize(t_avg.float(), dim=1)[..., None, None]
                )
                out["cal_cos_text"] = cos.sum(1)  # (B, H/4, W/4)
        target = common.fit_target(masks, logits)[:, 0]  # (B, H/4, W/4), nearest
        cfg = self.cfg
        l_p2p, l_p2t = cross_modal_alignment_loss(
            I, target, t_avg, cfg.tau_p2p, cfg.tau_p2t, self.use_p2p, self.use_p2t
        )
        return ({"p2p": l_p2p} if self.use_p2p else {}) | ({"p2t": l_p2t} if self.use_p2t else {})

    def grounding_loss(self, P, input_ids, attention_mask, masks, out) -> torch.Tensor:
        """Mask Grounding (Eq. 1-4): cross-entropy of the hidden words, predicted from the masked
        text, the text-free image embedding P and the GT mask.

        In eval mode each expression hides the same words every time, whatever batch it is in (a
        generator per sentence, seeded with its tokens), and the predictor also runs with another
        sample's image and mask (the batch rolled by one): the accuracy gap between the two
        ("mg_correct" vs "mg_correct_other") is the grounding."""
        cfg = self.cfg
        gen = None
        if not self.training:
            position = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)
            seeds = (input_ids * attention_mask * position).sum(1).tolist()  # (B,) ints
            gen = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        never = () if cfg.hide_articles else cfg.article_ids
        masked_ids, selected = mask_words(
            input_ids, attention_mask, cfg.mask_ratio, cfg.mask_token_id, gen, never, cfg.mask_rule
        )
        O_masked = self.encode_text(masked_ids, attention_mask, selected)  # Eq. (1)
        P = F.adaptive_avg_pool2d(P, cfg.grounding_grid)  # Eq. (2): (B, d_s, g, g)
        if torch.compiler.is_compiling():  # fixed shapes: score every position, count the masked
            word_logits = self.grounding(O_masked, attention_mask, None, P, masks)  # (B, L, V)
            ce = F.cross_entropy(word_logits.float().transpose(1, 2), input_ids, reduction="none")
            return (ce * selected).sum() / selected.sum().clamp(min=1)  # (B, L) -> mean
        word_logits = self.grounding(O_masked, attention_mask, selected, P, masks)  # Eq. (4)
        y_gt = input_ids[selected]  # (n_masked,)
        if len(y_gt) == 0:  # no word to mask in the whole batch
            return word_logits.sum() * 0
        if not self.training:
            guess = word_logits.argmax(-1)
            out.update(mg_selected=selected, mg_input_ids=input_ids, mg_guess=guess,
                       mg_correct=guess == y_gt)  # fmt: skip
            if len(P) > 1:
                other = self.grounding(
                    O_masked, attention_mask, selected, P.roll(1, 0), masks.roll(1, 0)
                )
                guess_other = other.argmax(-1)
                out.update(mg_guess_other=guess_other, mg_correct_other=guess_other == y_gt)
        return F.cross_entropy(word_logits.float(), y_gt)


def build_model(cfg: Config) -> nn.Module:
    unknown = [a for a in cfg.ablate if a not in ABLATIONS]
    if unknown:
        raise ValueError(
            f"unknown ablation '{unknown[0]}' for magnet; choose from {', '.join(ABLATIONS)}"
        )
    return MagNet(cfg)


# ---------------------------------------------------------------------------------------------
# The mechanism, measured (train.py: diag/<name>) and drawn (samples.png)


def diagnostics(outputs: dict, batch: dict) -> dict[str, float]:
    """The paper's mechanism on one eval batch (model.eval(), forward with targets).

    mg_acc_own / mg_acc_other: masked-word accuracy of Mask Grounding with the sample's own image
    and mask / with another sample's; mg_gain = their difference (0 = the predictor ignores the
    image and mask: plain language modelling). cal_p2p / cal_p2t: the CAL terms (Eq. 13-14)."""
    nan = float("nan")
    result = {}
    own, other = outputs.get("mg_correct"), outputs.get("mg_correct_other")
    if own is not None and len(own):
        result["mg_acc_own"] = own.float().mean().item()
        result["mg_acc_other"] = other.float().mean().item() if other is not None else nan
        result["mg_gain"] = result["mg_acc_own"] - result["mg_acc_other"]
    losses = outputs.get("losses", {})
    for name in ("p2p", "p2t"):
        if name in losses:
            result[f"cal_{name}"] = float(losses[name])
    return result


def sample_extra(outputs: dict, i: int, tokenizer) -> list[tuple]:
    """Panels for samples.png: the pixel-to-text cosine cos(I, T_avg) of CAL, and the grounding
    predictor's guesses for the masked words with the sample's own image and mask / another's."""
    panels = []
    if "cal_cos_text" in outputs:
        cos = outputs["cal_cos_text"][i].float().cpu().numpy()
        panels.append((cos, "CAL: cos(pixel I, sentence T_avg)", (-1.0, 1.0)))
    if "mg_selected" in outputs:
        selected = outputs["mg_selected"].cpu()
        # The guesses are listed for the masked words of the whole batch, sample after sample.
        start = int(selected[:i].sum())
        positions = torch.nonzero(selected[i]).flatten().tolist()
        ids = outputs["mg_input_ids"][i].cpu()
        parts = []
        for j, pos in enumerate(positions):
            word = tokenizer.convert_ids_to_tokens(int(ids[pos]))
            guess = tokenizer.convert_ids_to_tokens(int(outputs["mg_guess"][start + j]))
            text = f"'{word}' -> {guess}"
            if "mg_guess_other" in outputs:
                other = int(outputs["mg_guess_other"][start + j])
                text += f" (other image: {tokenizer.convert_ids_to_tokens(other)})"
            parts.append(text)
        panels.append((None, "Mask Grounding: " + "; ".join(parts)))
    return panels or [(None, "")]


# ---------------------------------------------------------------------------------------------
# The paper's tables and the release's recipe (train.py --row, --recipe paper)

# The paper's ablations (Table 3): every row is LAVT plus one component; LAVT here = this file
# with MG, CAM and CAL switched off. Numbers: oIoU on RefCOCO val and RefCOCO+ val (Swin-B).
LAVT = ("no_mg", "no_cam", "no_p2p", "no_p2t")
_MG = ("no_cam", "no_p2p", "no_p2t")  # LAVT + Mask Grounding
_CAM = ("no_mg", "no_p2p", "no_p2t")  # LAVT + CAM
# Every Mask Grounding row masks words as the paper does, whatever the preset (tiny() keeps the
# articles, hides an exact count and reads BERT's own [MASK] row); the Center rows also pin the
# paper's input, the centre as one token (tiny() adds the average and puts C on the words).
_PAPER_MASKING = {"hide_articles": True, "mask_rule": "bernoulli", "own_mask_token": True}
_CENTRE = {**_PAPER_MASKING, "mask_input": "centre", "centre_on_words": False}
# What every Table 3 row ran with (§4.4), as train.py --row applies it under --recipe paper.
_SETTING = {"image_size": 224, "epochs": 10}


def _row(ablate, refcoco, refcoco_plus, note="", **spec) -> dict:
    """One Table 3 row: its ablations, Config overrides, the paper's setting (224 px, 10 epochs)
    and the paper's RefCOCO val / RefCOCO+ val oIoU."""
    paper = {"oIoU": refcoco, "oIoU_refcoco+": refcoco_plus}  # RefCOCO val, RefCOCO+ val
    return {"ablate": ablate, **spec, "recipe": _SETTING, "paper": paper} | (
        {"note": note} if note else {}
    )


def _skip(reason, refcoco, refcoco_plus) -> dict:
    return {"skip": reason, "paper": {"oIoU": refcoco, "oIoU_refcoco+": refcoco_plus}}


_FULL = "every row keeps CAM's full-resolution branch"
TABLES = {
    "Table 3a": {  # Mask Grounding vs masked (vision-)language modelling
        "Baseline LAVT": _row(LAVT, 67.08, 55.98, baseline=True),
        "+MLM masked language modelling": _row(
            _MG + ("mlm_only",), 67.31, 55.69, set=_PAPER_MASKING
        ),
        "+MaskedVLM words from language + image, no mask signal": _row(
            _MG,
            67.33,
            56.13,
            "masked-image reconstruction of [37] not built",
            set={**_PAPER_MASKING, "mask_input": "none"},
        ),
        "+MG Mask Grounding": _row(_MG, 68.52, 57.26, set=_CENTRE),
    },
    "Table 3b": {  # mask encoder input
        "None LAVT": _row(LAVT, 67.08, 55.98, baseline=True),
        "Average image features averaged in the mask": _row(
            _MG, 68.19, 56.98, set={**_PAPER_MASKING, "mask_input": "average"}
        ),
        "Center mask centre coordinates": _row(_MG, 68.52, 57.26, set=_CENTRE),
    },
    "Table 3c": {  # depth of the masked token predictor
        "None LAVT": _row(LAVT, 67.08, 55.98, baseline=True),
        "4 predictor layers": _row(_MG, 67.14, 57.19, set={**_CENTRE, "predictor_layers": 4}),
        "8 predictor layers": _row(_MG, 68.52, 57.26, set={**_CENTRE, "predictor_layers": 8}),
        "12 predictor layers": _row(_MG, 66.92, 55.95, set={**_CENTRE, "predictor_layers": 12}),
    },
    "Table 3d": {  # Mask Grounding on other RIS methods
        "LAVT": _row(LAVT, 67.08, 55.98, baseline=True),
        "LAVT+MG": _row(_MG, 68.52, 57.26, set=_CENTRE),
        "ReLA": _skip("ReLA is rela.py (train.py --method rela)", 66.23, 53.69),
        "ReLA+MG": _skip("Mask Grounding is not built into rela.py", 67.33, 55.21),
        "CRIS": _skip("CRIS is cm_masksd.py's main branch (no MG there)", 64.67, 54.84),
        "CRIS+MG": _skip("Mask Grounding is not built into cm_masksd.py", 65.50, 56.23),
    },
    "Table 3e": {  # CAM pyramid scales
        "None LAVT (one-way pixel-word attention)": _row(LAVT, 67.08, 55.98, baseline=True),
        "{1} CAM, scale 1": _row(_CAM, 67.18, 56.20, _FULL, set={"cam_scales": (1,)}),
        "{1,2} CAM, scales 1, 2": _row(_CAM, 67.44, 56.46, _FULL, set={"cam_scales": (1, 2)}),
        "{1,2,3} CAM, scales 1-3": _row(_CAM, 67.79, 56.74, _FULL, set={"cam_scales": (1, 2, 3)}),
        "{1,2,3,6} CAM, scales 1, 2, 3, 6": _row(
            _CAM, 68.06, 57.04, _FULL, set={"cam_scales": (1, 2, 3, 6)}
        ),
    },
    "Table 3f": {  # Cross-modal Alignment Loss terms
        "None LAVT (no CAL)": _row(LAVT, 67.08, 55.98, baseline=True),
        "P2P LAVT + L_P2P": _row(("no_mg", "no_cam", "no_p2t"), 67.63, 56.87),
        "P2T LAVT + L_P2T": _row(("no_mg", "no_cam", "no_p2p"), 68.27, 57.22),
        "P2P+P2T LAVT + L_CAL": _row(("no_mg", "no_cam"), 68.44, 57.61),
    },
}

# The release has no training code and its README says "follow LAVT": LAVT's recipe
# [LAVT: README.md, args.py, train.py]; the paper adds nothing beyond the loss weights (§3.5).
RECIPE = {
    "optimizer": "adamw",  # LAVT train.py
    "lr": 5e-5,  # LAVT args.py; MagNet args.py keeps the default
    "encoder_lr_factor": 1.0,  # LAVT trains Swin, BERT and the new layers at one lr (the demo too)
    "weight_decay": 0.01,  # LAVT args.py (0 on Swin norms / position tables: not reproduced)
    "schedule": "poly",  # LAVT train.py, per iteration
    "poly_power": 0.9,  # LAVT train.py
    "warmup": 0,  # LAVT: none
    "epochs": 40,  # LAVT README / args.py (ablations: 10, paper §4.4)
    "batch_size": 32,  # LAVT: 8 per GPU x 4 GPUs
    "grad_clip": 0.0,  # LAVT: none
    # LAVT's optimizer leaves out BERT's embeddings and its last two layers (used, never updated).
    "frozen": ("bert.embeddings", "bert.encoder.layer.10", "bert.encoder.layer.11"),
}


if __name__ == "__main__":  # shape smoke run on the tiny preset (random weights)
    cfg = Config.tiny()
    cfg.pretrained = False
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
