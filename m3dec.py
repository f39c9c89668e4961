"""M3Dec: Multi-Modal Mutual Attention and Iterative Interaction for Referring Image Segmentation.
Chang Liu, Henghui Ding, Yulun Zhang, Xudong Jiang. IEEE Transactions on Image Processing 32,
3054-3065, 2023. Paper: https://arxiv.org/abs/2305.15302 · release: none (nor of VLT's Swin
version); base architecture VLT (ICCV'21): https://github.com/henghuiding/Vision-Language-Transformer
Lab notes, every measurement behind the choices below: docs/m3dec.md.

Idea. In a generic transformer decoder the words only *weigh* vision features: each word's output
is a mix of pixels (language-attended vision feature, LAV), so language fades layer after layer.
Multi-Modal Mutual Attention (M3Att, Eq. 1-2) computes one word-pixel matrix A_mut and normalises
it along both axes: along pixels it gives LAV (one vision vector per word), along words the
vision-attended language feature VAL (one language vector per pixel); F_mul = F_V^a (F_L^a)^T fuses
them. A stack of M3Dec layers (Fig. 3c) uses it as a cross-attention's value; Iterative Multi-Modal
Interaction (IMI, Eq. 3, Fig. 4) puts freshly transformed language back in between layers; Language
Feature Reconstruction (LFR, Eq. 4, Fig. 5) is a training-only loss asking the last decoder output
to still contain the sentence. The mask decoder (Fig. 6) uses the words' features as 1x1 kernels.
    image -> Swin-B -> F_vis (stride 16) -> N_enc = 2 transformer encoder layers -> F_enc
    text -> BERT -> F_t, F_t';  F_t -> [M3Dec layer -> IMI] x 2 -> M3Dec layer -> F_dec
    (F_dec, F_enc) -> mask decoder -> logits at stride 2;  F_dec -> LFR loss (training only)

Symbols (paper -> code). B batch, N_t = max_tokens, C channels, HW pixels of F_enc.
    F_enc, F_t, F_t'                  F_enc (B, HW, C), F_t (B, N_t, C), F_t_sent (B, C)
    F_L^k, F_L^v, F_V^k, F_V^v        MutualAttention.key_L / value_L / key_V / value_V
    A_mut (Eq. 1)                     A_mut (B, N_t, HW)
    softmax(A_mut), softmax(A_mut^T)  attn_V (B, N_t, HW), attn_L (B, HW, N_t)
    F_V^a (LAV), F_L^a (VAL), F_mul   F_V_a (B, N_t, C), F_L_a (B, HW, C), F_mul (B, N_t, HW)
    F_q                               F_q, the query after the layer's self-attention
    F_dec^n, F_l^n, F_i^n, w_ci^n     IterativeInteraction: F_dec, F_l, F_i, w_ci
    W_a^n, W_l'^n (Eq. 3)             IterativeInteraction.W_a, .W_l
    e, W_proj, F_proj, F_rec (Eq. 4)  LanguageReconstruction.e, .W_proj; F_proj, F_rec (B, C)
    w_mask, w_rec (Eq. 5)             Config.w_mask = 1, Config.w_rec = 0.1

Recipe (§IV-A; RECIPE at the end, train.py --recipe paper): Adam, lr 0.005 with a step decay, 50
epochs, batch 48; loss 1 x BCE + 0.1 x LFR's MSE (Eq. 5). The ablation tables ran the CNN row
(Darknet-53 + GRU at 416 px): their rows carry "recipe": {"image_size": 416}.

Differences, one line each; "both" = paper() and tiny(); (#x) = docs/m3dec.md#x, the evidence.
The paper is silent (one stated choice each; no release to take it from):
- both: HF Swin-B (window 12, 384 px, in22k) + bert-base-uncased, every layer trained (#encoders)
- both: F_vis = Swin stages k-1, k, k+1 fused at stage k's stride, as VLT's 1/16 map (#enc_stage)
- both: transformer layers post-norm as [5], FFN 4C, dropout 0.1, ReLU (#ffn_dim, #dropout)
- both: a 2-D sine position added once to F_vis; the first M3Dec query F_t gets none (BERT's order)
- both: F_t = BERT's states of all tokens -> Linear+BN+ReLU to C; F_t' = its [CLS] row (#encoders)
- both: §IV-A's BN + ReLU on feature layers; q/k/v and the 1x1 F_dec kernels are plain (#bn_relu)
- both: BatchNorm over words sees the real tokens only; padded rows are set to 0 (#max_tokens)
- both: M3Att single-head (Eq. 1's 1/sqrt(C)); padded words get -inf before softmaxes over words
- both: Fig. 3c's cross-attention: F_q is the query, the M3Att output its key and value
- both: IMI's w_ci^n starts at 1 (w_ci_init); IMI* (imi_fixed_ft) injects F_t, no pathway (#ablate)
- both: LFR's e is [5]'s sine/cosine; N_t counts [CLS]..[SEP], which F_rec averages; MSE.
- both: mask decoder: self-attn + LayerNorm, 3x3 convs of 512, x2 up to stride 2 (#out_stride)
- both: BCE on the logits upsampled to the GT's resolution; masks at sigmoid > 0.5 (#out_stride)
- both: F_mul -> C is a Linear(HW -> C): another image_size or more tokens than N_t raise
- both: the tables' "IoU" read as VLT's mean of per-sample IoUs, mIoU here (#TABLES)
- both: ablations: independent = 2 extra key projections for VAL; generic = VLT's layer (#ablate)
- both: RECIPE's step milestones, decay 0.1, no warm-up, clip or weight decay: VLT's (#RECIPE)
- both: samples.png shows LAV / VAL of the expression's first content word (#sample_extra)
The release differs: no release, nothing to differ from.
We deviate on purpose:
- tiny() only: 64 px, tiny Swin + BERT; F_enc = Swin stage 2 (8 x 8, stride 8) (#enc_stage)
- tiny() only: hidden_dim 32, mask_dim 32, num_heads 4, ffn_dim 64, dropout 0 (#hidden_dim ff.)
- tiny() only: max_tokens 20, the repository's BERT-family length (#max_tokens)
- tiny() only: Eq. 3's logits scaled by 1/sqrt(C), none is written (#imi_scale)
- tiny() only: LFR's target detached, W_proj a fixed random projection (#lfr_stop_grad)
- tiny() only: W_proj has a bias; Eq. 4 writes W_proj in R^{C x C} (#lfr_proj_bias)
- tiny() only: LFR's third reconstruction linear is a plain Linear (#lfr_last_bn_relu)
- tiny() only: the last mask conv's bias starts at logit(0.03), the shapes' share (#mask_prior)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, SwinBackbone, SwinConfig

from common import bce_loss, upsample_to

TEXT_ENCODER = "bert"

ABLATIONS: dict[str, str] = {
    "generic_attention": "M3Att + cross-attention replaced by a generic cross-attention from the "
    "words to F_enc (LAV only, VLT's decoder layer)",
    "independent_matrices": "M3Att computes a second A_mut (two extra key projections) for VAL; "
    "the first stays for LAV",
    "no_imi": "no Iterative Multi-Modal Interaction blocks between the M3Dec layers",
    "imi_fixed_ft": "IMI blocks inject the fixed word feature F_t instead of the transformed "
    "F_i^n (IMI*)",
    "no_lfr": "no Language Feature Reconstruction loss",
    "vlt_mask_decoder": "mask decoder maps from F_dec alone (Linear to HW per word, VLT's); F_enc "
    "not used",
    "concat_mask_decoder": "mask decoder input = F_enc concatenated with the word-summed F_dec "
    "tiled over the pixels, instead of F_dec as 1x1 kernels",
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
    # §IV-A: expressions padded to 15 words (RefCOCO/+), + [CLS] and [SEP]; G-Ref (20 words): 22
    max_tokens: int = 17
    vocab_size: int = 30522  # bert-base-uncased; train.py sets len(tokenizer)
    threshold: float = 0.5  # not given (VLT used 0.35); the BERT-family convention here
    pretrained: bool = True
    vision_name: str = "microsoft/swin-base-patch4-window12-384-in22k"
    text_name: str = "bert-base-uncased"
    vision_config: dict = field(default_factory=lambda: dict(SWIN_B))
    text_config: dict = field(default_factory=dict)  # BertConfig() defaults = bert-base
    ablate: tuple[str, ...] = ()
    # --- M3Dec ---
    enc_stage: int = 3  # Swin stage whose stride F_enc has: 3 = stride 16 (VLT's 1/16 map)
    out_stride: int = 2  # stride of the mask logits, VLT's seg_out_stride
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
    # The demo's choices (tiny() sets the other value; docs/m3dec.md#<field> says why):
    imi_scale: bool = False  # Eq. (3) as printed: no 1/sqrt(C) in the softmax
    lfr_stop_grad: bool = False  # Eq. (4): F_proj trained, W_proj "learnable parameters"
    lfr_proj_bias: bool = False  # Eq. (4): W_proj in R^{C x C}, no bias
    lfr_last_bn_relu: bool = True  # §IV-A: each of the three reconstruction linears + BN + ReLU
    # Initial foreground probability of the last mask conv (bias log(p / (1 - p))); None: PyTorch's
    # default init (the paper says nothing); tiny(): the synthetic shapes' foreground share.
    mask_prior: float | None = None

    @classmethod
    def paper(cls) -> Config:
        """Swin-B + bert-base-uncased at 480 px, C = 256 / 512, 8 heads, 2 + 3 layers (§IV-A)."""
        return cls()

    @classmethod
    def tiny(cls) -> Config:
        """The CPU demo: the repository's pretrained tiny Swin + BERT (pretrained/tiny-*), 64 px,
        and every choice made so that the demo learns (the docstring's "tiny() only" lines).

        Loaded exactly as paper() loads the Hub ids; vision_config / text_config repeat the
        folders' architectures so that pretrained=False builds the same model with random weights.
        F_enc = Swin stage 2 (8 x 8, stride 8) and two x2 upsamplings -> 32 x 32 logits, the paper's
        output stride 2."""
        return cls(
            image_size=64, max_tokens=20,
            vocab_size=60,  # the synthetic world's word-level BERT tokenizer; train.py sets it
            pretrained=True, vision_name="pretrained/tiny-swin", text_name="pretrained/tiny-bert",
            # depths 2: two blocks per stage, the second one's windows are shifted
            vision_config=dict(image_size=64, patch_size=4, num_channels=3, embed_dim=32,
                               depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=4,
                               mlp_ratio=4.0, drop_path_rate=0.0),
            text_config=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                             intermediate_size=256, max_position_embeddings=32),
            enc_stage=2, hidden_dim=32, mask_dim=32, num_heads=4, ffn_dim=64, dropout=0.0,
            # the demo's choices, each under its name in docs/m3dec.md
            imi_scale=True, lfr_stop_grad=True, lfr_proj_bias=True, lfr_last_bn_relu=False,
            mask_prior=0.03,  # the synthetic shapes' foreground share
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The paper's parts, in its order: M3Att and the M3Dec layer (§III-A), IMI (§III-B), LFR (§III-C),
# the mask decoder (§III-D)


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
        return self.proj(F_mul, ~pad), attn_V, attn_L  # (B, N_t, HW) -> (B, N_t, C)


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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """query (B, N_t, C), F_enc (B, HW, C), pad (B, N_t) -> output (B, N_t, C), the word->pixel
        attention attn_V (B, N_t, HW) and the pixel->word attention attn_L (B, HW, N_t) (None for
        generic attention, which has no VAL)."""
        sa = self.self_attn(query, query, query, key_padding_mask=pad, need_weights=False)[0]
        F_q = self.norm1(query + self.drop(sa))  # (B, N_t, C)
        if self.generic:
            # VLT-style layer: words query the vision feature; the output is LAV only.
            out, attn_V = self.cross_attn(F_q, F_enc, F_enc)  # (B, N_t, C), (B, N_t, HW)
            attn_L = None
        else:
            F_m, attn_V, attn_L = self.m3att(F_q, F_enc, pad)  # (B, N_t, C)
            # "we use the multi-modal feature as value input, so that the output can keep its
            # property as a multi-modal feature"
            out = self.cross_attn(F_q, F_m, F_m, key_padding_mask=pad, need_weights=False)[0]
        x = self.norm2(F_q + self.drop(out))  # (B, N_t, C)
        x = self.norm3(x + self.drop(self.ffn(x)))  # (B, N_t, C)
        return x, attn_V, attn_L


class IterativeInteraction(nn.Module):
    """One IMI block between M3Dec layers n and n+1 (§III-B, Eq. 3, Fig. 4).

    A language pathway parallel to the decoder: F_l^n = Linear(F_l^{n-1}) (F_l^0 = F_t); the
    decoder output picks the words it needs, F_i^n = A_l^n ReLU(F_l^n W_l'^n), and gets them back
    as F_dec'^n = BN(F_dec^n + w_ci^n F_i^n). With fixed_language (IMI*, Table II #3) F_i^n = F_t.
    `scaled` divides Eq. 3's logits by sqrt(C) (Config.imi_scale; Eq. 3 has no scale).
    """

    def __init__(
        self, C: int, w_ci_init: float = 1.0, fixed_language: bool = False, scaled: bool = False
    ):
        super().__init__()
        self.fixed_language = fixed_language
        self.scale = C**-0.5 if scaled else 1.0  # Config.imi_scale (tiny() only)
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
            F_l = self.lang_transform(F_l_prev, ~pad)  # (B, N_t, C)
            # Eq. (3): A_l^n = softmax(ReLU[F_dec^n W_a^n] (F_l^n)^T), over the words of F_l^n
            logits = F.relu(self.W_a(F_dec)) @ F_l.transpose(1, 2) * self.scale  # (B, N_t, N_t)
            A_l = logits.masked_fill(pad[:, None, :], float("-inf")).softmax(dim=-1)
            F_i = A_l @ F.relu(self.W_l(F_l))  # F_i^n = A_l^n F_l'^n, (B, N_t, C)
        # F_dec'^n = BN(F_dec^n + w_ci^n F_i^n), statistics over the real words
        return bn_tokens(self.bn, F_dec + self.w_ci * F_i, ~pad), F_l  # (B, N_t, C) x 2


class LanguageReconstruction(nn.Module):
    """Language Feature Reconstruction, LFR (§III-C, Eq. 4, Fig. 5); its loss is training-only.

    Target: F_proj = 1/(N_t+1) sum ReLU([(F_t + e) (c) F_t'] W_proj), over the N_t attended tokens
    and the sentence feature. Reconstruction: F_rec = AvgPool(three linear layers on F_dec), each
    followed by BN + ReLU (§IV-A). Loss: MSE(F_rec, F_proj); the target learns through W_proj.
    tiny()'s three choices (docs/m3dec.md): stop_grad detaches F_proj, so W_proj gets no gradient
    and is frozen on purpose (a fixed random projection); proj_bias gives W_proj a bias; with
    last_bn_relu False the third linear is a plain Linear, a regression output.
    """

    def __init__(
        self,
        C: int,
        max_tokens: int,
        stop_grad: bool = False,
        proj_bias: bool = False,
        last_bn_relu: bool = True,
    ):
        super().__init__()
        self.stop_grad = stop_grad
        self.W_proj = nn.Linear(C, C, bias=proj_bias)  # W_proj in R^{C x C}
        self.W_proj.requires_grad_(not stop_grad)  # frozen on purpose when nothing trains it
        # "three stacked linear layers" (Fig. 5), the third one plain when not last_bn_relu
        self.reconstruct = nn.ModuleList(LinearBNReLU(C, C) for _ in range(2))
        self.reconstruct_out = LinearBNReLU(C, C) if last_bn_relu else nn.Linear(C, C)
        self.register_buffer("e", sine_embedding_1d(max_tokens, C), persistent=False)

    def forward(
        self, F_t: torch.Tensor, F_t_sent: torch.Tensor, F_dec: torch.Tensor, keep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """F_t (B, N_t, C), F_t_sent (B, C), F_dec (B, N_t, C), keep (B, N_t) bool on tokens ->
        (F_proj (B, C), F_rec (B, C)); the loss is MSE(F_rec, F_proj)."""
        X = torch.cat([F_t + self.e, F_t_sent[:, None]], dim=1)  # (F_t + e) (c) F_t', (B, N_t+1, C)
        keep_X = torch.cat([keep, keep.new_ones(keep.shape[0], 1)], dim=1).to(X)  # (B, N_t+1)
        # Eq. (4): sum over the sequence, divided by N_t + 1
        F_proj = (F.relu(self.W_proj(X)) * keep_X[..., None]).sum(1) / keep_X.sum(1, True)  # (B, C)
        if self.stop_grad:
            F_proj = F_proj.detach()
        rec = F_dec
        for layer in self.reconstruct:
            rec = layer(rec, keep)  # (B, N_t, C)
        if isinstance(self.reconstruct_out, LinearBNReLU):
            rec = self.reconstruct_out(rec, keep)  # (B, N_t, C)
        else:
            rec = self.reconstruct_out(rec)  # (B, N_t, C)
        w = keep.to(rec)[..., None]  # (B, N_t, 1)
        F_rec = (rec * w).sum(1) / w.sum(1)  # average pooling over the tokens, (B, C)
        return F_proj, F_rec


class MaskDecoder(nn.Module):
    """Mask decoder (§III-D, Fig. 6): self-attention over F_dec, then F_dec's N_t rows act as the
    kernels of a 1x1 convolution over F_enc (N_t maps), then four convolutions with x2 upsampling
    between them (down to out_stride). `vlt_mask_decoder`: the maps come from F_dec alone;
    `concat_mask_decoder`: F_enc concatenated with the summed F_dec (both TABLE III).
    """

    def __init__(self, cfg: Config, HW: int, enc_stride: int):
        super().__init__()
        C, D, N_t = cfg.hidden_dim, cfg.mask_dim, cfg.max_tokens
        self.vlt_style = "vlt_mask_decoder" in cfg.ablate
        self.concat = "concat_mask_decoder" in cfg.ablate
        self.self_attn = nn.MultiheadAttention(C, cfg.num_heads, cfg.dropout, batch_first=True)
        self.norm = nn.LayerNorm(C)
        if self.vlt_style:
            self.to_maps = nn.Linear(C, HW)  # VLT: Dense(spatial_size, relu) per query
        num_up = int(math.log2(enc_stride // cfg.out_stride))  # 3 on paper(), 2 on tiny()
        convs = [conv_bn_relu(2 * C if self.concat else N_t, D, 3)]
        convs += [conv_bn_relu(D, D, 3) for _ in range(2)]
        convs += [nn.Conv2d(D, 1, 3, padding=1)]  # mask logits: no BN / ReLU on the last one
        up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        layers = []
        for i, conv in enumerate(convs):  # "upsampling layers are inserted between" the convs
            layers += [conv, up] if i < num_up else [conv]
        self.convs = nn.Sequential(*layers)
        if cfg.mask_prior is not None:  # tiny(): sigmoid(bias) = the data's foreground share
            nn.init.constant_(convs[-1].bias, math.log(cfg.mask_prior / (1 - cfg.mask_prior)))

    def forward(
        self, F_dec: torch.Tensor, F_enc: torch.Tensor, pad: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        """F_dec (B, N_t, C), F_enc (B, HW, C), pad (B, N_t), size = (H, W) -> (B, 1, h, w) at
        out_stride."""
        B, N_t, C = F_dec.shape
        sa = self.self_attn(F_dec, F_dec, F_dec, key_padding_mask=pad, need_weights=False)[0]
        kernels = self.norm(F_dec + sa)  # (B, N_t, C)
        if self.concat:
            sent = kernels.masked_fill(pad[..., None], 0.0).sum(1)  # "sum", (B, C)
            x = torch.cat([F_enc, sent[:, None].expand_as(F_enc)], dim=-1)  # (B, HW, 2C)
            return self.convs(x.transpose(1, 2).reshape(B, 2 * C, *size))  # (B, 1, h, w)
        if self.vlt_style:
            maps = F.relu(self.to_maps(kernels))  # (B, N_t, HW)
        else:
            # 1x1 convolution whose N_t kernels are the decoder features: sum_c K[n,c] F_enc[p,c]
            maps = kernels @ F_enc.transpose(1, 2)  # (B, N_t, C) @ (B, C, HW) -> (B, N_t, HW)
        maps = maps.masked_fill(pad[..., None], 0.0).view(B, N_t, *size)  # (B, N_t, H, W)
        return self.convs(maps)  # (B, 1, h, w)


# ---------------------------------------------------------------------------------------------
# Plumbing the paper's parts sit on: the visual neck + transformer encoder (Fig. 2, left), the
# Hub loader, the positional encodings, and §IV-A's Linear + BN + ReLU over the real words


class VisualEncoder(nn.Module):
    """Swin pyramid -> one map F_vis at the stride of stage `enc_stage` -> N_enc transformer
    encoder layers -> F_enc (Fig. 2)."""

    def __init__(self, cfg: Config):
        super().__init__()
        k = cfg.enc_stage
        if not 2 <= k <= 3:
            raise ValueError(f"m3dec: enc_stage must be 2 or 3 (a finer and a coarser neighbour), "
                             f"got {k}")  # fmt: skip
        self.out_features = [f"stage{k - 1}", f"stage{k}", f"stage{k + 1}"]
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
        # Likewise the Swin stages past the coarsest tap (tiny: stage 4 and the patch merging
        # into it) run inside SwinBackbone but feed nothing.
        stages = self.backbone.swin.encoder.layers  # stage i is stages[i - 1]
        if stages[k].downsample is not None:
            stages[k].downsample.requires_grad_(False)
        stages[k + 1 :].requires_grad_(False)
        self.stride = self.backbone.config.patch_size * 2 ** (k - 1)  # 16 on paper(), 8 on tiny()
        C = cfg.hidden_dim
        side = cfg.image_size // self.stride  # F_enc is side x side (M3Dec checks image_size)
        self.register_buffer("pos", sine_embedding_2d(side, side, C), persistent=False)  # (HW, C)
        # VLT-style neck: every level to C channels, then one fusion conv at the middle stride.
        self.lateral = nn.ModuleList(conv_bn_relu(c, C, 1) for c in self.backbone.channels)
        self.fuse = conv_bn_relu(3 * C, C, 1)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                C, cfg.num_heads, cfg.ffn_dim, cfg.dropout, batch_first=True
            )  # post-norm, ReLU FFN as in [5]
            for _ in range(cfg.num_enc_layers)
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """images (B, 3, S, S) -> F_enc (B, HW, C) and the map size (H, W)."""
        fine, mid, coarse = self.backbone(pixel_values=images).feature_maps  # strides s/2, s, 2s
        size = mid.shape[-2:]
        fine = F.adaptive_avg_pool2d(self.lateral[0](fine), size)  # (B, C, H, W), pooled x2
        mid = self.lateral[1](mid)  # (B, C, H, W)
        coarse = F.interpolate(self.lateral[2](coarse), size, mode="bilinear", align_corners=False)
        F_vis = self.fuse(torch.cat([fine, mid, coarse], dim=1))  # (B, 3C, H, W) -> (B, C, H, W)
        x = F_vis.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        x = x + self.pos.to(x)  # positional encoding, once at the input
        for layer in self.layers:
            x = layer(x)  # (B, HW, C)
        return x, tuple(size)  # (H, W)


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


def bn_tokens(bn: nn.BatchNorm1d, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """BatchNorm over the real tokens only: x (B, N, C), keep (B, N) bool -> (B, N, C).

    A plain BatchNorm1d on (B, C, N) would take its batch statistics from every row, padding
    included (docs/m3dec.md#max_tokens). The real rows (n_real, C) are normalised as one batch;
    padded rows are 0."""
    y = bn(x[keep])  # (n_real, C)
    out = y.new_zeros(*x.shape[:2], y.shape[-1])  # (B, N, C), in the dtype BN returns
    out[keep] = y
    return out


class LinearBNReLU(nn.Module):
    """Linear -> BatchNorm (real tokens) -> ReLU on a sequence (B, N, C_in) -> (B, N, C_out).

    §IV-A: "All linear layers and convolutions layers are followed by a Batch Normalization and
    ReLU function unless otherwise noticed."
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.linear = nn.Linear(c_in, c_out, bias=False)  # a bias is redundant before BN
        self.bn = nn.BatchNorm1d(c_out)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return F.relu(bn_tokens(self.bn, self.linear(x), keep))  # (B, N, C_out)


def conv_bn_relu(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


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
        if stride % cfg.out_stride or stride < cfg.out_stride:
            raise ValueError(f"m3dec: out_stride {cfg.out_stride} must divide F_enc's {stride}")
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
            IterativeInteraction(C, cfg.w_ci_init, fixed, cfg.imi_scale) for _ in range(n_imi)
        )
        self.lfr = None
        if "no_lfr" not in cfg.ablate:
            self.lfr = LanguageReconstruction(
                C, cfg.max_tokens, cfg.lfr_stop_grad, cfg.lfr_proj_bias, cfg.lfr_last_bn_relu
            )
        self.mask_decoder = MaskDecoder(cfg, HW, stride)

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
        S/2), "attn_V" (B, N_t, HW) and "attn_L" (B, HW, N_t) of the last layer, "input_ids" and
        "attention_mask" padded to N_t, + "loss", "losses", "F_proj", "F_rec" with targets}."""
        input_ids, attention_mask = self._check_inputs(images, input_ids, attention_mask)
        pad = attention_mask == 0  # (B, N_t), True on padding
        F_enc, size = self.visual_encoder(images)  # (B, HW, C)
        words = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        F_t = self.text_proj(words.last_hidden_state, ~pad)  # (B, N_t, D_bert) -> (B, N_t, C)
        F_t_sent = F_t[:, 0]  # [CLS] as the sentence feature F_t', (B, C)

        # M3Dec (§III-A) with IMI (§III-B) between successive layers.
        F_dec, F_l = F_t, F_t  # the first query is F_t; F_l^0 = F_t
        first_attn_V = None
        for n, layer in enumerate(self.decoder_layers):
            F_dec, attn_V, attn_L = layer(F_dec, F_enc, pad)  # (B, N_t, C)
            first_attn_V = attn_V if n == 0 else first_attn_V
            if n < len(self.imi):
                F_dec, F_l = self.imi[n](F_dec, F_l, pad)
        logits = self.mask_decoder(F_dec, F_enc, pad, size)  # (B, 1, h, w)

        # Values for diagnostics() and sample_extra(): the last layer's two attention maps and the
        # first layer's LAV (its queries are still the words F_t).
        out = {"mask_logits": logits, "attn_V": attn_V.detach(),
               "attn_V_first": first_attn_V.detach(), "input_ids": input_ids,
               "attention_mask": attention_mask}  # fmt: skip
        if attn_L is not None:
            out["attn_L"] = attn_L.detach()
        if targets is not None:
            # BCE against the full-resolution GT: a GT shrunk to the logits caps what can be
            # learnt (docs/m3dec.md#out_stride)
            losses = {"mask": bce_loss(upsample_to(logits, targets["masks"]), targets["masks"])}
            loss = self.cfg.w_mask * losses["mask"]
            if self.lfr is not None:
                F_proj, F_rec = self.lfr(F_t, F_t_sent, F_dec, ~pad)
                out["F_proj"], out["F_rec"] = F_proj.detach(), F_rec.detach()
                # LFR is a training-only loss: "computationally free during inference" (§III-D);
                # in eval (with targets) F_proj / F_rec only feed diagnostics().
                if self.training:
                    losses["lfr"] = F.mse_loss(F_rec, F_proj)
                    loss = loss + self.cfg.w_rec * losses["lfr"]  # Eq. (5)
            out["loss"], out["losses"] = loss, losses
        return out


def build_model(cfg: Config) -> nn.Module:
    unknown = [a for a in cfg.ablate if a not in ABLATIONS]
    if unknown:
        raise ValueError(
            f"unknown ablation '{unknown[0]}' for m3dec; choose from {', '.join(ABLATIONS)}"
        )
    exclusive = [
        ({"no_imi", "imi_fixed_ft"}, "'no_imi' and 'imi_fixed_ft' exclude each other"),
        ({"generic_attention", "independent_matrices"}, "'independent_matrices' needs M3Att"),
        ({"vlt_mask_decoder", "concat_mask_decoder"}, "choose one mask decoder variant"),
    ]
    for pair, msg in exclusive:
        if pair <= set(cfg.ablate):
            raise ValueError(f"m3dec: {msg}")
    if cfg.num_dec_layers < 1:
        raise ValueError(f"m3dec: num_dec_layers must be >= 1, got {cfg.num_dec_layers}")
    if cfg.mask_prior is not None and not 0 < cfg.mask_prior < 1:
        raise ValueError(f"m3dec: mask_prior must be in (0, 1), got {cfg.mask_prior}")
    return M3Dec(cfg)


# ---------------------------------------------------------------------------------------------
# The mechanism measured (train.py calls these on eval batches) and shown (samples.png)


def word_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, N_t) True on the words of the expression: attended tokens without [CLS] (first) and
    [SEP] (last attended); an empty expression keeps its special tokens."""
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    real = attention_mask.bool().clone()
    real[:, 0] = False  # [CLS]
    real[rows, attention_mask.sum(1) - 1] = False  # [SEP] = last attended token
    return torch.where(real.any(1, keepdim=True), real, attention_mask.bool())


def diagnostics(outputs: dict, batch: dict) -> dict[str, float]:
    """The paper's mechanism on one eval batch (train.py averages over the val split).

    LFR (Eq. 4): lfr_R2 = 1 - sum |F_rec - F_proj|^2 / sum |F_proj - mean F_proj|^2 over the
    batch, i.e. the reconstruction against predicting the batch mean of F_proj (R^2 <= 0: LFR
    teaches nothing about the sentence); lfr_proj_spread = std of F_proj across the batch's
    sentences (mean over channels), lfr_proj_norm = mean |F_proj|: a collapsing target shows as
    spread -> 0.
    Mutual attention (Eq. 2a, last layer): for expressions with a target, att_on_target = share of
    the words' pixel attention that falls on the referred object (mean over the words), against
    target_area = the object's share of the F_enc cells (what a uniform map would give);
    att_on_target_best = the same for the word that attends the object most; att_on_target_first =
    att_on_target in the first M3Dec layer.
    """
    result = {}
    if "F_proj" in outputs and outputs["F_proj"].shape[0] > 1:
        F_proj, F_rec = outputs["F_proj"].float(), outputs["F_rec"].float()
        centred = F_proj - F_proj.mean(0, keepdim=True)  # (B, C)
        sst = centred.pow(2).sum()
        result["lfr_R2"] = (1 - (F_rec - F_proj).pow(2).sum() / sst).item() if sst > 0 else 0.0
        result["lfr_proj_spread"] = centred.pow(2).mean(0).sqrt().mean().item()
        result["lfr_proj_norm"] = F_proj.norm(dim=1).mean().item()
    side = math.isqrt(outputs["attn_V"].shape[-1])
    # the object's share of each F_enc cell, (B, HW)
    cover = F.adaptive_avg_pool2d(batch["mask"].float()[:, None], side).flatten(1)
    words = word_mask(outputs["input_ids"], outputs["attention_mask"])  # (B, N_t)
    has = (cover.sum(1) > 0) & ~batch["no_target"].bool()  # expressions with a target
    if not has.any():
        names = ("att_on_target", "att_on_target_best", "att_on_target_first", "target_area")
        return {**result, **dict.fromkeys(names, math.nan)}

    def share(attn_V: torch.Tensor) -> torch.Tensor:
        """(B, N_t, HW) -> share of each word's attention on the object, (B, N_t), 0 off words."""
        return (attn_V.float() @ cover[..., None])[..., 0].masked_fill(~words, 0.0)

    on = share(outputs["attn_V"])  # (B, N_t)
    result["att_on_target"] = (on.sum(1) / words.sum(1))[has].mean().item()
    result["att_on_target_best"] = on.masked_fill(~words, -1.0).amax(1)[has].mean().item()
    on_first = share(outputs["attn_V_first"])
    result["att_on_target_first"] = (on_first.sum(1) / words.sum(1))[has].mean().item()
    result["target_area"] = cover.mean(1)[has].mean().item()
    return result


# Words that name nothing in the image. samples.png shows the first word not in this list: a
# fixed rule, so that a word's maps can be read against its meaning ("red" should look at the red
# objects); picking by attention mass chose "the" in most rows (docs/m3dec.md#sample_extra).
FUNCTION_WORDS = frozenset(
    "a an the this that these those of at in on to from with by for and or but not except all "
    "every each one ones it its is are which who".split()
)


def content_word(tokens: list[str], words: torch.Tensor) -> int:
    """Index of the expression's first content word: a word (words (N_t,) bool, no [CLS] / [SEP]
    / padding) that is alphabetic, not a word piece (##...) and not in FUNCTION_WORDS; the first
    word when there is none."""
    candidates = [n for n in range(len(tokens)) if words[n]]
    for n in candidates:
        t = tokens[n].lower()
        if t.isalpha() and t not in FUNCTION_WORDS:
            return n
    return candidates[0]


def sample_extra(outputs: dict, i: int, tokenizer) -> list:
    """For samples.png: the last M3Dec layer's LAV map (Eq. 2a, that word's weights over the
    pixels) of the expression's first content word, and its VAL map (Eq. 2b, the share of each
    pixel's attention that goes to the word). Generic attention: its head-averaged map, no VAL."""
    if "attn_V" not in outputs:
        return [(None, "")]
    words = word_mask(outputs["input_ids"][i : i + 1], outputs["attention_mask"][i : i + 1])[0]
    tokens = tokenizer.convert_ids_to_tokens(outputs["input_ids"][i].tolist())
    n = content_word(tokens, words)
    attn_V = outputs["attn_V"][i].float()  # (N_t, HW)
    side = math.isqrt(attn_V.shape[1])
    panels = [(attn_V[n].reshape(side, side).cpu().numpy(), f"LAV (Eq. 2a) of '{tokens[n]}'")]
    if "attn_L" in outputs:
        val = outputs["attn_L"][i, :, n].float().reshape(side, side).cpu().numpy()
        panels.append((val, f"VAL (Eq. 2b): pixels' weight on '{tokens[n]}'", (0.0, 1.0)))
    return panels


# ---------------------------------------------------------------------------------------------
# The paper's tables and recipe: TABLES (train.py --row), RECIPE (train.py --recipe paper)

# The paper's ablation tables, all on RefCOCO val with the CNN row of Table IV (Darknet-53 + GRU:
# its RefCOCO val IoU 67.88 and Table V's Pr@0.5 79.01 are the tables' full model), not the
# Swin-B + BERT row of paper(). That row ran at 416 px (§IV-A), which every row's "recipe" carries;
# its backbone cannot be built here. "IoU": read as VLT's released evaluation (callbacks/eval.py
# averages the per-sample IoUs), i.e. mIoU here; Pr@0.5 / Pr@0.9 are Prec@0.5 / Prec@0.9.
# One build, one number: TABLE I's 3-shared row, TABLE II #4 and TABLE III's Ours are one model.
_CNN_ROW = {"image_size": 416}  # §IV-A: "416x416 for CNN backbone"
# TABLE I as printed: M3Dec layers -> (IoU, Pr@0.5) for shared / independent / generic (LAV only).
_TABLE_I = {
    1: ((60.57, 72.47), (62.36, 74.00), (55.42, 70.02)),
    2: ((66.30, 78.01), (66.32, 78.55), (64.12, 75.33)),
    3: ((67.88, 79.01), (67.80, 78.94), (64.40, 75.81)),
    4: ((67.82, 78.95), (67.76, 78.99), (64.42, 75.79)),
}
_SETTINGS = (
    ("shared", (), "shared A_mut"),
    ("independent", ("independent_matrices",), "independent A_mut"),
    ("generic", ("generic_attention",), "generic attention (LAV only)"),
)
TABLES: dict[str, dict[str, dict]] = {
    "TABLE I": {  # number of M3Dec layers x attention setting (IMI and LFR on)
        f"{n}-{name} {n} layer(s), {desc}": {
            "ablate": ablate, "set": {"num_dec_layers": n}, "recipe": dict(_CNN_ROW),
            "paper": {"mIoU": row[i][0], "Prec@0.5": row[i][1]},
            **({"baseline": True} if (n, name) == (3, "shared") else {})}  # the default model
        for n, row in _TABLE_I.items()
        for i, (name, ablate, desc) in enumerate(_SETTINGS)
    },
    "TABLE II": {  # components, RefCOCO val; 3 layers
        "#0 Baseline (Generic LAV): no IMI, no LFR": {
            "ablate": ("generic_attention", "no_imi", "no_lfr"), "recipe": dict(_CNN_ROW),
            "paper": {"mIoU": 62.04, "Prec@0.5": 73.52}, "baseline": True},
        "#1 Baseline (M3Att): no IMI, no LFR": {
            "ablate": ("no_imi", "no_lfr"), "recipe": dict(_CNN_ROW),
            "paper": {"mIoU": 65.56, "Prec@0.5": 76.66}},
        "#2 Baseline + IMI": {
            "ablate": ("no_lfr",), "recipe": dict(_CNN_ROW),
            "paper": {"mIoU": 66.70, "Prec@0.5": 77.62}},
        "#3 Baseline + IMI* (fixed F_t injected)": {
            "ablate": ("imi_fixed_ft", "no_lfr"), "recipe": dict(_CNN_ROW),
            "paper": {"mIoU": 65.92, "Prec@0.5": 76.80}},
        "#4 Ours (M3Att + IMI + LFR)": {
            "ablate": (), "recipe": dict(_CNN_ROW), "paper": {"mIoU": 67.88, "Prec@0.5": 79.01}},
    },
    "TABLE III": {  # mask decoder, RefCOCO val
        "VLT mask decoder from F_dec only": {
            "ablate": ("vlt_mask_decoder",), "recipe": dict(_CNN_ROW),
            "paper": {"mIoU": 66.05, "Prec@0.5": 78.64, "Prec@0.9": 13.81}},
        "Concate F_dec summed, concatenated with F_enc": {
            "ablate": ("concat_mask_decoder",), "recipe": dict(_CNN_ROW),
            "paper": {"mIoU": 66.58, "Prec@0.5": 78.90, "Prec@0.9": 15.55}},
        "Ours F_dec as 1x1 kernels on F_enc": {
            "ablate": (), "recipe": dict(_CNN_ROW),
            "paper": {"mIoU": 67.88, "Prec@0.5": 79.01, "Prec@0.9": 17.70}, "baseline": True},
    },
    "Sec. IV-B": {  # the text's VAL-only experiment (§IV-B), no table and no number
        "VAL-only vision as query, language as key/value": {
            "skip": "the decoder's query stream would be the HW pixels instead of the N_t words, "
            "so F_dec (the mask decoder's kernels, Fig. 6) and IMI/LFR's word rows do not exist; "
            "a different architecture, and the paper reports no number",
            "paper": {}, "note": "the paper: 'fails to converge'"},
    },
}  # fmt: skip

RECIPE = {
    "optimizer": "adam",  # §IV-A "using the Adam [60] optimizer"
    "lr": 0.005,  # §IV-A "The learning rate is set to 0.005"
    "encoder_lr_factor": 1.0,  # paper silent; VLT trains its backbone at the same lr (free_body 1)
    "weight_decay": 0.0,  # paper silent; VLT's Keras Adam has none
    "schedule": "step",  # §IV-A "with a step decay schedule"
    # Milestones and factor: paper silent; VLT's config/base.yaml (steps [40, 45, 50], lr / 10 per
    # step, epochs counted from 1), i.e. after 39, 44 and 49 finished epochs.
    "milestones": (39, 44, 49),
    "gamma": 0.1,  # VLT callbacks/learning_scheduler.py: lr_start / 10**k
    "warmup": 0,  # paper silent; VLT has none
    "epochs": 50,  # §IV-A "trained for 50 epochs"
    "batch_size": 48,  # §IV-A "batch size set to 48" (4 V100)
    "grad_clip": 0.0,  # paper silent; VLT does not clip
    "frozen": (),  # paper silent
}
