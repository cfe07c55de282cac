"""Fault tests on 2 gloo ranks (torchrun): a rank SIGKILLed mid-training or mid-checkpoint,
then `--resume`: the run ends with the same losses, metrics, parameters and optimizer
state as an uninterrupted one. Faults are injected with TORCHREC_COMPRESS_FAULT."""
import os
import signal

import pytest

from torchrec_compress.testing.runs import assert_same_tensors, final_checkpoint_tensors, results, same_run, torchrun_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH = os.path.join(ROOT, "examples", "synthetic.yaml")
COMMON = ["data.train_batches=16", "data.eval_batches=2", "train.epochs=2", "train.checkpoint_every=3", "train.eval_every=4",
          "train.tensorboard=false", "train.plots=false"]


def _torchrun(out, *extra, fault=None):
    return torchrun_train(SYNTH, [*extra, f"out={out}", *COMMON], ROOT, fault=fault)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "clean"
    r = _torchrun(out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fault,latest", [
    ("step:1:5", "step_3"),  # rank 1 killed after step 5: the last checkpoint is step 3
    ("save:0:6", "step_3"),  # rank 0 killed while writing step 6: shards written, never renamed
])
def test_sigkill_then_resume_matches_uninterrupted_run(uninterrupted, tmp_path, fault, latest):
    out = tmp_path / "faulty"
    r = _torchrun(out, fault=fault)
    assert r.returncode != 0 and f"exitcode  : -{int(signal.SIGKILL)}" in r.stderr  # torchrun saw the SIGKILL
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == latest
    if fault.startswith("save"):
        assert (ckpts / ".step_6.tmp").is_dir() and not (ckpts / "step_6").exists()  # half-written, never visible
    r = _torchrun(out, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    ra, rb = results(str(uninterrupted)), results(str(out))
    assert ra["world_size"] == rb["world_size"] == 2 and ra["steps"] == 16
    same_run(ra, rb)
    assert_same_tensors(final_checkpoint_tensors(str(uninterrupted)), final_checkpoint_tensors(str(out)))


@pytest.mark.slow
def test_uneven_streams_over_ranks_do_not_hang(tmp_path):
    """5 TSV batches over 2 ranks: rank 0 has 3, rank 1 has 2; both stop after 2 steps
    instead of rank 0 waiting forever in its third step's collectives."""
    good = "1\t" + "\t".join(["5", "", "-1"] + ["2"] * 10) + "\t" + "\t".join(["68fd1e64", ""] + ["0000000a"] * 24)
    bad = "0" + good[1:]
    path = tmp_path / "train.tsv"
    path.write_text("\n".join([good, bad] * 20) + "\n")  # 40 rows: 5 batches of 8
    out = tmp_path / "run"
    cards = "[" + ", ".join(["100"] * 26) + "]"
    r = torchrun_train(SYNTH, [f"out={out}", "data.kind=criteo_tsv", f"data.train_paths=[{path}]", "data.batch_size=8",
                               f"data.cardinalities={cards}", "schemes={}", "train.tensorboard=false", "train.plots=false"], ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ep = results(str(out))["epochs"][0]
    assert ep["steps"] == 2 and ep["eval_samples"] == 32  # the odd fifth batch is left out, on both passes
