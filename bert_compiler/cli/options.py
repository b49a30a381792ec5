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

from bert_compiler.bench.measure import BenchSpec
from bert_compiler.calibration import datasets
from bert_compiler.calibration.qdq import (
    INT8,
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
    int_range,
)
from bert_compiler.core.errors import InputError
from bert_compiler.core.targets import (
    DEFAULT_TARGET,
    PRECISIONS,
    TARGET_CHOICES,
    Environment,
    detect,
    plan_targets,
)
from bert_compiler.engines.backend import BuildSpec, get_backend
from bert_compiler.engines.ort_int8 import DYNAMIC_SCOPES
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
from bert_compiler.stages.layout import DEFAULT_OUT, Layout
from bert_compiler.stages.sweep import SweepSpec
from bert_compiler.stages.verify import VerifySpec
from bert_compiler.triton.package import (
    PACKAGE_LIMITS,
    PADDINGS,
    PYTHON_TEXTS,
    PackageSpec,
    check_repository_target,
)

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
            if _given("text_column", config=True):
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
                "fp32 on the CPU; BERT-layout encoders)."
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


class PackageOptions(OptionGroup):
    """Triton repository settings -> PackageSpec and the repository folder (package and run)."""

    def options(self) -> list[Decorator]:
        return [
            click.option(
                "--repository",
                type=click.Path(path_type=Path),
                default=None,
                help="Triton model repository folder (default: OUT/triton).",
            ),
            click.option(
                "--max-batch-size",
                type=int_range(PACKAGE_LIMITS["max_batch_size"]),
                default=default_of(PackageSpec, "max_batch_size"),
                show_default=True,
                help="Largest batch of ONNX Runtime models (TensorRT: from the profiles).",
            ),
            click.option(
                "--max-queue-delay-us",
                type=int_range(PACKAGE_LIMITS["max_queue_delay_us"]),
                default=default_of(PackageSpec, "max_queue_delay_us"),
                show_default=True,
                help="Dynamic batcher: microseconds to wait for a fuller batch.",
            ),
            click.option(
                "--instances",
                type=int_range(PACKAGE_LIMITS["instances"]),
                default=default_of(PackageSpec, "instances"),
                show_default=True,
                help="Instances of each onnxruntime or tensorrt engine model: per GPU (GPU "
                "models) or in all (CPU models).",
            ),
            click.option(
                "--python-instances",
                type=int_range(PACKAGE_LIMITS["python_instances"]),
                default=default_of(PackageSpec, "python_instances"),
                show_default=True,
                help="Instances of each Python-backend model (the tokenizer, --python-cpu-engine "
                "engines); an engine's instances share the cores.",
            ),
            click.option(
                "--gpu-text-instances",
                type=int_range(PACKAGE_LIMITS["gpu_text_instances"]),
                default=default_of(PackageSpec, "gpu_text_instances"),
                show_default=True,
                help="Instances per GPU of each GPU engine's Python-backend text model (the torch "
                "engine's): each tokenizes its execute calls in a process of its own.",
            ),
            click.option(
                "--python-cpu-engine",
                is_flag=True,
                help="Also serve CPU ONNX Runtime engines on Triton's Python backend (for Triton "
                "builds without the onnxruntime backend).",
            ),
            click.option(
                "--python-gpu-engine",
                is_flag=True,
                help="Also serve ONNX Runtime CUDA engines as Python-backend text models on GPU "
                "instances (<engine>-python-text; for Triton builds without the onnxruntime "
                "backend, like nvidia-pytriton's). Engines built with --cuda-graph or "
                "--ort-tensorrt-provider are left out.",
            ),
            click.option(
                "--python-text",
                type=click.Choice(PYTHON_TEXTS),
                default=default_of(PackageSpec, "python_text"),
                show_default=True,
                help="How --python-cpu-engine engines take text: one Python model that tokenizes "
                "and runs the engine (<engine>-python-text), or an ensemble of the tokenizer "
                "model and a Python engine model taking tokens (<engine>-python).",
            ),
            click.option(
                "--text-run-cost",
                type=int_range(PACKAGE_LIMITS["text_run_cost"]),
                default=default_of(PackageSpec, "text_run_cost"),
                show_default=True,
                help="The one-model text engine's cost of one more engine run, in padded tokens: "
                "it pads an execute call's texts, sorted by length, in runs cut where the padding "
                "saved is worth more (0: a run per length; large: one run).",
            ),
            click.option(
                "--warmup/--no-warmup",
                default=default_of(PackageSpec, "warmup"),
                show_default=True,
                help="Real-token warmup requests when Triton loads an engine model.",
            ),
            click.option(
                "--tokenizer-padding",
                type=click.Choice(PADDINGS),
                default=default_of(PackageSpec, "padding"),
                show_default=True,
                help="Pad each request to a rung of the length ladder fitted to the calibration "
                "sentences (requests of one rung batch together), or to its own longest text.",
            ),
            click.option(
                "--ladder-rungs",
                type=int_range(PACKAGE_LIMITS["ladder_rungs"]),
                default=default_of(PackageSpec, "ladder_rungs"),
                show_default=True,
                help="Rungs of the tokenizer's length ladder fitted to the calibration sentences "
                "(more pad less but split requests into more, smaller engine runs).",
            ),
        ]

    def parse(self, values: Values, engines: tuple[str, ...] = ()) -> PackageSpec:
        """Raises InputError for --ladder-rungs with --tokenizer-padding request (no ladder), for
        --python-text without --python-cpu-engine, and for --text-run-cost without either
        --python-cpu-engine or --python-gpu-engine (they would change nothing)."""
        for flag in _given("python_text", "text_run_cost", config=True):
            takes_it = values["python_cpu_engine"] or (
                flag == "--text-run-cost" and values["python_gpu_engine"]
            )
            if not takes_it:
                raise InputError(
                    f"{flag} {values[flag[2:].replace('-', '_')]}: it sets how "
                    "--python-cpu-engine engines take text; add --python-cpu-engine or drop it"
                )
        if _given("text_run_cost", config=True) and values["python_text"] != "model":
            raise InputError(
                f"--text-run-cost {values['text_run_cost']}: only the one-model text engine "
                "(--python-text model) plans runs; drop it or use --python-text model"
            )
        if values["tokenizer_padding"] != "ladder" and _given("ladder_rungs"):
            raise InputError(
                f"--ladder-rungs {values['ladder_rungs']}: --tokenizer-padding "
                f"{values['tokenizer_padding']} pads each request to its longest text, with no "
                "length ladder; drop --ladder-rungs or use --tokenizer-padding ladder"
            )
        return PackageSpec(
            engines=engines,
            max_batch_size=values["max_batch_size"],
            max_queue_delay_us=values["max_queue_delay_us"],
            instances=values["instances"],
            python_instances=values["python_instances"],
            gpu_text_instances=values["gpu_text_instances"],
            python_cpu_engine=values["python_cpu_engine"],
            python_gpu_engine=values["python_gpu_engine"],
            python_text=values["python_text"],
            text_run_cost=values["text_run_cost"],
            warmup=values["warmup"],
            padding=values["tokenizer_padding"],
            ladder_rungs=values["ladder_rungs"],
        )

    def repository(self, values: Values) -> Path:
        """The repository folder, checked before any stage runs: writable, and empty or one
        bert-compile wrote."""
        repository = values["repository"] or Layout(Path(values["out"])).repository
        check_repository_target(repository)
        return repository


