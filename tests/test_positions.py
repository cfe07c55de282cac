"""Position codes (distributed/positions.py): exact round trip, and on 2 gloo ranks every
sharding type delivers each id with the code of its source rank and position."""
import pytest
import torch

from torchrec_compress.distributed.plans import SHARDING_TYPES
from torchrec_compress.distributed.positions import SHIFT, decode_positions, encode_positions, pull
from torchrec_compress.testing.multiprocess import run_on_ranks
from torchrec_compress.testing.positions import ROWS, positions_worker, pull_empty_worker, pull_source, pull_worker


def test_round_trip_is_exact_at_the_largest_codes():
    w = torch.cat([encode_positions(5, 0, torch.device("cpu")), encode_positions(3, 2**20 - 1, torch.device("cpu")),
                   torch.tensor([float((2**20 - 1) * SHIFT + SHIFT - 1)], dtype=torch.float64)])
    src, pos = decode_positions(w)
    assert src.tolist() == [0] * 5 + [2**20 - 1] * 4
    assert pos.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, SHIFT - 1]


def test_bad_codes_are_refused():
    with pytest.raises(ValueError, match="float64"):
        decode_positions(torch.zeros(2))
    with pytest.raises(ValueError, match="rank"):
        encode_positions(2, -1, torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_every_sharding_type_delivers_the_origin_of_each_id_2ranks(sharding_type):
    results = run_on_ranks(positions_worker, sharding_type)
    sent = [0, 0]
    for rank, out in enumerate(results):
        for values, src, pos in out["received"]:
            assert len(values) == len(src) == len(pos)
            for v, s, p in zip(values, src, pos):
                orig = results[s]["values"][p]
                # row-wise shards receive the row within their block of ceil(ROWS / 2) rows
                assert v == (orig % -(-ROWS // 2) if sharding_type in ("row_wise", "table_row_wise") else orig)
            for s in src:
                sent[s] += 1
    for rank, out in enumerate(results):  # every id arrived (column-wise: once per column shard)
        copies = 2 if sharding_type == "column_wise" else 1
        assert sent[rank] == copies * len(out["values"]), (sharding_type, sent)


def test_pull_on_one_process_is_an_index_select_with_its_gradient():
    source = pull_source(0).requires_grad_()
    pos = torch.tensor([3, 0, 3])
    got = pull(source, torch.zeros(3, dtype=torch.int64), pos)
    got.sum().backward()
    assert torch.equal(got, pull_source(0)[pos])
    assert source.grad[:, 0].tolist() == [1, 0, 0, 2, 0]


@pytest.mark.slow
def test_pull_answers_from_the_source_rank_and_sends_gradients_back_2ranks():
    results = run_on_ranks(pull_worker)
    expected_grad = [torch.zeros(5 + r, 2) for r in range(2)]
    for out in results:
        for i, (s, p, row) in enumerate(zip(out["src"], out["pos"], out["got"])):
            assert row == pull_source(s)[p].tolist()
            expected_grad[s][p] += 1.0 + i
    for r, out in enumerate(results):
        assert torch.equal(torch.tensor(out["grad"]), expected_grad[r])


@pytest.mark.slow
def test_pull_with_a_rank_that_asks_for_nothing_2ranks():
    r0, r1 = run_on_ranks(pull_empty_worker)
    assert r0 == {"got": [], "grad": [1.0, 1.0, 1.0, 0.0]}
    assert r1 == {"got": [0.0, 1.0, 2.0], "grad": [0.0, 0.0, 0.0, 0.0]}
