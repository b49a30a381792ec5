"""What bench times: one runner per engine, peer and tokenizer, each turning the shared token rows
(or the texts, end to end) into timed batches, and its fixed-shape call."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bert_compiler.engines.backend import load_engine
from bert_compiler.engines.batching import BatchingSpec, padding_fraction, plan_batches
from bert_compiler.engines.ort_session import (
    ATTENTION_KERNELS,
    DEFAULT_ATTENTION_KERNELS,
    OrtEngine,
    OrtEngineOptions,
    provider_entries,
)
from bert_compiler.models.loading import (
    ModelInfo,
    build_wrapper,
    load_torch_model,
)
from bert_compiler.runtime.encoder import (
    Encoder,
)
from bert_compiler.runtime.text import Text
from bert_compiler.runtime.tokens import Tokens
from bert_compiler.stages.layout import Layout

log = logging.getLogger("bert_compile")

# A batch size that means "no limit on padded tokens": peers are batched by row count alone.
_UNLIMITED = 1 << 40


@dataclass
class Runner:
    """A runner on real text: ``run(tokens)`` returns per-batch milliseconds and the padding
    fraction; ``fixed(feeds)`` runs one fixed-shape batch (None: not timed there)."""

    name: str
    batching: str
    batch: int
    run: Callable[[Tokens], tuple[list[float], float]]
    fixed: Callable[[dict[str, np.ndarray]], Any] | None = None
    rounds: list[float] = field(default_factory=list)
    batch_ms: list[float] = field(default_factory=list)
    padding: float = 0.0
    # End to end: ``run`` ignores the shared token rows and encodes the texts itself.
    includes_tokenization: bool = False


def engine_runner(
    name: str, batching: str, encoder: Encoder, device_outputs: bool = False
) -> Runner:
    def run(tokens: Tokens) -> tuple[list[float], float]:
        encoder.run(tokens, device_outputs=device_outputs)
        return encoder.stats.batch_ms, encoder.stats.padding_fraction

    engine = encoder.engine
    if encoder.packed:
        fixed = _packed_fixed(engine)
    else:
        fixed = engine.run_device if encoder.on_gpu else engine.run
    return Runner(name, batching, encoder.batching.max_batch, run, fixed)


def text_runner(
    name: str, batching: str, encoder: Encoder, texts: list[Text], device_outputs: bool = False
) -> Runner:
    """An engine end to end: the texts in (tokenized by the runtime as ``encode`` does it,
    windows ahead of the engine), outputs out."""

    def run(_tokens: Tokens) -> tuple[list[float], float]:
        encoder.encode(texts, device_outputs=device_outputs)
        return encoder.stats.batch_ms, encoder.stats.padding_fraction

    runner = Runner(name, batching, encoder.batching.max_batch, run)
    runner.includes_tokenization = True
    return runner


def _sentence_transformers_runner(
    info: ModelInfo, texts: list[Text], batch: int, on_gpu: bool
) -> Runner:
    """sentence-transformers' ``SentenceTransformer.encode`` on the model folder, end to end
    (its own tokenization and batching, length-sorted inside), fp16 on a GPU, fp32 on a CPU;
    embeddings to host memory as numpy."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(info.path), device="cuda" if on_gpu else "cpu")
    if on_gpu:
        model = model.half()

    def run(_tokens: Tokens) -> tuple[list[float], float]:
        model.encode(texts, batch_size=batch, convert_to_numpy=True, show_progress_bar=False)
        return [], 0.0

    precision = "fp16" if on_gpu else "fp32"
    runner = Runner(
        f"sentence-transformers {precision} encode", f"its own, batch {batch}", batch, run
    )
    runner.includes_tokenization = True
    return runner


def _packed_fixed(engine: Any) -> Callable[[dict[str, Any]], Any]:
    """A packed-row engine at a fixed shape, fed as the runtime feeds it: every position of a
    fixed shape is a real token, so its rows back to back."""
    import torch

    def run(feeds):
        ids = torch.as_tensor(feeds["input_ids"])
        rows, seq = ids.shape
        types = feeds.get("token_type_ids")
        types = torch.zeros_like(ids) if types is None else torch.as_tensor(types)
        lengths = torch.full((rows,), seq, dtype=torch.int64, device=ids.device)
        return engine.run_packed(ids.reshape(-1), types.reshape(-1), lengths, seq)

    return run


