"""Tests for m3dec.py: each block against its equation, then the whole model on the tiny preset."""

import dataclasses

import pytest
import torch
from transformers import BertConfig, BertModel, SwinBackbone, SwinConfig

import m3dec
from m3dec import (
    ABLATIONS,
    Config,
    IterativeInteraction,
    LanguageReconstruction,
    MutualAttention,
    build_model,
    sample_extra,
    sine_embedding_1d,
)


def tiny(**changes) -> Config:
    return dataclasses.replace(Config.tiny(), **changes)


def make_batch(cfg: Config, B: int = 2, seed: int = 0):
    """BERT-convention ids: [CLS]=2 w1..wn [SEP]=3 [PAD]=0; one square target per image."""
    g = torch.Generator().manual_seed(seed)
    S, L = cfg.image_size, cfg.max_tokens
    images = torch.randn(B, 3, S, S, generator=g)
    ids = torch.zeros(B, L, dtype=torch.long)
    masks = torch.zeros(B, S, S)
    for b in range(B):
        n = 3 + 2 * b  # different lengths, so padding matters
        ids[b, 0], ids[b, n + 1] = 2, 3
        ids[b, 1 : n + 1] = torch.randint(5, cfg.vocab_size, (n,), generator=g)
        y, x = (8 * b) % (S // 2), (16 * b) % (S // 2)
        masks[b, y : y + S // 2, x : x + S // 2] = 1.0
    return images, ids, (ids > 0).long(), {"masks": masks, "no_target": torch.zeros(B, dtype=bool)}


def expected_sizes(cfg: Config) -> tuple[int, int]:
    """(side of F_enc, side of the mask logits) from the config: stride 16 = patch 4 x 2^2, then
    the mask decoder's three x2 upsamplings."""
    feat = cfg.image_size // (cfg.vision_config["patch_size"] * 4)
    return feat, feat * 8


# ---------------------------------------------------------------------------------------------
# M3Att (Eq. 1-2)


def _m3att_inputs(seed=0, B=2, N=5, HW=6, C=8):
    torch.manual_seed(seed)
    F_q, F_enc = torch.randn(B, N, C), torch.randn(B, HW, C)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, 3:] = True  # sample 1 has 3 words
    return F_q, F_enc, pad


def test_mutual_attention_softmax_axes_match_eq_1_2():
    F_q, F_enc, pad = _m3att_inputs()
    att = MutualAttention(C=8, HW=6).eval()
    _, attn_V, attn_L = att(F_q, F_enc, pad)
    assert attn_V.shape == (2, 5, 6) and attn_L.shape == (2, 6, 5)
    # Eq. (2a): for each word, weights over the HW pixels sum to 1
    torch.testing.assert_close(attn_V.sum(-1), torch.ones(2, 5))
    # Eq. (2b): for each pixel, weights over the (real) words sum to 1; padded words get 0
    torch.testing.assert_close(attn_L.sum(-1), torch.ones(2, 6))
    assert attn_L[1, :, 3:].abs().max() == 0
    # Eq. (1) written out: A_mut = F_L^k (F_V^k)^T / sqrt(C); both softmaxes from the same matrix
    A = att.key_L(F_q) @ att.key_V(F_enc).transpose(1, 2) / 8**0.5
    torch.testing.assert_close(attn_V, A.softmax(-1))
    ref_L = A.transpose(1, 2).masked_fill(pad[:, None], float("-inf")).softmax(-1)
    torch.testing.assert_close(attn_L, ref_L)


def test_f_mul_shape_and_value():
    F_q, F_enc, pad = _m3att_inputs()
    att = MutualAttention(C=8, HW=6).eval()
    seen = {}
    att.proj.register_forward_hook(lambda m, args, out: seen.update(F_mul=args[0], out=out))
    out, attn_V, attn_L = att(F_q, F_enc, pad)
    # F_mul = F_V^a (F_L^a)^T in R^{N_t x HW}, then projected back to C
    assert seen["F_mul"].shape == (2, 5, 6)
    F_V_a = attn_V @ att.value_V(F_enc)  # (B, N_t, C)
    F_L_a = attn_L @ att.value_L(F_q)  # (B, HW, C)
    torch.testing.assert_close(seen["F_mul"], F_V_a @ F_L_a.transpose(1, 2))
    assert out.shape == (2, 5, 8) and out is seen["out"]


def _log_ratio_interaction(attn_V, attn_L, n_real):
    """D = log softmax_HW(A) - log softmax_N(A')^T. If A' = A, D[n, p] = f(n) + g(p), so every
    double difference D[n,p] - D[n,0] - D[0,p] + D[0,0] vanishes."""
    D = attn_V[:, :n_real].log() - attn_L[:, :, :n_real].transpose(1, 2).log()  # (B, n, HW)
    return D - D[:, :, :1] - D[:, :1, :] + D[:, :1, :1]


def test_shared_vs_independent_matrices():
    F_q, F_enc, pad = _m3att_inputs()
    torch.manual_seed(1)
    shared = MutualAttention(C=8, HW=6).eval()
    indep = MutualAttention(C=8, HW=6, independent=True).eval()
    assert not hasattr(shared, "key_L2") and hasattr(indep, "key_L2")
    _, V_s, L_s = shared(F_q, F_enc, pad)
    assert _log_ratio_interaction(V_s, L_s, 3).abs().max() < 1e-4  # one matrix, two axes
    indep.load_state_dict(shared.state_dict(), strict=False)
    out_i, V_i, L_i = indep(F_q, F_enc, pad)
    torch.testing.assert_close(V_i, V_s)  # LAV still uses the first matrix
    assert _log_ratio_interaction(V_i, L_i, 3).abs().max() > 1e-2  # VAL uses a second one
    # with the extra projections equal to the shared ones, the two setups coincide
    indep.key_L2.load_state_dict(shared.key_L.state_dict())
    indep.key_V2.load_state_dict(shared.key_V.state_dict())
    torch.testing.assert_close(indep(F_q, F_enc, pad)[0], shared(F_q, F_enc, pad)[0])


# ---------------------------------------------------------------------------------------------
# IMI (Eq. 3) and LFR (Eq. 4)


def test_imi_injects_with_w_ci():
    torch.manual_seed(0)
    F_dec, F_l_prev, pad = _m3att_inputs(C=8, HW=5)[0], torch.randn(2, 5, 8), _m3att_inputs()[2]
    imi = IterativeInteraction(C=8).train()
    imi(F_dec, F_l_prev, pad)  # one training pass, so BN has non-trivial running statistics
    imi.eval()

    def run(w):
        with torch.no_grad():
            imi.w_ci.fill_(w)
            return imi(F_dec, F_l_prev, pad)

    out0, F_l = run(0.0)
    # zero w_ci leaves BN(F_dec)
    torch.testing.assert_close(out0, imi.bn(F_dec.transpose(1, 2)).transpose(1, 2))
    torch.testing.assert_close(F_l, imi.lang_transform(F_l_prev))  # F_l^n = Linear(F_l^{n-1})
    # BN(F_dec + w F_i) is affine in w in eval mode: out(1) - out(0) = 2 (out(0.5) - out(0))
    out_half, out_one = run(0.5)[0], run(1.0)[0]
    assert (out_one - out0).abs().max() > 1e-3
    torch.testing.assert_close(out_one - out0, 2 * (out_half - out0))
    # F_i^n = A_l F_l'^n with A_l from Eq. (3): recover F_i from the injection and compare
    with torch.no_grad():
        logits = torch.relu(imi.W_a(F_dec)) @ F_l.transpose(1, 2) / 8**0.5
        A_l = logits.masked_fill(pad[:, None], float("-inf")).softmax(-1)
        F_i = A_l @ torch.relu(imi.W_l(F_l))
        ref = imi.bn((F_dec + F_i).transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out_one, ref)


def test_imi_fixed_ft_injects_the_same_language_feature():
    F_dec, F_t, pad = _m3att_inputs(C=8, HW=5)[0], torch.randn(2, 5, 8), _m3att_inputs()[2]
    imi = IterativeInteraction(C=8, fixed_language=True).eval()
    assert not hasattr(imi, "W_a")
    out, F_l = imi(F_dec, F_t, pad)
    assert F_l is F_t  # the next block receives F_t again
    torch.testing.assert_close(out, imi.bn((F_dec + F_t).transpose(1, 2)).transpose(1, 2))


def test_lfr_matches_eq_4_and_cosine_embedding():
    e = sine_embedding_1d(6, 8)
    torch.testing.assert_close(e[:, 0], torch.sin(torch.arange(6.0)))
    torch.testing.assert_close(e[:, 1], torch.cos(torch.arange(6.0)))
    torch.manual_seed(0)
    lfr = LanguageReconstruction(C=8, max_tokens=5).eval()
    F_t, F_dec, F_s = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 8)
    keep = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    loss = lfr(F_t, F_s, F_dec, keep)
    for b, n in ((0, 5), (1, 3)):  # naive per-sample reference with N_t = n real tokens
        X = torch.cat([F_t[b, :n] + lfr.e[:n], F_s[b : b + 1]])  # (N_t + 1, C)
        F_proj = torch.relu(lfr.W_proj(X)).sum(0) / (n + 1)
        F_rec = lfr.reconstruct(F_dec[b : b + 1, :n]).mean(1)[0]
        if b == 0:
            ref = ((F_rec - F_proj) ** 2).mean() / 2
        else:
            ref = ref + ((F_rec - F_proj) ** 2).mean() / 2
    torch.testing.assert_close(loss, ref)


