"""Every registered architecture has a tiny model that exports, simplifies and fuses to its
measured counts, and runs end to end (fp32 and INT8, verified, packaged, gated)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from bert_compiler.core.errors import UnsupportedModelError
from bert_compiler.models.architectures import ARCHITECTURES, architecture_for
from bert_compiler.models.loading import resolve_model
from bert_compiler.stages.export import export
from bert_compiler.stages.fuse import fuse
from bert_compiler.stages.simplify import simplify
from tests.conftest import run_fp32_and_int8
from tests.tiny_models import make_tiny_model


@pytest.mark.e2e
@pytest.mark.parametrize("task", ["sentence-embedding", "sequence-classification"])
@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_registered_architecture_compiles_with_full_fusion(model_type, task, tmp_path):
    folder = make_tiny_model(tmp_path / model_type, model_type=model_type, task=task)
    info = resolve_model(folder)
    exported = export(info=info, out_dir=tmp_path / "export")
    simplified = simplify(source=exported.output("model.onnx"), out_dir=tmp_path / "simplify")
    fused = fuse(info=info, source=simplified.output("model.onnx"), out_dir=tmp_path / "fuse")
    assert fused.results["fusions_complete"]
    assert info.task == task
    assert fused.results["expected_fusions"] == info.architecture.fusions_for(info.config, task)
    assert fused.results["fusion_note"] == info.architecture.fusion_note
    graph = onnx.load(str(exported.output("model.onnx")))
    assert [i.name for i in graph.graph.input] == list(info.architecture.input_names)


# BERT's run to a gated repository is tests/cli/test_cli.py's (and test_pipeline's, test_package's).
@pytest.mark.e2e
@pytest.mark.parametrize("model_type", sorted(set(ARCHITECTURES) - {"bert"}))
def test_registered_architecture_runs_fp32_and_int8_to_a_gated_repository(model_type, tmp_path):
    folder = make_tiny_model(tmp_path / model_type, model_type=model_type)
    result, summary = run_fp32_and_int8(folder, tmp_path / "out")
    info = resolve_model(folder)
    assert summary["fusion_note"] == info.architecture.fusion_note
    if info.architecture.fusion_note:
        assert f"partial fusion for {model_type}" in result.stderr


def test_unregistered_architecture_is_refused():
    with pytest.raises(UnsupportedModelError, match="supported: bert"):
        architecture_for("llama", "config.json")


@pytest.mark.parametrize("document", ["README.md", "docs/concepts.md"], ids=["readme", "concepts"])
def test_architecture_tables_list_every_registered_architecture(document):
    """The README's support matrix and the concepts page's table of fused operators: one row per
    registered architecture, its graph inputs, ORT optimizer type and partial fusion as the spec
    says."""
    text = (Path(__file__).resolve().parents[2] / document).read_text()
    section = text.split("## Architectures", 1)[1].split("\n#", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| `")]
    listed = {cells[0].strip().strip("`"): cells for cells in rows}
    assert sorted(listed) == sorted(ARCHITECTURES)
    for model_type, cells in listed.items():
        spec = ARCHITECTURES[model_type]
        assert [n.strip() for n in cells[1].split(",")] == list(spec.input_names)
        assert cells[2].strip().strip("`") == spec.ort_optimizer_type
        assert ("partial" in cells[3]) == bool(spec.fusion_note)
