"""data.py: real-format loaders on hand-written fixtures, export round trip, the synthetic world's
invariants (re-checked by an independent parser of the expressions), tokenizers, transforms."""

import io
import json
import os
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask  # the oracle (requirements.txt, tests section)

import data

TINY = dict(image_size=16, max_tokens=12)
# pycocotools' decode trips numpy 2's copy-keyword deprecation inside its own code
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def bert_tok():
    return data.build_tokenizer("bert", None)


@pytest.fixture(scope="module")
def clip_tok():
    return data.build_tokenizer("clip", None)


def write_png(path, height, width, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def rect(x0, y0, x1, y1):
    """Polygon of an axis-aligned rectangle with integer corners; pycocotools (and so data.py)
    fills the pixels whose centres it covers, half-open: [y0:y1, x0:x1]."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


# A compressed COCO RLE produced by pycocotools.mask.encode (an external reference) for this mask:
PYCOCO_MASK = np.zeros((6, 5), dtype=bool)
PYCOCO_MASK[1:4, 1:3] = True
PYCOCO_MASK[5, 4] = PYCOCO_MASK[0, 4] = True
PYCOCO_RLE = {"size": [6, 5], "counts": "73305NL0"}


# ---------------------------------------------------------------------------------------------
# Fixtures in the real formats, written by hand


@pytest.fixture
def refcoco_root(tmp_path):
    """refcoco/refs(unc).p + instances.json + images/train2014: a two-part polygon object (the
    parts overlap, plus an invalid 2-point part), a compressed-RLE crowd annotation, an
    uncompressed RLE, and refs over train / val / testA."""
    write_png(tmp_path / "images/train2014/a.png", 10, 12)  # h 10, w 12
    write_png(tmp_path / "images/train2014/b.png", 6, 5, seed=1)  # h 6, w 5
    uncompressed = np.zeros((10, 12), dtype=bool)
    uncompressed[7:9, 0:3] = True
    flat = uncompressed.ravel(order="F")  # runs over column-major pixels, starting with zeros
    edges = np.flatnonzero(np.diff(flat.astype(int))) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    instances = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 10, "width": 12},
            {"id": 2, "file_name": "b.png", "height": 6, "width": 5},
        ],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "segmentation": [rect(1, 1, 4, 3), rect(3, 2, 6, 5), [9, 9, 10, 9]]},
            {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "segmentation": {"size": [10, 12], "counts": counts}},
            {"id": 21, "image_id": 2, "category_id": 2, "iscrowd": 1, "segmentation": PYCOCO_RLE},
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }  # fmt: skip
    refs = [
        {"ref_id": 5, "ann_id": 11, "image_id": 1, "split": "train", "category_id": 1,
         "sentences": [{"raw": "The LEFT thing.", "sent": "the left thing", "sent_id": 1},
                       {"raw": "object on top", "sent": "object on top", "sent_id": 2}]},
        {"ref_id": 6, "ann_id": 12, "image_id": 1, "split": "val", "category_id": 1,
         "sentences": [{"raw": "bottom left", "sent": "bottom left", "sent_id": 3}]},
        {"ref_id": 7, "ann_id": 21, "image_id": 2, "split": "val", "category_id": 2,
         "sentences": [{"raw": "the crowd", "sent": "the crowd", "sent_id": 4},
                       {"raw": "   ", "sent": "", "sent_id": 5}]},  # empty: skipped
        {"ref_id": 8, "ann_id": 21, "image_id": 2, "split": "testA", "category_id": 2,
         "sentences": [{"raw": "x", "sent": "x", "sent_id": 6}]},
    ]  # fmt: skip
    (tmp_path / "refcoco").mkdir()
    (tmp_path / "refcoco/instances.json").write_text(json.dumps(instances))
    with open(tmp_path / "refcoco/refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    expected = {
        11: np.zeros((10, 12), dtype=bool),
        12: uncompressed,
        21: PYCOCO_MASK,
    }
    expected[11][1:3, 1:4] = True  # rect(1, 1, 4, 3)
    expected[11][2:5, 3:6] = True  # rect(3, 2, 6, 5): the overlap stays foreground (union)
    return tmp_path, expected


def build(name, split, root, tok, family="bert", **kw):
    return data.build_dataset(name, split, tokenizer=tok, family=family, root=root, **TINY, **kw)


def test_refcoco_polygons_rle_and_splits(refcoco_root, bert_tok, clip_tok):
    root, expected = refcoco_root
    with pytest.warns(UserWarning, match="invalid polygon"):
        train = build("refcoco", "train", root, bert_tok)
        item = train[0]
    assert len(train) == 2  # one sample per sentence
    assert [s[3] for s in train.samples] == ["The LEFT thing.", "object on top"]  # `raw` for BERT
    assert item["ref_id"] == 5 and item["image_id"] == 1 and item["no_target"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.array_equal(train.mask(0, 10, 12), expected[11])
    with pytest.warns(UserWarning, match="skipped 1 empty sentence"):
        val = build("refcoco", "val", root, clip_tok, family="clip")
    assert [s[3] for s in val.samples] == ["bottom left", "the crowd"]  # `sent`; empty skipped
    assert np.array_equal(val.mask(0, 10, 12), expected[12])  # uncompressed RLE
    assert np.array_equal(val.mask(1, 6, 5), expected[21])  # compressed RLE of a crowd
    assert len(build("refcoco", "testA", root, bert_tok)) == 1
    with pytest.raises(ValueError, match="testA, train, val"):
        build("refcoco", "testB", root, bert_tok)


@pytest.mark.filterwarnings("ignore:.*empty sentence")
def test_item_mask_is_nearest_resized(refcoco_root, bert_tok):
    root, expected = refcoco_root
    ds = data.build_dataset("refcoco", "val", tokenizer=bert_tok, family="bert", root=root,
                            image_size=12, max_tokens=8)  # fmt: skip
    item = ds[1]  # 6x5 image -> 12x12: nearest keeps it exact up to repetition
    want = np.asarray(Image.fromarray(expected[21]).resize((12, 12), Image.Resampling.NEAREST))
    assert item["mask"].dtype == torch.float32 and item["mask"].shape == (12, 12)
    assert np.array_equal(item["mask"].numpy() > 0.5, want)
    assert item["image"].shape == (3, 12, 12)


@pytest.fixture
def grefcoco_root(tmp_path):
    write_png(tmp_path / "images/train2014/g.png", 8, 8)
    anns = [
        {"id": 1, "image_id": 3, "iscrowd": 0, "segmentation": [rect(0, 0, 2, 2)]},
        {"id": 2, "image_id": 3, "iscrowd": 0, "segmentation": [rect(1, 1, 5, 3)]},
        {"id": 3, "image_id": 3, "iscrowd": 0, "segmentation": [rect(6, 6, 7, 7)]},
    ]
    instances = {"images": [{"id": 3, "file_name": "g.png", "height": 8, "width": 8}],
                 "annotations": anns, "categories": []}  # fmt: skip
    grefs = [
        {"ref_id": 1, "image_id": 3, "ann_id": [1, 2], "category_id": [1, 1], "split": "val",
         "sentences": [{"raw": "the two boxes", "sent": "the two boxes", "sent_id": 1}]},
        {"ref_id": 2, "image_id": 3, "ann_id": [-1], "category_id": [-1], "split": "val",
         "sentences": [{"raw": "the green dog", "sent": "the green dog", "sent_id": 2}]},
        {"ref_id": 3, "image_id": 3, "ann_id": [3], "category_id": [1], "split": "val",
         "sentences": [{"raw": "the corner", "sent": "the corner", "sent_id": 3}]},
    ]  # fmt: skip
    (tmp_path / "grefcoco").mkdir()
    (tmp_path / "grefcoco/instances.json").write_text(json.dumps(instances))
    (tmp_path / "grefcoco/grefs(unc).json").write_text(json.dumps(grefs))
    return tmp_path


def test_grefcoco_multi_and_no_target(grefcoco_root, bert_tok):
    ds = data.build_dataset("grefcoco", "val", tokenizer=bert_tok, family="bert",
                            root=grefcoco_root, image_size=8, max_tokens=8)  # fmt: skip
    multi = np.zeros((8, 8), dtype=bool)
    multi[0:2, 0:2] = multi[1:3, 1:5] = True  # union of the two instances
    single = np.zeros((8, 8), dtype=bool)
    single[6, 6] = True
    items = [ds[i] for i in range(3)]
    assert [it["no_target"] for it in items] == [False, True, False]
    assert np.array_equal(items[0]["mask"].numpy() > 0.5, multi)
    assert items[1]["mask"].sum() == 0  # no-target: empty mask
    assert np.array_equal(items[2]["mask"].numpy() > 0.5, single)
    batch = data.collate(items)
    assert batch["no_target"].tolist() == [False, True, False]
    assert batch["no_target"].dtype == torch.bool and batch["mask"].shape == (3, 8, 8)
    assert batch["ref_id"] == [1, 2, 3] and batch["sentence"][1] == "the green dog"


def test_missing_files_are_named(tmp_path, bert_tok):
    with pytest.raises(FileNotFoundError) as e:
        build("refcoco", "val", tmp_path, bert_tok)
    assert "refs(unc).p" in str(e.value) and "train2014" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match=re.escape("grefs(unc).json")):
        build("grefcoco", "val", tmp_path, bert_tok)
    with pytest.raises(FileNotFoundError, match=re.escape("refs(umd).p")):
        build("refcocog", "val", tmp_path, bert_tok)  # umd is RefCOCOg's default split_by
    (tmp_path / "refcoco+").mkdir()
    with open(tmp_path / "refcoco+/refs(unc).p", "wb") as f:
        pickle.dump([], f)
    with pytest.raises(FileNotFoundError, match="instances.json"):
        build("refcoco+", "val", tmp_path, bert_tok)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickle_is_refused(tmp_path, bert_tok):
    pwned = tmp_path / "pwned"
    (tmp_path / "refcoco").mkdir()
    with open(tmp_path / "refcoco/refs(unc).p", "wb") as f:
        pickle.dump([{"ref_id": 1, "payload": _Evil(pwned)}], f)
    with pytest.raises(ValueError, match="refusing to load global .*system") as e:
        build("refcoco", "val", tmp_path, bert_tok)
    assert "refs(unc).p" in str(e.value) and "\n" not in str(e.value)
    assert not pwned.exists()


def test_python2_pickle_strings(tmp_path):
    # Python 2 writes str as SHORT_BINSTRING ('U'), which Python 3 reads back as bytes.
    payload = b"\x80\x02]q\x00}q\x01(U\x05splitq\x02U\x03valq\x03U\x06ref_idq\x04K\x07ua."
    path = tmp_path / "refs(unc).p"
    path.write_bytes(payload)
    assert data.load_refs_pickle(path) == [{"split": "val", "ref_id": 7}]


def test_rle_codec_against_pycocotools_reference():
    assert np.array_equal(data.rle_to_mask(PYCOCO_RLE), PYCOCO_MASK)
    assert data.mask_to_rle(PYCOCO_MASK) == PYCOCO_RLE
    # Hand-encoded: counts [2, 40, 1, 3]; '40' needs two 5-bit groups, the 4th count is stored
    # as 3 - 40 = -37 (difference to two places back, sign bit in the last group).
    assert data.rle_string_to_counts("2X11kN") == [2, 40, 1, 3]
    assert data.counts_to_rle_string([2, 40, 1, 3]) == "2X11kN"
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random(tuple(rng.integers(1, 30, 2))) < rng.random()
        assert np.array_equal(data.rle_to_mask(data.mask_to_rle(mask)), mask)


# ---------------------------------------------------------------------------------------------
# Polygons: pixel for pixel what pycocotools makes (the official ground truth)


def coco_polygons(parts, height, width):
    """The official rasterisation: union of the parts (detectron2 / ReLA, `merge`), decoded."""
    rles = coco_mask.frPyObjects([list(map(float, p)) for p in parts], height, width)
    return coco_mask.decode(coco_mask.merge(rles)).astype(bool)


def random_polygon(rng, kind, height, width):
    k = int(rng.integers(3, 13))
    box = np.array([width, height], dtype=float)
    if kind == "any":  # anywhere, self-intersecting as drawn
        p = rng.uniform(0, 1, (k, 2)) * box
    elif kind == "off-image":  # vertices up to 30% outside the image, negative ones included
        p = rng.uniform(-0.3, 1.3, (k, 2)) * box
    elif kind == "tiny":  # under a pixel or two across
        p = rng.uniform(0, 1, (1, 2)) * box + rng.uniform(0, rng.choice([0.3, 1.0, 2.0]), (k, 2))
    elif kind == "thin":  # a sliver along a random direction
        a, b = rng.uniform(0, 1, (2, 2)) * box
        s = rng.uniform(0, 1, (k, 1))
        p = a + s * (b - a) + rng.uniform(-0.4, 0.4, (k, 2))
    elif kind == "grid":  # integer and half-integer vertices: ties of the rounding rules
        p = np.round(rng.uniform(-2, 1, (k, 2)) * 2 + rng.uniform(0, 1, (k, 2)) * box * 2) / 2
    else:  # "degenerate": repeated vertices, collinear runs, all points equal
        p = np.round(rng.uniform(-0.2, 1.2, (k, 2)) * box, 1)
        p[1] = p[0]
        p[-1] = p[-2]
        if rng.random() < 0.3:
            p[:] = p[0]
        elif rng.random() < 0.5:
            p[:, 1] = p[0, 1]  # a horizontal line
    return p.ravel().tolist()


KINDS = ("any", "off-image", "tiny", "thin", "grid", "degenerate")


def test_polygons_match_pycocotools_on_random_polygons():
    rng = np.random.default_rng(0)
    for i in range(1200):
        height, width = (int(v) for v in rng.integers(1, 48, 2))
        poly = random_polygon(rng, KINDS[i % len(KINDS)], height, width)
        ours = data.polygons_to_mask([poly], height, width)
        assert ours.shape == (height, width)
        assert np.array_equal(ours, coco_polygons([poly], height, width)), (height, width, poly)


def test_polygon_parts_union_matches_pycocotools():
    rng = np.random.default_rng(1)
    for i in range(200):
        height, width = (int(v) for v in rng.integers(8, 64, 2))
        parts = [random_polygon(rng, KINDS[(i + j) % len(KINDS)], height, width)
                 for j in range(int(rng.integers(2, 5)))]  # fmt: skip
        assert np.array_equal(data.polygons_to_mask(parts, height, width),
                              coco_polygons(parts, height, width))  # fmt: skip


def test_coco_sized_objects_match_pycocotools():
    """Objects of a 480x640 COCO image: a blob of ~40 vertices and a many-vertex outline."""
    rng = np.random.default_rng(2)
    for n in (8, 40, 200):
        angle = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = 1 + 0.15 * rng.standard_normal(n)
        centre, radii = rng.uniform([100, 100], [540, 380]), rng.uniform([20, 20], [200, 150])
        poly = centre + radii * r[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
        poly = poly.round(2).ravel().tolist()  # COCO stores 2 decimals
        ours = data.polygons_to_mask([poly], 480, 640)
        assert ours.sum() > 100 and np.array_equal(ours, coco_polygons([poly], 480, 640))


def test_fixture_masks_match_pycocotools(refcoco_root, grefcoco_root):
    root, expected = refcoco_root
    instances = json.loads((root / "refcoco/instances.json").read_text())
    parts = instances["annotations"][0]["segmentation"]  # two overlapping boxes + a 2-point part
    # pycocotools makes nothing of the 2-point part either: skipping it changes no pixel
    assert np.array_equal(coco_polygons(parts, 10, 12), expected[11])
    assert np.array_equal(coco_polygons(parts[:2], 10, 12), expected[11])
    with pytest.warns(UserWarning, match="invalid polygon"):
        assert np.array_equal(data.polygons_to_mask(parts, 10, 12), expected[11])
    for rle, mask in ((PYCOCO_RLE, PYCOCO_MASK), (instances["annotations"][1]["segmentation"],
                                                    expected[12])):  # fmt: skip
        if isinstance(rle["counts"], list):
            rle = coco_mask.frPyObjects(rle, *rle["size"])  # uncompressed -> compressed
        assert np.array_equal(coco_mask.decode(rle).astype(bool), mask)
    assert coco_mask.encode(np.asfortranarray(PYCOCO_MASK.astype(np.uint8)))["counts"] == (
        PYCOCO_RLE["counts"].encode())  # fmt: skip
    g = json.loads((grefcoco_root / "grefcoco/instances.json").read_text())
    for ann in g["annotations"]:
        assert np.array_equal(data.segmentation_to_mask(ann["segmentation"], 8, 8),
                              coco_polygons(ann["segmentation"], 8, 8))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Bad files: one line, nothing else lost


def one_line(error):
    return "\n" not in str(error.value)


@pytest.mark.filterwarnings("ignore:.*empty sentence")
@pytest.mark.parametrize("damage", ["garbage", "truncated png", "truncated jpeg", "empty"])
def test_a_corrupt_image_is_replaced_by_the_next_good_sample(refcoco_root, bert_tok, damage):
    root, expected = refcoco_root
    bad = root / "images/train2014/b.png"  # the image of val sample 1 ("the crowd")
    if damage == "garbage":
        bad.write_bytes(b"this is not an image" * 10)
    elif damage == "empty":
        bad.write_bytes(b"")
    else:  # a download cut short: the header reads fine, the pixels do not
        buffer = io.BytesIO()
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            buffer, format="PNG" if damage == "truncated png" else "JPEG")  # fmt: skip
        bad.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    val = build("refcoco", "val", root, bert_tok)
    assert len(val) == 2
    with pytest.warns(UserWarning, match=r"skipping .*b\.png: cannot decode") as record:
        item = val[1]
    assert len(record) == 1 and "\n" not in str(record[0].message)
    good = val[0]  # the next sample (wrapping around) whose image decodes, every time
    assert item["ref_id"] == good["ref_id"] == 6 and item["sentence"] == "bottom left"
    assert torch.equal(item["image"], good["image"]) and torch.equal(item["mask"], good["mask"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file: the second time is silent
        assert val[1]["ref_id"] == 6
    with pytest.raises(IndexError):
        val[2]
    (root / "images/train2014/a.png").write_bytes(b"")  # now no image of the split decodes
    again = build("refcoco", "val", root, bert_tok)
    with pytest.warns(UserWarning, match="skipping"):
        with pytest.raises(ValueError, match="none of the 2 images") as e:
            again[0]
    assert one_line(e)


def write_refcoco(root, payload: bytes, name="refcoco/refs(unc).p"):
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(payload)


@pytest.mark.parametrize(
    "payload, match",
    [
        (json.dumps([{"ref_id": 1}]).encode(), r"not a pickle \(it looks like JSON\)"),
        (b"", "truncated or corrupt pickle"),
        (pickle.dumps({"refs": []}), "got dict"),
        (pickle.dumps([["ref_id", 1]]), "got a list holding list"),
        (pickle.dumps([{"ref_id": 1, "image_id": 1, "split": "val"}]), "a ref lacks 'ann_id'"),
        (b"\x00\x01\x02 binary junk", "not a pickle"),
        (b"P1\n.", "persistent id instruction"),  # pickle's own message has two lines
    ],
    ids=["json", "empty", "dict", "list-of-lists", "missing-key", "junk", "persistent-id"],
)
def test_refs_pickle_of_the_wrong_format(refcoco_root, bert_tok, payload, match):
    root, _ = refcoco_root
    write_refcoco(root, payload)
    with pytest.raises(ValueError, match=match) as e:
        build("refcoco", "val", root, bert_tok)
    assert one_line(e) and "refs(unc).p" in str(e.value)
    assert "pickled list of ref dicts" in str(e.value)  # names the format expected


def test_truncated_refs_pickle_at_every_length(refcoco_root, bert_tok):
    root, _ = refcoco_root
    whole = (root / "refcoco/refs(unc).p").read_bytes()
    for cut in sorted({1, 2, 3, 10, len(whole) // 3, len(whole) // 2, len(whole) - 1}):
        write_refcoco(root, whole[:cut])
        with pytest.raises(ValueError, match=r"refs\(unc\)\.p: .*pickled list of ref dicts") as e:
            build("refcoco", "val", root, bert_tok)
        assert one_line(e)


def test_grefs_and_instances_of_the_wrong_format(grefcoco_root, refcoco_root, bert_tok):
    grefs = grefcoco_root / "grefcoco/grefs(unc).json"
    good = grefs.read_bytes()
    cases = [
        (pickle.dumps([{"ref_id": 1}]), "not valid JSON"),  # a pickle where JSON is expected
        (good[: len(good) // 2], "not valid JSON"),  # truncated
        (b'{"refs": []}', "got dict"),
    ]
    for payload, match in cases:
        grefs.write_bytes(payload)
        with pytest.raises(ValueError, match=match) as e:
            build("grefcoco", "val", grefcoco_root, bert_tok)
        assert one_line(e) and "grefs(unc).json" in str(e.value)
        assert "JSON list of ref dicts" in str(e.value)
    root, _ = refcoco_root
    instances = root / "refcoco/instances.json"
    for payload, match in [(b"\x89PNG\r\n", "not valid JSON"), (b"[1, 2]", "expected a COCO")]:
        instances.write_bytes(payload)
        with pytest.raises(ValueError, match=match) as e:
            build("refcoco", "val", root, bert_tok)
        assert one_line(e) and "instances.json" in str(e.value) and "'annotations'" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Export round trip


@pytest.mark.parametrize("name", ["shapes", "gshapes"])
def test_export_round_trip(tmp_path, bert_tok, name):
    n = 24
    data.main(["export", name, str(tmp_path), "--split", "val", "--num", str(n)])
    folder = "grefcoco" if name == "gshapes" else "refcoco"
    instances = json.loads((tmp_path / folder / "instances.json").read_text())
    kinds = {type(a["segmentation"]).__name__ for a in instances["annotations"]}
    assert kinds == {"list", "dict"}  # both polygons and compressed RLE are exercised
    for ann in instances["annotations"]:  # the files mean to pycocotools what they mean to us
        seg, size = ann["segmentation"], (data.CANVAS, data.CANVAS)
        coco = coco_polygons(seg, *size) if isinstance(seg, list) else coco_mask.decode(seg)
        assert np.array_equal(data.segmentation_to_mask(seg, *size), coco.astype(bool))
    loaded = data.build_dataset(folder, "val", tokenizer=bert_tok, family="bert", root=tmp_path,
                                image_size=data.CANVAS, max_tokens=20)  # fmt: skip
    synthetic = data.build_dataset(name, "val", tokenizer=bert_tok, family="bert",
                                   image_size=data.CANVAS, max_tokens=20)  # fmt: skip
    assert len(loaded) == n
    for i in range(n):
        a, b = loaded[i], synthetic[i]
        assert a["sentence"] == b["sentence"] and a["no_target"] == b["no_target"]
        assert torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["image"], b["image"])  # PNG is lossless
        assert torch.equal(a["input_ids"], b["input_ids"])
    if name == "gshapes":
        assert any(loaded[i]["no_target"] for i in range(n))


# ---------------------------------------------------------------------------------------------
# The synthetic world, re-checked by an independent reading of the expressions

SIZE_WORD = {"small": "small", "little": "small", "large": "large", "big": "large"}
COLOUR = "red|green|blue|yellow|purple|orange"
SHAPE = "circle|square|triangle|star|diamond|hexagon"
NP = rf"(?:(small|little|large|big) )?(?:({COLOUR}) )?({SHAPE}|shape|object)"
NPS = rf"(?:(small|little|large|big) )?(?:({COLOUR}) )?({SHAPE}|shape|object)s"
NUMBER = {"two": 2, "three": 3, "four": 4}
ORDINAL = {"second": 2, "third": 3}


def desc(size, colour, noun):
    return (SIZE_WORD.get(size), colour, None if noun in ("shape", "object") else noun)


def select(objects, d):
    size, colour, shape = d
    return [
        i
        for i, o in enumerate(objects)
        if size in (None, o.size) and colour in (None, o.colour) and shape in (None, o.shape)
    ]


def by_position(objects, cands, axis, k, descending):
    """k-th candidate along an axis; the answer must be clear (others >= MARGIN away)."""
    coord = [objects[i].x if axis == "x" else objects[i].y for i in range(len(objects))]
    order = sorted(cands, key=lambda i: coord[i], reverse=descending)
    assert len(order) >= max(k, 2), "position words must be needed to single the object out"
    t = order[k - 1]
    assert all(abs(coord[c] - coord[t]) >= data.MARGIN for c in cands if c != t), "near tie"
    return [t]


def interpret(sentence, objects):
    """Independent reading of an expression -> selected object indices (asserts clarity)."""
    if m := re.fullmatch(rf"the (leftmost|rightmost) {NP}", sentence):
        return by_position(objects, select(objects, desc(*m.groups()[1:])), "x", 1,
                           m[1] == "rightmost")  # fmt: skip
    if m := re.fullmatch(rf"the {NP} at the (top|bottom)", sentence):
        return by_position(
            objects, select(objects, desc(*m.groups()[:3])), "y", 1, m[4] == "bottom"
        )
    if m := re.fullmatch(rf"the (second|third) {NP} from the (left|right|top|bottom)", sentence):
        axis = "x" if m[5] in ("left", "right") else "y"
        return by_position(objects, select(objects, desc(*m.groups()[1:4])), axis,
                           ORDINAL[m[1]], m[5] in ("right", "bottom"))  # fmt: skip
    if m := re.fullmatch(rf"the {NP} (left of|right of|above|below) the {NP}", sentence):
        anchor = select(objects, desc(*m.groups()[4:]))
        assert len(anchor) == 1, "the anchor must be unique"
        a = objects[anchor[0]]
        out = []
        for c in select(objects, desc(*m.groups()[:3])):
            if c == anchor[0]:
                continue
            o = objects[c]
            d = o.x - a.x if m[4] in ("left of", "right of") else o.y - a.y
            assert abs(d) >= data.MARGIN, "a candidate too close to the anchor to tell"
            if (d < 0) == (m[4] in ("left of", "above")):
                out.append(c)
        return out
    if m := re.fullmatch(rf"the {NP} and the {NP}", sentence):
        first, second = (
            select(objects, desc(*m.groups()[:3])),
            select(objects, desc(*m.groups()[3:])),
        )
        assert len(first) == 1 and len(second) == 1 and first != second
        return first + second
    if m := re.fullmatch(rf"all {NPS}", sentence):
        return select(objects, desc(*m.groups()))
    if m := re.fullmatch(rf"the (two|three|four) {NPS}", sentence):
        out = select(objects, desc(*m.groups()[1:]))
        assert len(out) == NUMBER[m[1]]
        return out
    except_pattern = rf"every {NP} except the (?:(small|little|large|big|{COLOUR}) one|({SHAPE}))"
    if m := re.fullmatch(except_pattern, sentence):
        members = select(objects, desc(*m.groups()[:3]))
        word = m[4] or m[5]
        o = objects
        excluded = [
            i
            for i in members
            if word in (o[i].colour, o[i].shape) or SIZE_WORD.get(word) == o[i].size
        ]
        assert len(excluded) == 1
        return [i for i in members if i not in excluded]
    if m := re.fullmatch(rf"the {NP}", sentence):
        return select(objects, desc(*m.groups()))
    raise AssertionError(f"sentence outside the grammar: {sentence!r}")


def check_scene(scene):
    objects, selected = scene.objects, sorted(interpret(scene.sentence, scene.objects))
    assert selected == scene.targets, (scene.sentence, selected, scene.targets)
    assert data.evaluate(scene.meaning, objects) == scene.targets
    if scene.kind == "single":
        assert len(selected) == 1
    elif scene.kind == "multi":
        assert len(selected) >= 2
    else:  # deceptive no-target: every word it uses names something in the image
        assert selected == []
        words = set(scene.sentence.split()[1:])
        present = {o.colour for o in objects} | {o.shape for o in objects}
        present |= {w for w, s in SIZE_WORD.items() if s in {o.size for o in objects}}
        assert words - {"shape", "object"} <= present and len(words) >= 2
    # The mask is the union of the targets' pixels, each drawn where its object is.
    mask = scene.mask()
    assert np.array_equal(mask, np.isin(scene.labels, [t + 1 for t in scene.targets]))
    pixels = np.asarray(scene.image, dtype=np.float32)
    palette = np.array(list(data.COLOURS.values()), dtype=np.float32)
    for t in scene.targets:
        o, own = objects[t], scene.labels == t + 1
        ys, xs = np.nonzero(own)
        assert own.sum() > 80  # never (nearly) empty: no occlusion in this world
        assert abs(xs.mean() - o.x) < 1.5 and abs(ys.mean() - o.y) < 1.5  # right place
        mean = pixels[own].mean(0)
        assert list(data.COLOURS)[np.argmin(((palette - mean) ** 2).sum(1))] == o.colour
    # Sizes are told apart by area: every small object is smaller than every large one.
    area = {i: (scene.labels == i + 1).sum() for i in range(len(objects))}
    small = [area[i] for i, o in enumerate(objects) if o.size == "small"]
    large = [area[i] for i, o in enumerate(objects) if o.size == "large"]
    if small and large and {o.shape for o in objects} == {objects[0].shape}:
        assert max(small) < min(large)


@pytest.mark.parametrize("generalized", [False, True])
def test_expressions_mean_what_they_say(generalized):
    kinds = {"single": 0, "multi": 0, "none": 0}
    forms = set()
    for i in range(300):
        scene = data.make_scene(i, "val", seed=3, generalized=generalized)
        check_scene(scene)
        kinds[scene.kind] += 1
        forms.add(scene.meaning[0] + str(scene.meaning[2] if scene.meaning[0] == "ordinal" else ""))
    if generalized:  # mix 50 / 30 / 20 %
        assert 120 <= kinds["single"] <= 180 and 60 <= kinds["multi"] <= 120
        assert 35 <= kinds["none"] <= 85
        assert {"all", "count", "except", "and", "none"} <= forms
    else:
        assert kinds["single"] == 300
    assert {"the", "ordinal1", "ordinal2", "ordinal3", "relation"} <= forms


def test_flip_swaps_left_right():
    assert data.flip_sentence("the circle left of the Leftmost square") == (
        "the circle right of the Rightmost square"
    )
    assert data.flip_sentence("the rightmost star, right of bright things") == (
        "the leftmost star, left of bright things"
    )
    # A mirrored scene with the flipped expression still selects the same objects.
    for i in range(60):
        scene = data.make_scene(i, "val", seed=1, generalized=True)
        mirrored = [type(o)(o.shape, o.colour, o.size, data.CANVAS - 1 - o.x, o.y, o.s, None)
                    for o in scene.objects]  # fmt: skip
        assert sorted(interpret(data.flip_sentence(scene.sentence), mirrored)) == scene.targets


def test_flip_augmentation_in_dataset(bert_tok):
    kw = dict(tokenizer=bert_tok, family="bert", image_size=data.CANVAS, max_tokens=20)
    plain = data.build_dataset("shapes", "val", **kw)
    torch.manual_seed(0)
    augmented = data.build_dataset("shapes", "val", augment=True, **kw)
    flipped = 0
    for i in range(12):
        a, b = plain[i], augmented[i]
        if torch.equal(a["image"], b["image"]):
            assert a["sentence"] == b["sentence"]
        else:
            flipped += 1
            assert torch.equal(a["image"].flip(-1), b["image"])
            assert torch.equal(a["mask"].flip(-1), b["mask"])
            assert b["sentence"] == data.flip_sentence(a["sentence"])
    assert 0 < flipped < 12


def test_determinism_and_splits(bert_tok):
    a, b = data.make_scene(7, "val"), data.make_scene(7, "val")
    assert a.sentence == b.sentence and a.targets == b.targets
    assert a.image.tobytes() == b.image.tobytes() and np.array_equal(a.labels, b.labels)
    for other in (
        data.make_scene(7, "train"),
        data.make_scene(7, "test"),
        data.make_scene(7, "val", seed=1),
    ):
        assert other.image.tobytes() != a.image.tobytes()
    kw = dict(tokenizer=bert_tok, family="bert", image_size=64, max_tokens=20)
    x, y = (
        data.build_dataset("gshapes", "val", **kw)[3],
        data.build_dataset("gshapes", "val", **kw)[3],
    )
    for key in ("image", "mask", "input_ids", "attention_mask"):
        assert torch.equal(x[key], y[key])
    assert x["sentence"] == y["sentence"] and x["ref_id"] == 3 == x["image_id"]
    sizes = {s: len(data.build_dataset("shapes", s, **kw)) for s in ("train", "val", "test")}
    assert sizes == {"train": 20000, "val": 500, "test": 500}
    assert len(data.build_dataset("shapes", "train", num_samples=7, **kw)) == 7


def test_items_follow_the_contract(bert_tok, clip_tok):
    for name, tok, family in [("shapes", bert_tok, "bert"), ("gshapes", clip_tok, "clip")]:
        ds = data.build_dataset(
            name, "val", tokenizer=tok, family=family, image_size=64, max_tokens=17
        )
        batch = data.collate([ds[i] for i in range(40)])
        assert batch["image"].shape == (40, 3, 64, 64) and batch["image"].dtype == torch.float32
        assert batch["mask"].shape == (40, 64, 64) and set(batch["mask"].unique().tolist()) <= {
            0.0,
            1.0,
        }
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (40, 17)
        assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
        targeted = ~batch["no_target"]
        assert (batch["mask"][targeted].flatten(1).sum(1) > 0).all()  # visible at 64 px too
        assert (batch["mask"][~targeted].sum() == 0).item()
        # Normalised images come back to the rendered pixels (up to resize and rounding).
        scene = ds.scene(0)
        want = np.asarray(scene.image.resize((64, 64), Image.Resampling.BILINEAR)).astype(int)
        assert np.abs(data.denormalize(batch["image"][0], family).astype(int) - want).max() <= 1


def test_unknown_names(bert_tok):
    kw = dict(tokenizer=bert_tok, family="bert", image_size=64, max_tokens=20)
    with pytest.raises(ValueError, match="choose from shapes, gshapes, refcoco"):
        data.build_dataset("coco", "val", **kw)
    with pytest.raises(ValueError, match="train, val, test"):
        data.build_dataset("shapes", "testA", **kw)


# ---------------------------------------------------------------------------------------------
# Tokenizers


def test_bert_style_offline_tokenizer(bert_tok):
    t = bert_tok
    assert [t.pad_token_id, t.unk_token_id, t.cls_token_id, t.sep_token_id, t.mask_token_id] == [
        0, 1, 2, 3, 4]  # fmt: skip
    assert len(t) == 5 + len(data.VOCAB) and t.convert_tokens_to_ids(data.VOCAB[0]) == 5
    ids, am = data.encode_text(t, "The RED circle, left of it", 10)
    words = t.convert_tokens_to_ids(["the", "red", "circle", ",", "left", "of"])
    assert ids.tolist() == [2, *words, 1, 3, 0]  # "it" is unknown; [PAD] = 0
    assert am.tolist() == [1] * 9 + [0]
    ids, am = data.encode_text(t, "the red circle left of the blue square and the green star", 6)
    assert ids.tolist()[0] == 2 and ids.tolist()[-1] == 3 and am.sum() == 6  # [SEP] survives
    with pytest.raises(ValueError, match="empty expression"):
        data.encode_text(t, "  \t", 6)


def test_clip_style_offline_tokenizer(clip_tok):
    t, V = clip_tok, len(data.VOCAB) + 2
    assert len(t) == V and t.convert_tokens_to_ids(data.VOCAB[0]) == 0
    assert t.bos_token_id == V - 2 and t.eos_token_id == t.pad_token_id == V - 1
    ids, am = data.encode_text(t, "the small blue star", 8)
    assert ids.tolist()[0] == V - 2 and ids.tolist()[5:] == [V - 1] * 3  # pads with EOS
    assert am.tolist() == [1] * 6 + [0] * 2
    assert ids.argmax().item() == 5  # first EOS = last attended position
    ids, am = data.encode_text(t, "the second small blue star from the left of the red one", 7)
    assert ids[-1].item() == V - 1 and am.sum() == 7 and ids.argmax().item() == 6


def test_vocabulary_covers_the_world(bert_tok, clip_tok):
    for i in range(200):
        sentence = data.make_scene(i, "train", generalized=i % 2 == 1).sentence
        assert bert_tok.unk_token_id not in bert_tok(sentence)["input_ids"], sentence
        ids = clip_tok(sentence)["input_ids"]
        assert ids.index(clip_tok.eos_token_id) == len(ids) - 1, sentence  # no unknown = EOS


@pytest.mark.parametrize("family", ["bert", "clip"])
def test_tokenizer_save_and_reload(tmp_path, family):
    tok = data.build_tokenizer(family, None)
    tok.save_pretrained(tmp_path)
    again = data.build_tokenizer(family, str(tmp_path))  # the real from_pretrained path, offline
    assert len(again) == len(tok) and again.pad_token_id == tok.pad_token_id
    for sentence in ("the leftmost red circle", "every square except the green one"):
        ids, am = data.encode_text(tok, sentence, 9)
        ids2, am2 = data.encode_text(again, sentence, 9)
        assert torch.equal(ids, ids2) and torch.equal(am, am2)


def test_tokenizer_errors_are_one_line(tmp_path):
    with pytest.raises(RuntimeError, match="does not exist"):
        data.build_tokenizer("bert", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="no network") as e:
        data.build_tokenizer("clip", "no-such-org/no-such-tokenizer")  # tests run with HF offline
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="bert, clip"):
        data.build_tokenizer("gpt", None)


def test_normalisation_constants():
    white = Image.new("RGB", (4, 4), (255, 255, 255))
    x = data.prepare_image(white, 4, "clip")
    assert torch.allclose(x[:, 0, 0], (1 - torch.tensor(data.MEAN_STD["clip"][0])) /
                          torch.tensor(data.MEAN_STD["clip"][1]))  # fmt: skip
    assert data.MEAN_STD["bert"][0] == (0.485, 0.456, 0.406)
    assert np.array_equal(data.denormalize(data.prepare_image(white, 4, "bert"), "bert"),
                          np.full((4, 4, 3), 255, np.uint8))  # fmt: skip
