#!/usr/bin/env python3
"""A small trained cross-encoder, for measuring what the pipeline does to a real pair model where
no such weights can be downloaded: the default model's encoder (all-MiniLM-L6-v2) with a one-label
head, fine-tuned on the bundled STS-B *train* pairs (calibration/data/calibration-pairs.tsv, gold
score / 5 as the target, binary cross-entropy on the logit, as sentence-transformers' CrossEncoder
trains). The settings below were fixed before any run and never tuned on STS-B dev, which is where
verify reports the model's Spearman.

    python scripts/train_cross_encoder.py --out /tmp/models/minilm-cross-encoder
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from bert_compiler.calibration import datasets
    from bert_compiler.models.loading import default_model_path

    source = default_model_path()
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    model = BertForSequenceClassification.from_pretrained(
        str(source), num_labels=1, local_files_only=True
    )
    rows = datasets.read_tsv(datasets.CALIBRATION_PAIRS, ("sentence1", "sentence2", "score"))
    examples = [(r["sentence1"], r["sentence2"], float(r["score"]) / 5.0) for r in rows]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    order = random.Random(args.seed)
    model.train()
    for epoch in range(args.epochs):
        order.shuffle(examples)
        total = 0.0
        for start in range(0, len(examples), args.batch_size):
            batch = examples[start : start + args.batch_size]
            encoded = tokenizer(
                [a for a, _, _ in batch],
                [b for _, b, _ in batch],
                padding=True,
                truncation="longest_first",
                max_length=256,
                return_tensors="pt",
            )
            target = torch.tensor([t for _, _, t in batch])
            loss = loss_fn(model(**encoded).logits[:, 0], target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        print(f"epoch {epoch + 1}: mean loss {total / len(examples):.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(str(args.out), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, args.out / name)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