def _given(*names: str, config: bool = False) -> list[str]:
    """The flags (``--sweep-methods``) of the parameters ``names`` that the command line set
    (with ``config``, a config file too); a default is never reported."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return []
    sources = {ParameterSource.COMMANDLINE}
    if config:
        sources.add(ParameterSource.DEFAULT_MAP)
    flags = {param.name: param.opts[0] for param in ctx.command.params}
    return [
        flags[name] for name in names if name in flags and ctx.get_parameter_source(name) in sources
    ]


def _listed(flag: str, parse: Callable[..., Any], text: str, *args: Any) -> Any:
    """``parse(text, *args)`` with a bad value reported as click reports its own options'
    ("Invalid value for '--sweep-methods': ..."), naming the flag."""
    try:
        return parse(text, *args)
    except click.BadParameter as err:
        err.param_hint = f"'{flag}'"
        raise


# Bounds of the numbers in bench's lists: generous, but no value that overflows numpy or asks
# for terabytes (a fixed shape's three int64 token matrices stay under 2 GiB).
_MAX_ROWS = 1 << 20
_MAX_TOKENS = 1 << 31
_MAX_FIXED_TOKENS = 1 << 26


def _count(text: str, low: int, high: int) -> int | None:
    """``text`` as an int in [low, high] (ASCII digits only), else None."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        return None
    return int(text)


