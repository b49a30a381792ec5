#!/usr/bin/env bash
# The H100 benchmark of issue 13, run on the GPU machine from the repository root after the
# onnxruntime-gpu and onnxsim wheels are installed into /tmp/site (the runs in docs/gpu-bench/
# used onnxruntime-gpu 1.31.1 and onnxsim 0.8.1 beside the machine's torch 2.11 cu130; the wheels
# travel to the GPU machine in chunks, as ../shared/tools/ort-gpu-chunks.sh describes, and are
# joined and installed with `pip install --no-index --no-deps --target /tmp/site WHEEL...`).
#   scripts/gpu-bench.sh MODEL_FILES_FOLDER OUT_FOLDER [bert-base|minilm ...]
# STEPS (default "build choose bench") runs only some steps, so one model's work can be split over
# device calls of at most 10 minutes; ATTENTION (default "fused unfused") lists the attention
# kernel choices built with CUDA graphs beside the default one; ENGINES (default "plain cudagraph
# attention packed torch") the engines the build step makes.
# For each model: random weights (scripts/random_encoder.py), `run` (export, simplify, fuse, fp16
# ONNX Runtime CUDA engines with and without CUDA graphs, with graphs and the other choices of
# attention kernels, and in ORT's packing mode (--packed-attention, which cannot take CUDA graphs),
# verify against PyTorch), then `bench`
# (first on the calibration sentences with CHOOSE_ARGS when set, then on STS-B with BENCH_ARGS).
set -euo pipefail
like=$1 out=$2
shift 2
models=${*:-minilm bert-base}
steps=" ${STEPS:-build choose bench} "
engines=" ${ENGINES:-plain cudagraph attention packed torch} "
# The package folder bert_compiler/ is imported from the repository root, without pip.
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
cli=(python3 -m bert_compiler.cli)
for model in $models; do
  folder=/tmp/models/$model
  extra=()
  [ "$model" = bert-base ] && extra=(--bert-base)
  if [[ $steps == *" build "* ]]; then
    python3 scripts/random_encoder.py --like "$like" --out "$folder" "${extra[@]}"
    common=(--model "$folder" --out "$out/$model" --target cuda --precision fp16 --no-package
            --metric-limit 300 --no-metric-gate -q)
    if [[ $engines == *" plain "* ]]; then "${cli[@]}" run "${common[@]}"; fi
    if [[ $engines == *" cudagraph "* ]]; then "${cli[@]}" run "${common[@]}" --cuda-graph; fi
    if [[ $engines == *" attention "* ]]; then
      for kernels in ${ATTENTION:-fused unfused}; do
        "${cli[@]}" run "${common[@]}" --cuda-graph --attention-kernels "$kernels"
      done
    fi
    if [[ $engines == *" packed "* ]]; then "${cli[@]}" run "${common[@]}" --packed-attention; fi
    # The torch engine (bert_compiler/engines/torch_encoder.py) needs no onnxruntime-gpu, only
    # the fused graph.
    if [[ $engines == *" torch "* ]]; then "${cli[@]}" run "${common[@]/#cuda/torch}"; fi
  fi
  if [[ $steps == *" choose "* ]] && [ -n "${CHOOSE_ARGS:-}" ]; then
    # Batching candidates timed on the calibration sentences (where defaults are chosen), kept
    # apart from the STS-B run that reports them.
    # shellcheck disable=SC2086
    "${cli[@]}" bench --model "$folder" --out "$out/$model" --json --no-peers --fixed-shapes '' \
      --data bert_compiler/calibration/data/calibration-sentences.tsv --min-sentences 12000 $CHOOSE_ARGS \
      > "$out/$model/bench-choose-stdout.json"
    rm -rf "$out/$model/bench-calibration" && mv "$out/$model/bench" "$out/$model/bench-calibration"
  fi
  if [[ $steps == *" bench "* ]]; then
    # shellcheck disable=SC2086 # BENCH_ARGS: extra bench options, split on spaces
    "${cli[@]}" bench --model "$folder" --out "$out/$model" --json ${BENCH_ARGS:-} \
      > "$out/$model/bench-stdout.json"
  fi
done
