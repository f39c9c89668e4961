"""The Hub checkpoints' layouts load through every method file's own loading path.

For each method, tiny models of the architectures the Hub checkpoints have
(`SwinForImageClassification` for microsoft/swin-*, `BertForPreTraining` for bert-base-uncased,
`CLIPModel` for openai/clip-*) are saved to a temporary folder with random weights (then
perturbed, so that no initialiser can reproduce them), and `module.build_model(cfg)` loads them
with cfg = Config.tiny() pointed at those folders (pretrained=True: the same `from_pretrained`
path as the paper presets). We then check that

- the encoders inside the model (found by class, whatever the attribute names) hold exactly the
  saved weights, every one of them, except the weights a method adds on purpose (SwinBackbone's
  per-stage LayerNorms, which LAVT adds to Swin and which no classification checkpoint has);
- nothing of the checkpoints' encoders is left unused except the task heads we drop on purpose
  (Swin's classifier, BERT's pre-training heads and pooler, CLIP's projections where a method
  keeps only the two towers);
- `from_pretrained(..., output_loading_info=True)` on the class the method uses reports exactly
  those missing and unexpected keys, and no mismatched shapes.
"""

import dataclasses
import importlib
import re

import pytest
import torch
from transformers import (
    BertConfig,
    BertForPreTraining,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPTextModel,
    CLIPVisionModel,
    SwinBackbone,
    SwinConfig,
    SwinForImageClassification,
    SwinModel,
)

import data

FAMILIES = {"rela": "bert", "magnet": "bert", "m3dec": "bert", "asda": "clip", "cm_masksd": "clip"}

# Encoder class -> (family, prefix of its keys in the saved Hub-layout checkpoint).
ENCODERS = {
    SwinBackbone: ("swin", ""),  # SwinBackbone wraps `swin` (a SwinModel): same key names
    SwinModel: ("swin", "swin."),
    BertModel: ("bert", "bert."),
    CLIPModel: ("clip", ""),
    CLIPVisionModel: ("clip", "vision_model."),  # CLIPModel.vision_model (transformers 5)
    CLIPTextModel: ("clip", "text_model."),
}

# Weights a method adds on purpose to a pretrained encoder (absent from every Hub checkpoint).
ADDED = {SwinBackbone: r"hidden_states_norms\."}  # LAVT's per-stage norms on Swin's outputs

# Checkpoint weights no RIS model needs: the heads of the checkpoint's own pre-training task.
DROPPED = {
    "swin": r"classifier\.",  # ImageNet classifier
    "bert": r"cls\.|bert\.pooler\.",  # masked-LM / next-sentence heads, [CLS] pooler
    "clip": r"$^",  # nothing of a CLIPModel, unless a method keeps only the towers (below)
}
CLIP_TOWERS_ONLY = r"visual_projection\.|text_projection\.|logit_scale$"


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights no initialiser makes: random init + N(0, 1) noise on every parameter (LayerNorm's
    ones and zeros included), so 'equal to the saved weights' can only mean 'loaded'."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    return model.eval()


def save_checkpoints(cfg, family: str, vocab_size: int, folder) -> dict[str, tuple]:
    """Tiny Hub-layout checkpoints of cfg's architectures -> {family: (folder, saved model)}."""
    saved = {}
    if family == "bert":
        swin = SwinForImageClassification(SwinConfig(**cfg.vision_config, num_labels=7))
        bert = BertForPreTraining(BertConfig(**{**cfg.text_config, "vocab_size": vocab_size}))
        saved["swin"] = (folder / "swin", perturbed(swin, 1))
        saved["bert"] = (folder / "bert", perturbed(bert, 2))
    else:
        V = vocab_size  # data.py's CLIP convention: <|startoftext|> = V-2, <|endoftext|> = V-1
        text = {"bos_token_id": V - 2, "eos_token_id": V - 1, "pad_token_id": V - 1,
                **cfg.text_config, "vocab_size": V}  # fmt: skip
        dim = getattr(cfg, "projection_dim", None) or cfg.vision_config.get("projection_dim", 64)
        clip = CLIPModel(
            CLIPConfig(vision_config=cfg.vision_config, text_config=text, projection_dim=dim)
        )
        saved["clip"] = (folder / "clip", perturbed(clip, 3))
    for path, model in saved.values():
        model.save_pretrained(path)
    return saved


