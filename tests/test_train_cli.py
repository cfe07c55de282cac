"""`torchrec-compress train`: config validation, one process, 2 ranks via torchrun and torchx."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from torchrec_compress.cli import main
from torchrec_compress.testing.runs import assert_same_tensors, final_checkpoint_tensors, same_run, torchrun_train
from torchrec_compress.train.config import load_config, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH = os.path.join(ROOT, "examples", "synthetic.yaml")


def test_every_example_config_loads():
    for name in sorted(os.listdir(os.path.join(ROOT, "examples"))):
        if name.endswith(".yaml"):
            cfg = load_config(os.path.join(ROOT, "examples", name))
            assert cfg.train.epochs >= 1


@pytest.mark.parametrize("raw,msg", [
    ({"bogus": 1}, r"unknown sections \['bogus'\]"),
    ({"data": {"kind": "parquet"}}, r"data.kind: 'parquet'; use one of"),
    ({"data": {"batchsize": 3}}, r"data: unknown keys \['batchsize'\]; allowed"),
    ({"train": {"epochs": 0}}, r"train.epochs: must be a positive int"),
    ({"schemes": {"t_cat_2": {"type": "Zip"}}}, r"schemes.t_cat_2.type: 'Zip' is not a scheme"),
    ({"schemes": {"t_cat_2": {"type": "QR", "rows": 3}}}, r"QR has no option\(s\) \['rows'\]"),
    ({"schemes": {"t_cat_2": {"type": "QR", "ratio": 0.5}}}, r"ratio=0.5 is not allowed"),
    ({"data": {"kind": "frappe"}}, r"data.root: the Frappe folder is required"),
])
def test_config_errors_say_what_is_allowed(raw, msg):
    with pytest.raises(ValueError, match=msg):
        parse_config(raw)


def test_train_one_process_writes_results(tmp_path):
    out = tmp_path / "run"
    main(["train", "--config", SYNTH, f"out={out}", "data.train_batches=10", "data.eval_batches=2"])
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 1 and res["epochs"][0]["steps"] == 10
    assert 0.5 < res["epochs"][0]["eval_auc"] <= 1.0 and res["ratio"] > 1
    with pytest.raises(SystemExit, match="unknown tables"):
        main(["train", "--config", SYNTH, f"out={out}", "schemes.t_nope={type: Hashing, ratio: 2}"])


@pytest.mark.slow
def test_train_two_ranks_torchrun(tmp_path):
    out = tmp_path / "run2"
    r = torchrun_train(SYNTH, [f"out={out}", "data.train_batches=10", "data.eval_batches=2"], ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and res["epochs"][0]["steps"] == 5  # 10 global batches, 5 per rank
    assert res["epochs"][0]["eval_samples"] == 2 * 512  # both ranks' eval batches were gathered


@pytest.mark.slow
def test_train_two_ranks_torchx_local_cwd(tmp_path):
    torchx = os.path.join(os.path.dirname(sys.executable), "torchx")
    out = tmp_path / "run3"
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}  # torchx runs `torchrun`
    subprocess.run([torchx, "run", "-s", "local_cwd", "launchers/components.py:train", "--nproc_per_node", "2", "--",
                    "--config", SYNTH, f"out={out}", "data.train_batches=4", "data.eval_batches=2"],
                   check=True, cwd=ROOT, capture_output=True, env=env)
    assert json.loads((out / "results.json").read_text())["world_size"] == 2


@pytest.mark.data
def test_frappe_example_trains(shared_data, tmp_path):
    cfg = yaml.safe_load(open(os.path.join(ROOT, "examples", "frappe.yaml")))
    assert cfg["data"]["root"] == "../shared/data/frappe"
    out = tmp_path / "frappe"
    main(["train", "--config", os.path.join(ROOT, "examples", "frappe.yaml"), f"data.root={os.path.join(shared_data, 'frappe')}",
          "train.epochs=1", f"out={out}"])
    res = json.loads((out / "results.json").read_text())
    assert res["epochs"][0]["eval_auc"] > 0.85


def _final(out):
    return json.loads((out / "results.json").read_text())["epochs"]


def test_resume_mid_epoch_continues_exactly(tmp_path):
    """2 epochs x 6 steps with an evaluation every 4 steps: uninterrupted == stopped after 5
    steps (max_steps, checkpoint) + resumed: same losses, evaluations, train/eval metrics,
    parameters and optimizer state."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["data.train_batches=6", "data.eval_batches=2", "train.epochs=2", "train.eval_every=4", "train.lr_decay_steps=12"]
    main(["train", "--config", SYNTH, f"out={a}", *common])
    main(["train", "--config", SYNTH, f"out={b}", "train.max_steps=5", *common])
    part = json.loads((b / "results.json").read_text())
    assert part["steps"] == 5 and part["stopped"] == "max_steps" and part["epochs"] == []
    main(["train", "--config", SYNTH, "--resume", f"out={b}", *common])
    ra, rb = (json.loads((x / "results.json").read_text()) for x in (a, b))
    assert ra["steps"] == 12 and [e["step"] for e in ra["evals"]] == [4, 8, 12]
    same_run(ra, rb)
    assert 0.5 < ra["epochs"][1]["train_auc"] < 1 and 0 < ra["epochs"][1]["train_ne"] < 1.5
    assert_same_tensors(final_checkpoint_tensors(a), final_checkpoint_tensors(b))
    assert sorted(os.listdir(b / "checkpoints")) == ["latest", "step_12", "step_6"]  # the newest two are kept
    assert (a / "curves.png").stat().st_size > 10_000 and any((a / "tensorboard").iterdir())


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    main(["train", "--config", SYNTH, f"out={out}", "data.train_batches=4", "data.eval_batches=1", "train.eval_every=2"])
    ev = EventAccumulator(str(out / "tensorboard"))
    ev.Reload()
    res = json.loads((out / "results.json").read_text())
    assert [s.value for s in ev.Scalars("train/loss")] == pytest.approx(res["losses"])
    assert [s.step for s in ev.Scalars("eval/auc")] == [2, 4]
    assert ev.Scalars("eval/auc")[-1].value == pytest.approx(res["epochs"][0]["eval_auc"])
    assert ev.Scalars("memory/embedding_bytes")[0].value == pytest.approx(res["embedding_bytes"])


