#!/usr/bin/env python3
"""A sentence-embedding model folder with random weights, for benchmarks where no trained weights
can travel (the GPU machine takes at most 64 MiB per call): the tokenizer and sentence-transformers
files of --like, its config (or BERT-base's with --bert-base), seed-0 weights.

Biases and LayerNorm weights get trained-looking values: random init leaves biases at zero, onnxsim
then deletes those Adds and ORT's bias fusions no longer match, unlike any real model.

    python scripts/random_encoder.py --like MINILM_FOLDER --out /tmp/models/minilm
    python scripts/random_encoder.py --like MINILM_FOLDER --bert-base --out /tmp/models/bert-base
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--like", type=Path, required=True, help="model folder to copy files from")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bert-base", action="store_true", help="BERT-base's shape (768 x 12)")
    args = parser.parse_args()

    import torch
    from transformers import BertConfig, BertModel

    if (args.out / "model.safetensors").is_file():
        return
    config = BertConfig() if args.bert_base else BertConfig.from_pretrained(str(args.like))
    torch.manual_seed(0)
    model = BertModel(config, add_pooling_layer=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.02)
            elif "LayerNorm" in name:
                param.normal_(1.0, 0.02)
    model.save_pretrained(args.out, safe_serialization=True)
    for name in FILES:
        if (args.like / name).is_file():
            (args.out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(args.like / name, args.out / name)
    pooling = args.out / "1_Pooling" / "config.json"
    if pooling.is_file():
        settings = json.loads(pooling.read_text())
        settings["word_embedding_dimension"] = config.hidden_size
        pooling.write_text(json.dumps(settings, indent=2) + "\n")


if __name__ == "__main__":
    main()
