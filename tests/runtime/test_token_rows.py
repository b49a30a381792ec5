"""Tokenization (runtime/token_rows.py, and the runtime's streaming encode): ids, type ids and
truncation bit-identical to the model's Hugging Face tokenizer for every registered
architecture, single texts and pairs, on the bundled data and on hostile text."""

from __future__ import annotations

import random
from itertools import count, islice
from pathlib import Path

import numpy as np
import pytest

from bert_compiler.calibration import datasets
from bert_compiler.core.errors import InputError
from bert_compiler.models.architectures import ARCHITECTURES
from bert_compiler.models.loading import resolve_model
from bert_compiler.runtime import encoder as runtime
from bert_compiler.runtime import token_rows, tokenizing
from bert_compiler.runtime.encoder import Encoder
from bert_compiler.runtime.token_rows import RowTokenizer, TokenizerPool, piecewise
from tests.runtime.test_runtime import RecordingEngine
from tests.tiny_models import _bert_family

# Texts a tokenizer gets wrong first: empty and blank, runs of spaces, every Unicode plane,
# combining marks alone and after a space, control and format characters, characters whose
# lowercase or decomposition is longer, words longer than WordPiece's 100 characters, special
# tokens written in the text, CJK (split per character by BERT's normalizer).
HOSTILE = [
    "", " ", "   ", "a  b", " lead", "trail ", "\u0301", "a \u0301b", "e\u0301", "x\x1cy",
    "x\x00y", "\ufffd", "\t\n\r", "tab\there", "nl\nx", "\u00a0nbsp\u00a0", "\u3000ideographic",
    "\u2028line", "\ufeffbom", "\u200bzero width", "\ud7ff", "中文字符 和 English", "ΣΑΣ σας",
    "İstanbul", "ﬁne ﬂow", "ÅÄÖ åäö ß", "don't", "U.S.A.", "x" * 101, "y" * 100, "a" * 300,
    "a " * 300, "word " * 200 + "end", "\U0001f600 emoji \U0001f600", "\U00020000 \U000e0001",
    "\U0010fffd", "[CLS] [MASK] hello [SEP]", "a[MASK]b", "<s> </s> <mask>", "🙂" * 70,
]  # fmt: skip


def _random_texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = [
        lambda: chr(rng.randint(0x20, 0x7E)),
        lambda: chr(rng.randint(0x80, 0x2FFF)),
        lambda: chr(rng.randint(0x1F000, 0x1FAFF)),
        lambda: " ",
        lambda: "\u0301",
        lambda: "\x1c",
        lambda: rng.choice(["the ", "playing ", "guitar", "##", "'s"]),
    ]
    return [
        "".join(rng.choice(alphabet)() for _ in range(rng.randint(0, 40))) for _ in range(count)
    ]


def _sentences() -> list[str]:
    pairs = datasets.load_stsb(datasets.STSB_DEV)
    return pairs.sentences1[:300] + pairs.sentences2[:300]


TEXTS = _sentences() + HOSTILE + _random_texts(0, 300)


_TOKENIZER_FOLDERS: dict[str, Path] = {}


def _hf_tokenizer(model_type: str, tmp_path: Path):
    """A fresh Hugging Face tokenizer of the tiny model of ``model_type`` (its folder written
    once per test session)."""
    from transformers import AutoTokenizer

    if model_type not in _TOKENIZER_FOLDERS:
        folder = tmp_path / model_type
        folder.mkdir()
        _bert_family(model_type, folder)
        _TOKENIZER_FOLDERS[model_type] = folder
    return AutoTokenizer.from_pretrained(_TOKENIZER_FOLDERS[model_type])


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model("default").path)


def _expected(hf, texts, max_length: int, pairs: bool = False):
    """The Hugging Face tokenizer's own rows: flat ids, flat type ids, lengths."""
    if pairs:
        firsts, seconds = zip(*texts, strict=True)
        encoded = hf(list(firsts), list(seconds), truncation="longest_first", max_length=max_length)
    else:
        encoded = hf(list(texts), truncation="longest_first", max_length=max_length)
    ids = encoded["input_ids"]
    types = encoded.get("token_type_ids") or [[0] * len(row) for row in ids]
    return (
        np.array([i for row in ids for i in row], np.int64),
        np.array([t for row in types for t in row], np.int64),
        np.array([len(row) for row in ids], np.int64),
    )


