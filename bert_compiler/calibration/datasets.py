"""Strict readers for the sample data and for users' text files.

The files are TAB-separated, UTF-8, LF, one header line, never quoted. Anything else (a BOM, CRLF,
undecodable bytes, a wrong column count, an absurdly long line) is an error naming the file and
line, not a silently skipped row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bert_compiler.core.errors import InputError
from bert_compiler.core.files import open_regular_file

DATA_DIR = Path(__file__).resolve().parent / "data"
STSB_DEV = DATA_DIR / "stsb-dev.tsv"
SST2_DEV = DATA_DIR / "sst2-dev.tsv"
CALIBRATION_SENTENCES = DATA_DIR / "calibration-sentences.tsv"
# Text pairs for cross-encoders: STS-B train pairs (never the dev pairs their metric is on).
CALIBRATION_PAIRS = DATA_DIR / "calibration-pairs.tsv"
# The two text columns of the STS-B files: a cross-encoder's (text, text_pair).
PAIR_COLUMNS = ("sentence1", "sentence2")
# The selection split: train rows that INT8 choices are made on (scripts/make_selection_split.py),
# so the dev sets above are only reported.
STSB_SELECTION = DATA_DIR / "stsb-selection.tsv"
SST2_SELECTION = DATA_DIR / "sst2-selection.tsv"
MAX_LINE_BYTES = 1 << 20
# The column (TSV) or key (JSONL) that holds the text unless the user names another.
TEXT_COLUMN = "sentence"


@dataclass
class Skipped:
    """Data rows a text reader left out because a text (or one side of a pair) is empty or
    invisible: how many, and the first one's line. Blank lines of a .txt or .jsonl file are not
    rows."""

    rows: int = 0
    first_line: int = 0

    def add(self, line: int) -> None:
        self.rows += 1
        self.first_line = self.first_line or line


@dataclass(frozen=True)
class SentencePairs:
    """STS-style pairs with a gold similarity score each."""

    sentences1: list[str]
    sentences2: list[str]
    scores: list[float]


@dataclass(frozen=True)
class LabeledSentences:
    """Single sentences with an integer class label each."""

    sentences: list[str]
    labels: list[int]


def iter_tsv(
    path: Path, columns: tuple[str, ...], *, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[tuple[int, dict[str, str]]]:
    """Stream a strict TSV file: (line number, the named columns) of each data row, read one
    line at a time, so memory stays bounded by the rows the caller keeps.

    Raises:
        InputError: missing or empty file, bad encoding, BOM, CRLF, missing header column,
            wrong column count or an over-long line; the message names the line. A file with
            a header and no rows raises once the stream is exhausted.
    """
    path = Path(path)
    header: list[str] | None = None
    rows = 0
    for number, line in _strict_lines(path, max_line_bytes):
        fields = line.split("\t")
        if header is None:
            header = fields
            missing = [c for c in columns if c not in header]
            if missing:
                raise InputError(
                    f"{path}:1: header {header} lacks column(s) {missing}; the first line must "
                    "name the columns"
                )
            positions = {c: header.index(c) for c in columns}
            continue
        if len(fields) != len(header):
            raise InputError(
                f"{path}:{number}: {len(fields)} fields, header has {len(header)} "
                "(TAB-separated, no quoting)"
            )
        rows += 1
        yield number, {c: fields[i] for c, i in positions.items()}
    if not rows:
        raise InputError(f"{path}: header only, no data rows")


def read_tsv(
    path: Path, columns: tuple[str, ...], *, max_line_bytes: int = MAX_LINE_BYTES
) -> list[dict[str, str]]:
    """Read a strict TSV file and return the named columns of every row (iter_tsv, kept).

    Raises:
        InputError: as iter_tsv.
    """
    return [row for _, row in iter_tsv(path, columns, max_line_bytes=max_line_bytes)]


STSB_COLUMNS = ("sentence1", "sentence2", "score")


def iter_stsb(path: Path = STSB_DEV) -> Iterator[tuple[int, str, str, float]]:
    """Stream STS Benchmark rows: (line number, sentence1, sentence2, score in [0, 5]).

    Raises:
        InputError: as iter_tsv, and a score that is not a number in [0, 5] (at its line).
    """
    for number, row in iter_tsv(path, STSB_COLUMNS):
        try:
            score = float(row["score"])
        except ValueError as err:
            raise InputError(f"{path}:{number}: score {row['score']!r} is not a number") from err
        if not 0.0 <= score <= 5.0:
            raise InputError(f"{path}:{number}: score {score} is outside [0, 5]")
        yield number, row["sentence1"], row["sentence2"], score


def load_stsb(path: Path = STSB_DEV) -> SentencePairs:
    """STS Benchmark pairs (columns sentence1, sentence2, score in [0, 5]; iter_stsb, kept)."""
    rows = list(iter_stsb(path))
    return SentencePairs(
        sentences1=[first for _, first, _, _ in rows],
        sentences2=[second for _, _, second, _ in rows],
        scores=[score for *_, score in rows],
    )


def load_sst2(path: Path = SST2_DEV) -> LabeledSentences:
    """SST-2 sentences with labels 0/1 (columns sentence, label)."""
    rows = read_tsv(path, ("sentence", "label"))
    labels = []
    for number, row in enumerate(rows, start=2):
        if row["label"] not in ("0", "1"):
            raise InputError(f"{path}:{number}: label {row['label']!r} is not 0 or 1")
        labels.append(int(row["label"]))
    return LabeledSentences(sentences=[r["sentence"].strip() for r in rows], labels=labels)


def iter_texts(
    path: Path,
    *,
    column: str = TEXT_COLUMN,
    max_line_bytes: int = MAX_LINE_BYTES,
    skipped: Skipped | None = None,
) -> Iterator[str]:
    """Stream the non-empty sentences of a TSV (named column), JSONL (named key) or TXT (one per
    line) file, one line at a time: the caller decides how many it keeps.

    Raises:
        InputError: unreadable or malformed file (at the first bad line), a row without the
            column, or (once exhausted) no sentences at all.
    """
    for (text,) in _iter_fields(Path(path), (column,), max_line_bytes, skipped):
        yield text


def iter_pairs(
    path: Path,
    *,
    columns: tuple[str, str] = PAIR_COLUMNS,
    max_line_bytes: int = MAX_LINE_BYTES,
    skipped: Skipped | None = None,
) -> Iterator[tuple[str, str]]:
    """Stream the (text, text_pair) pairs of two columns of a TSV (or two keys of a JSONL) file,
    as iter_texts streams one: rows with an empty side are skipped.

    Raises:
        InputError: as iter_texts, and for a .txt file (one text a line, no pairs).
    """
    if Path(path).suffix.lower() == ".txt":
        raise InputError(
            f"{path}: a .txt file holds one text a line; text pairs need a .tsv or .jsonl file "
            "with both columns"
        )
    for fields in _iter_fields(Path(path), columns, max_line_bytes, skipped):
        yield fields[0], fields[1]


def _visible(text: str) -> bool:
    """Whether a text holds a visible character: one of NULs, zero-width or other format and
    control characters alone is no sentence (a tokenizer makes it [CLS] [SEP], and calibration
    would count it as one)."""
    return any(char.isprintable() and not char.isspace() for char in text)


def _iter_fields(
    path: Path, columns: tuple[str, ...], max_line_bytes: int, skipped: Skipped | None = None
) -> Iterator[tuple[str, ...]]:
    """The stripped ``columns`` of every row of a TSV, JSONL or TXT (one column: the line) file
    whose fields are all non-empty; the others are counted in ``skipped``."""
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".txt", ".jsonl"):
        raise InputError(f"{path}: unsupported dataset type {suffix!r}; use .tsv, .txt or .jsonl")
    found = False
    if suffix == ".tsv":
        lines = (
            (n, [row[c] for c in columns])
            for n, row in iter_tsv(path, columns, max_line_bytes=max_line_bytes)
        )
    else:
        lines = ((n, [line]) for n, line in _strict_lines(path, max_line_bytes))
    for number, fields in lines:
        if suffix == ".jsonl":
            if not fields[0].strip():
                continue
            try:
                record = json.loads(fields[0])
            except (json.JSONDecodeError, RecursionError) as err:
                raise InputError(f"{path}:{number}: not valid JSON ({err})") from err
            values = [record.get(c) if isinstance(record, dict) else None for c in columns]
            strings: list[str] = []
            for name, value in zip(columns, values, strict=True):
                if not isinstance(value, str):
                    raise InputError(f"{path}:{number}: no string field {name!r}")
                strings.append(value)
            fields = strings
        texts = tuple(text.strip() for text in fields)
        if all(map(_visible, texts)):
            found = True
            yield texts
        elif skipped is not None and suffix != ".txt":
            skipped.add(number)
    if not found:
        raise InputError(f"{path}: no non-empty sentences")


def load_texts(
    path: Path, *, column: str = TEXT_COLUMN, max_line_bytes: int = MAX_LINE_BYTES
) -> list[str]:
    """Every non-empty sentence of a dataset file (iter_texts, kept).

    Raises:
        InputError: as iter_texts.
    """
    return list(iter_texts(path, column=column, max_line_bytes=max_line_bytes))


_BOM = b"\xef\xbb\xbf"


def _strict_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8, LF, BOM-free file, read one line at a time: a line over
    ``max_line_bytes`` is refused after reading at most that many bytes of it.

    Raises:
        InputError: missing file, not a regular file (a folder, a device, a pipe), a BOM,
            CRLF, undecodable bytes, an over-long line, or (once exhausted) a file with nothing
            but whitespace.
    """
    # Regular files only: a FIFO would block until a writer came, and /dev/zero never ends.
    handle = open_regular_file(path, "dataset file")  # closed by the with block below
    content = False
    with handle:
        number = 0
        while True:
            try:
                raw = handle.readline(max_line_bytes + 1)
            except OSError as err:
                raise InputError(f"{path}: cannot read the dataset file ({err.strerror})") from err
            if not raw:
                break
            number += 1
            line = raw[:-1] if raw.endswith(b"\n") else raw
            if len(line) > max_line_bytes:
                raise InputError(f"{path}:{number}: line is over the {max_line_bytes}-byte limit")
            if number == 1 and line.startswith(_BOM):
                raise InputError(
                    f"{path}:1: file starts with a UTF-8 byte-order mark; save it without one"
                )
            if line.endswith(b"\r"):
                raise InputError(f"{path}:{number}: CRLF line ending; convert the file to LF")
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(
                    f"{path}:{number}: not valid UTF-8 at byte {err.start}; re-encode the file "
                    "as UTF-8"
                ) from err
            content = content or bool(text.strip())
            yield number, text
    if not content:
        raise InputError(f"{path}: dataset file is empty")
