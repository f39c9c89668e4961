"""Tests for m3dec.py: each block against its equation, then the whole model on the tiny preset."""

import dataclasses
import math
import re

import pytest
import torch
from transformers import BertConfig, BertModel, SwinBackbone, SwinConfig

import m3dec
from m3dec import (
    ABLATIONS,
    RECIPE,
    TABLES,
    Config,
    IterativeInteraction,
    LanguageReconstruction,
    LinearBNReLU,
    MutualAttention,
    build_model,
    content_word,
    diagnostics,
    sample_extra,
    sine_embedding_1d,
)

DOCS = m3dec.Path(m3dec.__file__).parent / "docs" / "m3dec.md"


def tiny(**changes) -> Config:
    """The tiny architecture with random encoders (fast, no files); tests of the loading path
    use Config.tiny() itself."""
    return dataclasses.replace(Config.tiny(), **{"pretrained": False, **changes})


# The fields that only size the model: paper_small() takes them from tiny(), every other field
# (the paper's choices) from paper().
SIZES = ("image_size", "vocab_size", "vision_config", "text_config", "enc_stage", "hidden_dim",
         "mask_dim", "num_heads", "ffn_dim")  # fmt: skip


def paper_small(**changes) -> Config:
    """paper() at the tiny sizes with random encoders: the paper's equations, fast."""
    sizes = {k: getattr(Config.tiny(), k) for k in SIZES}
    return dataclasses.replace(Config.paper(), **{"pretrained": False, **sizes, **changes})


