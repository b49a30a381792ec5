"""The package command's option group: Triton repository settings -> PackageSpec."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from bert_compiler.cli.option_group import (
    Decorator,
    OptionGroup,
    Values,
    default_of,
    given,
    int_range,
)
from bert_compiler.core.errors import InputError
from bert_compiler.stages.layout import Layout
from bert_compiler.triton.package import check_repository_target
from bert_compiler.triton.package_spec import (
    PACKAGE_LIMITS,
    PADDINGS,
    PYTHON_TEXTS,
    PackageSpec,
)

log = logging.getLogger("bert_compile")


class PackageOptions(OptionGroup):
    """Triton repository settings -> PackageSpec and the repository folder (package and run)."""

    def options(self) -> list[Decorator]:
        return [
            *_repository_and_batching_options(),
            *_instance_options(),
            *_python_backend_options(),
            *_loading_and_tokenizer_options(),
        ]

    def parse(self, values: Values, engines: tuple[str, ...] = ()) -> PackageSpec:
        """Raises InputError for --ladder-rungs with --tokenizer-padding request (no ladder), for
        --python-text without --python-cpu-engine, and for --text-run-cost without either
        --python-cpu-engine or --python-gpu-engine (they would change nothing)."""
        for flag in given("python_text", "text_run_cost", config=True):
            takes_it = values["python_cpu_engine"] or (
                flag == "--text-run-cost" and values["python_gpu_engine"]
            )
            if not takes_it:
                raise InputError(
                    f"{flag} {values[flag[2:].replace('-', '_')]}: it sets how "
                    "--python-cpu-engine engines take text; add --python-cpu-engine or drop it"
                )
        if given("text_run_cost", config=True) and values["python_text"] != "model":
            raise InputError(
                f"--text-run-cost {values['text_run_cost']}: only the one-model text engine "
                "(--python-text model) plans runs; drop it or use --python-text model"
            )
        if values["tokenizer_padding"] != "ladder" and given("ladder_rungs"):
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


def _repository_and_batching_options() -> list[Decorator]:
    """Where the repository goes, and how engine models batch requests."""
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
    ]


def _instance_options() -> list[Decorator]:
    """How many instances of each kind of model Triton runs."""
    return [
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
    ]


def _python_backend_options() -> list[Decorator]:
    """Which engines Triton's Python backend also serves, and how they take text."""
    return [
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
    ]


def _loading_and_tokenizer_options() -> list[Decorator]:
    """Warmup at load, and how the tokenizer model pads requests."""
    return [
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
