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
3. The Cross-modal Alignment Loss (CAL, §3.4, Eq. 12-14): InfoNCE between L2-normalised mask
   features: foreground pixels pulled to the foreground mean and to the sentence feature, pushed
   from background pixels (and background pixels pulled to the background mean).
Loss (Eq. 15): 2 BCE + 2 Dice + 0.5 CAL + 1.0 grounding.

Symbols (paper -> code). Shapes: B batch, L words, N pixels of a map, V vocabulary; channel widths
are written d (d_i image stage i, d_t language, D decoder, D_g grounding predictor), so that C
only ever means the mask embedding of Eq. 3 and P only ever means image features.
    T, I, M (Eq. 1-3)  input_ids (B, L), images (B, 3, H, W), GT mask centre (B, 2); the paper's
                       I is also the mask features of Eq. 12-14: in the code `I` is only those
    O_i, P_i           language / image output of stage i before CAM (Eq. 5): `o` (B, L, d_t),
                       `x` (B, N, d_i); O_{i+1}, P_{i+1} after CAM (Eq. 10-11)
    O, P, C (Eq. 1-4)  masked-text features `O_masked` (B, L, d_t); text-free image embedding
                       `P` = P_1 before CAM 1 (B, d_1, H/4, W/4) (or the text-free pass to stage
                       s = grounding_stage, (B, d_s, H_s, W_s)); mask embedding `C` (B, 1, D_g)
                       (tiny(): two C tokens, the centre's and the average's)
    P_i^k              pooled + MLP'd image map at pyramid scale k (Eq. 6): `P_k`
    O_{i,p2t}, P_{i,t2p}   attention outputs for words / pixels (Eq. 7-9): `o_p2t`, `p_t2p`
    I (Eq. 12-14)      mask features `I` (B, D, H/4, W/4) (signed); I^+ / I^- = `pos` / `neg`
    T_avg              projected mean word feature `t_avg` (B, D)
    tau_1, tau_2       Config.tau_p2p, Config.tau_p2t

Training recipe (the paper gives only Eq. 15; the release says "follow LAVT", see RECIPE): AdamW,
lr 5e-5 for everything, wd 0.01, poly 0.9, 40 epochs, batch 32, 480 px; ablations (Table 3) at
224 px for 10 epochs. train.py's demo recipe keeps this factor: encoders at the full lr.

Paper tables as switches (TABLES below, `train.py --row "Table 3a +MG"`): every Table 3 row is the
LAVT baseline (--ablate no_mg,no_cam,no_p2p,no_p2t) plus one component.

Differences from the paper and the released code.
The paper is silent:
- tau_1 = tau_2 = 0.1: the value of the pixel-contrast work [59] it cites.
- Eq. 13-14 are printed without a log; we use InfoNCE's -log, as the contrastive losses it cites.
- Masking: max(1, round(0.15 n)) of the n word tokens, BERT's original rule (ovr-cnn's per-token
  Bernoulli(0.15) leaves ~half of the 3-4-word expressions unmasked); never [CLS]/[SEP]/padding.
