"""The Python-backend models package copies into a Triton repository (triton/
tokenizer_model.py, onnxruntime_model.py), run in this process against a stand-in for Triton's
triton_python_backend_utils: requests batched in one execute call, padded to a ladder rung, run
once per padded length."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from bert_compiler.triton import onnxruntime_model, text_engine_model, tokenizer_model
from bert_compiler.triton.tokenizer_model import (
    TextEncoder,
    format_ladder,
    padded_length,
    parse_ladder,
)

NAMES = ["input_ids", "attention_mask", "token_type_ids"]
VOCAB = {
    "[PAD]": 0,
    "[UNK]": 1,
    "[CLS]": 2,
    "[SEP]": 3,
    **{w: 4 + i for i, w in enumerate("abcdefgh")},
}


def word_tokenizer(direction: str = "right", max_length: int = 10):
    """A word-level tokenizer with [CLS] ... [SEP], truncation and padding, like package's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(direction=direction, pad_id=0, pad_type_id=0, pad_token="[PAD]")
    return tokenizer


def _text_request(*texts: bytes) -> dict:
    return {"TEXT": np.array([[t] for t in texts], dtype=object)}


def test_each_request_is_padded_to_the_rung_of_its_longest_text():
    encoder = TextEncoder(word_tokenizer(), NAMES, (4, 6, 10))
    short, long_ = encoder.encode_requests([["a"], ["a b c", "d"]])
    # [CLS] a [SEP] is 3 tokens: rung 4; the second request's longest is 5: rung 6.
    np.testing.assert_array_equal(short["input_ids"], [[2, 4, 3, 0]])
    np.testing.assert_array_equal(short["attention_mask"], [[1, 1, 1, 0]])
    np.testing.assert_array_equal(long_["input_ids"], [[2, 4, 5, 6, 3, 0], [2, 7, 3, 0, 0, 0]])
    np.testing.assert_array_equal(long_["token_type_ids"], np.zeros((2, 6)))
    # A request's tensors do not depend on what it was batched with.
    for request, batched in zip([["a"], ["a b c", "d"]], (short, long_), strict=True):
        alone = encoder.encode(request)
        for name in NAMES:
            np.testing.assert_array_equal(alone[name], batched[name])


def test_left_padding_and_no_ladder():
    encoder = TextEncoder(word_tokenizer("left"), NAMES, (6, 8))
    result = encoder.encode(["a b", "c"])
    np.testing.assert_array_equal(result["input_ids"], [[0, 0, 2, 4, 5, 3], [0, 0, 0, 2, 6, 3]])
    np.testing.assert_array_equal(result["attention_mask"][1], [0, 0, 0, 1, 1, 1])
    plain = TextEncoder(word_tokenizer(), NAMES).encode(["a b", "c"])
    np.testing.assert_array_equal(plain["input_ids"], [[2, 4, 5, 3], [2, 6, 3, 0]])


def test_the_callers_tokenizer_keeps_its_padding():
    tokenizer = word_tokenizer()
    TextEncoder(tokenizer, NAMES, (4, 10)).encode(["a"])
    assert tokenizer.padding is not None and tokenizer.padding["pad_id"] == 0


def test_a_text_longer_than_the_top_rung_is_refused():
    # Only a tokenizer.json edited to truncate later than the ladder's top can get here.
    encoder = TextEncoder(word_tokenizer(max_length=10), NAMES, (4, 6))
    with pytest.raises(ValueError, match="longer than the top rung 6"):
        encoder.encode(["a b c d e f"])


@pytest.mark.parametrize("text", ["8,4", "4,4", "0,4", "a,b", "4,,8"])
def test_a_malformed_ladder_parameter_is_refused(text):
    with pytest.raises(ValueError):
        parse_ladder(text)


def test_ladder_parameter_round_trip():
    assert parse_ladder(format_ladder((10, 16, 128))) == (10, 16, 128)
    assert parse_ladder("") == () and format_ladder(()) == ""
    assert padded_length((10, 16, 128), 11) == 16 and padded_length((), 11) == 11