# ---------------------------------------------------------------------------------------------
# The whole model


def test_forward_backward_shapes_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    cfg = Config.tiny()
    model = build_model(cfg).train()
    images, ids, am, targets = make_batch(cfg)
    out = model(images, ids, am, targets)
    feat, mask_side = expected_sizes(cfg)
    assert out["mask_logits"].shape == (2, 1, mask_side, mask_side)
    assert out["mutual_attention"].shape == (2, feat, feat)
    torch.testing.assert_close(out["mutual_attention"].sum((1, 2)), torch.ones(2))
    for b in range(2):  # the visualised word is a real word, never [CLS]/[SEP]/[PAD]
        assert out["attended_token_ids"][b].item() in ids[b, 1 : am[b].sum() - 1].tolist()
    assert set(out["losses"]) == {"mask", "lfr"}
    torch.testing.assert_close(out["loss"], out["losses"]["mask"] + 0.1 * out["losses"]["lfr"])
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    zero = [
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() == 0
    ]
    assert not zero, zero
    assert len(model.imi) == cfg.num_dec_layers - 1  # IMI only between successive layers


def test_lfr_absent_at_inference():
    torch.manual_seed(0)
    cfg = Config.tiny()
    model = build_model(cfg)
    calls = []
    model.lfr.register_forward_hook(lambda *a: calls.append(1))
    images, ids, am, targets = make_batch(cfg)
    model.eval()
    out = model(images, ids, am, targets)  # eval with targets: samples.png path
    assert "lfr" not in out["losses"] and not calls
    torch.testing.assert_close(out["loss"], out["losses"]["mask"])
    model.train()
    assert "loss" not in model(images, ids, am) and not calls  # no targets, no LFR
    assert "lfr" in model(images, ids, am, targets)["losses"] and calls