def make_batch(cfg: Config, B: int = 2, seed: int = 0):
    """BERT-convention ids: [CLS]=2 w1..wn [SEP]=3 [PAD]=0; one square target per image."""
    g = torch.Generator().manual_seed(seed)
    S, L = cfg.image_size, cfg.max_tokens
    images = torch.randn(B, 3, S, S, generator=g)
    ids = torch.zeros(B, L, dtype=torch.long)
    masks = torch.zeros(B, S, S)
    for b in range(B):
        n = 3 + 2 * (b % 3)  # different lengths, so padding matters
        ids[b, 0], ids[b, n + 1] = 2, 3
        ids[b, 1 : n + 1] = torch.randint(5, cfg.vocab_size, (n,), generator=g)
        y, x = (8 * b) % (S // 2), (16 * b) % (S // 2)
        masks[b, y : y + S // 2, x : x + S // 2] = 1.0
    return images, ids, (ids > 0).long(), {"masks": masks, "no_target": torch.zeros(B, dtype=bool)}


def expected_sizes(cfg: Config) -> tuple[int, int]:
    """(side of F_enc, side of the mask logits) from the config: Swin stage k has stride
    patch * 2^(k-1); the logits are at out_stride."""
    stride = cfg.vision_config["patch_size"] * 2 ** (cfg.enc_stage - 1)
    return cfg.image_size // stride, cfg.image_size // cfg.out_stride


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


def _bn_eval(bn, x):
    """BatchNorm in eval mode on (B, N, C)."""
    return bn(x.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("scaled", [False, True])
def test_imi_injects_with_w_ci(scaled):
    torch.manual_seed(0)
    F_dec, F_l_prev = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    pad = torch.zeros(2, 5, dtype=torch.bool)  # no padding: every row is a real word
    imi = IterativeInteraction(C=8, scaled=scaled).train()
    imi(F_dec, F_l_prev, pad)  # one training pass, so BN has non-trivial running statistics
    imi.eval()

    def run(w):
        with torch.no_grad():
            imi.w_ci.fill_(w)
            return imi(F_dec, F_l_prev, pad)

    out0, F_l = run(0.0)
    # zero w_ci leaves BN(F_dec)
    torch.testing.assert_close(out0, _bn_eval(imi.bn, F_dec))
    F_l_ref = torch.relu(_bn_eval(imi.lang_transform.bn, imi.lang_transform.linear(F_l_prev)))
    torch.testing.assert_close(F_l, F_l_ref)  # F_l^n = Linear+BN+ReLU(F_l^{n-1})
    # BN(F_dec + w F_i) is affine in w in eval mode: out(1) - out(0) = 2 (out(0.5) - out(0))
    out_half, out_one = run(0.5)[0], run(1.0)[0]
    assert (out_one - out0).abs().max() > 1e-3
    torch.testing.assert_close(out_one - out0, 2 * (out_half - out0))
    # F_i^n = A_l F_l'^n with A_l from Eq. (3): recover F_i from the injection and compare
    with torch.no_grad():
        logits = torch.relu(imi.W_a(F_dec)) @ F_l.transpose(1, 2)  # Eq. (3) as printed
        logits = logits / 8**0.5 if scaled else logits  # tiny()'s 1/sqrt(C)
        F_i = logits.softmax(-1) @ torch.relu(imi.W_l(F_l))
    torch.testing.assert_close(out_one, _bn_eval(imi.bn, F_dec + F_i))


def test_imi_fixed_ft_injects_the_same_language_feature():
    F_dec, F_t, pad = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=bool)
    imi = IterativeInteraction(C=8, fixed_language=True).eval()
    assert not hasattr(imi, "W_a")
    out, F_l = imi(F_dec, F_t, pad)
    assert F_l is F_t  # the next block receives F_t again
    torch.testing.assert_close(out, _bn_eval(imi.bn, F_dec + F_t))


@pytest.mark.parametrize("stop_grad", [True, False])
@pytest.mark.parametrize("last_bn_relu", [True, False])
def test_lfr_matches_eq_4_and_stop_gradient(stop_grad, last_bn_relu):
    e = sine_embedding_1d(6, 8)
    torch.testing.assert_close(e[:, 0], torch.sin(torch.arange(6.0)))
    torch.testing.assert_close(e[:, 1], torch.cos(torch.arange(6.0)))
    torch.manual_seed(0)
    lfr = LanguageReconstruction(C=8, max_tokens=5, stop_grad=stop_grad, last_bn_relu=last_bn_relu)
    lfr.eval()
    assert lfr.W_proj.bias is None  # Eq. (4): W_proj in R^{C x C}
    F_t = torch.randn(2, 5, 8, requires_grad=True)
    F_dec, F_s = torch.randn(2, 5, 8), torch.randn(2, 8)
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    F_proj, F_rec = lfr(F_t, F_s, F_dec, keep)
    for b, n in ((0, 5), (1, 3)):  # naive per-sample reference with N_t = n real tokens
        X = torch.cat([F_t[b, :n] + lfr.e[:n], F_s[b : b + 1]])  # (N_t + 1, C)
        torch.testing.assert_close(F_proj[b], torch.relu(lfr.W_proj(X)).sum(0) / (n + 1))
        rec = F_dec[b : b + 1, :n]
        layers = [*lfr.reconstruct, lfr.reconstruct_out] if last_bn_relu else lfr.reconstruct
        for layer in layers:  # eval mode: BN with running statistics
            rec = torch.relu(_bn_eval(layer.bn, layer.linear(rec)))
        if not last_bn_relu:  # tiny(): the third linear is a plain Linear
            rec = lfr.reconstruct_out(rec)
        torch.testing.assert_close(F_rec[b], rec.mean(1)[0])
    # the stop-gradient: no gradient into F_t (nor W_proj, frozen) through the target
    assert F_proj.requires_grad is not stop_grad
    assert lfr.W_proj.weight.requires_grad is not stop_grad
    if not stop_grad:  # the paper's objective: the target itself moves towards F_rec
        torch.nn.functional.mse_loss(F_rec, F_proj).backward()
        assert F_t.grad.abs().sum() > 0 and lfr.W_proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics without the padding


def test_padding_stays_out_of_batchnorm_statistics():
    """Train mode: the content of padded tokens changes nothing, and a BN over words has the
    statistics of the real tokens only."""
    torch.manual_seed(0)
    cfg = tiny()
    model = build_model(cfg).train()
    model.text_encoder.eval()  # BERT's dropout off (it has no BatchNorm): a deterministic pass
    images, ids, am, targets = make_batch(cfg, B=3)
    with torch.no_grad():
        ref = model(images, ids, am, targets)
        noisy = ids.clone()
        noisy[am == 0] = torch.randint(5, cfg.vocab_size, (int((am == 0).sum()),))
        seen = {}
        model.text_proj.bn.register_forward_hook(lambda m, a, o: seen.update(x=a[0]))
        out = model(images, noisy, am, targets)
    torch.testing.assert_close(out["mask_logits"], ref["mask_logits"])
    torch.testing.assert_close(out["loss"], ref["loss"])
    assert seen["x"].shape[0] == int(am.sum())  # the text projection's BN saw the real tokens
    # every BatchNorm1d over words is called on real rows only
    bns = [m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm1d)]
    rows = []
    hooks = [bn.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0])) for bn in bns]
    with torch.no_grad():
        model(images, ids, am, targets)
    for h in hooks:
        h.remove()
    assert len(rows) == len(bns) and set(rows) == {int(am.sum())}


