"""Registry of supported encoder architectures, one spec each.

A spec says what the exporter feeds the model, what ORT's transformers optimizer should produce
for it, and a tiny configuration the tests build a random model from. tests/test_architectures.py
fails when a registered architecture has no test model, so adding one here means adding its tests.
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
    """

    model_type: str
    input_names: tuple[str, ...]
    ort_optimizer_type: str
    expected_fusions: Callable[[Mapping[str, Any]], dict[str, int]]
    tiny_config: Mapping[str, Any] = field(default_factory=dict)


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "bert": ArchitectureSpec(
        model_type="bert",
        input_names=("input_ids", "attention_mask", "token_type_ids"),
        ort_optimizer_type="bert",
        expected_fusions=_bert_expected_fusions,
        tiny_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 37,
            "max_position_embeddings": 128,
            "type_vocab_size": 2,
        },
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
