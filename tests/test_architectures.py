"""Every registered architecture has a tiny model that exports, simplifies and fuses completely."""

from __future__ import annotations

import pytest

from bert_compiler.core.errors import UnsupportedModelError
from bert_compiler.pipeline.architectures import ARCHITECTURES, architecture_for
from bert_compiler.pipeline.export import export
from bert_compiler.pipeline.fuse import fuse
from bert_compiler.pipeline.models import resolve_model
from bert_compiler.pipeline.simplify import simplify
from tests.tiny_models import make_tiny_model


@pytest.mark.e2e
@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_registered_architecture_compiles_with_full_fusion(model_type, tmp_path):
    folder = make_tiny_model(tmp_path / model_type, model_type=model_type)
    info = resolve_model(folder)
    exported = export(info=info, out_dir=tmp_path / "export")
    simplified = simplify(source=exported.output("model.onnx"), out_dir=tmp_path / "simplify")
    fused = fuse(info=info, source=simplified.output("model.onnx"), out_dir=tmp_path / "fuse")
    assert fused.results["fusions_complete"]
    assert fused.results["expected_fusions"] == info.architecture.expected_fusions(info.config)


def test_unregistered_architecture_is_refused():
    with pytest.raises(UnsupportedModelError, match="supported: bert"):
        architecture_for("llama", "config.json")
