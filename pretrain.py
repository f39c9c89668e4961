"""Pretrain the demo's tiny Swin, BERT and CLIP on the synthetic world with their real objectives.

Every paper in this repository fine-tunes encoders that were pretrained on web-scale data (Swin-B on
ImageNet, BERT-base, CLIP ViT-B/16). The demo is a miniature of that: this script pretrains one
tiny encoder of each kind on the *train* split of the synthetic world (data.py) and saves it as a
Hugging Face folder under pretrained/, which `Config.tiny()` of every method loads with
`from_pretrained(<folder>)`, the code path `Config.paper()` takes with the Hub ids.

The objectives, with the real counterpart each one stands for:

- tiny-swin (Swin on ImageNet: supervised image classification). Multi-label classification of
  which colours, shapes and sizes are present in a scene (14 labels, binary cross-entropy), at
  64 px with ImageNet mean/std, as data.py prepares images for the Swin/BERT family. Plus a
  per-object term (weight 1, `--swin-object-weight`; 0 = presence only): every object's size,
  colour and shape named from its own features, mask-pooled at each of the four stages
  (cross-entropy, one linear head per stage, not saved): an ImageNet image shows one object, a
  scene here 2-6, so naming each object from its own region is the closer analog, and presence
  alone never taught shapes (RECIPES). The model is a `SwinForImageClassification`; its encoder
  runs with `always_partition=True`, the path `SwinBackbone` takes downstream (shifted windows in
  every stage; transformers' `SwinModel` default path crashes on a last stage smaller than the
  window).
- tiny-bert (BERT: masked-language modelling). 15% of the words of the world's expressions
  (shapes and gshapes train) are chosen, at least one per sentence; 80% of them become [MASK], 10%
  a random word, 10% stay; the model predicts the originals. (No next-sentence prediction: a
  sample is one sentence.) [MASK] is the token MagNet's Mask Grounding relies on.
- tiny-clip (CLIP: image-text contrastive, plus region-text alignment as RegionCLIP / GLIP).
  Three terms, summed:
  (1) global: CLIP's symmetric InfoNCE between the image embedding (class token) and a scene
      caption listing up to three of its objects ("a large red circle and a small blue square");
  (2) region: every object's patch tokens, mask-pooled, against attribute phrases of the batch's
      objects ("the red circle", "the large shape"): InfoNCE both ways (RegionCLIP);
  (3) dense: every patch token against every phrase of the batch, a sigmoid score whose target is
      the share of the patch covered by objects the phrase describes, so background patches and
      other objects score low (GLIP's word-region alignment, at patch level).
  Why (2) and (3): measured on this world, a plain CLIP loss on (scene, referring expression)
  leaves the patches unaligned (the referred object's share of the top half of patches by cosine
  was 0.49, chance 0.5). The patch features aligned with the text are the ones CRIS-style methods
  read: cos(text_embeds, visual_projection(post_layernorm(patch token))), where text_embeds =
  text_projection(the [EOS] state after the final LayerNorm) (cm_masksd.py: V_local, w_global).
  Captions and phrases name attributes only; the referring expressions and their masks (positions,
  relations, ordinals: the downstream task) are never a training target here.

Quality, measured on the val split and printed, written to pretrained/quality.json and to each
folder's README.md: Swin attribute accuracy (per label, exact set; with the per-object term also
each object's size / colour / shape named from each stage), BERT masked-word accuracy, CLIP
image-to-text / text-to-image top-1 among the captions of a batch, and the patch property the
CLIP-family methods rely on (share of the referred object's patches in the top half of patches
ranked by cosine with the sentence; chance 0.5), with its control (the same with another scene's
sentence) and the referent's rank among the objects' patches alone (an AUC, own sentence and
another's; chance 0.5: objects cannot fill that cut).

Run `python pretrain.py`: the three parts train side by side, one process and one thread each
(for ops this small one thread per part beats two, and the weights are bitwise the same whatever
the machine's load): about 23 CPU-minutes in all (Swin 14-18, BERT 2, CLIP 4-5), 18.6 minutes on 2
idle cores (the Swin's, measured), deterministic from --seed on one CPU and torch build. Or
`python pretrain.py --init-only`: random-init folders of the same architectures, in seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm
from transformers import (
    BertConfig,
    BertForMaskedLM,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    SwinConfig,
    SwinForImageClassification,
)

import data

ROOT = Path(__file__).resolve().parent
IMAGE_SIZE = 64  # the demo's input size
GRID = 8  # CLIP patches per side at 64 px (patch 8)
SWIN_GRID = 16  # Swin patches per side at 64 px (patch 4): its stage-1 map
BERT_TOKENS, CLIP_TOKENS = 20, 17  # max tokens of the two families (DESIGN.md §4)
ATTRIBUTES = data.COLOUR_NAMES + data.SHAPES + tuple(data.SIZES)  # Swin's 14 labels
POOL = 10000  # train scenes drawn from (the first half of the demo's train split)
GSHAPES_TEXTS = 5000  # gshapes train scenes whose expressions BERT also reads
PARTS = ("swin", "bert", "clip")


@dataclass(frozen=True)
class Recipe:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup: int  # linear warm-up steps, then cosine decay to 0
    object_weight: float = 0.0  # Swin: weight of the per-object term (0: presence only)


# Lengths set for a 2-core machine shared with other jobs (Swin ~16 CPU-minutes, BERT ~1, CLIP ~3,
# run side by side). CLIP's patch property saturates early (a 400-step trial: top-half share 0.90
# at step 100, 0.985 at 200). Swin learns colours and sizes from presence alone in 300 steps, not
# shapes, and more steps of presence alone do not fix that: in a 1500-step run its mean
# shape-presence accuracy went 0.575 at step 300 -> 0.612 at 1500 (300 val scenes); a fresh
# linear probe on the stage features named an object's shape 20-22% of the time (chance 17%)
# even after 3000 steps. The per-object term does teach shapes, but only after a long plateau: its
# shape loss sits at ln 6 = 1.79 for ~1000 steps (so 300- and 900-step trials of it, and of patch
# 2, window 8, 4x heads, absolute positions, or distillation from a CNN, all stayed at 20-24%).
# Named by the trained heads on 500 val scenes' objects, stages 1-4: 2000 steps at batch 64 (14
# CPU-min) 23/32/37/33%, 3000 at batch 32 (12 min) 25/36/39/35%, 4000 at batch 32 (16 min)
# 29/47/52/44%, colours and sizes 88-100%. The shipped Swin uses the 4000-step recipe: the
# ImageNet analog should know shapes. Downstream it moved M3Dec's default run by +4.2 mIoU (seed
# 0) and +0.4 (seed 1), ReLA +0.9 gIoU, MagNet -0.8 mIoU (seed 0 each; README).
RECIPES = {
    "swin": Recipe(
        steps=4000, batch_size=32, lr=1e-3, weight_decay=0.05, warmup=30, object_weight=1.0
    ),
    "bert": Recipe(steps=600, batch_size=64, lr=1e-3, weight_decay=0.01, warmup=50),
    "clip": Recipe(steps=250, batch_size=64, lr=1e-3, weight_decay=0.1, warmup=25),
}


# =============================================================================================
# The three architectures (team SPEC; methods' tiny() configs write the same numbers out)
# =============================================================================================


def swin_config() -> SwinConfig:
    """Stage maps at 64 px: 16x16 (32 ch), 8x8 (64), 4x4 (128), 2x2 (256); depth 2 per stage, so
    every stage has a shifted-window block."""
    return SwinConfig(
        image_size=IMAGE_SIZE, patch_size=4, num_channels=3, embed_dim=32, depths=[2, 2, 2, 2],
        num_heads=[1, 2, 4, 8], window_size=4, mlp_ratio=4.0, drop_path_rate=0.0,
        num_labels=len(ATTRIBUTES), problem_type="multi_label_classification",
        id2label=dict(enumerate(ATTRIBUTES)), label2id={a: i for i, a in enumerate(ATTRIBUTES)},
    )  # fmt: skip


def bert_config(vocab_size: int) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=32, pad_token_id=0,
    )  # fmt: skip


def clip_config(vocab_size: int) -> CLIPConfig:
    """8x8 patches + class token at 64 px; word-level text tower whose EOS (= pad) is V - 1."""
    text = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=32, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, projection_dim=64,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE, patch_size=8, hidden_size=64, intermediate_size=256,
        num_hidden_layers=10, num_attention_heads=4, projection_dim=64,
    )  # fmt: skip
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=64)


def build_model(part: str, seed: int) -> torch.nn.Module:
    """The random-init encoder of a part, from its own seed (each part can run alone)."""
    torch.manual_seed(_seed(seed, part))
    if part == "swin":
        return SwinForImageClassification(swin_config())
    if part == "bert":
        return BertForMaskedLM(bert_config(len(data.build_tokenizer("bert"))))
    return CLIPModel(clip_config(len(data.build_tokenizer("clip"))))


def _seed(seed: int, part: str, step: int = -1) -> int:
    """One integer seed per (run seed, part, step): every step's randomness is its own."""
    return int(np.random.SeedSequence([seed, PARTS.index(part), step + 1]).generate_state(1)[0])


