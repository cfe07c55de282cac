"""Compression-aware planner: fits budgets, compresses the right tables first, explains itself."""
import json
import time

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from torchrec_compress.cli import main
from torchrec_compress.data.mlperf import DLRMV2_CARDINALITIES
from torchrec_compress.distributed.planner import parse_bytes, plan_compression_, table_bytes, tables_module
from torchrec_compress.stats import FrequencyStats
from torchrec_compress.testing.checkpoint import compression_plan_worker
from torchrec_compress.testing.multiprocess import run_on_ranks

GiB = 2**30


def _dlrmv2():
    return [EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=128, num_embeddings=v, feature_names=[f"cat_{i}"])
            for i, v in enumerate(DLRMV2_CARDINALITIES)]


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 8, 64])
def test_dlrmv2_plans_fit_every_budget(world):
    total = sum(table_bytes(t, None) for t in _dlrmv2())
    for gib in (1, 4, 16, 80):
        t0 = time.perf_counter()
        plan = plan_compression_(tables_module(_dlrmv2()), world, gib * GiB)
        assert time.perf_counter() - t0 < 30
        assert max(plan.per_rank_bytes) <= gib * GiB, (world, gib, plan.per_rank_bytes)
        if total <= 0.9 * world * gib * GiB and max(table_bytes(t, None) for t in _dlrmv2()) <= gib * GiB:
            assert plan.schemes == {}, (world, gib)  # room for everything: nothing compressed
        covered = {name for m in plan.sharding_plan.plan.values() for name in m}
        assert all(any(c == t.name or c.startswith(t.name + "__") for c in covered) for t in _dlrmv2())


def test_uncompressed_when_it_fits_and_large_flat_tables_go_first():
    tables = [EmbeddingBagConfig(name="hot", embedding_dim=16, num_embeddings=100_000, feature_names=["h"]),
              EmbeddingBagConfig(name="flat", embedding_dim=16, num_embeddings=100_000, feature_names=["f"]),
              EmbeddingBagConfig(name="small", embedding_dim=16, num_embeddings=100, feature_names=["s"])]
    assert plan_compression_(tables_module(tables), 1, 1 * GiB).schemes == {}
    # statistics: "hot" takes 10x the lookups of "flat" over the same vocabulary size
    stats = FrequencyStats({"h": 100_000, "f": 100_000, "s": 100})
    g = torch.Generator().manual_seed(0)
    n = 20_000
    for key, rows, count in (("h", 100_000, 10 * n), ("f", 100_000, n), ("s", 100, n)):
        ids = torch.randint(0, rows, (count,), generator=g)
        stats.update(KeyedJaggedTensor(keys=[key], values=ids, lengths=torch.ones(count, dtype=torch.int64)))
    plan = plan_compression_(tables_module(tables), 1, 10 * 2**20, stats=stats)  # 10 MiB: one 100k x 16 table is 6.5 MiB
    by = {t.table: t for t in plan.tables}
    assert by["small"].ratio == 1 and by["flat"].ratio > 1
    assert by["hot"].ratio < by["flat"].ratio  # the table with the least lookup mass goes first
    assert max(plan.per_rank_bytes) <= 10 * 2**20


def test_pipelineable_plan_targets_the_compressed_module():
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=v, feature_names=[f"f{i}"]) for i, v in enumerate([200_000, 300])]
    plan = plan_compression_(tables_module(tables), 2, 4 * 2**20, pipelineable=True)
    assert list(plan.sharding_plan.plan) == ["ebc"] and "t0" in plan.schemes
    assert max(plan.per_rank_bytes) <= 4 * 2**20


def test_no_plan_error_names_the_dominant_table():
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=64, num_embeddings=40, feature_names=[f"f{i}"]) for i in range(3)]
    with pytest.raises(ValueError, match=r"no plan fits 1 x .*largest is 't0'"):
        plan_compression_(tables_module(tables), 1, 1000)


def test_parse_bytes():
    assert parse_bytes("16GiB") == 16 * GiB and parse_bytes("512MiB") == 2**29 and parse_bytes("80GB") == 80 * 10**9
    with pytest.raises(ValueError, match="cannot read a size"):
        parse_bytes("lots")


def test_cli_plan_prints_and_writes_json(tmp_path, capsys):
    tables = tmp_path / "t.yaml"
    tables.write_text("- {name: big, rows: 200000, dim: 16}\n- {name: small, rows: 50, dim: 16, importance: 2}\n")
    out = tmp_path / "plan.json"
    main(["plan", "--tables", str(tables), "--world-size", "2", "--memory-per-rank", "4MiB", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "big" in printed and "sharding" in printed
    data = json.loads(out.read_text())
    assert data["world_size"] == 2 and "big" in data["schemes"] and max(data["per_rank_bytes"]) <= 4 * 2**20
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {name: x, rows: 10}\n")
    with pytest.raises(SystemExit, match=r"lacks \['dim'\]"):
        main(["plan", "--tables", str(bad), "--world-size", "1", "--memory-per-rank", "1GiB"])


@pytest.mark.slow
def test_plan_shards_and_trains_on_2_ranks():
    res = run_on_ranks(compression_plan_worker)
    assert res[0]["schemes"] == res[1]["schemes"] and "t0" in res[0]["schemes"]
    assert all(max(r["per_rank"]) <= 4 * 2**20 for r in res)
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in res)
