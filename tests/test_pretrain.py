"""Tests for pretrain.py and the shipped pretrained/tiny-* folders: they load with from_pretrained,
have the team's architectures, and are what the recorded, reproducible recipe made."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertForMaskedLM,
    BertModel,
    CLIPModel,
    SwinBackbone,
    SwinForImageClassification,
)

import data
import pretrain

FOLDER = pretrain.ROOT / "pretrained"
QUALITY = json.loads((FOLDER / "quality.json").read_text())


def test_swin_folder_loads_as_a_backbone_with_the_spec_stages():
    swin = SwinBackbone.from_pretrained(
        FOLDER / "tiny-swin", out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    c = swin.config
    assert (c.image_size, c.patch_size, c.embed_dim, c.window_size) == (64, 4, 32, 4)
    assert (c.depths, c.num_heads, c.mlp_ratio) == ([2, 2, 2, 2], [1, 2, 4, 8], 4.0)
    maps = swin(torch.zeros(1, 3, 64, 64)).feature_maps
    assert [tuple(m.shape[1:]) for m in maps] == [
        (32, 16, 16),
        (64, 8, 8),
        (128, 4, 4),
        (256, 2, 2),
    ]
    assert all(torch.isfinite(m).all() for m in maps)


def test_bert_and_clip_folders_load_with_their_tokenizers():
    bert_tok = AutoTokenizer.from_pretrained(FOLDER / "tiny-bert")
    clip_tok = AutoTokenizer.from_pretrained(FOLDER / "tiny-clip")
    assert bert_tok.mask_token_id == 4 and bert_tok.pad_token_id == 0
    sentences = [data.make_scene(i, "val", generalized=True).sentence for i in range(50)]
    for family, tok in (("bert", bert_tok), ("clip", clip_tok)):
        fresh = data.build_tokenizer(family)
        assert len(tok) == len(fresh)
        assert tok(sentences)["input_ids"] == fresh(sentences)["input_ids"]

    bert = BertModel.from_pretrained(FOLDER / "tiny-bert", add_pooling_layer=False)
    b = bert.config
    assert (b.vocab_size, b.hidden_size, b.num_hidden_layers) == (len(bert_tok), 64, 4)
    assert (b.num_attention_heads, b.intermediate_size, b.max_position_embeddings) == (4, 256, 32)

    clip = CLIPModel.from_pretrained(FOLDER / "tiny-clip")
    v, t, V = clip.config.vision_config, clip.config.text_config, len(clip_tok)
    assert (v.image_size, v.patch_size, v.hidden_size, v.num_hidden_layers) == (64, 8, 64, 10)
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.eos_token_id) == (V, 64, 4, V - 1)
    assert clip.config.projection_dim == 64
    ids, mask = data.encode_text(clip_tok, "the large red circle", 17)
    out = clip.text_model(input_ids=ids[None], attention_mask=mask[None])
    # pooler_output is the state at the first <|endoftext|>: right after "circle"
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 5])


@pytest.mark.parametrize(
    "part, cls",
    [("swin", SwinForImageClassification), ("bert", BertForMaskedLM), ("clip", CLIPModel)],
)
def test_shipped_weights_are_the_recorded_run(part, cls):
    """The folder holds the weights whose checksum the recorded run wrote (quality.json)."""
    model = cls.from_pretrained(FOLDER / pretrain.FOLDERS[part])
    assert pretrain.checksum(model) == QUALITY[f"{part}_checksum"]


def test_recorded_run_used_the_default_recipe():
    assert QUALITY["recipes"] == {p: dataclasses.asdict(r) for p, r in pretrain.RECIPES.items()}


@pytest.mark.parametrize("part", pretrain.PARTS)
def test_first_steps_reproduce_the_recorded_run(part):
    """Data, model, objective and optimiser from the seed: the first two losses of the recorded
    run come out again (bitwise on the recording CPU; the tolerance covers other CPUs' rounding,
    far below what any change to the recipe or the data moves)."""
    recorded = QUALITY[f"{part}_first_losses"]
    assert pretrain.first_losses(part, seed=QUALITY["seed"]) == pytest.approx(recorded, rel=1e-5)


def test_same_seed_same_steps_bitwise_other_seed_differs():
    a = pretrain.first_losses("bert", seed=0)
    assert pretrain.first_losses("bert", seed=0) == a  # bitwise
    assert pretrain.first_losses("bert", seed=1) != a
    world, tok = pretrain.World("train"), data.build_tokenizer("clip")
    x, y = (pretrain.clip_batch(world, tok, 0, 7, 4) for _ in range(2))
    for k in ("pixel_values", "caption_fits", "region_fits", "patch_target"):
        assert torch.equal(x[k], y[k])


def test_swin_object_targets_pool_each_object_over_its_own_cells():
    """Swin's per-object loss reads each object's own region of its own image at every stage,
    and names that object's size, colour and shape."""
    world = pretrain.World("train")
    samples = [world[i] for i in (3, 4)]
    owner, cover, labels = pretrain.object_labels(samples)
    assert len(owner) == len(labels) == sum(len(s.objects) for s in samples)
    for r, (b, k) in enumerate(
        (b, k) for b, s in enumerate(samples) for k in range(len(s.objects))
    ):
        assert owner[r] == b
        names = [n[labels[r, g]] for g, (_, n) in enumerate(pretrain.GROUPS)]
        assert tuple(names) == samples[b].objects[k]
    area = np.bincount(data.make_scene(3, "train").labels.ravel())[1:]
    cell = data.CANVAS // pretrain.SWIN_GRID
    np.testing.assert_allclose(samples[0].swin_cover.sum(1) * cell**2, area)
    for side in (16, 8, 4, 2):  # every stage: a map that is 1 on one image and 0 on the other
        fmap = torch.zeros(2, 3, side, side)
        fmap[1] = 1.0
        pooled = pretrain.pool_objects(fmap, owner, cover)  # (R, 3)
        assert torch.allclose(pooled, owner[:, None].float().expand(-1, 3))
    # at stage 1 (one cell per 4 px patch) the pooled value is the cover-weighted mean of cells
    fmap = torch.arange(256.0).view(1, 1, 16, 16).expand(2, 1, 16, 16)
    pooled = pretrain.pool_objects(fmap, owner, cover)[:, 0]
    expected = (cover * torch.arange(256.0)).sum(1) / cover.sum(1)
    assert torch.allclose(pooled, expected, rtol=1e-5)


