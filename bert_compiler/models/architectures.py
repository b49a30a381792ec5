"""Registry of supported encoder architectures, one spec each.

A spec says what the exporter feeds the model, what ORT's transformers optimizer should produce
for it, and a tiny configuration the tests build a random model from.
tests/run/test_architectures.py fails when a registered architecture has no test model, so adding
one here means adding its tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bert_compiler.core.errors import UnsupportedModelError


def _bert_expected_fusions(config: Mapping[str, Any]) -> dict[str, int]:
    layers = int(config["num_hidden_layers"])
    # One EmbedLayerNormalization for the embeddings, one Attention and one Gelu-family node per
    # layer, and two SkipLayerNormalization per layer (after attention and after the FFN).
    return {
        "EmbedLayerNormalization": 1,
        "Attention": layers,
        "*Gelu": layers,
        "SkipLayerNormalization": 2 * layers,
    }


def _roberta_expected_fusions(config: Mapping[str, Any]) -> dict[str, int]:
    # Measured on the tiny model's export with onnxruntime 1.32: every layer fuses as in BERT, but
    # the embeddings do not (ROBERTA_FUSION_NOTE): their LayerNorm becomes a LayerNormalization.
    counts = _bert_expected_fusions(config)
    del counts["EmbedLayerNormalization"]
    return {**counts, "LayerNormalization": 1}


ROBERTA_FUSION_NOTE = (
    "ORT's optimizer does not fuse RoBERTa's embeddings into EmbedLayerNormalization (its kernel "
    "numbers positions from 0; RoBERTa's start after the padding index): they stay standard ops"
)


def _no_offset(config: Mapping[str, Any]) -> int:
    return 0


def _after_padding_index(config: Mapping[str, Any]) -> int:
    # HF RoBERTa numbers real tokens padding_idx + 1, padding_idx + 2, ... (padding_idx is
    # pad_token_id), so the first padding_idx + 1 rows of the position table are never a real
    # token's position.
    return int(config["pad_token_id"]) + 1


def _mpnet_expected_fusions(config: Mapping[str, Any]) -> dict[str, int]:
    # Measured on the tiny model's export with onnxruntime 1.32 (MPNET_FUSION_NOTE): no Attention
    # and no EmbedLayerNormalization; the embeddings' sum and LayerNorm become one more
    # SkipLayerNormalization.
    layers = int(config["num_hidden_layers"])
    return {"*Gelu": layers, "SkipLayerNormalization": 2 * layers + 1}


MPNET_FUSION_NOTE = (
    "ORT's optimizer fuses no Attention for MPNet (its relative position bias, added to the "
    "attention scores, is outside ORT's BERT attention pattern) and no EmbedLayerNormalization: "
    "attention runs as standard ops"
)


def _mpnet_offset(config: Mapping[str, Any]) -> int:
    # HF MPNet numbers real tokens from 2 (its padding_idx is 1 whatever pad_token_id says).
    return 2


@dataclass(frozen=True)
class ArchitectureSpec:
    """What the pipeline needs to know about one Hugging Face ``model_type``.

    Attributes:
        model_type: the ``model_type`` in config.json.
        input_names: graph inputs, in the order the model's forward takes them.
        ort_optimizer_type: ``model_type`` argument of ORT's transformers optimizer.
        expected_fusions: fused-operator counts a healthy fused graph has, from the config.
            A key starting with ``*`` sums every operator ending with the rest (``*Gelu``).
        tiny_config: a small random configuration for tests.
        position_offset: rows of the position table before the first token's position (from
            the config); a sequence holds at most ``max_position_embeddings`` minus this.
        fusion_note: why ORT's fusion covers this architecture only partly (empty: fully).
        config_bounds: config.json integers this architecture needs beyond the common ones,
            with their inclusive bounds.
        config_aliases: BERT's config key -> this architecture's own name for it (DistilBERT's
            ``dim`` is ``hidden_size``), as HF's ``attribute_map``.
        config_defaults: BERT config keys this architecture's config.json may leave out, with
            the value that means (no ``type_vocab_size``: no token types).
        head_fusions: fused operators a task's head adds, per task (ELECTRA's classifier head
            has a GELU of its own), added to ``expected_fusions``' counts.
    """

    model_type: str
    input_names: tuple[str, ...]
    ort_optimizer_type: str
    expected_fusions: Callable[[Mapping[str, Any]], dict[str, int]]
    tiny_config: Mapping[str, Any] = field(default_factory=dict)
    position_offset: Callable[[Mapping[str, Any]], int] = _no_offset
    fusion_note: str = ""
    config_bounds: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    config_aliases: Mapping[str, str] = field(default_factory=dict)
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    head_fusions: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def fusions_for(self, config: Mapping[str, Any], task: str) -> dict[str, int]:
        """Fused-operator counts a healthy fused graph of this config and task has."""
        counts = self.expected_fusions(config)
        for key, extra in self.head_fusions.get(task, {}).items():
            counts[key] = counts.get(key, 0) + extra
        return counts

    def canonical_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """``config`` with BERT's key names added for this architecture's own ones (and the
        defaults of keys it leaves out), so every later stage reads one set of names."""
        canonical = dict(config)
        for bert_key, own_key in self.config_aliases.items():
            if own_key in config:
                canonical[bert_key] = config[own_key]
        for key, value in self.config_defaults.items():
            canonical.setdefault(key, value)
        return canonical

    def config_key(self, bert_key: str) -> str:
        """The name ``bert_key`` has in this architecture's config.json."""
        return self.config_aliases.get(bert_key, bert_key)

    def max_tokens(self, config: Mapping[str, Any]) -> int:
        """The longest sequence a model of this configuration can number (tokens)."""
        return int(config["max_position_embeddings"]) - self.position_offset(config)


