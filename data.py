"""Datasets, tokenizers, transforms and collate for referring image segmentation.

Nothing here is model-specific. Every dataset yields one sample per expression (sentence), the
unit of all official RIS evaluations:

    {"image": (3, H, W) float normalised, "mask": (H, W) float {0, 1},
     "input_ids": (L,) long, "attention_mask": (L,) long, "no_target": bool,
     "sentence": str, "ref_id": int, "image_id": int}

Datasets (all behind `build_dataset(name, split, ...)`, names in `DATASETS`):

- `shapes`   a built-in synthetic referring world (single target, RefCOCO-like): coloured shapes
             on a textured background, described by a small grammar evaluated against the scene, so
             every mask is exact and every single-target expression is unambiguous by construction.
- `gshapes`  the same world with multi-target and deceptive no-target expressions (gRefCOCO-like).
- `refcoco`, `refcoco+`, `refcocog` in the refer-API layout (split_by unc / umd / google):
             <root>/<dataset>/refs(<split_by>).p + <root>/<dataset>/instances.json,
             images <root>/images/train2014/<images[].file_name of instances.json>.
- `grefcoco` <root>/grefcoco/grefs(unc).json + <root>/grefcoco/instances.json, same images;
             ann_id == [-1] is a no-target expression, a list of ann ids a multi-target one.

Decisions worth knowing (one line each):
- Masks of real datasets are the UNION of polygon parts and of the referred instances (ReLA's rule;
  not LAVT's "sum of polygon parts == 1" quirk, which drops pixels covered by two parts).
- Polygons are rasterised at the original image size by pycocotools' rule (maskApi.c rleFrPoly),
  ported to numpy and tested pixel for pixel against pycocotools: the official masks exactly. COCO
  RLE (compressed strings and uncompressed count lists) is decoded in numpy.
- Crowd annotations are kept when a ref points at one (ReLA's loader skips them; that would leave
  a targeted expression with an empty mask).
- The sentence field: `raw` for the BERT family (LAVT, ReLA tokenise `raw`), `sent` for the CLIP
  family (CRIS stores `sent`); either falls back to the other when missing.
- `refs(*).p` is read with a restricted unpickler that refuses every global: a refs file only holds
  lists, dicts, strings and numbers, so a pickle that wants to import anything is refused.
- Bad files end in one line: a refs / instances file of the wrong format (JSON where a pickle is
  expected, truncated, not a list of ref dicts, ...) raises ValueError naming the file and the
  format expected; an image that cannot be decoded (corrupt, truncated) is replaced by the next
  sample whose image decodes, with one warning naming the file (deterministic: same index, same
  replacement).
- Images are resized to a square without letterbox (LAVT / ReLA; CRIS letterboxes), bilinear for
  the image, nearest for the mask. Augmentation (horizontal flip that also swaps "left"/"right" in
  the expression) is off by default, as in every official recipe.

Run `python data.py export shapes out/` to write the synthetic world in the refer-API format and
`python data.py preview docs/synthetic_world.png` to draw a few examples.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import pickle
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageChops, ImageDraw
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch.utils.data import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerFast

DATASETS = ("shapes", "gshapes", "refcoco", "refcoco+", "refcocog", "grefcoco")

# =============================================================================================
# The synthetic world: objects, scenes, expressions
# =============================================================================================

CANVAS = 128  # scenes are drawn at this size whatever the model input (resized like any image)
MARGIN = 8.0  # px on the canvas: positions/relations need this clear gap to count (see _separated)
SYNTHETIC_SPLITS = {"train": 0, "val": 1, "test": 2}  # split -> seed stream (disjoint streams)
SYNTHETIC_SIZES = {"train": 20000, "val": 500, "test": 500}  # train only defines an epoch length
GSHAPES_MIX = {"single": 0.5, "multi": 0.3, "none": 0.2}  # expression kinds of gshapes

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 200, 35),
    "purple": (135, 60, 180),
    "orange": (230, 130, 25),
}  # every channel in 25..230, so jitter (+-12) and noise (0..12) stay inside 0..255
COLOUR_NAMES = tuple(COLOURS)
SIZES = {"small": (8.0, 10.0), "large": (14.0, 17.0)}  # range of the size parameter s (px)
# Circumradius / s of each shape: the disc that contains it, used to keep objects apart.
EXTENT = {"circle": 1.0, "square": 1.28, "triangle": 1.3, "star": 1.35, "diamond": 1.25,
          "hexagon": 1.1}  # fmt: skip
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}  # synonyms, drawn at random
GENERIC_NOUNS = ("shape", "object")  # the noun when the shape is not named
ORDINALS = {2: "second", 3: "third"}
NUMBERS = {2: "two", 3: "three", 4: "four"}
# "left of": the object's x is smaller than the anchor's x; axis and sign of (object - anchor).
RELATIONS = {"left of": ("x", -1), "right of": ("x", 1), "above": ("y", -1), "below": ("y", 1)}
# Ranking direction: "from the left" counts increasing x, "from the bottom" decreasing y, ...
DIRECTIONS = {"left": ("x", 1), "right": ("x", -1), "top": ("y", 1), "bottom": ("y", -1)}

# The closed vocabulary of the grammar (the offline tokenizers are built from it, no data needed).
VOCAB = tuple(
    sorted(
        {"the", "leftmost", "rightmost", "at", "top", "bottom", "from", "left", "right", "of"}
        | {"above", "below", "all", "every", "except", "one", "and", "a", "ones", "with"}
        | set(ORDINALS.values()) | set(NUMBERS.values()) | set(COLOURS)
        | {w for words in SIZE_WORDS.values() for w in words}
        | {n + s for n in SHAPES + GENERIC_NOUNS for s in ("", "s")}
        | {".", ",", "-", "'"}  # harmless punctuation, so it never becomes an unknown token
    )
)  # fmt: skip

# A description = (size, colour, shape), each None when the expression does not say it.
Desc = tuple


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    x: float  # centre on the canvas (px), x to the right
    y: float  # y downwards (image convention: "top" = small y)
    s: float  # size parameter (px): circle radius, other shapes scaled by it
    polygon: list[float] | None  # flat [x0, y0, x1, y1, ...] on the canvas; None for a circle

    @property
    def attributes(self) -> Desc:
        return (self.size, self.colour, self.shape)


@dataclass
class Scene:
    """One rendered scene with one expression and its structured meaning (for tests and export)."""

    image: Image.Image  # RGB, CANVAS x CANVAS
    labels: np.ndarray  # (CANVAS, CANVAS) uint8: 0 background, i + 1 visible pixels of object i
    objects: list[SceneObject]
    sentence: str
    meaning: tuple  # see `evaluate`
    targets: list[int]  # indices into objects selected by the meaning
    kind: str  # "single" | "multi" | "none"

    def mask(self) -> np.ndarray:
        """(CANVAS, CANVAS) bool: union of the referred objects' visible pixels."""
        selected = np.zeros(256, dtype=bool)  # label value -> referred?
        selected[[t + 1 for t in self.targets]] = True
        return selected[self.labels]