def test_overfits_one_batch():
    torch.manual_seed(0)
    cfg = Config.tiny()
    model = build_model(cfg).train()
    images, ids, am, targets = make_batch(cfg, B=4)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        out = model(images, ids, am, targets)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["losses"]["mask"].item())
    assert losses[-1] < 0.5 * losses[0], losses


def _eval_outputs(model, batch):
    torch.manual_seed(0)
    with torch.no_grad():
        return model.eval()(*batch[:3])["mask_logits"]


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_each_ablation_changes_the_computation(name):
    cfg = Config.tiny()
    batch = make_batch(cfg)
    torch.manual_seed(0)
    base = build_model(cfg)
    torch.manual_seed(0)
    ablated = build_model(tiny(ablate=(name,)))
    # copy every weight the two models share, so only the switched part can differ
    ablated.load_state_dict(base.state_dict(), strict=False)
    if name == "no_lfr":  # training-only loss: same masks, no LFR term
        torch.testing.assert_close(_eval_outputs(ablated, batch), _eval_outputs(base, batch))
        assert ablated.lfr is None
        assert "lfr" not in ablated.train()(*batch)["losses"]
        return
    assert not torch.allclose(_eval_outputs(ablated, batch), _eval_outputs(base, batch))
    structure = {
        "generic_attention": lambda m: not hasattr(m.decoder_layers[0], "m3att"),
        "independent_matrices": lambda m: hasattr(m.decoder_layers[0].m3att, "key_V2"),
        "no_imi": lambda m: len(m.imi) == 0,
        "imi_fixed_ft": lambda m: m.imi[0].fixed_language and not hasattr(m.imi[0], "W_a"),
        "vlt_mask_decoder": lambda m: m.mask_decoder.vlt_style,
    }
    assert structure[name](ablated)


def test_same_weights_give_same_outputs():
    """Control for the ablation test: copying weights into an identical model changes nothing."""
    cfg = Config.tiny()
    batch = make_batch(cfg)
    torch.manual_seed(0)
    a = build_model(cfg)
    torch.manual_seed(1)
    b = build_model(cfg)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(_eval_outputs(a, batch), _eval_outputs(b, batch))