def _int_list(text: str) -> tuple[int, ...]:
    values = tuple(_count(item, 1, _MAX_ROWS) for item in text.split(",") if item.strip())
    if not values or None in values:
        raise click.BadParameter(
            f"{text!r}: expected comma-separated integers from 1 to {_MAX_ROWS}, e.g. 32,128"
        )
    return values  # type: ignore[return-value]  # None was refused above


def _batching_list(text: str) -> tuple[tuple[int, int], ...]:
    pairs = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        rows, _, budget = item.partition("x")
        counted = (_count(rows, 1, _MAX_ROWS), _count(budget or "0", 0, _MAX_TOKENS))
        if None in counted:
            raise click.BadParameter(
                f"{item!r}: expected ROWS or ROWSxTOKENS (rows 1 to {_MAX_ROWS}, tokens up to "
                f"{_MAX_TOKENS}), e.g. 1024x32768"
            )
        pairs.append(counted)
    return tuple(pairs)  # type: ignore[arg-type]  # None was refused above


def _shape_list(text: str) -> tuple[tuple[int, int], ...]:
    shapes = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        batch, _, seq = item.partition("x")
        shape = (_count(batch, 1, _MAX_ROWS), _count(seq, 2, _MAX_ROWS))
        if None in shape or shape[0] * shape[1] > _MAX_FIXED_TOKENS:  # type: ignore[operator]
            raise click.BadParameter(
                f"{item!r}: expected BATCHxSEQUENCE of at most {_MAX_FIXED_TOKENS} tokens, "
                "e.g. 32x128"
            )
        shapes.append(shape)
    return tuple(shapes)  # type: ignore[arg-type]  # None was refused above