# =============================================================================================
# The synthetic world as pretraining data
# =============================================================================================


@dataclass
class Sample:
    pixels: np.ndarray  # (64, 64, 3) uint8, the scene resized as data.prepare_image does
    objects: list[tuple[str, str, str]]  # (size, colour, shape) of each object
    cover: np.ndarray  # (n_objects, GRID * GRID) float32: share of each patch covered by object k
    swin_cover: np.ndarray  # (n_objects, SWIN_GRID ** 2) float32: the same on Swin's 4 px patches
    sentence: str  # the scene's referring expression (read only by BERT and the evaluation)
    target: np.ndarray  # (GRID * GRID,) float32: share of each patch covered by the referent
    form: str  # the expression's form: "the" (attributes), "ordinal", "relation", ...


class World:
    """Scenes of one split of the synthetic world, made on first use and kept (a pure function of
    (seed, split, index), so a batch is the same whether the cache is warm or not)."""

    def __init__(self, split: str, generalized: bool = False, seed: int = 0):
        self.split, self.generalized, self.seed = split, generalized, seed
        self._cache: dict[int, Sample] = {}

    def __getitem__(self, index: int) -> Sample:
        if index not in self._cache:
            self._cache[index] = self._make(index)
        return self._cache[index]

    def _make(self, index: int) -> Sample:
        scene = data.make_scene(index, self.split, self.seed, self.generalized)
        image = scene.image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        n, cell = len(scene.objects), data.CANVAS // GRID
        ids = np.arange(1, n + 1, dtype=np.uint8)[:, None, None]
        onehot = (scene.labels[None] == ids).astype(np.float32)  # (n, CANVAS, CANVAS)
        cover = onehot.reshape(n, GRID, cell, GRID, cell).mean((2, 4)).reshape(n, GRID * GRID)
        target = cover[scene.targets].sum(0) if scene.targets else np.zeros(GRID * GRID, "f4")
        cell = data.CANVAS // SWIN_GRID
        swin_cover = onehot.reshape(n, SWIN_GRID, cell, SWIN_GRID, cell).mean((2, 4))
        return Sample(np.asarray(image), [o.attributes for o in scene.objects], cover,
                      swin_cover.reshape(n, SWIN_GRID**2), scene.sentence, target,
                      scene.meaning[0])  # fmt: skip


