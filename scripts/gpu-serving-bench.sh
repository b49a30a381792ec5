#!/usr/bin/env bash
# Triton on the GPU machine (issue 24): the torch engine's text model (torch_text_model.py on
# KIND_GPU) packaged, served by the nvidia-pytriton tritonserver (Python backend) on loopback,
# and loaded from several gRPC client processes (scripts/triton_load.py: 1 and 64 texts per
# request, concurrency 1, 16, 64, 256, bounded counts and a deadline). Two steps, so that each
# device call carries under 64 MiB:
#   STEP=prepare: onnxruntime + onnxsim (the fuse step) into /tmp/site, the random-weight
#     models' torch engines built and verified (scripts/gpu-bench.sh), and the Python packages
#     of the server's Python-backend stub (numpy 1.x, tokenizers, safetensors; the image's torch
#     linked in by scripts/link-torch-site.sh) into /tmp/tp/X.Y; tritonclient into /tmp/site.
#   STEP=serve: nvidia-pytriton into /tmp/site, package (INSTANCES per GPU, default 4), serve,
#     load.
#   STEP=prepare scripts/gpu-serving-bench.sh MODEL_FILES_FOLDER OUT [MODELS...]
#   STEP=serve scripts/gpu-serving-bench.sh MODEL_FILES_FOLDER OUT [MODELS...]
set -euo pipefail
like=$1 out=$2
shift 2
models=${*:-minilm}
carry=.device-carry
install=(python3 -m pip install -q --no-index --no-deps --no-compile --upgrade)
export PYTHONUNBUFFERED=1
if [ "${STEP:-prepare}" = prepare ]; then
  "${install[@]}" --target /tmp/site "$carry"/whl/*.whl "$carry"/tw/tritonclient-*.whl
  ENGINES=torch STEPS=build scripts/gpu-bench.sh "$like" "$out" $models
  stub=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  "${install[@]}" --target "/tmp/tp/$stub" "$carry"/tw/numpy-*.whl "$carry"/tw/tokenizers-*.whl \
    "$carry"/tw/safetensors-*.whl
  scripts/link-torch-site.sh "$(python3 -c 'import torch, pathlib; print(pathlib.Path(torch.__file__).parents[1])')" "/tmp/tp/$stub"
  touch "/tmp/tp/$stub/.complete"
  exit 0
fi
"${install[@]}" --target /tmp/site "$carry"/pt/*.whl
export PYTHONPATH=/tmp/site:$PWD BERT_COMPILE_TRITON_PYTHON=/tmp/tp
cli=(python3 -m bert_compiler.cli)
repository=/tmp/repo
for model in $models; do
  "${cli[@]}" package --model "/tmp/models/$model" --out "$out/$model" --repository "$repository" \
    --gpu-text-instances "${INSTANCES:-4}"
done
"${cli[@]}" verify --repository "$repository" --model /tmp/models/minilm --out "$out/gate" \
  --metric-limit 300 --no-metric-gate --json > "$out/gate.json" || echo "gate exit $?"
"${cli[@]}" serve --repository "$repository" --http-port 8000 --grpc-port 8001 --json \
  > "$out/serve.json" 2> "$out/serve.log" &
server=$!
for _ in $(seq 240); do
  curl -sf localhost:8000/v2/health/ready >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { cat "$out/serve.log"; exit 1; }
  sleep 0.5
done
for model in $models; do
  python3 scripts/triton_load.py --url 127.0.0.1:8001 --model "$model-pt-cuda-fp16-text" \
    --texts-per-request 1,64 --concurrency 1,16,64,256 --processes 8 \
    --requests "${REQUESTS:-2048}" --deadline-s 30 --warmup 256 --json \
    > "$out/load-$model.txt" || echo "load exit $?"
done
kill -INT $server; wait $server || true
