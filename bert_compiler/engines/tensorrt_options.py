"""TensorRT plan settings that need no TensorRT: optimization profiles (parsed, derived from real
token lengths, chosen per shape), builder options, and the rules for where a plan may run.

Plain Python, tested on any machine; engines/tensorrt.py builds and runs plans with them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bert_compiler.core.errors import InputError

HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
MAX_PROFILE_BATCH = 4096
BUILDER_OPTIMIZATION_LEVELS = (0, 5)


@dataclass(frozen=True)
class Profile:
    """One optimization profile: the batch and sequence ranges an engine accepts, and the shape
    its kernels are tuned for (``opt``)."""

    min_batch: int
    opt_batch: int
    max_batch: int
    min_seq: int
    opt_seq: int
    max_seq: int

    def validate(self, max_positions: int | None = None) -> None:
        """Raises InputError for empty, inverted or absurd ranges."""
        batch = (self.min_batch, self.opt_batch, self.max_batch)
        seq = (self.min_seq, self.opt_seq, self.max_seq)
        if not (1 <= batch[0] <= batch[1] <= batch[2] <= MAX_PROFILE_BATCH):
            raise InputError(
                f"profile batch {batch}: need 1 <= min <= opt <= max <= {MAX_PROFILE_BATCH}"
            )
        limit = max_positions or 1 << 16
        if not (1 <= seq[0] <= seq[1] <= seq[2] <= limit):
            raise InputError(
                f"profile sequence {seq}: need 1 <= min <= opt <= max <= {limit} "
                "(the model's max_position_embeddings)"
            )

    def accepts(self, batch: int, seq: int) -> bool:
        return self.min_batch <= batch <= self.max_batch and self.min_seq <= seq <= self.max_seq

    def shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(min, opt, max) shapes of every [batch, sequence] input."""
        return (
            (self.min_batch, self.min_seq),
            (self.opt_batch, self.opt_seq),
            (self.max_batch, self.max_seq),
        )

    @classmethod
    def parse(cls, text: str) -> Profile:
        """Parse ``BxS:BxS:BxS`` (min, opt, max; batch x sequence), e.g. ``1x8:32x128:64x128``.

        Raises:
            InputError: malformed text.
        """
        try:
            shapes = [tuple(int(v) for v in part.split("x")) for part in text.split(":")]
            if len(shapes) != 3 or any(len(s) != 2 for s in shapes):
                raise ValueError
        except ValueError as err:
            raise InputError(
                f"--profile {text!r}: expected min:opt:max as BxS:BxS:BxS, e.g. 1x8:32x128:64x128"
            ) from err
        (b0, s0), (b1, s1), (b2, s2) = shapes
        return cls(b0, b1, b2, s0, s1, s2)

    def __str__(self) -> str:
        (b0, s0), (b1, s1), (b2, s2) = self.shapes()
        return f"{b0}x{s0}:{b1}x{s1}:{b2}x{s2}"


@dataclass(frozen=True)
class ProfileDerivation:
    """How TensorRT optimization profiles are derived when --profile gives none: from the token
    lengths of real text (the calibration sentences), split at length quantiles (derive_profiles).

    Attributes:
        max_batch: the largest batch of every derived profile.
        buckets: how many sequence ranges.
    """

    max_batch: int = 64
    buckets: int = 2


