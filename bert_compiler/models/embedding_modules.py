"""The sentence-transformers modules after a model's encoder: Pooling, Dense and Normalize.

modules.json lists them in the order they run. A sentence-embedding model's output is its
encoder's token rows pooled (masked mean, or the first token), passed through each Dense layer
(``activation(x @ weight.T + bias)``: distiluse-base-multilingual projects 768 -> 512 so), then
L2-normalised. The export wraps them around the encoder, so every engine runs them in its graph,
and the PyTorch reference runs them here. Any other module (a word-embedding model, a module of
custom code) is refused in one line: the engine's embeddings would not be the model's.
"""

from __future__ import annotations

import os
import pickle  # only for its exception type: weights load through safetensors/weights_only
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bert_compiler.core.errors import InputError, UnsupportedModelError
from bert_compiler.models.model_files import (
    check_safetensors_header,
    find_weights,
    module_folder,
    read_model_json,
)

# The module kinds the engines run, by the class name ending modules.json's "type".
_KINDS = ("Transformer", "Pooling", "Dense", "Normalize")
# A Dense module's activation_function (its class's import path) -> the engines' name for it.
_DENSE_ACTIVATIONS = {
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.linear.Identity": "none",
}
# What sentence-transformers' Dense takes when its config names no activation.
_DEFAULT_DENSE_ACTIVATION = "torch.nn.modules.activation.Tanh"
# Pooling as sentence-transformers 5+ writes it ("pooling_mode") and as earlier releases did
# (one "pooling_mode_*" key true).
_POOLING_MODES = {"mean": "mean", "cls": "cls"}
_LEGACY_POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
_MAX_FEATURES = 65_536
# The embedding a module reads and writes; other names route another module's output.
_EMBEDDING_NAME = "sentence_embedding"


@dataclass(frozen=True)
class DenseLayer:
    """One sentence-transformers Dense module.

    Attributes:
        weights: its weights file (``linear.weight`` [out, in] and ``linear.bias`` [out]).
        in_features: the width it reads.
        out_features: the width it writes.
        bias: whether it adds ``linear.bias``.
        activation: ``tanh``, ``relu`` or ``none``.
    """

    weights: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str


@dataclass(frozen=True)
class EmbeddingModules:
    """What a model folder's modules.json says happens after the encoder.

    Attributes:
        pooling: ``mean`` or ``cls``; None when modules.json names no Pooling (or there is none).
        dense: the Dense layers after pooling, in order.
        normalize: L2-normalise the result (the Normalize module).
        files: every module file read (relative to the model folder): they shape the outputs.
    """

    pooling: str | None = None
    dense: tuple[DenseLayer, ...] = ()
    normalize: bool = False
    files: tuple[str, ...] = ()


