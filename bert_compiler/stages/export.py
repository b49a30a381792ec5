"""export: Hugging Face model folder -> ONNX with dynamic batch and sequence axes.

The exporter is TorchScript-based with eager attention on purpose: measured with torch 2.13 and
transformers 5.23, the torch.export (dynamo) graph and the SDPA attention form both leave ORT's
transformers optimizer with zero Attention fusions, while this form fuses every layer. The fuse
stage checks the counts, so a regression here cannot pass silently.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from bert_compiler.core.artifacts import StageRecord, atomic_path
from bert_compiler.core.errors import InputError
from bert_compiler.core.onnx_io import load_onnx, op_counts
from bert_compiler.core.stage import StageResult, run_stage
from bert_compiler.models.loading import (
    ModelInfo,
    build_wrapper,
    load_tokenizer,
    load_torch_model,
    output_name,
)

log = logging.getLogger("bert_compile")

MODEL_FILE = "model.onnx"
# Two real sentences of different lengths: the traced graph then contains the padding-mask path.
_TRACE_TEXT = ["A man is playing a guitar.", "Two dogs run across a wide green field together."]


@dataclass(frozen=True)
class ExportSpec:
    """Settings of the export stage.

    Attributes:
        opset: ONNX opset for the exported graph.
        pooling_in_graph: for sentence-embedding models, put pooling and L2 normalisation in the
            graph so the engine outputs ``sentence_embedding``; otherwise it outputs
            ``last_hidden_state`` and pooling happens on the host.
    """

    opset: int = 17
    pooling_in_graph: bool = True


def export(
    *, info: ModelInfo, out_dir: Path, spec: ExportSpec = ExportSpec(), force: bool = False
) -> StageResult:
    """Export ``info``'s model to ``out_dir/model.onnx``.

    Guarantees: one graph with inputs ``info.architecture.input_names`` (int64, [batch, sequence])
    and one output (see ``output_name``), dynamic batch and sequence axes, onnx.checker clean.

    Raises:
        InputError: the weights cannot be loaded or the export fails.
    """
    record = StageRecord(
        stage="export",
        inputs={"model": info.fingerprint()},
        spec={
            **asdict(spec),
            "task": info.task,
            "pooling": info.pooling,
            "normalize": info.normalize,
        },
    )

    def body(artifact):
        import torch

        model = load_torch_model(info, attn_implementation="eager")
        tokenizer = load_tokenizer(info)
        encoded = tokenizer(_TRACE_TEXT, padding=True, return_tensors="pt")
        args = tuple(encoded[name] for name in info.architecture.input_names)
        wrapper = build_wrapper(info, model, pooling_in_graph=spec.pooling_in_graph)
        out_name = output_name(info, pooling_in_graph=spec.pooling_in_graph)
        dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in info.architecture.input_names}
        dynamic_axes[out_name] = (
            {0: "batch", 1: "sequence"} if out_name == "last_hidden_state" else {0: "batch"}
        )
        try:
            with atomic_path(artifact.path / MODEL_FILE) as staging:
                with warnings.catch_warnings(), torch.no_grad():
                    # The legacy exporter warns about its own deprecation and about tracing.
                    warnings.simplefilter("ignore")
                    torch.onnx.export(
                        wrapper,
                        args,
                        str(staging),
                        input_names=list(info.architecture.input_names),
                        output_names=[out_name],
                        dynamic_axes=dynamic_axes,
                        opset_version=spec.opset,
                        do_constant_folding=True,
                        dynamo=False,
                    )
                graph = load_onnx(staging)
        except (RuntimeError, ValueError, TypeError) as err:
            raise InputError(f"{info.path}: ONNX export failed ({err})") from err
        nodes = op_counts(graph)
        log.info("[export] %d nodes, output %s", sum(nodes.values()), out_name)
        return [MODEL_FILE], {
            "nodes": sum(nodes.values()),
            "op_counts": nodes,
            "inputs": list(info.architecture.input_names),
            "output": out_name,
            "max_length": info.max_length,
            "task": info.task,
        }

    return run_stage(record, Path(out_dir), body, force=force)
