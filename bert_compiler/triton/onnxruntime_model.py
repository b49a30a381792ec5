"""Triton Python-backend model that runs an ONNX Runtime engine (CPU; CUDA for the one-model text
engine of a GPU engine, `package --python-gpu-engine`).

For Triton builds without the onnxruntime backend (`bert-compile package --python-cpu-engine
--python-text ensemble`):
`package` copies this file verbatim to ``<model>-ort-cpu-<precision>-python/1/model.py`` beside
the engine's ``model.onnx``. The session is created with the graph optimization level and thread
count recorded in the config's parameters, which the packager takes from the engine's manifest.
Triton's Python environment needs numpy and ``onnxruntime``; nothing is imported from Triton or
ONNX Runtime until the model is loaded. The one-model text engine (text_engine_model.py) imports
``open_session`` from a copy of this file beside it.

All requests of one ``execute`` call run together: the requests of one padded length (the
tokenizer model pads each to a rung of the length ladder) are concatenated and run as one batch,
and each response gets its own rows back. The config lets Triton batch requests of different
lengths (``allow_ragged_batch``: this backend hands each request's tensors over as they are), so
one call holds every request that waited, one engine run per rung present.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ENGINE_FILE = "model.onnx"
# Config parameters of a GPU engine: its device, and the CUDA provider options its build recorded
# (JSON, without the device id: each instance runs on the GPU Triton gives it).
DEVICE_PARAMETER = "device"
CUDA_OPTIONS_PARAMETER = "cuda_provider_options"
# The names engines/ort_session.py records; repeated here because this file runs inside Triton's
# Python, where bert-compiler is not installed.
_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / ENGINE_FILE
        self.session = open_session(path, config, parameters)
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        return run_grouped(
            self.session,
            self.input_names,
            self.output_names,
            [
                {
                    name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                    for name in self.input_names
                }
                for request in requests
            ],
            respond=lambda outputs: pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()]
            ),
            fail=lambda message: pb_utils.InferenceResponse(error=pb_utils.TritonError(message)),
        )


def engine_path(folder: Path, parameters: dict, device_id: int) -> Path:
    """The engine file of this instance: model.onnx, or on a GPU the file built for its compute
    capability (package copies one per GPU it has an engine for: model.sm90.onnx, ...).

    Raises:
        FileNotFoundError: no engine for this GPU's compute capability.
    """
    if parameters.get(DEVICE_PARAMETER) != "cuda":
        return folder / ENGINE_FILE
    capability = gpu_capability(device_id)
    path = folder / f"model.sm{capability}.onnx"
    if not path.is_file():
        built = sorted(p.name for p in folder.glob("model.sm*.onnx"))
        raise FileNotFoundError(
            f"GPU {device_id} has compute capability {capability[:-1]}.{capability[-1]} and "
            f"this model holds engines for {', '.join(built) or 'no GPU'}; build one for it"
        )
    return path


def gpu_capability(device_id: int) -> str:
    """The compute capability of GPU ``device_id`` as engine files name it (``90``), from torch
    where Triton's Python has it, else from nvidia-smi."""
    try:
        import torch

        major, minor = torch.cuda.get_device_capability(device_id)
        return f"{major}{minor}"
    except ImportError:
        query = ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader", "-i"]
        found = subprocess.run(
            [*query, str(device_id)], capture_output=True, text=True, check=True, timeout=30
        )
        return found.stdout.strip().replace(".", "")


def open_session(path: Path, config: dict, parameters: dict, device_id: int = 0):
    """An ONNX Runtime session on ``path`` with the graph optimization level and thread count
    the config's parameters record (the packager takes them from the engine's manifest); for a
    GPU engine, on the CUDA provider of GPU ``device_id`` with the provider options its build
    recorded.

    Raises:
        RuntimeError: ONNX Runtime did not put the session on the CUDA provider (a CPU
            onnxruntime, or no GPU): serving a GPU engine on the CPU is refused, not done slowly.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, _LEVELS[parameters.get("graph_optimization_level", "all")]
    )
    options.intra_op_num_threads = intra_op_threads(config, parameters)
    # The server, the other models' processes and this one share the cores: threads that spin
    # while idle after each run would take them from the requests still being decoded and
    # tokenized. (A scheduling setting; the numbers are the same.)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if parameters.get(DEVICE_PARAMETER) != "cuda":
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    cuda = {**json.loads(parameters[CUDA_OPTIONS_PARAMETER]), "device_id": str(device_id)}
    session = ort.InferenceSession(str(path), options, providers=[("CUDAExecutionProvider", cuda)])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(
            f"{path}: ONNX Runtime {ort.__version__} runs it on {session.get_providers()[0]}, "
            "not the CUDA provider it was built for; install onnxruntime-gpu in Triton's Python"
        )
    return session


def intra_op_threads(config: dict, parameters: dict) -> int:
    """The engine's recorded thread count; else, with several instances (each a process of its
    own, running its own execute calls), each instance's share of the usable cores, so that
    instances running at once do not take more threads than there are cores; else 0 (ONNX
    Runtime's own choice: one per physical core)."""
    recorded = int(parameters.get("intra_op_thread_count", "0"))
    instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", []))
    if recorded or instances <= 1:
        return recorded
    # runtime/encoder.py usable_cores, repeated: bert-compiler is not installed here.
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity outside Linux
        cores = os.cpu_count() or 1
    return max(1, cores // instances)


def run_grouped(session, input_names, output_names, feeds, *, respond, fail) -> list:
    """One response per request's ``feeds``: requests whose inputs have the same shapes (one
    padded length) are concatenated and run once, their output rows split back.

    Args:
        respond: makes a response from one request's outputs (name -> array).
        fail: makes an error response from a message (the requests of a group ONNX Runtime
            refused get it; the other groups still run).
    """
    import numpy as np

    groups: dict[tuple, list[int]] = {}
    for index, request in enumerate(feeds):
        key = tuple(np.shape(request[name])[1:] for name in input_names)
        groups.setdefault(key, []).append(index)
    responses: list = [None] * len(feeds)
    for members in groups.values():
        batch = {
            name: np.ascontiguousarray(
                np.concatenate([feeds[i][name] for i in members]), dtype=np.int64
            )
            for name in input_names
        }
        try:
            outputs = session.run(output_names, batch)
        except Exception as err:  # ONNX Runtime's own error types; one group's requests fail
            for index in members:
                responses[index] = fail(f"ONNX Runtime refused the batch: {err}")
            continue
        rows = np.cumsum([len(feeds[i][input_names[0]]) for i in members])[:-1]
        pieces = [np.split(value, rows) for value in outputs]
        for position, index in enumerate(members):
            responses[index] = respond(
                {name: piece[position] for name, piece in zip(output_names, pieces, strict=True)}
            )
    return responses