def _assert_same(got, expected, texts) -> None:
    ids, types, lengths = expected
    starts = np.concatenate([[0], np.cumsum(lengths)])
    got_starts = np.concatenate([[0], np.cumsum(got.lengths)])
    for row, text in enumerate(texts):
        want = ids[starts[row] : starts[row + 1]].tolist()
        have = got.ids[got_starts[row] : got_starts[row + 1]].tolist()
        assert have == want, f"row {row} {text!r}: {have} != {want}"
    np.testing.assert_array_equal(got.lengths, lengths)
    np.testing.assert_array_equal(got.type_ids, types)


def test_tiny_tokenizers_split_plain_words_into_real_ids(tmp_path):
    """The fixture's tokenizers hold their whole vocabulary: a plain sentence is no [UNK]s."""
    for model_type in ARCHITECTURES:
        hf = _hf_tokenizer(model_type, tmp_path)
        ids = hf("a man plays a guitar")["input_ids"]
        assert hf.unk_token_id not in ids, (model_type, ids)
        assert len(set(ids)) >= 10, (model_type, ids)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
@pytest.mark.parametrize(("max_length", "side"), [(128, "right"), (9, "right"), (9, "left")])
def test_rows_equal_hugging_face_for_every_architecture(tmp_path, model_type, max_length, side):
    hf = _hf_tokenizer(model_type, tmp_path)
    hf.truncation_side = side
    rows = RowTokenizer(hf.backend_tokenizer, max_length, direction=side)
    _assert_same(rows.encode(TEXTS), _expected(hf, TEXTS, max_length), TEXTS)
    # Again, from the warm cache, in another order.
    shuffled = TEXTS[::-1]
    _assert_same(rows.encode(shuffled), _expected(hf, shuffled, max_length), shuffled)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_pairs_equal_hugging_face_for_every_architecture(tmp_path, model_type):
    hf = _hf_tokenizer(model_type, tmp_path)
    # Sentences, then each hostile text beside a sentence and beside another hostile text.
    texts = TEXTS[:200] + HOSTILE
    pairs = list(zip(texts, texts[1:] + texts[:1], strict=True))
    for max_length in (128, 12):
        rows = tokenizing.row_tokenizer(hf, max_length)
        _assert_same(rows.encode(pairs), _expected(hf, pairs, max_length, pairs=True), pairs)


@pytest.mark.parametrize(("max_length", "side"), [(128, "right"), (16, "left"), (3, "right")])
def test_real_minilm_tokenizer_rows_are_bit_identical(max_length, side):
    """The default model's real WordPiece vocabulary (30,522 pieces): words split into
    subwords, accents stripped, CJK split per character."""
    hf = _minilm_tokenizer()
    hf.truncation_side = side
    rows = RowTokenizer(hf.backend_tokenizer, max_length, direction=side)
    assert rows.cached
    texts = TEXTS + _random_texts(1, 500)
    _assert_same(rows.encode(texts), _expected(hf, texts, max_length), texts)


def test_piece_cache_only_where_tokens_compose_at_spaces(tmp_path):
    cached = {t: RowTokenizer(_hf_tokenizer(t, tmp_path).backend_tokenizer, 32).cached
              for t in ARCHITECTURES}  # fmt: skip
    # WordPiece behind BERT's normalizer and pre-tokenizer composes; byte-level BPE (a space
    # belongs to the next word), SentencePiece, and MPNet's <mask> (it strips the space before
    # it) do not, and take the Rust batch.
    assert cached == {
        "bert": True, "distilbert": True, "electra": True, "mpnet": False,
        "roberta": False, "xlm-roberta": False,
    }  # fmt: skip
    hf = _minilm_tokenizer()
    assert piecewise(hf.backend_tokenizer.to_str())
    hf.add_tokens(["new york"])  # an added token across a space: pieces would miss it
    assert not piecewise(hf.backend_tokenizer.to_str())
    rows = RowTokenizer(hf.backend_tokenizer, 32)
    texts = ["i love new york", "new  york", "york new"]
    _assert_same(rows.encode(texts), _expected(hf, texts, 32), texts)


