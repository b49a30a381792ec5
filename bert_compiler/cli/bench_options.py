"""The bench command's option group: what is timed, on which text and shapes -> BenchSpec."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from bert_compiler.bench.measure import BenchSpec
from bert_compiler.cli.option_group import (
    MAX_LISTED_COUNT,
    Decorator,
    OptionGroup,
    Values,
    count_in_range,
    default_of,
    given,
    listed,
)
from bert_compiler.core.errors import InputError

log = logging.getLogger("bert_compile")


# Bounds of the numbers in bench's lists: generous, but no value that overflows numpy or asks
# for terabytes (a fixed shape's three int64 token matrices stay under 2 GiB).
_MAX_TOKENS = 1 << 31
_MAX_FIXED_TOKENS = 1 << 26


def _int_list(text: str) -> tuple[int, ...]:
    values = tuple(
        count_in_range(item, 1, MAX_LISTED_COUNT) for item in text.split(",") if item.strip()
    )
    if not values or None in values:
        raise click.BadParameter(
            f"{text!r}: expected comma-separated integers from 1 to {MAX_LISTED_COUNT}, e.g. 32,128"
        )
    return values  # type: ignore[return-value]  # None was refused above


def _batching_list(text: str) -> tuple[tuple[int, int], ...]:
    pairs = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        rows, _, budget = item.partition("x")
        counted = (
            count_in_range(rows, 1, MAX_LISTED_COUNT),
            count_in_range(budget or "0", 0, _MAX_TOKENS),
        )
        if None in counted:
            raise click.BadParameter(
                f"{item!r}: expected ROWS or ROWSxTOKENS (rows 1 to {MAX_LISTED_COUNT}, tokens "
                f"up to {_MAX_TOKENS}), e.g. 1024x32768"
            )
        pairs.append(counted)
    return tuple(pairs)  # type: ignore[arg-type]  # None was refused above


def _shape_list(text: str) -> tuple[tuple[int, int], ...]:
    shapes = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        batch, _, seq = item.partition("x")
        shape = (
            count_in_range(batch, 1, MAX_LISTED_COUNT),
            count_in_range(seq, 2, MAX_LISTED_COUNT),
        )
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
        columns = given("data_column", "data_pair_column")
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
            peer_batches=listed("--peer-batches", _int_list, values["peer_batches"])
            if values["peer_batches"]
            else (),
            fixed_shapes=listed("--fixed-shapes", _shape_list, values["fixed_shapes"]),
            runtime_batches=listed(
                "--runtime-batches", _batching_list, values["runtime_batches"] or ""
            ),
            tokenizer_workers=listed("--tokenizer-workers", _int_list, values["tokenizer_workers"])
            if values["tokenizer_workers"]
            else (),
            peers=values["peers"],
            max_length=values["max_length"],
        )
