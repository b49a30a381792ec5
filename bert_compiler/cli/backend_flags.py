"""Each engine backend's own command-line flags: one option group per backend, building that
backend's options dataclass (BuildSpec.options), as Polygraphy's ``tools/args/backend/*`` do.

TargetOptions (cli/options.py) lists every group's flags on the commands that build engines, and
gives each planned engine its backend's options. Adding a backend's flags is one group here and
one line in BACKEND_FLAGS.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from bert_compiler.cli.option_group import Decorator, OptionGroup, Values, default_of, int_range
from bert_compiler.core.errors import InputError
from bert_compiler.engines.backend import BuildSpec, NoOptions
from bert_compiler.engines.onnxruntime import OnnxRuntimeBuildOptions
from bert_compiler.engines.ort_int8 import DYNAMIC_SCOPES, WEIGHT_CHOICES
from bert_compiler.engines.ort_session import ATTENTION_KERNELS, check_packed_attention
from bert_compiler.engines.tensorrt_options import (
    BUILDER_OPTIMIZATION_LEVELS,
    HARDWARE_COMPATIBILITY,
    Profile,
    ProfileDerivation,
    TensorRTOptions,
)
from bert_compiler.engines.torch_layout import ATTENTION_CHOICES, TorchEngineOptions

log = logging.getLogger("bert_compile")


class BackendFlags(OptionGroup):
    """A backend's flags -> its options dataclass. ``parse`` runs before the machine is looked
    at (a malformed flag is a usage problem anywhere); ``check_run`` sees the engines planned."""

    def options(self) -> list[Decorator]:
        return []

    def parse(self, values: Values, *args: Any, **kwargs: Any) -> Any:
        return NoOptions()

    def check_run(self, values: Values, specs: Sequence[BuildSpec]) -> None:
        """Raises InputError for flags that apply to none of the run's engines."""


class OnnxRuntimeFlags(BackendFlags):
    """ONNX Runtime's CPU and CUDA engine settings -> OnnxRuntimeBuildOptions."""

    def options(self) -> list[Decorator]:
        return [
            click.option(
                "--threads",
                type=int,
                default=default_of(OnnxRuntimeBuildOptions, "intra_op_num_threads"),
                show_default=True,
                help="ONNX Runtime CPU intra-op threads recorded with the engine (0: one per "
                "core).",
            ),
            click.option(
                "--cuda-graph", is_flag=True, help="ONNX Runtime CUDA: replay CUDA graphs."
            ),
            click.option(
                "--int8-weights",
                type=click.Choice(WEIGHT_CHOICES),
                default=default_of(OnnxRuntimeBuildOptions, "int8_weights"),
                show_default=True,
                help="CPU INT8 engine weights: s8 (exact with VNNI; saturating without, judged "
                "by verify), u8 (exact everywhere) or auto (s8 with VNNI, else u8). An explicit "
                "choice names the engine (...-int8-s8), so both can be compared.",
            ),
            click.option(
                "--attention-kernels",
                type=click.Choice(list(ATTENTION_KERNELS)),
                default=default_of(OnnxRuntimeBuildOptions, "attention_kernels"),
                show_default=True,
                help="ONNX Runtime CUDA attention kernels: default (ORT chooses: cuDNN flash "
                "attention on compute capability 9.0+), fused (ORT's and TensorRT's fused "
                "kernels, no cuDNN) or unfused (batched GEMMs and softmax). A non-default choice "
                "names the engine (...-attn-fused).",
            ),
            click.option(
                "--packed-attention/--no-packed-attention",
                default=default_of(OnnxRuntimeBuildOptions, "packed_attention"),
                show_default=True,
                help="ONNX Runtime CUDA: rewrite the fused graph into ORT's packing mode "
                "(RemovePadding, PackedAttention, RestorePadding: the encoder runs on the valid "
                "tokens only). Not with --cuda-graph; names the engine (...-packed-attention).",
            ),
            click.option(
                "--int8-dynamic",
                type=click.Choice(DYNAMIC_SCOPES),
                default=default_of(OnnxRuntimeBuildOptions, "int8_dynamic"),
                show_default=True,
                help="CPU INT8 engine: MatMuls whose input is quantized per batch at run time "
                "instead of with its calibrated scale: none, ffn-down (the feed-forward "
                "down-projection, after GELU) or all. TensorRT uses the calibrated scales.",
            ),
            click.option(
                "--ort-tensorrt-provider",
                is_flag=True,
                help="ONNX Runtime CUDA: put ORT's TensorRT provider first (needs TensorRT).",
            ),
        ]

    def parse(self, values: Values, *args: Any, **kwargs: Any) -> OnnxRuntimeBuildOptions:
        check_packed_attention(
            packed_attention=values["packed_attention"], cuda_graph=values["cuda_graph"]
        )
        return OnnxRuntimeBuildOptions(
            intra_op_num_threads=values["threads"],
            cuda_graph=values["cuda_graph"],
            ort_tensorrt_provider=values["ort_tensorrt_provider"],
            int8_weights=values["int8_weights"],
            attention_kernels=values["attention_kernels"],
            packed_attention=values["packed_attention"],
            int8_dynamic=values["int8_dynamic"],
        )

    def check_run(self, values: Values, specs: Sequence[BuildSpec]) -> None:
        """--packed-attention applies to the run's ONNX Runtime CUDA engines: refuse a run with
        none, and say which engines of a mixed run (``--target auto``) are built without it."""
        if not values["packed_attention"]:
            return
        without = [
            f"{s.backend} {s.device} {s.precision}"
            for s in specs
            if not (isinstance(s.options, OnnxRuntimeBuildOptions) and s.options.packed_attention)
        ]
        if len(without) == len(specs):
            raise InputError(
                "--packed-attention: this run builds no ONNX Runtime CUDA engine "
                f"({', '.join(without)}); build with --target cuda, or without --packed-attention"
            )
        for engine in without:
            log.warning("[target] --packed-attention does not apply to the %s engine", engine)


