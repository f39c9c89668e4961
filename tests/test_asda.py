"""Tests for asda.py: AFS selection, SFA shapes, Eq. 10, the tiny model, every paper-table row,
the diagnostics, loading the pretrained tiny CLIP."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import asda
import common
import data

ROOT = Path(__file__).resolve().parents[1]


def tiny(**overrides) -> asda.Config:
    """The tiny preset with random encoders (fast, no files); pretrained=True loads the folder."""
    return dataclasses.replace(asda.Config.tiny(), **{"pretrained": False, **overrides})


def make_batch(cfg: asda.Config, B: int = 2, seed: int = 0):
    """Images, CLIP-convention ids (<sot> w.. <eot> then <eot> padding), masks with a square."""
    g = torch.Generator().manual_seed(seed)
    L, V, S = cfg.max_tokens, cfg.vocab_size, cfg.image_size
    lengths = torch.randint(2, L - 2, (B,), generator=g)  # number of words
    ids = torch.randint(0, V - 2, (B, L), generator=g)
    pos = torch.arange(L)[None]  # (1, L)
    ids[:, 0] = V - 2  # <|startoftext|>
    ids = torch.where(pos > lengths[:, None], torch.full_like(ids, V - 1), ids)  # EOS + padding
    attention_mask = (pos <= lengths[:, None] + 1).long().expand(B, L)  # up to and incl. EOS
    masks = torch.zeros(B, S, S)
    for b in range(B):
        y, x = torch.randint(0, S // 2, (2,), generator=g).tolist()
        masks[b, y : y + S // 3, x : x + S // 3] = 1.0
    images = torch.randn(B, 3, S, S, generator=g) + masks[:, None]  # the target is brighter
    return images, ids, attention_mask, {"masks": masks}


def build(cfg: asda.Config, seed: int = 0):
    torch.manual_seed(seed)
    return asda.build_model(cfg)


def table_rows():
    return [(t, key) for t, rows in asda.TABLES.items() for key in rows]


def row_config(table: str, key: str, **overrides) -> asda.Config:
    spec = asda.TABLES[table][key]
    return dataclasses.replace(
        tiny(**overrides), ablate=spec.get("ablate", ()), **spec.get("set", {})
    )


# ---------------------------------------------------------------------------------------------
# Presets

# The fields tiny() changes from paper(): the demo's choices. Each is named "tiny() only" in the
# module docstring and has its evidence under docs/asda.md#<field> (encoders and image size aside).
TINY_ONLY = {"dim", "num_heads", "ffn_dim", "wcg_ffn_dim", "decoder_dim", "coef_grid", "dropout"}
TINY_ENCODERS = {"image_size", "vocab_size", "vision_name", "text_name", "vision_config",
                 "text_config"}  # fmt: skip


def test_tiny_changes_only_the_documented_demo_choices():
    paper, demo = asda.Config.paper(), asda.Config.tiny()
    changed = {
        f.name
        for f in dataclasses.fields(asda.Config)
        if getattr(paper, f.name) != getattr(demo, f.name)
    }
    assert changed == TINY_ONLY | TINY_ENCODERS
    card = asda.__doc__.split("We deviate on purpose:")[1]
    notes = (ROOT / "docs" / "asda.md").read_text()
    for name in TINY_ONLY:
        assert f"#{name}" in card, name  # a "tiny() only" line points to its evidence
        assert f"\n## {name}\n" in notes, name
    assert "tiny() only: 64 px" in card


def test_tiny_uses_the_papers_N_c_and_paper_the_releases_widths():
    assert asda.Config.tiny().N_c == 32 == asda.Config.paper().N_c  # §4.2 (docs/asda.md#N_c)
    assert "\n## N_c\n" in (ROOT / "docs" / "asda.md").read_text()
    paper = asda.Config.paper()
    # The paper is silent on widths: the release's (LVA FFN 512, WCG FFN 2048, dropout 0.1).
    assert (paper.dim, paper.num_heads, paper.ffn_dim, paper.wcg_ffn_dim) == (512, 8, 512, 2048)
    assert (paper.dropout, paper.decoder_dim, paper.coef_grid) == (0.1, 256, 26)
    # Each attention block reads its own FFN width.
    model = build(tiny(ffn_dim=24, wcg_ffn_dim=40))
    assert model.local_attention[0].mlp[0].out_features == 24
    assert model.word_attention.mlp[0].out_features == 40


# ---------------------------------------------------------------------------------------------
# Components


def test_selection_returns_allowed_layers_and_selector_gets_gradient():
    cfg = tiny()
    model = build(cfg).train()
    out = model(*make_batch(cfg, B=4))
    layers = out["selected_layers"]
    assert layers.shape == (4, 2) and layers.dtype == torch.long
    assert set(layers[:, 0].tolist()) <= set(cfg.low_layers)
    assert set(layers[:, 1].tolist()) <= set(cfg.mid_layers)
    probs = out["selection_probs"]
    assert probs.shape == (4, 2, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 2))
    out["loss"].backward()
    for name, p in model.afs.named_parameters():  # Φ_T and both Φ_as learn (straight-through)
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_afs_forward_value_is_exactly_the_chosen_layer():
    torch.manual_seed(0)
    cfg = tiny()
    afs = asda.AdaptiveFeatureSelection(8, 6, (cfg.low_layers, cfg.mid_layers), cfg)
    B, N = 5, 10
    patches = [torch.randn(B, 4, 8) for _ in range(N + 1)]
    f_C, f_E = torch.randn(B, N + 1, 8), torch.randn(B, 6)
    for mode in ("train", "eval"):
        afs.train(mode == "train")
        (F_L, F_M), layers, probs = afs(patches, f_C, f_E)
        for b in range(B):
            torch.testing.assert_close(F_L[b], patches[layers[b, 0]][b])
            torch.testing.assert_close(F_M[b], patches[layers[b, 1]][b])
    # At eval the choice is the argmax of the softmax scores (Eq. 2-3): deterministic.
    low = torch.tensor(cfg.low_layers)[probs[:, 0].argmax(-1)]
    mid = torch.tensor(cfg.mid_layers)[probs[:, 1].argmax(-1)]
    assert torch.equal(layers, torch.stack([low, mid], 1))


def test_training_selection_is_a_gumbel_sample_not_the_argmax():
    """F.gumbel_softmax(hard=True) picks argmax(logits + Gumbel noise): in training the layer is
    a sample from score_L (one-hot, so F_L is exactly one layer), the argmax only with
    probability max score_L; at eval it is always the argmax."""
    torch.manual_seed(0)
    cfg = tiny()
    afs = asda.AdaptiveFeatureSelection(8, 6, (cfg.low_layers,), cfg)
    B, N, draws = 6, 10, 400
    patches = [torch.randn(B, 4, 8) for _ in range(N + 1)]
    f_C, f_E = torch.randn(B, N + 1, 8), torch.randn(B, 6) * 3
    afs.eval()
    _, best, probs = afs(patches, f_C, f_E)
    afs.train()
    picks = torch.stack([afs(patches, f_C, f_E)[1][:, 0] for _ in range(draws)])  # (draws, B)
    same = (picks == best[:, 0]).float()
    assert 0 < same.mean() < 1  # sometimes the argmax, sometimes another layer
    # Gumbel-max: P(pick = argmax) = max score_L, per sample (binomial std <= 0.025 here).
    torch.testing.assert_close(same.mean(0), probs[:, 0].max(-1).values, atol=0.1, rtol=0)
    (F_L,), layers, _ = afs(patches, f_C, f_E)  # one-hot: exactly the picked layer's tokens
    for b in range(B):
        torch.testing.assert_close(F_L[b], patches[layers[b, 0]][b])


def test_afs_score_is_eq1_product():
    torch.manual_seed(0)
    cfg = tiny()
    afs = asda.AdaptiveFeatureSelection(8, 6, (cfg.low_layers,), cfg).eval()
    B, N = 3, 10
    patches = [torch.randn(B, 4, 8) for _ in range(N + 1)]
    f_C, f_E = torch.randn(B, N + 1, 8), torch.randn(B, 6)
    score = torch.stack([f_E * afs.Phi_T(f_C[:, l]) for l in cfg.low_layers], 1)  # Eq. 1 naive
    expected = afs.Phi_as[0].net(score.flatten(1)).softmax(-1)  # Eq. 2 on the concatenation
    _, _, probs = afs(patches, f_C, f_E)
    torch.testing.assert_close(probs[:, 0], expected)


@pytest.mark.parametrize("kind", asda.SELECTORS)
def test_selector_kinds(kind):
    sel = asda.AdaptiveSelector(C=6, k=3, kind=kind)
    assert sel(torch.randn(4, 3, 6)).shape == (4, 3)


def test_unknown_selector_raises():
    with pytest.raises(ValueError, match="unknown selector"):
        asda.build_model(tiny(selector="transformer"))


@pytest.mark.parametrize("grid", [8, 26])
def test_sfa_shapes(grid):
    torch.manual_seed(0)
    C_v, C_t, dim, B = 12, 10, 16, 2
    sfa = asda.ScaleWiseFeatureAggregator(C_v, C_t, sfa_dim=4, dim=dim)
    F_L, F_M, F_H = (torch.randn(B, C_v, grid, grid, requires_grad=True) for _ in range(3))
    f_E = torch.randn(B, C_t)
    F_coarse = sfa(F_L, F_M, F_H, f_E)
    assert F_coarse.shape == (B, grid * grid, dim)
    # Down-sampled levels as §3.3 (ceil): H/2 and H/4.
    assert F.max_pool2d(F_M, 2, ceil_mode=True).shape[-1] == -(-grid // 2)
    assert F.max_pool2d(F_L, 4, ceil_mode=True).shape[-1] == -(-grid // 4)
    F_coarse.sum().backward()
    for x in (F_L, F_M, F_H):  # all three levels reach F_coarse
        assert x.grad.abs().sum() > 0


def test_phi_up_repeats_pixels_to_any_size():
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    assert torch.equal(asda.Phi_up(x, (4, 4))[0, 0, :2, :2], torch.zeros(2, 2))
    assert asda.Phi_up(torch.randn(1, 3, 7, 7), (13, 13)).shape == (1, 3, 13, 13)  # 26 -> 13, 7


def test_eq10_combination_equals_naive_sum():
    torch.manual_seed(0)
    f_coef, M_prime = torch.rand(2, 5) * 2 - 1, torch.rand(2, 5, 3, 4)
    naive = torch.zeros(2, 1, 3, 4)
    for b in range(2):
        for k in range(5):
            naive[b, 0] += f_coef[b, k] * M_prime[b, k]
    torch.testing.assert_close(asda.combine_masks(f_coef, M_prime), naive)


def test_coefficients_in_tanh_range_and_decoder_stride():
    torch.manual_seed(0)
    for grid in (0, 2, 4):
        coef = asda.GatedCoefficientGeneration(dim=8, N_c=5, coef_grid=grid)
        out = coef(torch.randn(2, 8, 4, 4) * 10)
        assert out.shape == (2, 5) and out.abs().max() < 1
    dec = asda.SegmentationDecoder(dim=8, decoder_dim=4, out_channels=5)
    assert dec(torch.randn(2, 8, 3, 4)).shape == (2, 5, 24, 32)  # 3 x2 up-samplings (Eq. 7)


def test_spatial_coefficients_see_where_a_map_fires():
    """coef_grid > 0: a Linear over the pooled cells, so the same response moved to another
    place gives other coefficients; coef_grid = 0 is tanh of the global mean of the maps."""
    torch.manual_seed(0)
    head = asda.GatedCoefficientGeneration(dim=4, N_c=3, coef_grid=2).eval()
    x = torch.zeros(1, 4, 8, 8)
    left, right = x.clone(), x.clone()
    left[..., 2:6, 0:3], right[..., 2:6, 5:8] = 5.0, 5.0  # one blob, mirrored
    assert not torch.allclose(head(left), head(right), atol=1e-3)
    avg = asda.GatedCoefficientGeneration(dim=4, N_c=3, coef_grid=0).eval()
    f = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(avg(f), torch.tanh(avg.convs(f).mean(dim=(2, 3))))
    assert avg.fc is None and head.fc.in_features == 3 * 2 * 2


def test_word_attention_ignores_padding():
    torch.manual_seed(0)
    block = asda.VisualLanguageAttention(dim=8, num_heads=2, ffn_dim=16, dropout=0.0).eval()
    F_A, words = torch.randn(1, 6, 8), torch.randn(1, 5, 8)
    pad = torch.tensor([[False, False, False, True, True]])
    words2 = words.clone()
    words2[:, 3:] = 100.0  # changing padded words must not change anything
    torch.testing.assert_close(block(F_A, words, pad), block(F_A, words2, pad))


# ---------------------------------------------------------------------------------------------
# Whole model


def test_forward_backward_tiny_shapes():
    cfg = tiny()
    model = build(cfg).train()
    out = model(*make_batch(cfg, B=2))
    side = cfg.image_size // cfg.vision_config["patch_size"] * 8  # stride P/8 (Eq. 7)
    assert out["mask_logits"].shape == (2, 1, side, side)
    assert out["f_coef"].shape == (2, cfg.N_c)
    assert set(out["losses"]) == {"focal", "dice"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    model.eval()
    with torch.no_grad():
        out = model(*make_batch(cfg, B=2)[:3])
    assert "loss" not in out and out["mask_logits"].shape == (2, 1, side, side)
    panel, caption, scale = asda.sample_extra(out, 1, None)
    assert caption.startswith("AFS: F_L = layer ") and scale == (0.0, 1.0)
    k = int(out["f_coef"][1].argmax())  # the response mask with the largest coefficient
    assert panel.shape == (side, side) and (panel == out["M_prime"][1, k].numpy()).all()


@pytest.mark.parametrize("table,key", table_rows())
def test_every_table_row_trains_one_step_and_every_parameter_learns(table, key):
    cfg = row_config(table, key)
    model = build(cfg).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = model(*make_batch(cfg, B=2))
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    before = model.decoder.out.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.decoder.out.weight)
    # Frozen on purpose: CLIP's post_layernorm only (pooled output, unused).
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if "post_layernorm" in n}


def test_tables_are_complete_and_well_formed():
    fields = {f.name for f in dataclasses.fields(asda.Config)}
    assert list(asda.TABLES["Table 2"]) == [
        "(a) baseline: F_H ⊙ f_E to the segmentation decoder",
        "(b) (a)+manual assign (layers 6, 9, concatenation)",
        "(c) (a)+AFS",
        "(d) (a)+AFS+SFA",
        "(e) (d)+single-branch",
        "(f) (d)+dual-branch (full)",
    ]
    assert [k.split()[0] for k in asda.TABLES["Table 3"]] == ["n=1", "n=2", "n=3", "n=4"]
    assert [k.split()[0] for k in asda.TABLES["Table 4"]] == [
        "N_c=16",
        "N_c=32",
        "N_c=48",
        "N_c=64",
    ]
    assert [k.split()[0] for k in asda.TABLES["Table 5"]] == ["MLP", "Conv", "Linear"]
    for table, rows in asda.TABLES.items():
        assert sum(bool(r.get("baseline")) for r in rows.values()) == 1, table
        for key, spec in rows.items():
            assert set(spec.get("ablate", ())) <= set(asda.ABLATIONS), key
            assert set(spec.get("set", {})) <= fields, key
            # The tables' "IoU" under the release's (and the CLIP family's) name: mIoU.
            assert set(spec["paper"]) == {"Prec@0.5", "Prec@0.7", "Prec@0.9", "mIoU"}, key
    # The full model is row (f) of Table 2 and the default row of Tables 3-5.
    assert asda.TABLES["Table 2"]["(f) (d)+dual-branch (full)"]["paper"]["mIoU"] == 75.06
    default = asda.Config()
    for table in ("Table 3", "Table 4", "Table 5"):
        base = next(r for r in asda.TABLES[table].values() if r.get("baseline"))
        assert all(getattr(default, k) == v for k, v in base["set"].items())
        assert base["paper"]["mIoU"] == 72.57
    for text in asda.ABLATIONS.values():  # components, not table rows
        assert "row" not in text and "Table" not in text


def test_table_rows_carry_their_recipe_and_one_build_has_one_paper_number():
    """Tables 3-5 ran 10 epochs (§4.4), Table 2 the full recipe; a row's "recipe" holds RECIPE
    keys (and image_size) only. Rows that build the same model with the same recipe (the default
    row of Tables 3, 4 and 5) carry the same paper number, and no two numbers share a build."""
    builds = {}
    for table, rows in asda.TABLES.items():
        for key, spec in rows.items():
            recipe = spec.get("recipe", {})
            assert set(recipe) <= set(asda.RECIPE) | {"image_size"}, key
            assert recipe == ({} if table == "Table 2" else {"epochs": 10}), key
            cfg = dataclasses.replace(asda.Config.paper(), ablate=spec.get("ablate", ()),
                                      **spec.get("set", {}))  # fmt: skip
            build = (repr(sorted(set(cfg.ablate))), repr(dataclasses.replace(cfg, ablate=())),
                     repr(sorted(recipe.items())))  # fmt: skip
            builds.setdefault(build, []).append((f"{table} {key}", spec["paper"]))
    for rows in builds.values():
        assert all(paper == rows[0][1] for _, paper in rows), rows
    shared = [rows for rows in builds.values() if len(rows) > 1]
    assert [len(rows) for rows in shared] == [3]  # n = 2, N_c = 32, Linear: one 10-epoch build
    # Table 2 (f) is the same model as Tables 3-5's default row, trained 30 epochs, not 10.
    full = asda.TABLES["Table 2"]["(f) (d)+dual-branch (full)"]
    assert full["paper"]["mIoU"] == 75.06 and "recipe" not in full


def test_recipe_is_the_papers():
    r = asda.RECIPE
    assert (r["optimizer"], r["lr"], r["epochs"], r["batch_size"]) == ("adam", 5e-5, 30, 28)
    assert (r["schedule"], tuple(r["milestones"]), r["gamma"]) == ("step", (18, 25), 0.1)
    assert r["encoder_lr_factor"] == 0.1 and "iterations" not in r


def test_overfit_one_batch():
    cfg = tiny()
    model = build(cfg).train()
    batch = make_batch(cfg, B=4, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(30):
        loss = model(*batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_ablations_change_the_computation():
    cfg = tiny()
    batch = make_batch(cfg, B=4)
    full = build(cfg)
    with torch.no_grad():
        ref = full.eval()(*batch[:3])["mask_logits"]

    def run(*names, train=False):
        model = build(tiny(ablate=names))
        own = model.state_dict()  # copy the full model's weights wherever names and shapes match
        shared = {
            k: v for k, v in full.state_dict().items() if k in own and own[k].shape == v.shape
        }
        model.load_state_dict(shared, strict=False)
        model.train(train)
        with torch.no_grad():
            return model, model(*batch[:3])

    model, out = run("no_intermediate", "no_wcg")  # Table 2 row (a)
    assert not hasattr(model, "afs") and "selected_layers" not in out
    assert model.fusion.proj[0][0].in_channels == model.features.vision.config.hidden_size
    assert not torch.allclose(out["mask_logits"], ref)

    model, out = run("manual_layers")
    assert not hasattr(model, "afs") and (out["selected_layers"] == torch.tensor([6, 9])).all()
    assert not torch.allclose(out["mask_logits"], ref)

    model, out = run("no_sfa")
    assert isinstance(model.fusion, asda.ConcatFusion)
    assert not torch.allclose(out["mask_logits"], ref)

    for name in ("single_branch", "no_wcg"):
        model, out = run(name)
        assert not hasattr(model, "coefficients") and model.decoder.out.out_channels == 1
        assert (name == "no_wcg") != hasattr(model, "word_attention")
        assert not torch.allclose(out["mask_logits"], ref)

    # Frozen selector: plain argmax even in training (deterministic), no selector gradient;
    # the trained selector draws Gumbel noise in training.
    frozen, _ = run("frozen_selector", train=True)
    assert not any(p.requires_grad for p in frozen.afs.parameters())
    picks = {tuple(frozen(*batch[:3])["selected_layers"].flatten().tolist()) for _ in range(6)}
    assert len(picks) == 1
    full.train()
    with torch.no_grad():
        picks = {tuple(full(*batch[:3])["selected_layers"].flatten().tolist()) for _ in range(6)}
    assert len(picks) > 1


def test_moot_ablation_combinations_raise():
    for names in (("single_branch", "no_wcg"), ("manual_layers", "frozen_selector")):
        with pytest.raises(ValueError, match="asda:"):
            asda.build_model(tiny(ablate=names))
    for other in ("manual_layers", "frozen_selector", "no_sfa"):
        with pytest.raises(ValueError, match="no_intermediate"):
            asda.build_model(tiny(ablate=("no_intermediate", other)))
    with pytest.raises(ValueError, match="unknown ablation 'nope' for asda"):
        asda.build_model(tiny(ablate=("nope",)))


# ---------------------------------------------------------------------------------------------
# The mechanism measured


def test_expression_kind_matches_the_grammar():
    """Every single-target expression of the built-in world, classified from its words, has the
    kind its meaning says (data.py: ordinal k = 1 is worded as a position)."""
    by_meaning = {"the": "attribute", "relation": "relation"}
    seen = set()
    for i in range(80):
        scene = data.make_scene(i, "val")
        op = scene.meaning[0]
        want = by_meaning.get(op) or ("position" if scene.meaning[2] == 1 else "ordinal")
        assert asda.expression_kind(scene.sentence) == want, scene.sentence
        seen.add(want)
    assert seen == set(asda.EXPRESSION_KINDS)


def test_diagnostics_on_a_hand_made_batch():
    sentences = [
        "the red circle",  # attribute
        "the leftmost square",  # position
        "the star left of the blue circle",  # relation
        "the second circle from the top",  # ordinal
    ]
    p = torch.tensor([1 / 3, 1 / 3, 1 / 3])
    one = torch.tensor([1.0, 0.0, 0.0])
    outputs = {
        "selected_layers": torch.tensor([[4, 7], [4, 8], [5, 8], [6, 8]]),
        "candidate_layers": torch.tensor([[4, 5, 6], [7, 8, 9]]),
        # F_L: uniform scores (entropy ln 3); F_M: one-hot (entropy 0)
        "selection_probs": torch.stack([torch.stack([p, one])] * 4),
    }
    d = asda.diagnostics(outputs, {"sentence": sentences})
    assert "text_swap_F_L" not in d  # measured only when the forward ran the swapped selection
    outputs["selected_layers_text_swap"] = torch.tensor([[4, 7], [5, 8], [5, 8], [6, 9]])
    d = asda.diagnostics(outputs, {"sentence": sentences})
    assert (d["text_swap_F_L"], d["text_swap_F_M"]) == (0.25, 0.25)
    assert d["entropy_F_L"] == pytest.approx(math.log(3), abs=1e-5)
    assert d["entropy_F_M"] == pytest.approx(0.0, abs=1e-5)
    assert (d["layer4"], d["layer5"], d["layer6"]) == (0.5, 0.25, 0.25)
    assert (d["layer7"], d["layer8"], d["layer9"]) == (0.25, 0.75, 0.0)
    assert d["layer4/attribute"] == 1.0 and d["layer4/position"] == 1.0
    assert d["layer5/relation"] == 1.0 and d["layer6/ordinal"] == 1.0
    assert d["layer7/attribute"] == 1.0 and d["layer8/attribute"] == 0.0
    # A kind absent from the batch is undefined there (NaN), not 0.
    d = asda.diagnostics({k: v[:1] if k != "candidate_layers" else v for k, v in outputs.items()},
                         {"sentence": sentences[:1]})  # fmt: skip
    assert d["layer4/attribute"] == 1.0 and math.isnan(d["layer4/relation"])
    assert asda.diagnostics({"mask_logits": torch.zeros(1, 1, 2, 2)}, {"sentence": ["x"]}) == {}
    # WCG's coefficients: two samples, N_c = 2; one coefficient saturated in both samples.
    coef = {"f_coef": torch.tensor([[1.0, 0.2], [-1.0, 0.4]]),
            "f_coef_text_swap": torch.tensor([[1.0, 0.0], [-1.0, 0.4]])}  # fmt: skip
    d = asda.diagnostics(coef, {"sentence": sentences[:2]})
    assert d["coef_saturated"] == 0.5
    assert d["coef_text_swap"] == pytest.approx(0.05)  # |0.2 - 0| / 4 entries
    assert d["coef_spread"] == pytest.approx((math.sqrt(2) + 0.2 / math.sqrt(2)) / 2)
    # Response masks: a map, its complement and an unrelated map -> |corr| 1, 0, 0.
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    M_prime = torch.stack([a, 1 - a, torch.tensor([[0.0, 1.0], [-1.0, 0.0]])])[None]
    d = asda.diagnostics({"M_prime": M_prime, "wcg_swap_iou": torch.tensor([1.0, 0.5])}, {})
    assert d["response_corr"] == pytest.approx((1 + 0 + 0) / 3, abs=1e-6)
    assert d["wcg_swap_IoU"] == 0.75


def test_diagnostics_from_a_model_forward():
    cfg = tiny()
    model = build(cfg).eval()
    images, ids, am, targets = make_batch(cfg, B=3)
    with torch.no_grad():
        out = model(images, ids, am, targets=targets)
    sentences = ["the red circle", "the big star above the square", "the third star from the left"]
    d = asda.diagnostics(out, {"sentence": sentences})
    # The selection with the next sample's sentence, on the same images (eval with targets).
    torch.manual_seed(0)
    afs = model.afs
    patches, f_C, _, f_E = model.features(images, ids, am)
    swapped = afs(patches, f_C, f_E.roll(1, 0))[1]
    assert torch.equal(out["selected_layers_text_swap"], swapped)
    changed = (swapped != out["selected_layers"]).float().mean(0)
    assert (d["text_swap_F_L"], d["text_swap_F_M"]) == pytest.approx(changed.tolist())
    assert "selected_layers_text_swap" not in model(images, ids, am)  # only when measuring
    assert sum(d[f"layer{l}"] for l in cfg.low_layers) == pytest.approx(1.0)
    assert sum(d[f"layer{l}"] for l in cfg.mid_layers) == pytest.approx(1.0)
    assert 0 <= d["entropy_F_L"] <= math.log(3) + 1e-6
    # The coefficients with the next sample's words, on the same F_A.
    assert out["f_coef_text_swap"].shape == out["f_coef"].shape
    assert 0 <= d["coef_saturated"] <= 1 and d["coef_text_swap"] >= 0
    assert "f_coef_text_swap" not in model(images, ids, am)
    # WCG reading the next sample's words, on the same M': the mask it would give.
    mask_swap = asda.combine_masks(out["f_coef_text_swap"], out["M_prime"]).sigmoid()
    mask = out["mask_logits"].sigmoid()
    want = common.mask_iou(mask > cfg.threshold, mask_swap > cfg.threshold)
    assert torch.allclose(out["wcg_swap_iou"], want)
    assert 0 <= d["wcg_swap_IoU"] <= 1 and 0 <= d["response_corr"] <= 1 + 1e-6


def test_response_act_reproduces_the_release():
    """response_act="relu" is the release's ReLU on M' (unbounded); the paper's sigmoid is
    the default; anything else is refused."""
    cfg = tiny()
    images, ids, am, targets = make_batch(cfg, B=2)
    model = build(cfg).eval()
    relu = build(dataclasses.replace(cfg, response_act="relu")).eval()
    with torch.no_grad():
        out, out_relu = model(images, ids, am), relu(images, ids, am)
    assert 0 < out["M_prime"].min() and out["M_prime"].max() < 1
    # Same weights (same seed): the release's M' is the ReLU of what the paper's sigmoid reads.
    assert torch.allclose(out_relu["M_prime"], torch.logit(out["M_prime"]).relu(), atol=1e-4)
    assert out_relu["M_prime"].min() == 0
    with pytest.raises(ValueError, match="response_act"):
        build(dataclasses.replace(cfg, response_act="softmax"))


# ---------------------------------------------------------------------------------------------
# Loading


def test_tiny_preset_loads_the_shared_pretrained_clip():
    from transformers import CLIPModel

    folder = ROOT / "pretrained" / "tiny-clip"
    cfg = asda.Config.tiny()
    assert cfg.pretrained and cfg.vision_name == cfg.text_name == "pretrained/tiny-clip"
    model = asda.build_model(cfg)
    clip = CLIPModel.from_pretrained(folder)
    torch.testing.assert_close(
        model.features.vision.encoder.layers[9].mlp.fc2.weight,
        clip.vision_model.encoder.layers[9].mlp.fc2.weight,
    )
    torch.testing.assert_close(
        model.features.text.embeddings.token_embedding.weight,
        clip.text_model.embeddings.token_embedding.weight,
    )
    # tiny()'s written-out configs are the folder's architecture (--no-pretrained builds it).
    for ours, theirs in ((cfg.vision_config, clip.config.vision_config),
                         (cfg.text_config, clip.config.text_config)):  # fmt: skip
        for k, v in ours.items():
            assert getattr(theirs, k) == v, k
    V = clip.config.text_config.vocab_size
    random = asda.build_model(tiny(vocab_size=V)).features.text.config
    assert (random.bos_token_id, random.eos_token_id, random.pad_token_id) == (V - 2, V - 1, V - 1)


def test_from_pretrained_local_dir(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    cfg = tiny()
    text_config = {**cfg.text_config, "vocab_size": cfg.vocab_size}
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=text_config, vision_config=cfg.vision_config))
    clip.save_pretrained(tmp_path)
    loaded = asda.build_model(
        tiny(pretrained=True, vision_name=str(tmp_path), text_name=str(tmp_path))
    )
    torch.testing.assert_close(
        loaded.features.vision.embeddings.patch_embedding.weight,
        clip.vision_model.embeddings.patch_embedding.weight,
    )
    out = loaded.eval()(*make_batch(cfg, B=1)[:3])
    assert out["mask_logits"].shape[-1] == cfg.image_size


def test_missing_hub_model_is_one_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="could not load"):
        asda.build_model(tiny(pretrained=True, vision_name=str(tmp_path / "absent")))