class BenchOptions(OptionGroup):
    """What `bench` measures -> BenchSpec (needs MaxLengthOptions)."""

    def options(self) -> list[Decorator]:
        return [
            click.option(
                "--data",
                type=click.Path(path_type=Path),
                default=None,
                help="Text to time (.tsv, .txt or .jsonl; default: the bundled STS-B dev "
                "sentences, both columns).",
            ),
            click.option(
                "--data-column",
                default=default_of(BenchSpec, "text_column"),
                show_default=True,
                help="TSV column or JSONL key of --data.",
            ),
            click.option(
                "--data-pair-column",
                default=None,
                help="Cross-encoders: TSV column or JSONL key of each pair's second text in "
                "--data (default data: STS-B dev pairs).",
            ),
            click.option(
                "--min-sentences",
                type=click.IntRange(0, 10_000_000),
                default=default_of(BenchSpec, "min_sentences"),
                help="Repeat the text to at least this many sentences (default: 12,000 on a "
                "GPU, the text once on a CPU).",
            ),
            click.option(
                "--limit",
                type=click.IntRange(1, None),
                default=None,
                help="Use only the first N sentences of the text.",
            ),
            click.option(
                "--rounds",
                type=click.IntRange(1, 100),
                default=default_of(BenchSpec, "rounds"),
                show_default=True,
                help="Timed passes per runner, interleaved; the median is reported.",
            ),
            click.option(
                "--peer-batches",
                default=None,
                help="Comma-separated batch sizes of the peers (default: 32,128 on a CPU; "
                "32,128,512,1024 on a GPU).",
            ),
            click.option(
                "--fixed-shapes",
                default=",".join(f"{b}x{s}" for b, s in default_of(BenchSpec, "fixed_shapes")),
                show_default=True,
                help="Comma-separated BATCHxSEQUENCE shapes timed with every position real "
                "('' for none).",
            ),
            click.option(
                "--runtime-batches",
                default=None,
                help="Comma-separated ROWS or ROWSxTOKENS: row limits (and token budgets) at which "
                "each engine also runs through the runtime, beside its default batching (a "
                "missing budget scales the default's), e.g. 1,1024x32768.",
            ),
            click.option(
                "--tokenizer-workers",
                default=None,
                help="Comma-separated process counts at which each engine also runs end to end "
                "(texts in) with encode tokenizing in that many processes, beside the default.",
            ),
            click.option(
                "--peers/--no-peers",
                default=default_of(BenchSpec, "peers"),
                show_default=True,
                help="Also time PyTorch and plain ONNX Runtime.",
            ),
        ]

    def parse(self, values: Values) -> BenchSpec:
        """Raises InputError for a column of --data given without --data."""
        columns = _given("data_column", "data_pair_column")
        if values["data"] is None and columns:
            raise InputError(
                f"{', '.join(columns)}: name columns of --data FILE, and none is given (the "
                "default text is the bundled STS-B dev set); add --data or drop them"
            )
        return BenchSpec(
            data=values["data"],
            text_column=values["data_column"],
            pair_column=values["data_pair_column"],
            min_sentences=values["min_sentences"],
            limit=values["limit"],
            rounds=values["rounds"],
            peer_batches=_listed("--peer-batches", _int_list, values["peer_batches"])
            if values["peer_batches"]
            else (),
            fixed_shapes=_listed("--fixed-shapes", _shape_list, values["fixed_shapes"]),
            runtime_batches=_listed(
                "--runtime-batches", _batching_list, values["runtime_batches"] or ""
            ),
            tokenizer_workers=_listed("--tokenizer-workers", _int_list, values["tokenizer_workers"])
            if values["tokenizer_workers"]
            else (),
            peers=values["peers"],
            max_length=values["max_length"],
        )


def _method_list(text: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(i.strip() for i in text.split(",") if i.strip()))
    chosen: dict[tuple[str, float | None], str] = {}
    for item in items:
        method, _, percentile = item.partition(":")
        usable = method in METHODS and (
            not percentile
            or (method == "percentile" and _is_number(percentile) and 0 < float(percentile) <= 100)
        )
        if not usable:
            raise click.BadParameter(
                f"{item!r}: expected METHOD or percentile:P with METHOD one of "
                f"{', '.join(METHODS)} and 0 < P <= 100, e.g. percentile:99.99"
            )
        # percentile:99.99 and percentile:99.990 are one grid point: the first spelling names it.
        chosen.setdefault((method, float(percentile) if percentile else None), item)
    if not chosen:
        raise click.BadParameter("expected at least one method")
    return tuple(chosen.values())


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _choice_list(text: str, choices: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(i.strip() for i in text.split(",") if i.strip()))
    unknown = [i for i in items if i not in choices]
    if unknown or not items:
        raise click.BadParameter(
            f"{text!r}: expected comma-separated values of {', '.join(choices)}"
        )
    return items


