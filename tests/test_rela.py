"""Tests for rela.py: each component against its equation, then the whole model on tiny configs."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel, SwinBackbone, SwinConfig

import rela


def small_cfg(**kw) -> rela.Config:
    """Smaller than Config.tiny() where the test allows (fast on 2 busy cores)."""
    return dataclasses.replace(rela.Config.tiny(), dec_layers=2, **kw)


def make_batch(cfg: rela.Config, B: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    S, L = cfg.image_size, cfg.max_tokens
    images = torch.randn(B, 3, S, S, generator=g)
    input_ids = torch.randint(5, cfg.vocab_size, (B, L), generator=g)
    lengths = [4, 7][:B] + [5] * max(0, B - 2)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(lengths):  # [CLS] w1..wn [SEP] [PAD]...
        input_ids[b, 0], input_ids[b, n + 1], input_ids[b, n + 2 :] = 2, 3, 0
        attention_mask[b, : n + 2] = 1
    masks = torch.zeros(B, S, S)
    masks[0, S // 4 : S // 2, S // 8 : S // 2] = 1  # a target; the last sample has none
    targets = {"masks": masks, "no_target": torch.tensor([False] * (B - 1) + [True])}
    return images, input_ids, attention_mask, targets


# ---------------------------------------------------------------------------------------------
# Components


def test_ria_is_eq2_softmax_over_pixels():
    torch.manual_seed(0)
    B, N, HW, C = 2, 9, 12, 16
    ria = rela.RIA(C, heads=1)
    Q_r, F_i = torch.randn(B, N, C), torch.randn(B, HW, C)
    F_r_prime, A_ri = ria(Q_r, F_i, torch.zeros(HW, C), (3, 4))
    assert A_ri.shape == (B, 1, N, HW)
    torch.testing.assert_close(A_ri.sum(-1), torch.ones(B, 1, N))  # each region: a map over pixels
    # Eq. (2) written out, single head: softmax(Q_r σ(F_i W_ik)^T / sqrt(C)), F'_r = A σ(F_i W_iv).
    K, V = F.gelu(ria.W_ik(F_i)), F.gelu(ria.W_iv(F_i))
    A = torch.softmax(Q_r @ K.transpose(1, 2) / math.sqrt(C), dim=2)  # dim 2 = pixels
    torch.testing.assert_close(A_ri[:, 0], A)
    torch.testing.assert_close(F_r_prime, A @ V)
    # Multi-head attention still normalises every head over pixels.
    _, A_ri = rela.RIA(C, heads=4)(Q_r, F_i, torch.zeros(HW, C), (3, 4))
    torch.testing.assert_close(A_ri.sum(-1), torch.ones(B, 4, N))


def test_hard_split_averages_the_cells():
    torch.manual_seed(0)
    ria = rela.RIA(8, heads=2)
    F_i = torch.randn(1, 16, 8)  # a 4x4 map, P = 2 -> four 2x2 cells
    pooled, A = ria(torch.randn(1, 4, 8), F_i, torch.zeros(16, 8), (4, 4), hard_split=True)
    V = F.gelu(ria.W_iv(F_i)).reshape(4, 4, 8)
    assert A is None
    torch.testing.assert_close(pooled[0, 1], V[0:2, 2:4].mean((0, 1)))  # cell (0, 1)
    torch.testing.assert_close(pooled[0, 2], V[2:4, 0:2].mean((0, 1)))  # cell (1, 0)


def test_rla_language_attention_ignores_padding():
    torch.manual_seed(0)
    rla = rela.RLA(16, heads=2, ffn=32).eval()
    F_r_prime, pos = torch.randn(2, 4, 16), torch.zeros(4, 16)
    F_t, word_mask = torch.randn(2, 6, 16), torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6])
    F_t2 = F_t.clone()
    F_t2[0, 3:] = 100.0  # change only padded words
    for language_att in (True, False):
        a = rla(F_r_prime, pos, F_t, word_mask, language_att=language_att)
        b = rla(F_r_prime, pos, F_t2, word_mask, language_att=language_att)
        torch.testing.assert_close(a, b)


def test_minimap_target_matches_released_rule():
    # 20x20 mask, P = 10: bilinear (align_corners=False) samples at 2i + 0.5, i.e. each minimap cell
    # is the mean of one 2x2 block, then .long() truncates: 1 only for a fully covered block.
    mask = torch.zeros(1, 20, 20)
    mask[0, 4:10, 4:9] = 1  # rows 4-9 = blocks 2-4; cols 4-8: blocks 2-3 full, block 4 half
    mask[0, 0, 0] = mask[0, 0, 1] = mask[0, 1, 0] = 1  # block (0, 0) at 0.75: truncated to 0
    mask[0, 18:20, 18:20] = 1  # block (9, 9) full
    expected = np.zeros((10, 10), dtype=np.int64)
    expected[2:5, 2:4] = 1
    expected[9, 9] = 1
    target = rela.minimap_target(mask, 10)
    assert target.dtype == torch.long and target.shape == (1, 100)
    np.testing.assert_array_equal(target.reshape(10, 10).numpy(), expected)
    # Same as the released code's expression on a (B, 1, H, W) mask.
    released = F.interpolate(mask[:, None], size=(10, 10), mode="bilinear").long().flatten(1)
    torch.testing.assert_close(target, released)


def test_eq1_fusion_equals_naive_loop():
    torch.manual_seed(0)
    x_r, M_r = torch.rand(2, 9), torch.randn(2, 9, 5, 6)
    M = torch.zeros(2, 1, 5, 6)
    for b in range(2):
        for n in range(9):
            M[b, 0] += x_r[b, n] * M_r[b, n]  # M = Σ_n x_r^n M_r^n
    torch.testing.assert_close(rela.fuse_region_masks(x_r, M_r), M)


def test_language_aware_swin_structure():
    """Fails loudly if transformers' Swin internals change: with fusion off, iterating the stages
    must reproduce SwinBackbone's own feature maps (strides 4..32, channels C..8C)."""
    torch.manual_seed(0)
    cfg = small_cfg()
    backbone = SwinBackbone(SwinConfig(**cfg.vision_config, out_features=rela.SWIN_STAGES)).eval()
    vision = rela.LanguageAwareSwin(backbone, text_dim=32).eval()
    images = torch.randn(2, 3, 64, 64)
    words, word_mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        ours = vision(images, words, word_mask, fuse=False)
        ref = backbone(images).feature_maps
        fused = vision(images, words, word_mask, fuse=True)
    assert len(backbone.swin.encoder.layers) == 4
    E = cfg.vision_config["embed_dim"]
    for i, (a, b, c) in enumerate(zip(ours, ref, fused, strict=True)):
        assert (
            a.shape == b.shape == c.shape == (2, E * 2**i, 64 // 2 ** (i + 2), 64 // 2 ** (i + 2))
        )
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, c)  # PWAM changes what the decoder sees