def test_ablations_train_and_num_dec_layers():
    cfg = tiny(ablate=("generic_attention", "no_imi", "no_lfr"), num_dec_layers=1)  # Table II #0
    model = build_model(cfg).train()
    out = model(*make_batch(cfg))
    out["loss"].backward()
    assert len(model.decoder_layers) == 1 and len(model.imi) == 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    feat, _ = expected_sizes(cfg)
    assert out["mutual_attention"].shape == (2, feat, feat)


def test_unknown_or_conflicting_ablation_raises():
    with pytest.raises(ValueError, match="unknown ablation 'nope' for m3dec"):
        build_model(tiny(ablate=("nope",)))
    with pytest.raises(ValueError, match="exclude each other"):
        build_model(tiny(ablate=("no_imi", "imi_fixed_ft")))
    with pytest.raises(ValueError, match="needs M3Att"):
        build_model(tiny(ablate=("generic_attention", "independent_matrices")))


def test_fixed_resolution_and_token_count():
    torch.manual_seed(0)
    cfg = Config.tiny()
    model = build_model(cfg).eval()
    images, ids, am, _ = make_batch(cfg)
    big = torch.randn(2, 3, 2 * cfg.image_size, 2 * cfg.image_size)
    with pytest.raises(ValueError, match=f"built for {cfg.image_size}x{cfg.image_size} images"):
        model(big, ids, am)
    with pytest.raises(ValueError, match="max_tokens"):
        model(images, torch.cat([ids, ids], 1), torch.cat([am, am], 1))
    # shorter text is padded to max_tokens: same result as the padded input
    with torch.no_grad():
        full = model(images, ids, am)["mask_logits"]
        short = model(images, ids[:, :10], am[:, :10])["mask_logits"]
    torch.testing.assert_close(short, full)
    stride = build_model(cfg).visual_encoder.stride  # F_enc's stride (8 on tiny, 16 on paper)
    with pytest.raises(ValueError, match=f"multiple of {2 * stride}"):
        build_model(tiny(image_size=cfg.image_size + stride))


def test_sample_extra_names_the_word():
    class Tok:
        def convert_ids_to_tokens(self, ids):
            return [f"w{i}" for i in ids]

    cfg = Config.tiny()
    torch.manual_seed(0)
    out = build_model(cfg).eval()(*make_batch(cfg)[:3])
    amap, caption = sample_extra(out, 1, Tok())
    feat, _ = expected_sizes(cfg)
    assert amap.shape == (feat, feat) and amap.dtype.kind == "f"
    assert f"'w{out['attended_token_ids'][1].item()}'" in caption
    assert sample_extra({"mask_logits": out["mask_logits"]}, 0, Tok()) == (None, "")


def test_paper_config_is_the_transformer_row():
    cfg = Config.paper()
    assert (cfg.image_size, cfg.hidden_dim, cfg.mask_dim, cfg.num_heads) == (480, 256, 512, 8)
    assert (cfg.num_enc_layers, cfg.num_dec_layers, cfg.w_rec, cfg.w_mask) == (2, 3, 0.1, 1.0)
    assert cfg.pretrained and cfg.vision_name == "microsoft/swin-base-patch4-window12-384-in22k"
    swin = SwinConfig(**cfg.vision_config)
    assert (swin.embed_dim, list(swin.depths), swin.window_size) == (128, [2, 2, 18, 2], 12)
    assert BertConfig(**cfg.text_config).hidden_size == 768 and cfg.text_name == "bert-base-uncased"
    assert m3dec.TEXT_ENCODER == "bert"


def test_from_pretrained_local_directories(tmp_path):
    cfg = Config.tiny()
    torch.manual_seed(0)
    swin = SwinBackbone(
        SwinConfig(**cfg.vision_config, out_features=["stage2", "stage3", "stage4"])
    )
    bert = BertModel(
        BertConfig(vocab_size=cfg.vocab_size, **cfg.text_config), add_pooling_layer=False
    )
    swin.save_pretrained(tmp_path / "swin")
    bert.save_pretrained(tmp_path / "bert")
    loaded = build_model(
        tiny(pretrained=True, vision_name=str(tmp_path / "swin"), text_name=str(tmp_path / "bert"))
    )
    for mine, ref in ((loaded.visual_encoder.backbone, swin), (loaded.text_encoder, bert)):
        for (n, p), (_, q) in zip(mine.state_dict().items(), ref.state_dict().items(), strict=True):
            torch.testing.assert_close(p, q, msg=n)
    out = loaded.train()(*make_batch(cfg))
    assert torch.isfinite(out["loss"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="could not load"):
        build_model(tiny(pretrained=True, vision_name=str(tmp_path / "empty")))