def test_tokenizer_model_tokenizes_every_request_of_a_call_at_once(pb_utils, tmp_path):
    tokenizer = word_tokenizer()
    (tmp_path / "1").mkdir()
    tokenizer.save(str(tmp_path / "1" / "tokenizer.json"))
    config = {
        "input": [{"name": "TEXT"}],
        "output": [{"name": n} for n in NAMES],
        "parameters": {"length_ladder": {"string_value": "4,6,10"}},
    }
    model = tokenizer_model.TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(tmp_path),
            "model_version": "1",
        }
    )
    calls = []
    real = model.encoder.tokenizer.encode_batch
    model.encoder.tokenizer = types.SimpleNamespace(
        encode_batch=lambda texts: calls.append(list(texts)) or real(texts)
    )
    responses = model.execute(
        [_text_request(b"a"), _text_request(b"\xff\xfe"), _text_request(b"a b c", b"d")]
    )
    assert calls == [["a", "a b c", "d"]]
    assert responses[0].tensors["input_ids"].shape == (1, 4)
    assert "UTF-8" in responses[1].error.message and not responses[1].tensors
    assert responses[2].tensors["input_ids"].shape == (2, 6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_huge_text_is_cut_before_the_tokenizer_reads_it(side):
    """A 400 kB text reaches the Rust tokenizer cut to max_length x TEXT_CHARS_PER_TOKEN
    characters (whole, it would hold about 235 bytes per character), and still gives the
    tokenizer's own truncated rows."""
    from bert_compiler.runtime.token_rows import TEXT_CHARS_PER_TOKEN

    tokenizer = word_tokenizer()
    tokenizer.enable_truncation(max_length=10, direction=side)
    encoder = TextEncoder(tokenizer, NAMES)
    read = []
    real = encoder.tokenizer.encode_batch
    encoder.tokenizer = types.SimpleNamespace(
        encode_batch=lambda texts: read.extend(len(t) for t in texts) or real(texts)
    )
    huge = "a b c d e f g h " * 25_000
    encoded = encoder.encode([huge, "a b"])
    assert read == [10 * TEXT_CHARS_PER_TOKEN, 3]
    expected = tokenizer.encode(huge).ids
    assert encoded["input_ids"][0].tolist() == expected and len(expected) == 10


class CountingSession:
    """An ORT session stand-in: the output row is the sum of the row's ids times its width."""

    def __init__(self, refuse_width: int = 0):
        self.calls: list[tuple[int, int]] = []
        self.refuse_width = refuse_width

    def run(self, output_names, feeds):
        ids = feeds["input_ids"]
        assert ids.dtype == np.int64 and ids.flags["C_CONTIGUOUS"]
        self.calls.append(ids.shape)
        if ids.shape[1] == self.refuse_width:
            raise RuntimeError("invalid input")
        return [ids.sum(axis=1, keepdims=True).astype(np.float32) * ids.shape[1]]


def _feeds(rows: int, width: int, start: int) -> dict:
    ids = np.arange(start, start + rows * width, dtype=np.int32).reshape(rows, width)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _grouped(session, feeds):
    return onnxruntime_model.run_grouped(
        session,
        ["input_ids", "attention_mask"],
        ["out"],
        feeds,
        respond=lambda outputs: outputs,
        fail=lambda message: message,
    )


def test_python_engine_runs_each_padded_length_once():
    feeds = [_feeds(1, 4, 0), _feeds(2, 6, 10), _feeds(1, 4, 50), _feeds(3, 4, 70)]
    session = CountingSession()
    responses = _grouped(session, feeds)
    assert sorted(session.calls) == [(2, 6), (5, 4)]
    for request, response in zip(feeds, responses, strict=True):
        ids = request["input_ids"]
        expected = ids.sum(axis=1, keepdims=True) * ids.shape[1]
        np.testing.assert_array_equal(response["out"], expected)


def test_python_engine_instances_share_the_cores(monkeypatch):
    """Each instance is a process running its own execute calls: several take the usable cores'
    share each; one keeps ONNX Runtime's choice (0); a recorded thread count always wins."""
    monkeypatch.setattr(onnxruntime_model.os, "sched_getaffinity", lambda _pid: set(range(8)))

    def config(*counts):
        return {"instance_group": [{"count": c, "kind": "KIND_CPU"} for c in counts]}

    assert onnxruntime_model.intra_op_threads(config(2), {}) == 4
    assert onnxruntime_model.intra_op_threads(config(3), {}) == 2
    assert onnxruntime_model.intra_op_threads(config(16), {}) == 1
    assert onnxruntime_model.intra_op_threads(config(1), {}) == 0
    assert onnxruntime_model.intra_op_threads(config(1, 1), {}) == 4
    assert onnxruntime_model.intra_op_threads(config(2), {"intra_op_thread_count": "3"}) == 3


def test_python_engine_fails_only_the_group_ort_refuses():
    feeds = [_feeds(1, 4, 0), _feeds(1, 6, 10), _feeds(1, 4, 20)]
    responses = _grouped(CountingSession(refuse_width=6), feeds)
    assert "ONNX Runtime refused the batch: invalid input" in responses[1]
    assert responses[0]["out"].shape == responses[2]["out"].shape == (1, 1)


# The one-model text engine (text_engine_model.py): tokenizes every text of an execute call,
# sorts them by length and runs them in as few padded runs as pay.


def _brute_force_cost(lengths, run_cost, max_rows):
    """The least cost over every way to cut sorted lengths into runs (2^(n-1) cuts)."""
    best = float("inf")
    for mask in range(1 << max(0, len(lengths) - 1)):
        cuts = [0, *(i + 1 for i in range(len(lengths) - 1) if mask >> i & 1), len(lengths)]
        runs = list(zip(cuts, cuts[1:], strict=False))
        if all(stop - start <= max_rows for start, stop in runs):
            best = min(best, sum(run_cost + (b - a) * lengths[b - 1] for a, b in runs))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_plan_runs_finds_the_cheapest_cuts(seed):
    rng = np.random.default_rng(seed)
    lengths = sorted(rng.integers(3, 60, size=int(rng.integers(1, 11))).tolist())
    run_cost, max_rows = float(rng.choice([0, 4, 8, 40])), int(rng.choice([2, 3, 64]))
    runs = text_engine_model.plan_runs(lengths, run_cost, max_rows)
    assert runs[0][0] == 0 and runs[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:], strict=False))
    assert all(0 < stop - start <= max_rows for start, stop in runs)
    cost = sum(run_cost + (stop - start) * lengths[stop - 1] for start, stop in runs)
    assert cost == pytest.approx(_brute_force_cost(lengths, run_cost, max_rows))


