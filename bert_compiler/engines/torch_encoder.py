"""The torch backend: the fused graph's encoder run by PyTorch on packed rows.

Real sentences are short (STS-B: median 14 tokens). ONNX Runtime's and PyTorch's attention
kernels work in 64-128-row tiles, mostly empty for such rows, and a padded batch spends every
GEMM on its padding as well: that is where most of the GPU time of short text goes (the probe:
docs/benchmarks.md, "GPU fourth pass"; scripts/probe_gpu_encoder.py). This engine runs each batch
packed (the rows' real tokens back to back, no padding anywhere) and attention by a small Triton
kernel that holds one row and head in registers (``short_attention_kernel``); rows longer than
SHORT_ATTENTION_MAX, and machines without Triton, take PyTorch's scaled_dot_product_attention on
the padded rows instead. Small batches on a GPU (one sentence per call) would spend their time
launching kernels, so they replay CUDA graphs captured per bucket of tokens and rows
(``run_packed``).

Build: the fused fp32 graph (OUT/fuse) is read, not re-exported (engines/torch_reader.py says
which layouts and heads it reads; anything else is refused in one line). The engine file is
those weights as safetensors (fp16 for a GPU fp16 engine); before the build calls it complete,
the weights as read are run against ONNX Runtime on the same graph, so a graph read wrongly never
becomes an engine. verify then checks the engine against PyTorch like every other engine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from bert_compiler.core.artifacts import atomic_path
from bert_compiler.core.errors import ArtifactError, EnvironmentProblem, InputError
from bert_compiler.core.onnx_io import load_onnx
from bert_compiler.core.targets import Environment, parse_capability
from bert_compiler.engines.backend import (
    Backend,
    BuildJob,
    BuildSpec,
    TargetPlan,
    check_float_source,
    register,
)
from bert_compiler.engines.torch_layout import (
    ENGINE_FILE,
    OPTIONS_METADATA,
    EncoderLayout,
    LayoutError,
    TorchEngineOptions,
)
from bert_compiler.engines.torch_module import (
    PRECISIONS,
    TorchEncoder,
    compute_dtype,
    open_engine,
    quantize_weight,
    quantized_linear,
)
from bert_compiler.engines.torch_reader import read_encoder, unsupported

log = logging.getLogger("bert_compile")

# The build compares the engine with ONNX Runtime on this many random rows of varied lengths.
CHECK_ROWS = 6
CHECK_LONGEST = 160
# The engine as built on its GPU (fp16 weights and math) against the same rows: a loose bound
# that only broken kernels exceed (verify then judges the engine at its real tolerances).
DEVICE_TOLERANCE = 5e-2
# Of the largest output magnitude, fp32 against fp32: a loose bound that a correct reading stays
# far below and a wrong one exceeds, even one as small as a LayerNorm epsilon read as 1e-5
# instead of 1e-12 (figures: docs/benchmarks.md, "GPU fifth pass").
CHECK_TOLERANCE = 1e-4


def _check_against_onnxruntime(
    source: Path,
    engine: TorchEncoder,
    where: str,
    built: TorchEncoder | None = None,
    built_reference: TorchEncoder | None = None,
) -> dict[str, float]:
    """The largest differences, relative to the largest output, between ONNX Runtime on the
    source graph and ``engine`` (the weights as read, padded and packed: ``onnxruntime``), and
    ``built`` (the engine as built, on its GPU: ``device``), on the same rows. The GPU engine
    is held to ONNX Runtime's outputs, or to ``built_reference``'s where given (an INT8 engine:
    the same file on the CPU, the same integer arithmetic).

    Raises:
        UnsupportedModelError: the weights as read differ by more than CHECK_TOLERANCE.
        EnvironmentProblem: the built engine fails to run on its GPU, or differs by more than
            DEVICE_TOLERANCE (its kernels, not the reading, are wrong there).
    """
    import onnxruntime as ort
    import torch

    generator = np.random.default_rng(0)
    vocab = engine.weights["embeddings.word"].shape[0]
    offset = engine.layout.position_offset
    # Rows from 2 tokens to CHECK_LONGEST (or the position table's end): every position row a
    # real sentence reads, and rows past SHORT_ATTENTION_MAX.
    longest = min(CHECK_LONGEST, engine.weights["embeddings.position"].shape[0] - offset)
    lengths = np.linspace(2, longest, CHECK_ROWS).astype(np.int64)
    valid = np.arange(longest)[None, :] < lengths[:, None]
    # Token ids past the special ones (RoBERTa numbers positions around its padding id, 1).
    ids = np.where(valid, generator.integers(max(3, offset + 1), vocab, (CHECK_ROWS, longest)), 0)
    type_rows = engine.weights["embeddings.token_type"].shape[0] if engine.layout.token_types else 1
    types = np.where(valid, generator.integers(0, type_rows, ids.shape), 0)
    feeds = {
        "input_ids": ids,
        "attention_mask": valid.astype(np.int64),
        "token_type_ids": types,
    }
    feeds = {name: feeds[name] for name in engine.input_names}
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    (expected,) = session.run([engine.layout.output], feeds)
    padded = engine.run(feeds)[engine.layout.output]
    packed_rows = (
        torch.from_numpy(ids[valid]),
        torch.from_numpy(feeds.get("token_type_ids", types)[valid]),
        torch.from_numpy(lengths),
    )
    packed = engine.run_packed(*packed_rows, longest)[engine.layout.output].numpy()
    if expected.ndim == 3:  # token outputs: padded positions are not compared
        expected, padded, packed = expected[valid], padded[valid], packed[valid]
    scale = max(float(np.abs(expected).max()), 1e-6)
    worst = max(float(np.abs(got - expected).max()) for got in (padded, packed)) / scale
    if not worst <= CHECK_TOLERANCE:
        raise unsupported(
            where, f"the encoder read from it differs from ONNX Runtime by {worst:.2e}"
        )
    differences = {"onnxruntime": worst}
    if built is None or built.device == "cpu":
        return differences
    if built_reference is None:
        reference, against = expected, "fp32 on the CPU agrees with ONNX Runtime"
    else:
        reference = built_reference.run_packed(*packed_rows, longest)[engine.layout.output]
        reference = reference.numpy()[valid] if reference.ndim == 3 else reference.numpy()
        against = f"against the {built.precision} engine on the CPU"
    got = _run_on_device(built, packed_rows, longest, where)
    got = got[valid] if got.ndim == 3 else got
    differences["device"] = float(np.abs(got - reference).max()) / scale
    if not differences["device"] <= DEVICE_TOLERANCE:
        raise EnvironmentProblem(
            f"{where}: the torch engine differs on this GPU by {differences['device']:.2e} of "
            f"the output ({against}); build it with --target cuda (ONNX Runtime)"
        )
    return differences


def _run_on_device(built: TorchEncoder, packed_rows: tuple, longest: int, where: str):
    """The engine as built, on its GPU (the Triton kernel compiles here): a GPU or Triton that
    cannot run it fails at build, in one line, rather than in the middle of a verify.

    Raises:
        EnvironmentProblem: it fails to run there.
    """
    try:
        ids_on, types_on, lengths_on = (t.to(built.device) for t in packed_rows)
        on_device = built.run_packed(ids_on, types_on, lengths_on, longest)
        return on_device[built.layout.output].cpu().numpy()
    except Exception as err:  # noqa: BLE001 - Triton's compiler raises many kinds of error
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EnvironmentProblem(
            f"{where}: the torch engine failed to run on this GPU ({first[:200]}); build it "
            "with --target cuda (ONNX Runtime) instead"
        ) from err


# torch._int_mm's integer GEMMs on a GPU: Ampere (8.0) and later, and the two sizes of every
# weight multiples of 8.
INT8_CAPABILITY = (8, 0)
INT_MM_MULTIPLE = 8


def _check_int_mm_sizes(tensors: Mapping[str, np.ndarray], where: str) -> None:
    """torch._int_mm on a GPU multiplies only sizes that are multiples of 8: the hidden and
    feed-forward sizes of every integer GEMM.

    Raises:
        UnsupportedModelError: a size that is not.
    """
    for name, weight in tensors.items():
        odd = [n for n in weight.shape if n % INT_MM_MULTIPLE] if quantized_linear(name) else []
        if odd:
            raise unsupported(
                where,
                f"{name} is {list(weight.shape)}: the int8 engine's integer GEMMs on a GPU "
                f"(torch._int_mm) need sizes that are multiples of {INT_MM_MULTIPLE}; build "
                "it in fp16, or int8 on the CPU",
            )


def _engine_tensors(read: Mapping[str, np.ndarray], spec: BuildSpec) -> dict[str, Any]:
    """The engine file's tensors from the fp32 weights as read: fp16 for a GPU fp16 engine; for
    an int8 engine, the projections' and feed-forward's weights as int8 with their per-channel
    scales (torch_module.quantize_weight), the rest fp16 on a GPU and fp32 on a CPU."""
    import torch

    dtype = compute_dtype(spec.precision, spec.device)
    tensors: dict[str, Any] = {}
    for name, array in read.items():
        weight = torch.from_numpy(array)
        if spec.precision == "int8" and quantized_linear(name):
            quantized, scale = quantize_weight(weight)
            tensors[name], tensors[name.removesuffix("weight") + "scale"] = quantized, scale
        else:
            tensors[name] = weight.to(dtype).contiguous()
    return tensors


class TorchBackend(Backend):
    """PyTorch on packed rows (engines/torch_encoder.py): fp32 on the CPU or a GPU, fp16 on a
    GPU, from the fused fp32 graph."""

    name = "torch"
    tag = "pt"
    file_suffix = ".safetensors"
    triton_platform = ""  # no Triton backend runs it: a Python-backend text model does
    version_key = "torch"
    serves_as_python_text = True
    label = "torch"
    targets = ("torch",)
    options_type = TorchEngineOptions
    quantizes_from_qdq = False

    def version(self) -> str:
        import torch

        return torch.__version__.split("+")[0]

    def plan(self, target: str, precisions: tuple[str, ...], env: Environment) -> TargetPlan:
        """One engine for every GPU here (its file is the weights: it runs on any GPU), fp16 by
        default; the CPU engine, fp32 by default, where torch sees no GPU."""
        refused = sorted(set(precisions) - set(PRECISIONS))
        if refused:
            raise InputError(
                f"--target {target} --precision {','.join(refused)}: the torch backend builds "
                f"{', '.join(PRECISIONS)} engines; fp8 is TensorRT's"
            )
        notes: tuple[str, ...]
        if env.gpus and env.torch_cuda:
            device, chosen, notes = "cuda", precisions or ("fp16",), ()
            older = [
                g for g in env.gpus if parse_capability(g.compute_capability) < INT8_CAPABILITY
            ]
            if "int8" in chosen and older:
                raise EnvironmentProblem(
                    f"--target {target} --precision int8: {older[0].name} has compute "
                    f"capability {older[0].compute_capability}; the torch engine's integer GEMMs "
                    "(torch._int_mm) need 8.0 or later"
                )
        else:
            why = "no NVIDIA GPU found" if not env.gpus else "torch here is a CPU build"
            if "fp16" in precisions:
                raise EnvironmentProblem(
                    f"--target {target} --precision fp16: {why}; fp16 needs a GPU"
                )
            device, chosen = "cpu", precisions or ("fp32",)
            notes = (f"{why}: building the torch CPU engine",)
        engines = tuple(
            {"backend": self.name, "device": device, "precision": p, "compute_capability": ""}
            for p in chosen
        )
        return TargetPlan(engines, notes)

    def check(self, spec: BuildSpec) -> None:
        if spec.precision not in PRECISIONS:
            raise InputError(
                f"--precision {spec.precision}: the torch backend builds "
                f"{', '.join(PRECISIONS)} engines; fp8 is TensorRT's"
            )

    def applicable(self, spec: BuildSpec) -> BuildSpec:
        # CUDA graphs exist only on a GPU.
        if spec.device != "cuda":
            return replace(spec, options=replace(spec.options, cuda_graphs=True))
        return spec

    def variants(self, spec: BuildSpec) -> list[str]:
        options: TorchEngineOptions = spec.options
        return [
            name
            for name, on in (
                ("sdpa", options.attention == "sdpa"),
                ("nographs", not options.cuda_graphs),
            )
            if on
        ]

    def source_stage(self, spec: BuildSpec) -> str:
        return "fuse"

    def folder_parts(self, spec: BuildSpec) -> list[str]:
        return [spec.device]

    def kind_parts(self, spec: BuildSpec) -> list[str]:
        return [spec.device]

    def portable(self, spec: Mapping[str, Any]) -> bool:
        return True

    def from_record(self, spec: Mapping[str, Any]) -> BuildSpec:
        defaults = TorchEngineOptions()
        options = TorchEngineOptions(
            attention=spec.get("attention", defaults.attention),
            cuda_graphs=spec.get("cuda_graphs", defaults.cuda_graphs),
        )
        return BuildSpec(
            backend=self.name, device=spec["device"], precision=spec["precision"], options=options
        )

    def build_job(self, source: Path, spec: BuildSpec, *, input_names: tuple[str, ...]) -> BuildJob:
        read: dict[str, Any] = {}

        def prepare() -> None:
            graph = load_onnx(source)
            check_float_source(graph, precision=spec.precision, where=str(source))
            read["layout"], read["tensors"] = read_encoder(graph, str(source))
            if spec.precision == "int8" and spec.device == "cuda":
                _check_int_mm_sizes(read["tensors"], str(source))

        def body(folder: Path) -> tuple[list[str], dict[str, Any]]:
            import torch
            from safetensors.torch import save_file

            if spec.device == "cuda" and not torch.cuda.is_available():
                raise EnvironmentProblem(
                    f"torch {torch.__version__} sees no CUDA GPU; a cuda torch engine is built "
                    "where torch's CUDA build runs"
                )
            layout: EncoderLayout = read["layout"]
            tensors = _engine_tensors(read["tensors"], spec)
            options: TorchEngineOptions = spec.options
            metadata = {
                "layout": json.dumps(layout.to_dict(), sort_keys=True),
                OPTIONS_METADATA: options.to_metadata(),
            }
            with atomic_path(folder / ENGINE_FILE) as staging:
                save_file(tensors, str(staging), metadata=metadata)
            # The weights as read (fp32, before an fp16 engine rounds them), on the CPU, against
            # ONNX Runtime on the same graph: the reader is checked, verify judges the rounding.
            read_weights = {n: torch.from_numpy(a) for n, a in read["tensors"].items()}
            check = TorchEncoder(source, layout, "cpu", "fp32", tensors=read_weights)
            engine = TorchEncoder(
                folder / ENGINE_FILE, layout, spec.device, spec.precision, options=options
            )
            on_cpu = None
            if spec.precision == "int8" and spec.device == "cuda":
                on_cpu = TorchEncoder(folder / ENGINE_FILE, layout, "cpu", "int8")
            differences = _check_against_onnxruntime(
                source, check, str(source), built=engine, built_reference=on_cpu
            )
            return [ENGINE_FILE], {
                "engine_file": ENGINE_FILE,
                "torch": self.version(),
                "layout": layout.to_dict(),
                "inputs": engine.input_names,
                "outputs": engine.output_names,
                "onnxruntime_check": float(f"{differences['onnxruntime']:.3g}"),
                **(
                    {"device_check": float(f"{differences['device']:.3g}")}
                    if "device" in differences
                    else {}
                ),
                "short_attention": engine.short_attention,
                "cuda_graphs": engine.graphs,
            }

        settings = {"engine": "packed rows", **asdict(spec.options)}
        return BuildJob(settings=settings, prepare=prepare, body=body)

    def load(self, engine_path: Path, spec: Mapping[str, Any], results: Mapping[str, Any]):
        import torch

        if spec["device"] == "cuda" and not torch.cuda.is_available():
            raise EnvironmentProblem(
                f"{engine_path}: a cuda engine, and torch {torch.__version__} sees no CUDA GPU"
            )
        if spec["device"] == "cuda" and spec["precision"] == "int8":
            capability = torch.cuda.get_device_capability()
            if capability < INT8_CAPABILITY:
                raise EnvironmentProblem(
                    f"{engine_path}: an int8 engine, and this GPU's compute capability is "
                    f"{capability[0]}.{capability[1]}; its integer GEMMs (torch._int_mm) need "
                    "8.0 or later"
                )
        # The layout and options inside the engine file, whose sha256 the caller checked (the
        # manifest's results are a copy for readers).
        try:
            return open_engine(engine_path, spec["device"], spec["precision"])
        except LayoutError as err:
            raise ArtifactError(str(err)) from None


BACKEND = register(TorchBackend())
