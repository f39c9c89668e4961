"""Tests for cm_masksd.py: correlation filtering and masking counts (Eq. 3-4, 6-7), paper() as
printed (dot product, at least one masked word per sentence, Loss_seg as CRIS) and tiny()'s demo
choices, the stop-gradient teacher, one encoder pass at inference, shared and unshared branches,
every TABLES row (one build, one paper number), diagnostics on hand-made cases, the tiny CLIP."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel, PreTrainedModel

import cm_masksd as M

ROOT = Path(M.__file__).resolve().parent


def small_cfg(size: int = 32, **changes) -> M.Config:
    """The tiny architecture (random weights) at 32 px, a 4x4 patch grid, for speed."""
    cfg = dataclasses.replace(M.Config.tiny(), pretrained=False)
    vision = {**cfg.vision_config, "image_size": size}
    return dataclasses.replace(cfg, **{"image_size": size, "vision_config": vision, **changes})


def make_batch(cfg: M.Config, n_words: list[int], seed: int = 0):
    """CLIP-convention ids: [SOS] w1..wn [EOS] then [EOS]-padding with attention_mask 0."""
    g = torch.Generator().manual_seed(seed)
    B, L, V = len(n_words), cfg.max_tokens, cfg.vocab_size
    sos, eos = V - 2, V - 1
    ids = torch.full((B, L), eos)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(n_words):
        ids[b, 0] = sos
        ids[b, 1 : n + 1] = torch.randint(0, V - 2, (n,), generator=g)
        attention_mask[b, : n + 2] = 1
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    masks = torch.zeros(B, cfg.image_size, cfg.image_size)
    masks[:, cfg.image_size // 4 : cfg.image_size // 2, cfg.image_size // 3 :] = 1.0
    return images, ids, attention_mask, {"masks": masks, "no_target": torch.zeros(B, dtype=bool)}


def build(cfg: M.Config, seed: int = 0) -> M.CMMaskSD:
    torch.manual_seed(seed)
    return M.build_model(cfg)


def test_choose_tokens_top_t_and_counts():
    torch.manual_seed(0)
    B, N = 7, 30
    n_valid = [0, 1, 2, 3, 5, 17, 30]
    valid = torch.arange(N)[None] < torch.tensor(n_valid)[:, None]
    valid = valid[:, torch.randperm(N)]  # valid tokens scattered over the sequence
    scores = torch.randn(B, N)
    for top_k, alpha in [(0.5, 0.25), (0.5, 0.1), (0.25, 0.75), (1.0, 1.0)]:
        stochastic = M.choose_tokens(scores, valid, top_k, alpha, "stochastic", False)
        nearest = M.choose_tokens(scores, valid, top_k, alpha, "nearest", False)
        for b, n in enumerate(n_valid):
            T = math.floor(top_k * n + 0.5)
            top = scores[b].masked_fill(~valid[b], -1e9).topk(T).indices.tolist()
            for choice in (stochastic, nearest):
                assert set(choice.top_T[b].nonzero().flatten().tolist()) == set(top)
                assert not (choice.masked[b] & ~choice.top_T[b]).any()  # masked ⊂ top-T ⊂ valid
            k = int(stochastic.masked[b].sum())
            assert math.floor(alpha * T) <= k <= math.ceil(alpha * T)  # α·T rounded
            # paper(): ⌊α·T + ½⌋, at least one whenever there is a top-T
            assert int(nearest.masked[b].sum()) == (max(1, math.floor(alpha * T + 0.5)) if T else 0)


def test_tiny_alpha_sweep_of_table_4b_changes_the_expected_number_of_masked_words():
    """tiny()'s count on short expressions (1-6 words, T = 1-3): the expected count is α·T for
    every α of Table 4(b); paper()'s rounding with at-least-one masks one word for most."""
    torch.manual_seed(0)
    L = 8
    n_words = torch.arange(4000) % 6 + 1  # (B,)
    valid = torch.arange(L)[None] < n_words[:, None]  # (B, L)
    T = torch.floor(0.5 * n_words + 0.5)
    means = []
    for alpha in (0.05, 0.1, 0.25, 0.5, 0.75):
        scores = torch.randn(len(n_words), L)
        masked = M.choose_tokens(scores, valid, 0.5, alpha, "stochastic", True).masked
        count = masked.sum(1).float()
        assert (count <= T).all()
        se = count.std() / math.sqrt(len(count))
        assert abs(count.mean() - alpha * T.mean()) < 4 * se + 1e-3, alpha  # E[n_mask] = α·T
        means.append(count.mean().item())
    steps = [b - a for a, b in zip(means, means[1:], strict=False)]  # means 0.1 .. 1.5
    assert min(steps) > 0.05, means


