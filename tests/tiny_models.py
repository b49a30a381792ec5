"""Tiny random BERT model folders, built in code, in the layouts the pipeline accepts."""

from __future__ import annotations

import json
import string
from pathlib import Path

from bert_compiler.models.architectures import ARCHITECTURES

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def char_vocab() -> list[str]:
    """A character-level WordPiece vocabulary: every word tokenizes, into letters."""
    chars = list(string.ascii_lowercase + string.digits)
    punctuation = list(".,'!?-:;\"()")
    return SPECIAL + chars + punctuation + [f"##{c}" for c in chars]


def byte_level_vocab() -> list[str]:
    """A byte-level BPE vocabulary with no merges: every text tokenizes, into bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(shifted))]
    return ["<s>", "<pad>", "</s>", "<unk>", *symbols, "<mask>"]


def unigram_vocab() -> list[tuple[str, float]]:
    """A SentencePiece unigram vocabulary of single characters: every ASCII text tokenizes."""
    specials = [(token, 0.0) for token in ("<s>", "<pad>", "</s>", "<unk>")]
    chars = string.ascii_letters + string.digits + string.punctuation
    return [*specials, *((c, -1.0) for c in chars), ("\u2581", -1.0), ("<mask>", 0.0)]


def _ids(vocab: list[str]) -> dict[str, int]:
    # The vocabulary itself, not a vocab_file: transformers 5 ignores vocab_file here and writes
    # a tokenizer.json of the special tokens alone, so every word became [UNK].
    return {token: i for i, token in enumerate(vocab)}


def _bert_family(model_type: str, folder: Path):
    """The tokenizer (written to ``folder``) and the HF config, model and classifier classes."""
    import transformers

    if model_type == "roberta":
        vocab = byte_level_vocab()
        tokenizer = transformers.RobertaTokenizerFast(
            vocab={token: i for i, token in enumerate(vocab)}, merges=[]
        )
        classes = (transformers.RobertaConfig, transformers.RobertaModel)
        classes += (transformers.RobertaForSequenceClassification,)
    elif model_type == "xlm-roberta":
        vocab = unigram_vocab()
        tokenizer = transformers.XLMRobertaTokenizerFast(vocab=vocab)
        classes = (transformers.XLMRobertaConfig, transformers.XLMRobertaModel)
        classes += (transformers.XLMRobertaForSequenceClassification,)
    elif model_type == "electra":
        vocab = char_vocab()
        tokenizer = transformers.ElectraTokenizerFast(vocab=_ids(vocab), do_lower_case=True)
        classes = (transformers.ElectraConfig, transformers.ElectraModel)
        classes += (transformers.ElectraForSequenceClassification,)
    elif model_type == "mpnet":
        vocab = ["<s>", "<pad>", "</s>", "[UNK]", *char_vocab()[len(SPECIAL) :], "<mask>"]
        tokenizer = transformers.MPNetTokenizerFast(
            vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True
        )
        classes = (transformers.MPNetConfig, transformers.MPNetModel)
        classes += (transformers.MPNetForSequenceClassification,)
    elif model_type == "distilbert":
        vocab = char_vocab()
        tokenizer = transformers.DistilBertTokenizerFast(vocab=_ids(vocab), do_lower_case=True)
        classes = (transformers.DistilBertConfig, transformers.DistilBertModel)
        classes += (transformers.DistilBertForSequenceClassification,)
    elif model_type == "bert":
        vocab = char_vocab()
        tokenizer = transformers.BertTokenizerFast(vocab=_ids(vocab), do_lower_case=True)
        classes = (transformers.BertConfig, transformers.BertModel)
        classes += (transformers.BertForSequenceClassification,)
    else:
        raise KeyError(f"no tiny test model for the registered architecture {model_type!r}")
    tokenizer.save_pretrained(str(folder))
    return len(vocab), classes


def make_tiny_model(
    folder: Path,
    *,
    model_type: str = "bert",
    task: str = "sentence-embedding",
    num_labels: int = 2,
    seed: int = 0,
    config_overrides: dict | None = None,
    dense_features: int | None = None,
) -> Path:
    """Write a random model of the registered architecture's tiny config to ``folder``
    (``num_labels`` 1 with sequence-classification: a cross-encoder; ``dense_features``: a
    sentence-transformers Dense module with Tanh projecting the pooled embedding to that width,
    as distiluse-base-multilingual has, written as sentence-transformers 6 saves it)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    vocab_size, (config_class, model_class, classifier_class) = _bert_family(model_type, folder)
    spec = ARCHITECTURES[model_type]
    config = config_class(vocab_size=vocab_size, **{**spec.tiny_config, **(config_overrides or {})})
    assert config.model_type == model_type, (config.model_type, model_type)
    torch.manual_seed(seed)
    if task == "sequence-classification":
        config.num_labels = num_labels
        model = classifier_class(config)
    else:
        # BERT-style models carry a pooler no task here uses; DistilBERT and ELECTRA have none.
        pooler = {} if model_type in ("distilbert", "electra") else {"add_pooling_layer": False}
        model = model_class(config, **pooler)
    # Random init leaves biases at zero, and onnxsim then deletes those Adds, which no trained model
    # would show (and which breaks ORT's bias fusions). Give every parameter trained-looking values.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.02)
            elif "LayerNorm" in name or "layer_norm" in name:
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
        if dense_features:
            _write_dense(folder / "2_Dense", config.hidden_size, dense_features)
            dense = {"path": "2_Dense", "type": "sentence_transformers.base.modules.dense.Dense"}
            modules[2:] = [{"idx": 2, "name": "2", **dense}]
            modules.append({**modules[2], "idx": 3, "name": "3", "path": "3_Normalize"})
            modules[3]["type"] = "sentence_transformers.base.modules.normalize.Normalize"
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


def _write_dense(folder: Path, in_features: int, out_features: int) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    settings = {
        "in_features": in_features,
        "out_features": out_features,
        "bias": True,
        "activation_function": "torch.nn.modules.activation.Tanh",
    }
    (folder / "config.json").write_text(json.dumps(settings))
    generator = torch.Generator().manual_seed(1)
    weights = {
        "linear.weight": torch.randn(out_features, in_features, generator=generator) * 0.3,
        "linear.bias": torch.randn(out_features, generator=generator) * 0.1,
    }
    save_file(weights, str(folder / "model.safetensors"))


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
