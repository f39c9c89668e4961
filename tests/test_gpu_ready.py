"""What a CPU can catch of a training step's CUDA-only trouble, before a GPU ever runs it.

(a) the paper architectures (small encoders, the paper's heads) train under bf16 autocast with a
    finite loss and no dtype mismatch, as train.py runs them on CUDA;
(b) the training step (forward with targets, backward, gradient clipping) asks the host nothing
    of the tensors: every op that blocks the CPU until a CUDA stream catches up is counted;
(c) each tiny model's training forward compiles as one graph (torch._dynamo.explain);
(d) train.build_optimizer's optimizers step, fused as on CUDA and unfused as on the CPU.
A method that syncs or breaks its graph today is an xfail(strict=True) naming the lines; when it
is fixed the xfail fails, and its entry goes.
"""

import collections
import dataclasses
import importlib
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import data
import train

METHODS = ("rela", "magnet", "m3dec", "asda", "cm_masksd")
ROOT = Path(__file__).resolve().parents[1]

# Methods whose eager training step syncs today, and where (file:line as of this writing). The
# text encoders' syncs are in transformers: its mask helpers read the attention mask on the host
# to decide whether SDPA may skip it (a compiled step does not read it).
_BERT_MASK = "transformers masking_utils.py:369 _ignore_bidirectional_mask_sdpa, padding_mask.all()"
_CLIP_MASK = (
    "transformers masking_utils.py:307/313 _ignore_causal_mask_sdpa, fast_all(padding_mask)"
)
SYNCS = {
    "rela": f"{_BERT_MASK}, via ReLA.forward's text_encoder call (rela.py:614)",
    "magnet": "boolean indexing (a nonzero on CUDA) in eager mode: cross_modal_alignment_loss "
    "magnet.py:709 (per sample), grounding forward magnet.py:561 and grounding_loss magnet.py:1058 "
    "(the masked words), and their backward (index_put with a mask)",
    "m3dec": "boolean indexing in bn_tokens, m3dec.py:517 x[keep] and :519 out[keep] = y (and "
    f"their backward); {_BERT_MASK}, via M3Dec.forward's text_encoder call (m3dec.py:620)",
    "asda": f"{_CLIP_MASK}, via FeatureExtraction.forward's text call (asda.py:238)",
    "cm_masksd": f"{_CLIP_MASK}, via encode_text (cm_masksd.py:617), twice per step",
}
# Methods whose tiny training forward does not compile as one graph today.
BREAKS = {
    "m3dec": "dynamic shapes from boolean indexing in bn_tokens: m3dec.py:517",
}


def xfail_if(table: dict, method: str):
    marks = [pytest.mark.xfail(strict=True, reason=table[method])] if method in table else []
    return pytest.param(method, marks=marks)


def tie(cfg, tokenizer):
    """Size the text side to the tokenizer, as train.py does (MagNet: [MASK] and articles)."""
    cfg = dataclasses.replace(cfg, pretrained=False, vocab_size=len(tokenizer))
    if hasattr(cfg, "mask_token_id"):
        ids = tokenizer.convert_tokens_to_ids(["a", "an", "the"])
        articles = tuple(i for i in ids if i != tokenizer.unk_token_id)
        cfg = dataclasses.replace(cfg, mask_token_id=tokenizer.mask_token_id, article_ids=articles)
    return cfg


def small_paper(module, tokenizer):
    """Config.paper() with the tiny preset's encoders and image size: every head, loss and switch
    of the paper (MagNet's 8-layer predictor and CAL from step 0, CM-MaskSD's 3-layer decoder,
    ...) on small encoders. Grids tied to the image size follow the tiny preset."""
    paper, tiny = module.Config.paper(), module.Config.tiny()
    small = dict(image_size=tiny.image_size, vision_config=tiny.vision_config,
                 text_config=tiny.text_config)  # fmt: skip
    for name in ("grounding_grid", "coef_grid", "max_tokens"):  # tied to the sizes
        if hasattr(paper, name):
            small[name] = getattr(tiny, name)
    return tie(dataclasses.replace(paper, **small), tokenizer)


