"""TrainPipelineSparseDist pipelines the compressed module: pipelined == non-pipelined == unsharded (2 ranks)."""
import pytest
import torch

from torchrec_compress.testing.multiprocess import run_on_ranks
from torchrec_compress.testing.pipeline import pipeline_worker

pytestmark = pytest.mark.slow


def _compare(states, full, tol):
    for name, shards in states.items():
        for r, c, t in shards:
            ref = full[name]
            ref = ref[r:r + t.shape[0], c:c + t.shape[1]] if t.dim() == 2 else ref
            assert (t.double() - ref.double()).abs().max().item() < tol, name


@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise"])
def test_pipelined_equals_plain_equals_unsharded(sharding_type):
    results = run_on_ranks(pipeline_worker, sharding_type)
    for res in results:
        assert res["module_type"] == "ShardedCompressedEmbeddingBagCollection"
        assert res["is_pipelined"], "TrainPipelineSparseDist did not pipeline the compressed module"
        assert len(res["pipelined"]) == len(res["plain"]) == 5
        torch.testing.assert_close(torch.tensor(res["pipelined"]), torch.tensor(res["plain"]), rtol=1e-5, atol=1e-6)
        _compare(res["pipelined_state"], res["unsharded_state"], 1e-5)
        _compare(res["plain_state"], res["unsharded_state"], 1e-5)
        assert res["lifecycle_fitted"] == [True, True, True, True]  # the procedures ran inside TrainPipelineSparseDist
    for t, maps in results[0]["lifecycle_maps"].items():  # ... and decided the same on both ranks
        for k, v in maps.items():
            assert torch.equal(v, results[1]["lifecycle_maps"][t][k]), f"{t}.{k}"
    # each rank's loss is its half of the batch; their mean is the unsharded (global) loss
    mean = (torch.tensor(results[0]["plain"]) + torch.tensor(results[1]["plain"])) / 2
    torch.testing.assert_close(mean, torch.tensor(results[0]["unsharded"]), rtol=1e-5, atol=1e-6)
