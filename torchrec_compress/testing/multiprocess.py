"""Spawn a function on N gloo CPU ranks and collect a picklable result per rank."""
from __future__ import annotations

import os
import sys
import tempfile
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..train.loop import free_port


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, out_dir: str, backend: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while another still waits in a collective (SIGABRT at exit)
    finally:
        dist.destroy_process_group()
    # Only reached on success (an exception propagates to mp.spawn's error file). Skip the
    # interpreter's teardown: a C++ thread still joinable in a static destructor (gloo/TCPStore)
    # has aborted a worker *after* its result was saved ("terminate called without an active
    # exception", SIGABRT in CI), failing a test whose numbers were all in.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2, backend: str = "gloo") -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks (gloo CPU, or nccl with one
    GPU per rank); returns each rank's result."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world_size, free_port(), fn, args, d, backend), nprocs=world_size, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
