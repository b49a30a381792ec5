"""The GPUs (as nvidia-smi reports them) that target-planning tests describe machines with."""

from bert_compiler.core.targets import Gpu

H100 = Gpu(0, "NVIDIA H100 80GB HBM3", "9.0", 81559, "580.159.04")
L4 = Gpu(1, "NVIDIA L4", "8.9", 23034, "580.159.04")
A100 = Gpu(2, "NVIDIA A100-SXM4-80GB", "8.0", 81920, "580.159.04")
T4 = Gpu(3, "Tesla T4", "7.5", 15360, "580.159.04")
ORT_CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")
