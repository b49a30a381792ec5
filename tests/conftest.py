from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bert_compiler.pipeline.verify import VerifySpec
from tests.tiny_models import make_tiny_model

# A random model embeds every sentence almost identically, so 1e-7 differences reorder STS-B
# cosines and its Spearman moves by a point or more: the metric gate is meaningless there and is
# exercised on purpose-built failures and on the real model instead.
TINY_VERIFY = VerifySpec(metric_limit=200, parity_sentences=40, metric_gate=False)


@pytest.fixture(scope="session")
def tiny_embedding_model(tmp_path_factory) -> Path:
    """A tiny sentence-transformers-style BERT (mean pooling + normalize)."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-embed")


@pytest.fixture(scope="session")
def tiny_classifier_model(tmp_path_factory) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-cls", task="sequence-classification"
    )


@pytest.fixture()
def tiny_model_copy(tiny_embedding_model, tmp_path) -> Path:
    """A private copy of the tiny embedding model that a test may damage."""
    target = tmp_path / "model"
    shutil.copytree(tiny_embedding_model, target)
    return target


@pytest.fixture(scope="session")
def tiny_run(tiny_embedding_model, tmp_path_factory):
    """One full pipeline run on the tiny embedding model, shared by read-only tests."""
    from bert_compiler.pipeline.models import resolve_model
    from bert_compiler.pipeline.runner import RunSpec, run_pipeline

    info = resolve_model(tiny_embedding_model)
    out = tmp_path_factory.mktemp("runs") / "tiny"
    spec = RunSpec(verify=TINY_VERIFY)
    summary = run_pipeline(info=info, out=out, spec=spec)
    return info, out, spec, summary


def cpu_engine_dir(out: Path, precision: str = "fp32", stage: str = "engines") -> Path:
    """The one CPU ONNX Runtime engine folder (or its verify folder) of ``precision`` in a run:
    OUT/<stage>/<model>/ort<version>-cpu-<precision>."""
    (folder,) = sorted(Path(out).glob(f"{stage}/*/ort*-cpu-{precision}"))
    return folder
