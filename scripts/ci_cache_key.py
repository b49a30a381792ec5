#!/usr/bin/env python3
"""Print the CI cache key of an output tree: what its manifests' input hashes depend on.

The key hashes the config file, the model's files (the fingerprint every manifest records), the
installed tool versions, this checkout's bert-compiler sources and the GPUs of the runner. A
restored cache whose key matches is reused stage by stage: each stage still checks its own
manifest (inputs, settings, versions, output sha256) before skipping, so a stale cache costs a
rebuild, never a wrong engine.

    python scripts/ci_cache_key.py --config docs/pipeline.toml
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sources_sha256() -> str:
    """One hash over bert-compiler's own code (an engine depends on the code that built it)."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "bert_compiler").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def main() -> int:
    from bert_compiler.cli.config import read_toml
    from bert_compiler.core.artifacts import sha256_file, sha256_json, tool_versions
    from bert_compiler.core.errors import BertCompileError
    from bert_compiler.core.targets import detect
    from bert_compiler.models.loading import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args()
    try:
        config = read_toml(args.config)
        model = config.get("run", {}).get("model", config.get("model", "default"))
        beside = args.config.resolve().parent / model
        info = resolve_model(beside if beside.exists() else model)
    except BertCompileError as err:
        print(f"ci_cache_key: {err}", file=sys.stderr)
        return err.exit_code
    gpus = [(g.name, g.compute_capability) for g in detect().gpus]
    key = sha256_json(
        {
            "config": sha256_file(args.config),
            "model": info.fingerprint()["sha256"],
            "versions": tool_versions(),
            "sources": sources_sha256(),
            "gpus": gpus,
        }
    )
    print(key[:32])
    return 0


if __name__ == "__main__":
    sys.exit(main())