def test_resume_errors_and_fallback_to_previous_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint under"):
        main(["train", "--config", SYNTH, "--resume", f"out={tmp_path / 'none'}", "data.train_batches=2", "data.eval_batches=1"])
    a, out = tmp_path / "a", tmp_path / "c"
    common = ["data.train_batches=4", "data.eval_batches=1", "train.epochs=1", "train.checkpoint_every=2"]
    main(["train", "--config", SYNTH, f"out={a}", *common])
    main(["train", "--config", SYNTH, f"out={out}", "train.max_steps=3", *common])  # checkpoints at steps 2 and 3
    for f in (out / "checkpoints" / "step_3").iterdir():
        if f.name.endswith(".distcp"):
            f.write_bytes(f.read_bytes()[:10])  # truncate the newest shard file
    main(["train", "--config", SYNTH, "--resume", f"out={out}", *common])  # warns, resumes from step_2
    same_run(json.loads((a / "results.json").read_text()), json.loads((out / "results.json").read_text()))
    for name in os.listdir(out / "checkpoints"):
        if name.startswith("step_"):
            for f in (out / "checkpoints" / name).iterdir():
                if f.name.endswith(".distcp"):
                    f.write_bytes(f.read_bytes()[:10])
    with pytest.raises(SystemExit, match="no readable checkpoint under .*step_4 is unreadable"):
        main(["train", "--config", SYNTH, "--resume", f"out={out}", *common])


