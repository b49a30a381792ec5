"""fuse: ORT's transformers optimizer for ONNX Runtime targets, with its fusion counts checked.

ORT's optimizer reports what it fused and carries on when a pattern does not match; a graph that
should have fused and did not still runs, only slower. This stage compares the counts with what the
architecture's spec expects and fails loudly, then checks the fused graph computes the same outputs.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bert_compiler.core import progress
from bert_compiler.core.artifacts import StageRecord, atomic_path
from bert_compiler.core.errors import FusionError
from bert_compiler.core.onnx_io import load_onnx, onnx_input, op_counts, sample_token_feeds
from bert_compiler.core.stage import StageResult, run_stage
from bert_compiler.models.loading import ModelInfo

log = logging.getLogger("bert_compile")

MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class FuseSpec:
    """Settings of the fuse stage.

    Attributes:
        require_fusions: fail when fused-operator counts differ from the architecture's expectation.
        check_atol: largest absolute difference allowed between unfused and fused outputs on the
            stage's own check inputs (float32).
    """

    require_fusions: bool = True
    check_atol: float = 1e-4


def compare_fusions(actual: dict[str, int], expected: dict[str, int]) -> list[str]:
    """List the mismatches between fused-operator counts and expectations (empty when all match).

    A key starting with ``*`` in ``expected`` sums every operator in ``actual`` that ends with the
    rest of it (``*Gelu``: Gelu, BiasGelu and FastGelu).
    """
    problems = []
    for key, want in expected.items():
        if key.startswith("*"):
            got = sum(v for op, v in actual.items() if op.endswith(key[1:]))
        else:
            got = actual.get(key, 0)
        if got != want:
            problems.append(f"{key}: expected {want}, got {got}")
    return problems


def _check_same_outputs(before: Path, after: Path, atol: float) -> float:
    """Run both graphs with ORT on CPU on a small padded batch; return the max abs difference."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sessions = [
        ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
        for p in (before, after)
    ]
    feeds = sample_token_feeds(load_onnx(before), batch=3, sequence=11)
    mask = feeds.get("attention_mask")
    outs = [s.run(None, feeds)[0] for s in sessions]
    if outs[0].shape != outs[1].shape:
        raise FusionError(f"{after}: fused output shape {outs[1].shape} != {outs[0].shape}")
    diff = np.abs(outs[0] - outs[1])
    if diff.ndim == 3 and mask is not None:
        diff = diff[mask.astype(bool)]  # padded positions carry no meaning in either graph
    worst = float(diff.max())
    if not np.isfinite(worst) or worst > atol:
        raise FusionError(
            f"{after}: fused graph differs from its input by {worst:.3g} (> {atol:g}); "
            "ORT's optimizer changed the numbers"
        )
    return worst


def fuse(
    *,
    info: ModelInfo,
    source: Path,
    out_dir: Path,
    spec: FuseSpec = FuseSpec(),
    force: bool = False,
) -> StageResult:
    """Apply ORT's transformers fusions to ``source`` into ``out_dir/model.onnx``.

    Guarantees: fused-operator counts equal the architecture's expectation (unless
    ``require_fusions`` is off) and outputs match the unfused graph within ``check_atol``. Where
    ORT covers the architecture only partly (its spec's ``fusion_note``), the expectation is the
    partial counts measured for it, and the stage says so in a warning line and its results.

    Raises:
        FusionError: counts differ from expectations, or the fused graph computes different numbers.
    """
    source = Path(source)
    expected = info.architecture.fusions_for(info.config, info.task)
    record = StageRecord(
        stage="fuse",
        inputs={"onnx": onnx_input(source)},
        spec={
            **asdict(spec),
            "optimizer_model_type": info.architecture.ort_optimizer_type,
            "num_heads": info.num_heads,
            "hidden_size": info.hidden_size,
        },
    )

    loaded = {}

    def prepare():
        loaded["model"] = load_onnx(source)

    def body(artifact):
        optimized = _optimize(loaded["model"], info, source)
        fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        problems = _fusion_problems(fused, expected, info, source, spec)
        with atomic_path(artifact.path / MODEL_FILE) as staging:
            optimized.save_model_to_file(str(staging))
            fused_graph = load_onnx(staging)
        max_diff = _check_same_outputs(source, artifact.path / MODEL_FILE, spec.check_atol)
        log.info("[fuse] fused %s (check max abs diff %.2g)", fused, max_diff)
        note = info.architecture.fusion_note
        if note:
            log.warning(
                "[fuse] partial fusion for %s, reached %s: %s",
                info.architecture.model_type,
                fused,
                note,
            )
        return [MODEL_FILE], {
            "fused_operators": fused,
            "expected_fusions": expected,
            "fusions_complete": not problems,
            "fusion_note": info.architecture.fusion_note,
            "nodes": len(fused_graph.graph.node),
            "op_counts": op_counts(fused_graph),
            "check_max_abs_diff": max_diff,
        }

    return run_stage(record, Path(out_dir), body, force=force, prepare=prepare)


def _optimize(model: Any, info: ModelInfo, source: Path) -> Any:
    """``model`` after ORT's transformers optimizer's pattern fusions (ORT's OnnxModel).

    Raises:
        FusionError: the optimizer failed.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(info.architecture.ort_optimizer_type)
    try:
        with progress.captured("fuse"):  # the optimizer's own log and print lines
            return optimize_model(
                model,
                model_type=info.architecture.ort_optimizer_type,
                num_heads=info.num_heads,
                hidden_size=info.hidden_size,
                optimization_options=options,
                opt_level=0,  # pattern fusions only; ORT's own graph passes run in build
            )
    except (RuntimeError, ValueError, KeyError, AssertionError) as err:
        raise FusionError(f"{source}: ORT's transformers optimizer failed ({err})") from err


def _fusion_problems(
    fused: dict[str, int], expected: dict[str, int], info: ModelInfo, source: Path, spec: FuseSpec
) -> list[str]:
    """How the fused counts differ from the architecture's expectation, logged as a warning
    where ``spec.require_fusions`` is off.

    Raises:
        FusionError: they differ and ``spec.require_fusions`` is on.
    """
    problems = compare_fusions(fused, expected)
    if problems:
        message = (
            f"{source}: fusion incomplete for {info.architecture.model_type} "
            f"({'; '.join(problems)}); the engine would run unfused attention"
        )
        if spec.require_fusions:
            raise FusionError(message + " (pass --allow-unfused to build it anyway)")
        log.warning("[fuse] %s", message)
    return problems
