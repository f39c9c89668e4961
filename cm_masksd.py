"""CM-MaskSD: Cross-Modality Masked Self-Distillation for Referring Image Segmentation.

Paper: "CM-MaskSD: Cross-Modality Masked Self-Distillation for Referring Image Segmentation",
Wenxuan Wang, Jing Liu, Xingjian He, Yisi Zhang, Chen Chen, Jiachen Shen, Yan Zhang, Jiangyun Li.
IEEE Transactions on Multimedia 2024. https://arxiv.org/abs/2305.11481 · no public code (the
repository https://github.com/Rubics-Xuan/CM-MaskSD holds a README only). The main branch is CRIS
(https://github.com/DerrickWang005/CRIS.pytorch) on CLIP ViT-B/16.

Idea. The main branch (§3.1) is a CRIS segmenter on CLIP: image and text encoders (Eq. 1), a neck
that fuses three ViT layers with the sentence feature, a vision-language decoder that lets every
pixel attend to the words, and a dynamic-kernel projector (Eq. 2). Training (§3.2) adds two masked
copies of the same network. LMVSD ranks the image patches by their correlation with the sentence,
keeps the top T = TopK·N ("correlation filtering"), replaces α·T of them, chosen at random, by one
learnable token at the embedding level, runs the image encoder, neck and decoder again and asks the
result to match the main branch's prediction (Eq. 3-5). VMLSD does the same to the words, ranked by
their correlation with the image's class token (Eq. 6-8). Loss = BCE(M_seg, GT) + λ1 BCE(M_LMVSD,
M_seg) + λ2 BCE(M_VMLSD, M_seg) (Eq. 9). Inference runs the main branch only. The masking only
teaches something if the top-T lies on the referred object: `diagnostics` measures that share.

Symbols (paper -> code), shapes with B batch, L tokens, N = h*w patches, C_v / C_t the encoder
widths, P = projection_dim (CLIP's joint space, the paper's C), d the decoder width:
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

Training recipe (§4.2; `RECIPE`, used by `train.py --recipe paper`): Adam, batch 32, weight decay
5e-4, 100 epochs with 10 warm-up epochs, lr 1e-5 with cosine decay; 480 px for the ablations
(Tables 2-5), 576 px (ViT-B/16) and 532 px (ViT-L/14, `Config.paper_vit_l()`) for Table 1. The
built-in demo uses train.py's DEMO_RECIPE instead (a CPU budget of 3000 steps).

Tables (`TABLES`, `train.py --row "Table 5 2"`): Tables 2-5 (RefCOCO val, 480 px) and Table 1's
two rows. The paper measured Table 2's single-branch rows and all of Tables 3-4 WITHOUT weight
sharing (their numbers are Table 5's unshared rows), so those rows add `no_sharing`.
`random_mask` is a control of ours, not a paper row.

Differences from the paper (there is no released code, so every line is ours).
The paper is silent:
- Correlation space: CLIP's joint space: V_local = post_layernorm(patches) @ visual_projection,
  w_global = [EOS] @ text_projection; for Eq. 6 v_global = post_layernorm([class]) @
  visual_projection and every word w_i is text-projected too.
- Correlation normalisation: cosine (both sides L2-normalised, CLIP's own similarity) instead of
  the raw dot product written in Eq. 3 / 6; only the token norms change the ranking.
- The correlation is computed from the main branch's features without gradient (the top-T
  selection is discrete anyway).
- Mask token placement: v' replaces a patch embedding (the conv output) and w' a token embedding
  BEFORE the position embedding is added (SimMIM / BEiT style), so a masked token keeps its
  position; done by forward hooks on the HF embedding layers, without copying library code.
- Counts: T = ⌊TopK·N + ½⌋; the masked count α·T is rounded stochastically, n_mask = ⌊α·T + u⌋
  with u ~ U[0, 1), so that E[n_mask] = α·T exactly. Plain rounding masks one word for every
  RefCOCO-length expression whatever α is (Table 4(b) would then be five copies of one run).
- Words: N counts the real words only ([SOS], [EOS] and padding are never ranked or masked); if
  a whole batch draws no masked word, the sample with the largest draw masks one (the paper's
  branch always masks something), which adds < 1/B words per sample in expectation.
- Which α·T of the top-T are masked: uniform at random per sample, fresh at every step.
- v' and w' ("randomly initialized learnable tokens") start from N(0, 0.02²).
- Stop-gradient: the distillation target is sigmoid(M_seg).detach() (soft BCE targets); MaskRIS
  detaches its clean-branch target too.
- Unshared variant (Table 5, `no_sharing`): each masked branch gets its own neck, decoder and
  projector (the text names "neck module and vision-language decoder"); CLIP stays shared.
- The projector's dynamic kernel comes from each branch's own sentence feature (w'_global in
  VMLSD), as CRIS's projector uses the sentence state.
- Loss_seg compares M_seg, upsampled (bilinear) to the GT's resolution, with the GT; CRIS
  shrinks the GT to its stride-4 logits by nearest neighbour instead. At the 64 px demo a GT
  shrunk to the 32 x 32 logits keeps one pixel in four of an 8-17 px object and caps the IoU at
  0.81 (0.96 upsampled); measured default run (5000 steps): mIoU 0.428 with the shrunk GT. The
  distillation losses stay at the logits' resolution (their teacher is M_seg itself).
The paper's text is inconsistent:
- Eq. 8 as printed swaps the modalities; we read the prose: W'_local, w'_global = CLIP text
  encoder(W_masked), F_VMLSD = Neck(V_local, w'_global), M_VMLSD = Decoder(F_VMLSD, W'_local).
We deviate on purpose:
- Main branch = the CRIS release (neck, decoder with its extra LayerNorms, projector) on HF CLIP;
  the neck takes the raw residual stream of two ViT layers (C_v wide, class token dropped, as
  ETRIS) and V_local, without CRIS's 2x up-sampling of f5 and 2x2 pooling of f3 (all ViT taps
  share one stride); neck output stride = patch size, logits 4x finer (as CRIS).
- One CLIPModel holds both towers and both projections: Eq. 3 / 6 compare the two towers, which
  only means something inside one CLIP. The projections stay inside it, so train.py gives them
  the encoder learning rate (as CRIS trains CLIP's projections with the backbone).
- Decoder words are W_local (CLIP's final LN, no projection, as CRIS); a Linear maps them to d
  only when C_t differs from d (identity for ViT-B/16, whose text width is 512).
- Calibrated start (tiny: mask_prior 0.03, the shapes' foreground share): the projector's
  generated bias starts at log(p / (1 - p)) and its kernels at 0.1x, so the first BCE is the
  prior's entropy (0.14) instead of 1-2 nats; the paper preset keeps CRIS's init (None).
- BatchNorm running statistics of a shared neck/projector are updated by all three branches;
  as in CRIS, the neck's BatchNorm1d on the sentence needs training batches of two or more.
- In eval mode the loss is the main BCE only; with targets the masked choices are still made
  (no extra encoder pass) and returned, for `diagnostics` and samples.png.
- Image size 480 (the paper's ablation setting; Table 1 rows set 576 / 532); CLIP's position
  table is resized bicubically by transformers (interpolate_pos_encoding=True). 17 tokens (22 for
  G-Ref: `--set max_tokens=22`).
- Demo (`Config.tiny()`): the repository's tiny CLIP pretrained on the synthetic world
  (pretrained/tiny-clip: 10 ViT layers of width 64, 8x8 patches at 64 px, a 4-layer text tower);
  taps = layers 3 and 7, a third and two thirds of the depth as ViT-B/16's 4 and 8 of 12.

torch.compile: the two embedding hooks are registered once and read the current mask from the
model, so a training step traces into one graph: `torch._dynamo.explain` on the tiny model finds
1 graph and 0 breaks from the second call on (hooks added and removed per branch, as before:
6 graphs, 5 breaks). The first call alone breaks 3 times inside transformers, which installs its
output_hidden_states capture under a lock once per model.
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
# Table 1's second row: CLIP ViT-L/14 at 532 px (the Config overrides, also `Config.paper_vit_l`).
VIT_L14_532 = dict(
    image_size=532,  # §4.2 "532×532 for ViT-Large"
    vision_name="openai/clip-vit-large-patch14",
    text_name="openai/clip-vit-large-patch14",
    vision_config=dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
    ),
    text_config=dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        eos_token_id=2,
    ),
    projection_dim=768,
    vision_taps=(8, 16),  # a third and two thirds of 24 layers, as 4 and 8 of ViT-B/16's 12
)


@dataclass
class Config:
    image_size: int = 480  # paper §4.2: 480x480 for the ablations (576 for Table 1)
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
    decoder_heads: int = 8
    decoder_ffn: int = 2048
    dropout: float = 0.1
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

    @classmethod
    def paper(cls) -> Config:
        """CLIP ViT-B/16 at 480 px: the setting of the ablations (Tables 2-5)."""
        return cls()

    @classmethod
    def paper_vit_l(cls) -> Config:
        """Table 1's CLIP ViT-L/14 row at 532 px."""
        return cls(**VIT_L14_532)

    @classmethod
    def tiny(cls) -> Config:
        """The demo: the repository's tiny CLIP pretrained on the synthetic world, at 64 px."""
        return cls(
            image_size=64,
            max_tokens=17,
            vocab_size=57,  # the synthetic world's word-level CLIP tokenizer; train.py sets it
            pretrained=True,
            vision_name="pretrained/tiny-clip",
            text_name="pretrained/tiny-clip",
            # = pretrained/tiny-clip's architecture, so pretrained=False builds the same model.
            vision_config=dict(
                hidden_size=64,
                intermediate_size=256,
                num_hidden_layers=10,
                num_attention_heads=4,
                patch_size=8,
                image_size=64,
            ),
            # [SOS] = V-2, [EOS] = pad = V-1 are filled in from vocab_size by load_clip.
            text_config=dict(
                hidden_size=64,
                intermediate_size=256,
                num_hidden_layers=4,
                num_attention_heads=4,
                max_position_embeddings=32,
            ),
            projection_dim=64,
            vision_taps=(3, 7),  # a third and two thirds of 10 layers (ViT-B/16: 4 and 8 of 12)
            neck_dims=(16, 32, 64),  # d = 32: the heads run three times per step on a CPU
            decoder_layers=1,
            decoder_heads=2,
            decoder_ffn=64,
            dropout=0.0,
            mask_prior=0.03,  # the shapes' foreground share: first BCE 0.14, not 1-2
        )


