"""The commands' option groups (cli/option_group.py): each owns its command-line flags and builds
the frozen spec they describe. A command lists the groups it uses (``@uses(...)``) and calls each
group's ``parse`` on the values click hands it. The backends' own flags are their groups in
cli/backend_flags.py, which TargetOptions gathers.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from bert_compiler.calibration import datasets
from bert_compiler.calibration.qdq import (
    OPTIONAL_QUANTIZED_OPS,
    QUANTIZED_FORMATS,
    WEIGHT_GRANULARITIES,
)
from bert_compiler.calibration.ranges import METHODS
from bert_compiler.cli.backend_flags import BACKEND_FLAGS, TENSORRT_FLAGS
from bert_compiler.cli.config import PerPrecisionOption, per_precision_values
from bert_compiler.cli.option_group import (
    Decorator,
    OptionGroup,
    Values,
    default_of,
    given,
)
from bert_compiler.core.targets import PRECISIONS, Environment, detect
from bert_compiler.engines.backend import BuildSpec, get_backend
from bert_compiler.engines.targets import DEFAULT_TARGET, TARGET_CHOICES, plan_targets
from bert_compiler.engines.tensorrt_options import ProfileDerivation
from bert_compiler.models.loading import (
    DEFAULT_MODEL_ALIAS,
    DEFAULT_MODEL_ALIASES,
    TASKS,
    ModelInfo,
    default_model_path,
    load_tokenizer,
    resolve_model,
)
from bert_compiler.runtime.text import check_pair_column, default_text_source
from bert_compiler.stages.calibrate import CalibrationSpec
from bert_compiler.stages.export import ExportSpec
from bert_compiler.stages.fallback import FallbackSpec
from bert_compiler.stages.fuse import FuseSpec
from bert_compiler.stages.layout import DEFAULT_OUT
from bert_compiler.stages.verify import VerifySpec

log = logging.getLogger("bert_compile")


def uses(*groups: OptionGroup) -> Decorator:
    """Add every option of ``groups`` to a click command (first group's options listed first)."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for group in reversed(groups):
            for option in reversed(group.options()):
                func = option(func)
        return func

    return decorate


def precision_option(*, multiple: bool, help: str) -> Decorator:
    """``--precision``: repeatable where a command builds engines, single where it checks one."""
    return click.option(
        "--precision",
        "precisions" if multiple else "precision",
        type=click.Choice(PRECISIONS),
        multiple=multiple,
        default=None,
        help=help,
    )


def target_option(help: str) -> Decorator:
    return click.option(
        "--target",
        type=click.Choice(TARGET_CHOICES),
        default=DEFAULT_TARGET,
        show_default=True,
        help=help,
    )


def input_option(help: str) -> Decorator:
    return click.option(
        "--input", "input_path", type=click.Path(path_type=Path), default=None, help=help
    )


def out_option(help: str) -> Decorator:
    return click.option(
        "--out",
        "out",
        type=click.Path(path_type=Path),
        default=DEFAULT_OUT,
        show_default=True,
        help=help,
    )


class ModelOptions(OptionGroup):
    """Which model, read how: ``--model`` and the safety switches -> a validated ModelInfo."""

    def options(self) -> list[Decorator]:
        return [
            click.option(
                "--model",
                "model",
                default=DEFAULT_MODEL_ALIAS,
                show_default=True,
                help="'default' (all-MiniLM-L6-v2 from its PyPI package) or a local model folder.",
            ),
            click.option(
                "--task",
                type=click.Choice(["auto", *TASKS]),
                default="auto",
                show_default=True,
                help="What the engine outputs; auto reads the model folder.",
            ),
            click.option(
                "--allow-pickle",
                is_flag=True,
                help="Accept pytorch_model.bin (loaded with torch.load(weights_only=True)).",
            ),
            click.option(
                "--trust-remote-code",
                is_flag=True,
                help="Accept a config.json whose auto_map runs the model's own code.",
            ),
        ]

    def folder(self, values: Values) -> Path | None:
        """The model folder ``--model`` names, unvalidated (None where there is none): where an
        output folder must not be."""
        if str(values["model"]).lower() in DEFAULT_MODEL_ALIASES:
            return default_model_path()
        folder = Path(values["model"]).expanduser()
        return folder if folder.is_dir() else None

    def parse(self, values: Values) -> ModelInfo:
        """The model, its tokenizer loaded once too: a tokenizer that cannot serve the model is
        one line before any stage starts, not a failure inside one."""
        info = resolve_model(
            values["model"],
            task=values["task"],
            allow_pickle=values["allow_pickle"],
            trust_remote_code=values["trust_remote_code"],
        )
        load_tokenizer(info, trust_remote_code=values["trust_remote_code"])
        return info


class ExportOptions(OptionGroup):
    """Export settings (``--opset`` only where the command exports on its own)."""

    def __init__(self, *, opset: bool):
        self.opset = opset

    def options(self) -> list[Decorator]:
        options: list[Decorator] = []
        if self.opset:
            options.append(
                click.option(
                    "--opset", type=int, default=default_of(ExportSpec, "opset"), show_default=True
                )
            )
        options.append(
            click.option(
                "--pooling/--no-pooling",
                default=default_of(ExportSpec, "pooling_in_graph"),
                show_default=True,
                help="Sentence-embedding models: mean pooling + L2 norm in the graph.",
            )
        )
        return options

    def parse(self, values: Values) -> ExportSpec:
        opset = values["opset"] if self.opset else default_of(ExportSpec, "opset")
        return ExportSpec(opset=opset, pooling_in_graph=values["pooling"])


class FuseOptions(OptionGroup):
    def options(self) -> list[Decorator]:
        return [
            click.option(
                "--allow-unfused", is_flag=True, help="Warn instead of failing on missing fusions."
            )
        ]

    def parse(self, values: Values) -> FuseSpec:
        return FuseSpec(require_fusions=not values["allow_unfused"])


class MaxLengthOptions(OptionGroup):
    """``--max-length``: truncation of every tokenized text (verify, calibrate, profiles)."""

    def options(self) -> list[Decorator]:
        return [
            click.option(
                "--max-length",
                type=int,
                default=None,
                help="Truncate text to this many tokens (default: the model's).",
            )
        ]

    def parse(self, values: Values) -> int | None:
        return values["max_length"]


class VerifyOptions(OptionGroup):
    """Parity and task-metric gates -> VerifySpec (needs MaxLengthOptions).

    The five limits are ``PerPrecisionOption``: a config file may set them per precision
    (``[int8]`` table, cli/config.py). A limit given on the command line applies to every
    precision; one from a precision table beats the file's other values for that precision.
    """

    # Option name -> the limit it sets (VerifySpec.precision_limits names).
    LIMITS = {
        "max_abs_err": "max_abs_err",
        "max_rel_l2": "rel_l2_err",
        "min_cosine": "min_cosine",
        "max_metric_drop": "max_metric_drop",
        "min_metric_retention": "min_metric_retention",
    }

    def options(self) -> list[Decorator]:
        def limit(flag: str, help: str) -> Decorator:
            return click.option(flag, type=float, default=None, help=help, cls=PerPrecisionOption)

        return [
            limit("--max-abs-err", "Max abs error, every precision (see --config)."),
            limit("--max-rel-l2", "Relative L2 error, every precision (see --config)."),
            limit("--min-cosine", "Minimum cosine, every precision (see --config)."),
            limit(
                "--max-metric-drop",
                "Largest task-metric drop (points) against PyTorch fp32, every precision.",
            ),
            limit(
                "--min-metric-retention",
                "Smallest fraction of PyTorch fp32's metric to keep, every precision (int8 "
                "default 0.995).",
            ),
            click.option(
                "--metric-gate/--no-metric-gate",
                default=default_of(VerifySpec, "metric_gate"),
                show_default=True,
                help="Fail on the task-metric gates (the metric is reported either way).",
            ),
            click.option(
                "--metric-limit",
                type=click.IntRange(1, None),
                default=None,
                help="Score only the first N metric examples (quick checks).",
            ),
            click.option(
                "--parity-data",
                type=click.Path(path_type=Path),
                default=None,
                help="TSV with a 'sentence' column for parity (default: bundled SST-2 dev); "
                "for cross-encoders 'sentence1' and 'sentence2' (default: STS-B dev pairs).",
            ),
            click.option(
                "--metric-data",
                type=click.Path(path_type=Path),
                default=None,
                help="TSV for the metric: STS-B columns (sentence1, sentence2, score) for "
                "embedding models and cross-encoders (pairs scored against 'score'), SST-2 "
                "columns (sentence, label) for classifiers. Default: the bundled dev set.",
            ),
        ]

    def parse(self, values: Values, precision: str | None = None) -> VerifySpec:
        """Raises InputError for a limit that is NaN or out of range (VerifySpec.validate)."""
        overrides = {
            "max_abs_err": values["max_abs_err"],
            "rel_l2_err": values["max_rel_l2"],
            "min_cosine": values["min_cosine"],
        }
        spec = VerifySpec(
            precision=precision or default_of(VerifySpec, "precision"),
            tolerance_overrides=tuple((k, v) for k, v in overrides.items() if v is not None),
            precision_limits=self._precision_limits(),
            max_metric_drop=values["max_metric_drop"],
            min_metric_retention=values["min_metric_retention"],
            metric_gate=values["metric_gate"],
            max_length=values["max_length"],
            metric_limit=values["metric_limit"],
            parity_data=values["parity_data"],
            metric_data=values["metric_data"],
        )
        spec.validate()
        return spec

    def _precision_limits(self) -> tuple[tuple[str, str, float], ...]:
        """(precision, limit, value) from the config file's precision tables, less the limits
        given on the command line (a flag applies to every precision)."""
        ctx = click.get_current_context(silent=True)
        limits = []
        for precision, table in sorted(per_precision_values(ctx).items()):
            for name, value in sorted(table.items()):
                if ctx is None or ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE:
                    limits.append((precision, self.LIMITS[name], float(value)))
        return tuple(limits)


class FallbackOptions(OptionGroup):
    """The INT8 precision fallback -> FallbackSpec (run)."""

    def options(self) -> list[Decorator]:
        return [
            click.option(
                "--fallback/--no-fallback",
                default=default_of(FallbackSpec, "enabled"),
                show_default=True,
                help="int8: when the gate fails, keep the most sensitive MatMuls in float and "
                "verify again.",
            ),
            click.option(
                "--fallback-max-float",
                type=click.FloatRange(0, 1),
                default=default_of(FallbackSpec, "max_float"),
                show_default=True,
                help="int8: the largest fraction of the quantizable MatMuls that may end in "
                "float; an engine that needs more fails.",
            ),
            click.option(
                "--selection-data",
                type=click.Path(path_type=Path),
                default=None,
                help="int8: the task-metric file the fallback's rounds are gated on, never the "
                "one verify reports (default: bundled STS-B train pairs, SST-2 train for "
                "classifiers).",
            ),
        ]

    def parse(self, values: Values) -> FallbackSpec:
        return FallbackSpec(
            enabled=values["fallback"],
            max_float=values["fallback_max_float"],
            selection_data=values["selection_data"],
        )


class ProgressOptions(OptionGroup):
    """Progress bars on stderr -> whether to show them (every stage command)."""

    def options(self) -> list[Decorator]:
        return [
            click.option(
                "--progress/--no-progress",
                default=None,
                help="Progress bars on stderr (default: when stderr is a terminal, without "
                "--json and --quiet).",
            )
        ]

    def parse(self, values: Values) -> bool:
        if values["progress"] is not None:
            return bool(values["progress"])
        isatty = getattr(sys.stderr, "isatty", None)
        terminal = bool(isatty and isatty())
        return terminal and not values["as_json"] and not values["quiet"]


class TextOptions(OptionGroup):
    """The calibration text (also what TensorRT profiles are derived from)."""

    def options(self) -> list[Decorator]:
        return [
            click.option(
                "--calibration-data",
                type=click.Path(path_type=Path),
                default=None,
                help="A .tsv, .txt or .jsonl file (default: bundled calibration sentences).",
            ),
            click.option(
                "--text-column",
                default=datasets.TEXT_COLUMN,
                show_default=True,
                help="TSV column or JSONL key holding the text.",
            ),
            click.option(
                "--pair-column",
                default=None,
                help="Cross-encoders: TSV column or JSONL key of each pair's second text "
                "(--text-column holds the first; default with the bundled data: STS-B train "
                "pairs).",
            ),
        ]

    def parse(self, values: Values, info: ModelInfo) -> tuple[Path, str, str | None]:
        """The text file (default: the bundled calibration text of the model's kind), its
        column and pair column."""
        column, pair_column = self.columns(values, info)
        if values["calibration_data"]:
            return values["calibration_data"], column, pair_column
        return default_text_source(info)[0], column, pair_column

    def columns(self, values: Values, info: ModelInfo) -> tuple[str, str | None]:
        """The text column and pair column: a cross-encoder's default is the bundled pairs'
        (text.default_text_source) where no file or pair column is given."""
        if info.pairs and values["calibration_data"] is None:
            # The bundled pairs' columns, less those given (--pair-column alone named the
            # second one, and the first stays the bundled file's).
            _path, column, pair_column = default_text_source(info)
            if given("text_column", config=True):
                column = values["text_column"]
            return column, values["pair_column"] or pair_column
        return values["text_column"], values["pair_column"]


class CalibrationOptions(OptionGroup):
    """INT8 calibration -> CalibrationSpec (needs TextOptions and MaxLengthOptions)."""

    def options(self) -> list[Decorator]:
        return [
            click.option(
                "--method",
                type=click.Choice(METHODS),
                default=default_of(CalibrationSpec, "method"),
                show_default=True,
                help="INT8 range calibration method.",
            ),
            click.option(
                "--percentile",
                type=float,
                default=default_of(CalibrationSpec, "percentile"),
                show_default=True,
                help="With --method percentile: share of magnitudes kept unclipped.",
            ),
            click.option(
                "--num-samples",
                type=int,
                default=default_of(CalibrationSpec, "num_samples"),
                show_default=True,
                help="Calibration sentences to use.",
            ),
            click.option(
                "--min-samples",
                type=int,
                default=default_of(CalibrationSpec, "min_samples"),
                show_default=True,
                help="Fewer distinct sentences than this is an error.",
            ),
            click.option(
                "--smooth-alpha",
                type=click.FloatRange(0, 1),
                default=default_of(CalibrationSpec, "smooth_alpha"),
                show_default=True,
                help="SmoothQuant: move this share of each MatMul input's outlier channels into "
                "its weights (exact in float); unset: off.",
            ),
            click.option(
                "--weight-granularity",
                type=click.Choice(WEIGHT_GRANULARITIES),
                default=default_of(CalibrationSpec, "weight_granularity"),
                show_default=True,
                help="INT8 weight scales: one per output channel or one per weight tensor.",
            ),
            click.option(
                "--format",
                "quantized_format",
                type=click.Choice(QUANTIZED_FORMATS),
                default=default_of(CalibrationSpec, "format"),
                show_default=True,
                help="Quantized type: int8 (OUT/calibrate, every INT8 engine) or fp8 (float8 "
                "e4m3fn, OUT/calibrate-fp8: the TensorRT fp8 engine's graph). `run` takes it "
                "from each engine's --precision.",
            ),
            click.option(
                "--keep-float", multiple=True, help="MatMul node name to keep in float; repeatable."
            ),
            click.option(
                "--quantize-op",
                multiple=True,
                type=click.Choice(sorted(OPTIONAL_QUANTIZED_OPS)),
                help="Also quantize this op type's float inputs (kept float by default); "
                "repeatable.",
            ),
        ]

    def parse(self, values: Values, info: ModelInfo) -> CalibrationSpec:
        text_column, pair_column = TextOptions().columns(values, info)
        # Before any stage runs: a cross-encoder's text is pairs.
        check_pair_column(
            info, values["calibration_data"] or "calibration data", pair_column, column=text_column
        )
        return CalibrationSpec(
            method=values["method"],
            percentile=values["percentile"],
            num_samples=values["num_samples"],
            min_samples=values["min_samples"],
            data=values["calibration_data"],
            text_column=text_column,
            pair_column=pair_column,
            max_length=values.get("max_length"),
            keep_float=tuple(values["keep_float"]),
            quantize_ops=tuple(values["quantize_op"]),
            smooth_alpha=values["smooth_alpha"],
            weight_granularity=values["weight_granularity"],
            format=values["quantized_format"],
        )


class TargetOptions(OptionGroup):
    """Where engines are built for, and every backend's own flags (cli/backend_flags.py) -> one
    BuildSpec per engine to build on this machine, and the notes of how ``--target`` resolved
    (build and run)."""

    def options(self) -> list[Decorator]:
        return [
            target_option(
                "auto: TensorRT and ONNX Runtime CUDA engines for every distinct GPU here, or "
                "the CPU engine when there is no GPU or GPU backend; cuda: ONNX Runtime CUDA; "
                "tensorrt; torch: this project's PyTorch engine on packed rows (fp16 on a GPU, "
                "fp32 on the CPU by default, int8 on either; BERT-layout encoders)."
            ),
            click.option(
                "--keep-float-op",
                "keep_float_ops",
                multiple=True,
                help="fp16: also keep this op type in float32 (repeatable), e.g. Softmax.",
            ),
            *(option for flags in BACKEND_FLAGS.values() for option in flags.options()),
        ]

    def parse_derivation(self, values: Values) -> ProfileDerivation:
        return TENSORRT_FLAGS.parse_derivation(values)

    def parse(self, values: Values) -> tuple[tuple[BuildSpec, ...], tuple[str, ...]]:
        # Flags first: a malformed profile is a usage problem on any machine, not hidden behind
        # "no GPU found".
        requested = {name: flags.parse(values) for name, flags in BACKEND_FLAGS.items()}
        # --target cpu needs nothing from the machine; every other target looks at it.
        env = Environment() if values["target"] == "cpu" else detect()
        precisions = tuple(dict.fromkeys(values["precisions"] or ()))
        plan = plan_targets(values["target"], precisions, env)
        for note in plan.notes:
            log.warning("[target] %s", note)
        specs = []
        for target in plan.engines:
            spec = BuildSpec(
                **target,
                keep_float_ops=tuple(values["keep_float_ops"]),
                options=requested[target["backend"]],
            )
            # Flags for another device (--cuda-graph on the CPU engine) do not apply to it.
            spec = get_backend(spec.backend).applicable(spec)
            spec.validate()
            specs.append(spec)
        for flags in BACKEND_FLAGS.values():
            flags.check_run(values, specs)
        return tuple(specs), plan.notes
