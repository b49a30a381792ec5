"""Feed handling every backend shares: the missing-input check and the numpy <-> GPU round trip."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bert_compiler.core.errors import InputError


def require_inputs(path: Path, input_names: Sequence[str], feeds: Mapping[str, Any]) -> None:
    """Raises InputError naming the engine and the inputs ``feeds`` lacks."""
    missing = set(input_names) - set(feeds)
    if missing:
        raise InputError(f"{path}: feeds lack inputs {sorted(missing)}")


def run_numpy_on_gpu(
    run_device: Callable[[dict[str, Any]], dict[str, Any]],
    input_names: Sequence[str],
    feeds: Mapping[str, Any],
) -> dict[str, Any]:
    """Copy numpy feeds to the GPU, run, and return float32 numpy outputs (what verify compares)."""
    import torch

    outputs = run_device({n: torch.from_numpy(feeds[n]).to("cuda") for n in input_names})
    return {n: t.float().cpu().numpy() for n, t in outputs.items()}