def test_plan_runs_trades_padding_for_runs():
    lengths = [5, 5, 6, 30, 31]
    # Free runs: a run per length, no padding; costly runs: one run padded to 31.
    assert text_engine_model.plan_runs(lengths, 0, 64) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert text_engine_model.plan_runs(lengths, 1000, 64) == [(0, 5)]
    assert text_engine_model.plan_runs(lengths, 8, 64) == [(0, 3), (3, 5)]
    assert text_engine_model.plan_runs(lengths, 1000, 2) == [(0, 2), (2, 3), (3, 5)]
    assert text_engine_model.plan_runs([], 8, 64) == []
    with pytest.raises(ValueError, match="ascending"):
        text_engine_model.plan_runs([5, 3], 8, 64)


class TokenSession:
    """An ORT session stand-in with a token-level output: each position's id, as a float."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def run(self, output_names, feeds):
        ids = feeds["input_ids"]
        self.calls.append(ids.shape)
        pooled = (ids * feeds["attention_mask"]).sum(axis=1, keepdims=True).astype(np.float32)
        return [pooled, ids[:, :, None].astype(np.float32)]


@pytest.mark.parametrize("side", ["right", "left"])
def test_text_engine_returns_each_request_its_own_rows(side):
    encoder = TextEncoder(word_tokenizer(side), NAMES)
    session = TokenSession()
    engine = text_engine_model.TextEngine(
        session, encoder, ["pooled", "tokens"], token_outputs=["tokens"], run_cost=0, max_rows=64
    )
    requests = [["a b c d e f"], ["a", "b c"], ["d"], ["e f g h"]]
    results = engine.run(requests)
    # Sorted lengths 3,3,4,6,8 with free runs: one run per length, none padded.
    assert sorted(session.calls) == [(1, 4), (1, 6), (1, 8), (2, 3)]
    for request, result in zip(requests, results, strict=True):
        alone = encoder.encode(request)
        mask = alone["attention_mask"]
        np.testing.assert_array_equal(result["attention_mask"], mask)
        np.testing.assert_array_equal(result["tokens"][..., 0], alone["input_ids"] * mask)
        np.testing.assert_array_equal(
            result["pooled"], (alone["input_ids"] * mask).sum(axis=1, keepdims=True)
        )


def test_text_engine_fails_only_the_requests_of_a_refused_run():
    encoder = TextEncoder(word_tokenizer(), NAMES)
    engine = text_engine_model.TextEngine(
        CountingSession(refuse_width=5), encoder, ["out"], run_cost=0, max_rows=64
    )
    results = engine.run([["a"], ["a b c", "d"], ["e"], []])
    assert "ONNX Runtime refused the batch: invalid input" in results[1]
    assert results[0]["out"].shape == results[2]["out"].shape == (1, 1)
    assert results[3] == "a request with no texts"
    with pytest.raises(ValueError, match="no ladder"):
        text_engine_model.TextEngine(
            CountingSession(), TextEncoder(word_tokenizer(), NAMES, (4, 8)), ["out"],
            run_cost=0, max_rows=64,
        )  # fmt: skip


def test_a_text_that_makes_the_rust_tokenizer_panic_fails_only_its_own_request():
    """A tokenizer.json regex that makes the Rust tokenizer panic on some texts (here: a split
    whose look-behind holds \\K, on any text with a space). pyo3 raises PanicException, a
    BaseException that ``except Exception`` let through, failing every request of the call:
    now the request whose text panics fails alone, and the others get their rows."""
    from tokenizers import Regex, pre_tokenizers

    tokenizer = word_tokenizer()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex("(?<=\\K.)."), "isolated"), pre_tokenizers.Whitespace()]
    )
    with pytest.raises(BaseException, match="byte range|bad split") as raised:
        tokenizer.encode("a b")
    assert not isinstance(raised.value, Exception)  # the real panic, as Triton would see it
    engine = text_engine_model.TextEngine(
        CountingSession(), TextEncoder(tokenizer, NAMES), ["out"], run_cost=0, max_rows=64
    )
    results = tokenizer_model.respond_all(
        [["a"], ["c", "a b"], ["d"]],
        lambda request: [np.array([t.encode() for t in request], dtype=object)],
        ["TEXT"],
        engine,
        respond=lambda outputs: outputs,
        fail=lambda message: message,
    )
    assert results[0]["out"].shape == results[2]["out"].shape == (1, 1)
    assert results[1].startswith("the text engine failed: PanicException")


def test_text_engine_model_reads_requests_and_answers_each(pb_utils):
    engine = text_engine_model.TextEngine(
        CountingSession(), TextEncoder(word_tokenizer(), NAMES), ["out"], run_cost=8, max_rows=64
    )
    model = text_engine_model.TritonPythonModel()
    model.inputs, model.engine = ["TEXT"], engine
    responses = model.execute(
        [_text_request(b"a b"), _text_request(b"\xff\xfe"), _text_request(b"c", b"d e")]
    )
    assert responses[0].tensors["out"].shape == (1, 1)
    assert "UTF-8" in responses[1].error.message and not responses[1].tensors
    assert responses[2].tensors["out"].shape == (2, 1) and responses[2].error is None