# ---------------------------------------------------------------------------------------------
# The whole model


def test_forward_backward_shapes_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    cfg = tiny()
    model = build_model(cfg).train()
    images, ids, am, targets = make_batch(cfg)
    out = model(images, ids, am, targets)
    feat, mask_side = expected_sizes(cfg)
    assert (feat, mask_side) == (8, 32)  # tiny: F_enc 8 x 8 (stride 8), logits at stride 2
    assert out["mask_logits"].shape == (2, 1, mask_side, mask_side)
    assert out["attn_V"].shape == (2, cfg.max_tokens, feat * feat)
    assert set(out["losses"]) == {"mask", "lfr"}
    torch.testing.assert_close(out["loss"], out["losses"]["mask"] + 0.1 * out["losses"]["lfr"])
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    zero = [
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() == 0
    ]
    assert not zero, zero
    # frozen on purpose: the fixed LFR projection (stop-gradient), Swin's unused final LayerNorm
    # and, on tiny (taps = stages 1-3), the merging into stage 4 and stage 4 itself
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    swin = "visual_encoder.backbone.swin."
    allowed = ("lfr.W_proj.", swin + "layernorm.", swin + "encoder.layers.2.downsample.",
               swin + "encoder.layers.3.")  # fmt: skip
    assert {
        "lfr.W_proj.weight",
        swin + "encoder.layers.3.blocks.0.attention.q_proj.weight",
    } <= frozen
    assert all(n.startswith(allowed) for n in frozen), frozen
    assert len(model.imi) == cfg.num_dec_layers - 1  # IMI only between successive layers


def test_paper_lfr_trains_W_proj_and_every_parameter_gets_a_gradient():
    """paper(): Eq. 4's W_proj is "learnable parameters", F_proj is not detached."""
    torch.manual_seed(0)
    cfg = paper_small()
    model = build_model(cfg).train()
    out = model(*make_batch(cfg))
    out["loss"].backward()
    W_proj = model.lfr.W_proj
    assert not model.lfr.stop_grad and W_proj.weight.requires_grad and W_proj.bias is None
    assert W_proj.weight.grad is not None and W_proj.weight.grad.abs().sum() > 0
    no_grad = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert not no_grad, no_grad
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("visual_encoder.backbone.swin.") for n in frozen)


def test_paper_lfr_last_reconstruction_linear_is_followed_by_bn_relu():
    """§IV-A: every linear layer is followed by BN + ReLU, the third reconstruction linear too."""
    torch.manual_seed(0)
    cfg = paper_small()
    model = build_model(cfg).train()
    assert isinstance(model.lfr.reconstruct_out, LinearBNReLU)
    assert type(build_model(tiny()).lfr.reconstruct_out) is torch.nn.Linear  # tiny() only
    F_rec = model(*make_batch(cfg))["F_rec"]
    assert (F_rec >= 0).all() and (F_rec > 0).any()  # an average of ReLU outputs


def test_paper_has_no_demo_prior_bias_and_eq_3_is_unscaled():
    assert Config.paper().mask_prior is None and Config.tiny().mask_prior == 0.03
    torch.manual_seed(0)
    model = build_model(paper_small())
    last = model.mask_decoder.convs[-1]
    fan_in = last.in_channels * last.kernel_size[0] * last.kernel_size[1]
    assert last.bias.abs().max() <= fan_in**-0.5  # PyTorch's default Conv2d init
    assert abs(torch.sigmoid(last.bias).item() - 0.03) > 0.3  # near 0.5, not the demo's 3%
    assert all(imi.scale == 1.0 for imi in model.imi)  # Eq. (3) as printed
    C = Config.tiny().hidden_dim
    assert all(imi.scale == C**-0.5 for imi in build_model(tiny()).imi)  # tiny() only


