"""Pretrain the demo's three tiny encoders on the synthetic world (placeholder: --init-only)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    SwinConfig,
    SwinForImageClassification,
)

import data

ROOT = Path(__file__).resolve().parent
ATTRIBUTES = data.COLOUR_NAMES + data.SHAPES + tuple(data.SIZES)  # Swin's multi-label classes


def swin_config() -> SwinConfig:
    return SwinConfig(
        image_size=64, patch_size=4, num_channels=3, embed_dim=32, depths=[2, 2, 2, 2],
        num_heads=[1, 2, 4, 8], window_size=4, mlp_ratio=4.0, drop_path_rate=0.0,
        num_labels=len(ATTRIBUTES), problem_type="multi_label_classification",
        id2label=dict(enumerate(ATTRIBUTES)), label2id={a: i for i, a in enumerate(ATTRIBUTES)},
    )  # fmt: skip


def bert_config(vocab_size: int) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=32, pad_token_id=0,
    )  # fmt: skip


def clip_config(vocab_size: int) -> CLIPConfig:
    text = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=32, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, projection_dim=64,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        image_size=64, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=10,
        num_attention_heads=4, projection_dim=64,
    )  # fmt: skip
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "pretrained"))
    parser.add_argument("--init-only", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    torch.manual_seed(args.seed)
    bert_tok, clip_tok = data.build_tokenizer("bert"), data.build_tokenizer("clip")
    SwinForImageClassification(swin_config()).save_pretrained(out / "tiny-swin")
    BertForMaskedLM(bert_config(len(bert_tok))).save_pretrained(out / "tiny-bert")
    bert_tok.save_pretrained(out / "tiny-bert")
    CLIPModel(clip_config(len(clip_tok))).save_pretrained(out / "tiny-clip")
    clip_tok.save_pretrained(out / "tiny-clip")


if __name__ == "__main__":
    main()
