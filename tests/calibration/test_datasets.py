from __future__ import annotations

import pytest

from bert_compiler.calibration import datasets
from bert_compiler.core.errors import InputError


def test_bundled_dev_sets_have_official_row_counts():
    stsb = datasets.load_stsb()
    sst2 = datasets.load_sst2()
    assert len(stsb.sentences1) == len(stsb.sentences2) == len(stsb.scores) == 1500
    assert len(sst2.sentences) == 872 and sum(sst2.labels) == 444
    assert all(0 <= s <= 5 for s in stsb.scores)
    rows = datasets.read_tsv(datasets.CALIBRATION_SENTENCES, ("sentence", "source"))
    assert len(rows) == 4096


def test_sentences_with_quotes_are_kept_verbatim(tmp_path):
    path = tmp_path / "q.tsv"
    path.write_text('sentence\tlabel\nhe said "hi\t1\n')
    assert datasets.load_sst2(path).sentences == ['he said "hi']


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"sentence\tlabel\n", "no data rows"),
        (b"\xef\xbb\xbfsentence\tlabel\nok\t1\n", "byte-order mark"),
        (b"sentence\tlabel\r\nok\t1\r\n", ":1: CRLF"),
        (b"sentence\tlabel\nok\t1\nbad \xff bytes\t0\n", ":3: not valid UTF-8"),
        (b"text\tlabel\nok\t1\n", "lacks column(s) ['sentence']"),
        (b"sentence\tlabel\nok\t1\t2\n", ":2: 3 fields, header has 2"),
        (b"sentence\tlabel\nok\tmaybe\n", ":2: label 'maybe'"),
        (b"sentence\tlabel\n" + b"x" * (11 << 20) + b"\t1\n", ":2: line is"),
    ],
)
def test_bad_dataset_files_fail_with_the_line(tmp_path, content, message):
    path = tmp_path / "data.tsv"
    path.write_bytes(content)
    with pytest.raises(InputError) as caught:
        datasets.load_sst2(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_missing_dataset_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        datasets.load_stsb(tmp_path / "nope.tsv")


def test_stsb_score_must_be_a_number_in_range(tmp_path):
    path = tmp_path / "sts.tsv"
    path.write_text("score\tsentence1\tsentence2\n7\ta\tb\n")
    with pytest.raises(InputError, match=r":2: score 7.0 is outside \[0, 5\]"):
        datasets.load_stsb(path)


def test_bundled_files_match_the_checksums_in_their_readme():
    import re

    from bert_compiler.core.artifacts import sha256_file

    table = (datasets.DATA_DIR / "README.md").read_text()
    listed = dict(re.findall(r"^\| (\S+) \| \S+ \| ([0-9a-f]{64}) \|", table, flags=re.M))
    assert set(listed) == {p.name for p in datasets.DATA_DIR.iterdir() if p.suffix != ".md"}
    for name, digest in listed.items():
        assert sha256_file(datasets.DATA_DIR / name) == digest, name


def _peak_mib(function) -> float:
    import tracemalloc

    tracemalloc.start()
    try:
        function()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak / (1 << 20)


def test_a_huge_file_fails_at_its_first_line_in_bounded_memory(tmp_path):
    path = tmp_path / "huge.txt"
    with open(path, "wb") as handle:
        handle.truncate(2 << 30)  # 2 GiB of NUL bytes without a newline, sparse on disk

    def read():
        with pytest.raises(InputError, match=r"huge.txt:1: line is over the 1048576-byte limit"):
            datasets.load_texts(path)

    # Bounded memory; reading the whole file would also run into the per-test timeout.
    assert _peak_mib(read) < 16


def test_calibration_reads_only_what_it_uses(tmp_path):
    from bert_compiler.stages.calibrate import CalibrationSpec, calibration_texts

    path = tmp_path / "big.tsv"
    line = "sentence number {} of a file far larger than what calibration uses\t0\n"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("sentence\tlabel\n")
        handle.writelines(line.format(i) for i in range(400_000))  # about 30 MB
    spec = CalibrationSpec(data=path, num_samples=512)
    result = {}

    def calibrate():
        result["texts"], result["counts"] = calibration_texts(spec)

    assert _peak_mib(calibrate) < 8
    texts, counts = result["texts"], result["counts"]
    assert len(texts) == 512 and texts[0].startswith("sentence number 0 ")
    assert counts == {
        "sentences_read": 512,
        "duplicates_dropped": 0,
        "empty_rows_skipped": 0,
        "used": 512,
        "shortfall": 0,
    }


@pytest.mark.parametrize(
    ("data", "pair_column", "expected"),
    [
        ("q\tp\na one\tb one\na two\t \n\tb three\na four\tb four\n", "p", (2, 2, 3)),
        ('{"s": "a"}\n\n{"s": ""}\n{"s": "b"}\n', None, (2, 1, 3)),
        ("a\n\n\nb\n", None, (2, 0, 0)),  # blank lines of a .txt are no rows
    ],
    ids=["tsv-pairs", "jsonl", "txt"],
)
def test_rows_with_an_empty_text_are_counted_in_the_calibration_record(
    tmp_path, caplog, data, pair_column, expected
):
    from bert_compiler.stages.calibrate import CalibrationSpec, calibration_texts

    kind = ".tsv" if "\t" in data else ".jsonl" if "{" in data else ".txt"
    path = tmp_path / f"data{kind}"
    path.write_text(data)
    column = "q" if kind == ".tsv" else "s"
    spec = CalibrationSpec(data=path, text_column=column, pair_column=pair_column, min_samples=1)
    with caplog.at_level("WARNING", logger="bert_compile"):
        texts, counts = calibration_texts(spec)
    used, skipped, first_line = expected
    assert (len(texts), counts["empty_rows_skipped"]) == (used, skipped)
    if skipped:
        assert f"{skipped} rows with an empty text skipped, the first at line {first_line}" in (
            caplog.text
        )
    else:
        assert "empty text" not in caplog.text
    strict = CalibrationSpec(data=path, text_column=column, pair_column=pair_column, min_samples=5)
    with pytest.raises(InputError, match=f"{used} distinct sentences"):
        calibration_texts(strict)


def test_lines_of_invisible_characters_alone_are_no_sentences(tmp_path):
    """NULs, zero-width spaces, a BOM-like format character or a direction mark alone: skipped
    like an empty line; with nothing visible anywhere, the file has no sentences."""
    path = tmp_path / "texts.txt"
    path.write_text("\x00\x00\n\u200b\u200b\nA real sentence.\n\u2060\u200e\n\u00e9t\u00e9\n")
    assert datasets.load_texts(path) == ["A real sentence.", "\u00e9t\u00e9"]
    path.write_text("\x00\n\u200b\n")
    with pytest.raises(InputError, match="no non-empty sentences"):
        datasets.load_texts(path)
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("sentence1\tsentence2\nfine\t\u200b\nfine\tgood\n")
    skipped = datasets.Skipped()
    rows = list(datasets.iter_pairs(pairs, columns=("sentence1", "sentence2"), skipped=skipped))
    assert rows == [("fine", "good")] and (skipped.rows, skipped.first_line) == (1, 2)