def test_calibrated_start():
    """The last mask conv's bias is logit(prior): the first loss is the prior's entropy, not
    BCE at p = 0.5 (0.69)."""
    torch.manual_seed(0)
    cfg = tiny()
    model = build_model(cfg).train()
    p = cfg.mask_prior
    last = model.mask_decoder.convs[-1]
    torch.testing.assert_close(torch.sigmoid(last.bias), torch.tensor([p]))
    images, ids, am, targets = make_batch(cfg, B=4)
    masks = torch.zeros_like(targets["masks"])
    masks[:, :8, :10] = 1.0  # foreground share 80 / 4096 ~ 2%, close to the prior
    out = model(images, ids, am, {"masks": masks, "no_target": targets["no_target"]})
    q = masks.mean().item()
    entropy = -(q * math.log(p) + (1 - q) * math.log(1 - p))  # BCE of predicting p everywhere
    assert abs(out["losses"]["mask"].item() - entropy) < 0.05, (out["losses"]["mask"], entropy)
    assert out["losses"]["mask"].item() < 0.3


def test_lfr_loss_only_in_training_but_measured_in_eval():
    torch.manual_seed(0)
    cfg = tiny()
    model = build_model(cfg)
    calls = []
    model.lfr.register_forward_hook(lambda *a: calls.append(1))
    images, ids, am, targets = make_batch(cfg)
    model.eval()
    out = model(images, ids, am, targets)  # eval with targets: diagnostics / samples.png path
    assert "lfr" not in out["losses"] and out["F_proj"].shape == (2, cfg.hidden_dim)
    torch.testing.assert_close(out["loss"], out["losses"]["mask"])
    calls.clear()
    assert "loss" not in model(images, ids, am) and not calls  # inference: LFR not computed
    model.train()
    assert "lfr" in model(images, ids, am, targets)["losses"] and calls


def test_overfits_one_batch():
    """From the calibrated start (prior = the batch's foreground share, 1/4), so that the loss
    has to fall below the prior's entropy, not just find the right bias."""
    torch.manual_seed(0)
    cfg = tiny(mask_prior=0.25)
    model = build_model(cfg).train()
    images, ids, am, targets = make_batch(cfg, B=2)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        out = model(images, ids, am, targets)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["losses"]["mask"].item())
    assert losses[0] < 0.65  # near H(1/4) = 0.562 nats, the calibrated start
    assert losses[-1] < 0.3 * losses[0], losses


def _eval_outputs(model, batch):
    torch.manual_seed(0)
    with torch.no_grad():
        return model.eval()(*batch[:3])["mask_logits"]


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_each_ablation_changes_the_computation(name):
    cfg = tiny()
    batch = make_batch(cfg)
    torch.manual_seed(0)
    base = build_model(cfg)
    torch.manual_seed(0)
    ablated = build_model(tiny(ablate=(name,)))
    # copy every weight the two models share, so only the switched part can differ
    own = ablated.state_dict()
    ablated.load_state_dict(
        {k: v for k, v in base.state_dict().items() if k in own and own[k].shape == v.shape},
        strict=False,
    )
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
        "concat_mask_decoder": lambda m: (
            m.mask_decoder.convs[0][0].in_channels == 2 * cfg.hidden_dim
        ),
    }
    assert structure[name](ablated)


def test_same_weights_give_same_outputs():
    """Control for the ablation test: copying weights into an identical model changes nothing."""
    cfg = tiny()
    batch = make_batch(cfg)
    torch.manual_seed(0)
    a = build_model(cfg)
    torch.manual_seed(1)
    b = build_model(cfg)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(_eval_outputs(a, batch), _eval_outputs(b, batch))


ROWS = [(t, k) for t, rows in TABLES.items() for k in rows]


