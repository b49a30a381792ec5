"""Probe ONNX Runtime's fp8 GEMM (com.microsoft GemmFloat8, cuBLASLt) against fp16 MatMul on a GPU.

Run on the GPU machine with onnxruntime-gpu importable:
    python3 scripts/probe_fp8_gemm.py [--tokens 16384] [--json]

For BERT-base and MiniLM feed-forward shapes it builds two graphs of four up/down projection
pairs (tokens x hidden -> 4*hidden -> hidden, weights ~ N(0, 1/K)): fp16 MatMuls, and the same
weights in float8 e4m3 with each input quantized by QuantizeLinear at a fixed scale before a
GemmFloat8 that writes fp16. It prints which GemmFloat8 layouts cuBLASLt accepts, the error of
the fp8 chain against the fp16 one, the time per chain (IO binding, inputs and outputs on the
GPU), and whether the fp8 graph runs under ORT's CUDA graph capture.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

FP8_MAX = 448.0
# (transA, transB, scale inputs, output type): the 1.31 schema says float 8 needs transA=0,
# transB=1; C (bias) is input 2 (left empty), then scaleA, scaleB and optionally scaleY.
LAYOUTS = {
    "NT-fp16-noY": (0, 1, 2, TensorProto.FLOAT16),
    "NT-fp16-Y": (0, 1, 3, TensorProto.FLOAT16),
    "NT-bf16-noY": (0, 1, 2, TensorProto.BFLOAT16),
    "NT-fp32-noY": (0, 1, 2, TensorProto.FLOAT),
}
SHAPES = {"bert-base": 768, "minilm": 384}
PAIRS = 4


def fp8_initializer(name: str, values: np.ndarray) -> onnx.TensorProto:
    raw = torch.from_numpy(values).to(torch.float8_e4m3fn).view(torch.uint8).numpy().tobytes()
    return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, values.shape, raw, raw=True)


def chain_graph(hidden: int, fp8: bool, layout: str, act_amax: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "x"
    trans_a, trans_b, scale_inputs, out_type = LAYOUTS[layout]
    for index in range(2 * PAIRS):
        k, n = (hidden, 4 * hidden) if index % 2 == 0 else (4 * hidden, hidden)
        weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        out = f"y{index}"
        if not fp8:
            inits.append(
                helper.make_tensor(
                    f"w{index}",
                    TensorProto.FLOAT16,
                    (k, n),
                    weight.astype(np.float16).tobytes(),
                    raw=True,
                )
            )
            nodes.append(helper.make_node("MatMul", [current, f"w{index}"], [out]))
        else:
            w_scale = float(np.abs(weight).max()) / FP8_MAX
            stored = (weight / w_scale).T.copy() if trans_b else weight / w_scale
            inits.append(fp8_initializer(f"w{index}", stored.astype(np.float32)))
            x_scale = act_amax / FP8_MAX
            inits += [
                helper.make_tensor(f"xs{index}", TensorProto.FLOAT16, (), [x_scale]),
                fp8_initializer(f"xz{index}", np.zeros((), np.float32)),
                helper.make_tensor(f"sa{index}", TensorProto.FLOAT, (), [x_scale]),
                helper.make_tensor(f"sb{index}", TensorProto.FLOAT, (), [w_scale]),
                helper.make_tensor(f"sy{index}", TensorProto.FLOAT, (), [1.0]),
            ]
            nodes.append(
                helper.make_node(
                    "QuantizeLinear", [current, f"xs{index}", f"xz{index}"], [f"q{index}"]
                )
            )
            nodes.append(
                helper.make_node(
                    "GemmFloat8",
                    [f"q{index}", f"w{index}", "", f"sa{index}", f"sb{index}", f"sy{index}"][
                        : 3 + scale_inputs
                    ],
                    [out if out_type == TensorProto.FLOAT16 else f"g{index}"],
                    domain="com.microsoft",
                    transA=trans_a,
                    transB=trans_b,
                    dtype=out_type,
                )
            )
            if out_type != TensorProto.FLOAT16:
                nodes.append(helper.make_node("Cast", [f"g{index}"], [out], to=TensorProto.FLOAT16))
        current = out
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["m", hidden])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT16, ["m", hidden])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    return model, current


def session(model, cuda_graph: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    provider = ("CUDAExecutionProvider", {"enable_cuda_graph": "1" if cuda_graph else "0"})
    return ort.InferenceSession(model.SerializeToString(), options, providers=[provider])


def timed(sess, x_gpu, output: str, runs: int) -> tuple[float, np.ndarray]:
    import onnxruntime as ort

    binding = sess.io_binding()
    binding.bind_ortvalue_input("x", x_gpu)
    y = ort.OrtValue.ortvalue_from_shape_and_type(x_gpu.shape(), np.float16, "cuda", 0)
    binding.bind_ortvalue_output(output, y)
    for _ in range(3):
        sess.run_with_iobinding(binding)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run_with_iobinding(binding)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), y.numpy()


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    ort.preload_dlls()
    print("onnxruntime", ort.__version__, ort.get_available_providers(), flush=True)
    results = []
    for name, hidden in SHAPES.items():
        x = np.random.default_rng(1).standard_normal((args.tokens, hidden)).astype(np.float16)
        x_gpu = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        base_model, base_out = chain_graph(hidden, fp8=False, layout="NT-fp16-noY", act_amax=0)
        base_ms, reference = timed(session(base_model, False), x_gpu, base_out, args.runs)
        row = {"model": name, "tokens": args.tokens, "fp16_ms": round(base_ms, 4)}
        amax = float(np.abs(x.astype(np.float32)).max())
        for layout in LAYOUTS:
            model, out = chain_graph(hidden, fp8=True, layout=layout, act_amax=amax)
            try:
                ms, y = timed(session(model, False), x_gpu, out, args.runs)
            except Exception as error:  # noqa: BLE001 -- a probe: report what ORT says
                row[f"fp8_{layout}"] = f"error: {str(error).splitlines()[0][:300]}"
                continue
            ref = reference.astype(np.float32)
            rel = float(np.linalg.norm(y.astype(np.float32) - ref) / np.linalg.norm(ref))
            row[f"fp8_{layout}_ms"] = round(ms, 4)
            row[f"fp8_{layout}_rel_error"] = round(rel, 5)
            try:
                graph_ms, _ = timed(session(model, True), x_gpu, out, args.runs)
                row[f"fp8_{layout}_cuda_graph_ms"] = round(graph_ms, 4)
            except Exception as error:  # noqa: BLE001
                row[f"fp8_{layout}_cuda_graph"] = f"error: {str(error).splitlines()[0][:300]}"
            print(name, layout, {k: v for k, v in row.items() if layout in k}, flush=True)
        graph_ms, _ = timed(session(base_model, True), x_gpu, base_out, args.runs)
        row["fp16_cuda_graph_ms"] = round(graph_ms, 4)
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