def world_batch(method: str, cfg, tokenizer, n: int = 4):
    """n samples of train.py's default world for the method, at the config's size."""
    world = data.build_dataset("gshapes" if method == "rela" else "shapes", "train",
                               tokenizer=tokenizer, family=importlib.import_module(method)
                               .TEXT_ENCODER, image_size=cfg.image_size,
                               max_tokens=cfg.max_tokens, num_samples=n)  # fmt: skip
    b = data.collate([world[i] for i in range(n)])
    targets = {"masks": b["mask"], "no_target": b["no_target"]}
    return b["image"], b["input_ids"], b["attention_mask"], targets


def tiny_setup(method: str):
    """The demo's architecture with random encoders, and a batch of its world."""
    module = importlib.import_module(method)
    tokenizer = data.build_tokenizer(module.TEXT_ENCODER, None)
    cfg = tie(module.Config.tiny(), tokenizer)
    torch.manual_seed(0)
    return module.build_model(cfg).train(), world_batch(method, cfg, tokenizer)


# ---------------------------------------------------------------------------------------------
# (a) bf16 autocast


@pytest.mark.parametrize("method", METHODS)
def test_paper_architecture_trains_under_bf16_autocast(method):
    module = importlib.import_module(method)
    tokenizer = data.build_tokenizer(module.TEXT_ENCODER, None)
    cfg = small_paper(module, tokenizer)
    torch.manual_seed(0)
    model = module.build_model(cfg).train()
    images, ids, am, targets = world_batch(method, cfg, tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, ids, am, targets=targets)
    assert out["mask_logits"].dtype in (torch.bfloat16, torch.float32)
    assert torch.isfinite(out["loss"]), out["losses"]
    out["loss"].backward()  # a dtype mismatch in a backward formula raises here
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------
# (b) host-device syncs

aten = torch.ops.aten
# Ops that wait for the device: a tensor read as a Python number (item, bool, int, float all
# reach _local_scalar_dense), and ops whose output size depends on the values.
SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.equal.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
             aten._index_put_impl_.default}  # fmt: skip


def where() -> str:
    """Where an op was called: "file:line (function)" of the innermost frame outside torch, and
    "via" the innermost frame of this repository when that one is in another library."""

    def name(frame) -> str:
        path = frame.filename.split("site-packages/")[-1].removeprefix(str(ROOT) + "/")
        return f"{path}:{frame.lineno} ({frame.name})"

    stack = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename]
    if not stack or ".backward()" in (stack[-1].line or ""):
        return "backward"  # a backward formula: the autograd engine has no Python frame
    ours = [f for f in stack if f.filename.startswith(str(ROOT)) and "/tests/" not in f.filename]
    if ours and ours[-1] is not stack[-1]:
        return f"{name(stack[-1])} via {name(ours[-1])}"
    return name(stack[-1])


class SyncCounter(TorchDispatchMode):
    """Counts the ops of SYNC_OPS, indexing with a boolean mask (a nonzero on CUDA) and
    Tensor.tolist / numpy, by op and file:line."""

    def __init__(self):
        super().__init__()
        self.hits = collections.Counter()
        self.cuda_free = 0  # inside an op that checks its input on the host off CUDA only

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masked = func in INDEX_OPS and any(
            i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]
        )
        if (func in SYNC_OPS and not self.cuda_free) or masked:
            self.hits[(f"{func}{' with a mask' if masked else ''}", where())] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        # F.one_hot with num_classes checks the class range on the host only off CUDA (ATen
        # Onehot.cpp): on a GPU it never syncs.
        self._one_hot, self._tolist, self._numpy = (
            F.one_hot,
            torch.Tensor.tolist,
            torch.Tensor.numpy,
        )

        def one_hot(x, num_classes=-1):
            self.cuda_free += num_classes >= 0
            try:
                return self._one_hot(x, num_classes)
            finally:
                self.cuda_free -= num_classes >= 0

        def host(name, fn):
            def wrapped(t, *a, **k):
                self.hits[(f"Tensor.{name}", where())] += 1
                return fn(t, *a, **k)

            return wrapped

        F.one_hot = one_hot
        torch.Tensor.tolist = host("tolist", self._tolist)
        torch.Tensor.numpy = host("numpy", self._numpy)
        return super().__enter__()

    def __exit__(self, *exc):
        F.one_hot, torch.Tensor.tolist, torch.Tensor.numpy = (
            self._one_hot,
            self._tolist,
            self._numpy,
        )
        return super().__exit__(*exc)