@pytest.mark.parametrize("table,key", ROWS, ids=[f"{t} {k.split()[0]}" for t, k in ROWS])
def test_every_table_row_builds_and_trains_one_step(table, key):
    spec = TABLES[table][key]
    assert set(spec) <= {"ablate", "set", "recipe", "paper", "baseline", "skip", "note"}
    assert set(spec.get("recipe", {})) <= set(RECIPE) | {"epochs", "iterations", "image_size"}
    assert " " not in key.split()[0] and len(key.split()) > 1  # "<id> <description>"
    if "skip" in spec:
        assert spec["skip"] and "paper" in spec
        return
    assert all(0 < v < 100 for v in spec["paper"].values()) and "mIoU" in spec["paper"]
    cfg = tiny(ablate=tuple(spec.get("ablate", ())), **spec.get("set", {}))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    out = model(*make_batch(cfg))
    out["loss"].backward()
    torch.optim.Adam(params, lr=1e-3).step()
    assert torch.isfinite(out["loss"])
    assert sum(not torch.equal(p, q) for p, q in zip(params, before, strict=True)) == len(params)
    assert len(model.decoder_layers) == cfg.num_dec_layers


def test_tables_rows_and_ablations_are_consistent():
    assert sum(len(r) for r in TABLES.values()) == 12 + 5 + 3 + 1
    for rows in TABLES.values():  # at most one baseline per table
        assert sum(bool(s.get("baseline")) for s in rows.values()) <= 1
    used = {a for rows in TABLES.values() for s in rows.values() for a in s.get("ablate", ())}
    assert used == set(ABLATIONS)  # every switch appears in a paper row, and no other
    for text in ABLATIONS.values():  # components, never row labels
        assert "Table" not in text and "#" not in text
    # Table II: each row adds one thing to the previous (#1 -> #2 adds IMI, #2 -> #4 adds LFR)
    t2 = {k.split()[0]: set(s["ablate"]) for k, s in TABLES["TABLE II"].items()}
    assert t2["#0"] - t2["#1"] == {"generic_attention"} and t2["#1"] - t2["#2"] == {"no_imi"}
    assert t2["#2"] - t2["#4"] == {"no_lfr"} and t2["#3"] - t2["#2"] == {"imi_fixed_ft"}


def _build(spec: dict) -> tuple[str, str]:
    """What a row builds and trains with: paper() with its switches and overrides, its recipe."""
    cfg = dataclasses.replace(Config.paper(), **spec.get("set", {}))
    cfg = dataclasses.replace(cfg, ablate=tuple(sorted(spec.get("ablate", ()))))
    return repr(dataclasses.asdict(cfg)), repr(sorted(spec.get("recipe", {}).items()))


def _conflicts(tables: dict) -> tuple[list, list]:
    """(groups of rows with one build and recipe, the metrics on which a group disagrees)."""
    groups = {}
    for table, rows in tables.items():
        for key, spec in rows.items():
            if "skip" not in spec:
                groups.setdefault(_build(spec), []).append((f"{table} {key}", spec["paper"]))
    bad = []
    for rows in groups.values():
        for metric in {m for _, paper in rows for m in paper}:
            if len({paper[metric] for _, paper in rows if metric in paper}) > 1:
                bad.append((metric, [name for name, _ in rows]))
    return list(groups.values()), bad


def test_one_build_one_paper_number():
    groups, bad = _conflicts(TABLES)
    assert not bad, bad
    full = max(groups, key=len)  # the default model appears in all three tables
    assert sorted(name.split()[:2] for name, _ in full) == [
        ["TABLE", "I"], ["TABLE", "II"], ["TABLE", "III"]]  # fmt: skip
    # the check can fail: the same build with another number is caught
    full_ii = next(spec for key, spec in TABLES["TABLE II"].items() if key.startswith("#4 "))
    doctored = {**TABLES, "TABLE X": {"#9 again": {**full_ii, "paper": {"mIoU": 1.0}}}}
    assert _conflicts(doctored)[1]


