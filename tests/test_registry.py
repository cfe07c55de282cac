"""The registry is the only list of schemes: YAML types, bench presets, the demo, the CLI help
and the contract tests come from it. A toy scheme defined and registered in this file runs
through YAML parsing, `train`, `bench quality` and the contract (reference) tests."""
import dataclasses
import json
import os

import pytest

from torchrec_compress.cli import main
from torchrec_compress.config import SchemeConfig, presets, register_scheme, scheme_types, unregister_scheme
from torchrec_compress.schemes.base import PhysicalTable, TableScheme, ceil_div, uniform_init
from torchrec_compress.testing.contract import check_against_reference
from torchrec_compress.train.config import parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH = os.path.join(ROOT, "examples", "synthetic.yaml")


# ------------------------------------------------------------------ the toy scheme: this file only
@dataclasses.dataclass(frozen=True)
class Halving(SchemeConfig):
    """e(x) = E[x // 2]: every pair of ids shares one row (2x)."""


class HalvingScheme(TableScheme):
    presets = {"toy_halving": lambda r, d: Halving()}

    def physical_tables(self):
        return [PhysicalTable("__half", ceil_div(self.table.num_embeddings, 2), self.table.embedding_dim, uniform_init(self.table))]

    def transform(self, values):
        return [values // 2]

    def combine(self, parts, values):
        return parts[0]

    @staticmethod
    def reference(table, config, w, x, state):
        return w[f"{table.name}__half"][x // 2]


@pytest.fixture
def toy():
    register_scheme(Halving)(HalvingScheme)
    yield Halving
    unregister_scheme(Halving)


def test_toy_scheme_runs_through_yaml_train_bench_and_contract(toy, tmp_path):
    assert "Halving" in scheme_types() and "toy_halving" in presets()
    cfg = parse_config({"schemes": {"t_cat_2": {"type": "Halving"}}})
    assert cfg.schemes == {"t_cat_2": Halving()}
    out = tmp_path / "run"
    main(["train", "--config", SYNTH, f"out={out}", "data.train_batches=4", "data.eval_batches=1",
          "schemes={t_cat_2: {type: Halving}}"])
    res = json.loads((out / "results.json").read_text())
    assert res["schemes"] == {"t_cat_2": "Halving(ratio=None)"} and res["epochs"][0]["steps"] == 4

    from torchrec_compress.benchmarks.quality import bench_quality, synthetic_data

    bq = bench_quality(synthetic_data([3000, 200], batches=4, test_batches=2), ["toy_halving"], [2.0], [0], epochs=1,
                       progress=False)
    row = next(r for r in bq["rows"] if r["scheme"] == "toy_halving")
    assert 0.4 < row["auc"] < 1 and row["achieved_ratio"] == pytest.approx(2.0, rel=1e-3)
    check_against_reference(Halving())
    check_against_reference(Halving(), fit=False)


def test_toy_is_gone_after_the_test():
    assert "Halving" not in scheme_types()


@pytest.mark.parametrize("name", sorted(presets()))
@pytest.mark.parametrize("fit", [True, False])
def test_every_preset_meets_the_contract(name, fit):
    check_against_reference(presets()[name](2.0, 16), fit=fit)  # 2x: reachable by every preset on a 301-row table


def test_yaml_types_and_cli_help_come_from_the_registry(capsys):
    assert set(scheme_types()) == {"FIITED", "FreqThreshold", "Hashing", "MEmCom", "MemRec", "MixedDim", "MPE", "QR", "Saec"}
    with pytest.raises(ValueError, match=r"'Zip' is not a scheme; use one of \['FIITED', 'FreqThreshold'"):
        parse_config({"schemes": {"t_cat_2": {"type": "Zip"}}})
    with pytest.raises(SystemExit):
        main(["bench", "quality", "--help"])
    assert ", ".join(presets()) in " ".join(capsys.readouterr().out.split())


def test_cli_help_imports_neither_torchrec_nor_torch():
    """What makes `--help` answer at once (0.06 s here, against ~4 s for torchrec's import)."""
    import re
    import subprocess
    import sys

    for args in (["--help"], ["train", "--help"]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "torchrec_compress.cli", *args], capture_output=True, text=True)
        assert r.returncode == 0 and "usage" in r.stdout
        assert not re.search(r"\|\s+(torchrec|torch)(\.|$)", r.stderr, re.M), "the CLI help imported torch/torchrec"