# ---------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("P", [10, 5])
def test_forward_backward_shapes(P):
    torch.manual_seed(0)
    cfg = rela.Config.tiny() if P == 10 else small_cfg(P=P)
    model = rela.build_model(cfg).train()
    images, ids, am, targets = make_batch(cfg)
    out = model(images, ids, am, targets)
    B, s = 2, cfg.image_size // 4
    assert out["mask_logits"].shape == (B, 1, s, s)
    assert out["no_target_logits"].shape == (B,)
    assert out["minimap"].shape == (B, cfg.P, cfg.P)
    assert ((out["minimap"] >= 0) & (out["minimap"] <= 1)).all()
    assert set(out["losses"]) == {"mask", "minimap", "no_target"}
    expected = cfg.loss_scale * (
        out["losses"]["mask"] + 0.1 * out["losses"]["minimap"] + 0.1 * out["losses"]["no_target"]
    )
    torch.testing.assert_close(out["loss"].detach(), expected)
    out["loss"].backward()
    extra, caption = rela.sample_extra(out, 1, tokenizer=None)
    assert extra.shape == (cfg.P, cfg.P) and caption.startswith("no-target p=")


def test_every_trainable_parameter_gets_a_gradient():
    torch.manual_seed(0)
    cfg = rela.Config.tiny()  # 3 decoder layers: every pixel-decoder level is read by RIA
    model = rela.build_model(cfg).train()
    images, ids, am, targets = make_batch(cfg)
    model(images, ids, am, targets)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    # Zero-initialised gates (ReLA) give their first Linear an exactly-zero gradient on step 1.
    zero = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad.abs().sum() == 0 and not n.startswith("vision.gates.")
    ]
    assert not zero, zero
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == [
        "vision.backbone.swin.layernorm.weight",
        "vision.backbone.swin.layernorm.bias",
    ]


def test_overfit_one_batch():
    torch.manual_seed(0)
    cfg = small_cfg()
    model = rela.build_model(cfg).train()
    images, ids, am, targets = make_batch(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = model(images, ids, am, targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_no_target_empties_the_output():
    torch.manual_seed(0)
    cfg = small_cfg()
    model = rela.build_model(cfg).eval()
    images, ids, am, _ = make_batch(cfg)
    head = model.no_target_head[-1]
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.0, 50.0]))  # E > 0: "no target"
        out = model(images, ids, am)
        assert (out["no_target_logits"] > 0).all()
        assert (out["mask_logits"].sigmoid() <= cfg.threshold).all()  # empty mask
        assert not (out["mask_logits_raw"] == out["mask_logits"]).all()
        head.bias.copy_(torch.tensor([50.0, 0.0]))  # E < 0: the mask is M itself
        out = model(images, ids, am)
        torch.testing.assert_close(out["mask_logits"], out["mask_logits_raw"])
        model.train()  # training never empties: the loss sees M
        head.bias.copy_(torch.tensor([0.0, 50.0]))
        out = model(images, ids, am)
        torch.testing.assert_close(out["mask_logits"], out["mask_logits_raw"])


