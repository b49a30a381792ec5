"""Model folders, friendly and hostile: validated before any weights are allocated."""

from __future__ import annotations

import json
import struct

import pytest

from bert_compiler.core.errors import InputError, UnsupportedModelError
from bert_compiler.models.loading import load_tokenizer, load_torch_model, resolve_model
from tests.tiny_models import edit_config


def test_default_model_resolves_to_the_packaged_minilm():
    info = resolve_model("default")
    assert info.name == "all-MiniLM-L6-v2"
    assert info.task == "sentence-embedding"
    assert (info.pooling, info.normalize) == ("mean", True)
    assert info.max_length == 256  # sentence_bert_config.json, not the 512 positions
    assert info.weights.name == "model.safetensors"


def test_tiny_model_tasks(tiny_embedding_model, tiny_classifier_model):
    assert resolve_model(tiny_embedding_model).task == "sentence-embedding"
    classifier = resolve_model(tiny_classifier_model)
    assert (classifier.task, classifier.num_labels, classifier.pooling) == (
        "sequence-classification",
        2,
        None,
    )
    plain = resolve_model(tiny_embedding_model, task="feature-extraction")
    assert (plain.pooling, plain.normalize) == (None, False)


def test_missing_model_folder(tmp_path):
    with pytest.raises(InputError, match="no such local folder"):
        resolve_model(tmp_path / "absent")


def test_folder_without_config(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        resolve_model(tmp_path)


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        (
            {"model_type": "gpt2"},
            UnsupportedModelError,
            "unsupported architecture model_type='gpt2'",
        ),
        ({"auto_map": {"AutoModel": "x.Model"}}, UnsupportedModelError, "auto_map"),
        ({"vocab_size": 0}, UnsupportedModelError, "vocab_size=0"),
        ({"max_position_embeddings": 10**9}, UnsupportedModelError, "max_position_embeddings"),
        ({"num_hidden_layers": 10000}, UnsupportedModelError, "num_hidden_layers=10000"),
        ({"num_attention_heads": 5}, UnsupportedModelError, "not divisible"),
        ({"hidden_size": "32"}, UnsupportedModelError, "hidden_size='32'"),
        ({"position_embedding_type": "relative_key"}, UnsupportedModelError, "relative_key"),
        ({"vocab_size": None}, InputError, "has no 'vocab_size'"),
    ],
)
def test_hostile_configs_are_refused_before_loading(tiny_model_copy, changes, error, message):
    edit_config(tiny_model_copy, **changes)
    with pytest.raises(error) as caught:
        resolve_model(tiny_model_copy)
    assert message in str(caught.value)
    assert "config.json" in str(caught.value)


def test_config_that_is_not_json(tiny_model_copy):
    (tiny_model_copy / "config.json").write_bytes(b"\xff{not json")
    with pytest.raises(InputError, match="not valid UTF-8 JSON"):
        resolve_model(tiny_model_copy)


def _header_length(path):
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_truncated_safetensors(tiny_model_copy):
    weights = tiny_model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(InputError, match="outside the file"):
        resolve_model(tiny_model_copy)


def test_safetensors_header_longer_than_file(tiny_model_copy):
    weights = tiny_model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    with pytest.raises(InputError, match="header claims"):
        resolve_model(tiny_model_copy)


def test_safetensors_offsets_out_of_range(tiny_model_copy):
    weights = tiny_model_copy / "model.safetensors"
    data = weights.read_bytes()
    length = _header_length(weights)
    header = json.loads(data[8 : 8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, 10**12]
    encoded = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])
    with pytest.raises(InputError, match=f"tensor '{name}'"):
        resolve_model(tiny_model_copy)


def test_weights_not_matching_config_are_refused(tiny_model_copy):
    edit_config(tiny_model_copy, intermediate_size=40)  # the file's FFN tensors are 37 wide
    info = resolve_model(tiny_model_copy)
    with pytest.raises(InputError, match=r"\(0 missing, 6 mis-shaped") as err:
        load_torch_model(info)
    assert "intermediate.dense.bias [37] in the file, [40] by config.json" in str(err.value)
    assert "report" not in str(err.value)