def images(samples: list[Sample], family: str) -> torch.Tensor:
    """(B, 3, 64, 64) normalised exactly as data.prepare_image (the images are already 64 px)."""
    return torch.stack([data.prepare_image(Image.fromarray(s.pixels), IMAGE_SIZE, family)
                        for s in samples])  # fmt: skip


def tokenize(tokenizer, sentences: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """data.encode_text on a list in one tokenizer call -> input_ids, attention_mask (B, L)."""
    enc = tokenizer([s.strip() for s in sentences], padding="max_length", truncation=True,
                    max_length=max_tokens, return_token_type_ids=False,
                    return_tensors="pt")  # fmt: skip
    return enc["input_ids"], enc["attention_mask"]


# Attribute subsets a phrase names: (size?, colour?, shape?), the full description most often.
SUBSETS = [(1, 1, 1), (0, 1, 1), (1, 0, 1), (1, 1, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0)]
SUBSET_P = np.array([0.4] + [0.1] * 6)


def describe(attributes: tuple, rng: np.random.Generator, full: bool = False) -> tuple:
    """A description (size | None, colour | None, shape | None) of an object's attributes."""
    keep = SUBSETS[0] if full else SUBSETS[rng.choice(len(SUBSETS), p=SUBSET_P)]
    return tuple(a if k else None for a, k in zip(attributes, keep, strict=True))


def words(desc: tuple, rng: np.random.Generator) -> str:
    """ "large red circle", "big shape", "green object": the grammar's words and synonyms
    (data.py's own wording of a description, the same draws from rng)."""
    return data._words(desc, rng)


def matches(desc: tuple, attributes: tuple) -> bool:
    return all(d is None or d == a for d, a in zip(desc, attributes, strict=True))


def caption(sample: Sample, rng: np.random.Generator) -> tuple[str, list[tuple]]:
    """A scene caption naming up to three of its objects in full, in random order."""
    k = min(len(sample.objects), int(rng.integers(1, 4)))
    chosen = [sample.objects[i] for i in rng.permutation(len(sample.objects))[:k]]
    parts = [f"a {words(a, rng)}" for a in chosen]
    text = parts[0] if k == 1 else " , ".join(parts[:-1]) + " and " + parts[-1]
    return text, chosen


def caption_fits(named: list[list[tuple]], samples: list[Sample]) -> torch.Tensor:
    """(C, B) bool: caption c fits image j when every object it names is in j (a positive)."""
    return torch.tensor([[all(any(matches(a, o) for o in s.objects) for a in objects)
                          for s in samples] for objects in named])  # fmt: skip


# =============================================================================================
# Swin: multi-label attribute classification (the ImageNet analog)
# =============================================================================================


def presence(samples: list[Sample]) -> torch.Tensor:
    """(B, 14) float: 1 where a colour / shape / size occurs in the scene."""
    labels = torch.zeros(len(samples), len(ATTRIBUTES))
    for b, s in enumerate(samples):
        for attributes in s.objects:
            for a in attributes:
                labels[b, ATTRIBUTES.index(a)] = 1.0
    return labels


# The optional per-object term (--swin-object-weight, see RECIPES): each object's size, colour
# and shape named from its features mask-pooled at every stage (the maps SwinBackbone returns).
GROUPS = (("size", tuple(data.SIZES)), ("colour", data.COLOUR_NAMES), ("shape", data.SHAPES))
_ENDS = np.cumsum([len(names) for _, names in GROUPS])
GROUP_SLICES = [slice(a, b) for a, b in zip([0, *_ENDS[:-1]], _ENDS, strict=True)]  # in (R, 14)
STAGE_DIMS = tuple(swin_config().embed_dim * 2**i for i in range(4))  # (32, 64, 128, 256)


class ObjectHeads(torch.nn.Module):
    """One linear classifier per stage: pooled object feature -> size | colour | shape logits
    (training only, not saved)."""

    def __init__(self):
        super().__init__()
        classes = sum(len(names) for _, names in GROUPS)  # 2 + 6 + 6
        self.stages = torch.nn.ModuleList(torch.nn.Linear(c, classes) for c in STAGE_DIMS)


def build_head(part: str, seed: int, recipe: Recipe) -> torch.nn.Module | None:
    """The part's training-only head (not saved): Swin's object classifiers, CLIP's dense scale."""
    if part == "swin" and recipe.object_weight > 0:
        torch.manual_seed(_seed(seed, part) + 1)  # not the encoder's own init stream
        return ObjectHeads()
    return DenseHead() if part == "clip" else None


def swin_forward(swin: SwinForImageClassification, pixel_values: torch.Tensor, stages: bool):
    # always_partition: the shifted-window path SwinBackbone takes downstream (see docstring);
    # the stage maps before patch merging (only asked for when the object term reads them) are
    # the ones SwinBackbone returns.
    out = swin(pixel_values=pixel_values, always_partition=True, output_hidden_states=stages,
               output_hidden_states_before_downsampling=stages)  # fmt: skip
    maps = out.reshaped_hidden_states[1:] if stages else None
    return out.logits, maps  # (B, 14), 4 x (B, C_s, H_s, W_s)


def object_labels(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """owner (R,) image of each object, swin_cover (R, 256), labels (R, 3): size, colour, shape."""
    owner = [b for b, s in enumerate(samples) for _ in s.objects]
    cover = np.concatenate([s.swin_cover for s in samples])
    labels = [[names.index(a) for a, (_, names) in zip(o, GROUPS, strict=True)]
              for s in samples for o in s.objects]  # fmt: skip
    return torch.tensor(owner), torch.from_numpy(cover), torch.tensor(labels)


def pool_objects(fmap: torch.Tensor, owner: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """(R, C): each object's features on a stage map (B, C, H, W), averaged over the cells it
    covers, weighted by how much of each cell it covers (its 4 px cover, area-pooled)."""
    side = fmap.shape[-1]
    grid = cover.view(-1, 1, SWIN_GRID, SWIN_GRID)
    w = F.avg_pool2d(grid, SWIN_GRID // side).flatten(1)  # (R, H*W): covered share of each cell
    w = w / w.sum(1, keepdim=True).clamp_min(1e-6)
    return torch.einsum("rn,rcn->rc", w, fmap[owner].flatten(2))  # (R, C)


def object_logits(heads: ObjectHeads, stages, owner, cover) -> list[torch.Tensor]:
    """Per stage (R, 14): each object's pooled stage feature through that stage's head."""
    return [
        head(pool_objects(f, owner, cover)) for head, f in zip(heads.stages, stages, strict=True)
    ]


def group_losses(logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Cross-entropy of size, colour and shape from (R, 14) logits."""
    return [F.cross_entropy(logits[:, s], labels[:, g]) for g, s in enumerate(GROUP_SLICES)]


def swin_step(swin, heads, world: World, seed: int, step: int, batch_size: int,
              object_weight: float) -> dict:  # fmt: skip
    rng = np.random.default_rng(_seed(seed, "swin", step))
    samples = [world[int(i)] for i in rng.integers(POOL, size=batch_size)]
    logits, stages = swin_forward(swin, images(samples, "bert"), stages=heads is not None)
    presence_ = F.binary_cross_entropy_with_logits(logits, presence(samples))
    if heads is None:
        return {"loss": presence_}
    owner, cover, labels = object_labels(samples)
    per_stage = [group_losses(x, labels) for x in object_logits(heads, stages, owner, cover)]
    size, colour, shape = (torch.stack(g).mean() for g in zip(*per_stage, strict=True))
    loss = presence_ + object_weight * (size + colour + shape)
    return {"loss": loss, "presence": presence_, "size": size, "colour": colour, "shape": shape}


@torch.no_grad()
def swin_quality(swin, val: World, n: int, heads: ObjectHeads | None = None) -> dict:
    """Presence accuracy per label; with the object heads, each val object's size / colour /
    shape named from each stage (the property MagNet's and M3Dec's grounding rest on)."""
    swin.eval()
    correct, named = [], []
    for start in range(0, n, 100):
        samples = [val[i] for i in range(start, min(n, start + 100))]
        logits, stages = swin_forward(swin, images(samples, "bert"), stages=heads is not None)
        correct.append((logits > 0) == (presence(samples) > 0))
        if heads is not None:
            owner, cover, labels = object_labels(samples)
            per_stage = [torch.stack([x[:, s].argmax(1) for s in GROUP_SLICES], 1)
                         for x in object_logits(heads, stages, owner, cover)]  # fmt: skip
            named.append(torch.stack(per_stage) == labels)  # (4, R, 3)
    correct = torch.cat(correct)  # (n, 14) bool
    quality = {
        "swin_label_accuracy": correct.float().mean().item(),
        "swin_exact_set_accuracy": correct.all(1).float().mean().item(),
        "swin_label_accuracy_per_label": dict(
            zip(ATTRIBUTES, correct.float().mean(0).tolist(), strict=True)
        ),
    }
    if heads is not None:
        acc = torch.cat(named, 1).float().mean(1)  # (4, 3)
        for g, (group, _) in enumerate(GROUPS):
            quality[f"swin_object_{group}_accuracy_per_stage"] = acc[:, g].tolist()
    return quality


# =============================================================================================
# BERT: masked-language modelling on the world's expressions
# =============================================================================================


def mlm_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer, rng: np.random.Generator,
    train: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """BERT's masking: 15% of the words (at least one per sentence) are predicted; in training
    80% of them become [MASK], 10% a random word, 10% stay; in evaluation all become [MASK].
    -> (masked input_ids, labels with -100 where nothing is predicted)."""
    specials = torch.tensor(tokenizer.all_special_ids)
    words_ = (attention_mask == 1) & ~torch.isin(input_ids, specials)  # (B, L)
    u = torch.from_numpy(rng.random(input_ids.shape))
    chosen = words_ & (u < 0.15)
    first_word = torch.where(words_, u, 2.0).argmin(1)  # a sentence with no pick keeps its lowest
    none = ~chosen.any(1)
    chosen[none, first_word[none]] = True
    labels = torch.where(chosen, input_ids, -100)
    v = torch.from_numpy(rng.random(input_ids.shape))
    random_words = torch.from_numpy(rng.integers(len(data.BERT_SPECIALS), len(tokenizer),
                                                 input_ids.shape))  # fmt: skip
    masked = input_ids.clone()
    to_mask = chosen & (v < 0.8) if train else chosen
    masked[to_mask] = tokenizer.mask_token_id
    if train:
        swap = chosen & (v >= 0.8) & (v < 0.9)
        masked[swap] = random_words[swap]
    return masked, labels


def bert_text(worlds: tuple[World, World], k: int) -> str:
    """Text k of BERT's corpus: the shapes train expressions, then the first gshapes ones."""
    return worlds[0][k].sentence if k < POOL else worlds[1][k - POOL].sentence


def bert_step(bert, tokenizer, worlds, seed: int, step: int, batch_size: int) -> dict:
    rng = np.random.default_rng(_seed(seed, "bert", step))
    texts = [bert_text(worlds, int(k)) for k in rng.integers(POOL + GSHAPES_TEXTS, size=batch_size)]
    ids, attention = tokenize(tokenizer, texts, BERT_TOKENS)
    masked, labels = mlm_mask(ids, attention, tokenizer, rng)
    return {"loss": bert(input_ids=masked, attention_mask=attention, labels=labels).loss}


@torch.no_grad()
def bert_quality(bert, tokenizer, vals: tuple[World, World], n: int) -> dict:
    """Masked-word accuracy on the val expressions of shapes and gshapes (fixed masking)."""
    bert.eval()
    rng = np.random.default_rng(12345)
    texts = [w[i].sentence for w in vals for i in range(n)]
    ids, attention = tokenize(tokenizer, texts, BERT_TOKENS)
    masked, labels = mlm_mask(ids, attention, tokenizer, rng, train=False)
    logits = bert(input_ids=masked, attention_mask=attention).logits  # (N, L, V)
    picked = labels != -100
    return {
        "bert_masked_word_accuracy": (logits.argmax(-1) == labels)[picked].float().mean().item()
    }


# =============================================================================================
# CLIP: global image-caption + region-phrase + dense patch-phrase alignment
# =============================================================================================


def clip_features(clip: CLIPModel, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> image_embeds (B, P) from the class token, patch features (B, N, P): the same
    post_layernorm + visual_projection applied to every patch token (CRIS / MaskCLIP)."""
    hidden = clip.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, 1+N, C_v)
    tokens = clip.visual_projection(clip.vision_model.post_layernorm(hidden))  # (B, 1+N, P)
    return tokens[:, 0], tokens[:, 1:]


def text_embeds(clip: CLIPModel, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """(B, P): text_projection of the [EOS] state after the final LayerNorm (CLIP's text_embeds)."""
    pooled = clip.text_model(input_ids=ids, attention_mask=attention).pooler_output  # (B, C_t)
    return clip.text_projection(pooled)


def multi_positive_nce(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """InfoNCE with several positives per row: -log(softmax mass on the row's positives)."""
    all_ = torch.logsumexp(logits, dim=1)
    pos = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
    return (all_ - pos).mean()


def clip_batch(world: World, tokenizer, seed: int, step: int, batch_size: int) -> dict:
    """B scenes, one caption each, and one attribute phrase for every object of the batch."""
    rng = np.random.default_rng(_seed(seed, "clip", step))
    samples = [world[int(i)] for i in rng.integers(POOL, size=batch_size)]
    captions, named = zip(*(caption(s, rng) for s in samples), strict=True)
    regions = [(b, k) for b, s in enumerate(samples) for k in range(len(s.objects))]
    descs = [describe(samples[b].objects[k], rng) for b, k in regions]
    phrases = [f"the {words(d, rng)}" for d in descs]
    # region r is described by phrase p when every attribute the phrase names is r's: (R, R)
    said = torch.tensor([[ATTRIBUTES.index(a) if a else -1 for a in d] for d in descs])  # (R, 3)
    has = torch.tensor([[ATTRIBUTES.index(a) for a in samples[b].objects[k]] for b, k in regions])
    region_fits = ((said[None] == -1) | (said[None] == has[:, None])).all(-1)  # (R, R)
    cover = torch.from_numpy(np.stack([samples[b].cover[k] for b, k in regions]))  # (R, N)
    owner = torch.tensor([b for b, _ in regions])  # (R,) image of each region
    # patch n of image b is described by phrase p as far as p's objects in b cover it: (B, R, N)
    in_image = F.one_hot(owner, batch_size).float()  # (R, B)
    patch_target = torch.einsum("rb,rp,rn->bpn", in_image, region_fits.float(), cover)
    return {
        "pixel_values": images(samples, "clip"),
        "caption": tokenize(tokenizer, captions, CLIP_TOKENS),
        "caption_fits": caption_fits(named, samples),  # (C, B)
        "phrase": tokenize(tokenizer, phrases, CLIP_TOKENS),
        "region_fits": region_fits,  # (R, R)
        "cover": cover,
        "owner": owner,
        "patch_target": patch_target.clamp(max=1.0),  # (B, R, N)
    }


# The dense BCE is a mean over (image, phrase, patch) triples, mostly easy negatives, so it is
# ~30x smaller than the InfoNCE terms. Measured at 100 steps, top-half share: weight 1 -> 0.76,
# weight 10 -> 0.90.
DENSE_WEIGHT = 10.0


class DenseHead(torch.nn.Module):
    """SigLIP-style scale and bias of the dense patch-phrase score (training only, not saved)."""

    def __init__(self):
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = torch.nn.Parameter(torch.tensor(-10.0))


def clip_losses(clip: CLIPModel, head: DenseHead, batch: dict) -> dict:
    image, patches = clip_features(clip, batch["pixel_values"])  # (B, P), (B, N, P)
    caption = F.normalize(text_embeds(clip, *batch["caption"]), dim=-1)  # (B, P)
    phrase = F.normalize(text_embeds(clip, *batch["phrase"]), dim=-1)  # (R, P)
    scale = clip.logit_scale.clamp(max=math.log(100)).exp()  # CLIP's temperature, clamped as CLIP
    # (1) global: image <-> caption, symmetric, every caption that fits an image is a positive
    logits = scale * caption @ F.normalize(image, dim=-1).T  # (C, B)
    fits = batch["caption_fits"]
    global_ = (multi_positive_nce(logits, fits) + multi_positive_nce(logits.T, fits.T)) / 2
    # (2) region: mask-pooled patch features of each object <-> phrases, symmetric
    pooled = batch["cover"][:, :, None] * patches[batch["owner"]]  # (R, N, P)
    region = F.normalize(pooled.sum(1) / batch["cover"].sum(1, keepdim=True), dim=-1)  # (R, P)
    logits = scale * region @ phrase.T  # (R, R): region r vs phrase p
    fits = batch["region_fits"]
    region_ = (multi_positive_nce(logits, fits) + multi_positive_nce(logits.T, fits.T)) / 2
    # (3) dense: every patch vs every phrase, sigmoid, target = covered share of the patch
    cosine = torch.einsum("bnp,rp->brn", F.normalize(patches, dim=-1), phrase)  # (B, R, N)
    dense_logits = head.log_scale.exp() * cosine + head.bias
    dense = F.binary_cross_entropy_with_logits(dense_logits, batch["patch_target"])
    loss = global_ + region_ + DENSE_WEIGHT * dense
    return {"loss": loss, "global": global_, "region": region_, "dense": dense}


def clip_step(clip, head, tokenizer, world: World, seed: int, step: int, batch_size: int) -> dict:
    return clip_losses(clip, head, clip_batch(world, tokenizer, seed, step, batch_size))


def referent_auc(scores: torch.Tensor, referent: torch.Tensor, others: torch.Tensor):
    """(B,) weighted AUC: the chance that a patch of the referent outranks a patch of another
    object of the scene. scores (B, N) the ranking; referent, others (B, N) each patch's share of
    the referent and of the other objects (the pair weights). 0.5 = the ranking finds objects but
    not which one; 1 = every referent patch above every other object's."""
    order = scores.argsort(dim=1)  # (B, N) ascending
    t, u = referent.gather(1, order), others.gather(1, order)
    below = u.cumsum(1) - 0.5 * u  # other-object mass ranked below each patch (itself: half)
    return (t * below).sum(1) / (t.sum(1) * u.sum(1)).clamp_min(1e-12)


@torch.no_grad()
def clip_quality(clip, tokenizer, val: World, n: int, batch_size: int) -> dict:
    """Retrieval top-1 among the captions of a batch (a hit = the top caption fits the image, and
    the top image fits the caption) and the patch property on val referring expressions, with its
    control: the same ranking by another scene's sentence (the next sample of the batch)."""
    clip.eval()
    rng = np.random.default_rng(12345)
    i2t, t2i, share, forms = [], [], {}, []
    auc, auc_other, half_other = [], [], []
    for start in range(0, n, batch_size):
        samples = [val[i] for i in range(start, min(n, start + batch_size))]
        pixel_values = images(samples, "clip")
        image, patches = clip_features(clip, pixel_values)  # (B, P), (B, N, P)
        captions, named = zip(*(caption(s, rng) for s in samples), strict=True)
        fits = caption_fits(named, samples)  # (C, B)
        text = F.normalize(text_embeds(clip, *tokenize(tokenizer, captions, CLIP_TOKENS)), dim=-1)
        sim = text @ F.normalize(image, dim=-1).T  # (C, B)
        i2t += fits[sim.argmax(0), torch.arange(len(samples))].tolist()
        t2i += fits[torch.arange(len(samples)), sim.argmax(1)].tolist()
        # The patch property: rank the N patches by cos(sentence, patch), keep the top half,
        # and measure the referent's coverage-weighted share inside it.
        ids, attention = tokenize(tokenizer, [s.sentence for s in samples], CLIP_TOKENS)
        sentence = F.normalize(text_embeds(clip, ids, attention), dim=-1)  # (B, P)
        cosine = torch.einsum("bnp,bp->bn", F.normalize(patches, dim=-1), sentence)  # (B, N)
        rank = cosine.argsort(1, descending=True).argsort(1)  # (B, N), 0 = most similar
        target = torch.from_numpy(np.stack([s.target for s in samples]))  # (B, N)
        for name, k in (("half", GRID * GRID // 2), ("quarter", GRID * GRID // 4)):
            inside = (target * (rank < k)).sum(1) / target.sum(1)  # (B,)
            share[name] = share.get(name, []) + inside.tolist()
        forms += [s.form for s in samples]
        # Among the objects' patches only (objects cannot fill this cut): the referent's rank,
        # with its own sentence and with the next sample's (cm_masksd's diagnostic, on labels).
        others = torch.from_numpy(np.stack([s.cover.sum(0) for s in samples])) - target
        other = torch.einsum("bnp,bp->bn", F.normalize(patches, dim=-1), sentence.roll(1, 0))
        auc += referent_auc(cosine, target, others.clamp(min=0)).tolist()
        auc_other += referent_auc(other, target, others.clamp(min=0)).tolist()
        rank_other = other.argsort(1, descending=True).argsort(1)  # (B, N)
        half_other += ((target * (rank_other < GRID * GRID // 2)).sum(1) / target.sum(1)).tolist()
    half, quarter, forms = np.array(share["half"]), np.array(share["quarter"]), np.array(forms)
    return {
        "clip_image_to_text_top1": float(np.mean(i2t)),
        "clip_text_to_image_top1": float(np.mean(t2i)),
        "clip_retrieval_batch_size": batch_size,
        "clip_target_share_top_half": float(half.mean()),
        "clip_target_share_top_half_chance": 0.5,
        "clip_target_share_top_half_by_form": {
            str(f): float(half[forms == f].mean()) for f in sorted(set(forms))
        },
        "clip_target_share_top_quarter": float(quarter.mean()),
        "clip_target_share_top_quarter_chance": 0.25,
        "clip_target_share_top_half_other_sentence": float(np.mean(half_other)),
        "clip_referent_auc_among_objects": float(np.mean(auc)),
        "clip_referent_auc_among_objects_other_sentence": float(np.mean(auc_other)),
        "clip_referent_auc_among_objects_chance": 0.5,
    }


# =============================================================================================
# Training loop, saving, the command
# =============================================================================================


def optimizer(params, recipe: Recipe):
    """AdamW without weight decay on biases, norms and scalars; warm-up then cosine."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": recipe.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)

    def factor(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.5 * (1 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train(part: str, seed: int, modules: list[torch.nn.Module], step_fn, recipe: Recipe,
          steps: int, progress: bool = True) -> list[dict]:  # fmt: skip
    """The first `steps` optimiser steps (of recipe.steps) of `step_fn(step) -> {"loss", ...}`;
    returns each step's loss terms."""
    modules = [m for m in modules if m is not None]
    for m in modules:
        m.train()
    params = [p for m in modules for p in m.parameters()]
    opt, schedule = optimizer(params, recipe)
    torch.manual_seed(_seed(seed, part))  # dropout stream (BERT): the same whatever ran before
    log = []
    bar = tqdm(
        range(steps), desc=part, disable=not progress, mininterval=10, position=PARTS.index(part)
    )
    for step in bar:
        losses = step_fn(step)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        log.append({k: v.item() for k, v in losses.items()})
        bar.set_postfix({k: f"{v:.3f}" for k, v in log[-1].items()}, refresh=False)
    return log


def run_part(part: str, model: torch.nn.Module, head: torch.nn.Module | None, seed: int,
             recipe: Recipe, steps: int | None = None,
             progress: bool = True) -> list[dict]:  # fmt: skip
    """Pretrain `model` (the part's encoder) and its training-only `head` in place; `steps` <
    recipe.steps stops early."""
    steps = recipe.steps if steps is None else steps
    B = recipe.batch_size
    if part == "swin":
        world, w = World("train"), recipe.object_weight
        return train(part, seed, [model, head],
                     lambda s: swin_step(model, head, world, seed, s, B, w), recipe, steps,
                     progress)  # fmt: skip
    if part == "bert":
        tok, worlds = data.build_tokenizer("bert"), (World("train"), World("train", True))
        return train(part, seed, [model], lambda s: bert_step(model, tok, worlds, seed, s, B),
                     recipe, steps, progress)  # fmt: skip
    tok, world = data.build_tokenizer("clip"), World("train")
    return train(part, seed, [model, head],
                 lambda s: clip_step(model, head, tok, world, seed, s, B), recipe, steps,
                 progress)  # fmt: skip


def first_losses(part: str, seed: int = 0, steps: int = 2) -> list[float]:
    """The losses of the first `steps` steps of the default recipe from the seed (what the test
    reproduces: a change to the data, the model or the recipe changes them)."""
    model, head = build_model(part, seed), build_head(part, seed, RECIPES[part])
    log = run_part(part, model, head, seed, RECIPES[part], steps, progress=False)
    return [row["loss"] for row in log]


def pretrain_part(part: str, seed: int, recipe: Recipe, out: Path, val_samples: int) -> dict:
    """Train one encoder on 1 thread, measure it, save its folder; -> its quality numbers."""
    torch.set_num_threads(1)  # small ops: one thread per part is faster, and bitwise reproducible
    wall, cpu = time.time(), time.process_time()
    model, head = build_model(part, seed), build_head(part, seed, recipe)
    log = run_part(part, model, head, seed, recipe)
    quality = {
        f"{part}_train_wall_minutes": (time.time() - wall) / 60,
        f"{part}_train_cpu_minutes": (time.process_time() - cpu) / 60,
        f"{part}_first_losses": [row["loss"] for row in log[:2]],
        f"{part}_final_loss": float(np.mean([row["loss"] for row in log[-50:]])),
    }
    wall, cpu = time.time(), time.process_time()
    if part == "swin":
        quality.update(swin_quality(model, World("val"), val_samples, head))
    elif part == "bert":
        vals = (World("val"), World("val", generalized=True))
        quality.update(bert_quality(model, data.build_tokenizer("bert"), vals, val_samples))
    else:
        tok = data.build_tokenizer("clip")
        quality.update(clip_quality(model, tok, World("val"), val_samples, recipe.batch_size))
    quality[f"{part}_eval_wall_minutes"] = (time.time() - wall) / 60
    quality[f"{part}_eval_cpu_minutes"] = (time.process_time() - cpu) / 60
    quality[f"{part}_checksum"] = checksum(model)
    save(part, model, out)
    return quality


def checksum(model: torch.nn.Module) -> str:
    """sha256 of the state dict (names and bytes, in order): a fingerprint of the weights."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


FOLDERS = {"swin": "tiny-swin", "bert": "tiny-bert", "clip": "tiny-clip"}
CARDS = {
    "swin": ("`SwinForImageClassification` (Swin, patch 4, window 4, embed 32, depths 2-2-2-2, "
             "heads 1-2-4-8; 64 px; stage maps 16x16/8x8/4x4/2x2 with 32/64/128/256 channels)",
             "multi-label classification of the colours, shapes and sizes present in a scene "
             "(14 labels, BCE), the analog of ImageNet classification, plus each object's size, "
             "colour and shape named from its features mask-pooled at every stage (cross-entropy, "
             "heads not saved); ImageNet mean/std",
             'SwinBackbone.from_pretrained(folder, out_features=["stage1", "stage2", "stage3", '
             '"stage4"])'),
    "bert": ("`BertForMaskedLM` (hidden 64, 4 layers, 4 heads, FFN 256, 32 positions) + the "
             "word-level BERT tokenizer of the world's vocabulary ([PAD]=0 [UNK]=1 [CLS]=2 "
             "[SEP]=3 [MASK]=4)",
             "masked-language modelling (15% of the words, 80% [MASK] / 10% random / 10% kept) on "
             "the shapes and gshapes train expressions",
             "BertModel.from_pretrained(folder, add_pooling_layer=False); "
             "AutoTokenizer.from_pretrained(folder)"),
    "clip": ("`CLIPModel` (ViT: patch 8, 10 layers, width 64, 4 heads, 8x8 patches + class "
             "token at 64 px; text: 4 layers, width 64; projection 64) + the word-level CLIP "
             "tokenizer (<|startoftext|> = V-2, <|endoftext|> = V-1 = pad)",
             "CLIP's image-caption InfoNCE + region-phrase InfoNCE on mask-pooled patch features "
             "(RegionCLIP) + a dense sigmoid patch-phrase loss (GLIP-like), on attribute captions "
             "and phrases. Aligned features: cos(text_projection([EOS] state), "
             "visual_projection(post_layernorm(patch token))); CLIP mean/std",
             "CLIPModel.from_pretrained(folder); AutoTokenizer.from_pretrained(folder)"),
}  # fmt: skip


def _rounded(value):
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def model_card(part: str, quality: dict) -> str:
    what, objective, load = CARDS[part]
    numbers = "\n".join(f"- {k}: {json.dumps(_rounded(v))}" for k, v in quality.items()
                        if k.startswith(part + "_"))  # fmt: skip
    return (
        f"# {FOLDERS[part]}\n\n{what}, pretrained on the train split of the repository's "
        f"synthetic world by `pretrain.py` (seed {quality['seed']}).\n\n"
        f"Objective: {objective}.\n\nLoad: `{load}`.\n\n"
        f"Made by: `python pretrain.py --seed {quality['seed']}` (the three encoders side by "
        f"side, one thread each; this one: {quality[part + '_train_cpu_minutes']:.1f} CPU-min "
        f"of training, {quality[part + '_train_wall_minutes']:.1f} min wall on the machine it "
        f"ran on).\n\n"
        f"Quality on the val split (pretrained/quality.json has every number):\n\n{numbers}\n"
    )


def save(part: str, model: torch.nn.Module, out: Path) -> None:
    """save_pretrained (safetensors) + the tokenizer; main() writes the model cards."""
    model.save_pretrained(out / FOLDERS[part])
    if part in ("bert", "clip"):
        data.build_tokenizer(part).save_pretrained(out / FOLDERS[part])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="model init and batch order")
    parser.add_argument("--out", default=str(ROOT / "pretrained"), help="folder of the 3 models")
    parser.add_argument("--init-only", action="store_true", help="save random-init models only")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="comma-separated parts to (re)train; the others' folders and "
                             "numbers in <out>/quality.json are kept")  # fmt: skip
    for part in PARTS:
        for field, kind in (("steps", int), ("batch_size", int), ("lr", float)):
            flag = f"--{part}-{field.replace('_', '-')}"
            parser.add_argument(flag, type=kind, default=getattr(RECIPES[part], field),
                                help=f"{field} of {FOLDERS[part]}")  # fmt: skip
    parser.add_argument("--swin-object-weight", type=float, default=RECIPES["swin"].object_weight,
                        help="weight of tiny-swin's per-object size/colour/shape term "
                             "(0: presence only)")  # fmt: skip
    parser.add_argument("--val-samples", type=int, default=500, help="val scenes for quality")
    parser.add_argument("--workers", type=int, default=3,
                        help="parts trained at once, one process and one thread each")  # fmt: skip
    args = parser.parse_args()
    out = Path(args.out)
    parts = [p for p in PARTS if p in args.parts.split(",")]
    if args.init_only:
        for part in parts:
            save(part, build_model(part, args.seed), out)
        print(f"wrote random-init encoders to {out}")
        return
    recipes = {p: replace(RECIPES[p], steps=getattr(args, f"{p}_steps"),
                          lr=getattr(args, f"{p}_lr"), batch_size=getattr(args, f"{p}_batch_size"))
               for p in parts}  # fmt: skip
    if "swin" in recipes:
        recipes["swin"] = replace(recipes["swin"], object_weight=args.swin_object_weight)
    record = out / "quality.json"
    quality = json.loads(record.read_text()) if record.exists() and parts != list(PARTS) else {}
    if quality.get("seed", args.seed) != args.seed:
        raise SystemExit(f"{record} was made with seed {quality['seed']}: retrain every part")
    quality["seed"] = args.seed
    quality.setdefault("recipes", {}).update({p: asdict(r) for p, r in recipes.items()})
    # The parts are independent (own seed, own data stream): run them side by side, CLIP first
    # (the longest). Each process uses one thread, so the weights do not depend on --workers.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(args.workers, len(parts)), mp_context=context) as pool:
        jobs = {p: pool.submit(pretrain_part, p, args.seed, recipes[p], out, args.val_samples)
                for p in sorted(parts, key=("clip", "swin", "bert").index)}  # fmt: skip
        for part in parts:
            quality.update(jobs[part].result())
    for part in PARTS:
        if f"{part}_checksum" in quality:
            (out / FOLDERS[part] / "README.md").write_text(model_card(part, quality))
    record.write_text(json.dumps(quality, indent=1) + "\n")
    print(json.dumps(_rounded(quality), indent=1))
    print(f"wrote {', '.join(FOLDERS[p] for p in parts)} and {record}")


if __name__ == "__main__":
    main()
