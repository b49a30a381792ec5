#!/usr/bin/env python3
"""Write the bundled selection split (calibration/data/stsb-selection.tsv, sst2-selection.tsv)
from the shared train files: the rows that INT8 choices (the precision fallback's gate, the
calibration method and percentile) are made on, so that the dev sets are only ever reported.

Rows are drawn with a fixed seed from STS-B train and SST-2 train, leaving out every row with a
sentence that is in the calibration sentences or in either dev set; rows are kept as they are
(all columns, file order). Re-running it reproduces the files byte for byte.

    .venv/bin/python scripts/make_selection_split.py ../shared/data

``--rest FILE`` also writes the STS-B train pairs left out of the sample (still disjoint from the
calibration sentences and dev): a second selection set, for a choice the first one cannot make.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

from bert_compiler.calibration import datasets

SEED = 20261124
STSB_PAIRS = 1500
SST2_SENTENCES = 872
# SST-2 train is mostly phrases; the parity and metric rows of the selection split are sentences.
SST2_MIN_WORDS = 6


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        return header, list(reader)


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    text = "".join("\t".join(row) + "\n" for row in [header, *rows])
    path.write_text(text, encoding="utf-8", newline="")
    print(f"{path}: {len(rows)} rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shared", type=Path, help="the shared data folder (stsb-train.tsv, ...)")
    parser.add_argument("--rest", type=Path, help="write the STS-B pairs not sampled here")
    args = parser.parse_args()
    seen = {s.strip() for s in datasets.load_texts(datasets.CALIBRATION_SENTENCES)}
    dev = datasets.load_stsb(datasets.STSB_DEV)
    seen |= {s.strip() for s in dev.sentences1 + dev.sentences2}
    seen |= set(datasets.load_sst2(datasets.SST2_DEV).sentences)

    header, rows = _rows(args.shared / "stsb-train.tsv")
    first, second = header.index("sentence1"), header.index("sentence2")
    fresh = [i for i, r in enumerate(rows) if not {r[first].strip(), r[second].strip()} & seen]
    keep = sorted(random.Random(SEED).sample(fresh, STSB_PAIRS))
    _write(datasets.STSB_SELECTION, header, [rows[i] for i in keep])
    if args.rest:
        sampled = set(keep)
        _write(args.rest, header, [rows[i] for i in fresh if i not in sampled])

    header, rows = _rows(args.shared / "sst2-train.tsv")
    column = header.index("sentence")
    distinct: dict[str, int] = {}
    for i, row in enumerate(rows):
        text = row[column].strip()
        if len(text.split()) >= SST2_MIN_WORDS and text not in seen:
            distinct.setdefault(text, i)
    keep = sorted(random.Random(SEED).sample(sorted(distinct.values()), SST2_SENTENCES))
    _write(datasets.SST2_SELECTION, header, [rows[i] for i in keep])


if __name__ == "__main__":
    main()
