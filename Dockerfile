# The GPU CI runner image: NVIDIA's TensorRT container (CUDA, cuDNN, TensorRT and its Python
# bindings) plus ONNX Runtime GPU and bert-compiler. Build from the repository root:
#     docker build -t bert-compiler-gpu .
#     docker run --gpus all -v "$PWD/out:/out" bert-compiler-gpu \
#         bert-compile run --out /out --target auto --json
# The TensorRT version that builds the plans is this image's; Triton must run the same one
# (or plans built --version-compatible). Pick the tag that matches your Triton release.
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:25.10-py3
FROM ${TENSORRT_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG ORT_GPU_VERSION=1.31.1
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

WORKDIR /opt/bert-compiler
COPY pyproject.toml README.md ./
COPY bert_compiler bert_compiler
# (with the test dependencies: the GPU job runs the gpu and tensorrt tests in this image)

# CPU torch is enough: export and the PyTorch reference of verify run on the CPU; the engines
# run on the GPU. The CPU onnxruntime the package pins is swapped for onnxruntime-gpu (both
# provide the `onnxruntime` module; only one may be installed).
RUN python3 -m pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu \
 && python3 -m pip install ".[test]" \
 && python3 -m pip uninstall -y onnxruntime \
 && python3 -m pip install "onnxruntime-gpu==${ORT_GPU_VERSION}" \
 && python3 -c "import tensorrt, onnxruntime; print('tensorrt', tensorrt.__version__, onnxruntime.get_available_providers())"

WORKDIR /work
CMD ["bert-compile", "doctor"]
