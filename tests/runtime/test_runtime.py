"""The runtime (runtime/encoder.py): texts in, outputs in input order, whatever the batching."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from bert_compiler.core.errors import ArtifactError, InputError
from bert_compiler.engines.backend import load_engine
from bert_compiler.engines.batching import BatchingSpec
from bert_compiler.models.loading import resolve_model
from bert_compiler.runtime import encoder as runtime
from bert_compiler.runtime.encoder import Encoder
from bert_compiler.runtime.tokens import Tokens
from tests.conftest import cpu_engine_dir

_BASE = [
    "a",
    "the movie was long and slow , but the ending made up for every minute of it",
    "",
    "fine",
    "an unexpectedly moving story about two brothers",
    "ok then",
]
# Distinct texts, seven of each base length: a row put back in the place of another row of its
# length shows (copies of one string would hide it); and texts far past the test's max length.
_WORDS = ["red", "blue", "green", "cat", "dog", "sun", "car"]
TEXTS = [f"{base} {word}".strip() for word in _WORDS for base in _BASE] + [
    " ".join([word] * 50) for word in _WORDS[:3]
]


class RecordingEngine:
    """A numpy engine whose outputs are functions of its inputs, so that any row put back in the
    wrong place, or padding leaking into a row, shows."""

    device = "cpu"
    max_batch = None
    path = "recording"
    packed_rows = False
    concurrent_runs = False

    def __init__(self):
        self.input_names = ["input_ids", "attention_mask", "token_type_ids"]
        self.output_names = ["last_hidden_state", "row_sum"]
        self.shapes = []

    def run(self, feeds):
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        self.shapes.append(ids.shape)
        hidden = np.stack([ids * mask, mask], axis=-1).astype(np.float32)
        return {"last_hidden_state": hidden, "row_sum": (ids * mask).sum(1, keepdims=True)}


@pytest.mark.parametrize(
    "batching",
    [
        BatchingSpec(max_batch=4, token_budget=40),
        BatchingSpec(max_batch=8, token_budget=10**6, ladder=(4, 9, 32), round_rows=True),
        BatchingSpec(max_batch=3, sort=False),
    ],
)
def test_rows_come_back_in_input_order(tiny_embedding_model, batching, monkeypatch):
    monkeypatch.setattr(runtime, "CHUNK_ROWS", 16)  # several chunks
    info = resolve_model(tiny_embedding_model)
    engine = RecordingEngine()
    encoder = Encoder(engine, info, max_length=32, batching=batching)
    outputs = encoder.encode(TEXTS)
    tokenizer = encoder.tokenizer
    for i, text in enumerate(TEXTS):
        ids = tokenizer(text, truncation=True, max_length=32)["input_ids"]
        assert outputs["row_sum"][i, 0] == sum(ids)
        row = outputs["last_hidden_state"][i]
        assert row.shape == (len(ids), 2) and row[:, 0].tolist() == ids
    assert all(shape[0] <= batching.max_batch for shape in engine.shapes)
    if batching.ladder:
        assert {shape[1] for shape in engine.shapes} <= set(batching.ladder)
    assert encoder.stats.rows == len(TEXTS) and encoder.stats.batches >= len(TEXTS) // 8


class ThreadedEngine(RecordingEngine):
    """A RecordingEngine that, like an ONNX Runtime CPU engine, comes in sessions of other
    thread counts (``with_threads``, one per count, kept); records how many of its runs
    overlap, and fails at run ``fail_at`` when asked."""

    def __init__(self, threads: int = 0, fail_at: int | None = None):
        super().__init__()
        self.threads, self.fail_at = threads, fail_at
        self.concurrent_runs = not threads
        self.copies: list[ThreadedEngine] = []
        self.lock = threading.Lock()
        self.running = self.most = self.runs = 0

    def with_threads(self, threads):
        if not any(copy.threads == threads for copy in self.copies):
            self.copies.append(ThreadedEngine(threads, self.fail_at))
        return next(copy for copy in self.copies if copy.threads == threads)

    def run(self, feeds):
        with self.lock:
            self.runs += 1
            if self.runs == self.fail_at:
                raise InputError("the engine refused batch 3")
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.01)
        try:
            return super().run(feeds)
        finally:
            with self.lock:
                self.running -= 1


def test_cpu_engines_run_batches_at_once_and_rows_come_back_in_order(
    tiny_embedding_model, monkeypatch
):
    monkeypatch.setattr(runtime, "usable_cores", lambda: 4)
    info = resolve_model(tiny_embedding_model)
    engine = ThreadedEngine()
    batching = BatchingSpec(max_batch=2, token_budget=64)
    encoder = Encoder(engine, info, max_length=32, batching=batching, time_batches=True)
    assert encoder.concurrent_batches == runtime.CPU_CONCURRENT_BATCHES == 2
    outputs = encoder.encode(TEXTS)
    for i, text in enumerate(TEXTS):
        ids = encoder.tokenizer(text, truncation=True, max_length=32)["input_ids"]
        assert outputs["row_sum"][i, 0] == sum(ids)
        assert outputs["last_hidden_state"][i][:, 0].tolist() == ids
    # One session whose pool has a helper thread per core beyond the two runs' own threads
    # (4 - 2 + 1 = 3 threads), two runs at once on it; the engine as loaded is left to its
    # other callers.
    [threaded] = engine.copies
    assert threaded.threads == 3 and threaded.most == 2 and engine.shapes == []
    assert len(encoder.stats.batch_ms) == encoder.stats.batches == len(threaded.shapes)
    encoder.with_batching(BatchingSpec(max_batch=3, token_budget=64)).encode(TEXTS)
    assert len(engine.copies) == 1
    assert Encoder(engine, info, max_length=32, concurrent_batches=1).concurrent_batches == 1
    # A thread count the build recorded is the user's: one batch at a time on it.
    assert Encoder(ThreadedEngine(threads=2), info, max_length=32).concurrent_batches == 1
    monkeypatch.setattr(runtime, "usable_cores", lambda: 1)
    assert Encoder(engine, info, max_length=32).concurrent_batches == 1
    with pytest.raises(InputError, match="concurrent batches 0: give 1 or more"):
        Encoder(engine, info, concurrent_batches=0)


def test_a_batch_that_fails_among_concurrent_ones_fails_the_run(tiny_embedding_model, monkeypatch):
    """The error of the failing batch, in one line; no more batches than the few in flight
    (two per concurrent run) were handed to the engine."""
    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    engine = ThreadedEngine(fail_at=3)
    encoder = Encoder(
        engine,
        resolve_model(tiny_embedding_model),
        max_length=32,
        batching=BatchingSpec(max_batch=1, token_budget=64),
    )
    with pytest.raises(InputError, match="^the engine refused batch 3$"):
        encoder.encode(TEXTS)
    assert engine.copies[0].runs <= 3 + 2 * 2 - 1


def test_a_ladder_below_the_maximum_length_and_no_texts_are_refused(tiny_embedding_model):
    from bert_compiler.core.errors import InputError

    info = resolve_model(tiny_embedding_model)
    with pytest.raises(InputError, match="top rung"):
        Encoder(RecordingEngine(), info, max_length=32, batching=BatchingSpec(ladder=(8, 16)))
    encoder = Encoder(RecordingEngine(), info, max_length=32)
    with pytest.raises(InputError, match="no texts"):
        encoder.encode([])
    empty = Tokens(*(np.zeros(0, np.int64),) * 3)
    with pytest.raises(InputError, match="no token rows"):
        encoder.run(empty)
    with pytest.raises(InputError, match="need a CUDA engine"):
        encoder.encode(["a"], device_outputs=True)


@pytest.mark.e2e
def test_the_engine_through_the_runtime_matches_one_row_at_a_time(tiny_run):
    info, out, _spec, _summary = tiny_run
    encoder = Encoder.open(cpu_engine_dir(out), info)
    batched = encoder.encode(TEXTS)["sentence_embedding"]
    assert encoder.stats.rows == len(TEXTS) and encoder.stats.batches == 2
    for i, text in enumerate(TEXTS[:6]):
        single = encoder.engine.run(
            {
                k: v
                for k, v in encoder.tokenize([text])
                .matrices(encoder.engine.input_names, encoder.pad_id)
                .items()
            }
        )["sentence_embedding"][0]
        np.testing.assert_allclose(batched[i], single, atol=1e-5)


@pytest.mark.e2e
def test_concurrent_batches_on_a_session_of_other_threads_give_the_rows_of_one_at_a_time(
    tiny_run, monkeypatch, caplog, tmp_path
):
    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    info, out, _spec, _summary = tiny_run
    batching = BatchingSpec(max_batch=4, token_budget=256)
    encoder = Encoder.open(cpu_engine_dir(out), info, batching=batching)
    assert encoder.concurrent_batches == 2
    concurrent = encoder.encode(TEXTS)["sentence_embedding"]
    assert set(encoder.engine._threaded) == {1}  # the session the run made: 2 - 2 + 1 threads
    threaded = encoder.engine.with_threads(1)
    assert threaded.session is not encoder.engine.session
    assert threaded.session.get_session_options().intra_op_num_threads == 1
    one_at_a_time = Encoder(encoder.engine, info, batching=batching, concurrent_batches=1)
    expected = one_at_a_time.encode(TEXTS)["sentence_embedding"]
    np.testing.assert_allclose(concurrent, expected, atol=1e-6)
    # The second session is made from the file the engine loaded (its sha256 checked then),
    # never from one changed since: the runtime then runs the engine as loaded, one batch at a
    # time, and says why.
    engine, _ = load_engine(cpu_engine_dir(out))
    status = engine.path.stat()
    os.utime(engine.path, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    try:
        with pytest.raises(ArtifactError, match="changed since it was loaded; load the engine"):
            engine.with_threads(1)
        stale = Encoder(engine, info, batching=batching)
        with caplog.at_level(logging.WARNING, logger="bert_compile"):
            rows = stale.encode(TEXTS)["sentence_embedding"]
        np.testing.assert_allclose(rows, expected, atol=1e-6)
        assert stale.concurrent_batches == 1 and not engine._threaded
        assert "running one batch at a time on the engine as loaded" in caplog.text
    finally:
        os.utime(engine.path, ns=(status.st_atime_ns, status.st_mtime_ns))
    # A file removed since is no file to load either (a copy: the run's engine stays).
    folder = tmp_path / "engine"
    shutil.copytree(cpu_engine_dir(out), folder)
    gone, _ = load_engine(folder)
    gone.path.unlink()
    with pytest.raises(ArtifactError, match="changed since it was loaded"):
        gone.with_threads(1)


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        ("one sentence", "got one str (12 long), expected a list of texts"),
        (b"one sentence", "got one bytes"),
        ({"b", "a"}, "a set has no order"),
        ({"a": 1}, "a dict (its keys would be encoded)"),
        (None, "NoneType is not a list of texts"),
        (7, "int is not a list of texts"),
        (["fine", None], "text 1: tiny-embed reads single texts, not NoneType"),
        (["fine", 3], "text 1: tiny-embed reads single texts, not int"),
        (["fine", "lone \ud800 surrogate"], "text 1: not encodable as UTF-8 at character 5"),
    ],
    ids=["str", "bytes", "set", "dict", "none", "int", "none-item", "int-item", "surrogate"],
)
def test_texts_the_runtime_cannot_encode_in_order_are_one_line(
    tiny_embedding_model, texts, expected
):
    """A bare string would be encoded one character a row, a set in no order, a lone surrogate
    crash the tokenizer: each is refused before any engine call."""
    from bert_compiler.core.errors import InputError

    engine = RecordingEngine()
    encoder = Encoder(engine, resolve_model(tiny_embedding_model), max_length=32)
    with pytest.raises(InputError) as raised:
        encoder.encode(texts)
    assert expected in str(raised.value) and "\n" not in str(raised.value)
    assert engine.shapes == []


def test_ordered_iterables_of_texts_are_encoded_in_order(tiny_embedding_model):
    encoder = Encoder(RecordingEngine(), resolve_model(tiny_embedding_model), max_length=32)
    expected = encoder.encode(TEXTS)["row_sum"]
    for texts in (tuple(TEXTS), (t for t in TEXTS), np.array(TEXTS)):
        np.testing.assert_array_equal(encoder.encode(texts)["row_sum"], expected)


def test_a_very_long_text_is_truncated_at_the_maximum_length(tiny_embedding_model):
    encoder = Encoder(RecordingEngine(), resolve_model(tiny_embedding_model), max_length=32)
    outputs = encoder.encode(["fine", "word " * 200_000])
    fine = len(encoder.tokenizer("fine")["input_ids"])  # [CLS] f ##i ##n ##e [SEP]
    assert fine == 6
    assert [row.shape[0] for row in outputs["last_hidden_state"]] == [fine, 32]


def test_an_engine_of_another_kind_of_model_is_refused(tiny_embedding_model):
    """A cross-encoder's or classifier's engine (logits) under an embedding model: bench timed it
    on single texts and verify blamed the tolerances; the Encoder refuses it first."""
    from bert_compiler.core.errors import InputError

    engine = RecordingEngine()
    engine.output_names = ["logits"]
    with pytest.raises(InputError, match=r"outputs \['logits'\], and tiny-embed"):
        Encoder(engine, resolve_model(tiny_embedding_model), max_length=32)


@pytest.mark.e2e
def test_an_engine_of_another_model_is_refused_and_one_of_the_same_files_is_not(tiny_run, tmp_path):
    """The engine records its model's file hashes: opened with another model (one weight
    changed) it is one line naming the model it was built from; a copy of the same files in
    another folder opens it."""
    import torch
    from safetensors.torch import load_file, save_file

    info, out, _spec, _summary = tiny_run
    engine_dir = cpu_engine_dir(out)
    same = shutil.copytree(info.path, tmp_path / "same")
    Encoder.open(engine_dir, resolve_model(same))
    other = shutil.copytree(info.path, tmp_path / "other")
    state = load_file(str(other / "model.safetensors"))
    name = "encoder.layer.0.output.dense.bias"
    state[name] = state[name] + torch.ones_like(state[name])
    save_file(state, str(other / "model.safetensors"))
    with pytest.raises(InputError, match=rf"built from the model in {info.path}, not from "):
        Encoder.open(engine_dir, resolve_model(other))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: replace(t, ids=t.ids + 10**6), r"input_ids outside \[0, "),
        (lambda t: replace(t, ids=-t.ids - 1), r"input_ids outside \[0, "),
        (lambda t: replace(t, type_ids=t.type_ids + 7), r"token_type_ids outside \[0, "),
        (lambda t: replace(t, ids=t.ids.astype(np.float32)), "flat integer arrays"),
        (lambda t: replace(t, lengths=t.lengths + 1), "they must agree"),
        (lambda t: replace(t, type_ids=t.type_ids[:-1]), "they must agree"),
        (
            lambda t: Tokens(np.tile(t.ids, 5), np.tile(t.type_ids, 5), np.array([5 * len(t.ids)])),
            "each row holds 1 to 32 tokens",
        ),
    ],
)
def test_token_rows_out_of_contract_are_one_line_before_the_engine(change, message):
    """HOSTILE row 17: ids past the vocabulary, negative ids, type ids past the type
    vocabulary, another dtype, lengths that do not add up, a row past the maximum: refused on
    the host in one line, and the engine never runs."""
    engine = RecordingEngine()
    encoder = Encoder(engine, resolve_model("default"), max_length=32)
    tokens = encoder.tokenize(["a short text", "another one here"])
    with pytest.raises(InputError, match=message):
        encoder.run(change(tokens))
    assert engine.shapes == []