def _polygon(shape: str, x: float, y: float, s: float) -> list[float] | None:
    """Vertices of an upright shape centred at (x, y), flattened; None for a circle (an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.9 * s
        pts = [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    elif shape == "diamond":
        r = 1.25 * s
        pts = [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    elif shape == "triangle":  # equilateral, pointing up, centroid at (x, y)
        r = 1.3 * s
        pts = [
            (x + r * math.sin(a), y - r * math.cos(a))
            for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)
        ]
    elif shape == "hexagon":
        r = 1.1 * s
        pts = [
            (x + r * math.cos(k * math.pi / 3), y + r * math.sin(k * math.pi / 3)) for k in range(6)
        ]
    else:  # five-pointed star: 10 vertices alternating outer and inner radius
        r_out, r_in = 1.35 * s, 0.55 * 1.35 * s
        pts = [
            (x + r * math.sin(k * math.pi / 5), y - r * math.cos(k * math.pi / 5))
            for k, r in zip(range(10), [r_out, r_in] * 5, strict=True)
        ]
    return [round(c, 2) for p in pts for c in p]


def _place_objects(rng: np.random.Generator) -> list[SceneObject]:
    """2-6 objects that never overlap (they may touch: a quarter are placed right next to another).

    No overlap means every object is fully visible, so attributes and positions stay true of what
    is seen; masks still come from a label map (visible pixels), so a shared boundary pixel
    belongs to exactly one object.
    """
    n = int(rng.integers(2, 7))
    # All random numbers of the placement in two draws (one Generator call costs ~1 us).
    looks = rng.random((n, 4)).tolist()  # shape, colour, size class, size within the class
    tries = rng.random((n, 40, 4)).tolist()  # touch?, neighbour or x, angle or y, unused
    objects: list[SceneObject] = []
    for k in range(n):
        shape = SHAPES[int(looks[k][0] * len(SHAPES))]
        colour = COLOUR_NAMES[int(looks[k][1] * len(COLOUR_NAMES))]
        size = "small" if looks[k][2] < 0.5 else "large"
        low, high = SIZES[size]
        s = low + (high - low) * looks[k][3]
        e = EXTENT[shape] * s
        for touch, u, v, _ in tries[k]:
            if objects and touch < 0.25:  # right next to a previous object
                o = objects[int(u * len(objects))]
                d = EXTENT[o.shape] * o.s + e + 1.0
                x, y = o.x + d * math.cos(2 * math.pi * v), o.y + d * math.sin(2 * math.pi * v)
            else:
                x, y = e + 1 + (CANVAS - 2 - 2 * e) * u, e + 1 + (CANVAS - 2 - 2 * e) * v
            inside = e + 1 <= x <= CANVAS - 1 - e and e + 1 <= y <= CANVAS - 1 - e
            if inside and all(
                math.hypot(x - o.x, y - o.y) >= EXTENT[o.shape] * o.s + e + 1.0 for o in objects
            ):
                x, y = round(x, 2), round(y, 2)
                objects.append(SceneObject(shape, colour, size, x, y, s, _polygon(shape, x, y, s)))
                break
    return objects


_YY, _XX = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32)
# A fixed bank of grey pixel noise in 0..12 (RGB, equal channels); each scene adds a random
# window of it (cheaper than fresh noise; the window offset comes from the scene's generator).
# Pixel sums use ImageChops.add_modulo (a fast C loop); the value ranges below never wrap.
_NOISE = Image.merge(
    "RGB",
    [Image.fromarray(np.random.default_rng(2024).integers(0, 13, (2 * CANVAS,) * 2, np.uint8))] * 3,
)


def _render(objects: list[SceneObject], rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """Draw the scene (textured background, flat shapes, light noise) and its label map.

    Image and label map are drawn with the same PIL calls and coordinates, so the masks are
    exactly the drawn pixels.
    """
    # Background: a light, low-saturation colour (138..232) + faint stripes (+-10) at a random
    # angle and period; stored as (base - 10) + (stripes + 10) so both terms are >= 0.
    level = rng.uniform(150, 220)
    base = tuple(int(level + tint) - 10 for tint in rng.uniform(-12, 12, size=3))
    theta, period = rng.uniform(0, math.pi), rng.uniform(6, 20)
    k = 2 * math.pi / period
    phase = _XX * np.float32(k * math.cos(theta)) + _YY * np.float32(k * math.sin(theta))
    stripes = np.sin(phase + np.float32(rng.uniform(0, 6))) * rng.uniform(4, 10)  # (CANVAS, CANVAS)
    grey = Image.fromarray((stripes + 10).astype(np.uint8))  # 0..20
    image = ImageChops.add_modulo(
        Image.merge("RGB", (grey, grey, grey)), Image.new("RGB", (CANVAS, CANVAS), base)
    )
    labels = Image.new("L", (CANVAS, CANVAS), 0)
    draw_image, draw_labels = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    jitter = rng.integers(-12, 13, (len(objects), 3))  # colours vary a little around their RGB
    for i, o in enumerate(objects):
        fill = tuple(int(c + j) for c, j in zip(COLOURS[o.colour], jitter[i], strict=True))
        if o.polygon is None:
            box = [o.x - o.s, o.y - o.s, o.x + o.s, o.y + o.s]
            draw_image.ellipse(box, fill=fill)
            draw_labels.ellipse(box, fill=i + 1)
        else:
            draw_image.polygon(o.polygon, fill=fill)
            draw_labels.polygon(o.polygon, fill=i + 1)
    # Per-pixel grey noise (0..12) over everything: objects are not perfectly flat either.
    ox, oy = (int(v) for v in rng.integers(CANVAS, size=2))
    image = ImageChops.add_modulo(image, _NOISE.crop((ox, oy, ox + CANVAS, oy + CANVAS)))
    return image, np.asarray(labels)


# ---------------------------------------------------------------------------------------------
# Meaning: what an expression selects. The generator builds a meaning, checks it picks out what
# it should (with clear margins), and only then words it. Meanings are tuples:
#   ("the", desc)                      "the large red circle"            objects matching desc
#   ("ordinal", desc, k, direction)    "the leftmost square" (k = 1),    k-th matching object
#                                      "the second circle from the top"  along the direction
#   ("relation", desc, rel, anchor)    "the circle left of the blue square"
#   ("all", desc)                      "all red shapes"
#   ("count", desc, n)                 "the two circles"                 (exactly n match)
#   ("except", desc, excluded)         "every square except the green one"
#   ("and", desc1, desc2)              "the red circle and the blue triangle"
#   ("none", desc)                     "the green circle" (deceptive: nothing matches)


def _matches(objects: list[SceneObject], desc: Desc) -> list[int]:
    size, colour, shape = desc
    return [
        i
        for i, o in enumerate(objects)
        if (size is None or o.size == size)
        and (colour is None or o.colour == colour)
        and (shape is None or o.shape == shape)
    ]


def _coord(o: SceneObject, axis: str) -> float:
    return o.x if axis == "x" else o.y


def _ranked(objects: list[SceneObject], cands: list[int], direction: str) -> list[int]:
    axis, sign = DIRECTIONS[direction]
    return sorted(cands, key=lambda i: sign * _coord(objects[i], axis))


def _related(objects: list[SceneObject], cands: list[int], anchor: int, rel: str) -> list[int]:
    axis, sign = RELATIONS[rel]
    a = _coord(objects[anchor], axis)
    return [c for c in cands if c != anchor and sign * (_coord(objects[c], axis) - a) >= MARGIN]


def evaluate(meaning: tuple, objects: list[SceneObject]) -> list[int]:
    """Indices of the objects a meaning selects (sorted)."""
    op = meaning[0]
    if op in ("the", "all", "none"):
        out = _matches(objects, meaning[1])
    elif op == "ordinal":
        _, desc, k, direction = meaning
        ranked = _ranked(objects, _matches(objects, desc), direction)
        out = ranked[k - 1 : k]
    elif op == "relation":
        _, desc, rel, anchor_desc = meaning
        anchors = _matches(objects, anchor_desc)
        out = (
            _related(objects, _matches(objects, desc), anchors[0], rel) if len(anchors) == 1 else []
        )
    elif op == "count":
        out = _matches(objects, meaning[1])
        out = out if len(out) == meaning[2] else []
    elif op == "except":
        excluded = set(_matches(objects, meaning[2]))
        out = [i for i in _matches(objects, meaning[1]) if i not in excluded]
    elif op == "and":
        out = _matches(objects, meaning[1]) + _matches(objects, meaning[2])
    else:
        raise ValueError(f"unknown meaning {meaning!r}")
    return sorted(set(out))


def _separated(objects: list[SceneObject], cands: list[int], ref: int, axis: str) -> bool:
    """Every other candidate is at least MARGIN away from `ref` along the axis (no near-ties)."""
    r = _coord(objects[ref], axis)
    return all(abs(_coord(objects[c], axis) - r) >= MARGIN for c in cands if c != ref)


def _subsets(o: SceneObject) -> list[Desc]:
    """The 8 partial descriptions of an object (from "shape" to size + colour + shape)."""
    return [
        tuple(v if (m >> j) & 1 else None for j, v in enumerate(o.attributes)) for m in range(8)
    ]


def _descs_of(o: SceneObject, rng: np.random.Generator, shortest_first: bool = False) -> list[Desc]:
    """The 8 partial descriptions of an object in random order (or fewest attributes first).

    In random order the bare "shape" goes last most of the time: "the leftmost red shape" says
    more about the image than "the leftmost shape" and makes a better language exercise.
    """
    subsets = _subsets(o)
    rng.shuffle(subsets)
    if shortest_first:
        return sorted(subsets, key=lambda d: sum(v is not None for v in d))
    if rng.random() < 0.75:
        subsets.remove((None, None, None))
        subsets.append((None, None, None))
    return subsets


def _unique_desc(objects, t, rng, shortest=True) -> Desc | None:
    """An attribute description matching only object t (shortest one, or a random unique one)."""
    unique = [d for d in _descs_of(objects[t], rng, True) if _matches(objects, d) == [t]]
    if not unique:
        return None
    return unique[0] if shortest or rng.random() < 0.6 else unique[rng.integers(len(unique))]


def _gen_attribute(objects, rng):
    for t in rng.permutation(len(objects)):
        desc = _unique_desc(objects, t, rng, shortest=False)
        if desc is not None:
            return ("the", desc)
    return None


def _gen_ordinal(objects, rng, ranks):
    """ "the leftmost X" (ranks (1,)) or "the second X from the top" (ranks (2, 3))."""
    for t in rng.permutation(len(objects)):
        for desc in _descs_of(objects[t], rng):
            cands = _matches(objects, desc)
            if len(cands) < max(2, ranks[-1]):  # the position must be needed to single t out
                continue
            for direction in rng.permutation(list(DIRECTIONS)):
                k = _ranked(objects, cands, direction).index(t) + 1
                if k in ranks and _separated(objects, cands, t, DIRECTIONS[direction][0]):
                    return ("ordinal", desc, k, str(direction))
    return None


def _gen_relation(objects, rng):
    for t in rng.permutation(len(objects)):
        for a in rng.permutation(len(objects)):
            anchor = _unique_desc(objects, a, rng) if a != t else None
            if anchor is None:
                continue
            for desc in _descs_of(objects[t], rng):
                cands = [c for c in _matches(objects, desc) if c != a]
                if len(cands) < 2:  # the relation must be needed to single t out
                    continue
                for rel in rng.permutation(list(RELATIONS)):
                    rel = str(rel)
                    if _separated(objects, cands + [a], a, RELATIONS[rel][0]) and _related(
                        objects, cands, a, rel
                    ) == [t]:
                        return ("relation", desc, rel, anchor)
    return None


def _plural_descs(objects, rng, low, high, allow_empty=False) -> list[Desc]:
    """Descriptions matching between low and high objects (deduplicated, random order)."""
    seen = {d for o in objects for d in _subsets(o) if allow_empty or any(d)}
    out = [d for d in seen if low <= len(_matches(objects, d)) <= high]
    out.sort(key=lambda d: tuple(str(v) for v in d))  # set order is not deterministic: sort first
    rng.shuffle(out)
    return out


def _gen_all(objects, rng):
    descs = _plural_descs(objects, rng, 2, len(objects))
    return ("all", descs[0]) if descs else None


def _gen_count(objects, rng):
    descs = _plural_descs(objects, rng, 2, max(NUMBERS), allow_empty=True)
    return ("count", descs[0], len(_matches(objects, descs[0]))) if descs else None


def _gen_except(objects, rng):
    for desc in _plural_descs(objects, rng, 3, len(objects), allow_empty=True):
        members = _matches(objects, desc)
        # Exclude by one attribute the description leaves open, held by exactly one member.
        for j in rng.permutation(3):
            if desc[j] is not None:
                continue
            values = [objects[m].attributes[j] for m in members]
            single = sorted(v for v in set(values) if values.count(v) == 1)
            if single:
                excluded = [None, None, None]
                excluded[j] = single[rng.integers(len(single))]
                return ("except", desc, tuple(excluded))
    return None


def _gen_and(objects, rng):
    order = rng.permutation(len(objects))
    descs = [(t, _unique_desc(objects, t, rng)) for t in order]
    descs = [(t, d) for t, d in descs if d is not None]
    return ("and", descs[0][1], descs[1][1]) if len(descs) >= 2 else None


def _gen_none(objects, rng):
    """Deceptive no-target: every attribute word occurs in the scene, their combination does not."""
    present = [sorted({o.attributes[j] for o in objects}) for j in range(3)]
    for _ in range(30):
        pattern = [(0, 1, 2), (1, 2), (1, 2), (0, 2), (0, 1)][rng.integers(5)]  # which attributes
        desc = tuple(
            present[j][rng.integers(len(present[j]))] if j in pattern else None for j in range(3)
        )
        if not _matches(objects, desc):
            return ("none", desc)
    return None


SINGLE_GENERATORS = {
    "attribute": (0.3, _gen_attribute),
    "position": (0.25, lambda objects, rng: _gen_ordinal(objects, rng, (1,))),
    "relation": (0.25, _gen_relation),
    "ordinal": (0.2, lambda objects, rng: _gen_ordinal(objects, rng, (2, 3))),
}
MULTI_GENERATORS = {"all": (0.3, _gen_all), "count": (0.25, _gen_count),
                    "except": (0.2, _gen_except), "and": (0.25, _gen_and)}  # fmt: skip


def _generate(objects, rng, generators: dict) -> tuple | None:
    """Try the generators in a random order weighted by their probability; first success wins."""
    names = list(generators)
    p = np.array([generators[n][0] for n in names])
    for name in rng.choice(names, size=len(names), replace=False, p=p / p.sum()):
        meaning = generators[str(name)][1](objects, rng)
        if meaning is not None:
            return meaning
    return None


def _words(desc: Desc, rng: np.random.Generator, plural: bool = False) -> str:
    size, colour, shape = desc
    words = [SIZE_WORDS[size][rng.integers(2)]] if size else []
    words += [colour] if colour else []
    noun = shape or GENERIC_NOUNS[rng.integers(len(GENERIC_NOUNS))]
    return " ".join(words + [noun + "s" if plural else noun])


def say(meaning: tuple, rng: np.random.Generator) -> str:
    """Word a meaning (synonyms drawn from rng)."""
    op = meaning[0]
    if op in ("the", "none"):
        return f"the {_words(meaning[1], rng)}"
    if op == "ordinal":
        _, desc, k, direction = meaning
        if k == 1:
            if direction in ("left", "right"):
                return f"the {direction}most {_words(desc, rng)}"
            return f"the {_words(desc, rng)} at the {direction}"
        return f"the {ORDINALS[k]} {_words(desc, rng)} from the {direction}"
    if op == "relation":
        return f"the {_words(meaning[1], rng)} {meaning[2]} the {_words(meaning[3], rng)}"
    if op == "all":
        return f"all {_words(meaning[1], rng, plural=True)}"
    if op == "count":
        return f"the {NUMBERS[meaning[2]]} {_words(meaning[1], rng, plural=True)}"
    if op == "except":
        size, colour, shape = meaning[2]  # exactly one of them is set
        if shape:
            tail = f"the {shape}"
        else:
            tail = f"the {colour or SIZE_WORDS[size][rng.integers(2)]} one"
        return f"every {_words(meaning[1], rng)} except {tail}"
    if op == "and":
        return f"the {_words(meaning[1], rng)} and the {_words(meaning[2], rng)}"
    raise ValueError(f"unknown meaning {meaning!r}")


def make_scene(
    index: int,
    split: str = "train",
    seed: int = 0,
    generalized: bool = False,
    mix: dict[str, float] | None = None,
) -> Scene:
    """The scene number `index` of a split: a pure function of (seed, split, index).

    generalized=False: one single-target expression (shapes). True: the kind is drawn from `mix`
    (gshapes). Both draw the same random numbers up to the kind, so a single-target gshapes item
    is the shapes item of the same index.
    """
    if split not in SYNTHETIC_SPLITS:
        raise ValueError(f"unknown split '{split}' for the synthetic world; choose from "
                         f"{', '.join(SYNTHETIC_SPLITS)}")  # fmt: skip
    # A per-sample generator: numpy hashes the entropy list (SeedSequence), so (seed, split,
    # index) triples give independent streams and the splits never share a stream.
    rng = np.random.default_rng([seed, SYNTHETIC_SPLITS[split], index])
    u, kind = rng.random(), "single"  # u is drawn either way (see the docstring)
    if generalized:
        mix = mix or GSHAPES_MIX
        if not set(mix) <= set(GSHAPES_MIX):
            raise ValueError(f"unknown expression kinds in mix {mix}; use {', '.join(GSHAPES_MIX)}")
        p = np.cumsum([mix[k] for k in mix]) / sum(mix.values())
        kind = list(mix)[min(int(np.searchsorted(p, u, side="right")), len(mix) - 1)]
    generators = {"single": SINGLE_GENERATORS, "multi": MULTI_GENERATORS}
    while True:  # a scene that cannot carry the drawn kind of expression is redrawn
        objects = _place_objects(rng)
        if len(objects) < 2:
            continue
        if kind == "none":
            meaning = _gen_none(objects, rng)
        else:
            meaning = _generate(objects, rng, generators[kind])
        if meaning is None:
            continue
        targets = evaluate(meaning, objects)
        expected = {"single": len(targets) == 1, "multi": len(targets) >= 2, "none": not targets}
        if not expected[kind]:
            raise RuntimeError(f"grammar bug: {meaning} selects {targets} in {objects}")
        image, labels = _render(objects, rng)
        area = np.bincount(labels.ravel(), minlength=len(objects) + 1)
        if all(area[t + 1] > 0 for t in targets):
            return Scene(image, labels, objects, say(meaning, rng), meaning, targets, kind)


# =============================================================================================
# Tokenizers
# =============================================================================================

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, words from 5
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"  # ids V-2 and V-1, words from 0


def build_tokenizer(family: str, name: str | None = None) -> PreTrainedTokenizerFast:
    """The tokenizer of a text-encoder family.

    name: a Hub id or local directory -> AutoTokenizer.from_pretrained(name) (bert-base-uncased,
    openai/clip-vit-base-patch16, or a saved offline tokenizer). None -> the offline word-level
    tokenizer of the synthetic world's closed vocabulary, with the family's special tokens:
      bert: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, words from 5; "[CLS] w1 .. wn [SEP] [PAD].."
      clip: words from 0, <|startoftext|>=V-2, <|endoftext|>=V-1 = pad = unk = eos (as HF CLIP);
            "<|startoftext|> w1 .. wn <|endoftext|> <|endoftext|>..", so EOS = argmax of the ids.
    Caveat of the CLIP style: an unknown word also maps to <|endoftext|>; the synthetic world has
    none (a test checks it), real text goes through the Hub's BPE tokenizer, which has no unknowns.
    """
    if family not in ("bert", "clip"):
        raise ValueError(f"unknown text-encoder family '{family}'; choose from bert, clip")
    if name is not None:
        if name.startswith((".", "/", "~")):  # clearly a path, not a Hub id
            if not Path(name).expanduser().is_dir():
                raise RuntimeError(f"tokenizer directory '{name}' does not exist")
            name = str(Path(name).expanduser())
        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise RuntimeError(
                f"could not load tokenizer '{name}' from the Hugging Face Hub (no network?). Use "
                f"--preset tiny, or pass a local directory. ({type(e).__name__})"
            ) from None
    if family == "bert":
        vocab = {tok: i for i, tok in enumerate(BERT_SPECIALS + VOCAB)}
        bos, eos, unk = "[CLS]", "[SEP]", "[UNK]"
        specials = dict(unk_token=unk, pad_token="[PAD]", cls_token=bos, sep_token=eos,
                        mask_token="[MASK]")  # fmt: skip
    else:
        vocab = {word: i for i, word in enumerate(VOCAB)}
        vocab[CLIP_BOS], vocab[CLIP_EOS] = len(VOCAB), len(VOCAB) + 1
        bos, eos, unk = CLIP_BOS, CLIP_EOS, CLIP_EOS
        specials = dict(bos_token=bos, eos_token=eos, unk_token=eos, pad_token=eos)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} $B:1 {eos}:1",
        special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **specials)


def encode_text(tokenizer, sentence: str, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids (L,) long, attention_mask (L,) long with L = max_tokens.

    Padded to max_length with the tokenizer's own pad id (CLIP pads with EOS: use the attention
    mask, never `ids == 0`). Truncation cuts words, never the closing [SEP] / <|endoftext|>: the
    fast tokenizers add the special tokens after truncating (unlike LAVT, which truncates after).
    """
    if not sentence or not sentence.strip():
        raise ValueError(f"empty expression {sentence!r}: give a non-empty referring expression")
    enc = tokenizer(sentence.strip(), padding="max_length", truncation=True, max_length=max_tokens,
                    return_token_type_ids=False)  # fmt: skip
    return (torch.tensor(enc["input_ids"], dtype=torch.long),
            torch.tensor(enc["attention_mask"], dtype=torch.long))  # fmt: skip