@pytest.mark.slow
def test_checkpoint_from_2_ranks_resumes_on_1_and_back(tmp_path):
    from torchrec_compress.testing.checkpoint import eval_run_checkpoint_worker
    from torchrec_compress.testing.multiprocess import run_on_ranks
    from torchrec_compress.train.loop import local_process_group

    out = tmp_path / "w2"
    common = ["data.train_batches=4", "data.eval_batches=2"]
    r = torchrun_train(SYNTH, [f"out={out}", "train.epochs=1", *common], ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    two = _final(out)[0]
    # one rank, zero more epochs: the resharded model must evaluate exactly as the 2 ranks did
    with local_process_group():
        one = eval_run_checkpoint_worker(0, 1, SYNTH, str(out), common)
    assert one["samples"] == two["eval_samples"]
    assert abs(one["auc"] - two["eval_auc"]) < 1e-6 and abs(one["logloss"] - two["eval_logloss"]) < 1e-5
    # and back: a checkpoint written by 1 rank, loaded by 2
    back = tmp_path / "w1"
    main(["train", "--config", SYNTH, f"out={back}", "train.epochs=1", *common])
    single = _final(back)[0]
    res = run_on_ranks(eval_run_checkpoint_worker, SYNTH, str(back), common)
    for r in res:
        assert r["samples"] == single["eval_samples"]
        assert abs(r["auc"] - single["eval_auc"]) < 1e-6 and abs(r["logloss"] - single["eval_logloss"]) < 1e-5


@pytest.mark.data
def test_criteo_kaggle_example_trains_on_the_sample(shared_data, tmp_path):
    path = os.path.join(shared_data, "criteo_kaggle_sample", "criteo_train_10k.tsv.gz")
    out = tmp_path / "ck"
    main(["train", "--config", os.path.join(ROOT, "examples", "criteo_kaggle.yaml"), f"data.train_paths=[{path}]", f"out={out}"])
    ep = _final(out)[0]
    assert ep["steps"] == 20 and ep["eval_samples"] == 10_000  # no eval_paths: evaluated on the training file
    assert 0.5 < ep["eval_auc"] <= 1.0


def test_normalized_entropy_hand_case():
    import math

    import torch

    from torchrec_compress.train.metrics import normalized_entropy

    labels = torch.tensor([1.0, 0.0, 0.0, 0.0])
    p = torch.tensor([0.6, 0.2, 0.1, 0.3])
    ce = -sum(math.log(x) if y else math.log(1 - x) for x, y in zip(p.tolist(), labels.tolist())) / 4
    base = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert normalized_entropy(torch.logit(p), labels) == pytest.approx(ce / base, rel=1e-6)
    # predicting the base rate everywhere gives NE = 1
    assert normalized_entropy(torch.logit(torch.full((4,), 0.25)), labels) == pytest.approx(1.0, rel=1e-6)


def test_lr_schedule_shape_and_effect(tmp_path):
    from torchrec_compress.train.config import TrainConfig, lr_scale

    cfg = TrainConfig(lr_warmup_steps=4, lr_decay_start=10, lr_decay_steps=5)
    assert [lr_scale(s, cfg) for s in (0, 3, 4, 9)] == [0.25, 1.0, 1.0, 1.0]
    assert lr_scale(10, cfg) == 1.0 and lr_scale(12, cfg) == pytest.approx((3 / 5) ** 2) and lr_scale(15, cfg) == 0.0
    # decay to 0 after the first step: 3 steps with the schedule == 1 step without it (fused and dense rates)
    a, b = tmp_path / "a", tmp_path / "b"
    main(["train", "--config", SYNTH, f"out={a}", "data.train_batches=3", "data.eval_batches=2", "train.lr_decay_steps=1"])
    main(["train", "--config", SYNTH, f"out={b}", "data.train_batches=1", "data.eval_batches=2"])
    ea, eb = _final(a)[0], _final(b)[0]
    assert ea["steps"] == 3 and eb["steps"] == 1
    assert ea["eval_auc"] == eb["eval_auc"] and ea["eval_logloss"] == eb["eval_logloss"]


@pytest.mark.parametrize("raw,msg", [
    ({"schemes": "auto"}, r"schemes: auto needs plan.memory_per_rank"),
    ({"schemes": "auto", "plan": {"memory_per_rank": "lots"}}, r"cannot read a size from 'lots'"),
    ({"plan": {"memory_per_rank": "1GiB"}}, r"plan.memory_per_rank is only used with `schemes: auto`"),
    ({"train": {"eval_every": -1}}, r"train.eval_every: must be an int >= 0"),
    ({"train": {"lr_sparse": 0}}, r"train.lr_sparse: must be a number > 0"),
    ({"train": {"target_auc": 1.5}}, r"train.target_auc: must be in \[0, 1\)"),
    ({"train": {"sparse_optimizer": "adam"}}, r"train.sparse_optimizer: 'adam'; use one of"),
    ({"data": {"multi_hot": [1, 2]}}, r"data.multi_hot: one int >= 1 per table \(26\)"),
    ({"data": {"kind": "frappe", "root": "x", "multi_hot": [1] * 26}}, r"data.multi_hot: only for data.kind synthetic, synthetic_first_order or criteo_multihot"),
    ({"data": {"kind": "criteo_multihot", "root": "x", "cardinalities": [5] * 26}}, r"criteo_multihot needs the 26 multi-hot sizes"),
    ({"data": {"kind": "criteo_npy", "root": "x"}}, r"criteo_npy needs root \(the day files\), 26 cardinalities"),
    ({"data": {"cardinalities": [10, 0]}}, r"data.cardinalities: every table size must be an int >= 1"),
])
def test_more_config_errors(raw, msg):
    with pytest.raises(ValueError, match=msg):
        parse_config(raw)


def test_schemes_auto_and_compare(tmp_path, capsys):
    auto, plain = tmp_path / "auto", tmp_path / "plain"
    common = ["data.train_batches=4", "data.eval_batches=1", "train.tensorboard=false"]
    main(["train", "--config", SYNTH, f"out={auto}", "schemes=auto", "plan.memory_per_rank=1MiB", *common])
    main(["train", "--config", SYNTH, f"out={plain}", "schemes={}", *common])
    ra, rp = (json.loads((d / "results.json").read_text()) for d in (auto, plain))
    # the planner compressed the large tables into the budget (tables + row-wise state)
    assert ra["schemes"] and ra["ratio"] > 4 and ra["embedding_bytes"] < 2**20 < rp["embedding_bytes"] == rp["uncompressed_bytes"]
    assert not (auto / "tensorboard").exists()
    capsys.readouterr()
    png = tmp_path / "frontier.png"
    main(["compare", str(auto), str(plain), "--plot", str(png)])
    table = capsys.readouterr().out
    assert "auto" in table and "plain" in table and f"{ra['epochs'][0]['eval_auc']:.4f}" in table
    assert png.stat().st_size > 10_000
    with pytest.raises(SystemExit, match="nope not found"):
        main(["compare", str(tmp_path / "nope")])


def test_target_auc_stops_and_mlperf_log(tmp_path):
    pytest.importorskip("mlperf_logging")
    out = tmp_path / "t"
    main(["train", "--config", SYNTH, f"out={out}", "data.train_batches=20", "data.eval_batches=2", "train.eval_every=2",
          "train.target_auc=0.55", "train.mlperf_log=true"])
    res = json.loads((out / "results.json").read_text())
    aucs = [e["auc"] for e in res["evals"]]
    assert res["stopped"] == "target_auc" and res["steps"] < 20 and res["steps"] == res["evals"][-1]["step"]
    assert aucs[-1] >= 0.55 and all(a < 0.55 for a in aucs[:-1])  # stopped at the first evaluation reaching it
    events = [json.loads(line.split(":::MLLOG ", 1)[1]) for line in (out / "mlperf.log").read_text().splitlines() if ":::MLLOG" in line]
    keys = [e["key"] for e in events]
    assert keys[0] == "submission_benchmark" and "run_start" in keys and keys.count("eval_accuracy") == len(aucs)
    assert [e["value"] for e in events if e["key"] == "eval_accuracy"] == pytest.approx(aucs)
    assert events[-1]["key"] == "run_stop" and events[-1]["metadata"]["status"] == "success"


@pytest.mark.parametrize("argv,msg", [
    (["demo", "--steps", "0"], "--steps: expected a positive integer, got 0"),
    (["demo", "--batch-size", "x"], "--batch-size: expected a positive integer, got 'x'"),
    (["demo", "--ratio", "0.5"], "--ratio: expected a compression ratio >= 1, got 0.5"),
    (["demo", "--dim", "30"], "--dim 30: FBGEMM needs a multiple of 4"),
    (["plan", "--preset", "dlrmv2", "--world-size", "0", "--memory-per-rank", "1GiB"], "--world-size: expected a positive integer"),
    (["plan", "--preset", "dlrmv2", "--world-size", "1", "--memory-per-rank", "lots"], "cannot read a size from 'lots'"),
    (["bench", "inference", "--reps", "-1"], "--reps: expected a positive integer"),
    (["train", "--config", "nope.yaml"], "nope.yaml"),
])
def test_cli_options_are_validated(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert msg in f"{e.value}{capsys.readouterr().err}"


@pytest.mark.data
@pytest.mark.slow
def test_frappe_example_two_ranks_torchx(shared_data, tmp_path):
    torchx = os.path.join(os.path.dirname(sys.executable), "torchx")
    out = tmp_path / "frappe2"
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], "OMP_NUM_THREADS": "1"}
    subprocess.run([torchx, "run", "-s", "local_cwd", "launchers/components.py:train", "--nproc_per_node", "2", "--",
                    "--config", os.path.join(ROOT, "examples", "frappe.yaml"), f"data.root={os.path.join(shared_data, 'frappe')}",
                    "train.epochs=1", f"out={out}"], check=True, cwd=ROOT, capture_output=True, env=env)
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and res["epochs"][0]["eval_auc"] > 0.85
    assert res["epochs"][0]["eval_samples"] == 5_772  # the whole validation split, gathered from both ranks
    assert res["test"]["samples"] == 28_860 and res["test"]["auc"] > 0.85  # the held-out test file, once