class TensorRTFlags(BackendFlags):
    """TensorRT's builder settings -> TensorRTOptions (profiles derived later when none given)."""

    def options(self) -> list[Decorator]:
        return [
            click.option(
                "--profile",
                "profiles",
                multiple=True,
                help="TensorRT optimization profile min:opt:max as BxS:BxS:BxS (batch x "
                "sequence), repeatable; default: derived from the calibration sentences' token "
                "lengths.",
            ),
            click.option(
                "--profile-max-batch",
                type=int,
                default=default_of(ProfileDerivation, "max_batch"),
                show_default=True,
                help="Largest batch of derived TensorRT profiles.",
            ),
            click.option(
                "--builder-optimization-level",
                type=int_range(BUILDER_OPTIMIZATION_LEVELS),
                default=default_of(TensorRTOptions, "builder_optimization_level"),
                show_default=True,
                help="TensorRT builder optimization level.",
            ),
            click.option(
                "--timing-cache",
                type=click.Path(path_type=Path),
                default=None,
                help="TensorRT timing cache file (default: OUT/engines/timing-cache/...).",
            ),
            click.option(
                "--hardware-compatibility",
                type=click.Choice(HARDWARE_COMPATIBILITY),
                default=default_of(TensorRTOptions, "hardware_compatibility"),
                show_default=True,
                help="TensorRT: build one plan for several GPU generations (slower).",
            ),
            click.option(
                "--version-compatible",
                is_flag=True,
                help="TensorRT: plan runs on later TensorRT versions (embeds host code).",
            ),
            click.option(
                "--workspace-mib",
                type=int,
                default=default_of(TensorRTOptions, "workspace_mib"),
                help="TensorRT workspace cap (MiB).",
            ),
        ]

    def parse(self, values: Values, *args: Any, **kwargs: Any) -> TensorRTOptions:
        options = TensorRTOptions(
            profiles=tuple(Profile.parse(p) for p in values["profiles"]),
            builder_optimization_level=values["builder_optimization_level"],
            workspace_mib=values["workspace_mib"],
            timing_cache=str(values["timing_cache"] or ""),
            hardware_compatibility=values["hardware_compatibility"],
            version_compatible=values["version_compatible"],
        )
        options.validate()
        return options

    def parse_derivation(self, values: Values) -> ProfileDerivation:
        return ProfileDerivation(max_batch=values["profile_max_batch"])


class TorchFlags(BackendFlags):
    """The torch engine's run-time choices -> TorchEngineOptions (written into the engine file)."""

    def options(self) -> list[Decorator]:
        return [
            click.option(
                "--torch-attention",
                type=click.Choice(ATTENTION_CHOICES),
                default=default_of(TorchEngineOptions, "attention"),
                show_default=True,
                help="torch engine attention: triton (rows of up to 128 tokens in this "
                "project's Triton kernel on a GPU, longer ones in PyTorch's "
                "scaled_dot_product_attention) or sdpa (every batch in "
                "scaled_dot_product_attention on padded rows). sdpa names the engine "
                "(...-sdpa).",
            ),
            click.option(
                "--torch-cuda-graphs/--no-torch-cuda-graphs",
                default=default_of(TorchEngineOptions, "cuda_graphs"),
                show_default=True,
                help="torch engine on a GPU: small batches replay CUDA graphs (they need "
                "--torch-attention triton). Off names the engine (...-nographs).",
            ),
        ]

    def parse(self, values: Values, *args: Any, **kwargs: Any) -> TorchEngineOptions:
        return TorchEngineOptions(
            attention=values["torch_attention"], cuda_graphs=values["torch_cuda_graphs"]
        )

    def check_run(self, values: Values, specs: Sequence[BuildSpec]) -> None:
        """A torch flag changed from its default where the run builds no torch engine is a
        mistake: say so rather than build without it."""
        if self.parse(values) == TorchEngineOptions() or any(s.backend == "torch" for s in specs):
            return
        raise InputError(
            "--torch-attention / --torch-cuda-graphs: this run builds no torch engine; add "
            "--target torch, or leave them out"
        )


TENSORRT_FLAGS = TensorRTFlags()
# Every backend's flags, by its registered name (engines/backend.py get_backend).
BACKEND_FLAGS: dict[str, BackendFlags] = {
    "onnxruntime": OnnxRuntimeFlags(),
    "tensorrt": TENSORRT_FLAGS,
    "torch": TorchFlags(),
}