class _Exploit:
    """A pickle payload that would create a marker file when unpickled unsafely."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickle_only(folder, marker=None):
    import torch
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    if marker is not None:
        state["exploit"] = _Exploit(marker)
    torch.save(state, folder / "pytorch_model.bin")


def test_pickle_checkpoint_is_refused_by_default(tiny_model_copy, tmp_path):
    marker = tmp_path / "pwned"
    _pickle_only(tiny_model_copy, marker)
    with pytest.raises(InputError, match="--allow-pickle"):
        resolve_model(tiny_model_copy)
    assert not marker.exists()


def test_allowed_pickle_still_runs_no_code(tiny_model_copy, tmp_path):
    marker = tmp_path / "pwned"
    _pickle_only(tiny_model_copy, marker)
    info = resolve_model(tiny_model_copy, allow_pickle=True)
    assert info.weights.name == "pytorch_model.bin"
    with pytest.raises(InputError):  # weights_only=True refuses the payload
        load_torch_model(info)
    assert not marker.exists()


def test_allowed_pickle_loads_plain_weights(tiny_model_copy):
    """The pickle's tensors are the model's, value for value (the same ones the safetensors
    file held), not a randomly initialised model of the right shape."""
    from safetensors.torch import load_file

    saved = load_file(str(tiny_model_copy / "model.safetensors"))
    _pickle_only(tiny_model_copy)
    model = load_torch_model(resolve_model(tiny_model_copy, allow_pickle=True))
    state = model.state_dict()
    compared = [name for name in saved if name in state]
    assert len(compared) >= len(state) - 2  # all but an unused pooler or a buffer
    for name in compared:
        assert state[name].equal(saved[name]), name


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    from tests.tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-roberta", model_type="roberta")


def test_roberta_positions_start_after_the_padding_index(tiny_roberta):
    info = resolve_model(tiny_roberta)
    # 130 position rows, the first pad_token_id + 1 = 2 never a token's: 128 tokens at most.
    assert (info.config["max_position_embeddings"], info.max_length) == (130, 128)
    assert info.architecture.input_names == ("input_ids", "attention_mask")
    from bert_compiler.runtime.text import resolve_max_length

    assert resolve_max_length(info, 128) == 128
    with pytest.raises(InputError, match="between 2 and 128"):
        resolve_max_length(info, 129)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"pad_token_id": None}, "has no 'pad_token_id'"),
        ({"pad_token_id": -1}, "pad_token_id=-1"),
        ({"pad_token_id": 100_000}, "pad_token_id 100000 is not below vocab_size"),
        ({"max_position_embeddings": 3}, "leaves 1 token positions for roberta"),
    ],
)
def test_hostile_roberta_configs_are_refused(tiny_roberta, tmp_path, changes, message):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_roberta, folder)
    edit_config(folder, **changes)
    with pytest.raises((InputError, UnsupportedModelError)) as caught:
        resolve_model(folder)
    assert message in str(caught.value) and "config.json" in str(caught.value)


def test_roberta_rows_are_padded_with_its_pad_id_everywhere(tiny_roberta):
    from bert_compiler.models.loading import load_tokenizer
    from bert_compiler.runtime.text import tokenize
    from bert_compiler.runtime.tokenizing import tokenize_rows

    info = resolve_model(tiny_roberta)
    tokenizer = load_tokenizer(info)
    assert tokenizer.pad_token_id == info.config["pad_token_id"] == 1
    texts = ["a", "a longer sentence"]
    feeds = tokenize(tokenizer, texts, info, info.max_length)
    mask = feeds["attention_mask"]
    assert set(feeds) == {"input_ids", "attention_mask"}
    assert (feeds["input_ids"][mask == 0] == 1).all() and (mask == 0).any()
    rows = tokenize_rows(tokenizer, texts, info, info.max_length)
    matrices = rows.matrices(info.architecture.input_names, tokenizer.pad_token_id)
    for name, matrix in matrices.items():
        assert (matrix == feeds[name]).all(), name


@pytest.fixture(scope="module")
def tiny_distilbert(tmp_path_factory):
    from tests.tiny_models import make_tiny_model

    folder = tmp_path_factory.mktemp("models") / "tiny-distilbert"
    return make_tiny_model(folder, model_type="distilbert")


def test_distilbert_config_is_read_under_berts_names(tiny_distilbert):
    info = resolve_model(tiny_distilbert)
    assert "hidden_size" not in json.loads((tiny_distilbert / "config.json").read_text())
    assert (info.hidden_size, info.num_layers, info.num_heads) == (32, 2, 2)
    assert (info.config["intermediate_size"], info.config["type_vocab_size"]) == (37, 0)
    assert info.architecture.input_names == ("input_ids", "attention_mask")
    assert info.max_length == 128  # positions from 0, as BERT's


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dim": None}, "has no 'dim'"),
        ({"n_layers": 10000}, "n_layers=10000 is outside"),
        ({"n_heads": 5}, "dim 32 is not divisible by n_heads 5"),
    ],
)
def test_hostile_distilbert_configs_name_its_own_keys(tiny_distilbert, tmp_path, changes, message):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_distilbert, folder)
    edit_config(folder, **changes)
    with pytest.raises((InputError, UnsupportedModelError)) as caught:
        resolve_model(folder)
    assert message in str(caught.value) and "config.json" in str(caught.value)


def test_electra_embedding_size_is_bounded_before_loading(tmp_path):
    from tests.tiny_models import make_tiny_model

    folder = make_tiny_model(tmp_path / "electra", model_type="electra")
    assert resolve_model(folder).config["embedding_size"] == 24  # projected to hidden_size 32
    edit_config(folder, embedding_size=10**9)
    with pytest.raises(UnsupportedModelError, match="config.json embedding_size=1000000000"):
        resolve_model(folder)


def test_mpnet_positions_and_bucket_count_are_checked_before_loading(tmp_path):
    from tests.tiny_models import make_tiny_model

    folder = make_tiny_model(tmp_path / "mpnet", model_type="mpnet")
    info = resolve_model(folder)
    assert (info.max_length, info.config["type_vocab_size"]) == (128, 0)  # 130 rows, from 2
    edit_config(folder, relative_attention_num_buckets=16)
    with pytest.raises(UnsupportedModelError, match="relative_attention_num_buckets=16"):
        resolve_model(folder)


def _rewrite_weights(folder, change) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    change(state)
    save_file(state, str(folder / "model.safetensors"))


def test_a_missing_tensor_is_one_line_naming_it(tiny_model_copy):
    name = "encoder.layer.0.output.dense.weight"
    _rewrite_weights(tiny_model_copy, lambda state: state.pop(name))
    with pytest.raises(InputError, match=rf"1 missing, 0 mis-shaped tensors, e\.g\. {name}"):
        load_torch_model(resolve_model(tiny_model_copy))


def test_extra_tensors_are_said_and_ignored(tiny_model_copy, caplog):
    import torch

    _rewrite_weights(tiny_model_copy, lambda state: state.update(extra=torch.ones(3)))
    with caplog.at_level("WARNING", logger="bert_compile"):
        load_torch_model(resolve_model(tiny_model_copy))
    assert "1 tensors no part of the sentence-embedding model uses (e.g. extra)" in caplog.text


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_precision_config_dtype_still_loads_the_float32_reference(tiny_model_copy, dtype):
    import torch

    edit_config(tiny_model_copy, dtype=dtype, torch_dtype=dtype)
    model = load_torch_model(resolve_model(tiny_model_copy))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def _without_tokenizer_files(folder):
    from bert_compiler.models.loading import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)


def test_a_folder_without_tokenizer_files_is_refused(tiny_model_copy):
    from bert_compiler.models.loading import load_tokenizer

    _without_tokenizer_files(tiny_model_copy)
    with pytest.raises(InputError, match="no tokenizer file"):
        load_tokenizer(resolve_model(tiny_model_copy))


def test_a_tokenizer_of_the_special_tokens_alone_is_refused(tiny_model_copy):
    """What transformers 5 writes for BertTokenizerFast(vocab_file=...): every word [UNK]."""
    import transformers

    from bert_compiler.models.loading import load_tokenizer
    from tests.tiny_models import SPECIAL

    _without_tokenizer_files(tiny_model_copy)
    (tiny_model_copy / "vocab.txt").write_text("\n".join(SPECIAL) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(tiny_model_copy / "vocab.txt")).save_pretrained(
        str(tiny_model_copy)
    )
    with pytest.raises(InputError, match="holds only its 5 special tokens"):
        load_tokenizer(resolve_model(tiny_model_copy))


def test_a_tokenizer_longer_than_the_embedding_table_is_refused(tiny_model_copy):
    from bert_compiler.models.loading import load_tokenizer

    info = resolve_model(tiny_model_copy)
    tokens = len(load_tokenizer(info))
    edit_config(tiny_model_copy, vocab_size=tokens - 1)
    with pytest.raises(InputError, match=f"has {tokens} tokens and config.json's vocab_size"):
        load_tokenizer(resolve_model(tiny_model_copy))


def _rewrite_header(weights, change) -> None:
    """The safetensors file with its header changed by ``change`` (the data bytes kept)."""
    data = weights.read_bytes()
    length = _header_length(weights)
    header = json.loads(data[8 : 8 + length])
    header = change(header) or header
    encoded = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])


def _first_tensor(header) -> str:
    return next(k for k in header if k != "__metadata__")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda h: h[_first_tensor(h)].update(shape=[10**6]), r"spans \d+ bytes"),
        (lambda h: h[_first_tensor(h)].update(dtype="F16"), r"is F16 .* but spans"),
        (lambda h: h[_first_tensor(h)].update(dtype="Q4"), "dtype 'Q4', not one safetensors"),
        (lambda h: h[_first_tensor(h)].update(shape="big"), "shape 'big', not a list"),
        (lambda h: h.update({_first_tensor(h): 7}), "header entry 7, not an object"),
        (lambda h: [1, 2], "header is not a JSON object"),
    ],
)
def test_a_safetensors_header_that_does_not_add_up_is_one_line(tiny_model_copy, change, expected):
    _rewrite_header(tiny_model_copy / "model.safetensors", change)
    with pytest.raises(InputError, match=expected):
        resolve_model(tiny_model_copy)


def test_an_integer_weight_is_refused_and_id_buffers_are_not(tiny_model_copy):
    import torch

    name = "encoder.layer.0.output.dense.bias"

    def ids_buffer(state):
        state["embeddings.position_ids"] = torch.arange(8)[None]

    _rewrite_weights(tiny_model_copy, ids_buffer)
    resolve_model(tiny_model_copy)

    def integer(state):
        state[name] = state[name].to(torch.int32)

    _rewrite_weights(tiny_model_copy, integer)
    with pytest.raises(UnsupportedModelError, match=rf"tensor '{name}' is I32: weights must be"):
        resolve_model(tiny_model_copy)


def _edit_modules(folder, edit) -> None:
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps(edit(modules)))


def test_sentence_transformers_modules_the_engines_do_not_run_are_refused(tiny_model_copy):
    """A module the engines do not run (a word-embedding model, custom code), modules in another
    order, an encoder in a subfolder or a module path out of the folder: refused in one line
    rather than built into embeddings that are not the model's."""
    original = json.loads((tiny_model_copy / "modules.json").read_text())
    word = {"idx": 2, "name": "2", "path": "2_W", "type": "sentence_transformers.WordEmbeddings"}
    cases = [
        (lambda m: [*m[:2], word], UnsupportedModelError, r"module '2_W' \(.*\) is not supp"),
        (lambda m: [m[0], m[2], m[1]], UnsupportedModelError, "modules run as Transformer "),
        (lambda m: [{**m[0], "path": "enc"}, *m[1:]], UnsupportedModelError, "path is 'enc'"),
        (lambda m: [m[0], {**m[1], "path": "../x"}], InputError, "'../x' leaves the model"),
        (lambda m: [*m[:2], 5], InputError, "a JSON list of module objects"),
    ]
    for edit, error, message in cases:
        _edit_modules(tiny_model_copy, lambda _m, edit=edit: edit(list(original)))
        with pytest.raises(error, match=message):
            resolve_model(tiny_model_copy)


