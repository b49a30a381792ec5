"""The torch engine in INT8 (``--target torch --precision int8``): the projections and the
feed-forward as integer GEMMs (torch._int_mm) with int8 weights scaled per output channel and
activations quantized per token at run time; everything else as the float engine. Checked on the
CPU, where torch._int_mm runs the same integer arithmetic; the gpu test runs it on the GPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bert_compiler.cli.commands import cli
from bert_compiler.core.targets import Environment
from bert_compiler.engines.backend import BuildSpec, load_engine
from bert_compiler.engines.batching import BatchingSpec
from bert_compiler.engines.targets import plan_targets
from bert_compiler.engines.torch_module import int8_linear, quantize_weight
from bert_compiler.runtime.encoder import Encoder
from tests.closeness import assert_tracks_float
from tests.engines.test_gpu_engines import _cuda_reason, _skip_unless
from tests.gpus import H100


def _reference(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The same arithmetic in numpy, step by step: weights per output channel and rows per token
    to int8 by their absolute maximum over 127, an exact integer product, scaled back."""
    w_scale = np.maximum(np.abs(weight).max(axis=1), 1e-12) / 127
    w_q = np.clip(np.rint(weight / w_scale[:, None]), -127, 127).astype(np.int64)
    x_scale = np.maximum(np.abs(x).max(axis=1), 1e-12) / 127
    x_q = np.clip(np.rint(x / x_scale[:, None]), -127, 127).astype(np.int64)
    return (x_q @ w_q.T) * x_scale[:, None] * w_scale[None, :] + bias


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int8_linear_is_the_integer_arithmetic_it_names(rows):
    generator = np.random.default_rng(rows)
    x = generator.normal(size=(rows, 32)).astype(np.float32)
    x[0] = 0.0  # a row of zeros: its scale must not divide by zero
    weight = generator.normal(size=(24, 32)).astype(np.float32)
    bias = generator.normal(size=24).astype(np.float32)
    quantized, scale = quantize_weight(torch.from_numpy(weight))
    assert quantized.dtype == torch.int8 and tuple(scale.shape) == (24,)
    got = int8_linear(torch.from_numpy(x), quantized, scale, torch.from_numpy(bias))
    np.testing.assert_allclose(got.numpy(), _reference(x, weight, bias), rtol=1e-5, atol=1e-5)
    exact = x @ weight.T + bias
    assert np.abs(got.numpy() - exact).max() < 0.05 * np.abs(exact).max()
    # Any leading shape (padded batches are [rows, width, hidden]).
    stacked = int8_linear(torch.from_numpy(x).reshape(1, rows, 32), quantized, scale,
                          torch.from_numpy(bias))  # fmt: skip
    assert torch.equal(stacked.reshape(rows, 24), got)


def test_int8_is_planned_for_the_torch_target_and_fp8_still_refused():
    plan = plan_targets("torch", ("int8",), Environment())
    (engine,) = plan.engines
    assert (engine["device"], engine["precision"]) == ("cpu", "int8")
    on_gpu = plan_targets("torch", ("int8",), Environment(gpus=(H100,), torch_cuda=True))
    assert on_gpu.engines[0]["device"] == "cuda"
    from bert_compiler.core.errors import InputError

    with pytest.raises(InputError, match="fp8"):
        plan_targets("torch", ("fp8",), Environment())


@pytest.mark.e2e
@pytest.mark.usefixtures("pb_utils")
def test_cli_builds_verifies_and_serves_an_int8_torch_engine(tiny_run, tmp_path, monkeypatch):
    """`run --target torch --precision int8` needs no calibration: the engine quantizes the
    fused graph's weights itself, passes verify's INT8 gate, tracks the float engine, its file
    says so (int8 weights and their scales), and the packaged Triton text model answers with the
    runtime's outputs."""
    from bert_compiler.triton import config as tc
    from tests.triton.test_package import _load_text_model

    info = tiny_run[0]
    out = tmp_path / "out"
    argv = ["run", "--model", str(info.path), "--out", str(out), "--target", "torch"]
    gates = ["--precision", "int8", "--metric-limit", "100", "--no-metric-gate", "--json"]
    result = CliRunner().invoke(cli, [*argv, *gates])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    (engine,) = summary["engines"]
    assert engine["name"].endswith("-cpu-int8") and engine["passed"]
    assert not (out / "calibrate").exists()
    folder = Path(engine["manifest"]).parent
    loaded, manifest = load_engine(folder)
    assert manifest["spec"]["precision"] == "int8"
    assert loaded.weights["layers.0.qkv.weight"].dtype == torch.int8
    assert loaded.weights["layers.0.qkv.scale"].dtype == torch.float32
    texts = [
        "A man is playing a guitar.", "Two dogs run across a field.", "short", "",
        "A woman slices an onion.", "The cat sleeps on the warm windowsill.",
        "Stocks fell sharply on Monday.", "Ünïcödé façade — naïve café 東京 🙂",
    ]  # fmt: skip
    quantized = Encoder(loaded, info).encode(texts)["sentence_embedding"]
    float_engine, _ = load_engine(_float_engine(tiny_run, tmp_path))
    reference = Encoder(float_engine, info).encode(texts)["sentence_embedding"]
    assert_tracks_float(reference, quantized, "int8")
    folder = Path(summary["repository"]["path"]) / f"{info.name}-pt-cpu-int8-text"
    config = tc.parse((folder / "config.pbtxt").read_text(), folder)
    model = _load_text_model(folder, config, monkeypatch)
    (answer,) = model.engine.run([texts])
    np.testing.assert_allclose(answer["sentence_embedding"], quantized, atol=1e-5)