def test_padding_tokens_do_not_change_the_output():
    torch.manual_seed(0)
    cfg = small_cfg()
    model = rela.build_model(cfg).eval()
    images, ids, am, _ = make_batch(cfg)
    ids2 = ids.masked_fill(am == 0, 7)  # other ids under the padding
    with torch.no_grad():
        a, b = model(images, ids, am), model(images, ids2, am)
    torch.testing.assert_close(a["mask_logits"], b["mask_logits"])
    torch.testing.assert_close(a["no_target_logits"], b["no_target_logits"])


def test_fusion_weight_logit_is_fg_minus_bg():
    torch.manual_seed(0)
    model = rela.build_model(small_cfg(fusion_weight="logit")).eval()
    images, ids, am, _ = make_batch(model.cfg)
    captured = {}
    model.region_filter.register_forward_hook(lambda m, i, o: captured.update(F_f=o))
    model.minimap_head.register_forward_hook(lambda m, i, o: captured.update(logits=o))
    model.pixel_decoder.register_forward_hook(lambda m, i, o: captured.update(F_m=o[0]))
    with torch.no_grad():
        M = model(images, ids, am)["mask_logits_raw"]
    M_r = torch.einsum("bnc,bchw->bnhw", captured["F_f"], captured["F_m"])
    two_channel = torch.einsum("bna,bnhw->bahw", captured["logits"], M_r)  # released (bg, fg)
    torch.testing.assert_close(M[:, 0], two_channel[:, 1] - two_channel[:, 0])


@pytest.mark.parametrize("name", list(rela.ABLATIONS))
def test_each_ablation_changes_the_computation(name):
    torch.manual_seed(0)
    cfg = small_cfg()
    base = rela.build_model(cfg).eval()
    ablated = rela.build_model(dataclasses.replace(cfg, ablate=(name,))).eval()
    ablated.load_state_dict(base.state_dict())  # same weights: only the computation differs
    images, ids, am, targets = make_batch(cfg)
    with torch.no_grad():
        a, b = base(images, ids, am, targets), ablated(images, ids, am, targets)
    if name == "no_minimap":  # a loss-only switch: same prediction, no minimap term
        torch.testing.assert_close(a["mask_logits"], b["mask_logits"])
        torch.testing.assert_close(
            b["loss"], cfg.loss_scale * (b["losses"]["mask"] + 0.1 * b["losses"]["no_target"])
        )
    else:
        assert not torch.allclose(a["mask_logits_raw"], b["mask_logits_raw"])
    assert not torch.allclose(a["loss"], b["loss"])


def test_unknown_ablation_and_bad_fusion_raise():
    with pytest.raises(ValueError, match="unknown ablation 'nope' for rela"):
        rela.build_model(dataclasses.replace(small_cfg(), ablate=("nope",)))
    with pytest.raises(ValueError, match="fusion_weight"):
        rela.build_model(small_cfg(fusion_weight="softmax"))


def test_paper_config_is_the_paper_architecture():
    cfg = rela.Config.paper()
    assert (cfg.image_size, cfg.max_tokens, cfg.P, cfg.hidden_dim, cfg.dec_layers) == (
        480,
        20,
        10,
        256,
        9,
    )
    swin = SwinConfig(**cfg.vision_config)
    assert (swin.embed_dim, list(swin.depths), list(swin.num_heads), swin.window_size) == (
        128,
        [2, 2, 18, 2],
        [4, 8, 16, 32],
        12,
    )
    bert = BertConfig(**cfg.text_config)
    assert (bert.hidden_size, bert.num_hidden_layers, bert.vocab_size) == (768, 12, 30522)
    assert cfg.pretrained and cfg.text_name == "bert-base-uncased"


def test_from_pretrained_local_directories(tmp_path):
    torch.manual_seed(0)
    cfg = small_cfg()
    swin = SwinBackbone(SwinConfig(**cfg.vision_config, out_features=rela.SWIN_STAGES))
    bert = BertModel(
        BertConfig(**cfg.text_config, vocab_size=cfg.vocab_size), add_pooling_layer=False
    )
    swin.save_pretrained(tmp_path / "swin")
    bert.save_pretrained(tmp_path / "bert")
    cfg = dataclasses.replace(
        cfg, pretrained=True, vision_name=str(tmp_path / "swin"), text_name=str(tmp_path / "bert")
    )
    model = rela.build_model(cfg)
    torch.testing.assert_close(
        model.vision.backbone.swin.embeddings.patch_embeddings.projection.weight,
        swin.swin.embeddings.patch_embeddings.projection.weight,
    )
    torch.testing.assert_close(
        model.text_encoder.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight
    )
    images, ids, am, _ = make_batch(cfg)
    assert model.eval()(images, ids, am)["mask_logits"].shape == (2, 1, 16, 16)
    missing = dataclasses.replace(cfg, vision_name=str(tmp_path / "nothing-here"))
    with pytest.raises(RuntimeError, match="could not load"):
        rela.build_model(missing)