def test_sync_counter_sees_each_kind_of_sync():
    x = torch.arange(6.0)
    with SyncCounter() as c:
        float(x.sum()), bool(x.any()), x[x > 2], x.tolist(), F.one_hot(x.long(), 6)
        x.sum() * 2, x.masked_fill(x > 2, 0.0), torch.where(x > 2, x, 0.0)  # no sync
    ops = sorted(op for op, _ in c.hits.elements())
    assert ops == ["Tensor.tolist", "aten._local_scalar_dense.default",
                   "aten._local_scalar_dense.default", "aten.index.Tensor with a mask"]  # fmt: skip
    assert all(w.startswith("tests/test_gpu_ready.py:") for _, w in c.hits), c.hits


@pytest.mark.parametrize("method", [xfail_if(SYNCS, m) for m in METHODS])
def test_training_step_has_no_host_sync(method):
    model, (images, ids, am, targets) = tiny_setup(method)
    params = [p for p in model.parameters() if p.requires_grad]
    with SyncCounter() as c:
        out = model(images, ids, am, targets=targets)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # train.py's clip (fused AdamW: no sync)
    report = "; ".join(f"{op} at {w} x{n}" for (op, w), n in sorted(c.hits.items()))
    assert not c.hits, f"{method}'s training step syncs: {report}"


# ---------------------------------------------------------------------------------------------
# (c) graph breaks


@pytest.mark.parametrize("method", [xfail_if(BREAKS, m) for m in METHODS])
def test_tiny_training_forward_compiles_without_graph_breaks(method):
    model, (images, ids, am, targets) = tiny_setup(method)
    # One eager call first, as the first training step: transformers installs its output-capturing
    # hooks (CLIP's hidden states) under a threading lock on a model's first call, which breaks
    # the graph of that call only.
    model(images, ids, am, targets=targets)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(images, ids, am, targets=targets)
    reasons = [
        f"{b.reason.splitlines()[0][:120]} at "
        + ", ".join(f"{Path(f.filename).name}:{f.lineno}" for f in b.user_stack[-2:])
        for b in explained.break_reasons
    ]
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, f"{method}: {sorted(set(reasons))}"


# ---------------------------------------------------------------------------------------------
# (d) the optimizer


class Toy(torch.nn.Module):
    """A Hugging Face encoder (its lr is scaled) and a new layer, as every method has."""

    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=8,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
        self.enc = BertModel(cfg, add_pooling_layer=False)
        self.head = torch.nn.Linear(8, 1)

    def loss(self):
        ids = torch.tensor([[2, 5, 6, 3]])
        return self.head(self.enc(ids).last_hidden_state).square().mean()


@pytest.mark.parametrize("kind", ["adamw", "adam"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_build_optimizer_steps_as_the_unfused_reference(kind, device):
    """build_optimizer for a device (cuda: fused=True, whose CPU kernel steps these CPU
    parameters, so the CUDA branch runs without a GPU) against torch's unfused optimizer on the
    same groups: the frozen part stays, the rest moves the same up to float rounding."""
    recipe = {"optimizer": kind, "lr": 1e-2, "encoder_lr_factor": 0.1, "weight_decay": 0.01,
              "frozen": ("enc.embeddings",)}  # fmt: skip
    torch.manual_seed(0)
    model, reference = Toy(), Toy()
    reference.load_state_dict(model.state_dict())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer, params = train.build_optimizer(model, recipe, torch.device(device), warn=False)
    if device == "cuda":
        assert optimizer.defaults.get("fused") is True
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-2]  # encoder, new layers
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {
        n for n in before if n.startswith("enc.embeddings.")
    }
    assert len(params) == sum(p.requires_grad for p in model.parameters())
    ref_groups = [
        {"params": [p for n, p in reference.named_parameters()
                    if n.startswith("enc.") and not n.startswith("enc.embeddings.")], "lr": 1e-3},
        {"params": list(reference.head.parameters()), "lr": 1e-2},
    ]  # fmt: skip
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    ref_opt = cls(ref_groups, lr=1e-2, weight_decay=0.01, foreach=False)
    for net, opt in ((model, optimizer), (reference, ref_opt)):
        for _ in range(2):
            net.loss().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, before[n]) == n.startswith("enc.embeddings."), n
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
