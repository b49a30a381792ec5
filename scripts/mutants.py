#!/usr/bin/env python3
"""The mutation check: named bugs planted one at a time in the product's core promises, each run
against the tests that should catch it. A mutant the tests do not fail on has survived, and the
promise it breaks is untested. Run by `scripts/test.sh --mutants` (not in every CI run):

    .venv/bin/python scripts/mutants.py [--json] [NAME ...]

Each mutant is one exact text replacement in one file (refused if the text is not there exactly
once: the code moved, update the mutant). The file is restored after its run, also on Ctrl-C;
the check refuses to start when a file it mutates has uncommitted changes, so `git checkout` of
that file is always a safe repair after a crash. Exit status: 0 when every mutant was killed, 1
when one survived, 2 for bad arguments or a stale mutant.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    promise: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = (
    Mutant(
        "outputs-out-of-order",
        "the runtime returns each row's outputs at its input position",
        "bert_compiler/runtime/outputs.py",
        "            self.rowwise[name][batch.rows] = value",
        "            self.rowwise[name][np.sort(batch.rows)] = value",
        ("tests/runtime/test_runtime.py",),
    ),
    Mutant(
        "stream-window-order",
        "encode returns a stream's windows in input order",
        "bert_compiler/runtime/encoder.py",
        "        return {name: _joined([part[name] for part in parts]) for name in parts[0]}",
        "        return {name: _joined([part[name] for part in parts[::-1]]) for name in parts[0]}",
        ("tests/runtime/test_token_rows.py",),
    ),
    Mutant(
        "parity-max-abs-err-ignored",
        "parity fails an engine past its max_abs_err",
        "bert_compiler/runtime/parity.py",
        "        if self.max_abs_err > tolerance.max_abs_err:",
        "        if self.max_abs_err > tolerance.max_abs_err * 1e6:",
        ("tests/stages/test_gates_nan.py", "tests/runtime/test_parity.py"),
    ),
    Mutant(
        "parity-rel-l2-ignored",
        "parity fails an engine past its rel_l2_err",
        "bert_compiler/runtime/parity.py",
        "        if self.rel_l2_err > tolerance.rel_l2_err:",
        "        if self.rel_l2_err > tolerance.rel_l2_err * 1e6:",
        ("tests/stages/test_gates_nan.py", "tests/runtime/test_parity.py"),
    ),
    Mutant(
        "parity-nan-limit-passes",
        "a NaN limit fails parity instead of passing everything",
        "bert_compiler/runtime/parity.py",
        "            if math.isnan(value)\n",
        "            if False\n",
        ("tests/stages/test_gates_nan.py",),
    ),
    Mutant(
        "nan-metric-passes",
        "a NaN or infinite task metric fails the metric gate",
        "bert_compiler/stages/verify.py",
        "        if result.value is not None and not math.isfinite(result.value)\n",
        "        if False\n",
        ("tests/stages/test_gates_nan.py",),
    ),
    Mutant(
        "calibration-reads-padding",
        "calibration ranges come from real tokens, never padding",
        "bert_compiler/calibration/ranges.py",
        "        return value[mask.astype(bool)]",
        "        return value.reshape(-1, *value.shape[2:])",
        ("tests/calibration/test_calibration.py",),
    ),
    Mutant(
        "engine-hash-unchecked",
        "an artifact whose bytes differ from its manifest is refused",
        "bert_compiler/core/artifacts.py",
        '        if actual != entry.get("sha256"):',
        "        if False:",
        ("tests/core/test_artifacts.py", "tests/product/test_hostile.py"),
    ),
    Mutant(
        "gate-tokenizer-unchecked",
        "the gate compares the repository's tokenizer with the pipeline's tokenization",
        "bert_compiler/triton/tokenizer_json.py",
        "                if got.shape != wanted.shape or (got != wanted).any():",
        "                if False:",
        ("tests/triton/test_package.py",),
    ),
    Mutant(
        "pairs-truncated-first-only",
        "pairs are truncated longest first, as the Hugging Face tokenizer does",
        "bert_compiler/runtime/token_rows.py",
        'enable_truncation(max_length, strategy="longest_first", direction=direction)',
        'enable_truncation(max_length, strategy="only_first", direction=direction)',
        ("tests/runtime/test_token_rows.py",),
    ),
    Mutant(
        "truncation-side-ignored",
        "a left-truncating tokenizer keeps each row's last tokens",
        "bert_compiler/runtime/token_rows.py",
        "                content = content[:limit] if right else content[len(content) - limit :]",
        "                content = content[:limit]",
        ("tests/runtime/test_token_rows.py",),
    ),
    Mutant(
        "fusion-counts-unchecked",
        "fuse refuses a graph whose fused operators fall short",
        "bert_compiler/stages/fuse.py",
        "    problems = compare_fusions(fused, expected)",
        "    problems = []",
        ("tests/stages/test_fuse.py",),
    ),
    Mutant(
        "fallback-float-limit-ignored",
        "the INT8 fallback keeps at most --fallback-max-float of the MatMuls in float",
        "bert_compiler/stages/fallback.py",
        "        return math.floor(self.max_float * quantizable + 1e-9)",
        "        return quantizable",
        ("tests/run/test_int8_pipeline.py",),
    ),
    Mutant(
        "text-model-rows-shifted",
        "the torch text model answers each request with its own rows",
        "bert_compiler/triton/torch_text_model.py",
        "            taken = slice(first, first + len(request))",
        "            taken = slice(0, len(request))",
        ("tests/engines/test_torch_engine.py",),
    ),
)


@dataclass
class Outcome:
    name: str
    promise: str
    killed: bool
    killed_by: str
    seconds: float


def _check_clean(paths: set[str]) -> None:
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", *sorted(paths)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if dirty:
        sys.exit(f"mutants: uncommitted changes in files it mutates; commit them first:\n{dirty}")


def run_mutant(mutant: Mutant) -> Outcome:
    path = ROOT / mutant.path
    original = path.read_text(encoding="utf-8")
    if original.count(mutant.old) != 1:
        sys.exit(
            f"mutants: {mutant.name}: the text to replace is in {mutant.path} "
            f"{original.count(mutant.old)} times, not once; update the mutant"
        )
    started = time.perf_counter()
    try:
        path.write_text(original.replace(mutant.old, mutant.new), encoding="utf-8")
        tests = [t for t in mutant.tests if (ROOT / t).is_file()]
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf",
             "-m", "not slow", *tests],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )  # fmt: skip
    finally:
        path.write_text(original, encoding="utf-8")
    # A test id's parameters may hold spaces: "FAILED path::name[a b] - reason".
    failed = re.findall(r"^FAILED (\S+?(?:\[[^\]]*\])?)(?: - |$)", done.stdout, flags=re.MULTILINE)
    errors = re.findall(r"^ERROR (\S+?(?:\[[^\]]*\])?)(?: - |$)", done.stdout, flags=re.MULTILINE)
    killer = (failed or errors or [""])[0]
    return Outcome(
        mutant.name,
        mutant.promise,
        killed=done.returncode != 0 and bool(killer),
        killed_by=killer,
        seconds=round(time.perf_counter() - started, 1),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only these mutants")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTANTS}
    unknown = sorted(set(args.names) - set(known))
    if unknown:
        parser.error(f"no mutant {', '.join(unknown)} (known: {', '.join(known)})")
    chosen = [known[n] for n in args.names] if args.names else list(MUTANTS)
    _check_clean({m.path for m in chosen})
    outcomes = []
    for mutant in chosen:
        outcome = run_mutant(mutant)
        outcomes.append(outcome)
        verdict = f"killed by {outcome.killed_by}" if outcome.killed else "SURVIVED"
        print(f"{mutant.name:<30} {verdict} ({outcome.seconds:.0f} s)", flush=True)
    survived = [o.name for o in outcomes if not o.killed]
    print(f"{len(outcomes) - len(survived)} of {len(outcomes)} mutants killed")
    if args.json:
        print(json.dumps({"mutants": [asdict(o) for o in outcomes], "survived": survived}))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