def read_embedding_modules(
    folder: Path, hidden_size: int, *, allow_pickle: bool = False
) -> EmbeddingModules:
    """Read and check modules.json and the settings and weights headers of its modules.

    Raises:
        InputError: a module file is missing, unreadable or does not fit the model.
        UnsupportedModelError: a module, its order or one of its settings is not one the engines
            run.
    """
    modules_path = folder / "modules.json"
    if not os.path.lexists(modules_path):
        return EmbeddingModules()  # a FIFO or folder there is refused below, not skipped
    modules = read_model_json(modules_path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise InputError(f"{modules_path}: expected a JSON list of module objects")
    kinds = []
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _KINDS:
            raise UnsupportedModelError(
                f"{modules_path}: module {module.get('path') or module.get('name')!r} "
                f"({module.get('type')}) is not supported ({', '.join(_KINDS)} are): the "
                "engine's embeddings would not be the model's"
            )
        kinds.append(kind)
    order = " ".join(kinds)
    supported = (
        kinds[:1] == ["Transformer"]
        and set(kinds[2:-1]) <= {"Dense"}
        and (len(kinds) < 2 or kinds[1] == "Pooling")
        and (len(kinds) < 3 or kinds[-1] in ("Dense", "Normalize"))
    )
    if not supported:
        raise UnsupportedModelError(
            f"{modules_path}: modules run as {order}; the engines run Transformer, then "
            "Pooling, Dense layers and Normalize in that order"
        )
    if module_folder(folder, modules[0].get("path", ""), modules_path) != folder:
        raise UnsupportedModelError(
            f"{modules_path}: the Transformer module's path is {modules[0].get('path')!r}; "
            'the encoder read is the model folder\'s own (path "")'
        )
    if len(modules) < 2:
        return EmbeddingModules(files=("modules.json",))
    files = ["modules.json"]
    pooling_folder = module_folder(folder, modules[1].get("path", ""), modules_path)
    pooling = _read_pooling(pooling_folder / "config.json")
    files.append(str((pooling_folder / "config.json").relative_to(folder)))
    dense, width = [], hidden_size
    for module in modules[2:]:
        if str(module.get("type")).endswith("Dense"):
            module_path = module_folder(folder, module.get("path", ""), modules_path)
            layer = _read_dense(module_path, width, allow_pickle)
            dense.append(layer)
            width = layer.out_features
            files += [str((module_path / "config.json").relative_to(folder))]
            files += [str(layer.weights.relative_to(folder))]
    return EmbeddingModules(
        pooling=pooling, dense=tuple(dense), normalize=kinds[-1] == "Normalize", files=tuple(files)
    )


def _read_pooling(path: Path) -> str:
    settings = read_model_json(path)
    if not isinstance(settings, dict):
        raise InputError(f"{path}: expected a JSON object of pooling settings")
    if "pooling_mode" in settings:
        mode = settings["pooling_mode"]
        modes = mode if isinstance(mode, list) else [mode]
    else:
        modes = [key for key, value in settings.items() if key.startswith("pooling_mode_")]
        modes = [_LEGACY_POOLING_KEYS.get(key, key) for key in modes if settings[key] is True]
    if len(modes) != 1 or not isinstance(modes[0], str) or modes[0] not in _POOLING_MODES:
        raise UnsupportedModelError(
            f"{path}: pooling modes {modes} are not supported (mean or cls)"
        )
    return _POOLING_MODES[modes[0]]


def _read_dense(folder: Path, width: int, allow_pickle: bool) -> DenseLayer:
    """A Dense module's settings, checked against the width it reads, and its weights' header."""
    config_path = folder / "config.json"
    settings = read_model_json(config_path)
    if not isinstance(settings, dict):
        raise InputError(f"{config_path}: expected a JSON object of Dense settings")
    features = {}
    for key in ("in_features", "out_features"):
        value = settings.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{config_path}: {key} is {value!r}, not an integer")
        if not 1 <= value <= _MAX_FEATURES:
            raise UnsupportedModelError(
                f"{config_path}: {key}={value} is outside the supported range [1, {_MAX_FEATURES}]"
            )
        features[key] = value
    if features["in_features"] != width:
        raise InputError(
            f"{config_path}: in_features {features['in_features']} does not match the "
            f"{width} features the module before it writes"
        )
    bias = settings.get("bias", True)
    if not isinstance(bias, bool):
        raise InputError(f"{config_path}: bias is {bias!r}, not true or false")
    activation = settings.get("activation_function", _DEFAULT_DENSE_ACTIVATION)
    if activation not in _DENSE_ACTIVATIONS:
        raise UnsupportedModelError(
            f"{config_path}: activation_function {activation!r} is not supported "
            f"({', '.join(a.rsplit('.', 1)[-1] for a in _DENSE_ACTIVATIONS)} are)"
        )
    if settings.get("use_residual", False) is not False:
        raise UnsupportedModelError(f"{config_path}: use_residual Dense layers are not supported")
    for key in ("module_input_name", "module_output_name"):
        if settings.get(key, _EMBEDDING_NAME) != _EMBEDDING_NAME:
            raise UnsupportedModelError(
                f"{config_path}: {key} {settings[key]!r} is not supported (only a Dense layer "
                f"on the pooled {_EMBEDDING_NAME!r} is)"
            )
    layer = DenseLayer(
        weights=find_weights(folder, allow_pickle, "the Dense module"),
        bias=bias,
        activation=_DENSE_ACTIVATIONS[activation],
        **features,
    )
    if layer.weights.suffix == ".safetensors":
        expected = {"linear.weight": [layer.out_features, layer.in_features]}
        if bias:
            expected["linear.bias"] = [layer.out_features]
        found = {
            name: entry["shape"] for name, entry in check_safetensors_header(layer.weights).items()
        }
        if found != expected:
            raise InputError(f"{layer.weights}: holds {found}, but config.json asks for {expected}")
    return layer


def embedding_head(modules: EmbeddingModules):
    """The modules after the encoder as a torch module: ``(token rows [batch, seq, hidden],
    attention_mask [batch, seq]) -> embeddings [batch, width]``, in float32.

    Raises:
        InputError: a Dense module's weights cannot be loaded or do not fit its settings.
    """
    import torch

    activations = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU, "none": torch.nn.Identity}
    layers: list[torch.nn.Module] = []
    for layer in modules.dense:
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
        try:
            linear.load_state_dict(_linear_weights(layer.weights), strict=True)
        except (RuntimeError, OSError, ValueError, pickle.UnpicklingError) as err:
            raise InputError(
                f"{layer.weights}: cannot load the Dense weights ({str(err).splitlines()[0]})"
            ) from None
        layers += [linear, activations[layer.activation]()]
    pooling, normalize = modules.pooling, modules.normalize

    class EmbeddingHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = torch.nn.Sequential(*layers)

        def forward(self, hidden, attention_mask):
            pooled = _pool(hidden, attention_mask, pooling or "mean")
            pooled = self.dense(pooled)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
            return pooled

    return EmbeddingHead().eval()


def _linear_weights(path: Path) -> dict[str, Any]:
    """A Dense module's state dict in float32, with its ``linear.`` prefix taken off."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{type(state).__name__}, not a state dict")
    return {
        name.removeprefix("linear."): tensor.to(torch.float32) for name, tensor in state.items()
    }


def _pool(hidden, attention_mask, mode: str):
    """sentence-transformers pooling of token rows: the masked mean, or the first token."""
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