def test_rows_carry_the_cnn_rows_image_size_and_it_builds():
    """The ablations ran with the CNN row at 416 px (§IV-A); the row's size builds here."""
    sizes = {r["recipe"]["image_size"] for t in ("TABLE I", "TABLE II", "TABLE III")
             for r in TABLES[t].values()}  # fmt: skip
    assert sizes == {416}
    paper_stride = 4 * 2 ** (Config.paper().enc_stage - 1)
    assert 416 % (2 * paper_stride) == 0  # image_size must be a multiple of 2 x F_enc's stride
    torch.manual_seed(0)
    cfg = paper_small(image_size=416, enc_stage=Config.paper().enc_stage)  # stride 16
    with torch.no_grad():
        out = build_model(cfg).eval()(*make_batch(cfg, B=1)[:3])
    assert out["mask_logits"].shape == (1, 1, 416 // 2, 416 // 2)


def test_table_ii_4_vs_2_measures_the_papers_lfr():
    rows = {k.split()[0]: spec for k, spec in TABLES["TABLE II"].items()}
    with_lfr = build_model(paper_small(ablate=rows["#4"]["ablate"]))
    without = build_model(paper_small(ablate=rows["#2"]["ablate"]))
    assert without.lfr is None
    lfr = with_lfr.lfr
    assert not lfr.stop_grad and lfr.W_proj.weight.requires_grad
    assert isinstance(lfr.reconstruct_out, LinearBNReLU)


def test_recipe_is_the_papers():
    assert (RECIPE["optimizer"], RECIPE["lr"], RECIPE["schedule"]) == ("adam", 0.005, "step")
    assert (RECIPE["epochs"], RECIPE["batch_size"]) == (50, 48) and "iterations" not in RECIPE


def test_unknown_or_conflicting_ablation_raises():
    with pytest.raises(ValueError, match="unknown ablation 'nope' for m3dec"):
        build_model(tiny(ablate=("nope",)))
    with pytest.raises(ValueError, match="exclude each other"):
        build_model(tiny(ablate=("no_imi", "imi_fixed_ft")))
    with pytest.raises(ValueError, match="needs M3Att"):
        build_model(tiny(ablate=("generic_attention", "independent_matrices")))


def test_fixed_resolution_and_token_count():
    torch.manual_seed(0)
    cfg = tiny()
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
    stride = model.visual_encoder.stride  # F_enc's stride (8 on tiny, 16 on paper)
    with pytest.raises(ValueError, match=f"multiple of {2 * stride}"):
        build_model(tiny(image_size=cfg.image_size + stride))


# ---------------------------------------------------------------------------------------------
# diagnostics and sample_extra


def test_diagnostics_on_a_hand_made_case():
    """2 x 2 F_enc, 4 tokens: [CLS] w1 w2 [SEP]. Object = the top-left cell (1/4 of the image)."""
    B, N_t, HW = 2, 4, 4
    attn_V = torch.full((B, N_t, HW), 0.25)  # uniform: share on the object = its area
    attn_V[0, 1] = torch.tensor([1.0, 0, 0, 0])  # sample 0, w1 looks only at the object
    attn_V[0, 2] = torch.tensor([0.0, 1, 0, 0])  # w2 looks elsewhere
    ids = torch.tensor([[2, 7, 8, 3], [2, 7, 8, 3]])
    mask = torch.zeros(B, 8, 8)
    mask[:, :4, :4] = 1.0
    F_proj = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # mean (2, 1): SST = 2 * (1 + 1) = 4
    F_rec = torch.tensor([[1.0, 1.0], [3.0, 2.0]])  # SSE = 1 -> R^2 = 1 - 1/4
    uniform = torch.full((B, N_t, HW), 0.25)
    out = {"attn_V": attn_V, "attn_V_first": uniform, "input_ids": ids, "F_proj": F_proj,
           "attention_mask": torch.ones(B, N_t, dtype=int), "F_rec": F_rec}  # fmt: skip
    batch = {"mask": mask, "no_target": torch.tensor([False, False])}
    d = diagnostics(out, batch)
    assert d["lfr_R2"] == pytest.approx(0.75)
    assert d["lfr_proj_spread"] == pytest.approx(1.0)  # std over 2 sentences: 1 in each channel
    assert d["lfr_proj_norm"] == pytest.approx((1 + 13**0.5) / 2)
    assert d["target_area"] == pytest.approx(0.25)
    assert d["att_on_target"] == pytest.approx(((1 + 0) / 2 + 0.25) / 2)  # [CLS]/[SEP] excluded
    assert d["att_on_target_best"] == pytest.approx((1 + 0.25) / 2)
    assert d["att_on_target_first"] == pytest.approx(0.25)  # uniform first layer
    # predicting a constant scores R^2 = 0; no-target expressions are left out of the share
    d = diagnostics({**out, "F_rec": F_proj.mean(0).expand(2, 2)},
                    {"mask": mask, "no_target": torch.tensor([True, False])})  # fmt: skip
    assert d["lfr_R2"] == pytest.approx(0.0) and d["att_on_target"] == pytest.approx(0.25)
    d = diagnostics({k: v for k, v in out.items() if not k.startswith("F_")},
                    {"mask": mask * 0, "no_target": torch.tensor([True, True])})  # fmt: skip
    assert "lfr_R2" not in d and math.isnan(d["att_on_target"])


def test_diagnostics_and_sample_extra_on_the_model():
    class Tok:
        def convert_ids_to_tokens(self, ids):
            return [f"w{i}" for i in ids]

    cfg = tiny()
    torch.manual_seed(0)
    images, ids, am, targets = make_batch(cfg, B=3)
    with torch.no_grad():
        out = build_model(cfg).eval()(images, ids, am, targets)
    batch = {"mask": targets["masks"], "no_target": targets["no_target"]}
    d = diagnostics(out, batch)
    assert set(d) == {"lfr_R2", "lfr_proj_spread", "lfr_proj_norm", "att_on_target",
                      "att_on_target_best", "att_on_target_first", "target_area"}  # fmt: skip
    assert all(math.isfinite(v) for v in d.values()) and d["target_area"] == pytest.approx(0.25)
    panels = sample_extra(out, 1, Tok())
    feat, _ = expected_sizes(cfg)
    assert len(panels) == 2 and panels[0][0].shape == (feat, feat) and len(panels[1]) == 3
    words = [f"w{i}" for i in ids[1, 1 : am[1].sum() - 1].tolist()]  # never [CLS]/[SEP]/[PAD]
    assert any(f"'{w}'" in panels[0][1] for w in words)
    assert sample_extra({"mask_logits": out["mask_logits"]}, 0, Tok()) == [(None, "")]


def test_sample_extra_shows_the_first_content_word():
    tokens = ["[CLS]", "the", "red", "circle", "left", "of", "the", "square", "[SEP]", "[PAD]"]
    words = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    assert content_word(tokens, words) == 2  # "red", not "the"
    assert content_word(["[CLS]", "the", "of", ",", "##s", "[SEP]"],
                        torch.tensor([0, 1, 1, 1, 1, 0], dtype=torch.bool)) == 1  # fmt: skip
    vocab = {i: t for i, t in enumerate(["[PAD]", "a", "[CLS]", "[SEP]", "the", "red", "circle"])}

    class Tok:
        def convert_ids_to_tokens(self, ids):
            return [vocab[i] for i in ids]

    ids = torch.tensor([[2, 4, 5, 6, 3, 0]])
    am = (ids > 0).long()
    attn_V = torch.full((1, 6, 4), 0.25)
    attn_V[0, 2] = torch.tensor([1.0, 0, 0, 0])  # "red" looks at the first cell
    attn_L = torch.zeros(1, 4, 6)
    attn_L[0, :, 1] = 1.0  # every pixel weighs "the": the old rule's pick
    out = {"attn_V": attn_V, "attn_L": attn_L, "input_ids": ids, "attention_mask": am}
    (lav, lav_caption), (val, val_caption, limits) = sample_extra(out, 0, Tok())
    assert "'red'" in lav_caption and "'red'" in val_caption and limits == (0.0, 1.0)
    assert lav.tolist() == [[1.0, 0.0], [0.0, 0.0]] and val.sum() == 0
    generic = sample_extra({k: v for k, v in out.items() if k != "attn_L"}, 0, Tok())
    assert len(generic) == 1 and "'red'" in generic[0][1]


# ---------------------------------------------------------------------------------------------
# The paper card and its lab notes


def test_paper_card():
    """A paper card: at most ~80 lines, the first nn.Module within the first ~300 lines."""
    assert len(m3dec.__doc__.splitlines()) <= 80
    lines = m3dec.Path(m3dec.__file__).read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if re.match(r"class \w+\(nn\.Module\)", line))
    assert first < 300
    differences = m3dec.__doc__.split("Differences")[1].splitlines()
    bullets = [line for line in differences if line.startswith("- ")]
    assert bullets and all(line.startswith(("- both: ", "- tiny() only: ")) for line in bullets)


