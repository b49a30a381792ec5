#!/usr/bin/env python3
"""Send text to a bert-compile Triton repository's text model and print what comes back.

Every text model `bert-compile package` writes (``<model>-<engine>-text``: an ensemble, or the
one-model Python text engine ``<model>-ort-cpu-<precision>-python-text``) takes raw strings in
``TEXT`` and returns the engine's outputs (``sentence_embedding``, ``logits`` or
``last_hidden_state`` + ``attention_mask``). Examples::

    python scripts/triton_client.py --model all-MiniLM-L6-v2-ort-cpu-fp32-text "A man plays."
    python scripts/triton_client.py --protocol grpc --url localhost:8001 \\
        --model all-MiniLM-L6-v2-trt-fp16-text --json < sentences.txt

With no TEXT arguments, one text per line is read from standard input. ``--json`` prints one
JSON object (output name -> nested lists) as the last stdout line. A cross-encoder's text model
takes pairs (``TEXT`` and ``TEXT_PAIR``): give each as ``query<TAB>passage``; it returns one
score (``logits`` [N, 1]) per pair.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def infer(url: str, protocol: str, model: str, texts: list[str], timeout: float = 60.0) -> dict:
    """Run ``texts`` through ``model`` on the server at ``url``; return output name -> array."""
    if protocol == "grpc":
        import tritonclient.grpc as client_module

        client = client_module.InferenceServerClient(url)
        metadata = client.get_model_metadata(model, as_json=True)
    else:
        import tritonclient.http as client_module

        client = client_module.InferenceServerClient(url, network_timeout=timeout)
        metadata = client.get_model_metadata(model)
    inputs = [i["name"] for i in metadata["inputs"]]
    if len(inputs) == 2:  # TEXT and TEXT_PAIR: one query<TAB>passage pair a text
        pairs = [t.split("\t", 1) for t in texts]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"{model} scores text pairs: give each as query<TAB>passage")
        columns = [[pair[0] for pair in pairs], [pair[1] for pair in pairs]]
    else:
        columns = [texts]
    tensors = []
    for name, column in zip(inputs, columns, strict=True):
        data = np.array([[t.encode("utf-8")] for t in column], dtype=object)
        tensor = client_module.InferInput(name, list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        tensors.append(tensor)
    names = [o["name"] for o in metadata["outputs"]]
    requested = [client_module.InferRequestedOutput(n) for n in names]
    if protocol == "grpc":
        result = client.infer(model, tensors, outputs=requested, client_timeout=timeout)
    else:
        result = client.infer(model, tensors, outputs=requested)
    return {name: result.as_numpy(name) for name in names}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts (default: stdin lines)")
    parser.add_argument("--model", required=True, help="the text model, e.g. M-ort-cpu-fp32-text")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--url", default=None, help="host:port (default :8000 http, :8001 grpc)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin]
    if not texts:
        parser.error("no text given")
    url = args.url or ("localhost:8001" if args.protocol == "grpc" else "localhost:8000")
    from tritonclient.utils import InferenceServerException

    try:
        outputs = infer(url, args.protocol, args.model, texts)
    except (InferenceServerException, ConnectionError, OSError, ValueError) as err:
        print(f"triton_client: {args.model} at {url} ({args.protocol}): {err}", file=sys.stderr)
        return 1
    for name, array in outputs.items():
        print(f"{name}: shape {list(array.shape)} dtype {array.dtype}", file=sys.stderr)
    if args.json:
        print(json.dumps({name: array.tolist() for name, array in outputs.items()}))
    else:
        for index, text in enumerate(texts):
            first = next(iter(outputs.values()))[index].reshape(-1)
            print(f"{text[:40]!r}: {np.array2string(first[:4], precision=4)} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