- Masked words always become [MASK] (the paper's "learnable mask token"), no 80/10/10.
- P of Eq. 2 = the image features of stage 1 before any fusion, average-pooled to a
  grounding_grid x grounding_grid map: the only text-free image features of the one forward pass
  (a second, fusion-free Swin pass would cost far more than the paper's "+4.76%"). A fused map
  would let the predictor read the unmasked expression back out of P. `grounding_stage` s > 1
  carries stage 1's output through stages 2..s without CAM (a partial second pass); s = 2 (the
  stage that names shapes 47% of the time after pretraining, stage 1 29%) gave mIoU 0.672, gain
  0.066 against 0.645, 0.056 for s = 1 (default run, seed 0): shape words no better grounded
  (13% / 13%), so the default stays at the pass the model already makes.
- O, P and the mask embedding are projected to the predictor width D_g (the release keeps an
  unused Linear(768, 256)); image tokens get the mask encoder's embedding of their own centres.
- Mask centre M = centre of mass in [0, 1]^2; an empty (no-target) mask gets (-1, -1).
- Vocabulary head = a standalone BertLMPredictionHead (the release imports it): dense-GELU-LN,
  then its own Linear to the vocabulary, not tied to BERT's word embeddings: the tiny BERT's six
  colour embeddings lie 0.2 apart; tied to them (frozen), the probe below (Average input) named
  colours 21% of the time after 750 steps, untied 58% after 1000.
- Eq. 1's second language pass is plain BERT (no CAM): "+4.76%" only fits a language-only pass.
- CAL uses every stride-4 pixel, sample by sample (at 480 px up to 52M pixel pairs per sample).
- Table 3a "MaskedVLM" is built as grounding with language + image context and no mask signal;
  the masked-vision half of MaskedVLM [37] is not built.
The release differs (yxchng/mask-grounding, eval-only; our choice first):
- Decoder: LAVT-style conv FPN to stride 4, the release's signed 1x1 "mask features" conv (what
  CAL reads) and ONE layer of its one-query Mask2Former (mask = query embedding . I); the release:
  MSDeformAttn pixel decoder + 9 masked-attention layers. A fixed 1x1 mask head instead cannot
  follow CAL's per-sample clusters: with CAL on from step 0 it reached mIoU 0.01 at step 200.
- CAM updates the image stream with the gated mixer output (Eq. 11); the release updates it with
  the gated full-resolution PWAM output only and sends the mixer output to the decoder.
- CAM's language side runs the whole pyramid (Eq. 7-8); the release's is one full-res PWAM.
- CAM concatenates the full-resolution branch (the release's PWAM output; Eq. 9 lists only the
  pyramid), and every branch uses LAVT's PWAM form (attended words x projected pixels).
- The decoder reads LayerNorm(mixer output) (LAVT's norm{i}); the release reads it without norm.
- Eq. 10-11's tanh(MLP(.)) is LAVT's gate x + tanh(gate(F)) * F, F = MLP(concat); random init.
- Under no_cam (the LAVT baseline) BERT stays interleaved: Swin stage i reads BERT stage i's
  output (LAVT reads the final BERT output in every stage).
- GroupNorm instead of LAVT's BatchNorm in the decoder (no train/eval gap at small batches).
- No image gate after the last stage (nothing reads it, as ReLA).
- Eq. 14 prints I_avg where T_avg (the projected sentence feature) is meant; we use T_avg.
We deviate on purpose (the 64 px demo, found by measurement; see tests and issue 12):
- BERT: 4 layers = 1 per stage for the 4 CAM stages (paper 12 = 3 per stage).
- The CAL weight ramps linearly from 0 over cal_warmup steps (tiny: 500). At init CAL's gradient
  norm dwarfs the segmentation loss's (random encoders, 1x1 mask head: P2T 61, P2P 17, BCE + Dice
  0.9), so CAL alone shapes the first features. Measured at 400 steps (random encoders, 100 val
  expressions): ramp over 200 steps mIoU 0.149 / text-swap IoU 0.79, no ramp 0.135 / 0.84 (with
  a fixed 1x1 mask head, at 200 steps: 0.146 vs 0.010).