def test_tiny_only_choices_are_documented():
    """Every field tiny() sets to another value than paper() is named in the card, and has a
    heading in docs/m3dec.md; every (#x) of the card is a heading there."""
    headings = set(re.findall(r"^## (\S+)$", DOCS.read_text(), flags=re.M))
    paper, demo = Config.paper(), Config.tiny()
    changed = {
        f.name
        for f in dataclasses.fields(Config)
        if getattr(paper, f.name) != getattr(demo, f.name)
    }
    assert {"imi_scale", "lfr_stop_grad", "lfr_last_bn_relu", "mask_prior"} <= changed
    # the card's "64 px, tiny Swin + BERT" line
    identity = {"image_size", "vocab_size", "vision_name", "text_name", "vision_config",
                "text_config"}  # fmt: skip
    for name in changed - identity:
        assert name in headings and name in m3dec.__doc__, name
    bullets = [line for line in m3dec.__doc__.splitlines() if line.startswith("- ")]
    links = re.findall(r"#(\w+)", "\n".join(bullets))
    assert links and set(links) <= headings, set(links) - headings


# ---------------------------------------------------------------------------------------------
# Presets and loading


def test_paper_config_is_the_transformer_row():
    cfg = Config.paper()
    assert (cfg.image_size, cfg.hidden_dim, cfg.mask_dim, cfg.num_heads) == (480, 256, 512, 8)
    assert (cfg.num_enc_layers, cfg.num_dec_layers, cfg.w_rec, cfg.w_mask) == (2, 3, 0.1, 1.0)
    assert (cfg.enc_stage, cfg.out_stride) == (3, 2)  # F_enc at stride 16, logits at stride 2
    assert cfg.max_tokens == 17  # §IV-A: 15 words (RefCOCO/+) + [CLS] + [SEP]
    assert (cfg.imi_scale, cfg.lfr_stop_grad, cfg.lfr_proj_bias) == (False, False, False)
    assert cfg.lfr_last_bn_relu and cfg.mask_prior is None
    assert cfg.pretrained and cfg.vision_name == "microsoft/swin-base-patch4-window12-384-in22k"
    swin = SwinConfig(**cfg.vision_config)
    assert (swin.embed_dim, list(swin.depths), swin.window_size) == (128, [2, 2, 18, 2], 12)
    assert BertConfig(**cfg.text_config).hidden_size == 768 and cfg.text_name == "bert-base-uncased"
    assert m3dec.TEXT_ENCODER == "bert"