def _alpha_list(text: str) -> tuple[float | None, ...]:
    alphas: list[float | None] = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        if item == "none":
            alphas.append(None)
        elif _is_number(item) and 0 <= float(item) <= 1:
            alphas.append(float(item) + 0.0)  # -0 is 0
        else:
            raise click.BadParameter(f"{item!r}: expected 'none' or an alpha in [0, 1], e.g. 0.5")
    if not alphas:
        raise click.BadParameter("expected at least one alpha (or none)")
    return tuple(dict.fromkeys(alphas))


def _count_list(text: str) -> tuple[int, ...]:
    items = tuple(_count(i, 0, _MAX_ROWS) for i in text.split(",") if i.strip())
    if not items or None in items:
        raise click.BadParameter(f"{text!r}: expected comma-separated counts >= 0, e.g. 0,2")
    return tuple(dict.fromkeys(items))  # type: ignore[arg-type]  # None was refused above


class SweepOptions(OptionGroup):
    """calibrate --sweep: the INT8 method table's grid and scoring -> SweepSpec (or None)."""

    def options(self) -> list[Decorator]:
        return [
            click.option(
                "--sweep",
                is_flag=True,
                help="Instead of calibrating: build one CPU INT8 engine per grid point and print "
                "the method table (selection-split metric, dev metric reported only, speed vs "
                "PyTorch fp32); results in OUT/sweep/sweep.json.",
            ),
            click.option(
                "--sweep-methods",
                default=",".join(default_of(SweepSpec, "methods")),
                show_default=True,
                help="Comma-separated METHOD or percentile:P.",
            ),
            click.option(
                "--sweep-dynamic",
                default=",".join(default_of(SweepSpec, "dynamic")),
                show_default=True,
                help=f"Comma-separated CPU INT8 dynamic scopes ({', '.join(DYNAMIC_SCOPES)}).",
            ),
            click.option(
                "--sweep-weight-granularity",
                default=",".join(default_of(SweepSpec, "weight_granularity")),
                show_default=True,
                help=f"Comma-separated weight scales ({', '.join(WEIGHT_GRANULARITIES)}).",
            ),
            click.option(
                "--sweep-formats",
                default=",".join(default_of(SweepSpec, "formats")),
                show_default=True,
                help=f"Comma-separated quantized types ({', '.join(QUANTIZED_FORMATS)}); fp8 rows "
                "score the fp8 Q/DQ graph as written on the CPU (no speed: TensorRT runs it).",
            ),
            click.option(
                "--sweep-kept-float",
                default=",".join(str(k) for k in default_of(SweepSpec, "kept_float")),
                show_default=True,
                help="Comma-separated counts of the most sensitive MatMuls kept in float.",
            ),
            click.option(
                "--sweep-smooth-alpha",
                default=",".join(
                    "none" if a is None else str(a) for a in default_of(SweepSpec, "smooth_alpha")
                ),
                show_default=True,
                help="Comma-separated SmoothQuant alphas, or none.",
            ),
            click.option(
                "--sweep-pairs",
                type=click.IntRange(1, None),
                default=default_of(SweepSpec, "pairs"),
                show_default=True,
                help="STS-B pairs scored per split (every k-th pair).",
            ),
            click.option(
                "--sweep-selection-data",
                type=click.Path(dir_okay=False, path_type=Path),
                default=None,
                help="STS-B TSV scored as the selection split (default: the bundled "
                "stsb-selection.tsv).",
            ),
            click.option(
                "--sweep-sentences",
                type=click.IntRange(1, None),
                default=default_of(SweepSpec, "sentences"),
                show_default=True,
                help="Selection sentences per timed pass (batches of 32).",
            ),
            click.option(
                "--sweep-rounds",
                type=click.IntRange(1, 100),
                default=default_of(SweepSpec, "rounds"),
                show_default=True,
                help="Timed passes per runner, interleaved; the median is reported.",
            ),
            click.option(
                "--sweep-threads",
                type=click.IntRange(1, 1024),
                default=default_of(SweepSpec, "threads"),
                show_default=True,
                help="ONNX Runtime and PyTorch threads.",
            ),
            click.option(
                "--sweep-peers/--no-sweep-peers",
                default=default_of(SweepSpec, "peers"),
                show_default=True,
                help="Also score and time ORT's dynamic INT8 quantization.",
            ),
        ]

    # The sweep's own settings, read only with --sweep.
    SWEEP_ONLY = (
        "sweep_methods",
        "sweep_dynamic",
        "sweep_weight_granularity",
        "sweep_formats",
        "sweep_kept_float",
        "sweep_smooth_alpha",
        "sweep_pairs",
        "sweep_selection_data",
        "sweep_sentences",
        "sweep_rounds",
        "sweep_threads",
        "sweep_peers",
    )
    # What calibrate reads without --sweep, and the sweep's flag for it (None: the sweep
    # calibrates on the bundled calibration sentences at the model's maximum length, its own
    # float graph).
    CALIBRATE_ONLY = {
        "method": "--sweep-methods",
        "percentile": "--sweep-methods",
        "smooth_alpha": "--sweep-smooth-alpha",
        "weight_granularity": "--sweep-weight-granularity",
        "quantized_format": "--sweep-formats",
        "keep_float": "--sweep-kept-float",
        "quantize_op": None,
        "num_samples": None,
        "min_samples": None,
        "calibration_data": None,
        "text_column": None,
        "pair_column": None,
        "max_length": None,
        "input_path": None,
    }

    def parse(self, values: Values) -> SweepSpec | None:
        """The sweep's spec with --sweep (None without it).

        Raises:
            InputError: a sweep flag without --sweep, or with it a calibrate flag the sweep
                does not read (either would be silently ignored).
        """
        if not values["sweep"]:
            stray = _given(*self.SWEEP_ONLY)
            if stray:
                raise InputError(
                    f"{', '.join(stray)}: only read by calibrate --sweep; add --sweep, or drop "
                    "them to calibrate"
                )
            return None
        ignored = _given(*self.CALIBRATE_ONLY)
        if ignored:
            instead = sorted(
                {flag for name, flag in self.CALIBRATE_ONLY.items() if flag and _given(name)}
            )
            hint = (
                f"use {', '.join(instead)} for the grid, or drop them" if instead else "drop them"
            )
            raise InputError(
                f"{', '.join(ignored)}: calibrate --sweep does not read them (it exports the "
                f"model and calibrates the bundled calibration sentences per grid point); {hint}"
            )
        formats = _listed(
            "--sweep-formats", _choice_list, values["sweep_formats"], QUANTIZED_FORMATS
        )
        if INT8.name not in formats and _given("sweep_dynamic"):
            raise InputError(
                f"--sweep-dynamic: its axis is the CPU INT8 engine's and --sweep-formats "
                f"{','.join(formats)} sweeps no INT8 rows; add int8 to --sweep-formats or drop "
                "--sweep-dynamic"
            )
        return SweepSpec(
            methods=_listed("--sweep-methods", _method_list, values["sweep_methods"]),
            dynamic=_listed(
                "--sweep-dynamic", _choice_list, values["sweep_dynamic"], DYNAMIC_SCOPES
            ),
            kept_float=_listed("--sweep-kept-float", _count_list, values["sweep_kept_float"]),
            formats=formats,
            weight_granularity=_listed(
                "--sweep-weight-granularity",
                _choice_list,
                values["sweep_weight_granularity"],
                WEIGHT_GRANULARITIES,
            ),
            smooth_alpha=_listed("--sweep-smooth-alpha", _alpha_list, values["sweep_smooth_alpha"]),
            pairs=values["sweep_pairs"],
            sentences=values["sweep_sentences"],
            rounds=values["sweep_rounds"],
            threads=values["sweep_threads"],
            selection_data=values["sweep_selection_data"],
            peers=values["sweep_peers"],
        )