# =============================================================================================
# Transforms and collate
# =============================================================================================

MEAN_STD = {
    "bert": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet (Swin backbones)
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),  # CLIP
}


_SCALE_SHIFT = {
    family: (
        1 / (255 * np.array(std, np.float32)),
        -np.array(mean, np.float32) / np.array(std, np.float32),
    )
    for family, (mean, std) in MEAN_STD.items()
}


def prepare_image(image: Image.Image, image_size: int, family: str) -> torch.Tensor:
    """PIL image -> (3, image_size, image_size) float, square bilinear resize, normalised."""
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    scale, shift = _SCALE_SHIFT[family]  # (x / 255 - mean) / std = x * scale + shift
    x = np.asarray(image, dtype=np.float32) * scale + shift  # (H, W, 3)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())  # (3, H, W)


def prepare_mask(mask: np.ndarray, image_size: int) -> torch.Tensor:
    """(h, w) bool/{0,1} -> (image_size, image_size) float {0, 1}, nearest-neighbour resize."""
    m = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    if m.size != (image_size, image_size):
        m = m.resize((image_size, image_size), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(m) > 127).float()


def denormalize(image: torch.Tensor, family: str) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) uint8 for plotting."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in MEAN_STD[family])
    x = image.detach().float().cpu() * std + mean  # (3, H, W) in [0, 1]
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