def _feeds_runner(
    name: str,
    run_feeds: Callable[[dict[str, Any]], Any],
    *,
    input_names: Sequence[str],
    pad_id: int,
    batch: int,
    sort: bool,
    on_gpu: bool,
) -> Runner:
    """A peer on real text: rows batched by count (sorted or in dataset order), each batch padded
    to its longest row; on a GPU the batches are uploaded before timing (in the peer's favour)."""
    prepared: dict[int, tuple[list, float]] = {}

    def run(tokens: Tokens) -> tuple[list[float], float]:
        key = id(tokens)
        if key not in prepared:
            prepared.clear()
            batches = plan_batches(tokens.lengths, BatchingSpec(batch, _UNLIMITED, sort=sort))
            matrices = tokens.matrices(input_names, pad_id)
            feeds: list[dict[str, Any]] = [
                {n: m[b.rows, : b.length] for n, m in matrices.items()} for b in batches
            ]
            if on_gpu:
                import torch

                feeds = [{n: torch.from_numpy(a).cuda() for n, a in f.items()} for f in feeds]
            prepared[key] = (feeds, padding_fraction(batches, tokens.lengths))
        feeds, padding = prepared[key]
        times = []
        for item in feeds:
            started = time.perf_counter()
            run_feeds(item)
            if on_gpu:
                import torch

                torch.cuda.synchronize()
            times.append((time.perf_counter() - started) * 1e3)
        return times, padding

    batching = f"{'length-sorted' if sort else 'dataset order'}, batch {batch}"
    return Runner(name, batching, batch, run, run_feeds)


def _torch_runner(info: ModelInfo, on_gpu: bool) -> Callable[[dict[str, Any]], Any]:
    import torch

    wrapper = build_wrapper(info, load_torch_model(info, attn_implementation=None))
    if on_gpu:
        wrapper = wrapper.half().cuda()
    names = info.architecture.input_names

    def run(feeds):
        with torch.inference_mode():
            args = [
                f if isinstance(f, torch.Tensor) else torch.from_numpy(f)
                for f in (feeds[n] for n in names)
            ]
            return wrapper(*args)

    return run


def plain_ort_engine(
    info: ModelInfo, exported: Path, folder: Path, on_gpu: bool, attention: str = "default"
) -> OrtEngine:
    """The ONNX Runtime peer: ORT's transformer optimizer on the exported graph (and, on a GPU,
    its fp16 conversion and CUDA graphs), nothing of this project's but, when asked, its choice
    of attention kernels (``attention``: engines/ort_session.py ATTENTION_KERNELS)."""
    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import optimize_model

    destination = folder / ("ort-plain-fp16.onnx" if on_gpu else "ort-plain-fp32.onnx")
    if not destination.is_file():
        model = optimize_model(
            str(exported),
            model_type=info.architecture.ort_optimizer_type,
            num_heads=info.num_heads,
            hidden_size=info.hidden_size,
            use_gpu=on_gpu,
        )
        if on_gpu:
            model.convert_float_to_float16(keep_io_types=True)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_model_to_file(str(destination))
    options = OrtEngineOptions(
        device="cuda" if on_gpu else "cpu",
        fp16=on_gpu,
        cuda_graph=on_gpu,
        attention_kernels=attention if on_gpu else "default",
    )
    entries = provider_entries(options, None)
    session = ort.InferenceSession(
        str(destination),
        providers=[name for name, _ in entries],
        provider_options=[opts for _, opts in entries],
    )
    return OrtEngine(session, entries[0][0], destination, options)