# ---------------------------------------------------------------------------------------------
# The paper's tables (RefCOCO val, 480 px, CLIP ViT-B/16). "IoU" follows CRIS, the mean of the
# per-expression IoUs (mIoU here); Pr@X = Prec@X. Tables 2-4 were measured without weight
# sharing wherever one branch is used alone (Table 5 shows the same numbers as "unshared").

_L, _V, _U = "no_lmvsd", "no_vmlsd", "no_sharing"


def _p(pr5: float, pr7: float, pr9: float, iou: float) -> dict[str, float]:
    """The paper's Pr@0.5, Pr@0.7, Pr@0.9 and IoU columns."""
    return {"Prec@0.5": pr5, "Prec@0.7": pr7, "Prec@0.9": pr9, "mIoU": iou}


TABLES: dict[str, dict[str, dict]] = {
    "Table 1": {  # main results, IoU; the paper's only numbers for the full model at full size
        "ViT-B CLIP ViT-B/16 at 576 px": {
            "set": {"image_size": 576}, "paper": {"mIoU": 72.18},  # RefCOCO val
            "note": "RefCOCO val/testA/testB 72.18/75.21/67.91, RefCOCO+ 64.47/69.29/56.55, "
            "G-Ref val/test 62.67/62.69", "baseline": True},
        "ViT-L CLIP ViT-L/14 at 532 px": {
            "set": dict(VIT_L14_532), "paper": {"mIoU": 74.89},  # RefCOCO val
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
        "(a)lambda1=0.1": {"ablate": (_V, _U), "set": {"lmvsd_weight": 0.1},
                      "paper": _p(83.20, 71.88, 19.40, 70.93)},
        "(a)lambda1=0.25": {"ablate": (_V, _U), "set": {"lmvsd_weight": 0.25},
                       "paper": _p(83.73, 73.03, 19.74, 71.36)},
        "(a)lambda1=0.5": {"ablate": (_V, _U), "set": {"lmvsd_weight": 0.5},
                      "paper": _p(83.51, 72.61, 19.13, 71.17)},
        "(a)lambda1=0.75": {"ablate": (_V, _U), "set": {"lmvsd_weight": 0.75},
                       "paper": _p(83.90, 73.54, 20.08, 71.45), "baseline": True},
        "(a)lambda1=1.0": {"ablate": (_V, _U), "set": {"lmvsd_weight": 1.0},
                      "paper": _p(82.63, 72.53, 20.79, 70.72)},
        "(b)alpha=0.1": {"ablate": (_V, _U), "set": {"lmvsd_alpha": 0.1},
                     "paper": _p(83.18, 73.39, 19.83, 71.12)},
        "(b)alpha=0.25": {"ablate": (_V, _U), "set": {"lmvsd_alpha": 0.25},
                      "paper": _p(83.90, 73.54, 20.08, 71.45)},
        "(b)alpha=0.5": {"ablate": (_V, _U), "set": {"lmvsd_alpha": 0.5},
                     "paper": _p(83.37, 73.34, 20.27, 71.24)},
        "(b)alpha=0.75": {"ablate": (_V, _U), "set": {"lmvsd_alpha": 0.75},
                      "paper": _p(82.78, 72.64, 20.00, 70.79)},
        "(c)TopK=0.25": {"ablate": (_V, _U), "set": {"lmvsd_topk": 0.25},
                         "paper": _p(83.21, 73.41, 20.61, 71.09)},
        "(c)TopK=0.5": {"ablate": (_V, _U), "set": {"lmvsd_topk": 0.5},
                        "paper": _p(83.90, 73.54, 20.08, 71.45)},
        "(c)TopK=0.75": {"ablate": (_V, _U), "set": {"lmvsd_topk": 0.75},
                         "paper": _p(82.88, 73.13, 19.68, 70.93)},
        "(c)TopK=1.0": {"ablate": (_V, _U), "set": {"lmvsd_topk": 1.0},
                        "paper": _p(83.08, 73.13, 20.77, 71.01)},
    },
    "Table 4": {  # VMLSD alone, unshared; base α 0.1, TopK 0.5, λ2 0.1
        "(a)lambda2=0.05": {"ablate": (_L, _U), "set": {"vmlsd_weight": 0.05},
                       "paper": _p(82.76, 71.78, 18.73, 70.58)},
        "(a)lambda2=0.1": {"ablate": (_L, _U), "set": {"vmlsd_weight": 0.1},
                      "paper": _p(83.09, 71.77, 18.64, 70.98), "baseline": True},
        "(a)lambda2=0.25": {"ablate": (_L, _U), "set": {"vmlsd_weight": 0.25},
                       "paper": _p(83.02, 71.40, 18.69, 70.41)},
        "(a)lambda2=0.5": {"ablate": (_L, _U), "set": {"vmlsd_weight": 0.5},
                      "paper": _p(82.34, 70.86, 18.52, 70.02)},
        "(a)lambda2=0.75": {"ablate": (_L, _U), "set": {"vmlsd_weight": 0.75},
                       "paper": _p(81.12, 69.92, 18.17, 69.47)},
        "(a)lambda2=1.0": {"ablate": (_L, _U), "set": {"vmlsd_weight": 1.0},
                      "paper": _p(81.07, 70.25, 17.76, 69.28)},
        "(b)alpha=0.05": {"ablate": (_L, _U), "set": {"vmlsd_alpha": 0.05},
                      "paper": _p(83.26, 71.93, 18.52, 70.71)},
        "(b)alpha=0.1": {"ablate": (_L, _U), "set": {"vmlsd_alpha": 0.1},
                     "paper": _p(83.09, 71.77, 18.64, 70.98)},
        "(b)alpha=0.25": {"ablate": (_L, _U), "set": {"vmlsd_alpha": 0.25},
                      "paper": _p(82.72, 71.11, 18.17, 70.43)},
        "(b)alpha=0.5": {"ablate": (_L, _U), "set": {"vmlsd_alpha": 0.5},
                     "paper": _p(82.82, 71.92, 17.97, 70.51)},
        "(b)alpha=0.75": {"ablate": (_L, _U), "set": {"vmlsd_alpha": 0.75},
                      "paper": _p(82.67, 71.31, 18.24, 70.54)},
        "(c)TopK=0.25": {"ablate": (_L, _U), "set": {"vmlsd_topk": 0.25},
                         "paper": _p(83.22, 72.12, 18.18, 70.68)},
        "(c)TopK=0.5": {"ablate": (_L, _U), "set": {"vmlsd_topk": 0.5},
                        "paper": _p(83.09, 71.77, 18.64, 70.98)},
        "(c)TopK=0.75": {"ablate": (_L, _U), "set": {"vmlsd_topk": 0.75},
                         "paper": _p(82.66, 71.09, 18.07, 70.23)},
        "(c)TopK=1.0": {"ablate": (_L, _U), "set": {"vmlsd_topk": 1.0},
                        "paper": _p(82.92, 71.66, 18.32, 70.57)},
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


# ---------------------------------------------------------------------------------------------
# §3.1 The main segmentation branch: CLIP (Eq. 1), then CRIS's neck, decoder and projector (Eq. 2)


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


# ---------------------------------------------------------------------------------------------
# §3.2 The masking machinery: correlation filtering (Eq. 3 / 6) and random masking (Eq. 4 / 7)


@torch.no_grad()
def correlation(query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Eq. 3 / Eq. 6: query (B, C) · every token (B, N, C) -> (B, N), cosine similarity."""
    query, tokens = F.normalize(query.float(), dim=-1), F.normalize(tokens.float(), dim=-1)
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
def choose_tokens(
    scores: torch.Tensor, valid: torch.Tensor, top_k: float, alpha: float, at_least_one: bool
) -> Choice:
    """Correlation filtering and random masking (Eq. 3-4 / 6-7), per sample.

    scores (B, N) correlations, valid (B, N) the tokens that may be chosen. T = ⌊TopK·n + ½⌋ of the
    n valid tokens with the highest score form the top-T; n_mask of them, a uniformly random
    subset, are masked. n_mask = ⌊α·T + u⌋, u ~ U[0, 1): stochastic rounding, E[n_mask] = α·T, so
    α keeps its meaning for a 3-word expression (T = 2, α = 0.1: one word in 5 steps, not always
    one). at_least_one: if no sample of the batch masks anything, the sample with the largest
    draw masks one token (a masked branch that masks nothing would copy the main branch).
    """
    n = valid.sum(1)  # (B,)
    T = torch.floor(top_k * n + 0.5).long()  # (B,) ⌊TopK·n + ½⌋
    top_T = highest(scores.float().masked_fill(~valid, float("-inf")), T)  # Eq. 3 / 6
    draw = alpha * T + torch.rand(T.shape, device=T.device)  # (B,) α·T + u
    n_mask = torch.floor(draw).long()  # (B,) E[n_mask] = α·T
    if at_least_one:
        first = F.one_hot(draw.masked_fill(T == 0, -1.0).argmax(), len(T)).bool() & (T > 0)
        n_mask = torch.where(first & (n_mask.sum() == 0), 1, n_mask)
    # A uniformly random subset of size n_mask of the top-T: the n_mask highest random keys.
    keys = torch.rand(scores.shape, device=scores.device).masked_fill(~top_T, -1.0)
    return Choice(top_T, highest(keys, n_mask))  # Eq. 4 / 7


def word_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool, True on the real words: not [SOS] (position 0), not [EOS], not padding.

    [EOS] is the largest id in CLIP's vocabulary and argmax returns its first occurrence, which
    matters because CLIP's tokenizer pads with [EOS] as well.
    """
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
    eos = input_ids.argmax(dim=-1, keepdim=True)  # (B, 1)
    return attention_mask.bool() & (pos != 0) & (pos != eos)


# ---------------------------------------------------------------------------------------------
# The model: the main branch, then LMVSD (Eq. 3-5) and VMLSD (Eq. 6-8), the loss (Eq. 9)


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
        pad_mask = attention_mask == 0  # (B, L) True = ignore (CLIP pads with [EOS])
        vis = self.encode_image(images)  # Eq. 1
        txt = self.encode_text(input_ids, attention_mask)
        M_seg = self.segmenter(vis, txt, pad_mask)  # Eq. 2, (B, 1, 4h, 4w)
        out = {"mask_logits": M_seg}
        if targets is None:  # inference: the main branch only
            return out

        masks = targets["masks"]  # (B, H, W); Loss_seg (Eq. 9) on M_seg upsampled to it
        losses = {"seg": common.bce_loss(common.upsample_to(M_seg, masks), masks)}
        # The teacher is the main branch's own prediction, without gradient (see docstring).
        teacher = M_seg.detach().sigmoid()
        if self.use_lmvsd:
            p, choice = self.lmvsd_choice(vis, txt)  # Eq. 3-4
            out["lmvsd_p"] = p.view(-1, *vis.grid)  # (B, h, w), for samples.png
            out["lmvsd_top_T"] = choice.top_T.view(-1, *vis.grid)  # (B, h, w), diagnostics
            out["lmvsd_mask"] = choice.masked.view(-1, *vis.grid)
            if self.training:  # the masked branches train; eval only reports their choices
                M_lmvsd = self.lmvsd_branch(images, choice.masked, txt, pad_mask)  # Eq. 5
                losses["lmvsd"] = common.bce_loss(M_lmvsd, teacher)  # Loss_LMVSD
            else:  # a control for diagnostics: the top-T for another sample's sentence
                p_other = correlation(txt.w_global.roll(1, dims=0), vis.V_local)  # (B, N)
                top_other = highest(p_other, choice.top_T.sum(1))  # (B, N)
                out["lmvsd_top_T_other_text"] = top_other.view(-1, *vis.grid)
        if self.use_vmlsd:
            words = word_positions(input_ids, attention_mask)
            choice = self.vmlsd_choice(vis, txt, words)  # Eq. 6-7
            out["vmlsd_words"], out["vmlsd_top_T"] = words, choice.top_T  # (B, L) each
            out["vmlsd_mask"] = choice.masked
            out["vmlsd_masked_ids"] = input_ids.masked_fill(~choice.masked, -1)  # samples.png
            if self.training:
                M_vmlsd = self.vmlsd_branch(vis, input_ids, attention_mask, choice.masked)  # Eq. 8
                losses["vmlsd"] = common.bce_loss(M_vmlsd, teacher)  # Loss_VMLSD
        weights = {"seg": 1.0, "lmvsd": self.cfg.lmvsd_weight, "vmlsd": self.cfg.vmlsd_weight}
        out["losses"] = losses
        out["loss"] = sum(weights[k] * v for k, v in losses.items())  # Eq. 9: Loss_total
        return out

    # --- §3.2, Eq. 3-5: language-guided masked visual self-distillation (LMVSD) -----------------

    @torch.no_grad()
    def lmvsd_choice(self, vis: VisualFeatures, txt: TextFeatures) -> tuple[torch.Tensor, Choice]:
        """Eq. 3-4: p_i = w_global · v_i (cosine), the top-T patches, α·T of them masked."""
        p = correlation(txt.w_global, vis.V_local)  # Eq. 3, (B, N)
        scores = torch.rand_like(p) if "random_mask" in self.cfg.ablate else p
        valid = torch.ones_like(p, dtype=torch.bool)
        return p, choose_tokens(scores, valid, self.cfg.lmvsd_topk, self.cfg.lmvsd_alpha, False)

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

    # --- §3.2, Eq. 6-8: visual-guided masked language self-distillation (VMLSD) -----------------

    @torch.no_grad()
    def vmlsd_choice(self, vis: VisualFeatures, txt: TextFeatures, words: torch.Tensor) -> Choice:
        """Eq. 6-7: q_i = v_global · w_i over the real words (B, L), top-T, α·T of them masked."""
        q = correlation(vis.v_global, self.text_projection(txt.W_local))  # Eq. 6, (B, L)
        scores = torch.rand_like(q) if "random_mask" in self.cfg.ablate else q
        return choose_tokens(scores, words, self.cfg.vmlsd_topk, self.cfg.vmlsd_alpha, True)

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


def build_model(cfg: Config) -> nn.Module:
    for name in cfg.ablate:
        if name not in ABLATIONS:
            raise ValueError(
                f"unknown ablation '{name}' for cm_masksd; choose from {sorted(ABLATIONS)}"
            )
    for name in ("lmvsd_alpha", "lmvsd_topk", "vmlsd_alpha", "vmlsd_topk"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"cm_masksd: {name} must lie in [0, 1], got {getattr(cfg, name)}")
    if cfg.mask_prior is not None and not 0 < cfg.mask_prior < 1:
        raise ValueError(f"cm_masksd: mask_prior must lie in (0, 1), got {cfg.mask_prior}")
    return CMMaskSD(cfg)


# ---------------------------------------------------------------------------------------------
# Measuring the mechanism (train.py calls these on eval batches)


def diagnostics(outputs: dict, batch: dict) -> dict[str, float]:
    """Does correlation filtering find the referred object? (eval forward with targets)

    lmvsd_target_in_top_T: share of the target's area whose patches are in LMVSD's top-T (each
      patch weighted by the share of its pixels on the target); chance = TopK (0.5).
    lmvsd_target_masked: the same share for the α·T masked patches; chance = α·TopK (0.125).
    lmvsd_target_in_top_T_other_text: the top-T ranked by ANOTHER sample's sentence; what a
      text-blind ranking gets (objects are salient on the synthetic background, so it is well
      above 0.5: the gap to lmvsd_target_in_top_T is what the sentence contributes).
    vmlsd_masked_word_share: masked words / real words; expected α·TopK (0.05) up to rounding.
    vmlsd_masked_per_top_T: masked words / top-T words; expected α (0.1).
    """
    nan = float("nan")
    result = {}
    if "lmvsd_top_T" in outputs:
        top_T, masked = outputs["lmvsd_top_T"], outputs["lmvsd_mask"]  # (B, h, w) bool
        gt = batch["mask"][:, None].float()  # (B, 1, H, W)
        on_target = F.adaptive_avg_pool2d(gt, top_T.shape[-2:])[:, 0]  # (B, h, w) in [0, 1]
        area = on_target.flatten(1).sum(1)  # (B,)
        has = area > 0  # no-target samples have nothing to find
        shares = [("in_top_T", top_T), ("masked", masked)]
        if "lmvsd_top_T_other_text" in outputs:
            shares.append(("in_top_T_other_text", outputs["lmvsd_top_T_other_text"]))
        for name, chosen in shares:
            share = (on_target * chosen).flatten(1).sum(1) / area.clamp_min(1e-6)
            result[f"lmvsd_target_{name}"] = share[has].mean().item() if has.any() else nan
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
        (p, "p = cos(w_global, v_i) (Eq. 3), own scale"),  # the ranking is what matters
        (choice.cpu().numpy(), caption, (0, 2)),
    ]


if __name__ == "__main__":
    cfg = Config.tiny()
    cfg.pretrained = False  # the shape smoke run needs no folder
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
    print(
        {k: round(v.item(), 4) for k, v in out["losses"].items()}, f"loss {out['loss'].item():.4f}"
    )
