"""Tests for magnet.py (MagNet, CVPR 2024): components against their equations, the tiny model."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch

import data
import magnet
import train

ROOT = Path(__file__).resolve().parents[1]

CLS, SEP, MASK = 2, 3, 4  # offline tokenizer ids (see the method contract); words from 5


def make_batch(cfg, n_words=(4, 7), seed=0):
    """[CLS] w1..wn [SEP] [PAD]... per sample, random images, one rectangle per GT mask."""
    g = torch.Generator().manual_seed(seed)
    B, L, S = len(n_words), cfg.max_tokens, cfg.image_size
    ids = torch.zeros(B, L, dtype=torch.long)
    am = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(n_words):
        ids[b, 0], ids[b, n + 1] = CLS, SEP
        ids[b, 1 : n + 1] = torch.randint(5, cfg.vocab_size, (n,), generator=g)
        am[b, : n + 2] = 1
    images = torch.randn(B, 3, S, S, generator=g)
    masks = torch.zeros(B, S, S)
    for b in range(B):
        y, x = torch.randint(0, S // 2, (2,), generator=g).tolist()
        masks[b, y : y + S // 3, x : x + S // 3] = 1
    return images, ids, am, {"masks": masks, "no_target": torch.zeros(B, dtype=torch.bool)}


def tiny_config(**changes):
    """The demo's architecture with random encoders (fast, no files) and Eq. (15)'s weights from
    the first step (no CAL warm-up), unless a test asks otherwise."""
    changes = {"pretrained": False, "cal_warmup": 0, **changes}
    return dataclasses.replace(magnet.Config.tiny(), **changes)


def tiny_model(seed=0, **changes):
    torch.manual_seed(seed)
    return magnet.build_model(tiny_config(**changes))


def run(model, batch, seed=1):
    torch.manual_seed(seed)  # same [MASK] choice and dropout for models compared with each other
    return model(*batch)


# ---------------------------------------------------------------------------------------------
# Encoders: the transformers internals we iterate by hand


def test_encoder_internals_match_transformers():
    """Stage-by-stage Swin / BERT without fusion must equal the library's own forward passes.
    Fails loudly if transformers changes SwinStage / SwinLayer / BertLayer (pinned 5.23)."""
    cfg = tiny_config()
    torch.manual_seed(0)
    swin, bert = magnet.build_encoders(cfg)
    swin.eval(), bert.eval()
    stages = swin.encoder.layers
    assert [type(s).__name__ for s in stages] == ["SwinStage"] * 4
    assert all(type(b).__name__ == "SwinLayer" for s in stages for b in s.blocks)
    assert [type(s.downsample).__name__ for s in stages] == ["SwinPatchMerging"] * 3 + ["NoneType"]
    images, ids, am, _ = make_batch(cfg)
    with torch.no_grad():
        ref = swin(
            images,
            always_partition=True,
            output_hidden_states=True,
            output_hidden_states_before_downsampling=True,
        ).reshaped_hidden_states[1:]
        x, (H, W) = swin.embeddings(images)
        for i, stage in enumerate(stages):
            x = magnet.swin_stage_blocks(stage, x, (H, W))
            C, side = cfg.vision_config["embed_dim"] * 2**i, cfg.image_size // 4 // 2**i
            assert (H, W) == (side, side) and x.shape == (2, side * side, C)
            torch.testing.assert_close(x.transpose(1, 2).reshape(2, C, H, W), ref[i])
            if stage.downsample is not None:
                x = stage.downsample(x, (H, W))
                H, W = (H + 1) // 2, (W + 1) // 2

        o = bert.embeddings(input_ids=ids)
        o = magnet.bert_layers(bert.encoder.layer, o, magnet.bert_extended_mask(am, o.dtype))
        ref_o = bert(ids, attention_mask=am).last_hidden_state
    assert isinstance(o, torch.Tensor) and o.shape == (2, cfg.max_tokens, 64)
    torch.testing.assert_close(o[am.bool()], ref_o[am.bool()])


# ---------------------------------------------------------------------------------------------
# Cross-modal Alignment Module (Eq. 5-11)


def make_cam_inputs():
    g = torch.Generator().manual_seed(0)
    P = torch.randn(2, 8 * 8, 16, generator=g)  # (B, H*W, C)
    O = torch.randn(2, 7, 24, generator=g)  # (B, L, C_t)
    text_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    return P, O, text_mask


def test_cam_shapes_and_bidirectional_update():
    torch.manual_seed(0)
    cam = magnet.CAM(16, 24, scales=(1, 2, 3, 6), heads=2, mlp_ratio=2)
    P, O, text_mask = make_cam_inputs()
    P1, O1, F_v = cam(P, O, (8, 8), text_mask)
    assert P1.shape == P.shape and O1.shape == O.shape and F_v.shape == P.shape
    assert len(cam.mlp_k) == 4 and cam.mlp_k[0][-1].out_features == 16 // 4  # Eq. (6): C/4
    assert cam.mlp_v[0].in_features == 16 + 4 * (16 // 4)  # Eq. (9): full branch + 4 pyramid
    assert cam.mlp_t[0].in_features == 16 + 4 * (16 // 4)  # Eq. (8)
    assert not torch.allclose(P1, P) and not torch.allclose(O1[0], O[0])  # both modalities move
    torch.testing.assert_close(O1[1, 4:], O[1, 4:])  # padding words are left alone
    # Padding words must not influence the pixels: change them, P_{i+1} stays the same.
    O_pad = O.clone()
    O_pad[1, 4:] = 100.0
    torch.testing.assert_close(cam(P, O_pad, (8, 8), text_mask)[0], P1)


def test_xmha_normalises_over_the_right_axes():
    """Words read a convex combination of pixels and pixels one of the non-padding words: if the
    source features are all equal, the attention weights must drop out of the result."""
    torch.manual_seed(0)
    xmha = magnet.XMHA(6, 5, 8, heads=2, bidirectional=True)
    pad = torch.tensor([[False] * 4, [False, False, True, True]])
    pixels = torch.randn(1, 1, 6).expand(2, 10, 6)  # every pixel the same
    words = torch.randn(2, 4, 5)
    _, o_p2t = xmha(pixels, words, pad)
    torch.testing.assert_close(o_p2t, xmha.out_t(xmha.proj_t(words) * xmha.value_v(pixels[:, :1])))
    words = torch.randn(1, 1, 5).repeat(2, 4, 1)  # every word the same ...
    words[1, 2:] = 50.0  # ... except padding, which must be ignored
    pixels = torch.randn(2, 10, 6)
    p_t2p, _ = xmha(pixels, words, pad)
    torch.testing.assert_close(p_t2p, xmha.out_v(xmha.proj_v(pixels) * xmha.value_t(words[:, :1])))


def test_cam_zero_gate_is_identity():
    torch.manual_seed(0)
    cam = magnet.CAM(16, 24, scales=(1, 2, 3, 6), heads=2, mlp_ratio=2)
    P, O, text_mask = make_cam_inputs()
    with torch.no_grad():
        cam.gate_v[-2].weight.zero_()  # tanh(0) = 0: the gate closes
        cam.gate_t[-2].weight.zero_()
    P1, O1, F_v = cam(P, O, (8, 8), text_mask)
    assert torch.equal(P1, P) and torch.equal(O1, O)
    assert F_v.abs().sum() > 0  # the decoder still sees the fused feature


# ---------------------------------------------------------------------------------------------
# Cross-modal Alignment Loss (Eq. 12-14) against a per-pixel loop


def naive_cal(feat, target, t_avg, tau1, tau2):
    """Eq. (13) and (14) pixel by pixel in float64 (with the InfoNCE log, see the docstring)."""
    l_p2p, l_p2t, n = 0.0, 0.0, 0
    for b in range(feat.shape[0]):
        pix = [
            feat[b, :, y, x].double() for y in range(feat.shape[2]) for x in range(feat.shape[3])
        ]
        pix = [p / p.norm() for p in pix]
        lab = target[b].flatten().tolist()
        pos = [p for p, m in zip(pix, lab, strict=True) if m > 0.5]
        neg = [p for p, m in zip(pix, lab, strict=True) if m <= 0.5]
        if not pos or not neg:
            continue
        n += 1
        avg_pos, avg_neg = sum(pos) / len(pos), sum(neg) / len(neg)
        avg_pos, avg_neg = avg_pos / avg_pos.norm(), avg_neg / avg_neg.norm()
        t = t_avg[b].double() / t_avg[b].double().norm()
        term_pos = term_neg = term_t = 0.0
        for i in pos:
            num = math.exp(float(i @ avg_pos) / tau1)
            term_pos += -math.log(num / (num + sum(math.exp(float(i @ j) / tau1) for j in neg)))
            num = math.exp(float(i @ t) / tau2)
            term_t += -math.log(num / (num + sum(math.exp(float(i @ j) / tau2) for j in neg)))
        for j in neg:
            num = math.exp(float(j @ avg_neg) / tau1)
            term_neg += -math.log(num / (num + sum(math.exp(float(j @ i) / tau1) for i in pos)))
        l_p2p += term_pos / len(pos) + term_neg / len(neg)
        l_p2t += term_t / len(pos)
    return l_p2p / n, l_p2t / n


def test_cal_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(3, 5, 3, 4, generator=g)  # (B, D, h, w)
    target = torch.zeros(3, 3, 4)
    target[0, 0:2, 1:3] = 1
    target[1, 2, :] = 1
    target[1, 0, 0] = 1
    # sample 2 has no foreground (no-target): it must be skipped, not produce NaN
    t_avg = torch.randn(3, 5, generator=g)
    p2p, p2t = magnet.cross_modal_alignment_loss(feat, target, t_avg, 0.1, 0.2)
    ref_p2p, ref_p2t = naive_cal(feat, target, t_avg, 0.1, 0.2)
    assert p2p.item() == pytest.approx(ref_p2p, rel=1e-5)
    assert p2t.item() == pytest.approx(ref_p2t, rel=1e-5)
    # Features are L2-normalised: scaling them changes nothing.
    p2p_s, p2t_s = magnet.cross_modal_alignment_loss(3 * feat, target, 7 * t_avg, 0.1, 0.2)
    assert p2p_s.item() == pytest.approx(p2p.item(), rel=1e-5)
    assert p2t_s.item() == pytest.approx(p2t.item(), rel=1e-5)
    # Switched-off terms are exactly zero.
    _, off = magnet.cross_modal_alignment_loss(feat, target, None, 0.1, 0.2, p2t=False)
    assert off.item() == 0.0


def test_cal_fixed_shapes_path_matches_the_loop():
    """Under torch.compile CAL runs on fixed shapes (each anchor against every pixel, the other
    class picked by a mask): the same sums as the per-sample loop."""
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(4, 5, 3, 4, generator=g)  # (B, D, h, w)
    target = torch.zeros(4, 3, 4)
    target[0, 0:2, 1:3] = 1
    target[1, 2, :] = 1
    target[3] = 1  # sample 2 empty, sample 3 all target: neither counts
    t_avg = torch.randn(4, 5, generator=g)
    I = torch.nn.functional.normalize(feat.flatten(2).transpose(1, 2), dim=-1)  # (B, h*w, D)
    for p2p, p2t in [(True, True), (True, False), (False, True)]:
        fixed = magnet._cal_fixed_shapes(I, target.flatten(1) > 0.5, t_avg, 0.1, 0.2, p2p, p2t)
        loop = magnet.cross_modal_alignment_loss(feat, target, t_avg, 0.1, 0.2, p2p, p2t)
        torch.testing.assert_close(torch.stack(fixed), torch.stack(loop))


# ---------------------------------------------------------------------------------------------
# Mask Grounding (Eq. 1-4)


def test_mask_words_fraction_and_special_tokens():
    g = torch.Generator().manual_seed(0)
    B, L = 300, 40
    n = torch.randint(0, L - 1, (B,), generator=g)  # words per sentence, 0..38
    n[:5] = 20  # 15% of 20 = 3 exactly
    ids = torch.zeros(B, L, dtype=torch.long)
    am = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        ids[b, 0], ids[b, n[b] + 1] = CLS, SEP
        ids[b, 1 : n[b] + 1] = torch.randint(5, 100, (int(n[b]),), generator=g)
        am[b, : n[b] + 2] = 1
    torch.manual_seed(0)
    masked, sel = magnet.mask_words(ids, am, 0.15, MASK)
    expected = torch.where(n > 0, torch.floor(0.15 * n + 0.5).clamp(min=1), 0)
    assert torch.equal(sel.sum(1), expected.long())
    assert torch.equal(sel[:5].sum(1), torch.full((5,), 3))
    frac = sel.sum() / n.sum()
    assert 0.15 <= frac < 0.20  # 15%, a little more from "at least one" on short sentences
    assert not sel[:, 0].any()  # never [CLS]
    assert not sel[torch.arange(B), n + 1].any()  # never [SEP]
    assert not (sel & (am == 0)).any()  # never padding
    assert (masked[sel] == MASK).all() and torch.equal(masked[~sel], ids[~sel])
    assert not sel[n == 0].any()  # "[CLS] [SEP]": nothing to mask
    # uniform choice: over many sentences every word position gets masked sometimes
    assert sel[:, 1:10].sum(0).min() > 0
    # a fixed generator gives the same words (used in eval mode)
    a = magnet.mask_words(ids, am, 0.15, MASK, torch.Generator().manual_seed(3))[1]
    b = magnet.mask_words(ids, am, 0.15, MASK, torch.Generator().manual_seed(3))[1]
    assert torch.equal(a, b)


def test_mask_words_never_hides_the_listed_tokens():
    """tiny() keeps articles: k counts only the words that may be hidden, and a sentence of
    articles only hides nothing."""
    THE = 51
    ids = torch.tensor([[CLS, THE, 7, 8, THE, 9, SEP, 0], [CLS, THE, THE, SEP, 0, 0, 0, 0]])
    am = (ids != 0).long()
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        masked, sel = magnet.mask_words(ids, am, 0.15, MASK, gen, never=(THE,))
        assert not sel[ids == THE].any()
        assert sel[0].sum() == 1 and sel[0, 2:6].any() and not sel[1].any()
        assert torch.equal(masked[ids == THE], ids[ids == THE])
    # without `never` the articles are words like any other (the paper's masking)
    picked = torch.stack(
        [
            magnet.mask_words(ids, am, 0.15, MASK, torch.Generator().manual_seed(s))[1]
            for s in range(40)
        ]
    )
    assert picked[:, 0, 1].any() and picked[:, 1].any()


def test_mask_words_bernoulli_rule_of_the_paper():
    """paper() (mask_rule "bernoulli", ovr-cnn's rule, which the authors point to): each word is
    hidden on its own with p = 0.15, so some sentences hide none; tiny() hides exactly k."""
    assert (magnet.Config.paper().mask_rule, magnet.Config.tiny().mask_rule) == (
        "bernoulli",
        "count",
    )
    B, n = 4000, 4
    ids = torch.full((B, n + 2), 9)
    ids[:, 0], ids[:, -1] = CLS, SEP
    am = torch.ones_like(ids)
    gen = torch.Generator().manual_seed(0)
    masked, sel = magnet.mask_words(ids, am, 0.15, MASK, gen, rule="bernoulli")
    assert not sel[:, 0].any() and not sel[:, -1].any()  # never [CLS] / [SEP]
    assert sel.float().sum() / (B * n) == pytest.approx(0.15, abs=0.01)
    assert (sel.sum(1) == 0).float().mean() == pytest.approx(0.85**4, abs=0.02)  # none hidden
    assert (masked[sel] == MASK).all() and torch.equal(masked[~sel], ids[~sel])
    with pytest.raises(ValueError, match="mask_rule"):
        magnet.mask_words(ids, am, 0.15, MASK, rule="some")


def test_tiny_keeps_the_articles_of_its_tokenizer_and_paper_masks_any_word():
    tok = data.build_tokenizer("bert", str(ROOT / "pretrained/tiny-bert"))
    cfg = magnet.Config.tiny()
    assert cfg.hide_articles is False and magnet.Config.paper().hide_articles is True
    assert set(cfg.article_ids) == set(tok.convert_tokens_to_ids(["a", "the"]))
    assert tok.unk_token_id not in cfg.article_ids
    # the model in eval mode (the diagnostics) never hides "the" either
    model = tiny_model().eval()
    images, ids, am, targets = make_batch(model.cfg, n_words=(4, 7, 5))
    ids[:, 1] = cfg.article_ids[-1]  # "the ..." as every demo expression
    with torch.no_grad():
        out = model(images, ids, am, targets)
    assert out["mg_selected"].sum() == 3 and not out["mg_selected"][:, 1].any()


def test_mask_centre():
    masks = torch.zeros(3, 8, 8)
    masks[0, 0:4, 4:8] = 1  # x in columns 4..7, y in rows 0..3
    masks[1, 7, 0] = 1
    centre = magnet.mask_centre(masks)
    torch.testing.assert_close(centre[0], torch.tensor([6 / 8, 2 / 8]))
    torch.testing.assert_close(centre[1], torch.tensor([0.5 / 8, 7.5 / 8]))
    torch.testing.assert_close(centre[2], torch.tensor([-1.0, -1.0]))  # empty: outside the image
    # C and the image tokens' positions share one frame: a one-pixel mask at (row r, column c)
    # has the centre of token r * w + c of the grid.
    grid = magnet.grid_centres(8, 8, "cpu")
    torch.testing.assert_close(centre[1], grid[7 * 8 + 0])
    expected = [[x / 6, y / 4] for y in (1, 3) for x in (1, 3, 5)]  # row-major (x, y), 2 x 3 map
    torch.testing.assert_close(magnet.grid_centres(2, 3, "cpu"), torch.tensor(expected))


def test_mask_encoder_uses_gt_centre():
    model = tiny_model(mask_input="centre").train()
    calls = []
    model.grounding.mask_encoder.register_forward_hook(
        lambda m, inp, out: calls.append((inp[0].detach(), out.detach()))
    )
    batch = make_batch(model.cfg)
    images, ids, am, targets = batch
    out_a = run(model, batch)
    moved = {**targets, "masks": torch.roll(targets["masks"], shifts=(9, 5), dims=(1, 2))}
    out_b = run(model, (images, ids, am, moved))
    (in_a, c_a), (in_b, c_b) = calls[1], calls[3]  # calls 0 and 2 embed the image-token grid
    torch.testing.assert_close(in_a, magnet.mask_centre(targets["masks"]))
    torch.testing.assert_close(in_b, magnet.mask_centre(moved["masks"]))
    assert not torch.allclose(in_a, in_b) and not torch.allclose(c_a, c_b)
    assert out_a["losses"]["grounding"] != out_b["losses"]["grounding"]


def test_centre_on_words_adds_the_centres_c_to_every_word():
    """The demo (tiny(): centre_on_words) adds the centre's C to every word's embedding as well as
    feeding it as the paper's token; the image and C tokens stay as they were. paper() and the
    Table 3 Center rows keep C as one token only."""
    model = tiny_model().train()
    assert model.cfg.centre_on_words and not magnet.Config.paper().centre_on_words
    for table, row in [
        ("Table 3a", "+MG Mask Grounding"),
        ("Table 3b", "Center mask centre coordinates"),
    ]:
        assert magnet.TABLES[table][row]["set"]["centre_on_words"] is False
    seen = []
    model.grounding.predictor.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    batch = make_batch(model.cfg)
    run(model, batch)
    model.grounding.centre_on_words = False
    run(model, batch)
    L = batch[1].shape[1]
    with torch.no_grad():
        C = model.grounding.mask_encoder(magnet.mask_centre(batch[3]["masks"]))  # (B, D_g)
    torch.testing.assert_close(
        seen[0][:, :L] - seen[1][:, :L], C[:, None].expand_as(seen[0][:, :L])
    )
    torch.testing.assert_close(seen[0][:, L:], seen[1][:, L:])  # image tokens and the two C


def test_average_mask_input_pools_p_inside_the_gt_mask():
    """Table 3b "Average" (one of the demo's two C tokens): C = MLP(mean of P's tokens under the
    GT mask), so moving the mask moves C, and a mask inside one cell gives exactly that cell's
    feature."""
    model = tiny_model(mask_input="average").train()
    assert tiny_config().mask_input == "centre+average"  # the demo's: the centre's C and this one
    calls = []
    model.grounding.average_encoder.register_forward_hook(
        lambda m, inp, out: calls.append((inp[0].detach(), out.detach()))
    )
    P_seen = []
    model.grounding.image_proj.register_forward_hook(lambda m, inp, out: P_seen.append(out))
    images, ids, am, targets = make_batch(model.cfg)
    g, H = model.cfg.grounding_grid, targets["masks"].shape[-1]
    cell = H // g
    one_cell = torch.zeros_like(targets["masks"])
    one_cell[:, cell * 2 : cell * 3, cell * 5 : cell * 6] = 1  # cell (row 2, column 5)
    out_a = run(model, (images, ids, am, {**targets, "masks": one_cell}))
    out_b = run(model, (images, ids, am, {**targets, "masks": one_cell.roll(cell, 1)}))
    (avg_a, c_a), (avg_b, c_b) = calls
    torch.testing.assert_close(avg_a, P_seen[0][:, 2 * g + 5])  # (B, D_g) the cell's token
    torch.testing.assert_close(avg_b, P_seen[1][:, 3 * g + 5])  # one cell lower
    assert not torch.allclose(c_a, c_b)
    assert out_a["losses"]["grounding"] != out_b["losses"]["grounding"]


def test_paper_mask_token_is_trainable_under_the_paper_recipe():
    """§3.2: "a special learnable mask token". RECIPE freezes bert.embeddings (LAVT's optimizer),
    which holds BERT's [MASK] row, so paper() (own_mask_token) gives Mask Grounding its own [MASK]
    embedding, started from BERT's row: train.py's freezing leaves it trainable and it receives
    a gradient. tiny() reads BERT's row (the demo recipe freezes nothing)."""
    assert magnet.Config.paper().own_mask_token and not magnet.Config.tiny().own_mask_token
    model = tiny_model(own_mask_token=True).train()
    bert_mask = model.bert.embeddings.word_embeddings.weight[model.cfg.mask_token_id]
    assert torch.equal(model.grounding.mask_token, bert_mask)
    train.build_optimizer(model, magnet.RECIPE, torch.device("cpu"), warn=False)
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad  # LAVT: frozen
    assert model.grounding.mask_token.requires_grad
    out = run(model, make_batch(model.cfg))
    out["loss"].backward()
    assert model.grounding.mask_token.grad.abs().sum() > 0
    # The token is what [MASK] reads: moving it moves the grounding loss.
    with torch.no_grad():
        model.grounding.mask_token.add_(torch.randn_like(model.grounding.mask_token))
    assert run(model, make_batch(model.cfg))["losses"]["grounding"] != out["losses"]["grounding"]
    # tiny()'s [MASK] is BERT's row, which the paper recipe would freeze.
    tiny = tiny_model()
    assert not hasattr(tiny.grounding, "mask_token")
    train.build_optimizer(tiny, magnet.RECIPE, torch.device("cpu"), warn=False)
    assert not tiny.bert.embeddings.word_embeddings.weight.requires_grad


def test_mask_head_init_paper_default_tiny_prior():
    """paper(): Mask2Former's mask = embedding . I, default init, no bias; tiny() starts the head
    at p = mask_prior everywhere (a learnt bias, a small last layer)."""
    assert magnet.Config.paper().mask_prior is None
    torch.manual_seed(0)
    paper = magnet.Decoder([8, 16, 32, 64], 16, 2, None)
    assert paper.mask_bias is None and paper.mask_embed[-1].weight.std() > 0.05
    tiny = magnet.Decoder([8, 16, 32, 64], 16, 2, 0.03)
    feats = [torch.randn(2, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate([8, 16, 32, 64])]
    with torch.no_grad():
        assert float(torch.sigmoid(tiny.mask_bias)) == pytest.approx(0.03)
        assert float(torch.sigmoid(tiny(feats)[1]).mean()) == pytest.approx(0.03, abs=0.01)


@pytest.mark.parametrize("stage", [1, 2, 4])
def test_grounding_inputs_are_text_free_except_the_masked_text(stage):
    """Eq. (2): P = ImageEncoder(I). Changing only the hidden word (the word under [MASK]) must
    leave every input of the masked token predictor as it was: O sees [MASK], P and M see no text.
    (A P taken after any CAM would carry the unmasked word into the predictor.)"""
    # Training mode with one torch seed: the same words are hidden in both runs (in eval mode
    # the hidden words depend on the sentence's own tokens, so they would move).
    model = tiny_model(grounding_stage=stage).train()
    batch = make_batch(model.cfg)
    images, ids, am, targets = batch
    seen = []
    model.grounding.register_forward_hook(
        lambda m, inp, out: seen.append([t.detach().clone() for t in inp if torch.is_tensor(t)])
    )
    with torch.no_grad():
        out = run(model, batch)
        hidden = seen[0][2]  # the `selected` input, (B, L) bool
        assert hidden.sum() > 0
        swapped = ids.clone()
        swapped[hidden] = torch.where(ids[hidden] == 5, 6, 5)  # another word, same position
        out_b = run(model, (images, swapped, am, targets))
    own_a, own_b = seen
    assert own_a[3].shape[1] == model.swin.config.embed_dim * 2 ** (stage - 1)  # P: (B, d_s, g, g)
    assert torch.equal(own_b[2], hidden)  # the same words hidden in both runs
    assert len(own_a) == 5
    for a, b in zip(own_a, own_b, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ... while the segmentation pass does read the changed word.
    assert not torch.allclose(out["mask_logits"], out_b["mask_logits"])


def test_grounding_context_switches():
    """Table 3a/3b: MLM sees words only; "none" adds image tokens; "centre" / "average" add C;
    "centre+average" (the demo's) adds both."""
    batch = make_batch(tiny_config())
    sizes = {}
    for name, changes in {
        "mlm": {"ablate": ("mlm_only",)},
        "none": {"mask_input": "none"},
        "centre": {"mask_input": "centre"},
        "average": {"mask_input": "average"},
        "centre+average": {},
    }.items():
        model = tiny_model(**changes).eval()
        lengths = []
        model.grounding.predictor.register_forward_hook(
            lambda m, inp, out, lengths=lengths: lengths.append(inp[0].shape[1])
        )
        with torch.no_grad():
            out = model(*batch)
        assert torch.isfinite(out["losses"]["grounding"])
        sizes[name] = lengths[0]
    L, g = make_batch(tiny_config())[1].shape[1], tiny_config().grounding_grid
    assert sizes == {
        "mlm": L,
        "none": L + g * g,
        "centre": L + g * g + 1,
        "average": L + g * g + 1,
        "centre+average": L + g * g + 2,  # both C tokens
    }
    with pytest.raises(ValueError, match="mask_input"):
        tiny_model(mask_input="box")


class StubTokenizer:
    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return f"w{ids}"
        return [f"w{i}" for i in ids]


def test_eval_forward_with_targets_reports_the_mechanism():
    model = tiny_model()
    batch = make_batch(model.cfg)
    out = run(model.train(), batch)
    assert set(out["losses"]) == {"bce", "dice", "p2p", "p2t", "grounding"}
    assert "mg_correct" not in out and "cal_cos_text" not in out
    model.eval()
    with torch.no_grad():
        out = model(*batch)
        again = model(*batch)
        plain = model(*batch[:3])
    assert set(out["losses"]) == {"bce", "dice", "p2p", "p2t", "grounding"}
    assert set(plain) == {"mask_logits"}
    torch.testing.assert_close(out["mask_logits"], plain["mask_logits"])  # targets change nothing
    # The eval masking is deterministic, and both grounding passes score the same words.
    assert torch.equal(out["mg_selected"], again["mg_selected"])
    # ... and each sentence hides the same words alone as in the batch (the diagnostic does not
    # depend on the eval batch size).
    images, ids, am, targets = batch
    alone = model(images[1:], ids[1:], am[1:], {k: v[1:] for k, v in targets.items()})
    assert torch.equal(alone["mg_selected"][0], out["mg_selected"][1])
    assert (out["mg_selected"].sum(1) == 1).all()  # 4 and 7 words -> one masked word each
    n = int(out["mg_selected"].sum())
    assert out["mg_correct"].shape == out["mg_correct_other"].shape == (n,)
    assert out["cal_cos_text"].shape == (2, 16, 16) and out["cal_cos_text"].abs().max() <= 1 + 1e-5
    panels = magnet.sample_extra(out, 1, StubTokenizer())
    cos, caption, scale = panels[0]
    assert cos.shape == (16, 16) and scale == (-1.0, 1.0)
    pos = int(out["mg_selected"][1].nonzero())
    word, guess = int(batch[1][1, pos]), int(out["mg_guess"][1])  # sample 1's word is 2nd
    other = int(out["mg_guess_other"][1])
    assert panels[1] == (
        None, f"Mask Grounding: 'w{word}' -> w{guess} (other image: w{other})"
    )  # fmt: skip
    assert magnet.sample_extra(plain, 0, StubTokenizer()) == [(None, "")]


def test_diagnostics_on_a_hand_made_case():
    outputs = {
        "mg_correct": torch.tensor([True, True, False, True]),
        "mg_correct_other": torch.tensor([True, False, False, False]),
        "losses": {"bce": torch.tensor(0.3), "p2p": torch.tensor(2.5), "p2t": torch.tensor(1.25)},
    }
    d = magnet.diagnostics(outputs, {})
    assert d == pytest.approx(
        {"mg_acc_own": 0.75, "mg_acc_other": 0.25, "mg_gain": 0.5, "cal_p2p": 2.5, "cal_p2t": 1.25}
    )
    assert all(isinstance(v, float) for v in d.values())
    # A batch of one has no other sample: own accuracy only, the rest undefined (NaN).
    d = magnet.diagnostics({"mg_correct": torch.tensor([False, True]), "losses": {}}, {})
    assert d["mg_acc_own"] == 0.5 and math.isnan(d["mg_acc_other"]) and math.isnan(d["mg_gain"])
    assert magnet.diagnostics({"losses": {"bce": torch.tensor(1.0)}}, {}) == {}
    # And on the model: the other sample's image and mask are the batch rolled by one.
    model = tiny_model().eval()
    with torch.no_grad():
        out = model(*make_batch(model.cfg, n_words=(4, 7, 5)))
    d = magnet.diagnostics(out, {})
    assert set(d) == {"mg_acc_own", "mg_acc_other", "mg_gain", "cal_p2p", "cal_p2t"}
    assert d["mg_acc_own"] == pytest.approx(out["mg_correct"].float().mean().item())


def test_cal_warmup_ramps_the_weight():
    model = tiny_model(cal_warmup=4).train()
    batch = make_batch(model.cfg)
    for step in range(6):
        out = run(model, batch)
        lo = out["losses"]
        seg = 2 * lo["bce"] + 2 * lo["dice"] + lo["grounding"]
        weight = min(1.0, (step + 1) / 4) * 0.5
        torch.testing.assert_close(out["loss"].detach(), seg + weight * (lo["p2p"] + lo["p2t"]))
    assert int(model.step) == 6 and "step" in model.state_dict()  # resumes with the weights


def test_segmentation_loss_sees_the_full_resolution_mask():
    """A 2x2-pixel object between the stride-4 sampling points vanishes from a GT shrunk by
    nearest neighbour; the loss on upsampled logits still sees it (LAVT, Mask2Former)."""
    model = tiny_model()
    S = model.cfg.image_size
    logits = torch.full((1, 1, S // 4, S // 4), -3.0)  # "no object anywhere"
    empty = torch.zeros(1, S, S)
    small = empty.clone()
    small[0, 1:3, 1:3] = 1  # nearest 64 -> 16 reads rows / columns 0, 4, 8, ...
    assert magnet.common.fit_target(small, logits).sum() == 0  # what a shrunk GT would see
    with_obj, without = (
        model.segmentation_loss(logits, small),
        model.segmentation_loss(logits, empty),
    )
    assert with_obj["bce"] > without["bce"]  # the missed pixels cost
    assert not torch.isclose(with_obj["dice"], without["dice"])


# ---------------------------------------------------------------------------------------------
# The whole model


def test_forward_backward_tiny_every_parameter_gets_a_gradient():
    model = tiny_model().train()
    cfg = model.cfg
    batch = make_batch(cfg)
    out = run(model, batch)
    side = cfg.image_size // cfg.vision_config["patch_size"]  # stride-4 mask logits
    assert out["mask_logits"].shape == (2, 1, side, side)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    expected = (
        2 * out["losses"]["bce"]
        + 2 * out["losses"]["dice"]
        + 0.5 * (out["losses"]["p2p"] + out["losses"]["p2t"])
        + out["losses"]["grounding"]
    )
    torch.testing.assert_close(out["loss"].detach(), expected)  # Eq. (15)
    out["loss"].backward()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["swin.layernorm.weight", "swin.layernorm.bias"]
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert missing == []


def test_training_step_compiles_without_graph_breaks():
    """train.py --compile: the tiny training step (CAL warm-up on) is one graph. While compiling,
    CAL and the grounding loss take fixed-shape paths (no indexing whose output size depends on
    the data). Compiled with the min-cut partitioner inductor uses, forward + backward run twice
    without a recompile: the backward may read the step counter, which is replaced, not changed
    in place (in place it failed: "modified by an inplace operation")."""
    model = tiny_model(cal_warmup=500).train()
    images, ids, am, targets = make_batch(model.cfg)
    explanation = torch._dynamo.explain(model)(images, ids, am, targets=targets)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(model, backend="aot_eager_decomp_partition", fullgraph=True)
    for step in (2, 3):  # explain's call was the first step
        with torch._dynamo.config.patch(error_on_recompile=step == 3):
            out = compiled(images, ids, am, targets=targets)
        out["loss"].backward()
        lo = out["losses"]
        warm = step / 500  # the CAL weight at this step
        total = 2 * lo["bce"] + 2 * lo["dice"] + warm * 0.5 * (lo["p2p"] + lo["p2t"])
        torch.testing.assert_close(out["loss"].detach(), total + lo["grounding"])
        assert int(model.step) == step
    assert model.grounding.lang_proj.weight.grad.abs().sum() > 0
    assert model.decoder.mask_features.weight.grad.abs().sum() > 0


def test_overfit_one_batch():
    model = tiny_model().train()
    batch = make_batch(model.cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    total, seg = [], []
    for _ in range(15):
        out = model(*batch)
        total.append(out["loss"].item())
        seg.append(float(out["losses"]["bce"] + out["losses"]["dice"]))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert sum(total[-5:]) < 0.5 * sum(total[:5]), total
    assert sum(seg[-5:]) < 0.85 * sum(seg[:5]), seg


def test_each_ablation_changes_the_computation():
    """Each switch, with the base model's weights copied in wherever the shapes still match,
    changes exactly what it should."""
    base = tiny_model()
    batch = make_batch(base.cfg)
    ref = run(base, batch)
    state = base.state_dict()

    def ablated(**changes):
        model = tiny_model(seed=5, **changes)
        own = model.state_dict()
        model.load_state_dict(
            {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, False
        )
        return model, run(model, batch)

    model, out = ablated(ablate=("no_mg",))
    assert model.grounding is None and "grounding" not in out["losses"]
    torch.testing.assert_close(out["mask_logits"], ref["mask_logits"])
    torch.testing.assert_close(out["loss"], ref["loss"] - ref["losses"]["grounding"])

    model, out = ablated(ablate=("mlm_only",))
    assert not hasattr(model.grounding, "mask_encoder")
    torch.testing.assert_close(out["mask_logits"], ref["mask_logits"])
    assert out["losses"]["grounding"] != ref["losses"]["grounding"]

    for name in ("no_p2p", "no_p2t"):
        model, out = ablated(ablate=(name,))
        term = name.removeprefix("no_")
        assert term not in out["losses"]
        torch.testing.assert_close(out["loss"], ref["loss"] - 0.5 * ref["losses"][term])

    model, out = ablated(ablate=("no_cam",))
    assert all(len(c.mlp_k) == 0 and not c.bidirectional for c in model.cams)
    assert not torch.allclose(out["mask_logits"], ref["mask_logits"])

    model, out = ablated(cam_scales=(1, 2))
    assert all(len(c.mlp_k) == 2 for c in model.cams)
    assert not torch.allclose(out["mask_logits"], ref["mask_logits"])


def test_unknown_ablation_raises():
    cfg = tiny_config(ablate=("no_mg", "nope"))
    with pytest.raises(ValueError, match="unknown ablation 'nope' for magnet; choose from no_mg"):
        magnet.build_model(cfg)


def test_paper_config_architecture():
    cfg = magnet.Config.paper()
    assert cfg.vision_config["depths"] == [2, 2, 18, 2] and cfg.vision_config["embed_dim"] == 128
    assert cfg.text_config["num_hidden_layers"] % len(cfg.vision_config["depths"]) == 0  # 3 each
    assert (cfg.image_size, cfg.max_tokens, cfg.cam_scales) == (480, 20, (1, 2, 3, 6))
    assert (cfg.predictor_layers, cfg.mask_ratio) == (8, 0.15)
    assert (cfg.lambda_bce, cfg.lambda_dice, cfg.lambda_cal, cfg.lambda_grounding) == (2, 2, 0.5, 1)


def test_from_pretrained_local_dirs(tmp_path):
    cfg = tiny_config()
    torch.manual_seed(0)
    swin, bert = magnet.build_encoders(cfg)
    swin.save_pretrained(tmp_path / "swin")
    bert.save_pretrained(tmp_path / "bert")
    cfg = dataclasses.replace(
        cfg, pretrained=True, vision_name=str(tmp_path / "swin"), text_name=str(tmp_path / "bert")
    )
    model = magnet.build_model(cfg)
    torch.testing.assert_close(
        model.swin.embeddings.patch_embeddings.projection.weight,
        swin.embeddings.patch_embeddings.projection.weight,
    )
    torch.testing.assert_close(
        model.bert.encoder.layer[-1].output.dense.weight, bert.encoder.layer[-1].output.dense.weight
    )
    out = run(model.train(), make_batch(cfg))
    assert torch.isfinite(out["loss"])
    with pytest.raises(RuntimeError, match="could not load"):
        magnet.build_model(dataclasses.replace(cfg, vision_name=str(tmp_path / "missing")))


def test_tiny_preset_loads_the_shipped_pretrained_encoders():
    """Config.tiny() reads pretrained/tiny-swin and pretrained/tiny-bert with from_pretrained, and
    its written-out configs (for --no-pretrained) are those folders' architectures."""
    cfg = magnet.Config.tiny()
    assert cfg.pretrained and (cfg.vision_name, cfg.text_name) == (
        "pretrained/tiny-swin",
        "pretrained/tiny-bert",
    )
    swin, bert = magnet.build_encoders(cfg)
    for key, value in cfg.vision_config.items():
        assert getattr(swin.config, key) == value, key
    for key, value in cfg.text_config.items():
        assert getattr(bert.config, key) == value, key
    assert bert.config.num_hidden_layers == len(cfg.vision_config["depths"])  # 1 per CAM stage
    assert bert.config.vocab_size == cfg.vocab_size
    folder = magnet.Path(magnet.__file__).parent / cfg.vision_name
    shipped = magnet.SwinModel.from_pretrained(folder).state_dict()
    for name, weight in swin.state_dict().items():
        torch.testing.assert_close(weight, shipped[name])


def test_every_table_row_builds_and_trains_a_step():
    """Each TABLES row, as train.py --row applies it (its ablations and Config overrides), builds
    on the tiny preset and takes one optimiser step; rows that cannot be built say why."""
    names, built = set(), {}
    batch = make_batch(tiny_config(), n_words=(4, 5))
    for table, rows in magnet.TABLES.items():
        assert table.startswith("Table 3") and len(rows) >= 3
        assert sum(bool(spec.get("baseline")) for spec in rows.values()) == 1
        for key, spec in rows.items():
            row_id = key.split()[0]
            assert (table, row_id) not in names
            names.add((table, row_id))
            assert set(spec["paper"]) == {"oIoU", "oIoU_refcoco+"}
            if "skip" in spec:
                assert isinstance(spec["skip"], str) and spec["skip"]
                continue
            assert all(a in magnet.ABLATIONS for a in spec.get("ablate", ()))
            recipe = (tuple(sorted(spec.get("ablate", ()))), repr(spec.get("set", {})))
            if recipe in built:  # the same model as an earlier row (LAVT is in every table)
                continue
            model = tiny_model(ablate=tuple(spec.get("ablate", ())), **spec.get("set", {}))
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            out = run(model.train(), batch)
            out["loss"].backward()
            opt.step()
            assert torch.isfinite(out["loss"]), (table, key)
            built[recipe] = out["losses"]
    assert len(names) == 26 and len(built) == 15
    lavt = magnet.TABLES["Table 3a"]["Baseline LAVT"]
    assert set(lavt["ablate"]) == {"no_mg", "no_cam", "no_p2p", "no_p2t"}  # LAVT, not "no MG"


CENTER_ROWS = {  # the rows that measure the paper's Mask Grounding (Center input)
    "Table 3a": ["+MG Mask Grounding"],
    "Table 3b": ["Center mask centre coordinates"],
    "Table 3c": ["4 predictor layers", "8 predictor layers", "12 predictor layers"],
    "Table 3d": ["LAVT+MG"],
}


def test_table_rows_carry_the_papers_setting_and_one_number_per_build():
    """Every built Table 3 row ran at 224 px for 10 epochs (§4.4): recipe overrides (RECIPE keys
    or image_size) that train.py --row applies under --recipe paper. Two rows that build the same
    model (paper(), their ablations and overrides) with the same recipe carry the same number.
    Every Mask Grounding row masks as the paper; the Center rows read the centre as one token."""
    builds = {}
    for table, rows in magnet.TABLES.items():
        for key, spec in rows.items():
            if "skip" in spec:
                continue
            assert spec["recipe"] == {"image_size": 224, "epochs": 10}, (table, key)
            assert set(spec["recipe"]) <= set(magnet.RECIPE) | {"image_size"}
            cfg = dataclasses.replace(magnet.Config.paper(), **spec.get("set", {}))
            build = (repr(dataclasses.asdict(cfg)), tuple(sorted(spec["ablate"])),
                     repr(sorted(spec["recipe"].items())))  # fmt: skip
            builds.setdefault(build, {})[f"{table} {key}"] = spec["paper"]
            if "no_mg" not in spec["ablate"]:  # the paper's masking, whatever the preset
                for field in ("hide_articles", "mask_rule", "own_mask_token"):
                    assert spec["set"][field] == getattr(magnet.Config.paper(), field), key
            if key in CENTER_ROWS.get(table, ()):
                assert (spec["set"]["mask_input"], spec["set"]["centre_on_words"]) == (
                    "centre",
                    False,
                )
    for rows in builds.values():
        assert len({repr(p) for p in rows.values()}) == 1, rows
    lavt = [rows for rows in builds.values() if "Table 3a Baseline LAVT" in rows][0]
    assert len(lavt) == 6  # the baseline of every table is one build, one number
    mg = [rows for rows in builds.values() if "Table 3a +MG Mask Grounding" in rows][0]
    assert set(mg) == {"Table 3a +MG Mask Grounding", "Table 3b Center mask centre coordinates",
                       "Table 3c 8 predictor layers", "Table 3d LAVT+MG"}  # fmt: skip


def test_recipe_is_lavts():
    r = magnet.RECIPE
    assert (r["optimizer"], r["lr"], r["weight_decay"], r["schedule"]) == (
        "adamw",
        5e-5,
        0.01,
        "poly",
    )
    assert (r["epochs"], r["batch_size"], r["warmup"], r["grad_clip"]) == (40, 32, 0, 0.0)
    assert r["encoder_lr_factor"] == 1.0 and "iterations" not in r
    # train.py freezes the parameters named `prefix` or `prefix.*`: BERT-base's embeddings and
    # its layers 10-11 (the tiny BERT has layers 0-3 only, so check the names on its pattern).
    names = [n for n, _ in tiny_model().named_parameters()]
    assert r["frozen"] == ("bert.embeddings", "bert.encoder.layer.10", "bert.encoder.layer.11")
    assert any(n.startswith("bert.embeddings.") for n in names)
    assert any(n.startswith("bert.encoder.layer.3.") for n in names)