_LEFT_RIGHT = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}


def flip_sentence(sentence: str) -> str:
    """Swap left/right words (and leftmost/rightmost), for a horizontally flipped image."""

    def swap(m: re.Match) -> str:
        word = _LEFT_RIGHT[m.group(0).lower()]
        return word.capitalize() if m.group(0)[0].isupper() else word

    return re.sub(r"\b(left|right|leftmost|rightmost)\b", swap, sentence, flags=re.IGNORECASE)


def collate(batch: list[dict]) -> dict:
    """Stack tensors; no_target -> (B,) bool tensor; strings and ids stay lists."""
    return {
        "image": torch.stack([b["image"] for b in batch]),  # (B, 3, H, W)
        "mask": torch.stack([b["mask"] for b in batch]),  # (B, H, W)
        "input_ids": torch.stack([b["input_ids"] for b in batch]),  # (B, L)
        "attention_mask": torch.stack([b["attention_mask"] for b in batch]),  # (B, L)
        "no_target": torch.tensor([b["no_target"] for b in batch], dtype=torch.bool),  # (B,)
        "sentence": [b["sentence"] for b in batch],
        "ref_id": [b["ref_id"] for b in batch],
        "image_id": [b["image_id"] for b in batch],
    }


class _RISDataset(Dataset):
    """Shared item assembly: transforms, optional flip, tokenisation."""

    def __init__(self, *, tokenizer, family: str, image_size: int, max_tokens: int, augment: bool):
        if family not in MEAN_STD:
            raise ValueError(f"unknown family '{family}'; choose from {', '.join(MEAN_STD)}")
        self.tokenizer, self.family = tokenizer, family
        self.image_size, self.max_tokens, self.augment = image_size, max_tokens, augment
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _encode(self, sentence: str) -> tuple[torch.Tensor, torch.Tensor]:
        """encode_text, memoised when a cache is on (the synthetic world repeats its sentences)."""
        if self._text_cache is None:
            return encode_text(self.tokenizer, sentence, self.max_tokens)
        hit = self._text_cache.get(sentence)
        if hit is None:
            if len(self._text_cache) >= 50_000:  # bounded: a few MB at most
                self._text_cache.clear()
            hit = self._text_cache[sentence] = encode_text(
                self.tokenizer, sentence, self.max_tokens
            )
        return hit[0].clone(), hit[1].clone()

    def _item(self, image, mask, sentence, no_target, ref_id, image_id) -> dict:
        if self.augment and torch.rand(()) < 0.5:  # torch RNG: DataLoader workers seed it
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            mask = mask[:, ::-1]
            sentence = flip_sentence(sentence)
        input_ids, attention_mask = self._encode(sentence)
        return {
            "image": prepare_image(image, self.image_size, self.family),
            "mask": prepare_mask(mask, self.image_size),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "no_target": bool(no_target),
            "sentence": sentence,
            "ref_id": int(ref_id),
            "image_id": int(image_id),
        }