def test_pooling_as_sentence_transformers_5_writes_it_is_read(tiny_model_copy):
    """sentence-transformers 5+ saves one "pooling_mode" string; earlier releases one true
    "pooling_mode_*" key. Both are read; a mode the engines do not run is refused."""
    path = tiny_model_copy / "1_Pooling" / "config.json"
    assert resolve_model(tiny_model_copy).pooling == "mean"
    path.write_text(json.dumps({"embedding_dimension": 32, "pooling_mode": "cls"}))
    assert resolve_model(tiny_model_copy).pooling == "cls"
    path.write_text(json.dumps({"embedding_dimension": 32, "pooling_mode": "max"}))
    with pytest.raises(UnsupportedModelError, match=r"pooling modes \['max'\] are not supp"):
        resolve_model(tiny_model_copy)


@pytest.fixture
def dense_model(tmp_path):
    from tests.tiny_models import make_tiny_model

    return make_tiny_model(tmp_path / "dense", dense_features=24)


IDENTITY = "torch.nn.modules.linear.Identity"


def test_a_dense_module_is_read_with_its_width_and_shapes_every_hash(dense_model):
    info = resolve_model(dense_model)
    ((layer,),) = [info.dense]
    assert (layer.in_features, layer.out_features, layer.bias, layer.activation) == (
        32,
        24,
        True,
        "tanh",
    )
    assert info.normalize and info.pooling == "mean"
    before = info.fingerprint()
    assert {"2_Dense/config.json", "2_Dense/model.safetensors"} <= set(before["files"])
    settings = json.loads((dense_model / "2_Dense" / "config.json").read_text())
    (dense_model / "2_Dense" / "config.json").write_text(
        json.dumps({**settings, "activation_function": IDENTITY})
    )
    changed = resolve_model(dense_model)
    assert changed.dense[0].activation == "none"
    assert changed.fingerprint()["sha256"] != before["sha256"]


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"activation_function": "torch.nn.modules.activation.GELU"}, UnsupportedModelError,
         "activation_function 'torch.nn.modules.activation.GELU' is not supported"),
        ({"in_features": 16}, InputError, "in_features 16 does not match the 32 features"),
        ({"out_features": 12}, InputError, "holds .* but config.json asks for"),
        ({"out_features": True}, InputError, "out_features is True, not an integer"),
        ({"bias": "yes"}, InputError, "bias is 'yes', not true or false"),
        ({"use_residual": True}, UnsupportedModelError, "use_residual Dense layers"),
        ({"module_input_name": "token_embeddings"}, UnsupportedModelError,
         "module_input_name 'token_embeddings' is not supported"),
        ({"weights": None}, InputError, "the Dense module has no model.safetensors"),
    ],
    ids=["activation", "in", "shape", "bool", "bias", "residual", "input", "no-weights"],
)  # fmt: skip
def test_dense_settings_that_do_not_fit_the_model_are_one_line(dense_model, change, error, message):
    folder = dense_model / "2_Dense"
    if change.pop("weights", 0) is None:
        (folder / "model.safetensors").unlink()
    settings = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**settings, **change}))
    with pytest.raises(error, match=message):
        resolve_model(dense_model)