def derive_profiles(
    token_lengths: Sequence[int],
    *,
    max_batch: int,
    max_length: int,
    buckets: int = ProfileDerivation.buckets,
) -> tuple[Profile, ...]:
    """Profiles from the token lengths of a sample of real inputs.

    Sequence ranges split at length quantiles (rounded up to a multiple of 8, where tensor-core
    kernels tile), so short inputs run on kernels tuned for short shapes; the last profile always
    reaches ``max_length`` so no input is refused. Each profile is tuned at its largest sequence
    and the full batch: the shape that decides throughput.

    Raises:
        InputError: no lengths, or bad limits.
    """
    if not token_lengths:
        raise InputError("cannot derive profiles from an empty dataset")
    if buckets < 1 or max_batch < 1 or max_length < 1:
        raise InputError("profiles need buckets, max_batch and max_length >= 1")
    ordered = sorted(token_lengths)
    bounds: list[int] = []
    for k in range(1, buckets):
        quantile = ordered[min(len(ordered) - 1, math.ceil(k * len(ordered) / buckets) - 1)]
        bound = min(max_length, max(8, -(-quantile // 8) * 8))
        if bound < max_length and (not bounds or bound > bounds[-1]):
            bounds.append(bound)
    bounds.append(max_length)
    profiles = []
    low = 1
    for bound in bounds:
        profiles.append(Profile(1, max_batch, max_batch, low, bound, bound))
        low = bound + 1
    return tuple(profiles)


def select_profile(profiles: Sequence[Profile], batch: int, seq: int) -> int:
    """Index of the profile to run ``[batch, seq]`` with: the narrowest one that accepts it.

    Raises:
        InputError: no profile accepts the shape.
    """
    fits = [i for i, p in enumerate(profiles) if p.accepts(batch, seq)]
    if not fits:
        ranges = ", ".join(str(p) for p in profiles)
        raise InputError(
            f"input shape batch={batch} sequence={seq} is outside every profile of the engine "
            f"({ranges}); rebuild with a --profile that covers it"
        )
    return min(fits, key=lambda i: (profiles[i].max_seq, profiles[i].max_batch))


@dataclass(frozen=True)
class TensorRTOptions:
    """How a plan is built and what it needs at load time.

    Attributes:
        profiles: optimization profiles; empty means derive them from the dataset's token lengths.
        builder_optimization_level: 0-5; higher searches more tactics (slower build).
        workspace_mib: cap on the builder's scratch memory; 0 leaves TensorRT's default.
        timing_cache: file the timing cache is read from and written back to; reused across
            builds (and models) of the same TensorRT version and GPU, it skips re-timing tactics.
        hardware_compatibility: ``none`` (this compute capability only), ``ampere_plus`` (any
            sm80+) or ``same_compute_capability``.
        version_compatible: plan runs on later TensorRT versions; it embeds host code, which the
            loader must explicitly allow.
    """

    profiles: tuple[Profile, ...] = ()
    builder_optimization_level: int = 3
    workspace_mib: int = 0
    timing_cache: str = ""
    hardware_compatibility: str = "none"
    version_compatible: bool = False

    def validate(self, max_positions: int | None = None) -> None:
        low, high = BUILDER_OPTIMIZATION_LEVELS
        if not low <= self.builder_optimization_level <= high:
            raise InputError(
                f"--builder-optimization-level {self.builder_optimization_level}: expected "
                f"{low}-{high}"
            )
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise InputError(
                f"--hardware-compatibility {self.hardware_compatibility!r}: expected one of "
                f"{', '.join(HARDWARE_COMPATIBILITY)}"
            )
        if self.workspace_mib < 0:
            raise InputError(f"--workspace-mib {self.workspace_mib}: must be >= 0")
        for profile in self.profiles:
            profile.validate(max_positions)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["profiles"] = [str(p) for p in self.profiles]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorRTOptions:
        values = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        values["profiles"] = tuple(Profile.parse(p) for p in data.get("profiles", ()))
        return cls(**values)


def target_tag(compute_capability: str, options: TensorRTOptions) -> str:
    """The GPU part of an engine's folder name: ``sm90``, or the compatibility level."""
    if options.hardware_compatibility == "ampere_plus":
        return "ampere_plus"
    return "sm" + compute_capability.replace(".", "")


def compatibility_problems(
    *,
    built_tensorrt: str,
    built_compute_capability: str,
    options: TensorRTOptions,
    runtime_tensorrt: str,
    runtime_compute_capability: str,
) -> list[str]:
    """Why a plan built with ``built_*`` cannot run here (empty when it can).

    TensorRT's own rules: a plan runs only on the TensorRT version that built it unless it is
    version-compatible (then on the same or a later version of that major, and TensorRT 10 plans
    on 11); only on the building GPU's compute capability unless built hardware-compatible
    (``ampere_plus``: any sm80 or newer).
    """
    problems = []
    built_v = tuple(int(p) for p in built_tensorrt.split(".")[:3] if p.isdigit())
    runtime_v = tuple(int(p) for p in runtime_tensorrt.split(".")[:3] if p.isdigit())
    if options.version_compatible:
        if runtime_v < built_v or runtime_v[:1] > (built_v[0] + 1,):
            problems.append(
                f"TensorRT {runtime_tensorrt} cannot run a version-compatible plan built with "
                f"{built_tensorrt} (needs that version or a later one, up to the next major)"
            )
    elif runtime_v != built_v:
        problems.append(
            f"plan built with TensorRT {built_tensorrt}, this machine has {runtime_tensorrt}; "
            "rebuild it here (or build with --version-compatible)"
        )
    built_cc = tuple(int(p) for p in built_compute_capability.split("."))
    runtime_cc = tuple(int(p) for p in runtime_compute_capability.split("."))
    if options.hardware_compatibility == "ampere_plus":
        if runtime_cc < (8, 0):
            problems.append(
                f"plan is hardware-compatible for Ampere and newer; this GPU is sm"
                f"{runtime_compute_capability.replace('.', '')}"
            )
    elif runtime_cc != built_cc:
        problems.append(
            f"plan built for compute capability {built_compute_capability}, this GPU is "
            f"{runtime_compute_capability}; build an engine for this GPU (--target auto)"
        )
    return problems
