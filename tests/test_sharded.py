"""2 gloo ranks: DMP-sharded CompressedEmbeddingBagCollection == unsharded, every scheme x sharding type."""
import copy

import pytest
import torch
import torch.distributed.checkpoint as dcp

from torchrec_compress import CompressedEmbeddingBagCollection, sharders
from torchrec_compress.distributed.plans import SHARDING_TYPES
from torchrec_compress.testing.checkpoint import planner_worker, train_and_save_worker
from torchrec_compress.testing.data import random_bags
from torchrec_compress.testing.multiprocess import run_on_ranks
from torchrec_compress.testing.parity import direct_parity_worker, parity_schemes, parity_tables, sharded_parity_worker

pytestmark = pytest.mark.slow

# fp32 sums taken in another order (FBGEMM vs nn.EmbeddingBag) plus one optimizer step
TOL = 1e-5


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_sharded_matches_unsharded_2ranks(sharding_type):
    """Every scheme (FIITED through a prune/grow event) and an uncompressed table:
    forward, backward and 3 fused-optimizer steps (row-wise Adagrad, SGD; weighted KJTs) on 2 ranks."""
    results = run_on_ranks(sharded_parity_worker, sharding_type)
    for rank, per_opt in enumerate(results):
        for opt, diffs in per_opt.items():
            events, kept = diffs["fiited_events_kept"]
            assert events == 2 and 0 < kept <= 50  # FIITED pruned and grew (after steps 1 and 2), within its pool
            assert all(diffs["fitted"]), diffs["fitted"]  # FreqThreshold, Saec, both MPE tables finished their procedure
            assert max(diffs["forward"]) < TOL, (rank, opt, diffs)
            assert max(diffs["params"]) < TOL, (rank, opt, diffs)


@pytest.mark.parametrize("sharding_type", ["row_wise", "table_wise", "column_wise"])
def test_direct_plan_sharded_matches_unsharded_2ranks(sharding_type):
    """A direct plan (uncompressed, Hashing, FreqThreshold: the inner output is the output)
    under DMP: forward and 3 fused-optimizer steps equal the unsharded module's."""
    for rank, per_opt in enumerate(run_on_ranks(direct_parity_worker, sharding_type)):
        for opt, diffs in per_opt.items():
            assert diffs["direct"] == [True]
            assert max(diffs["forward"]) < TOL and max(diffs["params"]) < TOL, (rank, opt, diffs)


@pytest.mark.parametrize("sharding_type", ["row_wise", "table_wise"])
def test_dcp_checkpoint_from_2_ranks_loads_unsharded(sharding_type, tmp_path):
    outs = run_on_ranks(train_and_save_worker, sharding_type, str(tmp_path))
    torch.manual_seed(123)  # different init: everything must come from the checkpoint
    model = CompressedEmbeddingBagCollection(copy.deepcopy(parity_tables()), parity_schemes())
    sd = model.state_dict()
    dcp.load(sd, checkpoint_id=str(tmp_path))
    model.load_state_dict(sd)
    with torch.no_grad():
        full = model(random_bags(parity_tables(), 8, seed=999).kjt()).values()
    torch.testing.assert_close(full, torch.cat(outs), rtol=1e-5, atol=1e-6)


def test_sharders_offer_row_wise_on_cpu():
    ebc_sharder = sharders()[0]
    types = ebc_sharder.sharding_types("cpu")
    assert {"row_wise", "table_row_wise", "table_wise", "column_wise", "data_parallel"} <= set(types)
    assert len({type(s).__name__ for s in sharders()}) == len(sharders())


def test_torchrec_planner_plans_row_wise_on_cpu_with_our_sharders():
    plans = run_on_ranks(planner_worker)
    assert plans[0] == plans[1]
    assert set(plans[0].values()) == {"row_wise"} and "t_memcom__w" in plans[0]


@pytest.mark.parametrize("pipelineable", [False, True])
@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_per_id_stride_needs_no_collective_outside_row_wise(sharding_type, pipelineable):
    """Per-id KJTs of different strides on the 2 ranks: table-, column-wise and data-parallel
    tables take each rank's own (their output all-to-all knows every rank's batch size), with
    no all-reduce in the forward; row-wise types agree on the largest (one all-reduce)."""
    from torchrec_compress.testing.strides import stride_worker

    results = run_on_ranks(stride_worker, sharding_type, pipelineable)
    assert results[0]["stride"] != results[1]["stride"]
    for r in results:
        assert r["diff"] < TOL, results
        assert r["all_reduces"] == (1 if sharding_type in ("row_wise", "table_row_wise") else 0), results
