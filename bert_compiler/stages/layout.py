"""Where everything goes under OUT, and how engine folders are found again.

Output tree under ``out``::

    export/    model.onnx + manifest.json
    simplify/  model.onnx + manifest.json
    fuse/      model.onnx + manifest.json
    calibrate/ model.onnx (Q/DQ INT8, standard ops: the input of every INT8 engine), scales.json,
               ranges.json (every activation amax, reused when only --keep-float changes),
               calibration.cache (TensorRT) + manifest.json
    calibrate-fp8/ the same with float8 e4m3fn Q/DQ (calibrate --format fp8; the input of the
               TensorRT fp8 engine), no calibration.cache
    engines/<model>/<engine>/  engine + manifest.json; <engine> names backend and version, device
                               or GPU, precision: ort1.32.0-cpu-fp32, trt10.13.3-sm90-fp16 ...
    engines/timing-cache/      TensorRT timing caches, one per TensorRT version and GPU
    verify/<model>/<engine>/   report.json + manifest.json
    select/<model>/<engine>/   the same, on the selection split (the INT8 fallback's rounds)
    triton/                    Triton model repository of the run's engines (triton/)
    run.json   the summary ``run --json`` prints
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bert_compiler.calibration.qdq import INT8
from bert_compiler.core.artifacts import ArtifactDir
from bert_compiler.core.errors import InputError

DEFAULT_OUT = Path("bert-compile-out")
SUMMARY_FILE = "run.json"
REPOSITORY_FOLDER = "triton"


def model_slug(name: str) -> str:
    """A model name safe as one path component."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")
    return slug or "model"


@dataclass(frozen=True)
class Layout:
    """Where each stage of one run writes."""

    root: Path

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def simplify(self) -> Path:
        return self.root / "simplify"

    @property
    def fuse(self) -> Path:
        return self.root / "fuse"

    def engines(self, model: str) -> Path:
        return self.root / "engines" / model_slug(model)

    def engine(self, model: str, name: str) -> Path:
        return self.engines(model) / name

    def timing_cache(self, tensorrt_version: str, compute_capability: str) -> Path:
        sm = compute_capability.replace(".", "")
        return self.root / "engines" / "timing-cache" / f"trt{tensorrt_version}-sm{sm}.cache"

    @property
    def calibrate(self) -> Path:
        return self.root / "calibrate"

    def calibration(self, format: str) -> Path:
        """The calibrate folder of one quantized format (calibration/qdq.py QUANTIZED_FORMATS):
        ``calibrate`` for INT8, ``calibrate-fp8`` (the TensorRT fp8 engine's source_stage)."""
        return self.calibrate if format == INT8.name else self.root / f"calibrate-{format}"

    def verify(self, model: str, name: str) -> Path:
        return self.root / "verify" / model_slug(model) / name

    def selection(self, model: str, name: str) -> Path:
        return self.root / "select" / model_slug(model) / name

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def repository(self) -> Path:
        return self.root / REPOSITORY_FOLDER

    @property
    def repository_reports(self) -> Path:
        """Where verify --repository writes its reports (one folder per Triton model)."""
        return self.root / "verify" / "repository"


def find_engine(
    layout: Layout, model: str, engine_dir: Path | None, precision: str | None
) -> tuple[Path, str]:
    """The engine folder to verify and its precision: ``engine_dir`` if given, else the only
    complete engine of ``precision`` (any, when None) under OUT/engines/MODEL.

    Raises:
        InputError: no such engine, or several and none chosen.
    """

    def precision_of(folder: Path) -> str | None:
        manifest = ArtifactDir(folder).read_manifest()
        return (manifest or {}).get("spec", {}).get("precision")

    if engine_dir is not None:
        return Path(engine_dir), precision or precision_of(Path(engine_dir)) or "fp32"
    root = layout.engines(model)
    candidates = [
        folder
        for folder in sorted(root.glob("*"))
        if folder.is_dir()
        and precision_of(folder) is not None
        and (precision is None or precision_of(folder) == precision)
    ]
    if len(candidates) != 1:
        found = ", ".join(c.name for c in candidates) or "none"
        raise InputError(
            f"{root}: {len(candidates)} engines{' of ' + precision if precision else ''} "
            f"({found}); pass --engine FOLDER"
        )
    return candidates[0], precision_of(candidates[0]) or "fp32"