def test_piece_cache_stays_bounded_and_exact(monkeypatch):
    hf = _minilm_tokenizer()
    monkeypatch.setattr(token_rows, "CACHE_PIECES", 50)
    monkeypatch.setattr(token_rows, "CACHE_PIECE_CHARS", 6)
    rows = RowTokenizer(hf.backend_tokenizer, 64)
    texts = _sentences()
    for start in range(0, len(texts), 100):
        window = texts[start : start + 100]
        _assert_same(rows.encode(window), _expected(hf, window, 64), window)
        assert len(rows._cache) <= 50 + 100 * 64  # emptied before it passes the bound + a batch
    assert all(len(piece) <= 6 for piece in rows._cache)


def test_text_utf8_cannot_encode_is_a_type_error():
    rows = RowTokenizer(_minilm_tokenizer().backend_tokenizer, 32)
    with pytest.raises(TypeError):
        rows.encode(["fine", "lone \ud800 surrogate"])


def test_pool_gives_the_in_process_rows_in_order():
    hf = _minilm_tokenizer()
    rows = RowTokenizer(hf.backend_tokenizer, 40)
    windows = [TEXTS[:7], TEXTS[7:900], TEXTS[900:901], TEXTS[901:]]
    pool = TokenizerPool(rows, workers=2)
    try:
        results = list(pool.map_windows(iter(enumerate(windows)), ahead=1))
        assert [(tag, w) for tag, w, _ in results] == list(enumerate(windows))
        for _tag, window, encoded in results:
            _assert_same(encoded, _expected(hf, window, 40), window)
        [(_tag, window, failed)] = list(pool.map_windows([(0, ["ok", "\ud800"])]))
        assert isinstance(failed, TypeError)
    finally:
        pool.close()


def _recording_encoder(**kwargs) -> Encoder:
    """The default model's tokenizer before an engine whose outputs are its inputs."""
    return Encoder(RecordingEngine(), resolve_model("default"), **kwargs)


def test_streaming_encode_equals_one_run_in_input_order(monkeypatch):
    """Windows of 64 texts, tokenized a window ahead: outputs equal one run over all the
    texts' tokens, in input order; an iterator's texts as a list's."""
    monkeypatch.setattr(tokenizing, "WINDOW_FIRST", 16)
    monkeypatch.setattr(tokenizing, "WINDOW_ROWS", 64)
    encoder = _recording_encoder(tokenizer_workers=0)
    texts = TEXTS[:500]
    expected = encoder.run(encoder.tokenize(texts))
    for given in (texts, iter(texts)):
        got = encoder.encode(given)
        np.testing.assert_array_equal(got["row_sum"], expected["row_sum"])
        assert encoder.stats.rows == len(texts)
        for have, want in zip(got["last_hidden_state"], expected["last_hidden_state"], strict=True):
            np.testing.assert_array_equal(have, want)


def test_streaming_encode_through_the_pool(monkeypatch):
    monkeypatch.setattr(tokenizing, "WINDOW_FIRST", 32)
    monkeypatch.setattr(tokenizing, "WINDOW_ROWS", 256)
    monkeypatch.setattr(runtime, "POOL_MIN_TEXTS", 100)
    encoder = _recording_encoder(tokenizer_workers=2)
    texts = TEXTS[:700]
    expected = encoder.run(encoder.tokenize(texts))["row_sum"]
    np.testing.assert_array_equal(encoder.encode(texts)["row_sum"], expected)
    with pytest.raises(InputError, match=r"text 650: not encodable as UTF-8"):
        encoder.encode([*texts[:650], "bad \udc80", *texts[:10]])