def _float_engine(tiny_run, tmp_path: Path) -> Path:
    from bert_compiler.stages.build import build

    _info, out, _spec, _summary = tiny_run
    folder = tmp_path / "float"
    build(source=out / "fuse" / "model.onnx", out_dir=folder, spec=BuildSpec(backend="torch"))
    return folder


@pytest.mark.gpu
@pytest.mark.e2e
def test_torch_cuda_int8_engine_matches_the_cpu_int8_engine(tmp_path):
    """On a GPU (cuBLASLt's int8 GEMM, fp16 activations, batches under 17 rows padded) the
    engine tracks the CPU INT8 engine's outputs."""
    _skip_unless(_cuda_reason())
    from bert_compiler.models.loading import resolve_model
    from bert_compiler.run import RunSpec, run_pipeline
    from bert_compiler.stages.build import build
    from tests.conftest import TINY_VERIFY
    from tests.tiny_models import make_tiny_model

    # The tiny config's feed-forward (37) is no multiple of 8: torch._int_mm's GPU sizes.
    folder = make_tiny_model(tmp_path / "model", config_overrides={"intermediate_size": 64})
    info = resolve_model(folder)
    run_pipeline(info=info, out=tmp_path / "run", spec=RunSpec(verify=TINY_VERIFY))
    source = tmp_path / "run" / "fuse" / "model.onnx"
    engines = {}
    for device in ("cpu", "cuda"):
        folder = tmp_path / device
        build(source=source, out_dir=folder,
              spec=BuildSpec(backend="torch", device=device, precision="int8"))  # fmt: skip
        engines[device], _ = load_engine(folder)
    # Batches under 17 rows (padded for torch._int_mm) and over, each replayed as CUDA graphs.
    texts = ["A man is playing a guitar.", "short"] * 20
    for rows in (1, 5, 16, 17, 40):
        batching = BatchingSpec(max_batch=rows, token_budget=4096)
        cpu, cuda = (
            Encoder(engines[d], info, batching=batching).encode(texts)["sentence_embedding"]
            for d in ("cpu", "cuda")
        )
        np.testing.assert_allclose(cuda, cpu, atol=2e-2)
    assert engines["cuda"]._captured  # the small batches ran as graphs


def test_a_gpu_int8_engine_needs_sizes_its_integer_gemms_take():
    """torch._int_mm on a GPU multiplies sizes that are multiples of 8 only: refused at build in
    one line naming the tensor, rather than failing on the GPU as if the GPU were to blame."""
    from bert_compiler.core.errors import UnsupportedModelError
    from bert_compiler.engines.torch_encoder import _check_int_mm_sizes

    fits = {"layers.0.up.weight": np.zeros((64, 32)), "layers.0.norm1.weight": np.zeros(37)}
    _check_int_mm_sizes(fits, "g.onnx")  # a LayerNorm of 37 is no GEMM
    odd = {**fits, "layers.0.down.weight": np.zeros((32, 37))}
    with pytest.raises(UnsupportedModelError, match=r"layers.0.down.weight is \[32, 37\]"):
        _check_int_mm_sizes(odd, "g.onnx")


@pytest.mark.e2e
def test_an_engine_file_opened_at_another_precision_is_one_line(tiny_run, tmp_path):
    """An INT8 file opened as fp32 (its int8 weights would run as floats, unscaled), a float file
    opened as int8 (no scales), and a precision no torch engine has: each a LayoutError (an
    ArtifactError at load) rather than silent garbage."""
    from bert_compiler.engines.torch_layout import LayoutError, read_layout
    from bert_compiler.engines.torch_module import TorchEncoder
    from bert_compiler.stages.build import build

    _info, out, _spec, _summary = tiny_run
    files = {}
    for precision in ("int8", "fp32"):
        spec = BuildSpec(backend="torch", precision=precision)
        build(source=out / "fuse" / "model.onnx", out_dir=tmp_path / precision, spec=spec)
        files[precision] = tmp_path / precision / "encoder.safetensors"
    layout = read_layout(files["int8"])
    with pytest.raises(LayoutError, match="a float engine's is float"):
        TorchEncoder(files["int8"], layout, "cpu", "fp32")
    with pytest.raises(LayoutError, match=r"qkv.scale is missing"):
        TorchEncoder(files["fp32"], layout, "cpu", "int8")
    with pytest.raises(LayoutError, match="precision 'int4'"):
        TorchEncoder(files["int8"], layout, "cpu", "int4")
