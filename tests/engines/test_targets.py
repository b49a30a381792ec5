"""GPU-target logic that needs no GPU: detection parsing, target plans, engine naming, TensorRT
profiles and compatibility rules, fp16 graph preparation, and the CPU fallback end to end."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from bert_compiler.cli.commands import cli
from bert_compiler.core.errors import EnvironmentProblem, InputError
from bert_compiler.core.onnx_io import load_onnx, sample_token_feeds
from bert_compiler.core.targets import Environment, detect, parse_nvidia_smi
from bert_compiler.engines import onnxruntime as ort_engine
from bert_compiler.engines import ort_session
from bert_compiler.engines.backend import BuildSpec, engine_name, get_backend
from bert_compiler.engines.fp16 import convert_to_fp16, float16_fraction, head_nodes
from bert_compiler.engines.onnxruntime import OnnxRuntimeBuildOptions as OrtBuild
from bert_compiler.engines.targets import plan_targets
from bert_compiler.engines.tensorrt import prepare_network_graph
from bert_compiler.engines.tensorrt_options import (
    Profile,
    TensorRTOptions,
    compatibility_problems,
    derive_profiles,
    select_profile,
)
from bert_compiler.stages.layout import model_slug
from tests.gpus import A100, H100, ORT_CUDA

# --- detection and plans -------------------------------------------------------------------


def test_parse_nvidia_smi():
    text = "0, NVIDIA H100 80GB HBM3, 9.0, 81559, 580.159.04\n1, NVIDIA A100, 8.0, 40960, 580.1\n"
    gpus = parse_nvidia_smi(text)
    assert [g.sm for g in gpus] == ["sm90", "sm80"] and gpus[0].memory_mib == 81559
    with pytest.raises(EnvironmentProblem, match="unexpected line"):
        parse_nvidia_smi("0, H100, 9.0\n")


def test_detect_on_this_machine_reports_what_is_missing():
    env = detect()
    assert env.onnxruntime == ort.__version__
    if env.tensorrt is None:
        assert "tensorrt" in env.tensorrt_problem
    if not env.gpus:
        assert env.notes


def test_auto_without_gpu_falls_back_to_cpu_with_one_note():
    plan = plan_targets(
        "auto", ("fp16", "int8"), Environment(ort_providers=("CPUExecutionProvider",))
    )
    assert [(e["backend"], e["device"], e["precision"]) for e in plan.engines] == [
        ("onnxruntime", "cpu", "fp32"),
        ("onnxruntime", "cpu", "int8"),
    ]
    assert any("no NVIDIA GPU found" in n and "CPU ONNX Runtime engine" in n for n in plan.notes)
    assert any("fp16 has no CPU engine" in n for n in plan.notes)


def test_default_precisions_are_fp16_on_gpus_and_fp32_on_cpu():
    gpu = plan_targets("auto", (), Environment(gpus=(H100,), ort_providers=ORT_CUDA))
    cpu = plan_targets("auto", (), Environment())
    assert [e["precision"] for e in gpu.engines] == ["fp16"]
    assert [e["precision"] for e in cpu.engines] == ["fp32"] and len(cpu.notes) == 1


def test_auto_with_gpu_but_no_backend_falls_back():
    plan = plan_targets("auto", ("fp16",), Environment(gpus=(H100,), tensorrt_problem="absent"))
    assert plan.engines[0]["device"] == "cpu"
    assert "neither TensorRT (absent)" in plan.notes[0]


def test_auto_builds_per_distinct_compute_capability():
    env = Environment(gpus=(H100, H100, A100), ort_providers=ORT_CUDA, tensorrt_problem="absent")
    plan = plan_targets("auto", ("fp16",), env)
    assert [(e["backend"], e["compute_capability"]) for e in plan.engines] == [
        ("onnxruntime", "9.0"),
        ("onnxruntime", "8.0"),
    ]
    assert "no TensorRT (absent)" in plan.notes[0]
    both = plan_targets(
        "auto", ("fp16",), Environment(gpus=(H100,), tensorrt="10.13.3", ort_providers=ORT_CUDA)
    )
    assert [e["backend"] for e in both.engines] == ["tensorrt", "onnxruntime"]
    assert not both.notes


def test_auto_says_which_gpu_backend_it_builds_without():
    """TensorRT here but no CUDA provider in ONNX Runtime: TensorRT engines only, and a note
    naming what is missing (each backend says what it lacks: Backend.gpu_problem)."""
    env = Environment(gpus=(H100,), tensorrt="10.13.3", onnxruntime="1.32.0")
    plan = plan_targets("auto", ("fp16",), env)
    assert [e["backend"] for e in plan.engines] == ["tensorrt"]
    assert plan.notes == (
        "no ONNX Runtime CUDA (ONNX Runtime 1.32.0 has no CUDAExecutionProvider (install "
        "onnxruntime-gpu)): building TensorRT only",
    )


def test_every_target_but_auto_is_one_backends_own():
    """--target's choices come from the backends (Backend.targets): each names one backend,
    which plans it."""
    from bert_compiler.engines.backend import backends
    from bert_compiler.engines.targets import TARGET_CHOICES

    owners = {t: [b.name for b in backends() if t in b.targets] for t in TARGET_CHOICES}
    assert owners == {
        "auto": [], "cpu": ["onnxruntime"], "cuda": ["onnxruntime"],
        "tensorrt": ["tensorrt"], "torch": ["torch"],
    }  # fmt: skip


def test_explicit_gpu_targets_fail_clearly_without_their_backend():
    with pytest.raises(EnvironmentProblem, match="no NVIDIA GPU found.*--target auto"):
        plan_targets("tensorrt", ("fp16",), Environment())
    with pytest.raises(EnvironmentProblem, match="not installed"):
        plan_targets(
            "tensorrt",
            ("fp16",),
            Environment(gpus=(H100,), tensorrt_problem="the tensorrt package is not installed"),
        )
    with pytest.raises(EnvironmentProblem, match="onnxruntime-gpu"):
        plan_targets("cuda", ("fp16",), Environment(gpus=(H100,), onnxruntime="1.32.0"))
    with pytest.raises(InputError, match="CPU engine is fp32 or int8"):
        plan_targets("cpu", ("fp16",), Environment())
    with pytest.raises(InputError, match="--target 'tpu'"):
        plan_targets("tpu", ("fp32",), Environment())


# --- build specs and names -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (BuildSpec(precision="fp16"), "needs a GPU target"),
        (BuildSpec(device="cuda", precision="int8"), "no fast path for Q/DQ"),
        (BuildSpec(backend="tensorrt", device="cpu"), "cuda only"),
        (BuildSpec(backend="tvm"), "--backend 'tvm'"),
        (
            BuildSpec(
                backend="tensorrt",
                device="cuda",
                options=TensorRTOptions(builder_optimization_level=9),
            ),
            "expected 0-5",
        ),
    ],
)
def test_build_spec_refuses_impossible_combinations(spec, message):
    with pytest.raises(InputError, match=message):
        spec.validate()


def test_engine_names_carry_backend_version_gpu_and_precision():
    assert engine_name(BuildSpec(), "1.32.0") == "ort1.32.0-cpu-fp32"
    cuda = BuildSpec(
        device="cuda", precision="fp16", compute_capability="9.0", options=OrtBuild(cuda_graph=True)
    )
    assert engine_name(cuda, "1.31.1") == "ort1.31.1-cuda-sm90-fp16-cudagraph"
    trt = BuildSpec(backend="tensorrt", device="cuda", precision="int8", compute_capability="8.9")
    assert engine_name(trt, "10.13.3") == "trt10.13.3-sm89-int8"
    portable = BuildSpec(
        backend="tensorrt",
        device="cuda",
        compute_capability="9.0",
        precision="fp16",
        options=TensorRTOptions(hardware_compatibility="ampere_plus", version_compatible=True),
    )
    assert engine_name(portable, "10.13.3") == "trt10.13.3-ampere_plus-fp16-vc"
    # The non-default attention kernels name the engine.
    fused = replace(cuda, options=replace(cuda.options, attention_kernels="fused"))
    assert engine_name(fused, "1.31.1") == "ort1.31.1-cuda-sm90-fp16-cudagraph-attn-fused"
    assert model_slug("../odd name/") == "odd-name"


def test_source_stage_per_backend_and_precision():
    assert BuildSpec().source_stage == "fuse"
    assert BuildSpec(backend="tensorrt", device="cuda", precision="fp16").source_stage == "simplify"
    assert (
        BuildSpec(backend="tensorrt", device="cuda", precision="int8").source_stage == "calibrate"
    )


def test_ort_cuda_provider_options_are_explicit(tmp_path):
    options = ort_session.OrtEngineOptions(device="cuda", fp16=True, cuda_graph=True)
    ((name, cuda),) = ort_session.provider_entries(options, tmp_path)
    assert name == "CUDAExecutionProvider" and cuda["enable_cuda_graph"] == "1"
    with_trt = ort_session.provider_entries(
        ort_session.OrtEngineOptions(device="cuda", fp16=True, tensorrt_provider=True), tmp_path
    )
    assert [n for n, _ in with_trt] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert with_trt[0][1]["trt_engine_cache_path"] == str(tmp_path / "trt-cache")
    with pytest.raises(InputError, match="need --device cuda"):
        ort_session.OrtEngineOptions(device="cpu", fp16=True).validate()
    # Attention kernels: ORT's own choice sets no mask; "fused" every backend but cuDNN (8).
    assert "sdpa_kernel" not in cuda
    fused = ort_session.OrtEngineOptions(device="cuda", fp16=True, attention_kernels="fused")
    ((_, fused_cuda),) = ort_session.provider_entries(fused, tmp_path)
    assert int(fused_cuda["sdpa_kernel"]) & 8 == 0 and int(fused_cuda["sdpa_kernel"]) & 4
    unfused = ort_session.OrtEngineOptions(device="cuda", fp16=True, attention_kernels="unfused")
    assert ort_session.provider_entries(unfused, tmp_path)[0][1]["sdpa_kernel"] == "16"
    with pytest.raises(InputError, match="attention kernels 'cudnn'"):
        ort_session.OrtEngineOptions(device="cuda", attention_kernels="cudnn").validate()


def test_attention_kernels_reach_the_cuda_engine_only():
    backend = get_backend("onnxruntime")
    fused = OrtBuild(attention_kernels="fused")
    cuda = backend.applicable(BuildSpec(device="cuda", precision="fp16", options=fused))
    assert backend.session_options(cuda).attention_kernels == "fused"
    cpu = backend.applicable(BuildSpec(options=fused))
    assert cpu.options.attention_kernels == backend.session_options(cpu).attention_kernels
    assert cpu.options.attention_kernels == "default"
    assert engine_name(cpu, "1") == "ort1-cpu-fp32"
    session = backend.session_options(cuda).to_dict()
    recorded = {"device": "cuda", "precision": "fp16", "session": session}
    assert backend.from_record(recorded).options.attention_kernels == "fused"
    with pytest.raises(InputError, match="--attention-kernels 'x'"):
        BuildSpec(
            device="cuda", precision="fp16", options=OrtBuild(attention_kernels="x")
        ).validate()


def test_packed_attention_names_and_records_the_cuda_engine(tmp_path):
    backend = get_backend("onnxruntime")
    packed = BuildSpec(
        device="cuda",
        precision="fp16",
        compute_capability="9.0",
        options=OrtBuild(packed_attention=True),
    )
    assert engine_name(packed, "1.31.1") == "ort1.31.1-cuda-sm90-fp16-packed-attention"
    fused = replace(packed, options=replace(packed.options, attention_kernels="fused"))
    assert engine_name(fused, "1.31.1") == "ort1.31.1-cuda-sm90-fp16-attn-fused-packed-attention"
    assert engine_name(replace(packed, options=OrtBuild()), "1") == "ort1-cuda-sm90-fp16"
    # The build record (the manifest's spec) carries it; from_record reads it back, and an
    # engine recorded before the option existed was built unpacked.
    job = backend.build_job(tmp_path / "model.onnx", packed, input_names=())
    assert job.settings["session"]["packed_attention"] is True
    recorded = {"device": "cuda", "precision": "fp16", "compute_capability": "9.0", **job.settings}
    assert backend.from_record(recorded).options.packed_attention is True
    assert engine_name(backend.from_record(recorded), "1.31.1") == engine_name(packed, "1.31.1")
    assert backend.triton_kind(recorded) == "ort-cuda-fp16-packed-attention"
    older = {**recorded, "session": dict(job.settings["session"])}
    del older["session"]["packed_attention"]
    assert backend.from_record(older).options.packed_attention is False
    # A CPU engine never records it, whatever the flags said.
    cpu = backend.applicable(BuildSpec(options=OrtBuild(packed_attention=True)))
    assert not cpu.options.packed_attention and not backend.session_options(cpu).packed_attention


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (BuildSpec(options=OrtBuild(packed_attention=True)), "not onnxruntime on cpu"),
        (
            BuildSpec(
                device="cuda",
                precision="fp16",
                options=OrtBuild(cuda_graph=True, packed_attention=True),
            ),
            "--packed-attention with --cuda-graph",
        ),
    ],
)
def test_packed_attention_refuses_other_targets_and_cuda_graphs(spec, needle):
    with pytest.raises(InputError, match=needle) as caught:
        spec.validate()
    assert "\n" not in str(caught.value)


def test_a_backend_is_built_with_its_own_options_only():
    """A backend's options are its own dataclass: ONNX Runtime's settings (packed attention)
    handed to TensorRT are a programming error, not silently ignored."""
    ort_options = OrtBuild(packed_attention=True)
    spec = BuildSpec(backend="tensorrt", device="cuda", precision="fp16", options=ort_options)
    with pytest.raises(TypeError, match="tensorrt build options must be TensorRTOptions"):
        spec.validate()
    assert isinstance(BuildSpec(backend="tensorrt").options, TensorRTOptions)
    assert BuildSpec().options == OrtBuild()


def test_packed_attention_engine_options_need_cuda_without_graphs():
    with pytest.raises(InputError, match="need --device cuda"):
        ort_session.OrtEngineOptions(device="cpu", packed_attention=True).validate()
    with pytest.raises(InputError, match="no CUDA graph can capture"):
        ort_session.OrtEngineOptions(
            device="cuda", fp16=True, cuda_graph=True, packed_attention=True
        ).validate()
    ort_session.OrtEngineOptions(device="cuda", fp16=True, packed_attention=True).validate()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--target", "cpu"], "this run builds no ONNX Runtime CUDA engine (onnxruntime cpu fp32)"),
        # Refused from the flags alone, before looking for a GPU.
        (["--target", "cuda", "--cuda-graph"], "--packed-attention with --cuda-graph"),
    ],
)
def test_packed_attention_cli_refusals_are_one_line_exit_3(
    tiny_embedding_model, tmp_path, flags, needle
):
    out = tmp_path / "out"
    result = _invoke(
        "run", "--model", tiny_embedding_model, "--out", out, "--packed-attention", *flags
    )
    assert result.exit_code == 3, result.output
    (line,) = result.stderr.strip().splitlines()
    assert needle in line and "--packed-attention" in line
    assert not out.exists() or not list(out.rglob("manifest.json"))


def test_cuda_engine_on_a_cpu_machine_is_an_environment_error(tmp_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has ORT's CUDA provider")
    with pytest.raises(EnvironmentProblem, match="onnxruntime-gpu"):
        ort_engine.build_engine(
            tmp_path / "x.onnx", tmp_path / "y.onnx", ort_session.OrtEngineOptions(device="cuda")
        )


# --- TensorRT profiles and compatibility ---------------------------------------------------


def test_profile_parse_round_trip_and_bounds():
    profile = Profile.parse("1x8:32x128:64x128")
    assert str(profile) == "1x8:32x128:64x128" and profile.accepts(64, 8)
    for bad in ("1x8:32x128", "1x8:axb:64x128", "1:2:3"):
        with pytest.raises(InputError, match="--profile"):
            Profile.parse(bad)
    for absurd in ("0x8:1x8:1x8", "1x8:4x8:2x8", "1x8:1x8:100000x8", "1x0:1x8:1x8"):
        with pytest.raises(InputError, match="profile"):
            Profile.parse(absurd).validate(512)
    with pytest.raises(InputError, match="max_position_embeddings"):
        Profile.parse("1x8:1x8:1x1024").validate(512)


def test_derived_profiles_cover_every_length_and_split_at_quantiles():
    lengths = [5] * 50 + [12] * 30 + [40] * 20
    profiles = derive_profiles(lengths, max_batch=32, max_length=128, buckets=2)
    assert [(p.min_seq, p.max_seq) for p in profiles] == [(1, 8), (9, 128)]
    assert all(p.max_batch == 32 and p.opt_seq == p.max_seq for p in profiles)
    for length in range(1, 129):
        select_profile(profiles, 32, length)
    assert len(derive_profiles(lengths, max_batch=8, max_length=128, buckets=1)) == 1
    three = derive_profiles(lengths, max_batch=8, max_length=128, buckets=3)
    assert [p.max_seq for p in three] == [8, 16, 128]
    with pytest.raises(InputError, match="empty dataset"):
        derive_profiles([], max_batch=8, max_length=128)


def test_select_profile_takes_the_narrowest_fit():
    profiles = (Profile(1, 64, 64, 1, 128, 128), Profile(1, 64, 64, 1, 16, 16))
    assert select_profile(profiles, 4, 10) == 1
    assert select_profile(profiles, 4, 100) == 0
    with pytest.raises(InputError, match="outside every profile"):
        select_profile(profiles, 65, 10)


def test_tensorrt_options_round_trip_through_the_manifest():
    options = TensorRTOptions(
        profiles=(Profile(1, 8, 16, 1, 16, 16),),
        builder_optimization_level=5,
        timing_cache="cache.bin",
        hardware_compatibility="ampere_plus",
        version_compatible=True,
    )
    assert TensorRTOptions.from_dict(json.loads(json.dumps(options.to_dict()))) == options


@pytest.mark.parametrize(
    ("built", "runtime", "options", "problem"),
    [
        (("10.13.3", "9.0"), ("10.13.3", "9.0"), TensorRTOptions(), None),
        (("10.13.3", "9.0"), ("10.14.1", "9.0"), TensorRTOptions(), "built with TensorRT 10.13.3"),
        (("10.13.3", "9.0"), ("10.13.3", "8.9"), TensorRTOptions(), "compute capability 9.0"),
        (("10.13.3", "9.0"), ("10.14.1", "9.0"), TensorRTOptions(version_compatible=True), None),
        (("10.13.3", "9.0"), ("11.0.0", "9.0"), TensorRTOptions(version_compatible=True), None),
        (
            ("10.13.3", "9.0"),
            ("10.9.0", "9.0"),
            TensorRTOptions(version_compatible=True),
            "version-compatible",
        ),
        (
            ("10.13.3", "8.0"),
            ("10.13.3", "9.0"),
            TensorRTOptions(hardware_compatibility="ampere_plus"),
            None,
        ),
        (
            ("10.13.3", "8.0"),
            ("10.13.3", "7.5"),
            TensorRTOptions(hardware_compatibility="ampere_plus"),
            "Ampere and newer",
        ),
    ],
)
def test_plan_compatibility_rules(built, runtime, options, problem):
    problems = compatibility_problems(
        built_tensorrt=built[0],
        built_compute_capability=built[1],
        options=options,
        runtime_tensorrt=runtime[0],
        runtime_compute_capability=runtime[1],
    )
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0]


# --- graph preparation ---------------------------------------------------------------------


def _run_cpu(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.e2e
def test_tensorrt_graph_refuses_contrib_ops_and_int8_without_qdq(tiny_run):
    _, out, _, _ = tiny_run
    with pytest.raises(InputError, match="contrib ops.*Attention"):
        prepare_network_graph(load_onnx(out / "fuse/model.onnx"), precision="fp16")
    with pytest.raises(InputError, match="Q/DQ graph"):
        prepare_network_graph(load_onnx(out / "simplify/model.onnx"), precision="int8")


@pytest.mark.e2e
@pytest.mark.parametrize("stage", ["simplify", "fuse"])
def test_fp16_graph_keeps_fragile_parts_in_float32_and_matches(tiny_run, stage):
    _, out, _, _ = tiny_run
    graph = load_onnx(out / f"{stage}/model.onnx")
    half = (
        prepare_network_graph(graph, precision="fp16")
        if stage == "simplify"
        else convert_to_fp16(graph)
    )
    # Structure: weights fp16, inputs/outputs unchanged, the pooling head float32.
    assert float16_fraction(half) > 0.95
    if stage == "simplify":  # nodes in topological order (the head's Casts before their users)
        onnx.checker.check_model(half, full_check=True)
    assert [i.type.tensor_type.elem_type for i in half.graph.input] == [onnx.TensorProto.INT64] * 3
    assert half.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    head = set(head_nodes(graph))
    assert {n.op_type for n in graph.graph.node if n.name in head} >= {"ReduceSum", "ReduceL2"}
    half_types = {v.name: v.type.tensor_type.elem_type for v in half.graph.value_info}
    reduce_sum = next(n for n in half.graph.node if n.op_type == "ReduceSum" and n.name in head)
    assert half_types.get(reduce_sum.output[0], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT
    for node in half.graph.node:
        if node.op_type == "LayerNormalization":
            assert all(a.i == 1 for a in node.attribute if a.name == "stash_type")
    # Numbers: within fp16 error of the float32 graph (ORT CPU runs fp16 kernels).
    feeds = sample_token_feeds(graph, batch=3, sequence=11)
    diff = np.abs(_run_cpu(half, feeds) - _run_cpu(graph, feeds)).max()
    assert diff < 5e-3


@pytest.mark.e2e
def test_fp16_refuses_fp16_layer_norm_statistics(tiny_run):
    _, out, _, _ = tiny_run
    graph = load_onnx(out / "simplify/model.onnx")
    norm = next(n for n in graph.graph.node if n.op_type == "LayerNormalization")
    norm.attribute.append(onnx.helper.make_attribute("stash_type", 0))
    with pytest.raises(InputError, match="stash_type=0"):
        convert_to_fp16(graph)
    with pytest.raises(InputError, match="already holds fp16"):
        convert_to_fp16(convert_to_fp16(load_onnx(out / "simplify/model.onnx")))


@pytest.mark.e2e
def test_keep_float_ops_keeps_softmax_float32(tiny_run):
    _, out, _, _ = tiny_run
    graph = load_onnx(out / "simplify/model.onnx")
    half = convert_to_fp16(graph, keep_float_ops=("Softmax",))
    softmax = [n for n in half.graph.node if n.op_type == "Softmax"]
    producers = {o: n for n in half.graph.node for o in n.output}
    assert softmax and all(producers[s.input[0]].op_type == "Cast" for s in softmax)


# --- the CPU fallback end to end -----------------------------------------------------------


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_targets_command_json():
    result = _invoke("targets", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["onnxruntime"] == ort.__version__
    assert report["auto"] and {"backend", "device", "precision"} <= set(report["auto"][0])


@pytest.mark.e2e
def test_run_target_auto_without_gpu_falls_back_to_cpu(tiny_embedding_model, tmp_path):
    if detect().gpus:
        pytest.skip("this machine has a GPU: auto builds GPU engines here")
    result = _invoke(
        "run",
        "--model",
        tiny_embedding_model,
        "--out",
        tmp_path,
        "--target",
        "auto",
        "--no-metric-gate",
        "--metric-limit",
        "100",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    assert "no NVIDIA GPU found: building the CPU ONNX Runtime engine instead" in result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    (engine,) = summary["engines"]
    assert engine["device"] == "cpu" and engine["precision"] == "fp32" and engine["passed"]
    assert Path(engine["path"]).parent.parent.name == "tiny-embed"
    assert len(summary["notes"]) == 1  # default precisions: fp32 on the CPU, no fp16 note


@pytest.mark.parametrize(
    ("target", "needle"), [("cuda", "--target cuda"), ("tensorrt", "--target tensorrt")]
)
def test_explicit_gpu_target_without_gpu_is_one_line_exit_6(
    tiny_embedding_model, tmp_path, target, needle
):
    if detect().gpus:
        pytest.skip("this machine has a GPU")
    result = _invoke(
        "build",
        "--model",
        tiny_embedding_model,
        "--out",
        tmp_path,
        "--target",
        target,
        "--precision",
        "fp16",
    )
    assert result.exit_code == 6
    (line,) = result.stderr.strip().splitlines()
    assert needle in line and "--target auto" in line
    assert not (tmp_path / "engines").exists()


def test_signal_watch_sees_sigterm_while_the_main_thread_waits_in_native_code():
    """What the TensorRT progress monitor relies on to cancel a build on Ctrl-C/SIGTERM."""
    import os
    import select
    import signal
    import threading
    import time

    from bert_compiler.engines.tensorrt_build import SignalWatch

    handled = []
    previous = {
        s: signal.signal(s, lambda n, _f: handled.append(n))
        for s in (signal.SIGTERM, signal.SIGUSR1)
    }
    try:
        with SignalWatch() as watch:
            assert not watch.requested()
            os.kill(os.getpid(), signal.SIGUSR1)  # not a stop request
            seen = threading.Event()

            def poll():  # stands in for TensorRT's builder thread calling step_complete
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and not watch.requested():
                    time.sleep(0.005)
                if watch.requested():
                    seen.set()

            poller = threading.Thread(target=poll)
            poller.start()
            time.sleep(0.05)
            assert not seen.is_set()
            os.kill(os.getpid(), signal.SIGTERM)
            select.select([], [], [], 1.0)  # the main thread in a native wait
            poller.join()
            # Seen by the polling thread (within its deadline), whatever the machine's load.
            assert seen.is_set() and watch.received == signal.SIGTERM
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    assert signal.SIGTERM in handled and signal.SIGUSR1 in handled
