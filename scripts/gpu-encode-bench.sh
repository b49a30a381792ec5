#!/usr/bin/env bash
# Texts in at engine speed, on the GPU machine (issue 24): the torch engines of random-weight
# MiniLM-L6 and BERT-base built and verified, the number of tokenizer processes chosen on the
# calibration sentences, then `bench` on STS-B dev x8 (24,000 texts): each engine on token rows
# and end to end (texts in: `Encoder.encode`), beside sentence-transformers' encode (fp16) and
# PyTorch eager, in one process per model. Run from the repository root on the GPU machine with
# the onnxsim and onnxruntime wheels in $WHEELS (the engines' fuse step needs both):
#   scripts/gpu-encode-bench.sh MODEL_FILES_FOLDER OUT_FOLDER
# STEPS (default "build choose bench") runs only some steps.
set -euo pipefail
like=$1 out=$2
steps=" ${STEPS:-build choose bench} "
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${WHEELS:-.device-carry/whl}"/*.whl
mkdir -p "$out"
if [[ $steps == *" build "* ]]; then
  ENGINES=torch STEPS=build scripts/gpu-bench.sh "$like" "$out" minilm bert-base
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
cli=(python3 -m bert_compiler.cli)
if [[ $steps == *" choose "* ]]; then
  # Chosen on the calibration sentences, never on the STS-B text reported below.
  "${cli[@]}" bench --model /tmp/models/minilm --out "$out/minilm" --json --no-peers \
    --fixed-shapes '' --data bert_compiler/calibration/data/calibration-sentences.tsv --min-sentences 24000 \
    --rounds 3 --tokenizer-workers 2,4,8,15 > "$out/minilm/bench-choose-stdout.json"
  rm -rf "$out/minilm/bench-calibration" && mv "$out/minilm/bench" "$out/minilm/bench-calibration"
fi
if [[ $steps == *" bench "* ]]; then
  for model in ${MODELS:-minilm bert-base}; do
    "${cli[@]}" bench --model "/tmp/models/$model" --out "$out/$model" --json \
      --min-sentences 24000 --rounds 3 --peer-batches 1024 --fixed-shapes '' \
      > "$out/$model/bench-stdout.json"
  done
fi