def outermost_encoders(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Encoder modules of the model by class (a SwinModel inside a SwinBackbone is not counted)."""
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if type(module) in ENCODERS and not any(name.startswith(f + ".") for f, _ in found):
            found.append((name, module))
    return found


def loading_info(encoder: torch.nn.Module, folder) -> dict:
    """from_pretrained(..., output_loading_info=True) on the class the method uses."""
    cls = type(encoder)
    if cls in (SwinModel, BertModel):
        kwargs = {"add_pooling_layer": encoder.pooler is not None}
    elif cls is SwinBackbone:
        kwargs = {"out_features": list(encoder.out_features)}
    else:  # CLIP: the methods load the CLIPModel checkpoint whole (and may keep its towers)
        cls, kwargs = CLIPModel, {}
    _, info = cls.from_pretrained(folder, output_loading_info=True, **kwargs)
    return info


@pytest.mark.parametrize("method", list(FAMILIES))
def test_hub_checkpoint_layouts_load_into_the_model(tmp_path, method):
    module = importlib.import_module(method)
    family = FAMILIES[method]
    vocab_size = len(data.build_tokenizer(family, None))  # what train.py sets from the tokenizer
    tiny = module.Config.tiny()
    saved = save_checkpoints(tiny, family, vocab_size, tmp_path)
    names = (
        {"vision_name": str(saved["swin"][0]), "text_name": str(saved["bert"][0])}
        if family == "bert"
        else {"vision_name": str(saved["clip"][0]), "text_name": str(saved["clip"][0])}
    )
    cfg = dataclasses.replace(tiny, pretrained=True, vocab_size=vocab_size, **names)
    torch.manual_seed(0)
    model = module.build_model(cfg)

    encoders = outermost_encoders(model)
    families = sorted(ENCODERS[type(e)][0] for _, e in encoders)
    if family == "bert":
        assert families == ["bert", "swin"], [(n, type(e).__name__) for n, e in encoders]
    else:
        assert families in (["clip"], ["clip", "clip"]), [
            (n, type(e).__name__) for n, e in encoders
        ]
    used: dict[str, set[str]] = {f: set() for f in saved}
    for name, encoder in encoders:
        enc_family, prefix = ENCODERS[type(encoder)]
        folder, reference = saved[enc_family]
        ref = reference.state_dict()
        added = ADDED.get(type(encoder))
        n_added = 0
        for key, value in encoder.state_dict().items():
            if added and re.match(added, key):
                n_added += 1
                continue
            assert prefix + key in ref, f"{method}: {name}.{key} is not in the checkpoint"
            assert torch.equal(value, ref[prefix + key]), f"{method}: {name}.{key} was not loaded"
            used[enc_family].add(prefix + key)
        if added:
            assert n_added > 0  # LAVT's norms are there, newly initialised
        info = loading_info(encoder, folder)
        expected_missing = {k for k in encoder.state_dict() if added and re.match(added, k)}
        assert set(info["missing_keys"]) == expected_missing, (method, name, info)
        assert not info["mismatched_keys"] and not info["error_msgs"], (method, name, info)
        dropped = DROPPED[enc_family]
        for key in info["unexpected_keys"]:
            assert re.match(dropped, key) or re.match(dropped, prefix + key), (method, key)
    # Every weight of the checkpoints' encoders is used, except the task heads dropped on purpose.
    for enc_family, (_, reference) in saved.items():
        dropped = DROPPED[enc_family]
        if enc_family == "clip" and not any(type(e) is CLIPModel for _, e in encoders):
            dropped = CLIP_TOWERS_ONLY
        unused = {k for k in reference.state_dict() if k not in used[enc_family]}
        unexpected = sorted(k for k in unused if not re.match(dropped, k))
        assert not unexpected, f"{method}: checkpoint weights not loaded: {unexpected[:8]}"
