"""Untrusted ONNX files: external data containment, corrupt bytes, operators off the allowlist."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bert_compiler.core.errors import InputError
from bert_compiler.core.onnx_io import load_onnx


def _graph(node=None, initializer=None):
    node = node or helper.make_node("Add", ["x", "w"], ["y"])
    weight = initializer or numpy_helper.from_array(np.ones(4, dtype=np.float32), "w")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _with_external_location(tmp_path, location):
    model = _graph()
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value=location)
    weight.external_data.add(key="length", value="16")
    path = tmp_path / "model" / "m.onnx"
    path.parent.mkdir()
    path.write_bytes(model.SerializeToString())
    return path


def test_clean_graph_loads(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_graph(), str(path))
    assert load_onnx(path).graph.node[0].op_type == "Add"


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "sub/../../x", ""])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    (tmp_path / "x").write_bytes(b"\0" * 16)
    path = _with_external_location(tmp_path, location)
    with pytest.raises(InputError, match="outside the model's folder"):
        load_onnx(path)


def test_external_data_symlink_out_of_the_folder_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 16)
    path = _with_external_location(tmp_path, "weights.bin")
    os.symlink(secret, path.parent / "weights.bin")
    with pytest.raises(InputError, match="link out of the folder"):
        load_onnx(path)


def test_external_data_inside_the_folder_loads(tmp_path):
    path = _with_external_location(tmp_path, "weights.bin")
    (path.parent / "weights.bin").write_bytes(np.ones(4, dtype=np.float32).tobytes())
    model = load_onnx(path)
    assert numpy_helper.to_array(model.graph.initializer[0]).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (os.urandom(4096), "ONNX"),
        (b"\x08\x07\x12\x05torch\x3a\xff\xff\xff\x0f", "ONNX"),
    ],
)
def test_corrupt_bytes_are_a_user_error(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_onnx(path)


def test_truncated_graph_is_a_user_error(tmp_path):
    path = tmp_path / "m.onnx"
    data = _graph().SerializeToString()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        load_onnx(path)


def _loop_body():
    """A Loop body that passes its one loop variable through (iteration, condition, x)."""
    return helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["x_in"], ["x_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [4]),
        ],
    )


@pytest.mark.parametrize(
    "node",
    [
        helper.make_node("MyPlugin", ["x", "w"], ["y"], domain="trt.plugins"),
        helper.make_node("EPContext", ["x", "w"], ["y"], domain="com.microsoft"),
        helper.make_node(
            "If", ["x"], ["y"], then_branch=_graph().graph, else_branch=_graph().graph
        ),
        helper.make_node("Loop", ["", "", "x"], ["y"], body=_loop_body()),
    ],
    ids=["plugin", "EPContext", "If", "Loop"],
)
def test_operators_outside_the_allowlist_are_rejected(tmp_path, node):
    model = _graph(node=node)
    model.opset_import.append(helper.make_opsetid(node.domain, 1))
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match="outside the BERT allowlist"):
        load_onnx(path, check_ops=True)
