"""Plan the MLPerf DLRMv2 model for a memory budget, then train it with that plan.

    python examples/plan_and_train.py --world-size 1 --memory-per-rank 16GiB --steps 3

Builds torchrec's DLRM_DCN with the MLPerf DLRMv2 sizes (26 CriteoTB tables, dim 128) on
meta, lets ``plan_compression_`` choose schemes/ratios and the sharding plan, shards
with DMP (one gloo process here) and trains a few steps on synthetic one-hot data.
Prints the plan, peak RSS and step times.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from torchrec import EmbeddingBagCollection
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from torchrec_compress import sharders
from torchrec_compress.data.mlperf import DLRMV2_CARDINALITIES, DLRMV2_DIM
from torchrec_compress.data.synthetic import SyntheticCriteo, cat_names
from torchrec_compress.models import build_dlrm, logical_tables
from torchrec_compress.distributed.planner import parse_bytes, plan_compression_
from torchrec_compress.train import local_process_group, train_steps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--world-size", type=int, default=1, help="world size to plan for (training runs in this process)")
    p.add_argument("--memory-per-rank", default="16GiB")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1024)
    a = p.parse_args(argv)
    tables = logical_tables(cat_names(26), DLRMV2_CARDINALITIES, DLRMV2_DIM)
    torch.manual_seed(0)
    model = build_dlrm(tables, 13, [512, 256], [1024, 1024, 512, 256, 1], kind="dlrm_dcn", dcn_num_layers=3, dcn_low_rank_dim=512)
    plan = plan_compression_(model, a.world_size, parse_bytes(a.memory_per_rank))
    print(plan)
    data = list(SyntheticCriteo(DLRMV2_CARDINALITIES, a.batch_size, a.steps, seed=0, split="train"))
    with local_process_group():
        t0 = time.perf_counter()
        tables_params = [q for m in model.modules() if type(m) is EmbeddingBagCollection for q in m.parameters()]
        apply_optimizer_in_backward(RowWiseAdagrad, tables_params, {"lr": 0.005})
        dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan.sharding_plan, sharders=sharders())
        opt = torch.optim.Adagrad([q for _, q in in_backward_optimizer_filter(dmp.named_parameters())], lr=0.005)
        setup_s = time.perf_counter() - t0
        losses, seconds, _ = train_steps(dmp, opt, data, desc="train", total=a.steps * a.batch_size)
    res = {"schemes": {k: repr(v) for k, v in plan.schemes.items()}, "planned_bytes": plan.per_rank_bytes, "setup_s": setup_s,
           "step_s": seconds / a.steps, "losses": losses, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    print(json.dumps({k: v for k, v in res.items() if k != "schemes"}))
    return res


if __name__ == "__main__":
    main()
