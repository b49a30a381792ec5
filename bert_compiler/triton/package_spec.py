"""What package takes: its settings (PackageSpec, with their limits and defaults) and the verified
engines it packages (VerifiedEngine: an engine folder whose verify report passed)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bert_compiler.core.artifacts import (
    ArtifactDir,
)
from bert_compiler.core.errors import ArtifactError, InputError, ParityError
from bert_compiler.engines import torch_layout, torch_module
from bert_compiler.engines.batching import BatchingSpec
from bert_compiler.models.loading import ModelInfo, load_tokenizer
from bert_compiler.runtime import token_rows
from bert_compiler.runtime.text import (
    resolve_max_length,
)
from bert_compiler.runtime.tokenizing import ladder_from_text
from bert_compiler.stages.layout import Layout
from bert_compiler.triton import config as tc
from bert_compiler.triton.tokenizer_model import (
    TEXT_INPUT,
    TEXT_PAIR_INPUT,
)

log = logging.getLogger("bert_compile")

REPOSITORY_FOLDER = "triton"
TEXT = tc.TensorSpec(TEXT_INPUT, "TYPE_STRING", (1,))
TEXT_PAIR = tc.TensorSpec(TEXT_PAIR_INPUT, "TYPE_STRING", (1,))
TEMPLATES = {
    "tokenizer": Path(__file__).with_name("tokenizer_model.py"),
    "python-engine": Path(__file__).with_name("onnxruntime_model.py"),
    "python-text": Path(__file__).with_name("text_engine_model.py"),
    "torch-text": Path(__file__).with_name("torch_text_model.py"),
    # Copied beside the model.py files that import them (token_rows.py beside every model
    # holding tokenizer_model.py).
    "token-rows": Path(token_rows.__file__),
    "torch-module": Path(torch_module.__file__),
    "torch-layout": Path(torch_layout.__file__),
}
WARMUP_TEXT = (
    "A man is playing a large flute while a small crowd listens in the park, and two dogs run "
    "across the wide green field together before the rain begins to fall on the old town. "
)


PADDINGS = ("ladder", "request")
# How --python-cpu-engine serves text: one Python model that tokenizes and runs the engine, or
# the tokenizer model -> Python engine model ensemble (a second process, token tensors between).
PYTHON_TEXTS = ("model", "ensemble")
# What one more engine run costs the one-model text engine, in padded tokens: it cuts an execute
# call's length-sorted texts into runs where the padding a cut saves is worth more than this
# (text_engine_model.plan_runs). Chosen with --text-run-cost on the calibration sentences, MiniLM
# fp32 and INT8 on 2 cores; near what a run costs there beyond its tokens (docs/benchmarks.md,
# "Triton on CPU: one Python model for text").
TEXT_RUN_COST_TOKENS = 8
# Fitted rungs of the Triton ladder (derive_ladder adds rungs 1.5x apart above the calibration
# sentences' longest row). Fewer than the runtime's: the runtime sorts rows before padding, but
# Triton pads requests as they come, and joins (onnxruntime, tensorrt backends) or runs together
# (the Python-backend engine) only requests of one rung: more rungs pad less but split an execute
# call into more, smaller engine runs. Chosen on the calibration sentences, MiniLM on 2 CPU cores
# at concurrency 32 (scripts/triton_load.py --data; docs/benchmarks.md, "Triton on CPU:
# per-request padding vs the length ladder", which reports on STS-B dev).
TRITON_LADDER_RUNGS = 8
# Instances of each Python-backend model (the tokenizer, a Python CPU engine): each is a process
# of its own, so two run two execute calls at once, each engine instance on half the usable
# cores (onnxruntime_model.intra_op_threads). Chosen on the calibration sentences at
# concurrency 32 on a 2-core machine, MiniLM INT8 and fp32 (docs/benchmarks.md, "Triton on CPU:
# two instances of the Python-backend models").
PYTHON_INSTANCES = 2
# Instances per GPU of a GPU engine's text model (torch_text_model.py): each tokenizes the texts
# of its execute calls on one core, so one instance holds the GPU back. Chosen on the calibration
# sentences with MiniLM (docs/gpu-bench/2026-12-07-h100-serving/).
GPU_TEXT_INSTANCES = 4
# Inclusive bounds of PackageSpec's numbers (the CLI's option types are made from them).
PACKAGE_LIMITS = {
    "max_batch_size": (1, 4096),
    "max_queue_delay_us": (0, 10_000_000),
    "instances": (1, 64),
    "python_instances": (1, 64),
    "gpu_text_instances": (1, 64),
    "ladder_rungs": (1, 64),
    "text_run_cost": (0, 100_000),
}


@dataclass(frozen=True)
class PackageSpec:
    """Settings of the package stage.

    Attributes:
        engines: engine folder names under OUT/engines/MODEL to package; empty: all of them.
        max_batch_size: largest batch of ONNX Runtime models (TensorRT models take the largest
            batch every profile accepts).
        max_queue_delay_us: how long Triton's dynamic batcher waits to fill a batch.
        instances: instances of each engine model on a backend of its own (onnxruntime,
            tensorrt): per GPU (GPU models) or in all (CPU models).
        python_instances: instances of each Python-backend model (the tokenizer, Python CPU
            engines, a CPU torch engine's text model); an engine's instances share the usable
            cores.
        gpu_text_instances: instances per GPU of a GPU engine's text model.
        python_cpu_engine: also serve each CPU ONNX Runtime engine through Triton's Python
            backend, for Triton builds without the onnxruntime backend.
        python_gpu_engine: also serve each ONNX Runtime CUDA engine as a Python-backend text
            model on GPU instances (``<engine>-python-text``), for Triton builds without the
            onnxruntime backend (nvidia-pytriton's); engines built with CUDA graphs or ORT's
            TensorRT provider are left out, with a warning.
        python_text: how those engines take text: ``model``, one Python model
            (``<engine>-python-text``) that tokenizes every text of an execute call and runs
            the engine on them; ``ensemble``, the tokenizer model -> a Python engine model
            (``<engine>-python``, token tensors in) in an ensemble of that name.
        text_run_cost: the one-model text engine's cost of one more engine run, in padded
            tokens (0: a run per distinct length; large: one run per execute call).
        warmup: run real-token warmup requests when Triton loads an engine model.
        padding: how the tokenizer model pads a request: ``ladder``, to the shortest rung of
            ``length_ladder`` that holds its longest text (requests of one rung batch together
            in Triton); ``request``, to its own longest text (requests batch only when their
            longest texts have the same length: the behaviour before ladders).
        ladder_rungs: how many rungs of the ladder are fitted to the calibration sentences.
        length_ladder: the rungs, ascending, the top one at the maximum length; filled by
            ``package`` from the bundled calibration sentences (engines/batching.py's
            least-padding ladder with ``ladder_rungs`` fitted rungs), never from evaluation
            text.
    """

    engines: tuple[str, ...] = ()
    max_batch_size: int = 64
    max_queue_delay_us: int = 0
    instances: int = 1
    python_instances: int = PYTHON_INSTANCES
    gpu_text_instances: int = GPU_TEXT_INSTANCES
    python_cpu_engine: bool = False
    python_gpu_engine: bool = False
    python_text: str = "model"
    text_run_cost: int = TEXT_RUN_COST_TOKENS
    warmup: bool = True
    padding: str = "ladder"
    ladder_rungs: int = TRITON_LADDER_RUNGS
    length_ladder: tuple[int, ...] = ()

    def validate(self) -> None:
        for name, (low, high) in PACKAGE_LIMITS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                flag = "--" + name.replace("_", "-")
                raise InputError(f"{flag} {value}: expected {low} to {high}")
        if self.padding not in PADDINGS:
            raise InputError(
                f"--tokenizer-padding {self.padding!r}: expected one of {', '.join(PADDINGS)}"
            )
        if self.python_text not in PYTHON_TEXTS:
            raise InputError(
                f"--python-text {self.python_text!r}: expected one of {', '.join(PYTHON_TEXTS)}"
            )
        if self.padding == "request" and self.length_ladder:
            raise InputError("a length ladder needs --tokenizer-padding ladder")
        BatchingSpec(ladder=self.length_ladder).validate()

    def with_ladder(self, info: ModelInfo, max_length: int) -> PackageSpec:
        """This spec with its length ladder filled in (fitted to the bundled calibration
        sentences) where padding is ``ladder`` and none is set.

        Raises:
            InputError: a set ladder whose top rung is below ``max_length``.
        """
        if self.padding != "ladder":
            return self
        if not self.length_ladder:
            ladder = ladder_from_text(load_tokenizer(info), info, max_length, self.ladder_rungs)
            return replace(self, length_ladder=tuple(int(length) for length in ladder))
        if self.length_ladder[-1] < max_length:
            raise InputError(
                f"length ladder {list(self.length_ladder)}: its top rung must reach the maximum "
                f"length {max_length} the engines were verified at"
            )
        return self


@dataclass(frozen=True)
class VerifiedEngine:
    """An engine folder whose verify report passed for this engine file and this model."""

    name: str
    folder: Path
    spec: Mapping[str, Any]
    results: Mapping[str, Any]
    engine_file: Path
    engine_sha256: str
    report: Mapping[str, Any]
    max_length: int
    # The tensors Triton sees, where they are known already (the gate re-deriving a repository
    # reads them from its copy); None: read from the engine folder.
    io: tuple[list[tc.TensorSpec], list[tc.TensorSpec]] | None = None


def verified_engines(
    *, info: ModelInfo, out: Path, names: Sequence[str] = ()
) -> list[VerifiedEngine]:
    """The engines under OUT/engines/MODEL (or those named) with a passing verify report.

    Raises:
        InputError: no engines, a named one missing, or an engine never verified (or verified
            as another file or against another model).
        ParityError: an engine failed verification.
        ArtifactError: an engine or report does not match its manifest.
    """
    layout = Layout(Path(out))
    root = layout.engines(info.name)
    folders = sorted(f for f in root.glob("*") if f.is_dir() and not f.name.startswith("."))
    if names:
        missing = sorted(set(names) - {f.name for f in folders})
        if missing:
            raise InputError(f"{root}: no engine folder {', '.join(missing)}")
        folders = [f for f in folders if f.name in names]
    if not folders:
        raise InputError(f"{root}: no engines to package; run `bert-compile run` or build first")
    fingerprint = info.fingerprint()["sha256"]
    engines = []
    for folder in folders:
        manifest = ArtifactDir(folder).require_complete()
        if manifest.get("stage") != "build":
            raise ArtifactError(f"{folder}: not an engine folder this tool built")
        results = manifest["results"]
        engine_sha = manifest["outputs"][results["engine_file"]]["sha256"]
        verify_dir = layout.verify(info.name, folder.name)
        hint = f"run `bert-compile verify --engine {folder}` first"
        report = ArtifactDir(verify_dir).read_manifest()
        if report is None or not report.get("complete"):
            raise InputError(f"{folder}: never verified (no report in {verify_dir}); {hint}")
        ArtifactDir(verify_dir).require_complete()
        if report["inputs"]["engine"]["sha256"] != engine_sha:
            raise InputError(f"{folder}: the report in {verify_dir} is for another build; {hint}")
        if report["inputs"]["model"]["sha256"] != fingerprint:
            raise InputError(f"{folder}: verified against another model than {info.path}; {hint}")
        checked, built = report["spec"].get("precision"), manifest["spec"].get("precision")
        if checked != built:
            # verify --precision int8 on an fp32 engine passes it at int8's looser tolerances.
            raise InputError(
                f"{folder}: verified with {checked} tolerances, not its own {built} ones; run "
                f"`bert-compile verify --engine {folder}` without --precision first"
            )
        if not report["results"].get("passed"):
            reasons = "; ".join(report["results"].get("failures", [])) or "unknown"
            raise ParityError(
                f"{folder}: failed verification ({reasons}); only engines that pass are "
                "packaged (name the others with --engine)"
            )
        engines.append(
            VerifiedEngine(
                name=folder.name,
                folder=folder,
                spec=manifest["spec"],
                results=results,
                engine_file=ArtifactDir(folder).output_path(results["engine_file"]),
                engine_sha256=engine_sha,
                report=report["results"],
                max_length=resolve_max_length(info, report["spec"].get("max_length")),
            )
        )
    lengths = {e.max_length for e in engines}
    if len(lengths) != 1:
        raise InputError(
            f"{root}: engines were verified at different --max-length values {sorted(lengths)}; "
            "one tokenizer serves them all: verify them at one length"
        )
    return engines