- The mask head starts at p = mask_prior (tiny 0.03, the demo's foreground share), not 0.5.
- Predictor: 2 layers, 4 heads, D_g = 64 (paper 8 layers, Table 3c). Deeper did not ground more
  (default run, seed 0, 5000 steps): 4 layers mIoU 0.534, grounding gain 0.064; 8 layers 0.617,
  0.058 (2 layers, the default's seed-0 run: 0.653, 0.044, its own step-5000 log line; these three
  with the presence-only Swin).
- tiny() feeds the predictor two mask tokens: the paper's C (MLP of the centre) and Table 3b's
  "Average" C (MLP of P averaged inside the GT mask), mask_input="centre+average" (paper() and
  the Table 3 MG rows keep the paper's "Center" alone). Center alone asks for two hops: [MASK] ->
  C's position -> the image token there -> its colour. Probe: a trained model's encoders frozen,
  a fresh predictor (untied head) trained 2000 steps, masked colour words on 500 val
  expressions, right with the sample's own image and mask / with another sample's: Center 15% /
  8% (with Fourier features of the position 25% / 12%; with those and a pre-norm predictor 19% /
  17%), Average 73% / 8%. Both summed into ONE token (default runs, seeds 0 / 1, articles
  hidden): mIoU 0.627 / 0.655, grounding gain 0.038 / 0.080. As two tokens (default runs, seed 0,
  articles kept, below): mIoU 0.662, gain 0.098, against 0.640, 0.082 for "average" alone. The
  probe above on all hidden words, articles hidden: gain 6.0 points with the two tokens, 5.8 with
  Average alone; articles kept: 12.2 and 9.0.
- Mask Grounding never hides an article (tiny(): hide_articles=False; paper() hides any word,
  as the paper). Every demo expression starts with "the" (738 of the 2352 words of 500 val
  expressions), so BERT's rule hid "the" in 150 of 500 sentences: a word the text alone names, a
  step that teaches no grounding. Default runs (seed 0, 5000 steps): "average" input 0.640
  mIoU, gain 0.082 (43.6% own / 35.4% other), "centre+average" 0.662, 0.098 (45.4% / 35.6%);
  the previous default (articles hidden, "average") 0.645, 0.056 (60.4% / 54.8%). The
  diagnostics now count only the words that may be hidden, so part of the rise is the 150 "the"
  leaving the average: on the same checkpoints with any word hidden, the gain over the 350 other
  words is 6.0 points ("average") and 10.6 ("centre+average") against 8.0 for the previous
  default.
- The centre's C is also added to every word token (centre_on_words; tiny() only, the Table 3
  Center rows pin the paper's single token). As one token among 64 image tokens the predictor
  never read it for position words ("the diamond at the [MASK]" -> "bottom" with its own image
  and with another's), though the target's centre alone names top / bottom in 85% of "at the
  top / bottom" expressions and left / right in 84% of "leftmost / rightmost" (4000 train
  scenes, rule: centre above / left of the middle). Probe (previous default frozen, fresh
  predictor, 2000 steps, own / other on 500 val): top / bottom 54% / 54% as a token, 82% / 54%
  on the words; all words gain 9.4 -> 13.2 points (Fourier features of the centre 10.2, C from
  its own MLP 11.4, a (centre, width, height) box on the words 13.4). Default runs (seeds 0 / 1,
  5000 steps): grounding gain 0.112 / 0.116 (was 0.098 / 0.088), text-swap 0.215 / 0.227, but
  mIoU 0.633 / 0.608 (was 0.662 / 0.654): ordinals fall to the text-blind rule (24.7 vs 23.3,
  was 38.1), the others hold (attribute 63.7, position 75.6, relation 77.9); both runs still
  rose at step 5000. `--set centre_on_words=False` is the previous default.
What the demo's Mask Grounding grounds (issue 12). After the default run (5000 steps, seed 0),
per hidden word on 500 val expressions, right with the own image and mask / with another
sample's: colour 86% / 6% (52 words), size 19% / 11% (63), shape 12% / 9% (106), position 44% /
32% (96: top / bottom 71% / 54%, 28 of them), the rest 68% / 71% (183: "shape", "object",
ordinals, "at", "from", "of"); without centre_on_words: size 27% / 18%, shape 13% / 12%,
position 29% / 28% (top / bottom 39% / 39%), the rest 67% / 68%. Two limits are the language's,
not the model's: size words are synonyms drawn at random (small / little, large / big), so half
of them at most can be right; and the noun slot says "shape" or "object" in 375 of the 500 val
expressions' nouns, a shape name in 209, so knowing the target's shape does not tell which noun
was said (the shape's name and "shape" are equally likely). Colour and size grounded perfectly,
with the previous default's other-sample accuracies, would give 13.9 points; the run without
centre_on_words gave 9.8, all from colour and size. Leftmost / rightmost are still not grounded
(16% / 19%: the predictor guesses a colour or size word in front of the noun). Shape is not
grounded either, although the pretrained Swin names an object's shape from its mask-pooled
stage-1 features 29% of the time and from stage 2 47% (pretrained/quality.json; chance 17%), and
taking P from stage 2 did not change it (above). Fine-tuning washes most of it out: a linear
probe on P averaged in the GT mask (3000 train scenes, 500 val) names the target's shape 34% of
the time from the pretrained stage 1 and 51% from the pretrained stage-2 text-free pass, 30% /
31% after the previous default run, 31% / 28% after its grounding_stage=2 run. Without
centre_on_words, position words did not ground with the mask drawn onto P either (a learnt
vector added to each image token in proportion to its GT-mask cover, beside the Average C; a
default model frozen, a fresh predictor, 2000 steps): position 32% / 32%. Nor does a finer grid
(Average at 16 x 16, same probe, all words: gain 6.6 points against 5.8 at 8 x 8, at 4x the
predictor's cost).
How the demo came to work, one seed each unless said:
- The loss. The LAVT row (no MG, CAM, CAL) plateaued at mIoU 0.282 at 3000 steps, below the
  text-blind "segment every object" (0.296), with Prec@0.7 0.018: blobs inside objects. A 1x1
  mask head, decoder width 64, LAVT's final BERT output in every stage and the release's
  transformer pixel decoder + 3 query layers did not help. The cause: BCE + Dice compared the
  stride-4 logits with a GT shrunk to 16 x 16 by nearest neighbour, which keeps one pixel in 16 of
  an 8-17 px object (upsampled back, that GT scores IoU 0.57 against the real masks). With the
  loss on the upsampled logits (LAVT's and Mask2Former's way): LAVT row 0.446 (Prec@0.7 0.226).
- The grounding. With the tied vocabulary head and the Center input the predictor learnt the text
  prior only (default runs, seeds 0 / 1: mIoU 0.430 / 0.618, text-swap 0.347 / 0.215, grounding
  gain 0.034 / 0.022; the runs that "clicked" did so late). Untied head + Average input, seeds
  0 / 1 / 2: mIoU 0.653 / 0.574 / 0.652, text-swap 0.206 / 0.225 / 0.221, gain 0.058 / 0.052 /
  0.050. Seeds 0 and 2 jumped at step 2000 (from ~0.43 to ~0.55) and pick one candidate by
  position ("the circle at the bottom"); seed 1 jumped at step 4500 and still half-marks the
  other candidate. The gain rests on about one hidden word per expression: when the eval words
  were drawn per batch, the seed-0 checkpoint gave 0.044 in batches of 16 and 0.102 in batches of
  50 (other words hidden); now each sentence hides the same words in any batch (grounding_loss).
- The shape-aware tiny-swin (pretrain.py's per-object term, now shipped): default run, seed 0,
  mIoU 0.645, oIoU 0.555, text-swap 0.203, grounding gain 0.056 (60.4% / 54.8%); the line above,
  seed 0, with the presence-only Swin: 0.653, text-swap 0.206.
- Articles kept, two C tokens (the bullets above): seed 0 mIoU 0.662, oIoU 0.582, Prec@0.5
  0.714, text-swap 0.204, grounding gain 0.098 (45.4% / 35.6%); seeds 1 / 2: mIoU 0.654 / 0.633,
  text-swap 0.212 / 0.211, gain 0.088 / 0.106.
- The centre's C on the words too (the default now): seed 0 mIoU 0.633, oIoU 0.537, Prec@0.5
  0.660, text-swap 0.215, grounding gain 0.112 (47.2% / 36.0%), CAL P2P 0.177, P2T 0.236; seed 1
  mIoU 0.608, oIoU 0.517, Prec@0.5 0.644, text-swap 0.227, gain 0.116 (48.8% / 37.2%).

Reference code: https://github.com/yxchng/mask-grounding (eval only), https://github.com/yz93/LAVT-RIS
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
    # Mask Grounding (§3.2)
    mask_ratio: float = 0.15  # fraction of word tokens masked (BERT)
    hide_articles: bool = True  # the paper masks any word; tiny() never hides "a" / "an" / "the"
    article_ids: tuple[int, ...] = (1037, 2019, 1996)  # bert-base-uncased; train.py re-reads them
    mask_input: str = "centre"  # Table 3b: "centre" | "average" | "centre+average" | "none" (3a)
    centre_on_words: bool = False  # tiny(): the centre's C, if any, also added to every word
    grounding_grid: int = 15  # P pooled to 15 x 15 cells (stride 32 at 480 px)
    grounding_stage: int = 1  # P = the text-free Swin pass up to this stage (1: no extra cost)
    predictor_dim: int = 256  # D_g (the release's Linear(768, 256))
    predictor_layers: int = 8  # Table 3c: 4 / 8 / 12
    predictor_heads: int = 8
    # Cross-modal Alignment Module (§3.3)
    cam_scales: tuple[int, ...] = (1, 2, 3, 6)  # pyramid pooling sizes, Table 3e
    cam_heads: int = 1  # X-MHA heads; paper gives none, the release's PWAMs use one
    cam_mlp_ratio: int = 4  # hidden width of MLP_k (Eq. 6) = ratio * d_i, as the release
    # Cross-modal Alignment Loss (§3.4): temperatures not given in the paper (see docstring)
    tau_p2p: float = 0.1  # tau_1
    tau_p2t: float = 0.1  # tau_2
    cal_warmup: int = 0  # steps over which lambda_cal ramps from 0 (paper: none)
    # Decoder
    decoder_dim: int = 256  # D: mask-feature width C_L (the release's mask_dim 256)
    decoder_heads: int = 8  # the one query's cross-attention heads (the release's Mask2Former)
    mask_prior: float = 0.5  # initial foreground probability of the mask head (torch default)
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
        """The 64 px demo: the shared tiny Swin and BERT pretrained on the synthetic world."""
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
            ),
            text_config=dict(  # = pretrained/tiny-bert: 4 layers, one per CAM stage
                hidden_size=64,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=256,
                max_position_embeddings=32,
            ),
            drop_path_rate=0.0,
            mask_token_id=4,  # the offline tokenizer's [MASK]
            hide_articles=False,  # a third of the demo's words are "the" (see "We deviate")
            article_ids=(9, 51),  # the offline tokenizer's "a", "the"
            mask_input="centre+average",  # the paper's C and Table 3b's: see "We deviate"
            centre_on_words=True,  # the centre's C also on every word: see "We deviate"
            grounding_grid=8,  # stride 8 at 64 px
            predictor_dim=64,
            predictor_layers=2,
            predictor_heads=4,
            decoder_dim=32,
            decoder_heads=4,
            mask_prior=0.03,
            cal_warmup=500,
        )


# The paper's ablations (Table 3): every row is LAVT plus one component; LAVT here = this file
# with MG, CAM and CAL switched off. Numbers: oIoU on RefCOCO val and RefCOCO+ val (Swin-B).
LAVT = ("no_mg", "no_cam", "no_p2p", "no_p2t")
_MG = ("no_cam", "no_p2p", "no_p2t")  # LAVT + Mask Grounding
# The paper's Mask Grounding reads the mask centre; the demo's tiny() reads the centre and the
# average (see the docstring), so the rows pin the input they measure.
_CENTRE = {"mask_input": "centre", "centre_on_words": False}
_CAM = ("no_mg", "no_p2p", "no_p2t")  # LAVT + CAM
_SETTING = "paper: 224x224 input, 10 epochs (§4.4): --set image_size=224 --epochs 10 on RefCOCO"


def _row(ablate, refcoco, refcoco_plus, note="", **spec) -> dict:
    """One Table 3 row: its ablations, Config overrides and the paper's RefCOCO val / RefCOCO+ val
    oIoU, with the paper's ablation setting as a note."""
    paper = {"oIoU": refcoco, "oIoU_refcoco+": refcoco_plus}  # RefCOCO val, RefCOCO+ val
    return {"ablate": ablate, **spec, "paper": paper, "note": note + _SETTING}


def _skip(reason, refcoco, refcoco_plus) -> dict:
    return {"skip": reason, "paper": {"oIoU": refcoco, "oIoU_refcoco+": refcoco_plus}}


_FULL = "every row keeps CAM's full-resolution branch; "
TABLES = {
    "Table 3a": {  # Mask Grounding vs masked (vision-)language modelling
        "Baseline LAVT": _row(LAVT, 67.08, 55.98, baseline=True),
        "+MLM masked language modelling": _row(_MG + ("mlm_only",), 67.31, 55.69),
        "+MaskedVLM words from language + image, no mask signal": _row(
            _MG,
            67.33,
            56.13,
            "masked-image reconstruction of [37] not built; ",
            set={"mask_input": "none"},
        ),
        "+MG Mask Grounding": _row(_MG, 68.52, 57.26, set=_CENTRE),
    },
    "Table 3b": {  # mask encoder input
        "None LAVT": _row(LAVT, 67.08, 55.98, baseline=True),
        "Average image features averaged in the mask": _row(
            _MG, 68.19, 56.98, set={"mask_input": "average"}
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


# ---------------------------------------------------------------------------------------------
# Mask Grounding (§3.2, Fig. 3, Eq. 1-4)


def mask_words(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    ratio: float,
    mask_token_id: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
    never: tuple[int, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask(T) of Eq. (1): replace k = max(1, round(ratio * n)) of the n word tokens by [MASK].

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
    score = score.to(input_ids.device).masked_fill(~words, -1.0)
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
        self, d_img, d_t, D_g, vocab_size, layers, heads, use_image, mask_input, centre_on_words
    ):
        super().__init__()
        if mask_input not in ("centre", "average", "centre+average", "none"):
            raise ValueError(
                f"mask_input must be centre, average, centre+average or none, not {mask_input!r}"
            )
        self.use_image, self.mask_input = use_image, mask_input
        self.centre_on_words = centre_on_words
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
        # dense-GELU-LayerNorm, then its own Linear to the vocabulary. Tied to the tiny BERT's
        # word embeddings, whose six colour words lie 0.2 apart (cosine 0.81), colour was learnt
        # far slower (frozen-feature probe in the docstring).
        self.lm_transform = nn.Sequential(nn.Linear(D_g, d_t), nn.GELU(), nn.LayerNorm(d_t))
        self.vocab_head = nn.Linear(d_t, vocab_size)

    def forward(self, O, text_mask, selected, P, masks):
        """O: (B, L, d_t) masked-text features (Eq. 1); P: (B, d_img, g, g) text-free image
        embedding (Eq. 2); masks: (B, H, W) GT masks, M = their centres (Eq. 3); selected: (B, L)
        masked positions. Returns vocabulary logits at the masked positions, (n_masked, V)."""
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
                if self.centre_on_words:  # the demo: C on every word too, as a bias (docstring)
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
        return self.vocab_head(self.lm_transform(out[selected]))  # (n_masked, V)


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

    def __init__(self, dims: list[int], D: int, heads: int, mask_prior: float):
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
        # Start near "p = mask_prior everywhere": a small last layer, the prior in the bias.
        nn.init.normal_(self.mask_embed[-1].weight, std=0.01)
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
        logits = torch.einsum("bqd,bdhw->bqhw", e, I) + self.mask_bias  # (B, 1, H/4, W/4)
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
            self.grounding = MaskGrounding(
                dims[cfg.grounding_stage - 1], d_t, cfg.predictor_dim, self.bert.config.vocab_size,
                cfg.predictor_layers, cfg.predictor_heads, "mlm_only" not in ablate,
                cfg.mask_input, cfg.centre_on_words,
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

    def encode_text(self, input_ids, attention_mask):
        """LanguageEncoder of Eq. (1): plain BERT on the masked text (no image fusion)."""
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
        if self.training:
            self.step += 1
        out["loss"] = total
        out["losses"] = {k: v.detach() for k, v in losses.items()}
        return out

    def segmentation_loss(self, logits, masks) -> dict[str, torch.Tensor]:
        """BCE + Dice (Eq. 15's first two terms) on the stride-4 logits upsampled to the GT's
        resolution, as LAVT (its output is upsampled to the input) and Mask2Former (points sampled
        from the upsampled logits) compare with the full-resolution mask. A GT shrunk to the
        logits by nearest neighbour caps the 64 px demo: upsampled back, it scores IoU 0.57
        against the real masks (the LAVT row plateaued at mIoU 0.28; with this loss 0.45)."""
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
            input_ids, attention_mask, cfg.mask_ratio, cfg.mask_token_id, gen, never
        )
        O_masked = self.encode_text(masked_ids, attention_mask)  # Eq. (1)
        P = F.adaptive_avg_pool2d(P, cfg.grounding_grid)  # Eq. (2): (B, d_s, g, g)
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
