"""The hostile inputs of issue 6, one corpus: each case breaks something, runs the command a user
would, and must give one clear line with its exit code while the existing output tree stays
exactly as it was (no manifest changed, none added, no staging file left, no payload run)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from bert_compiler.calibration import datasets
from bert_compiler.cli.commands import cli
from bert_compiler.core.artifacts import StageRecord, sha256_file
from tests.conftest import cpu_engine_dir
from tests.core.test_onnx_io import _with_external_location
from tests.models.test_models import _pickle_only
from tests.tiny_models import edit_config

pytestmark = pytest.mark.e2e


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def external_data_outside(out, model, tmp):
    (tmp / "evil").mkdir()
    evil = _with_external_location(tmp / "evil", "../../etc/passwd")
    return ["simplify", "--input", evil, "--out", out], 3, "outside the model's folder"


def build_from_external_data_outside(out, model, tmp):
    (tmp / "evil").mkdir()
    evil = _with_external_location(tmp / "evil", "/etc/passwd")
    argv = ["build", "--model", model, "--out", out, "--target", "cpu", "--input", evil, "--force"]
    return argv, 3, "outside the model's folder"


def _engine_with_external_weights(out, tmp) -> Path:
    """The CPU engine rewritten with its weights in weights.bin, the manifest updated to match."""
    folder = cpu_engine_dir(out)
    graph = onnx.load(str(folder / "model.onnx"))
    onnx.save_model(
        graph, str(folder / "model.onnx"), save_as_external_data=True, location="weights.bin"
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["outputs"]["model.onnx"]["sha256"] = sha256_file(folder / "model.onnx")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def engine_external_data_hard_link(out, model, tmp):
    # The runtime's own check stops symlinks only: a hard link resolves inside the folder.
    folder = _engine_with_external_weights(out, tmp)
    outside = tmp / "outside.bin"
    (folder / "weights.bin").rename(outside)
    os.link(outside, folder / "weights.bin")
    argv = ["verify", "--model", model, "--out", out, "--engine", folder, "--force"]
    return argv, 3, "hard link"


def empty_calibration_data(out, model, tmp):
    data = tmp / "calibration.txt"
    data.write_text("\n\n")
    argv = ["calibrate", "--model", model, "--out", out, "--calibration-data", data]
    return argv, 3, "dataset file is empty"


def bit_flipped_engine(out, model, tmp):
    _flip_byte(cpu_engine_dir(out) / "model.onnx")
    return ["verify", "--model", model, "--out", out], 8, "does not match the manifest"


def truncated_stage_graph(out, model, tmp):
    graph = out / "export" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:2000])
    return ["simplify", "--out", out], 8, "truncated or modified"


def _reseal(manifest: dict) -> dict:
    """A manifest as the tool would have written it for these fields (its input_key matches)."""
    record = StageRecord(manifest["stage"], manifest["inputs"], manifest["spec"])
    return {**manifest, "input_key": record.input_key(manifest["versions"])}


def engine_for_another_gpu(out, model, tmp):
    folder = cpu_engine_dir(out)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["spec"]["session"]["device"] = "cuda"
    manifest["results"]["compute_capability"] = "7.0"
    (folder / "manifest.json").write_text(json.dumps(_reseal(manifest)))
    return ["verify", "--model", model, "--out", out], 6, "needs a CUDA GPU"


def edited_engine_manifest(out, model, tmp):
    folder = cpu_engine_dir(out)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["spec"]["session"]["intra_op_num_threads"] = 7
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return ["verify", "--model", model, "--out", out, "--force"], 8, "edited after it was written"


def edited_tool_versions(out, model, tmp):
    # Recorded versions that differ from the running ones: never up to date, never trusted.
    folder = cpu_engine_dir(out)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["versions"]["onnxruntime"] = "1.31.0"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    argv = ["package", "--model", model, "--out", out, "--repository", tmp / "repo"]
    return argv, 8, "edited after it was written"


def pickle_checkpoint(out, model, tmp):
    marker = tmp / "pwned"
    _pickle_only(model, marker)
    return ["run", "--model", model, "--out", out], 3, "pickle"


def remote_code(out, model, tmp):
    edit_config(model, auto_map={"AutoModel": "evil.Model"})
    return ["run", "--model", model, "--out", out], 4, "auto_map"


def absurd_profile(out, model, tmp):
    return (
        ["run", "--model", model, "--out", out, "--profile", "64x8:1x8:1x8"],
        3,
        "profile batch (64, 1, 1)",
    )


def config_of_the_wrong_type(out, model, tmp):
    config = tmp / "bad.toml"
    config.write_text('max-abs-err = "tiny"\n')
    return ["run", "--model", model, "--out", out, "--config", config], 3, "max-abs-err = 'tiny'"


def _packaged(out, model) -> Path:
    result = CliRunner().invoke(cli, ["package", "--model", str(model), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out / "triton"


def _gate(out, model, repository):
    return ["verify", "--model", model, "--out", out, "--repository", repository]


def tampered_repository(out, model, tmp):
    repository = _packaged(out, model)
    (repository / "stray-model").mkdir()
    return _gate(out, model, repository), 8, "stray"


def edited_config_with_its_hash_rewritten(out, model, tmp):
    # A config still valid for its engine, asking Triton for other settings than package chose.
    repository = _packaged(out, model)
    config = repository / f"{model.name}-ort-cpu-fp32" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 64", "max_batch_size: 8"))
    manifest = json.loads((repository / "manifest.json").read_text())
    manifest["outputs"][f"{model.name}-ort-cpu-fp32/config.pbtxt"]["sha256"] = sha256_file(config)
    (repository / "manifest.json").write_text(json.dumps(manifest))
    return _gate(out, model, repository), 8, "not the config package writes"


def edited_length_ladder_with_its_hash_rewritten(out, model, tmp):
    # Every request padded to 128: valid for the engine, not the ladder package sealed.
    repository = _packaged(out, model)
    config = repository / f"{model.name}-tokenizer" / "config.pbtxt"
    text = config.read_text()
    start = text.index('string_value: "', text.index('key: "length_ladder"'))
    end = text.index('"', start + len('string_value: "'))
    config.write_text(text[:start] + 'string_value: "128' + text[end:])
    manifest = json.loads((repository / "manifest.json").read_text())
    manifest["outputs"][f"{model.name}-tokenizer/config.pbtxt"]["sha256"] = sha256_file(config)
    (repository / "manifest.json").write_text(json.dumps(manifest))
    return _gate(out, model, repository), 8, "not the config package writes"


def extra_version_listed_in_the_manifest(out, model, tmp):
    # A version 2 with another engine, added to the manifest's outputs: Triton would serve it.
    repository = _packaged(out, model)
    engine = f"{model.name}-ort-cpu-fp32"
    (repository / engine / "2").mkdir()
    shutil.copyfile(
        repository / engine / "1" / "model.onnx", repository / engine / "2" / "model.onnx"
    )
    manifest = json.loads((repository / "manifest.json").read_text())
    manifest["outputs"][f"{engine}/2/model.onnx"] = dict(
        manifest["outputs"][f"{engine}/1/model.onnx"]
    )
    (repository / "manifest.json").write_text(json.dumps(manifest))
    return _gate(out, model, repository), 8, "not a file package writes"


def renamed_engine_record(out, model, tmp):
    repository = _packaged(out, model)
    manifest = json.loads((repository / "manifest.json").read_text())
    record = manifest["results"]["models"][f"{model.name}-ort-cpu-fp32"]["files"]["1/model.onnx"]
    record["engine"] = "renamed"
    (repository / "manifest.json").write_text(json.dumps(manifest))
    return _gate(out, model, repository), 8, "were edited"


def version_folder_linked_in(out, model, tmp):
    # Triton would load version 2 and run the model.py it finds there.
    repository = _packaged(out, model)
    (tmp / "elsewhere").mkdir()
    (tmp / "elsewhere" / "model.py").write_text("import os; os.system('touch pwned')\n")
    (repository / f"{model.name}-tokenizer" / "2").symlink_to(tmp / "elsewhere")
    return _gate(out, model, repository), 8, "a link inside a Triton repository"


def empty_version_folder(out, model, tmp):
    repository = _packaged(out, model)
    (repository / f"{model.name}-tokenizer" / "2").mkdir()
    return _gate(out, model, repository), 8, "a folder bert-compile package did not write"


def hard_linked_repository_file(out, model, tmp):
    repository = _packaged(out, model)
    script = repository / f"{model.name}-tokenizer" / "1" / "model.py"
    os.link(script, tmp / "same-inode.py")
    return _gate(out, model, repository), 8, "a hard link inside a Triton repository"


# calibrate --sweep: the selection split is read through before the first export, with the
# strict reader (its errors name the user's file and line, never a scratch copy), and a copy of
# STS-B dev in another order or with other bytes is still STS-B dev.
def _sweep(out, model, selection=None, *extra):
    argv = ["calibrate", "--sweep", "--model", model, "--out", out, "--no-sweep-peers"]
    return argv + (["--sweep-selection-data", selection] if selection else []) + list(extra)


def _selection(tmp, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def sweep_selection_empty(out, model, tmp):
    return (
        _sweep(out, model, _selection(tmp, "empty.tsv", b"")),
        3,
        "empty.tsv: dataset file is empty",
    )


def sweep_selection_binary(out, model, tmp):
    data = b"\xff\xfe" + bytes(range(256)) * 8
    return _sweep(out, model, _selection(tmp, "bin.tsv", data)), 3, "bin.tsv:1: not valid UTF-8"


def sweep_selection_crlf(out, model, tmp):
    data = datasets.STSB_SELECTION.read_bytes().replace(b"\n", b"\r\n")
    return _sweep(out, model, _selection(tmp, "crlf.tsv", data)), 3, "crlf.tsv:1: CRLF"


def sweep_selection_without_score(out, model, tmp):
    data = b"sentence1\tsentence2\na\tb\n"
    return _sweep(out, model, _selection(tmp, "two.tsv", data)), 3, "two.tsv:1: header"


def sweep_selection_reordered_dev(out, model, tmp):
    header, *rows = datasets.STSB_DEV.read_bytes().splitlines(keepends=True)
    data = header + b"".join(reversed(rows))
    selection = _selection(tmp, "dev.tsv", data)
    return _sweep(out, model, selection), 3, "1500 of its 1500 pairs (the first at line 2) are STS"


def sweep_selection_one_score(out, model, tmp):
    data = b"sentence1\tsentence2\tscore\na b\tc d\t2.5\ne f\tg h\t2.5\n"
    return _sweep(out, model, _selection(tmp, "flat.tsv", data)), 3, "1 distinct score(s)"


def sweep_with_calibrate_flags_it_ignores(out, model, tmp):
    argv = _sweep(out, model, None, "--format", "fp8", "--weight-granularity", "tensor")
    return argv, 3, "--weight-granularity, --format: calibrate --sweep does not read them"


def sweep_flags_without_sweep(out, model, tmp):
    argv = ["calibrate", "--model", model, "--out", out, "--sweep-formats", "fp8", "--force"]
    return argv, 3, "--sweep-formats: only read by calibrate --sweep"


def sweep_dynamic_without_int8_rows(out, model, tmp):
    argv = ["calibrate", "--sweep", "--model", model, "--out", out, "--sweep-formats", "fp8"]
    return argv + ["--sweep-dynamic", "all"], 3, "--sweep-formats fp8 sweeps no INT8 rows"


def ladder_rungs_without_a_ladder(out, model, tmp):
    argv = ["package", "--model", model, "--out", out, "--repository", tmp / "repo"]
    return argv + ["--tokenizer-padding", "request", "--ladder-rungs", "4"], 3, "no length ladder"


# bench: its text and engine folders, read before anything is timed.
def _bench(out, model, *extra):
    return ["bench", "--model", model, "--out", out, "--no-peers", "--rounds", "1", *extra]


def bench_data_crlf(out, model, tmp):
    data = _selection(tmp, "crlf.tsv", b"sentence\r\nhello\r\n")
    return _bench(out, model, "--data", data), 3, "crlf.tsv:1: CRLF line ending"


def bench_data_bom(out, model, tmp):
    data = _selection(tmp, "bom.tsv", b"\xef\xbb\xbfsentence\nhello\n")
    return _bench(out, model, "--data", data), 3, "bom.tsv:1: file starts with a UTF-8 byte-order"


def bench_data_not_utf8(out, model, tmp):
    data = _selection(tmp, "latin1.txt", "caf\u00e9\n".encode("latin-1"))
    return _bench(out, model, "--data", data), 3, "latin1.txt:1: not valid UTF-8 at byte 3"


def bench_data_ten_megabyte_line(out, model, tmp):
    data = _selection(tmp, "long.tsv", b"sentence\n" + b"word " * 2_000_000 + b"\n")
    return _bench(out, model, "--data", data), 3, "long.tsv:2: line is over the 1048576-byte"


def bench_data_without_its_column(out, model, tmp):
    data = _selection(tmp, "cols.tsv", b"text\nhello\n")
    return _bench(out, model, "--data", data), 3, "cols.tsv:1: header ['text'] lacks column"


def bench_data_empty(out, model, tmp):
    data = _selection(tmp, "empty.jsonl", b"\n\n")
    return _bench(out, model, "--data", data), 3, "empty.jsonl: dataset file is empty"


def bench_pair_column_of_a_single_text_model(out, model, tmp):
    data = _selection(tmp, "pairs.tsv", b"sentence\tother\na\tb\n")
    argv = _bench(out, model, "--data", data, "--data-pair-column", "other")
    return argv, 3, "--data-pair-column 'other': tiny-embed reads single texts"


def bench_data_column_without_data(out, model, tmp):
    argv = _bench(out, model, "--data-column", "text")
    return argv, 3, "--data-column: name columns of --data FILE"


def _engine_copy(out, tmp) -> Path:
    copy = tmp / "engine-copy"
    shutil.copytree(cpu_engine_dir(out), copy)
    return copy


def bench_engine_without_manifest(out, model, tmp):
    copy = _engine_copy(out, tmp)
    (copy / "manifest.json").unlink()
    return _bench(out, model, "--engine", copy), 8, "engine-copy: no complete artifact here"


def bench_engine_tampered(out, model, tmp):
    copy = _engine_copy(out, tmp)
    _flip_byte(copy / "model.onnx")
    return _bench(out, model, "--engine", copy), 8, "does not match the manifest"


def bench_engine_folder_of_another_stage(out, model, tmp):
    argv = _bench(out, model, "--engine", out / "export")
    return argv, 8, "not an engine folder this tool built"


def _qdq_graph(out, tmp, fmt: str) -> Path:
    """The simplified graph with Q/DQ of ``fmt`` on every MatMul (ranges of 1: only the nodes'
    types matter here), as a calibrated graph given with --input."""
    from bert_compiler.calibration.qdq import insert_qdq, quantizable_matmuls

    graph = onnx.load(str(out / "simplify" / "model.onnx"))
    amax = {t.activation: 1.0 for t in quantizable_matmuls(graph)}
    quantized, _ = insert_qdq(graph, amax, format=fmt)
    path = tmp / f"calibrated-{fmt}" / "model.onnx"
    path.parent.mkdir()
    onnx.save(quantized, str(path))
    return path


def float_engine_from_a_calibrated_graph(out, model, tmp):
    source = _qdq_graph(out, tmp, "int8")
    argv = ["build", "--model", model, "--out", out, "--target", "cpu", "--input", source]
    return (
        argv + ["--precision", "fp32", "--force"],
        3,
        "holds INT8 Q/DQ nodes (a calibrated graph)",
    )


def int8_engine_from_the_fp8_graph(out, model, tmp):
    source = _qdq_graph(out, tmp, "fp8")
    argv = ["build", "--model", model, "--out", out, "--target", "cpu", "--input", source]
    return (
        argv + ["--precision", "int8"],
        3,
        "holds FLOAT8E4M3FN Q/DQ nodes (calibrate --format fp8)",
    )


def package_an_engine_verified_at_another_precision(out, model, tmp):
    # verify --precision int8 passes an fp32 engine at int8's looser tolerances.
    engine = cpu_engine_dir(out)
    argv = ["verify", "--model", model, "--out", out, "--engine", engine, "--precision", "int8"]
    gates = ["--no-metric-gate", "--metric-limit", "40", "--quiet"]
    verified = CliRunner().invoke(cli, [str(a) for a in argv + gates])
    assert verified.exit_code == 0, verified.output
    argv = ["package", "--model", model, "--out", out, "--repository", tmp / "repo"]
    return argv, 3, "verified with int8 tolerances, not its own fp32 ones"


def _victim(tmp: Path) -> Path:
    victim = tmp / "victim.txt"
    victim.write_text("a user's file\n")
    return victim


def lock_file_linked_out(out, model, tmp):
    # The lock opens its file with O_TRUNC: through a planted link, a file outside OUT. (The
    # shared run's tree may hold the lock file an earlier command left, as locks do.)
    (out / ".bert-compile.lock").unlink(missing_ok=True)
    (out / ".bert-compile.lock").symlink_to(_victim(tmp))
    return ["export", "--model", model, "--out", out, "--force"], 3, "where bert-compile keeps"


def lock_holder_linked_out(out, model, tmp):
    (out / ".bert-compile.lock.json").unlink(missing_ok=True)
    (out / ".bert-compile.lock.json").symlink_to(_victim(tmp))
    return ["export", "--model", model, "--out", out, "--force"], 3, "a link where bert-compile"


def config_on_dev_zero(out, model, tmp):
    # /dev/zero reports a size of 0 and never ends: its size is not trusted.
    return ["export", "--model", model, "--out", out, "--config", "/dev/zero"], 3, "not a regular"


def config_on_a_fifo(out, model, tmp):
    fifo = tmp / "config.toml"
    os.mkfifo(fifo)  # nobody writes it: a blocking open would hang
    return ["export", "--model", model, "--out", out, "--config", fifo], 3, "not a regular file"


def config_is_a_folder(out, model, tmp):
    return ["export", "--model", model, "--out", out, "--config", tmp], 3, "not a regular file"


def config_nested_too_deeply(out, model, tmp):
    config = tmp / "deep.toml"
    config.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    return ["export", "--model", model, "--out", out, "--config", config], 3, "nested too deeply"


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


def _export(out, model) -> list:
    return ["export", "--model", model, "--out", out, "--force"]


def config_pad_id_past_the_vocabulary(out, model, tmp):
    _edit_json(model / "config.json", pad_token_id=10**9)
    return _export(out, model), 3, "pad_token_id=1000000000: give null or an id in [0,"


def config_layer_norm_eps_of_text(out, model, tmp):
    _edit_json(model / "config.json", layer_norm_eps="small")
    return _export(out, model), 3, "layer_norm_eps='small': give a number in (0, 0.1]"


def config_layer_norm_eps_nan(out, model, tmp):
    _edit_json(model / "config.json", layer_norm_eps=float("nan"))  # json writes NaN
    return _export(out, model), 3, "layer_norm_eps=nan: give a number"


def config_unknown_activation(out, model, tmp):
    _edit_json(model / "config.json", hidden_act="swish2")
    return _export(out, model), 4, "hidden_act='swish2' is not supported"


def config_label_map_of_the_wrong_type(out, model, tmp):
    _edit_json(model / "config.json", id2label=["negative", "positive"])
    return _export(out, model), 3, "id2label is not a map of ids to names"


def config_of_a_quantized_checkpoint(out, model, tmp):
    _edit_json(model / "config.json", quantization_config={"quant_method": "bitsandbytes"})
    return _export(out, model), 4, "has a quantization_config"


def tokenizer_class_of_another_model(out, model, tmp):
    _edit_json(model / "tokenizer_config.json", tokenizer_class="FooTokenizer")
    return _export(out, model), 3, "gives no token_type_ids, which bert reads"


def tokenizer_max_length_of_text(out, model, tmp):
    _edit_json(model / "tokenizer_config.json", model_max_length="long")
    return _export(out, model), 3, "model_max_length='long': give a positive integer"


def safetensors_shape_past_its_bytes(out, model, tmp):
    from tests.models.test_models import _first_tensor, _rewrite_header

    _rewrite_header(
        model / "model.safetensors", lambda h: h[_first_tensor(h)].update(shape=[10**6])
    )
    return _export(out, model), 3, "bytes) but spans"


def integer_weight_tensor(out, model, tmp):
    import torch

    from tests.models.test_models import _rewrite_weights

    name = "encoder.layer.0.output.dense.bias"
    _rewrite_weights(model, lambda state: state.update({name: state[name].to(torch.int32)}))
    return _export(out, model), 4, "is I32: weights must be floating point"


def dense_module_after_normalize(out, model, tmp):
    modules = json.loads((model / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "x.models.Dense"})
    (model / "modules.json").write_text(json.dumps(modules))
    return _export(out, model), 4, "modules run as Transformer Pooling Normalize Dense; the"


def dense_module_without_weights(out, model, tmp):
    modules = json.loads((model / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "x.models.Dense"})
    (model / "modules.json").write_text(json.dumps(modules))
    (model / "2_Dense").mkdir()
    (model / "2_Dense" / "config.json").write_text('{"in_features": 32, "out_features": 8}')
    return _export(out, model), 3, "the Dense module has no model.safetensors"


def pooling_settings_of_the_wrong_type(out, model, tmp):
    (model / "1_Pooling" / "config.json").write_text('"mean"')
    return _export(out, model), 3, "expected a JSON object of pooling settings"


def engine_of_another_model(out, model, tmp):
    import torch

    from tests.models.test_models import _rewrite_weights

    name = "encoder.layer.0.output.dense.bias"
    _rewrite_weights(model, lambda state: state.update({name: state[name] + torch.ones(1)}))
    argv = ["verify", "--model", model, "--out", out, "--engine", cpu_engine_dir(out), "--force"]
    return argv, 3, "built from the model in"


def calibration_data_on_a_fifo(out, model, tmp):
    fifo = tmp / "calibration.txt"
    os.mkfifo(fifo)  # nobody writes it: a blocking open would hang
    argv = ["calibrate", "--model", model, "--out", out, "--calibration-data", fifo]
    return argv, 3, "not a regular file"


def bench_data_on_dev_zero(out, model, tmp):
    endless = tmp / "sentences.txt"
    endless.symlink_to("/dev/zero")  # a data file's name, an endless device behind it
    argv = ["bench", "--model", model, "--out", out, "--data", endless, "--no-peers"]
    return argv, 3, "not a regular file"


def parity_data_is_a_folder(out, model, tmp):
    argv = ["verify", "--model", model, "--out", out, "--parity-data", tmp, "--force"]
    return argv, 3, "not a regular file"


def model_config_is_a_fifo(out, model, tmp):
    (model / "config.json").unlink()
    os.mkfifo(model / "config.json")  # nobody writes it: a blocking read would hang
    return _export(out, model), 3, "config.json: not a regular file"


def tokenizer_json_is_a_fifo(out, model, tmp):
    (model / "tokenizer.json").unlink()
    os.mkfifo(model / "tokenizer.json")  # transformers would block reading it
    return _export(out, model), 3, "tokenizer.json: not a regular file"


def tokenizer_config_on_dev_zero(out, model, tmp):
    (model / "tokenizer_config.json").unlink()
    (model / "tokenizer_config.json").symlink_to("/dev/zero")
    return _export(out, model), 3, "tokenizer_config.json: not a regular file"


def pt_weights_only(out, model, tmp):
    # A folder whose only weights are a pickle under another name than pytorch_model.bin: not
    # loaded (a pickle can run code), and the message says what is looked for.
    _pickle_only(model, tmp / "pwned")
    (model / "pytorch_model.bin").rename(model / "model.pt")
    return _export(out, model), 3, "no model.safetensors (or pytorch_model.bin)"


def stage_input_with_a_control_flow_op(out, model, tmp):
    from onnx import helper

    from tests.core.test_onnx_io import _graph

    node = helper.make_node(
        "If", ["x"], ["y"], then_branch=_graph().graph, else_branch=_graph().graph
    )
    path = tmp / "if.onnx"
    path.write_bytes(_graph(node=node).SerializeToString())
    return ["simplify", "--input", path, "--out", out], 3, "ai.onnx::If, which is outside the BERT"


def sentence_transformers_modules_is_a_folder(out, model, tmp):
    (model / "modules.json").unlink()
    (model / "modules.json").mkdir()
    return _export(out, model), 3, "modules.json: not a regular file"


CASES = [
    lock_file_linked_out,
    lock_holder_linked_out,
    config_on_dev_zero,
    config_on_a_fifo,
    config_is_a_folder,
    config_nested_too_deeply,
    external_data_outside,
    build_from_external_data_outside,
    empty_calibration_data,
    bit_flipped_engine,
    truncated_stage_graph,
    engine_for_another_gpu,
    engine_external_data_hard_link,
    edited_engine_manifest,
    edited_tool_versions,
    pickle_checkpoint,
    remote_code,
    absurd_profile,
    config_of_the_wrong_type,
    tampered_repository,
    edited_config_with_its_hash_rewritten,
    edited_length_ladder_with_its_hash_rewritten,
    extra_version_listed_in_the_manifest,
    renamed_engine_record,
    version_folder_linked_in,
    empty_version_folder,
    hard_linked_repository_file,
    sweep_selection_empty,
    sweep_selection_binary,
    sweep_selection_crlf,
    sweep_selection_without_score,
    sweep_selection_reordered_dev,
    sweep_selection_one_score,
    sweep_with_calibrate_flags_it_ignores,
    sweep_flags_without_sweep,
    sweep_dynamic_without_int8_rows,
    ladder_rungs_without_a_ladder,
    bench_data_crlf,
    bench_data_bom,
    bench_data_not_utf8,
    bench_data_ten_megabyte_line,
    bench_data_without_its_column,
    bench_data_empty,
    bench_pair_column_of_a_single_text_model,
    bench_data_column_without_data,
    bench_engine_without_manifest,
    bench_engine_tampered,
    bench_engine_folder_of_another_stage,
    float_engine_from_a_calibrated_graph,
    int8_engine_from_the_fp8_graph,
    package_an_engine_verified_at_another_precision,
    config_pad_id_past_the_vocabulary,
    config_layer_norm_eps_of_text,
    config_layer_norm_eps_nan,
    config_unknown_activation,
    config_label_map_of_the_wrong_type,
    config_of_a_quantized_checkpoint,
    tokenizer_class_of_another_model,
    tokenizer_max_length_of_text,
    safetensors_shape_past_its_bytes,
    integer_weight_tensor,
    dense_module_after_normalize,
    dense_module_without_weights,
    pooling_settings_of_the_wrong_type,
    engine_of_another_model,
    calibration_data_on_a_fifo,
    bench_data_on_dev_zero,
    parity_data_is_a_folder,
    model_config_is_a_fifo,
    sentence_transformers_modules_is_a_folder,
    tokenizer_json_is_a_fifo,
    tokenizer_config_on_dev_zero,
    pt_weights_only,
    stage_input_with_a_control_flow_op,
]


# Every hostile case run, by name: conftest.py prints the corpus' size at the end of the session.
TRIED: list[str] = []


def _manifests(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("manifest.json")}


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_hostile_input_gives_one_line_and_leaves_the_tree_intact(
    case, tiny_run, tiny_embedding_model, tmp_path
):
    out = tmp_path / "out"
    shutil.copytree(tiny_run[1], out)
    # A private copy under the same name: the tree's engines and reports are this model's.
    model = tmp_path / tiny_embedding_model.name
    shutil.copytree(tiny_embedding_model, model)
    TRIED.append(case.__name__)
    argv, code, message = case(out, model, tmp_path)
    before = _manifests(out)
    result = CliRunner().invoke(cli, [str(a) for a in argv])
    assert result.exit_code == code, result.output
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert _manifests(out) == before
    assert not [p for p in out.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not (tmp_path / "pwned").exists()
    victim = tmp_path / "victim.txt"
    assert not victim.exists() or victim.read_text() == "a user's file\n"


def test_replaced_external_weights_are_a_new_input(tiny_run, tmp_path):
    """The up-to-date check hashes the external-data files a graph names, not only the graph."""
    graph = onnx.load(str(tiny_run[1] / "export" / "model.onnx"))
    source = tmp_path / "m" / "m.onnx"
    source.parent.mkdir()
    onnx.save_model(
        graph, str(source), save_as_external_data=True, location="weights.bin", size_threshold=0
    )
    argv = ["simplify", "--input", str(source), "--out", str(tmp_path / "out"), "--json"]
    first = CliRunner().invoke(cli, argv)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout.splitlines()[-1])["skipped"] is False
    again = CliRunner().invoke(cli, argv)
    assert json.loads(again.stdout.splitlines()[-1])["skipped"] is True
    # Another model's weights of the same shapes beside the same graph file.
    graph = onnx.load(str(tiny_run[1] / "export" / "model.onnx"))
    for tensor in graph.graph.initializer:
        values = onnx.numpy_helper.to_array(tensor)
        if values.dtype.kind == "f":
            tensor.CopyFrom(onnx.numpy_helper.from_array(values * 1.01, tensor.name))
    other = tmp_path / "other" / "m.onnx"
    other.parent.mkdir()
    onnx.save_model(
        graph, str(other), save_as_external_data=True, location="weights.bin", size_threshold=0
    )
    shutil.copyfile(other.parent / "weights.bin", source.parent / "weights.bin")
    assert source.read_bytes() == other.read_bytes()
    replaced = CliRunner().invoke(cli, argv)
    assert replaced.exit_code == 0, replaced.output
    assert json.loads(replaced.stdout.splitlines()[-1])["skipped"] is False


def test_a_long_position_table_verifies_with_bounded_edge_rows(tmp_path):
    """max_position_embeddings 65536 is allowed; verify's longest edge row stays small."""
    from bert_compiler.models.loading import load_tokenizer, resolve_model
    from bert_compiler.runtime.text import EDGE_ROW_MAX_WORDS, parity_batches, tokenize
    from tests.tiny_models import make_tiny_model

    folder = make_tiny_model(tmp_path / "long", config_overrides={"max_position_embeddings": 65536})
    info = resolve_model(folder)
    tokenizer = load_tokenizer(info)
    batches = parity_batches(["a few real words here"] * 4, max_length=info.max_length)
    longest = max(
        tokenize(tokenizer, b, info, info.max_length)["input_ids"].shape[1] for b in batches
    )
    # The tiny vocabulary spells words letter by letter: a few tokens per word, never 65536.
    assert EDGE_ROW_MAX_WORDS < longest < 8 * EDGE_ROW_MAX_WORDS
    argv = ["run", "--model", folder, "--out", tmp_path / "out", "--target", "cpu"]
    result = CliRunner().invoke(
        cli, [str(a) for a in argv + ["--metric-limit", "40", "--no-metric-gate", "--no-package"]]
    )
    assert result.exit_code == 0, result.output


def test_running_out_of_memory_in_verify_is_one_line(tiny_run, tmp_path, monkeypatch):
    from bert_compiler.stages import verify

    out = tmp_path / "out"
    shutil.copytree(tiny_run[1], out)

    def exhausted(**_kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 12 GB.")

    monkeypatch.setattr(verify, "run_verification", exhausted)
    argv = ["verify", "--model", tiny_run[0].path, "--out", out, "--force", "--quiet"]
    result = CliRunner().invoke(cli, [str(a) for a in argv])
    assert result.exit_code == 6, result.output
    assert "verify ran out of memory (DefaultCPUAllocator" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