class SyntheticRefDataset(_RISDataset):
    """shapes (generalized=False) / gshapes (generalized=True), generated on the fly.

    Item i is `make_scene(i, split, seed, generalized)` (pure function: no files, no state), so
    workers need no coordination. ref_id = image_id = index (one expression per scene).
    """

    def __init__(self, split, *, generalized=False, num_samples=None, seed=0, mix=None, **kw):
        super().__init__(**kw)
        if split not in SYNTHETIC_SPLITS:
            raise ValueError(f"unknown split '{split}' for the synthetic world; choose from "
                             f"{', '.join(SYNTHETIC_SPLITS)}")  # fmt: skip
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.split, self.generalized, self.seed, self.mix = split, generalized, seed, mix
        self._text_cache = {}  # a few thousand distinct sentences per split
        self.num_samples = SYNTHETIC_SIZES[split] if num_samples is None else num_samples

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> Scene:
        """The full scene of item `index`: objects, label map, expression, meaning, targets."""
        return make_scene(index, self.split, self.seed, self.generalized, self.mix)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        scene = self.scene(index)
        return self._item(scene.image, scene.mask(), scene.sentence, scene.kind == "none",
                          index, index)  # fmt: skip


# =============================================================================================
# Real datasets: RefCOCO / RefCOCO+ / RefCOCOg (refer API) and gRefCOCO
# =============================================================================================

DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "grefcoco": "unc"}


def layout(name: str, split_by: str) -> str:
    """One-line description of the expected files of a real dataset."""
    refs = f"grefs({split_by}).json" if name == "grefcoco" else f"refs({split_by}).p"
    return (f"expected <root>/{name}/{refs} + <root>/{name}/instances.json and images in "
            f"<root>/images/train2014/ (see the README's 'Real data' section)")  # fmt: skip


class RestrictedUnpickler(pickle.Unpickler):
    """Loads only what pickle builds without importing: lists, dicts, tuples, str, numbers, ...

    A refs file needs nothing else; anything that asks for a global (os.system, a class, a
    function) is refused, so a downloaded refs(*).p cannot run code.
    """

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"refusing to load global '{module}.{name}': a refs file may only contain plain "
            "lists, dicts, strings and numbers"
        )


def _decode_bytes(obj):
    """Python-2 pickles store str as bytes (loaded with encoding='bytes'): decode them."""
    if isinstance(obj, bytes):
        try:
            return obj.decode("utf-8")
        except UnicodeDecodeError:
            return obj.decode("latin1")
    if isinstance(obj, list):
        return [_decode_bytes(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_decode_bytes(v) for v in obj)
    if isinstance(obj, dict):
        return {_decode_bytes(k): _decode_bytes(v) for k, v in obj.items()}
    return obj


INSTANCES_FORMAT = "a COCO instances JSON object with 'images' and 'annotations' lists"
REF_KEYS = ("ref_id", "image_id", "ann_id", "split", "sentences")  # what the loader reads of a ref
REFS_FORMAT = {
    ".p": "a pickled list of ref dicts (refer API, keys " + ", ".join(REF_KEYS) + ")",
    ".json": "a JSON list of ref dicts (gRefCOCO, keys " + ", ".join(REF_KEYS) + ")",
}


def _check_refs(refs, path: Path, keys: tuple[str, ...] = REF_KEYS) -> list[dict]:
    """refs must be a list of dicts that have `keys`; anything else is a one-line ValueError."""
    expected = REFS_FORMAT[path.suffix]
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        got = type(refs).__name__
        if isinstance(refs, list):
            got = (
                "a list holding " + type(next(r for r in refs if not isinstance(r, dict))).__name__
            )
        raise ValueError(f"{path}: expected {expected}, got {got}")
    for r in refs:
        missing = [k for k in keys if k not in r]
        if missing:
            raise ValueError(f"{path}: expected {expected}; a ref lacks '{missing[0]}'")
    return refs


# What the unpickler raises on data cut short or garbled (besides UnpicklingError); a garbled
# length or memo index can ask for gigabytes, hence MemoryError.
_PICKLE_DAMAGE = (EOFError, ValueError, IndexError, KeyError, TypeError, AttributeError,
                  OverflowError, MemoryError)  # fmt: skip


def load_refs_pickle(path: str | Path) -> list[dict]:
    """Read a refer-API refs(*).p (Python 2 or 3 pickle) with the restricted unpickler.

    Anything that is not such a pickle (JSON, a truncated download, a pickle asking for a
    global) raises a one-line ValueError naming the file and the format expected.
    """
    path = Path(path)
    expected = REFS_FORMAT[".p"]
    payload = path.read_bytes()  # from memory: a garbled length cannot make it read past the end
    try:
        refs = RestrictedUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        reason = " ".join(str(e).split())  # one line
        if reason.startswith("refusing"):
            raise ValueError(f"{path}: {reason}") from None
        looks = " (it looks like JSON)" if payload[:1] in (b"[", b"{") else ""
        raise ValueError(f"{path}: not a pickle{looks}: {reason}; expected {expected}") from None
    except _PICKLE_DAMAGE as e:
        reason = f"{type(e).__name__}: {' '.join(str(e).split())}"
        raise ValueError(
            f"{path}: truncated or corrupt pickle ({reason}); expected {expected}"
        ) from None
    return _check_refs(_decode_bytes(refs), path, keys=())


def load_json(path: Path, what: str):
    """json.load with a one-line ValueError naming the file and the format expected."""
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({str(e).splitlines()[0]}); expected {what}"
                         ) from None  # fmt: skip


