"""torchx components for torchrec-compress (no `from __future__ import annotations`: torchx reads the real types).

    torchx run -s local_cwd launchers/components.py:train --nproc_per_node 2 -- --config examples/frappe.yaml
    torchx run -s slurm --scheduler_args partition=gpu launchers/components.py:train --nnodes 4 --nproc_per_node 8 --gpu 8 -- --config ...
    torchx run -s kubernetes --scheduler_args queue=default launchers/components.py:train --image <img> -- --config ...

TorchRec's own torchx example notes torchx is no longer actively maintained; the same
job with plain torchrun:

    torchrun --nnodes 1 --nproc_per_node 2 -m torchrec_compress.cli train --config examples/frappe.yaml
"""

import torchx.components.dist as dist
from torchx import specs


def train(*args: str, nnodes: int = 1, nproc_per_node: int = 2, cpu: int = 2, gpu: int = 0, memMB: int = 8192,
          image: str = "", name: str = "torchrec-compress-train") -> specs.AppDef:
    """``torchrec-compress train`` on nnodes x nproc_per_node ranks (gloo on CPU, NCCL on GPUs).

    Args:
        args: arguments of ``torchrec-compress train`` (e.g. ``--config examples/frappe.yaml train.epochs=2``)
        nnodes: nodes
        nproc_per_node: ranks per node
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node
        image: container image (ignored by local_cwd)
        name: job name
    """
    kw = {"image": image} if image else {}
    return dist.ddp("train", *args, m="torchrec_compress.cli", j=f"{nnodes}x{nproc_per_node}", cpu=cpu, gpu=gpu,
                    memMB=memMB, name=name, **kw)