def sentence_transformers_factories(
    info: ModelInfo, sentences: list[Text], on_gpu: bool
) -> list[Callable[[], Runner]]:
    """The peer users know for embeddings, at its default batch (32) and a large one; none for
    a classifier, or where sentence-transformers is not installed (said in a warning)."""
    import importlib.util

    if info.task != "sentence-embedding":
        return []
    if importlib.util.find_spec("sentence_transformers") is None:
        log.warning("[bench] sentence-transformers is not installed: no end-to-end peer")
        return []
    return [
        partial(_sentence_transformers_runner, info, sentences, batch, on_gpu)
        for batch in (32, 1024 if on_gpu else 256)
    ]


def fresh(folder: Path, loaded: Any, on_gpu: bool) -> Any:
    """A newly loaded engine on a GPU (its graphs and arena go with the runner), else the one
    already loaded."""
    return load_engine(folder)[0] if on_gpu else loaded


def fresh_in_order(folder: Path, engine: Any, pad_id: int, on_gpu: bool) -> Runner:
    """The engine itself fed in dataset order, loaded afresh on a GPU (fresh)."""
    return _engine_in_order(folder.name, fresh(folder, engine, on_gpu), pad_id, on_gpu)


def _engine_in_order(name: str, engine: Any, pad_id: int, on_gpu: bool) -> Runner:
    """The engine fed as without the runtime: dataset order, each batch padded to its longest
    row (batch 128 on a GPU, 32 on a CPU)."""
    return _feeds_runner(
        f"{name} (fed in dataset order)",
        engine.run_device if on_gpu else engine.run,
        input_names=engine.input_names,
        pad_id=pad_id,
        batch=128 if on_gpu else 32,
        sort=False,
        on_gpu=on_gpu,
    )


def peer_factories(
    info: ModelInfo, layout: Layout, peer_batches: Sequence[int], pad_id: int, on_gpu: bool
) -> list[Callable[[], Runner]]:
    """PyTorch in dataset order and length-sorted, and plain ONNX Runtime length-sorted, at
    ``peer_batches`` (empty: bench's defaults for the device)."""
    torch_run = _torch_runner(info, on_gpu)
    label = "torch fp16 eager" if on_gpu else "torch fp32 eager"
    batches = peer_batches or ((32, 128, 512, 1024) if on_gpu else (32, 128))
    common: dict[str, Any] = {
        "input_names": list(info.architecture.input_names),
        "pad_id": pad_id,
        "on_gpu": on_gpu,
    }
    factories: list[Callable[[], Runner]] = [
        lambda: _feeds_runner(label, torch_run, batch=128 if on_gpu else 32, sort=False, **common)
    ]
    for batch in batches:
        factories.append(partial(_feeds_runner, label, torch_run, batch=batch, sort=True, **common))
    exported = layout.export / "model.onnx"
    if not exported.is_file():
        log.warning("[bench] %s missing: no plain ONNX Runtime peer", exported)
        return factories
    if on_gpu and "CUDAExecutionProvider" not in _ort_providers():
        log.warning("[bench] ONNX Runtime has no CUDA provider here: no plain ONNX Runtime peer")
        return factories
    folder = layout.root / "bench" / "peers"
    plain_label = (
        "ORT fp16 + CUDA graphs (ORT's optimizer)" if on_gpu else "ORT fp32 (ORT's optimizer)"
    )
    shared = None if on_gpu else plain_ort_engine(info, exported, folder, on_gpu)

    def plain_runner(batch: int, attention: str = "default") -> Runner:
        plain = shared or plain_ort_engine(info, exported, folder, on_gpu, attention)
        run = plain.run_device if on_gpu else plain.run
        label = plain_label + (f", {attention} attention kernels" if attention != "default" else "")
        return _feeds_runner(label, run, batch=batch, sort=True, **common)

    # With CUDA graphs every distinct padded shape keeps its own graph and buffers: small
    # batches of exact lengths would make hundreds of them.
    for batch in [b for b in batches if b >= 128] if on_gpu else batches:
        factories.append(partial(plain_runner, batch))
    if on_gpu:
        # The same peer with the other attention kernels, at its largest batch: what that one
        # setting is worth apart from the runtime.
        other = next(k for k in ATTENTION_KERNELS if k != DEFAULT_ATTENTION_KERNELS)
        factories.append(lambda: plain_runner(max(batches), other))
    return factories


def _ort_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())