# ---- masks: polygons and COCO RLE ------------------------------------------------------------


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Union of polygon parts (flat [x0, y0, x1, y1, ...] lists) -> (h, w) bool, pixel for pixel
    what pycocotools gives (`decode(merge(frPyObjects(parts, h, w)))`, the official masks).

    Parts of fewer than 3 points are skipped with a warning (detectron2's rule): pycocotools draws
    nothing for them, or fails when such a part comes first (it reads 4 numbers as a box)."""
    flat = np.zeros(width * height, dtype=bool)  # the mask column by column (column-major)
    for poly in polygons:
        if len(poly) < 6 or len(poly) % 2:  # fewer than 3 points (or a dangling coordinate)
            warnings.warn(f"skipping an invalid polygon with {len(poly)} coordinates", stacklevel=2)
            continue
        ends = _polygon_run_ends(poly, height, width)  # pixel indices where inside <-> outside
        if len(ends) % 2:  # inside up to the last pixel
            ends = np.append(ends, width * height)
        if len(ends):  # runs inside, outside, inside, ... between the first and the last end
            inside = np.repeat(np.arange(len(ends) - 1) % 2 == 0, np.diff(ends))
            flat[ends[0] : ends[-1]] |= inside
    return flat.reshape(width, height).T  # (h, w)


_INT_MIN = -(2**31)  # what x86 gives for C's (int)NaN


def _polygon_run_ends(poly: list[float], height: int, width: int) -> np.ndarray:
    """One polygon -> the sorted column-major pixel indices where its mask flips between outside
    and inside (the run ends of its RLE, from the top left pixel, outside first), by pycocotools'
    rule (maskApi.c rleFrPoly), vectorised.

    The outline is drawn on a 5x finer grid (vertices rounded there), every step of it that
    crosses a pixel-centre column is kept as a "boundary" at the first pixel centre below it, and
    pixels flip inside/outside at each boundary, going down each column (column-major, as RLE).
    C's float->int casts truncate toward zero (not floor), which we keep: it is what shifts
    off-image vertices by one fine step. Every float operation is done in C's order, in float64.
    """
    h, w, scale = int(height), int(width), 5.0
    xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)  # (k, 2)
    x0 = np.trunc(scale * xy[:, 0] + 0.5).astype(np.int64)  # vertices on the fine grid, (k,)
    y0 = np.trunc(scale * xy[:, 1] + 0.5).astype(np.int64)
    # Edges j -> j+1 (closed); each is walked along its major axis, one fine step at a time,
    # from its lower end (swapped when "flip") but emitted from vertex j to vertex j+1.
    xs, xe, ys, ye = x0, np.roll(x0, -1), y0, np.roll(y0, -1)  # (k,) each
    dx, dy = np.abs(xe - xs), np.abs(ys - ye)
    major_x = dx >= dy
    flip = (major_x & (xs > xe)) | (~major_x & (ys > ye))
    xs, xe = np.where(flip, xe, xs), np.where(flip, xs, xe)
    ys, ye = np.where(flip, ye, ys), np.where(flip, ys, ye)
    length = np.where(major_x, dx, dy)  # fine steps of the edge; it emits length + 1 points
    with np.errstate(divide="ignore", invalid="ignore"):  # a repeated vertex: 0 / 0 = NaN
        slope = np.where(major_x, (ye - ys) / dx, (xe - xs) / dy)  # (k,) float64
    # The m outline points, edge after edge: t = fine steps from the edge's lower end, counted
    # down from `length` on a flipped edge, so the points run from vertex j to vertex j+1.
    n = length + 1  # points per edge
    start = np.cumsum(n) - n  # index of each edge's first point
    t = np.abs(np.repeat(np.where(flip, length, 0) + start, n) - np.arange(n.sum()))  # (m,)
    # The major coordinate is exact; the minor one is (int)(start + slope * t + .5), as in C.
    along = np.trunc(np.repeat(np.where(major_x, ys, xs), n) + np.repeat(slope, n) * t + 0.5)
    if ((dx == 0) & (dy == 0)).any():
        along[np.isnan(along)] = _INT_MIN
    along = along.astype(np.int64)  # (m,)
    exact = t + np.repeat(np.where(major_x, xs, ys), n)  # (m,)
    on_x = np.repeat(major_x, n)
    u, v = np.where(on_x, exact, along), np.where(on_x, along, exact)  # (m,) fine x, fine y
    # Steps that change the fine column: boundary at column xd if it is a pixel centre inside
    # the image, at row ceil(yd), yd = the step's upper fine y mapped back to pixels.
    step = np.flatnonzero(u[1:] != u[:-1]) + 1  # index j of the step (j - 1 -> j)
    uj, uprev, vj, vprev = u[step], u[step - 1], v[step], v[step - 1]
    xd = (np.where(uj < uprev, uj, uj - 1).astype(np.float64) + 0.5) / scale - 0.5
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= w - 1)
    yd = (np.minimum(vj, vprev)[keep].astype(np.float64) + 0.5) / scale - 0.5
    yd = np.ceil(np.clip(yd, 0, h))
    flips = xd[keep].astype(np.int64) * h + yd.astype(np.int64)  # column-major pixel index
    # The boundaries are the RLE's run ends: the pixels flip inside/outside at each of them, in
    # column-major order, so two at one pixel cancel (rleFrPoly merges their zero-length run).
    at, times = np.unique(flips, return_counts=True)
    return at[(times % 2 == 1) & (at < h * w)]


def rle_string_to_counts(s: str | bytes) -> list[int]:
    """COCO compressed RLE -> run lengths (maskApi.c rleFrString).

    Each count is written in 5-bit groups as chars offset by 48, bit 0x20 = "more groups follow",
    0x10 of the last group = sign; from the third count on, the value stored is the difference to
    the count two places earlier.
    """
    data = s.encode() if isinstance(s, str) else s
    counts: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)  # sign-extend
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def counts_to_rle_string(counts: list[int]) -> str:
    """Run lengths -> COCO compressed RLE string (maskApi.c rleToString); inverse of the above."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift, as in C on a signed long
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def rle_to_mask(rle: dict) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed list counts) -> (h, w) bool.

    Runs alternate background / foreground starting with background, over the pixels in
    column-major (Fortran) order.
    """
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    counts = rle_string_to_counts(counts) if isinstance(counts, (str, bytes)) else list(counts)
    if sum(counts) != h * w:
        raise ValueError(f"RLE counts sum to {sum(counts)}, expected {h}*{w} = {h * w}")
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)  # (h*w,) column-major
    return flat.reshape((h, w), order="F")


def mask_to_rle(mask: np.ndarray) -> dict:
    """(h, w) bool -> COCO compressed RLE {"size": [h, w], "counts": str}."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0]:  # counts start with a background run, possibly empty
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts_to_rle_string(counts)}