def test_a_dense_model_needs_pooling_in_the_graph(dense_model):
    from bert_compiler.models.loading import build_wrapper

    info = resolve_model(dense_model)
    with pytest.raises(UnsupportedModelError, match="pooling must be in the graph"):
        build_wrapper(info, load_torch_model(info), pooling_in_graph=False)


def test_pooling_settings_of_the_wrong_json_type_are_one_line(tiny_model_copy):
    (tiny_model_copy / "1_Pooling" / "config.json").write_text("[true]")
    with pytest.raises(InputError, match="a JSON object of pooling settings"):
        resolve_model(tiny_model_copy)


def test_a_tokenizer_that_pads_on_the_left_pads_the_reference_on_the_right(tiny_model_copy):
    """Left padding would shift every real token's position in the PyTorch reference (verify
    then blamed the engine): the reference is the unpadded text's, so padding goes right."""
    config = json.loads((tiny_model_copy / "tokenizer_config.json").read_text())
    (tiny_model_copy / "tokenizer_config.json").write_text(
        json.dumps({**config, "padding_side": "left"})
    )
    tokenizer = load_tokenizer(resolve_model(tiny_model_copy))
    assert tokenizer.padding_side == "right"
    ids = tokenizer(["a", "the movie was long"], padding=True)["input_ids"]
    assert ids[0][0] == tokenizer.cls_token_id and ids[0][-1] == tokenizer.pad_token_id


def test_dense_weights_in_a_pickle_run_no_code(dense_model, tmp_path):
    """A Dense module's pytorch_model.bin is refused without --allow-pickle; with it, a payload
    in the pickle is refused by weights_only loading in one line, and never runs."""
    import torch
    from safetensors.torch import load_file

    from bert_compiler.models.embedding_modules import embedding_head

    folder, marker = dense_model / "2_Dense", tmp_path / "pwned"
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save({**state, "exploit": _Exploit(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="--allow-pickle"):
        resolve_model(dense_model)
    info = resolve_model(dense_model, allow_pickle=True)
    with pytest.raises(InputError, match="cannot load the Dense weights"):
        embedding_head(info.modules)
    assert not marker.exists()
