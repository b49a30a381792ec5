"""simplify: onnxsim with its numerical check, keeping dynamic axes and ORT's fusion patterns."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from bert_compiler.core import progress
from bert_compiler.core.artifacts import StageRecord
from bert_compiler.core.errors import InputError
from bert_compiler.core.onnx_io import (
    load_onnx,
    onnx_input,
    op_counts,
    sample_token_feeds,
    save_onnx,
)
from bert_compiler.core.stage import StageResult, run_stage

log = logging.getLogger("bert_compile")

MODEL_FILE = "model.onnx"
# onnxsim's MatMul+Add -> Gemm passes wrap every projection in Reshape/Gemm/Reshape, which hides the
# MatMul+Add pattern ORT's Attention, BiasGelu and EmbedLayerNorm fusions match on (measured: 0
# Attention fusions with them, one per layer without).
SKIPPED_OPTIMIZERS = ("fuse_matmul_add_bias_into_gemm", "fuse_matmul_add_bias_into_gemm_batched")


@dataclass(frozen=True)
class SimplifySpec:
    """Settings of the simplify stage.

    Attributes:
        check_runs: how many times onnxsim compares the simplified graph with the original.
        check_batch: batch size of onnxsim's check inputs.
        check_sequence: sequence length of onnxsim's check inputs.
    """

    check_runs: int = 3
    check_batch: int = 2
    check_sequence: int = 16


DYNAMIC_AXES = ("batch", "sequence")


def _dynamic_dims(model) -> dict[str, list[str | None]]:
    """Per graph input/output, which positions carry the dynamic batch/sequence axes."""
    return {
        value.name: [
            d.dim_param if d.dim_param in DYNAMIC_AXES else None
            for d in value.type.tensor_type.shape.dim
        ]
        for value in list(model.graph.input) + list(model.graph.output)
    }


def simplify(
    *, source: Path, out_dir: Path, spec: SimplifySpec = SimplifySpec(), force: bool = False
) -> StageResult:
    """Simplify ``source`` into ``out_dir/model.onnx`` with onnxsim, checked numerically.

    Guarantees: same inputs and outputs with the same dynamic axes; onnxsim's check passed.

    Raises:
        InputError: the graph is unreadable, onnxsim's check fails or dynamic axes were lost.
    """
    source = Path(source)
    record = StageRecord(
        stage="simplify",
        inputs={"onnx": onnx_input(source)},
        spec={**asdict(spec), "skipped_optimizers": list(SKIPPED_OPTIMIZERS)},
    )

    loaded = {}

    def prepare():
        loaded["model"] = load_onnx(source)

    def body(artifact):
        import onnxsim

        model = loaded["model"]
        before_dims = _dynamic_dims(model)
        before = op_counts(model)
        feeds = sample_token_feeds(model, batch=spec.check_batch, sequence=spec.check_sequence)
        try:
            with progress.captured("simplify"):  # onnxsim prints its checks to stdout
                simplified, ok = onnxsim.simplify(
                    model,
                    check_n=spec.check_runs,
                    skipped_optimizers=list(SKIPPED_OPTIMIZERS),
                    input_data=feeds,
                    certify=False,
                )
        except (RuntimeError, ValueError) as err:
            raise InputError(f"{source}: onnxsim failed ({err})") from err
        if not ok:
            raise InputError(
                f"{source}: onnxsim's check found the simplified graph differs from the original"
            )
        if _dynamic_dims(simplified) != before_dims:
            raise InputError(
                f"{source}: simplification lost the dynamic batch/sequence axes "
                f"{before_dims} -> {_dynamic_dims(simplified)}"
            )
        save_onnx(simplified, artifact.path / MODEL_FILE)
        after = op_counts(simplified)
        log.info("[simplify] %d -> %d nodes", sum(before.values()), sum(after.values()))
        return [MODEL_FILE], {
            "nodes_before": sum(before.values()),
            "nodes_after": sum(after.values()),
            "op_counts": after,
        }

    return run_stage(record, Path(out_dir), body, force=force, prepare=prepare)
