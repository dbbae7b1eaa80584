"""A GPU workload that still runs, on the CPU, where the cluster has no GPU, and says so.

Uses PyTorch when installed (add it through --requirements), else NumPy."""

import socket

import ray

ray.init()
gpus = int(ray.cluster_resources().get("GPU", 0))
print(f"cluster has {gpus} GPU(s)" + ("" if gpus else ": running on the CPU instead"))


@ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)
def matmul(size: int) -> str:
    try:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        a = torch.rand(size, size, device=device)
        checksum = float((a @ a).sum())
        return f"{socket.gethostname()}: torch on {device}, checksum {checksum:.3e}"
    except ImportError:
        import numpy as np

        a = np.random.default_rng(0).random((size, size))
        return f"{socket.gethostname()}: numpy on cpu (no torch), checksum {float((a @ a).sum()):.3e}"


for line in ray.get([matmul.remote(512) for _ in range(max(gpus, 2))]):
    print(line)
print("GPU_WORKLOAD_OK")
