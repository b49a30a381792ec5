"""Strict readers for the sample data and for users' text files.

The files are TAB-separated, UTF-8, LF, one header line, never quoted. Anything else (a BOM, CRLF,
undecodable bytes, a wrong column count, an absurdly long line) is an error naming the file and
line, not a silently skipped row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bert_compiler.core.errors import InputError

DATA_DIR = Path(__file__).resolve().parent / "data"
STSB_DEV = DATA_DIR / "stsb-dev.tsv"
SST2_DEV = DATA_DIR / "sst2-dev.tsv"
CALIBRATION_SENTENCES = DATA_DIR / "calibration-sentences.tsv"
MAX_LINE_BYTES = 1 << 20
# The column (TSV) or key (JSONL) that holds the text unless the user names another.
TEXT_COLUMN = "sentence"


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


def read_tsv(
    path: Path, columns: tuple[str, ...], *, max_line_bytes: int = MAX_LINE_BYTES
) -> list[dict[str, str]]:
    """Read a strict TSV file and return the named columns of every row.

    Args:
        path: the file.
        columns: columns that must be in the header; only these are returned.
        max_line_bytes: longest line accepted.

    Raises:
        InputError: missing or empty file, bad encoding, BOM, CRLF, missing header column,
            wrong column count or an over-long line; the message names the line.
    """
    path = Path(path)
    header: list[str] | None = None
    rows: list[dict[str, str]] = []
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
            continue
        if len(fields) != len(header):
            raise InputError(
                f"{path}:{number}: {len(fields)} fields, header has {len(header)} "
                "(TAB-separated, no quoting)"
            )
        rows.append({c: fields[header.index(c)] for c in columns})
    if not rows:
        raise InputError(f"{path}: header only, no data rows")
    return rows


def load_stsb(path: Path = STSB_DEV) -> SentencePairs:
    """STS Benchmark pairs (columns sentence1, sentence2, score in [0, 5])."""
    rows = read_tsv(path, ("sentence1", "sentence2", "score"))
    scores = []
    for number, row in enumerate(rows, start=2):
        try:
            score = float(row["score"])
        except ValueError as err:
            raise InputError(f"{path}:{number}: score {row['score']!r} is not a number") from err
        if not 0.0 <= score <= 5.0:
            raise InputError(f"{path}:{number}: score {score} is outside [0, 5]")
        scores.append(score)
    return SentencePairs(
        sentences1=[r["sentence1"] for r in rows],
        sentences2=[r["sentence2"] for r in rows],
        scores=scores,
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


def load_texts(
    path: Path, *, column: str = TEXT_COLUMN, max_line_bytes: int = MAX_LINE_BYTES
) -> list[str]:
    """Sentences from a TSV (named column), JSONL (named key) or TXT (one per line) file.

    Raises:
        InputError: unreadable or malformed file, a row without the column, or no sentences.
    """
    import json

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        texts = [
            row[column].strip() for row in read_tsv(path, (column,), max_line_bytes=max_line_bytes)
        ]
    elif suffix in (".txt", ".jsonl"):
        lines = _strict_lines(path, max_line_bytes)
        texts = []
        for number, line in lines:
            if suffix == ".txt":
                texts.append(line.strip())
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            value = record.get(column) if isinstance(record, dict) else None
            if not isinstance(value, str):
                raise InputError(f"{path}:{number}: no string field {column!r}")
            texts.append(value.strip())
    else:
        raise InputError(f"{path}: unsupported dataset type {suffix!r}; use .tsv, .txt or .jsonl")
    texts = [t for t in texts if t]
    if not texts:
        raise InputError(f"{path}: no non-empty sentences")
    return texts


def _strict_lines(path: Path, max_line_bytes: int) -> list[tuple[int, str]]:
    """(line number, text) of a UTF-8, LF, BOM-free file, with the same checks as read_tsv."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise InputError(f"{path}: dataset file not found") from err
    except IsADirectoryError as err:
        raise InputError(f"{path}: is a folder, expected a file") from err
    if not data.strip():
        raise InputError(f"{path}: dataset file is empty")
    if data.startswith(b"\xef\xbb\xbf"):
        raise InputError(f"{path}:1: file starts with a UTF-8 byte-order mark; save it without one")
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    decoded = []
    for number, raw in enumerate(lines, start=1):
        if len(raw) > max_line_bytes:
            raise InputError(
                f"{path}:{number}: line is {len(raw)} bytes, over the {max_line_bytes}-byte limit"
            )
        if raw.endswith(b"\r"):
            raise InputError(f"{path}:{number}: CRLF line ending; convert the file to LF")
        try:
            decoded.append((number, raw.decode("utf-8")))
        except UnicodeDecodeError as err:
            raise InputError(
                f"{path}:{number}: not valid UTF-8 at byte {err.start}; re-encode the file as UTF-8"
            ) from err
    return decoded
