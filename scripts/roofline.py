#!/usr/bin/env python3
"""Each row of a bench.json as a share of the model's roofline on the GPU it ran on
(bert_compiler/bench/roofline.py): for bench runs recorded before bench reported it.

    python scripts/roofline.py BENCH_JSON --shape LAYERS,HIDDEN,INTERMEDIATE

Prints the roofline at the data's mean row length, then one line per engine and peer row:
sentences/s and the share of the limit at that row's mean length (fixed shapes: their sequence).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

from bert_compiler.bench.measure import with_roofline
from bert_compiler.bench.report import BenchDevice, Measurement


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json", type=Path)
    parser.add_argument("--shape", required=True, help="layers,hidden,intermediate")
    args = parser.parse_args()
    try:
        layers, hidden, intermediate = (int(n) for n in args.shape.split(","))
        if min(layers, hidden, intermediate) < 1:
            raise ValueError("--shape: sizes of 1 or more")
        report = json.loads(args.bench_json.read_text())
        device = BenchDevice(**report["device"])
        known = {f.name for f in fields(Measurement)}
        rows = [
            Measurement(**{k: v for k, v in r.items() if k in known}) for r in report["results"]
        ]
        real = [r for r in rows if r.data == "real" and not r.runner.startswith("tokenizer")]
        if not real or not all(r.sentences_per_s > 0 for r in real):
            raise ValueError("no engine or peer row on real text to take the mean length from")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        print(f"roofline: {args.bench_json}: {err}", file=sys.stderr)
        return 2
    config = {
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
    }
    mean = sum(r.tokens_per_s for r in real) / sum(r.sentences_per_s for r in real)
    rows, roof = with_roofline(rows, SimpleNamespace(config=config), device, mean)
    if roof is None:
        print(f"roofline: no roofline for {device.name}", file=sys.stderr)
        return 2
    print(json.dumps(roof.to_json()))
    for row in rows:
        if row.roofline_fraction is not None:
            shape = f"{row.batch}x{row.seq}" if row.data == "fixed" else row.batching
            print(
                f"{row.runner[:60]:<60} {shape[:40]:<40} {row.sentences_per_s:>10,.0f} "
                f"{row.roofline_fraction:>6.1%}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