def test_stream_reads_an_endless_iterator_window_by_window(monkeypatch):
    monkeypatch.setattr(tokenizing, "WINDOW_FIRST", 8)
    monkeypatch.setattr(tokenizing, "WINDOW_ROWS", 16)
    encoder = _recording_encoder(tokenizer_workers=0)
    read = count()
    endless = (f"sentence number {next(read)}" for _ in iter(int, 1))
    first = list(islice(encoder.stream(endless), 3))
    assert [len(part["row_sum"]) for part in first] == [8, 16, 16]
    # What was read: the three windows and at most the two tokenized ahead.
    assert next(read) <= 8 + 16 * 4


def test_encode_names_the_bad_text_by_its_index_in_a_stream(monkeypatch):
    monkeypatch.setattr(tokenizing, "WINDOW_FIRST", 4)
    monkeypatch.setattr(tokenizing, "WINDOW_ROWS", 4)
    encoder = _recording_encoder(tokenizer_workers=0)
    texts = ["fine"] * 9 + [7]
    with pytest.raises(InputError, match=r"^text 9: .* reads single texts, not int"):
        encoder.encode(iter(texts))
    with pytest.raises(InputError, match="a list of texts"):
        encoder.encode("one string")


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_long_text_gives_hugging_face_rows_from_its_cut(side):
    """A text past max_length x TEXT_CHARS_PER_TOKEN characters is cut before the Rust
    tokenizer reads it; its rows are still the Hugging Face tokenizer's rows of the whole text
    (its kept tokens lie well inside the cut), for single texts and pairs."""
    hf = _minilm_tokenizer()
    hf.truncation_side = side
    words = " ".join(f"w{index % 997}ord" for index in range(30_000))  # ~250 kB
    texts = ["a short one", words, words[::-1]]
    rows = RowTokenizer(hf.backend_tokenizer, 128, direction=side)
    assert len(words) > 128 * token_rows.TEXT_CHARS_PER_TOKEN
    _assert_same(rows.encode(texts), _expected(hf, texts, 128), texts)
    pairs = [(words, "a short one"), ("another", words)]
    _assert_same(rows.encode(pairs), _expected(hf, pairs, 128, pairs=True), pairs)


def test_the_reference_reads_the_same_cut_text_as_the_engine():
    """Where the cut does change a text's tokens (words past the cut behind a run of spaces
    longer than it), verify's reference (text.encode_texts) reads the same characters as the
    runtime, so the two still agree."""
    from bert_compiler.runtime.text import encode_texts

    info = resolve_model("default")
    hf = _minilm_tokenizer()
    text = "hello" + " " * (16 * token_rows.TEXT_CHARS_PER_TOKEN) + "world"
    reference = encode_texts(hf, [text], info, 16)["input_ids"]
    rows = tokenizing.row_tokenizer(hf, 16).encode([text])
    assert reference == [rows.ids.tolist()]
    assert hf.convert_ids_to_tokens(reference[0]) == ["[CLS]", "hello", "[SEP]"]


def test_a_twenty_megabyte_text_is_tokenized_in_bounded_memory(tmp_path):
    """Whole, the Rust tokenizer holds about 235 bytes per input byte (4.7 GB here): cut, the
    process stays small. Measured in a process of its own, whose peak is its own."""
    import subprocess
    import sys

    script = tmp_path / "long.py"
    script.write_text(
        "import resource\n"
        "from transformers import AutoTokenizer\n"
        "from bert_compiler.models.loading import resolve_model\n"
        "from bert_compiler.runtime.token_rows import RowTokenizer\n"
        "hf = AutoTokenizer.from_pretrained(resolve_model('default').path)\n"
        "rows = RowTokenizer(hf.backend_tokenizer, 256)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "encoded = rows.encode(['word ' * 4_000_000, 'x' * 20_000_000])\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(encoded.lengths.tolist(), grown // 1024)\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=True, timeout=300
    )
    lengths, grown_mib = done.stdout.split("] ")
    assert lengths == "[256, 3"
    assert int(grown_mib) < 200, done.stdout