def test_patch_cover_and_dense_targets():
    """Patch cover is each object's share of every 16x16-canvas-pixel cell; a phrase's dense
    target is the cover of the objects it describes, in the image that holds them."""
    world, tok = pretrain.World("train"), data.build_tokenizer("clip")
    s = world[3]
    scene = data.make_scene(3, "train")
    area = np.bincount(scene.labels.ravel(), minlength=len(scene.objects) + 1)[1:]
    np.testing.assert_allclose(s.cover.sum(1) * (data.CANVAS // pretrain.GRID) ** 2, area)
    np.testing.assert_allclose(s.target, s.cover[scene.targets[0]])
    batch = pretrain.clip_batch(world, tok, 0, 0, 3)
    R = len(batch["owner"])
    for p in range(R):
        expected = torch.zeros(3, pretrain.GRID**2)
        for r in range(R):
            if batch["region_fits"][r, p]:
                expected[batch["owner"][r]] += batch["cover"][r]
        assert torch.allclose(batch["patch_target"][:, p], expected.clamp(max=1))
        assert batch["region_fits"][p, p]  # a phrase describes the object it was made from


def test_mlm_mask_is_bert_style():
    tok = data.build_tokenizer("bert")
    texts = [data.make_scene(i, "train").sentence for i in range(200)]
    ids, attention = pretrain.tokenize(tok, texts, pretrain.BERT_TOKENS)
    masked, labels = pretrain.mlm_mask(ids, attention, tok, np.random.default_rng(0))
    picked = labels != -100
    assert picked.any(1).all()  # at least one word per sentence
    assert torch.equal(labels[picked], ids[picked])
    assert not picked[torch.isin(ids, torch.tensor(tok.all_special_ids))].any()
    share = picked.sum() / ((attention == 1).sum() - 2 * len(texts))
    assert 0.12 < share < 0.3  # 15%, plus the at-least-one rule on short sentences
    frac_mask = (masked[picked] == tok.mask_token_id).float().mean()
    assert 0.7 < frac_mask < 0.9
    assert torch.equal(masked[~picked], ids[~picked])


def test_shipped_encoders_learned_their_objectives():
    """A few val samples: far above chance on what each objective taught (the full numbers, on
    500 val scenes, are in quality.json)."""
    clip = CLIPModel.from_pretrained(FOLDER / "tiny-clip")
    clip_tok = AutoTokenizer.from_pretrained(FOLDER / "tiny-clip")
    q = pretrain.clip_quality(clip, clip_tok, pretrain.World("val"), 32, 32)
    assert q["clip_target_share_top_half"] > 0.85  # chance 0.5; 500 val scenes: see quality.json
    # ...and the sentence matters: another scene's sentence puts less of the referent on top.
    assert q["clip_target_share_top_half_other_sentence"] < q["clip_target_share_top_half"] - 0.1

    bert = BertForMaskedLM.from_pretrained(FOLDER / "tiny-bert").eval()
    bert_tok = AutoTokenizer.from_pretrained(FOLDER / "tiny-bert")
    ids, mask = data.encode_text(bert_tok, "the large red [MASK]", 20)
    assert ids[4] == bert_tok.mask_token_id  # [CLS] the large red [MASK] [SEP]
    with torch.no_grad():
        word = bert_tok.convert_ids_to_tokens(
            int(bert(ids[None], mask[None]).logits[0, 4].argmax())
        )
    assert word in data.SHAPES + data.GENERIC_NOUNS

    swin = SwinForImageClassification.from_pretrained(FOLDER / "tiny-swin")
    q = pretrain.swin_quality(swin, pretrain.World("val"), 32)["swin_label_accuracy_per_label"]
    assert np.mean([q[c] for c in data.COLOUR_NAMES]) > 0.8  # chance ~0.5


def test_swin_object_term_starts_at_chance_and_is_off_at_weight_zero():
    """The shipped recipe's per-object terms start near ln(classes) (calibrated heads) and their
    sum is the logged loss; --swin-object-weight 0 (presence only) builds no heads."""
    assert pretrain.RECIPES["swin"].object_weight == 1.0
    presence_only = dataclasses.replace(pretrain.RECIPES["swin"], object_weight=0.0)
    assert pretrain.build_head("swin", 0, presence_only) is None
    recipe = dataclasses.replace(pretrain.RECIPES["swin"], batch_size=8)
    model, head = pretrain.build_model("swin", 0), pretrain.build_head("swin", 0, recipe)
    (row,) = pretrain.run_part("swin", model, head, 0, recipe, steps=1, progress=False)
    assert row["size"] == pytest.approx(np.log(2), abs=0.3)
    assert row["colour"] == pytest.approx(np.log(6), abs=0.5)
    assert row["shape"] == pytest.approx(np.log(6), abs=0.5)
    assert row["loss"] == pytest.approx(
        row["presence"] + row["size"] + row["colour"] + row["shape"]
    )


def test_referent_auc_among_objects_and_its_recorded_control():
    """The referent's rank among the objects' patches (an AUC weighted by patch cover): 1 when
    every referent patch is above every other object's, 0 when below; quality.json holds it for
    the shipped CLIP with its own and with another scene's sentence."""
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [4.0, 1.0, 3.0, 2.0]])
    referent = torch.tensor([[1.0, 1.0, 0, 0], [1.0, 1.0, 0, 0], [1.0, 0.5, 0, 0]])
    others = torch.tensor([[0, 0, 1.0, 1.0], [0, 0, 1.0, 1.0], [0, 0, 1.0, 1.0]])
    auc = pretrain.referent_auc(scores, referent, others)
    assert auc.tolist() == pytest.approx([1.0, 0.0, (1 * 2 + 0.5 * 0) / (1.5 * 2)])
    # Only referent-vs-other pairs count: reordering the referent's own patches changes nothing.
    first = pretrain.referent_auc(scores[:1], referent[:1], others[:1])
    swapped = pretrain.referent_auc(torch.tensor([[3.0, 4.0, 2.0, 1.0]]), referent[:1], others[:1])
    assert first.item() == swapped.item() == 1.0
    own, other = (QUALITY[f"clip_referent_auc_among_objects{k}"] for k in ("", "_other_sentence"))
    assert 0 <= other < own <= 1 and QUALITY["clip_referent_auc_among_objects_chance"] == 0.5
    assert QUALITY["clip_target_share_top_half_other_sentence"] < QUALITY[
        "clip_target_share_top_half"]  # fmt: skip
