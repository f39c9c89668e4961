"""Tests for cm_masksd.py: masking counts and choice (Eq. 3-4, 6-7), the stop-gradient teacher,
one encoder pass at inference, the shared branches, shapes, gradients, overfitting, ablations."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

import cm_masksd as M


def small_cfg(**changes) -> M.Config:
    """The tiny preset at 32 px (a 4x4 patch grid) for speed."""
    cfg = M.Config.tiny()
    vision = {**cfg.vision_config, "image_size": 32}
    return dataclasses.replace(cfg, **{"image_size": 32, "vision_config": vision, **changes})


def make_batch(cfg: M.Config, n_words: list[int], seed: int = 0):
    """CLIP-convention ids: [SOS] w1..wn [EOS] then [EOS]-padding with attention_mask 0."""
    g = torch.Generator().manual_seed(seed)
    B, L, V = len(n_words), cfg.max_tokens, cfg.vocab_size
    sos, eos = V - 2, V - 1
    ids = torch.full((B, L), eos)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(n_words):
        ids[b, 0] = sos
        ids[b, 1 : n + 1] = torch.randint(3, V - 3, (n,), generator=g)
        attention_mask[b, : n + 2] = 1
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    masks = torch.zeros(B, cfg.image_size, cfg.image_size)
    masks[:, cfg.image_size // 4 : cfg.image_size // 2, cfg.image_size // 3 :] = 1.0
    return images, ids, attention_mask, {"masks": masks, "no_target": torch.zeros(B, dtype=bool)}


def build(cfg: M.Config, seed: int = 0) -> M.CMMaskSD:
    torch.manual_seed(seed)
    return M.build_model(cfg)


def expected_counts(n: int, top_k: float, alpha: float, at_least_one: bool) -> tuple[int, int]:
    """T and the number of masked tokens, computed independently of the module."""
    T = math.floor(top_k * n + 0.5)
    k = math.floor(alpha * T + 0.5)
    return T, (max(k, 1) if at_least_one and T > 0 else k)


def test_select_tokens_counts_and_top_t():
    torch.manual_seed(0)
    B, N = 7, 30
    n_valid = [0, 1, 2, 3, 5, 17, 30]
    valid = torch.arange(N)[None] < torch.tensor(n_valid)[:, None]
    valid = valid[:, torch.randperm(N)]  # valid tokens scattered over the sequence
    scores = torch.randn(B, N)
    for top_k, alpha, at_least_one in [(0.5, 0.25, False), (0.5, 0.1, True), (0.25, 0.75, True)]:
        chosen = M.select_tokens(scores, valid, top_k, alpha, at_least_one)
        for b, n in enumerate(n_valid):
            T, k = expected_counts(n, top_k, alpha, at_least_one)
            assert chosen[b].sum() == k
            assert not (chosen[b] & ~valid[b]).any()
            top = scores[b].masked_fill(~valid[b], -1e9).topk(T).indices if T else []
            assert set(chosen[b].nonzero().flatten().tolist()) <= set(torch.as_tensor(top).tolist())


def test_lmvsd_masks_round_alpha_t_of_the_top_t_patches():
    cfg = small_cfg(image_size=64, vision_config=M.Config.tiny().vision_config)
    model = build(cfg).eval()
    images, ids, am, targets = make_batch(cfg, [1, 3, 6])
    out = model(images, ids, am, targets)  # eval + targets: the masks are reported, not used
    h = cfg.image_size // cfg.vision_config["patch_size"]
    assert out["lmvsd_mask"].shape == (3, h, h)

    # Eq. 3 recomputed from the HF modules: cosine of w_global with every projected patch.
    with torch.no_grad():
        v = model.vision(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state
        V_local = model.visual_projection(model.vision.post_layernorm(v[:, 1:]))
        w_global = model.text_projection(model.text(input_ids=ids, attention_mask=am).pooler_output)
        p = F.cosine_similarity(w_global[:, None], V_local, dim=-1)  # (B, N)
    T, k = expected_counts(h * h, cfg.lmvsd_topk, cfg.lmvsd_alpha, False)
    assert (T, k) == (32, 8)
    for b in range(3):
        masked = out["lmvsd_mask"][b].flatten()
        assert masked.sum() == k
        assert set(masked.nonzero().flatten().tolist()) <= set(p[b].topk(T).indices.tolist())


def test_vmlsd_masks_words_only_at_least_one():
    cfg = small_cfg()
    model = build(cfg).eval()
    n_words = [0, 1, 2, 3, 5, 15]  # 15 words + [SOS] + [EOS] fill all 17 positions
    images, ids, am, targets = make_batch(cfg, n_words)
    word_mask = model(images, ids, am, targets)["vmlsd_mask"]
    with torch.no_grad():
        words_p = model.text_projection(
            model.text(input_ids=ids, attention_mask=am).last_hidden_state
        )
        cls = model.vision(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state[
            :, 0
        ]
        v_global = model.visual_projection(model.vision.post_layernorm(cls))
        q = F.cosine_similarity(v_global[:, None], words_p, dim=-1)  # Eq. 6, (B, L)
    for b, n in enumerate(n_words):
        T, k = expected_counts(n, cfg.vmlsd_topk, cfg.vmlsd_alpha, True)
        assert word_mask[b].sum() == k
        masked = set(word_mask[b].nonzero().flatten().tolist())
        assert masked <= set(range(1, n + 1))  # never [SOS] (0), [EOS] (n+1) or padding
        assert masked <= {i + 1 for i in q[b, 1 : n + 1].topk(T).indices.tolist()}

    # Masking everything selected still leaves the special tokens and the padding alone.
    model = build(dataclasses.replace(cfg, vmlsd_alpha=1.0, vmlsd_topk=1.0)).eval()
    word_mask = model(images, ids, am, targets)["vmlsd_mask"]
    assert torch.equal(word_mask, M.word_positions(ids, am))


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
    assert (n_vis, n_txt) == (1, 1) and "lmvsd_mask" in out  # visualisation only
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
        none_v, none_w = (
            torch.zeros(2, N, dtype=torch.bool),
            torch.zeros_like(ids, dtype=torch.bool),
        )
        assert torch.equal(model.lmvsd_branch(images, none_v, txt, am == 0), M_seg)
        assert torch.equal(model.vmlsd_branch(vis, ids, am, none_w), M_seg)
        # ...and a masked token does change the prediction.
        one_v, one_w = none_v.clone(), none_w.clone()
        one_v[:, 3], one_w[:, 1] = True, True
        assert not torch.allclose(model.lmvsd_branch(images, one_v, txt, am == 0), M_seg)
        assert not torch.allclose(model.vmlsd_branch(vis, ids, am, one_w), M_seg)


def test_forward_backward_tiny_shapes_and_every_parameter_gets_a_gradient():
    cfg = M.Config.tiny()
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
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, missing


def test_overfits_one_batch():
    cfg = small_cfg()
    model = build(cfg).train()
    batch = make_batch(cfg, [2, 3, 4, 2])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    seg = []
    for _ in range(30):
        out = model(*batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        seg.append(out["losses"]["seg"].item())
    assert seg[-1] < 0.2 * seg[0], seg  # the main BCE (about 2 at init) falls to ~0.02


def test_each_ablation_changes_the_computation():
    cfg = small_cfg()
    images, ids, am, targets = make_batch(cfg, [3, 5])
    base = build(cfg).train()
    torch.manual_seed(1)
    ref, ref_vis, ref_txt = count_encoder_calls(base, images, ids, am, targets)
    for name in M.ABLATIONS:
        model = build(dataclasses.replace(cfg, ablate=(name,))).train()
        model.load_state_dict(base.state_dict(), strict=False)  # same weights, fewer tokens
        torch.manual_seed(1)
        out, n_vis, n_txt = count_encoder_calls(model, images, ids, am, targets)
        assert not torch.allclose(out["loss"], ref["loss"]), name
        if name == "no_lmvsd":
            assert n_vis == 1 and "lmvsd" not in out["losses"] and "lmvsd_mask" not in out
            assert not hasattr(model, "patch_mask_token")
        elif name == "no_vmlsd":
            assert n_txt == 1 and "vmlsd" not in out["losses"]
            assert not hasattr(model, "word_mask_token")
        else:  # random_mask: same counts, other places
            assert (n_vis, n_txt) == (ref_vis, ref_txt)
            assert out["lmvsd_mask"].sum() == ref["lmvsd_mask"].sum()
            assert not torch.equal(out["lmvsd_mask"], ref["lmvsd_mask"])


def test_unknown_ablation_and_bad_ratios_raise():
    with pytest.raises(ValueError, match="unknown ablation 'no_such' for cm_masksd"):
        M.build_model(dataclasses.replace(small_cfg(), ablate=("no_such",)))
    with pytest.raises(ValueError, match="lmvsd_alpha"):
        M.build_model(small_cfg(lmvsd_alpha=25.0))


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
        M.build_model(dataclasses.replace(cfg, pretrained=True, vision_name=str(tmp_path / "no")))


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


def test_sample_extra():
    cfg = small_cfg()
    model = build(cfg).eval()
    out = model(*make_batch(cfg, [2, 3]))
    grid, caption = M.sample_extra(out, 1, None)
    n = int(out["lmvsd_mask"][1].sum())
    assert grid.shape == out["lmvsd_mask"].shape[1:] and caption == f"LMVSD masked {n} patches"
    assert M.sample_extra({"mask_logits": out["mask_logits"]}, 0, None) == (None, "")