def segmentation_to_mask(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO `segmentation` (polygon list, RLE dict, or list of RLE dicts) -> (h, w) bool."""
    if isinstance(segmentation, dict):
        mask = rle_to_mask(segmentation)
    elif segmentation and all(isinstance(p, dict) for p in segmentation):
        mask = np.zeros((height, width), dtype=bool)
        for rle in segmentation:
            mask |= rle_to_mask(rle)
    else:
        return polygons_to_mask(segmentation or [], height, width)
    if mask.shape != (height, width):
        warnings.warn(
            f"RLE of size {mask.shape} on a {height}x{width} image: resized", stacklevel=2
        )
        mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
    return mask


# ---- the dataset -----------------------------------------------------------------------------


def _require(path: Path, name: str, split_by: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"missing {path}: {layout(name, split_by)}")
    return path


class ReferDataset(_RISDataset):
    """RefCOCO / RefCOCO+ / RefCOCOg (refs(*).p) and gRefCOCO (grefs(unc).json), one item per
    sentence, in the order of the refs file. Splits are the file's `split` strings, exactly
    (refcoco/+ unc: train val testA testB; refcocog umd: train val test; google: train val)."""

    def __init__(self, name, split, *, root, split_by=None, num_samples=None, **kw):
        super().__init__(**kw)
        split_by = split_by or DEFAULT_SPLIT_BY[name]
        root = Path(root)
        folder = root / name
        if name == "grefcoco":
            refs_path = _require(folder / f"grefs({split_by}).json", name, split_by)
            refs = _check_refs(load_json(refs_path, REFS_FORMAT[".json"]), refs_path)
        else:
            refs_path = _require(folder / f"refs({split_by}).p", name, split_by)
            refs = _check_refs(load_refs_pickle(refs_path), refs_path)
        instances_path = _require(folder / "instances.json", name, split_by)
        instances = load_json(instances_path, INSTANCES_FORMAT)
        if not isinstance(instances, dict) or not all(
            isinstance(instances.get(k), list) for k in ("images", "annotations")
        ):
            raise ValueError(f"{instances_path}: expected {INSTANCES_FORMAT}")
        self.image_dir = root / "images" / "train2014"
        if not self.image_dir.is_dir() and (root / "images/mscoco/images/train2014").is_dir():
            self.image_dir = root / "images/mscoco/images/train2014"  # refer's original layout
        _require(self.image_dir, name, split_by)

        chosen = [r for r in refs if r.get("split") == split]
        if not chosen:
            found = sorted({str(r.get("split")) for r in refs})
            raise ValueError(
                f"no refs with split '{split}' in {refs_path}; it has {', '.join(found)}"
            )
        images = {img["id"]: img for img in instances["images"]}
        anns = {ann["id"]: ann for ann in instances["annotations"]}
        sentence_keys = ("raw", "sent") if self.family == "bert" else ("sent", "raw")

        # samples: (ref_id, image_id, ann ids (empty = no target), sentence)
        self.samples: list[tuple[int, int, tuple[int, ...], str]] = []
        self.anns: dict[int, dict] = {}
        self.images: dict[int, dict] = {}
        skipped = 0
        for ref in chosen:
            ann_ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
            ann_ids = tuple(int(a) for a in ann_ids if int(a) != -1)  # gRefCOCO: [-1] = no target
            for a in ann_ids:
                if a not in anns:
                    raise ValueError(f"ref {ref['ref_id']} in {refs_path} points at annotation "
                                     f"{a}, absent from {folder / 'instances.json'}")  # fmt: skip
                self.anns[a] = anns[a]
            if ref["image_id"] not in images:
                raise ValueError(f"image {ref['image_id']} of ref {ref['ref_id']} is absent from "
                                 f"{folder / 'instances.json'}")  # fmt: skip
            self.images[ref["image_id"]] = images[ref["image_id"]]
            for sent in ref.get("sentences") or []:
                text = next((sent[k] for k in sentence_keys if (sent.get(k) or "").strip()), "")
                if text:  # an empty sentence cannot be a sample
                    self.samples.append((int(ref["ref_id"]), int(ref["image_id"]), ann_ids, text))
                else:
                    skipped += 1
        if skipped:
            warnings.warn(f"{refs_path}: skipped {skipped} empty sentence(s) of split '{split}'",
                          stacklevel=2)  # fmt: skip
        if num_samples is not None:
            self.samples = self.samples[:num_samples]
        if self.samples:
            _require(self._image_path(self.samples[0][1]), name, split_by)
        self._bad_images: set[int] = set()  # image ids that failed to decode (per process)

    def _image_path(self, image_id: int) -> Path:
        return self.image_dir / self.images[image_id]["file_name"]

    def __len__(self) -> int:
        return len(self.samples)

    def mask(self, index: int, height: int, width: int) -> np.ndarray:
        """(h, w) bool: union of the referred instances (all False for a no-target sample)."""
        mask = np.zeros((height, width), dtype=bool)
        for a in self.samples[index][2]:
            mask |= segmentation_to_mask(self.anns[a]["segmentation"], height, width)
        return mask

    def _load_image(self, image_id: int) -> Image.Image | None:
        """The RGB image, or None (after one warning per file) when it cannot be decoded."""
        if image_id in self._bad_images:
            return None
        path = self._image_path(image_id)
        if not path.exists():  # a missing file is a layout problem, not a bad file: stop
            raise FileNotFoundError(f"missing image {path} (image_id {image_id})")
        try:
            with Image.open(path) as image:
                return image.convert("RGB")  # decodes everything: a truncated file fails here
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            # PIL.UnidentifiedImageError and "image file is truncated" are OSErrors
            self._bad_images.add(image_id)
            reason = " ".join(str(e).split())  # one line
            warnings.warn(f"skipping {path}: cannot decode the image ({reason}); its samples are "
                          "replaced by the next sample whose image decodes",
                          stacklevel=3)  # fmt: skip
            return None

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(index)
        for offset in range(n):  # a bad image: the next sample with a good one, deterministically
            i = (index + offset) % n
            ref_id, image_id, ann_ids, sentence = self.samples[i]
            image = self._load_image(image_id)
            if image is not None:
                mask = self.mask(i, image.height, image.width)
                return self._item(image, mask, sentence, not ann_ids, ref_id, image_id)
        raise ValueError(f"none of the {len(self._bad_images)} images of this split under "
                         f"{self.image_dir} can be decoded")  # fmt: skip


# =============================================================================================
# The one entry point
# =============================================================================================


def build_dataset(
    name: str,
    split: str,
    *,
    tokenizer,
    family: str,
    image_size: int,
    max_tokens: int,
    root: str | Path | None = None,
    split_by: str | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    augment: bool = False,
) -> Dataset:
    """A dataset of `DATASETS` whose items follow the data contract (module docstring).

    shapes / gshapes: splits train / val / test (default sizes 20000 / 500 / 500, num_samples
    overrides; `seed` picks the world; root and split_by are ignored).
    Real datasets: files under root (default ./data), split_by default unc (refcocog: umd);
    num_samples keeps the first N expressions.
    """
    kw = dict(tokenizer=tokenizer, family=family, image_size=image_size, max_tokens=max_tokens,
              augment=augment)  # fmt: skip
    if name in ("shapes", "gshapes"):
        return SyntheticRefDataset(split, generalized=name == "gshapes", num_samples=num_samples,
                                   seed=seed, **kw)  # fmt: skip
    if name in DEFAULT_SPLIT_BY:
        return ReferDataset(name, split, root=root or "data", split_by=split_by,
                            num_samples=num_samples, **kw)  # fmt: skip
    raise ValueError(f"unknown dataset '{name}'; choose from {', '.join(DATASETS)}")


# =============================================================================================
# Command line: export the synthetic world to the refer-API format, preview it
# =============================================================================================


def _outline(mask: np.ndarray) -> list[float] | None:
    """The pixel-edge outline of a mask whose rows are each one run of pixels (convex shapes):
    down the right edges, up the left edges, as a flat polygon; None when a row is not one run.
    Pixel (y, x) is the unit square [x, x + 1) x [y, y + 1), as the COCO rasteriser reads it."""
    rows = np.flatnonzero(mask.any(1))
    if len(rows) == 0 or rows[-1] - rows[0] + 1 != len(rows):
        return None
    x0 = mask[rows].argmax(1)
    x1 = mask.shape[1] - mask[rows, ::-1].argmax(1)  # one past the run's last pixel
    if (mask[rows].sum(1) != x1 - x0).any():
        return None
    ys = rows.tolist()
    right = [(x, y + dy) for x, y in zip(x1.tolist(), ys, strict=True) for dy in (0, 1)]
    left = [(x, y + dy) for x, y in zip(x0.tolist(), ys, strict=True) for dy in (0, 1)][::-1]
    return [float(c) for point in right + left for c in point]


def _annotation(scene: Scene, k: int, ann_id: int, image_id: int) -> dict:
    """COCO annotation of object k: for a polygon shape, the polygon of its visible pixels'
    outline when it reproduces them exactly (the scene is drawn by PIL, whose polygon fill is
    not COCO's, so the shape's own vertices would not); otherwise (circles, stars, a boundary
    pixel taken by a touching neighbour) compressed RLE."""
    o, visible = scene.objects[k], scene.labels == k + 1
    segmentation = mask_to_rle(visible)
    outline = _outline(visible) if o.polygon is not None else None
    if outline is not None and np.array_equal(polygons_to_mask([outline], CANVAS, CANVAS), visible):
        segmentation = [outline]
    ys, xs = np.nonzero(visible)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": SHAPES.index(o.shape) + 1,
        "segmentation": segmentation,
        "area": int(visible.sum()),
        "bbox": [
            int(xs.min()),
            int(ys.min()),
            int(xs.max() - xs.min() + 1),
            int(ys.max() - ys.min() + 1),
        ],
        "iscrowd": 0,
    }


def export_synthetic(name: str, out_dir: str | Path, splits=("val",), num=None, seed=0) -> Path:
    """Write shapes (refcoco/refs(unc).p) or gshapes (grefcoco/grefs(unc).json) + instances.json +
    images/train2014/*.png under out_dir. PNG keeps the pixels, so masks stay exact. Returns the
    refs file. Ids: image_id = ref_id = sent_id = 1 + 10^7 * split_code + index, ann_id =
    10 * image_id + object index."""
    generalized = name == "gshapes"
    out_dir = Path(out_dir)
    folder = out_dir / ("grefcoco" if generalized else "refcoco")
    image_dir = out_dir / "images" / "train2014"
    folder.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, refs = [], [], []
    for split in splits:
        n = SYNTHETIC_SIZES[split] if num is None else num
        for index in range(n):
            scene = make_scene(index, split, seed, generalized)
            image_id = 1 + 10**7 * SYNTHETIC_SPLITS[split] + index
            file_name = f"{name}_{split}_{index:06d}.png"
            scene.image.save(image_dir / file_name)
            images.append(
                {"id": image_id, "file_name": file_name, "height": CANVAS, "width": CANVAS}
            )
            ann_ids = [10 * image_id + k for k in range(len(scene.objects))]
            annotations += [_annotation(scene, k, a, image_id) for k, a in enumerate(ann_ids)]
            targets = [ann_ids[t] for t in scene.targets]
            categories = [SHAPES.index(scene.objects[t].shape) + 1 for t in scene.targets]
            sentence = {"tokens": scene.sentence.split(), "raw": scene.sentence,
                        "sent": scene.sentence, "sent_id": image_id}  # fmt: skip
            ref = {"ref_id": image_id, "image_id": image_id, "split": split, "file_name": file_name,
                   "sent_ids": [image_id], "sentences": [sentence]}  # fmt: skip
            if generalized:  # gRefCOCO: lists, [-1] for no target
                ref.update(ann_id=targets or [-1], category_id=categories or [-1])
            else:
                ref.update(ann_id=targets[0], category_id=categories[0])
            refs.append(ref)
    instances = {
        "info": {"description": f"synthetic {name} world exported by data.py (seed {seed})"},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)
        ],
        "licenses": [],
    }
    (folder / "instances.json").write_text(json.dumps(instances))
    if generalized:
        refs_path = folder / "grefs(unc).json"
        refs_path.write_text(json.dumps(refs))
    else:
        refs_path = folder / "refs(unc).p"
        with open(refs_path, "wb") as f:
            pickle.dump(refs, f)
    return refs_path


def preview(path: str | Path, seed: int = 0) -> None:
    """A grid of 8 val examples: shapes (attribute, position, relation, ordinal) and gshapes
    (count, all, except, no-target). The referred objects keep their colours and get an
    outline; everything else is dimmed."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def form(scene: Scene) -> str:
        op = scene.meaning[0]
        return "ordinal1" if op == "ordinal" and scene.meaning[2] == 1 else op

    examples, used = [], set()
    for name, forms in [("shapes", ["the", "ordinal1", "relation", "ordinal"]),
                        ("gshapes", ["count", "all", "except", "none"])]:  # fmt: skip
        index = 0
        while forms:
            scene = make_scene(index, "val", seed, generalized=name == "gshapes")
            if form(scene) in forms and scene.image.tobytes() not in used:
                forms.remove(form(scene))
                used.add(scene.image.tobytes())
                examples.append((name, scene))
            index += 1
    fig, axes = plt.subplots(2, 4, figsize=(12, 6.8))
    for ax, (name, scene) in zip(axes.ravel(), examples, strict=True):
        pixels = np.asarray(scene.image, dtype=np.float32)
        mask = scene.mask()
        if mask.any():
            pixels[~mask] = 0.35 * pixels[~mask] + 0.65 * 255  # fade what is not referred
        ax.imshow(pixels.astype(np.uint8))
        if mask.any():
            ax.contour(mask, levels=[0.5], colors="black", linewidths=1.2)
        note = {"single": "", "multi": f" [{len(scene.targets)} targets]", "none": " [no target]"}
        title = f'{name}: "{scene.sentence}"{note[scene.kind]}'
        ax.set_title("\n".join(textwrap.wrap(title, 38)), fontsize=9)
        ax.axis("off")
    fig.suptitle(f"The synthetic world ({CANVAS} px canvas, val split): referred objects outlined, "
                 "the rest faded", fontsize=11)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write shapes/gshapes in the refer-API / gRefCOCO format")
    ex.add_argument("dataset", choices=("shapes", "gshapes"))
    ex.add_argument("out_dir")
    splits_help = "comma-separated, e.g. train,val,test (one run writes all the files)"
    ex.add_argument("--split", default="val", help=splits_help)
    ex.add_argument("--num", type=int, default=None, help="scenes per split (default: split size)")
    ex.add_argument("--seed", type=int, default=0)
    pv = sub.add_parser("preview", help="draw a grid of examples to a PNG")
    pv.add_argument("png")
    pv.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "export":
        splits = [s for s in args.split.split(",") if s]
        unknown = [s for s in splits if s not in SYNTHETIC_SPLITS]
        if unknown:
            sys.exit(
                f"error: unknown split '{unknown[0]}'; choose from {', '.join(SYNTHETIC_SPLITS)}"
            )
        path = export_synthetic(args.dataset, args.out_dir, splits, args.num, args.seed)
        print(f"wrote {path} (+ instances.json, images under {Path(args.out_dir) / 'images'})")
    else:
        preview(args.png, args.seed)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