@pytest.mark.data
@pytest.mark.parametrize("example, rows", [("avazu", (999, 1001)), ("movielens", (20_068, 20_070))])
def test_csv_examples_train_evaluate_and_test(shared_data, tmp_path, example, rows):
    """avazu_csv / movielens_csv: one file, split 80/10/10; eval = validation, test held out."""
    cfg = yaml.safe_load(open(os.path.join(ROOT, "examples", f"{example}.yaml")))
    path = cfg["data"]["train_paths"][0].replace("../shared/data", shared_data)
    out = tmp_path / example
    main(["train", "--config", os.path.join(ROOT, "examples", f"{example}.yaml"), f"data.train_paths=[{path}]",
          "train.epochs=1", "train.checkpoint=false", f"out={out}"])
    res = json.loads((out / "results.json").read_text())
    assert (res["epochs"][0]["eval_samples"], res["test"]["samples"]) == rows
    assert res["test"]["auc"] > (0.62 if example == "avazu" else 0.85) and res["ratio"] > 1.5


@pytest.mark.data
def test_csv_example_two_ranks(shared_data, tmp_path):
    from torchrec_compress.testing.runs import torchrun_train

    path = os.path.join(shared_data, "avazu_sample", "avazu_train_10k.csv.gz")
    out = tmp_path / "avazu2"
    r = torchrun_train(os.path.join(ROOT, "examples", "avazu.yaml"), [f"data.train_paths=[{path}]", "train.epochs=1",
                                                                       "train.checkpoint=false", f"out={out}"], ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and res["epochs"][0]["eval_samples"] == 999 and res["test"]["samples"] == 1001
    assert res["test"]["auc"] > 0.6
