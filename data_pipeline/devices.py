"""Which device a Ray actor or task computes on, and what a job asks Ray for.

Ray sets `CUDA_VISIBLE_DEVICES` only for the actors and tasks that requested GPUs; one that asked
for none still sees every GPU of its node, so `torch.cuda.is_available()` says nothing about what
it may use. The contract of every data and sampling stage:

  * a job requests exactly the `num_gpus` its config gives (per actor / task; 0 = CPU), whatever
    `ray.cluster_resources()` says when it starts: on an autoscaling cluster whose GPU group
    starts at 0 nodes, the request is what makes the autoscaler start a GPU node. (A request the
    cluster can never meet waits, and Ray's autoscaler reports it as infeasible.)
  * an actor computes on the GPU only when Ray gave it one (`ray.get_gpu_ids()` non-empty);
    that GPU is `cuda` (= `cuda:0`: Ray restricted `CUDA_VISIBLE_DEVICES` to it).

Bundled configs default to `num_gpus: 0`, so local CPU-only runs, the demo and the tests
request no GPU; cluster configs set it (e.g. jobs/configs/preprocess_laion.yaml).
"""

from __future__ import annotations


def assigned_device() -> str:
    """"cuda" when this process is a Ray actor/task that Ray assigned a GPU, else "cpu" (also
    outside Ray and on the driver, which holds no reservation)."""
    import ray

    if ray.is_initialized() and ray.get_gpu_ids():
        return "cuda"
    return "cpu"


def enable_tf32(device: str | object) -> bool:
    """On a CUDA device, let fp32 matmuls use TF32 tensor cores (`torch.set_float32_matmul_precision
    ("high")`; cuDNN convolutions already do by default): 8x the fp32 throughput on A100/H100 at
    a 10-bit mantissa inside the product, what fp32 training on GPUs uses. bf16/fp16 runs are
    unaffected. A CPU process is left alone (its fp32 results stay bit-exact). Call it where a
    GPU worker or actor starts; returns whether it was turned on."""
    import torch

    if torch.device(device).type != "cuda":
        return False
    torch.set_float32_matmul_precision("high")
    return True
