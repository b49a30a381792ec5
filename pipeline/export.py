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
from bert_compiler.pipeline.models import ModelInfo, load_tokenizer, load_torch_model

log = logging.getLogger("bert_compile")

MODEL_FILE = "model.onnx"
OUTPUT_NAMES = {
    "sentence-embedding": "sentence_embedding",
    "feature-extraction": "last_hidden_state",
    "sequence-classification": "logits",
}
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


def output_name(info: ModelInfo, spec: ExportSpec) -> str:
    """Name of the one output the exported graph has."""
    if info.task == "sentence-embedding" and not spec.pooling_in_graph:
        return "last_hidden_state"
    return OUTPUT_NAMES[info.task]


def build_wrapper(info: ModelInfo, model, *, pooling_in_graph: bool = True):
    """Wrap the HF model so forward takes the graph inputs positionally and returns one tensor."""
    import torch

    input_names = info.architecture.input_names
    pool = info.pooling if (info.task == "sentence-embedding" and pooling_in_graph) else None

    class EncoderForExport(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            kwargs = dict(zip(input_names, inputs, strict=True))
            out = self.model(**kwargs, return_dict=True)
            if info.task == "sequence-classification":
                return out.logits
            hidden = out.last_hidden_state
            if pool is None:
                return hidden
            return pool_embeddings(
                hidden, kwargs["attention_mask"], mode=pool, normalize=info.normalize
            )

    return EncoderForExport().eval()


def pool_embeddings(hidden, attention_mask, *, mode: str, normalize: bool):
    """sentence-transformers pooling: masked mean (or CLS), then optional L2 normalisation."""
    import torch

    if mode == "cls":
        pooled = hidden[:, 0]
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
    return pooled


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
        out_name = output_name(info, spec)
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
