"""Triton Python-backend model that runs a CPU ONNX Runtime engine.

For Triton builds without the onnxruntime backend (`bert-compile package --python-cpu-engine`):
`package` copies this file verbatim to ``<model>-ort-cpu-<precision>-python/1/model.py`` beside
the engine's ``model.onnx``. The session is created with the graph optimization level and thread
count recorded in the config's parameters, which the packager takes from the engine's manifest.
Triton's Python environment needs numpy and ``onnxruntime``; nothing is imported from Triton or
ONNX Runtime until the model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

ENGINE_FILE = "model.onnx"
# The names engines/onnxruntime.py records; repeated here because this file runs inside Triton's
# Python, where bert-compiler is not installed.
_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _LEVELS[parameters.get("graph_optimization_level", "all")]
        )
        options.intra_op_num_threads = int(parameters.get("intra_op_thread_count", "0"))
        path = Path(args["model_repository"]) / args["model_version"] / ENGINE_FILE
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests):
        import numpy as np
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            feeds = {
                name: np.ascontiguousarray(
                    pb_utils.get_input_tensor_by_name(request, name).as_numpy(), dtype=np.int64
                )
                for name in self.input_names
            }
            outputs = self.session.run(self.output_names, feeds)
            tensors = [
                pb_utils.Tensor(name, value)
                for name, value in zip(self.output_names, outputs, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