# The layer shape every tiny test model shares (an odd intermediate size catches shape bugs).
_TINY_LAYERS = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 37,
}


def _roberta_like(model_type: str) -> ArchitectureSpec:
    """RoBERTa's spec under ``model_type`` (RoBERTa and XLM-RoBERTa share HF's implementation)."""
    return ArchitectureSpec(
        model_type=model_type,
        # HF RoBERTa takes token_type_ids but has one type (type_vocab_size 1) and its tokenizer
        # does not return them: the graph leaves them out, as for every model with one type.
        input_names=("input_ids", "attention_mask"),
        # onnxruntime's optimizer has no roberta type; its BERT model covers RoBERTa's layers.
        ort_optimizer_type="bert",
        expected_fusions=_roberta_expected_fusions,
        tiny_config={
            **_TINY_LAYERS,
            "max_position_embeddings": 130,
            "type_vocab_size": 1,
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
        },
        position_offset=_after_padding_index,
        fusion_note=ROBERTA_FUSION_NOTE,
        config_bounds={"pad_token_id": (0, 1_000_000)},
    )


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "bert": ArchitectureSpec(
        model_type="bert",
        input_names=("input_ids", "attention_mask", "token_type_ids"),
        ort_optimizer_type="bert",
        expected_fusions=_bert_expected_fusions,
        tiny_config={
            **_TINY_LAYERS,
            "max_position_embeddings": 128,
            "type_vocab_size": 2,
        },
    ),
    "roberta": _roberta_like("roberta"),
    # XLM-RoBERTa is RoBERTa with a SentencePiece vocabulary: the same graph, positions and fusion.
    "xlm-roberta": _roberta_like("xlm-roberta"),
    "electra": ArchitectureSpec(
        model_type="electra",
        input_names=("input_ids", "attention_mask", "token_type_ids"),
        ort_optimizer_type="bert",
        expected_fusions=_bert_expected_fusions,
        tiny_config={
            "embedding_size": 24,
            **_TINY_LAYERS,
            "max_position_embeddings": 128,
            "type_vocab_size": 2,
        },
        # Measured: fused as BERT (the embeddings' projection to hidden_size, when
        # embedding_size differs, stays a MatMul after EmbedLayerNormalization), and the
        # classifier head's dense + GELU become one more Gelu.
        head_fusions={"sequence-classification": {"*Gelu": 1}},
        config_bounds={"embedding_size": (1, 16_384)},
    ),
    "mpnet": ArchitectureSpec(
        model_type="mpnet",
        input_names=("input_ids", "attention_mask"),  # no token types in MPNet
        ort_optimizer_type="bert",
        expected_fusions=_mpnet_expected_fusions,
        tiny_config={
            **_TINY_LAYERS,
            "max_position_embeddings": 130,
            "relative_attention_num_buckets": 32,
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
        },
        position_offset=_mpnet_offset,
        fusion_note=MPNET_FUSION_NOTE,
        # HF MPNet computes the position bias with 32 buckets whatever the config says: another
        # count would index outside its table.
        config_bounds={"relative_attention_num_buckets": (32, 32)},
        config_defaults={"type_vocab_size": 0},
    ),
    "distilbert": ArchitectureSpec(
        model_type="distilbert",
        input_names=("input_ids", "attention_mask"),  # no token types in DistilBERT
        # onnxruntime's optimizer has no distilbert type; its BERT model matches DistilBERT's
        # embeddings (positions 0..n-1 from input_ids' shape, no segment table) and layers.
        ort_optimizer_type="bert",
        expected_fusions=_bert_expected_fusions,
        tiny_config={
            "dim": 32,
            "n_layers": 2,
            "n_heads": 2,
            "hidden_dim": 37,
            "max_position_embeddings": 128,
        },
        config_aliases={
            "hidden_size": "dim",
            "num_hidden_layers": "n_layers",
            "num_attention_heads": "n_heads",
            "intermediate_size": "hidden_dim",
        },
        config_defaults={"type_vocab_size": 0},
    ),
}


def architecture_for(model_type: object, where: str) -> ArchitectureSpec:
    """Return the registered spec for ``model_type``.

    Raises:
        UnsupportedModelError: the model type is not registered.
    """
    spec = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if spec is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(
            f"{where}: unsupported architecture model_type={model_type!r}; supported: {supported}"
        )
    return spec