def test_tiny_at_least_one_masked_word_per_batch():
    torch.manual_seed(0)
    valid = torch.zeros(4, 6, dtype=torch.bool)
    valid[:, :2] = True  # four 2-word expressions: T = 1, α·T = 0.05
    empty_batches = 0
    for _ in range(200):
        scores = torch.randn(4, 6)
        assert M.choose_tokens(scores, valid, 0.5, 0.05, "stochastic", True).masked.sum() >= 1
        without = M.choose_tokens(scores, valid, 0.5, 0.05, "stochastic", False).masked
        empty_batches += int(without.sum() == 0)
    assert empty_batches > 100  # without the rule most batches would mask nothing (0.95^4)
    nothing = torch.zeros(4, 6, dtype=torch.bool)  # no words at all: nothing to mask
    assert not M.choose_tokens(
        torch.randn(4, 6), nothing, 0.5, 0.05, "stochastic", True
    ).masked.any()


def test_lmvsd_masks_alpha_t_of_the_top_t_patches_by_eq3():
    cfg = small_cfg()
    model = build(cfg).eval()
    images, ids, am, targets = make_batch(cfg, [1, 3, 6])
    out = model(images, ids, am, targets)  # eval + targets: the choices are reported, not used
    h = cfg.image_size // cfg.vision_config["patch_size"]
    assert out["lmvsd_mask"].shape == out["lmvsd_top_T"].shape == (3, h, h)
    # Eq. 3 recomputed from the HF modules: cosine of w_global with every projected patch.
    with torch.no_grad():
        v = model.vision(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state
        V_local = model.visual_projection(model.vision.post_layernorm(v[:, 1:]))
        w_global = model.text_projection(model.text(input_ids=ids, attention_mask=am).pooler_output)
        p = F.cosine_similarity(w_global[:, None], V_local, dim=-1)  # (B, N)
    assert torch.allclose(out["lmvsd_p"].flatten(1), p, atol=1e-5)
    T = h * h // 2  # TopK 0.5; α·T = 0.25 · 8 = 2 exactly
    for b in range(3):
        top = set(out["lmvsd_top_T"][b].flatten().nonzero().flatten().tolist())
        assert top == set(p[b].topk(T).indices.tolist())
        masked = out["lmvsd_mask"][b].flatten()
        assert masked.sum() == 2 and set(masked.nonzero().flatten().tolist()) <= top


def test_vmlsd_masks_real_words_only():
    cfg = small_cfg(vmlsd_alpha=1.0)  # mask the whole top-T, to check which words it holds
    model = build(cfg).eval()
    n_words = [0, 1, 2, 3, 5, 15]  # 15 words + [SOS] + [EOS] fill all 17 positions
    images, ids, am, targets = make_batch(cfg, n_words)
    out = model(images, ids, am, targets)
    with torch.no_grad():
        words_p = model.text_projection(
            model.text(input_ids=ids, attention_mask=am).last_hidden_state
        )
        cls = model.vision(pixel_values=images, interpolate_pos_encoding=True).pooler_output
        v_global = model.visual_projection(cls)
        q = F.cosine_similarity(v_global[:, None], words_p, dim=-1)  # Eq. 6, (B, L)
    for b, n in enumerate(n_words):
        T = math.floor(0.5 * n + 0.5)
        masked = set(out["vmlsd_mask"][b].nonzero().flatten().tolist())
        assert masked == {i + 1 for i in q[b, 1 : n + 1].topk(T).indices.tolist()}
        assert masked <= set(range(1, n + 1))  # never [SOS] (0), [EOS] (n+1) or padding
    assert torch.equal(out["vmlsd_words"], M.word_positions(ids, am))


def test_paper_and_tiny_presets_differ_only_where_the_demo_chose():
    paper, tiny = M.Config.paper(), M.Config.tiny()
    assert (paper.correlation, paper.mask_count, paper.seg_loss_at) == ("dot", "nearest", "logits")
    assert (tiny.correlation, tiny.mask_count, tiny.seg_loss_at) == ("cosine", "stochastic", "gt")
    assert (paper.decoder_layers, paper.decoder_heads, paper.decoder_ffn) == (3, 8, 2048)  # CRIS
    assert (paper.neck_dims, paper.dropout, paper.mask_prior) == ((256, 512, 1024), 0.1, None)
    for name, value in [("correlation", "l2"), ("mask_count", "ceil"), ("seg_loss_at", "x")]:
        with pytest.raises(ValueError, match=f"{name} must be one of"):
            M.build_model(small_cfg(**{name: value}))


def test_paper_masks_at_least_one_word_in_every_sentence():
    """paper(): every sentence with a word masks ⌊α·T + ½⌋ of its top-T, at least one (α = 0.1,
    T = 1-8: one word each), in the training forward; tiny() leaves most short sentences whole."""
    n_words = [1, 2, 3, 4, 5, 6, 9, 15]
    batch = make_batch(small_cfg(), n_words)
    for mask_count in ("nearest", "stochastic"):
        model = build(small_cfg(mask_count=mask_count, correlation="dot")).train()
        hit = []
        for seed in range(2 if mask_count == "nearest" else 10):
            torch.manual_seed(seed)
            per_sentence = model(*batch)["vmlsd_mask"].sum(1)  # (B,)
            if mask_count == "nearest":
                assert per_sentence.tolist() == [1] * len(n_words)
            hit += (per_sentence > 0).tolist()
        if mask_count == "stochastic":  # P(a masked word) = 0.1·T: 0.31 on these sentences
            assert np.mean(hit) < 0.5, np.mean(hit)
    # ...and the rule reaches Eq. 9: each sentence's masked branch differs from the main one.
    model = build(small_cfg(mask_count="nearest")).eval()
    images, ids, am, _ = batch
    with torch.no_grad():
        vis, txt = model.encode_image(images), model.encode_text(ids, am)
        M_seg = model.segmenter(vis, txt, am == 0)
        choice = M.vmlsd_choice(
            vis.v_global, txt.W_local, model.text_projection, M.word_positions(ids, am), model.cfg
        )
        M_vmlsd = model.vmlsd_branch(vis, ids, am, choice.masked)
    assert ((M_vmlsd - M_seg).flatten(1).abs().amax(1) > 0).all()


def test_paper_computes_loss_seg_as_cris():
    """paper(): BCE between M_seg and the GT resized (nearest) to M_seg's size, as CRIS's
    segmenter.py; tiny(): M_seg upsampled (bilinear) to the GT."""
    images, ids, am, targets = make_batch(small_cfg(), [2, 4])
    masks = targets["masks"]
    masks[:, 8:9, :] = 1.0  # a one-pixel line that the 2x shrink can drop or keep
    seg = {}
    for at in ("logits", "gt"):
        model = build(small_cfg(seg_loss_at=at)).eval()
        with torch.no_grad():
            out = model(images, ids, am, targets)
        M_seg = out["mask_logits"]  # (B, 1, 16, 16) for a 32 px input
        assert M_seg.shape[-1] == masks.shape[-1] // 2
        seg[at] = out["losses"]["seg"]
        if at == "logits":
            small = F.interpolate(masks[:, None], M_seg.shape[-2:], mode="nearest")
            expected = F.binary_cross_entropy_with_logits(M_seg, small)
        else:
            up = F.interpolate(M_seg, masks.shape[-2:], mode="bilinear", align_corners=False)
            expected = F.binary_cross_entropy_with_logits(up, masks[:, None])
        assert torch.allclose(seg[at], expected), at
    assert not torch.allclose(seg["logits"], seg["gt"])


def test_correlation_is_the_dot_product_in_paper_and_cosine_in_tiny():
    images, ids, am, targets = make_batch(small_cfg(), [2, 5, 7])
    for kind in ("dot", "cosine"):
        model = build(small_cfg(correlation=kind)).eval()
        with torch.no_grad():
            out = model(images, ids, am, targets)
            vis, txt = model.encode_image(images), model.encode_text(ids, am)
        w, v = txt.w_global[:, None], vis.V_local  # (B, 1, P), (B, N, P)
        p = (w * v).sum(-1) if kind == "dot" else F.cosine_similarity(w, v, dim=-1)  # Eq. 3
        assert torch.allclose(out["lmvsd_p"].flatten(1), p, atol=1e-5), kind
    scores = M.correlation(torch.ones(1, 2), torch.tensor([[[1.0, 1.0], [3.0, 0.0]]]), "dot")
    assert scores.tolist() == [[2.0, 3.0]]  # the longer token wins the dot product...
    scores = M.correlation(torch.ones(1, 2), torch.tensor([[[1.0, 1.0], [3.0, 0.0]]]), "cosine")
    assert scores[0, 0] > scores[0, 1]  # ...the better aligned one the cosine


def test_teacher_target_carries_no_gradient():
    cfg = small_cfg()
    model = build(cfg).train()
    out = model(*make_batch(cfg, [2, 4]))
    distill = out["losses"]["lmvsd"] + out["losses"]["vmlsd"]
    (grad_seg,) = torch.autograd.grad(distill, out["mask_logits"], allow_unused=True)
    assert grad_seg is None  # the distillation losses do not reach M_seg
    grad_tokens = torch.autograd.grad(distill, [model.patch_mask_token, model.word_mask_token])
    assert all(g.abs().sum() > 0 for g in grad_tokens)  # ...but they train the masked branches


def count_encoder_calls(model, *inputs, **kwargs) -> tuple[dict, int, int]:
    calls = {"vision": 0, "text": 0}
    handles = [
        model.vision.register_forward_hook(
            lambda *a: calls.__setitem__("vision", calls["vision"] + 1)
        ),
        model.text.register_forward_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1)),
    ]
    try:
        out = model(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return out, calls["vision"], calls["text"]


def test_inference_runs_the_encoders_once():
    cfg = small_cfg()
    model = build(cfg)
    images, ids, am, targets = make_batch(cfg, [2, 3])
    model.eval()
    out, n_vis, n_txt = count_encoder_calls(model, images, ids, am)
    assert (n_vis, n_txt) == (1, 1) and set(out) == {"mask_logits"}
    out, n_vis, n_txt = count_encoder_calls(model, images, ids, am, targets)
    assert (n_vis, n_txt) == (1, 1) and "lmvsd_mask" in out  # the choices, for diagnostics
    assert set(out["losses"]) == {"seg"}
    model.train()
    _, n_vis, n_txt = count_encoder_calls(model, images, ids, am, targets)
    assert (n_vis, n_txt) == (2, 2)  # main + LMVSD image pass, main + VMLSD text pass


def test_unmasked_branches_reproduce_the_main_branch():
    cfg = small_cfg()
    model = build(cfg).eval()
    # The hooks sit on these HF layers; fail loudly if transformers moves them.
    assert isinstance(model.vision.embeddings.patch_embedding, torch.nn.Conv2d)
    assert isinstance(model.text.embeddings.token_embedding, torch.nn.Embedding)
    images, ids, am, _ = make_batch(cfg, [2, 5])
    N = (cfg.image_size // cfg.vision_config["patch_size"]) ** 2
    with torch.no_grad():
        M_seg = model(images, ids, am)["mask_logits"]
        vis, txt = model.encode_image(images), model.encode_text(ids, am)
        none_v, none_w = torch.zeros(2, N, dtype=torch.bool), torch.zeros_like(ids, dtype=bool)
        assert torch.equal(model.lmvsd_branch(images, none_v, txt, am == 0), M_seg)
        assert torch.equal(model.vmlsd_branch(vis, ids, am, none_w), M_seg)
        # ...a masked token does change the prediction, and the main branch stays unmasked.
        one_v, one_w = none_v.clone(), none_w.clone()
        one_v[:, 3], one_w[:, 1] = True, True
        assert not torch.allclose(model.lmvsd_branch(images, one_v, txt, am == 0), M_seg)
        assert not torch.allclose(model.vmlsd_branch(vis, ids, am, one_w), M_seg)
        assert torch.equal(model(images, ids, am)["mask_logits"], M_seg)


def trainable_without_gradient(model) -> list[str]:
    return [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
    ]


def test_forward_backward_tiny_shapes_and_every_parameter_gets_a_gradient():
    cfg = dataclasses.replace(M.Config.tiny(), pretrained=False)
    model = build(cfg).train()
    images, ids, am, targets = make_batch(cfg, [3, 6])
    out = model(images, ids, am, targets)
    h = cfg.image_size // cfg.vision_config["patch_size"]
    assert out["mask_logits"].shape == (2, 1, 4 * h, 4 * h)  # the projector up-samples 4x
    assert out["lmvsd_mask"].shape == (2, h, h) and out["vmlsd_mask"].shape == (2, cfg.max_tokens)
    assert set(out["losses"]) == {"seg", "lmvsd", "vmlsd"}
    total = out["losses"]["seg"] + 0.75 * out["losses"]["lmvsd"] + 0.1 * out["losses"]["vmlsd"]
    assert torch.allclose(out["loss"], total)  # Eq. 9 with the paper's λ1, λ2
    out["loss"].backward()
    assert not trainable_without_gradient(model)
    assert not model.clip.logit_scale.requires_grad  # CLIP's temperature: unused, frozen


def test_calibrated_start():
    """The tiny preset's first prediction is the foreground prior, so the first BCE is close to
    the prior's entropy; the paper preset keeps CRIS's initialisation."""
    cfg = small_cfg()
    assert cfg.mask_prior == 0.03 and M.Config.paper().mask_prior is None
    model = build(cfg).train()
    images, ids, am, targets = make_batch(cfg, [2, 3, 4, 5])
    logits = model(images, ids, am)["mask_logits"]
    assert abs(logits.mean().item() - math.log(0.03 / 0.97)) < 1.0 and logits.std() < 1.0
    prior = torch.full_like(logits, 0.03)  # the BCE of the prior against itself = its entropy
    entropy = F.binary_cross_entropy(prior, prior).item()
    assert F.binary_cross_entropy_with_logits(logits, prior).item() < 1.5 * entropy
    with pytest.raises(ValueError, match="mask_prior"):
        M.build_model(small_cfg(mask_prior=1.0))


def test_clip_projections_train_with_the_encoders():
    """train.py puts every parameter of a transformers PreTrainedModel in the encoder lr group:
    CLIP's visual/text projections must be inside it (as CRIS trains them with the backbone)."""
    model = build(small_cfg())
    encoder = {
        id(p) for m in model.modules() if isinstance(m, PreTrainedModel) for p in m.parameters()
    }
    for name, p in model.named_parameters():
        in_clip = name.startswith("clip.")
        assert (id(p) in encoder) == in_clip, name
    assert id(model.visual_projection.weight) in encoder
    assert id(model.text_projection.weight) in encoder
    assert id(model.patch_mask_token) not in encoder and id(model.word_mask_token) not in encoder


def test_no_sharing_gives_each_masked_branch_its_own_neck_decoder_projector():
    cfg = small_cfg()
    shared, unshared = build(cfg), build(dataclasses.replace(cfg, ablate=("no_sharing",)))
    head = sum(p.numel() for p in shared.segmenter.parameters())
    n_shared = sum(p.numel() for p in shared.parameters())
    assert sum(p.numel() for p in unshared.parameters()) == n_shared + 2 * head
    assert shared.lmvsd_segmenter is None and shared.vmlsd_segmenter is None
    unshared.train()
    out = unshared(*make_batch(cfg, [2, 4]))
    # The distillation losses reach only their own segmenter; the main one learns from Loss_seg.
    grads = torch.autograd.grad(
        out["losses"]["lmvsd"],
        [unshared.segmenter.projector.txt.weight, unshared.lmvsd_segmenter.projector.txt.weight],
        allow_unused=True,
        retain_graph=True,
    )
    assert grads[0] is None and grads[1].abs().sum() > 0
    out["loss"].backward()
    assert not trainable_without_gradient(unshared)


def test_every_table_row_builds_and_trains_a_step():
    """Tables 2-5 on the tiny architecture (random weights, 24 px: 5 of 9 patches in the top-T);
    one model per set of switches, the row's Config drives its step. Table 1 sets paper-size
    encoders, so its rows are checked as Config overrides only."""
    cfg = small_cfg(24)
    batch = make_batch(cfg, [2, 4])
    rows, models = 0, {}
    for table, table_rows in M.TABLES.items():
        assert sum(bool(spec.get("baseline")) for spec in table_rows.values()) <= 1, table
        for key, spec in table_rows.items():
            assert "skip" not in spec and spec["paper"], (table, key)
            assert set(spec.get("ablate", ())) <= set(M.ABLATIONS), (table, key)
            row_cfg = dataclasses.replace(cfg, **spec.get("set", {}), ablate=spec.get("ablate", ()))
            if table == "Table 1":
                assert spec["recipe"]["image_size"] in (576, 532)
                continue
            ablate = spec.get("ablate", ())
            if ablate not in models:
                models[ablate] = build(row_cfg).train()
            model = models[ablate]
            model.cfg = row_cfg  # α, TopK, λ are read at every forward
            model.zero_grad()
            out = model(*batch)
            out["loss"].backward()
            assert not trainable_without_gradient(model), (table, key)
            assert ("lmvsd" in out["losses"]) == ("no_lmvsd" not in ablate), (table, key)
            assert ("vmlsd" in out["losses"]) == ("no_vmlsd" not in ablate), (table, key)
            rows += 1
    assert rows == 4 + 13 + 15 + 7
    # The paper measured the single-branch rows of Tables 2-4 without sharing (= Table 5's).
    assert M.TABLES["Table 2"]["+LMVSD LMVSD only (unshared, = Table 5)"]["paper"]["mIoU"] == 71.45
    assert M.TABLES["Table 5"]["2 LMVSD, unshared"]["ablate"] == ("no_vmlsd", "no_sharing")
    assert "not a paper row" in M.ABLATIONS["random_mask"]


def test_table_1_vit_l_preset():
    cfg = M.Config.paper_vit_l()
    assert cfg.image_size == 532 and cfg.vision_name == "openai/clip-vit-large-patch14"
    assert cfg.vision_config["patch_size"] == 14 and cfg.projection_dim == 768
    row = M.TABLES["Table 1"]["ViT-L CLIP ViT-L/14 at 532 px"]
    assert cfg == dataclasses.replace(M.Config.paper(), **row["set"], **row["recipe"])


def paper_builds() -> dict[tuple, list[tuple[str, dict]]]:
    """Every TABLES row by what it builds: switches, the paper() Config it sets, its recipe."""
    builds: dict[tuple, list[tuple[str, dict]]] = {}
    for table, rows in M.TABLES.items():
        for key, spec in rows.items():
            cfg = dataclasses.replace(M.Config.paper(), **spec.get("set", {}))
            build = (tuple(sorted(spec.get("ablate", ()))), repr(cfg),
                     repr(sorted(spec.get("recipe", {}).items())))  # fmt: skip
            builds.setdefault(build, []).append((f"{table} {key}", spec["paper"]))
    return builds


def test_one_build_carries_one_paper_number_and_rows_carry_their_recipe():
    """Rows that build the same model with the same recipe carry the same paper number (Table 2's
    single-branch rows = Table 5's unshared rows = the default row of each sweep of Tables 3-4).
    Only Table 1 ran differently from RECIPE + paper() (576 / 532 px), as a row "recipe"."""
    for rows in paper_builds().values():
        assert all(paper == rows[0][1] for _, paper in rows), rows
    shared = {rows[0][0]: len(rows) for rows in paper_builds().values() if len(rows) > 1}
    assert shared == {  # Tables 2 and 5; with Table 3's / Table 4's three default rows
        "Table 2 baseline no masked branch": 2,
        "Table 2 +LMVSD LMVSD only (unshared, = Table 5)": 5,
        "Table 2 +VMLSD VMLSD only (unshared, = Table 5)": 5,
        "Table 2 +both LMVSD and VMLSD (shared, the full model)": 2,
    }
    for table, rows in M.TABLES.items():
        for key, spec in rows.items():
            recipe = spec.get("recipe", {})
            assert set(recipe) <= set(M.RECIPE) | {"image_size"}, key
            assert bool(recipe) == (table == "Table 1"), key
            assert set(spec["paper"]) <= {"Prec@0.5", "Prec@0.7", "Prec@0.9", "mIoU"}, key
    # The check fails on a table that gives one build two numbers.
    doctored = {"+LMVSD": {"ablate": ("no_vmlsd", "no_sharing"), "paper": {"mIoU": 71.13}}}
    tables, M.TABLES = M.TABLES, {**M.TABLES, "Table 9": doctored}
    try:
        assert any(len({repr(p) for _, p in rows}) > 1 for rows in paper_builds().values())
    finally:
        M.TABLES = tables


def test_recipe_is_the_papers():
    r = M.RECIPE
    assert (r["optimizer"], r["lr"], r["weight_decay"], r["schedule"]) == (
        "adam",
        1e-5,
        5e-4,
        "cosine",
    )
    assert (r["epochs"], r["warmup"], r["batch_size"]) == (100, 10, 32)
    assert "iterations" not in r


def test_diagnostics_on_a_hand_made_batch():
    # 2x2 patch grid on a 4x4 image. Sample 0: the target covers patch (0, 0) fully and half of
    # patch (0, 1) -> area 1.5 patches; top-T = {(0, 0), (1, 1)}, masked = {(0, 0)}.
    mask = torch.zeros(3, 4, 4)
    mask[0, :2, :2] = 1.0
    mask[0, :2, 2] = 1.0
    mask[1, 2:, 2:] = 1.0  # sample 1: the target is patch (1, 1), which the top-T misses
    top_T = torch.tensor([[[1, 0], [0, 1]], [[1, 1], [0, 0]], [[1, 0], [0, 0]]], dtype=torch.bool)
    masked = torch.tensor([[[1, 0], [0, 0]], [[0, 1], [0, 0]], [[1, 0], [0, 0]]], dtype=torch.bool)
    words = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    w_top = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    w_masked = torch.tensor([[0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    outputs = {"lmvsd_top_T": top_T, "lmvsd_mask": masked, "vmlsd_words": words,
               "vmlsd_top_T": w_top, "vmlsd_mask": w_masked}  # fmt: skip
    d = M.diagnostics(outputs, {"mask": mask})  # sample 2 has no target: left out
    assert d["lmvsd_target_in_top_T"] == pytest.approx((1 / 1.5 + 0.0) / 2)
    assert d["lmvsd_target_masked"] == pytest.approx((1 / 1.5 + 0.0) / 2)
    assert d["vmlsd_masked_word_share"] == pytest.approx(1 / 6)
    assert d["vmlsd_masked_per_top_T"] == pytest.approx(1 / 4)
    d = M.diagnostics(outputs, {"mask": torch.zeros(3, 4, 4)})
    assert math.isnan(d["lmvsd_target_in_top_T"]) and set(M.diagnostics({}, {})) == set()


def test_referent_auc():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [4.0, 1.0, 3.0, 2.0]])
    referent = torch.tensor([[1.0, 1.0, 0, 0], [1.0, 1.0, 0, 0], [1.0, 0.5, 0, 0]])
    others = torch.tensor([[0, 0, 1.0, 1.0], [0, 0, 1.0, 1.0], [0, 0, 1.0, 1.0]])
    auc = M.referent_auc(scores, referent, others)
    # first: referent first; second: last; third: patch 0 above both others (weight 1), patch 1
    # (weight 0.5) below both: (1·2 + 0.5·0) / (1.5·2)
    assert auc.tolist() == pytest.approx([1.0, 0.0, 2 / 3])


def clip_normalised(rgb: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(M.CLIP_MEAN)[:, None, None], torch.tensor(M.CLIP_STD)[:, None, None]
    return (rgb - mean) / std


def test_referent_auc_diagnostic_on_a_hand_made_batch():
    """2x2 patches on a 4x4 image: the referent is patch (0, 0), another object patch (1, 1),
    the rest a grey background. Eq. 3 with the own sentence ranks the referent above the other
    object; with another sentence below it."""
    rgb = torch.full((2, 3, 4, 4), 0.7)  # grey
    rgb[:, :, :2, :2] = torch.tensor([0.84, 0.16, 0.16])[:, None, None]  # red: the referent
    rgb[:, :, 2:, 2:] = torch.tensor([0.16, 0.31, 0.84])[:, None, None]  # blue: another object
    images = clip_normalised(rgb)
    assert torch.equal(M.object_pixels(images)[0], (rgb[0].amax(0) - rgb[0].amin(0) > 0.5).float())
    mask = torch.zeros(2, 4, 4)
    mask[:, :2, :2] = 1.0
    p = torch.tensor([[[0.9, 0.8], [0.7, 0.1]], [[0.1, 0.9], [0.8, 0.5]]])  # (B, h, w)
    outputs = {"lmvsd_top_T": p > 0.6, "lmvsd_mask": p > 0.85, "lmvsd_p": p,
               "lmvsd_p_other_text": -p, "lmvsd_top_T_other_text": -p > -0.6}  # fmt: skip
    d = M.diagnostics(outputs, {"mask": mask, "image": images})
    # sample 0: referent 0.9 > other object 0.1 -> 1; sample 1: 0.1 < 0.5 -> 0; reversed: 0, 1
    assert d["lmvsd_referent_auc_among_objects"] == pytest.approx(0.5)
    assert d["lmvsd_referent_auc_among_objects_other_text"] == pytest.approx(0.5)
    outputs["lmvsd_p"] = torch.tensor([[[0.9, 0.8], [0.7, 0.1]]]).expand(2, 2, 2)
    d = M.diagnostics(outputs, {"mask": mask, "image": images})
    assert d["lmvsd_referent_auc_among_objects"] == pytest.approx(1.0)
    assert "lmvsd_referent_auc_among_objects" not in M.diagnostics(outputs, {"mask": mask})


def test_object_pixels_are_the_union_of_the_worlds_objects():
    """The built-in world paints saturated shapes on a grey-ish background: the saturated pixels
    of a val image (CLIP-normalised, 64 px) are its objects, patch by patch, up to the edges."""
    import data

    assert (M.CLIP_MEAN, M.CLIP_STD) == data.MEAN_STD["clip"]
    errors = []
    for i in range(12):
        scene = data.make_scene(i, "val")
        image = data.prepare_image(scene.image, 64, "clip")[None]
        objects = data.prepare_mask((scene.labels > 0).astype(np.float32), 64)[None, None]
        found = F.avg_pool2d(M.object_pixels(image)[:, None], 8)  # (1, 1, 8, 8) patch shares
        errors.append((found - F.avg_pool2d(objects, 8)).abs().mean().item())
    assert np.mean(errors) < 0.03, errors


def test_diagnostics_from_the_model_in_eval():
    cfg = small_cfg()
    model = build(cfg).eval()
    images, ids, am, targets = make_batch(cfg, [2, 5, 7])
    with torch.no_grad():
        out = model(images, ids, am, targets)
    d = M.diagnostics(out, {"mask": targets["masks"], "image": images})
    assert set(d) == {"lmvsd_target_in_top_T", "lmvsd_target_masked",
                      "lmvsd_target_in_top_T_other_text", "lmvsd_referent_auc_among_objects",
                      "lmvsd_referent_auc_among_objects_other_text", "vmlsd_masked_word_share",
                      "vmlsd_masked_per_top_T"}  # fmt: skip
    assert 0 <= d["lmvsd_target_masked"] <= d["lmvsd_target_in_top_T"] <= 1
    # The control ranks the patches by the next sample's sentence (Eq. 3 with w_global rolled).
    with torch.no_grad():
        vis, txt = model.encode_image(images), model.encode_text(ids, am)
        p_other = M.correlation(txt.w_global.roll(1, dims=0), vis.V_local, "cosine")  # (B, N)
    assert torch.allclose(out["lmvsd_p_other_text"].flatten(1), p_other)
    T = int(out["lmvsd_top_T"][0].sum())
    for b in range(3):
        top = set(out["lmvsd_top_T_other_text"][b].flatten().nonzero().flatten().tolist())
        assert top == set(p_other[b].topk(T).indices.tolist())


def test_overfits_one_batch():
    cfg = small_cfg(24)
    model = build(cfg).train()
    batch = make_batch(cfg, [2, 3, 4, 2])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    seg = []
    for _ in range(25):
        out = model(*batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        seg.append(out["losses"]["seg"].item())
    assert seg[-1] < 0.2 * seg[0], seg


def test_each_ablation_changes_the_computation():
    cfg = small_cfg()
    images, ids, am, targets = make_batch(cfg, [3, 5])
    base = build(cfg).train()
    torch.manual_seed(1)
    ref, ref_vis, ref_txt = count_encoder_calls(base, images, ids, am, targets)
    for name in M.ABLATIONS:
        model = build(dataclasses.replace(cfg, ablate=(name,))).train()
        model.load_state_dict(base.state_dict(), strict=False)  # same weights where shared
        torch.manual_seed(1)
        out, n_vis, n_txt = count_encoder_calls(model, images, ids, am, targets)
        assert not torch.allclose(out["loss"], ref["loss"]), name
        if name == "no_lmvsd":
            assert n_vis == 1 and "lmvsd" not in out["losses"] and "lmvsd_mask" not in out
            assert not hasattr(model, "patch_mask_token")
        elif name == "no_vmlsd":
            assert n_txt == 1 and "vmlsd" not in out["losses"]
            assert not hasattr(model, "word_mask_token")
        elif name == "no_sharing":
            assert (n_vis, n_txt) == (ref_vis, ref_txt)
            assert torch.equal(out["mask_logits"], ref["mask_logits"])  # same main branch
        else:  # random_mask: same counts, other places
            assert (n_vis, n_txt) == (ref_vis, ref_txt)
            assert out["lmvsd_mask"].sum() == ref["lmvsd_mask"].sum()
            assert not torch.equal(out["lmvsd_top_T"], ref["lmvsd_top_T"])


def test_unknown_ablation_bad_ratios_and_two_clips_raise():
    with pytest.raises(ValueError, match="unknown ablation 'no_such' for cm_masksd"):
        M.build_model(dataclasses.replace(small_cfg(), ablate=("no_such",)))
    with pytest.raises(ValueError, match="lmvsd_alpha"):
        M.build_model(small_cfg(lmvsd_alpha=25.0))
    with pytest.raises(ValueError, match="one CLIP"):
        M.build_model(small_cfg(text_name="another/clip"))


def test_tiny_loads_the_pretrained_tiny_clip_folder():
    """Config.tiny() reads pretrained/tiny-clip with from_pretrained, and its written-out
    architecture equals the folder's (so --no-pretrained builds the same model)."""
    cfg = M.Config.tiny()
    folder = ROOT / cfg.vision_name
    assert cfg.pretrained and cfg.vision_name == cfg.text_name == "pretrained/tiny-clip"
    saved = json.loads((folder / "config.json").read_text())
    for key, value in cfg.vision_config.items():
        assert saved["vision_config"][key] == value, key
    for key, value in cfg.text_config.items():
        assert saved["text_config"][key] == value, key
    V = saved["text_config"]["vocab_size"]
    assert saved["text_config"]["eos_token_id"] == V - 1 and saved["projection_dim"] == 64
    model = M.build_model(dataclasses.replace(cfg, vocab_size=V))
    weights = load_file(folder / "model.safetensors")
    assert torch.equal(model.visual_projection.weight, weights["visual_projection.weight"])
    assert torch.equal(
        model.vision.embeddings.patch_embedding.weight,
        weights["vision_model.embeddings.patch_embedding.weight"],
    )
    random = M.build_model(dataclasses.replace(cfg, vocab_size=V, pretrained=False))
    assert {k: v.shape for k, v in random.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert random.text.config.eos_token_id == V - 1 and random.text.config.bos_token_id == V - 2


def test_from_pretrained_local_dir(tmp_path):
    cfg = small_cfg()
    text_config = {**cfg.text_config, "vocab_size": cfg.vocab_size}
    torch.manual_seed(3)
    clip = CLIPModel(CLIPConfig(vision_config=cfg.vision_config, text_config=text_config))
    clip.save_pretrained(tmp_path)
    loaded = M.build_model(
        dataclasses.replace(
            cfg, pretrained=True, vision_name=str(tmp_path), text_name=str(tmp_path)
        )
    )
    assert torch.equal(loaded.visual_projection.weight, clip.visual_projection.weight)
    assert torch.equal(
        loaded.text.embeddings.token_embedding.weight,
        clip.text_model.embeddings.token_embedding.weight,
    )
    loaded.eval()(*make_batch(cfg, [2])[:3])
    with pytest.raises(RuntimeError, match="could not load"):
        missing = str(tmp_path / "no")
        M.build_model(dataclasses.replace(cfg, pretrained=True, vision_name=missing,
                                          text_name=missing))  # fmt: skip


def test_sine_positions_match_cris_formula():
    h, w, d = 3, 5, 8
    pos = M.sine_position_2d(h, w, d, torch.device("cpu"))  # (h*w, d)
    half = d // 2
    for y in range(h):
        for x in range(w):
            for c in range(half):
                freq = 10000 ** (-(c - c % 2) / half)
                trig = math.sin if c % 2 == 0 else math.cos
                assert math.isclose(pos[y * w + x, c], trig(x * freq), abs_tol=1e-5)
                assert math.isclose(pos[y * w + x, half + c], trig(y * freq), abs_tol=1e-5)


class WordTokenizer:
    def convert_ids_to_tokens(self, ids):
        return [f"w{i}" for i in ids]


def test_sample_extra():
    cfg = small_cfg(vmlsd_alpha=1.0, vmlsd_topk=1.0)
    model = build(cfg).eval()
    images, ids, am, targets = make_batch(cfg, [2, 3])
    out = model(images, ids, am, targets)
    (p, p_caption), (choice, caption, c_range) = M.sample_extra(out, 1, WordTokenizer())
    assert p.shape == choice.shape == out["lmvsd_mask"].shape[1:] and c_range == (0, 2)
    assert torch.equal(torch.from_numpy(p), out["lmvsd_p"][1])
    n = int(out["lmvsd_mask"][1].sum())
    words = " ".join(f"w{int(i)}" for i in ids[1, 1:4])
    assert caption == f"top-T (1), masked (2): {n} patches; VMLSD masks {words}"
    assert (choice == 2).sum() == n and (choice >= 1).sum() == out["lmvsd_top_T"][1].sum()
    assert M.sample_extra({"mask_logits": out["mask_logits"]}, 0, None) == [(None, "LMVSD off")]