def test_tiny_loads_the_shared_pretrained_encoders():
    """Config.tiny() = from_pretrained(pretrained/tiny-swin, pretrained/tiny-bert), the folders'
    architectures written out in vision_config / text_config."""
    cfg = Config.tiny()
    assert cfg.pretrained and cfg.vision_name == "pretrained/tiny-swin"
    model = build_model(cfg)
    swin = SwinBackbone.from_pretrained(m3dec.Path(m3dec.__file__).parent / cfg.vision_name)
    for k, v in cfg.vision_config.items():
        assert getattr(swin.config, k) == v, k
    bert = model.text_encoder.config
    for k, v in cfg.text_config.items():
        assert getattr(bert, k) == v, k
    mine = model.visual_encoder.backbone.swin.state_dict()
    for n, p in swin.swin.state_dict().items():
        torch.testing.assert_close(mine[n], p, msg=n)
    assert bert.vocab_size == cfg.vocab_size


def test_from_pretrained_local_directories(tmp_path):
    cfg = tiny()
    torch.manual_seed(0)
    swin = SwinBackbone(SwinConfig(**cfg.vision_config, out_features=["stage1", "stage2"]))
    bert = BertModel(
        BertConfig(vocab_size=cfg.vocab_size, **cfg.text_config), add_pooling_layer=False
    )
    swin.save_pretrained(tmp_path / "swin")
    bert.save_pretrained(tmp_path / "bert")
    loaded = build_model(
        tiny(pretrained=True, vision_name=str(tmp_path / "swin"), text_name=str(tmp_path / "bert"))
    )
    for mine, ref in (
        (loaded.visual_encoder.backbone.swin, swin.swin),
        (loaded.text_encoder, bert),
    ):
        for (n, p), (_, q) in zip(mine.state_dict().items(), ref.state_dict().items(), strict=True):
            torch.testing.assert_close(p, q, msg=n)
    out = loaded.train()(*make_batch(cfg))
    assert torch.isfinite(out["loss"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="could not load"):
        build_model(tiny(pretrained=True, vision_name=str(tmp_path / "empty")))
