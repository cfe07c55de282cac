"""Position codes (distributed/positions.py): exact round trip, and on 2 gloo ranks every
sharding type delivers each id with the code of its source rank and position."""
import pytest
import torch

from torchrec_compress.distributed.plans import SHARDING_TYPES
from torchrec_compress.distributed.positions import SHIFT, decode_positions, encode_positions
from torchrec_compress.testing.multiprocess import run_on_ranks
from torchrec_compress.testing.positions import ROWS, positions_worker


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
