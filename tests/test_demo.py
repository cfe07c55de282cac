"""The demo end to end at toy size: every scheme trains under single-process DMP and reports."""
import json

import torch.distributed as dist

from torchrec_compress.cli import main
from torchrec_compress.data import CRITEO_KAGGLE_CARDINALITIES
from torchrec_compress.config import presets, ranked_presets
from torchrec_compress.demo import run_demo

# Kaggle sizes capped at 20k rows: QR needs >= (2 * 8)^2 rows for 8x, so several tables qualify
CARDS = [min(v, 20_000) for v in CRITEO_KAGGLE_CARDINALITIES]


def test_demo_reports_every_scheme_and_the_baselines(tmp_path):
    out = tmp_path / "demo.json"
    summary = run_demo(steps=6, batch_size=256, eval_batches=2, cardinalities=CARDS, out=str(out), progress=False)
    assert not dist.is_initialized()  # its own process group is gone
    data = json.loads(out.read_text())
    assert data["results"] == json.loads(json.dumps(summary["results"]))
    res = {r["scheme"]: r for r in data["results"]}
    # every registered scheme (not those that assume ids numbered by frequency), md and mch
    assert list(res) == ["none", *(p for p in presets() if p not in ranked_presets()), "mch"] and "md" in res
    assert "Bayes-optimal AUC" in data["data"] and (tmp_path / "demo.png").stat().st_size > 10_000

    none = res["none"]
    assert none["compressed_tables"] == [] and none["ratio"] == 1.0
    assert none["embedding_bytes"] == sum(CARDS) * 32 * 4
    for name, r in res.items():
        if name == "none":
            continue
        assert r["compressed_tables"], name
        if not name.startswith("mpe"):  # 3 rows cannot be shared 8x; MPE's precision budget can (2 of 32 bits + its group map)
            assert "t_cat_8" not in r["compressed_tables"], name
        for t in r["compressed_tables"]:
            assert r["table_ratios"][t] >= 0.95 * 8 * (0.95 if name == "md" else 1), (name, t)  # md: up to 5% slack
        assert r["embedding_bytes"] < none["embedding_bytes"] / 4, name
    assert set(res["qr"]["compressed_tables"]) < set(res["hashing"]["compressed_tables"])  # QR needs bigger tables
    for r in res.values():
        assert 0.0 <= r["eval_auc"] <= 1.0 and r["eval_logloss"] > 0 and r["samples_per_s"] > 0
        assert len(r["losses"]) == 6


def test_cli_demo_subcommand(tmp_path, capsys):
    out = tmp_path / "cli.json"
    main(["demo", "--steps", "3", "--batch-size", "128", "--eval-batches", "1", "--max-rows", "5000",
          "--schemes", "none,hashing", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "eval AUC" in printed and "hashing" in printed
    data = json.loads(out.read_text())
    assert [r["scheme"] for r in data["results"]] == ["none", "hashing"]
    assert data["config"]["steps"] == 3 and max(data["config"]["cardinalities"]) == 5000
