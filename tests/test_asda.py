"""Tests for asda.py: AFS selection, SFA shapes, Eq. 10, the tiny model, ablations, loading."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import asda


def tiny(**overrides) -> asda.Config:
    return dataclasses.replace(asda.Config.tiny(), **overrides)


def make_batch(cfg: asda.Config, B: int = 2, seed: int = 0):
    """Images, CLIP-convention ids (<sot> w.. <eot> then <eot> padding), masks with a square."""
    g = torch.Generator().manual_seed(seed)
    L, V, S = cfg.max_tokens, cfg.vocab_size, cfg.image_size
    lengths = torch.randint(2, L - 2, (B,), generator=g)  # number of words
    ids = torch.randint(3, V - 2, (B, L), generator=g)
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
    coef = asda.GatedCoefficientGeneration(dim=8, N_c=5)(torch.randn(2, 8, 4, 4) * 10)
    assert coef.shape == (2, 5) and coef.abs().max() < 1
    dec = asda.SegmentationDecoder(dim=8, decoder_dim=4, out_channels=5)
    assert dec(torch.randn(2, 8, 3, 4)).shape == (2, 5, 24, 32)  # 3 x2 up-samplings (Eq. 7)


def test_word_attention_ignores_padding():
    torch.manual_seed(0)
    block = asda.VisualLanguageAttention(dim=8, num_heads=2, ffn_dim=16, dropout=0.0).eval()
    F_A, f_T = torch.randn(1, 6, 8), torch.randn(1, 5, 8)
    pad = torch.tensor([[False, False, False, True, True]])
    f_T2 = f_T.clone()
    f_T2[:, 3:] = 100.0  # changing padded words must not change anything
    torch.testing.assert_close(block(F_A, f_T, pad), block(F_A, f_T2, pad))


# ---------------------------------------------------------------------------------------------
# Whole model


def test_forward_backward_tiny_shapes():
    cfg = tiny()
    model = build(cfg).train()
    out = model(*make_batch(cfg, B=2))
    side = cfg.image_size // cfg.vision_config["patch_size"] * 8  # stride P/8 (Eq. 7)
    assert out["mask_logits"].shape == (2, 1, side, side)
    assert set(out["losses"]) == {"focal", "dice"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    model.eval()
    with torch.no_grad():
        out = model(*make_batch(cfg, B=2)[:3])
    assert "loss" not in out and out["mask_logits"].shape == (2, 1, side, side)
    assert asda.sample_extra(out, 1, None)[1].startswith("layers ")


@pytest.mark.parametrize("ablation", [None, *asda.ABLATIONS])
def test_every_trainable_parameter_gets_a_gradient(ablation):
    cfg = tiny(ablate=(ablation,) if ablation else ())
    model = build(cfg).train()
    model(*make_batch(cfg, B=2))["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    # Frozen on purpose: CLIP's post_layernorm (pooled output, unused) and, in the release-style
    # ablation, the untrained selector.
    expected = {n for n, _ in model.named_parameters() if "post_layernorm" in n}
    if ablation == "frozen_selector":
        expected |= {n for n, _ in model.named_parameters() if n.startswith("afs.")}
    assert frozen == expected


def test_overfit_one_batch():
    cfg = tiny()
    model = build(cfg).train()
    batch = make_batch(cfg, B=4, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(40):
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

    def run(name, train=False):
        model = build(tiny(ablate=(name,)))
        own = model.state_dict()  # copy the full model's weights wherever names and shapes match
        shared = {
            k: v for k, v in full.state_dict().items() if k in own and own[k].shape == v.shape
        }
        model.load_state_dict(shared, strict=False)
        model.train(train)
        with torch.no_grad():
            return model, model(*batch[:3])

    model, out = run("manual_layers")
    assert model.afs is None and (out["selected_layers"] == torch.tensor([6, 9])).all()
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
    picks = {tuple(frozen(*batch[:3])["selected_layers"].flatten().tolist()) for _ in range(6)}
    assert len(picks) == 1
    full.train()
    with torch.no_grad():
        picks = {tuple(full(*batch[:3])["selected_layers"].flatten().tolist()) for _ in range(6)}
    assert len(picks) > 1


def test_hyperparameters_n_and_N_c_shape_the_model():
    cfg = tiny(n=1, N_c=5)
    model = build(cfg)
    assert len(model.local_attention) == 1 and model.decoder.out.out_channels == 5
    assert model.coefficients.convs[-1].out_channels == 5


def test_unknown_ablation_raises():
    with pytest.raises(ValueError, match="unknown ablation 'nope' for asda"):
        asda.build_model(tiny(ablate=("nope",)))


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
    torch.testing.assert_close(
        loaded.features.text.embeddings.token_embedding.weight,
        clip.text_model.embeddings.token_embedding.weight,
    )
    out = loaded.eval()(*make_batch(cfg, B=1)[:3])
    assert out["mask_logits"].shape[-1] == cfg.image_size


def test_missing_hub_model_is_one_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="could not load"):
        asda.build_model(tiny(pretrained=True, vision_name=str(tmp_path / "absent")))
