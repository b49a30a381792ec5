"""Tiny random BERT model folders, built in code, in the layouts the pipeline accepts."""

from __future__ import annotations

import json
import string
from pathlib import Path

from bert_compiler.pipeline.architectures import ARCHITECTURES

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def char_vocab() -> list[str]:
    """A character-level WordPiece vocabulary: every word tokenizes, into letters."""
    chars = list(string.ascii_lowercase + string.digits)
    punctuation = list(".,'!?-:;\"()")
    return SPECIAL + chars + punctuation + [f"##{c}" for c in chars]


def make_tiny_model(
    folder: Path,
    *,
    model_type: str = "bert",
    task: str = "sentence-embedding",
    seed: int = 0,
    config_overrides: dict | None = None,
) -> Path:
    """Write a random model of the registered architecture's tiny config to ``folder``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = char_vocab()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(str(folder))

    spec = ARCHITECTURES[model_type]
    config = BertConfig(vocab_size=len(vocab), **{**spec.tiny_config, **(config_overrides or {})})
    torch.manual_seed(seed)
    if task == "sequence-classification":
        config.num_labels = 2
        model = BertForSequenceClassification(config)
    else:
        model = BertModel(config, add_pooling_layer=False)
    # Random init leaves biases at zero, and onnxsim then deletes those Adds, which no trained model
    # would show (and which breaks ORT's bias fusions). Give every parameter trained-looking values.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.02)
            elif "LayerNorm" in name:
                param.normal_(1.0, 0.02)
    model.eval().save_pretrained(str(folder), safe_serialization=True)

    if task == "sentence-embedding":
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            },
        ]
        (folder / "modules.json").write_text(json.dumps(modules))
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(
            json.dumps(
                {
                    "word_embedding_dimension": config.hidden_size,
                    "pooling_mode_cls_token": False,
                    "pooling_mode_mean_tokens": True,
                }
            )
        )
    return folder


def edit_config(folder: Path, **changes) -> None:
    """Rewrite keys of a model folder's config.json (None deletes a key)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
