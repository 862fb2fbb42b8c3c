"""train.py end to end on tiny Shakespeare: checkpoints, sampling, exact resume, eval_only, snapshots. (wandb: in
test_metrics.py.)"""

import os
import re

import pytest
import torch

from conftest import TINY, run
from lib import checkpoint


def train(char_data, out_dir, *args, env=None):
    return run("train.py", *TINY, f"--dataset={char_data}", f"--out_dir={out_dir}", *args, env=env)


def losses(stdout):
    return {int(i): v for i, v in re.findall(r"^iter (\d+): loss (\S+),", stdout, re.M)}


def val_losses(stdout):
    return {int(k): float(v) for k, v in re.findall(r"^step (\d+): train loss \S+, val loss (\S+)", stdout, re.M)}


@pytest.fixture(scope="module")
def run40(char_data, tmp_path_factory):
    """40 steps, evaluated every 10, checkpoints saved only when the val loss improves: (out_dir, stdout)."""
    out = tmp_path_factory.mktemp("run40")
    return out, train(char_data, out, "--max_iters=40", "--eval_interval=10", "--always_save_checkpoint=False").stdout


@pytest.mark.slow
def test_train_then_sample(run40):
    out, stdout = run40
    vals = val_losses(stdout)
    assert vals[40] < vals[0] - 0.3  # it learns
    assert "saved best and latest checkpoint" in stdout
    state = checkpoint.load(str(out / "ckpt.pt"))
    assert state["iter_num"] == 40 and state["model_args"]["vocab_size"] == 65
    assert not any(k.startswith("_orig_mod") for k in state["model"])
    best = checkpoint.load(str(out / "best.pt"))  # weights only, from the eval with the lowest val loss
    assert best["iter_num"] == min(vals, key=vals.get) and "optimizer" not in best

    args = ["--device=cpu", f"--out_dir={out}", "--num_samples=2", "--max_new_tokens=50", "--start=ROMEO:"]
    a = run("sample.py", *args, "--seed=1").stdout
    assert a.count("---------------") == 2 and a.startswith("ROMEO:")
    assert len(a.split("---------------")[0]) >= len("ROMEO:") + 50
    assert run("sample.py", *args, "--seed=1").stdout == a  # same seed, same text
    assert run("sample.py", *args, "--seed=2").stdout != a
    greedy = run("sample.py", *args, "--temperature=0").stdout.split("---------------\n")
    assert greedy[0] == greedy[1]  # temperature 0 is greedy: every sample is the same


@pytest.mark.slow
def test_resume_is_bit_exact_even_when_interrupted_twice(char_data, tmp_path):
    """0 -> 12 in one go equals 0 -> 4 -> 8 -> 12 with resumes, with dropout on (so RNG matters)."""
    common = ["--dropout=0.2", "--gradient_accumulation_steps=2", "--eval_interval=4", "--lr_decay_iters=12"]
    whole = train(char_data, tmp_path / "whole", *common, "--max_iters=12").stdout
    pieces = ""
    for i, stop in enumerate((4, 8, 12)):
        resume = ["--init_from=resume"] if i else []
        pieces += train(char_data, tmp_path / "pieces", *common, f"--max_iters={stop}", *resume).stdout
    assert len(losses(whole)) == 12 and losses(pieces) == losses(whole)
    a = checkpoint.load(str(tmp_path / "whole" / "ckpt.pt"))
    b = checkpoint.load(str(tmp_path / "pieces" / "ckpt.pt"))
    assert a["iter_num"] == b["iter_num"] == 12 and a["best_val_loss"] == b["best_val_loss"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_target_val_loss_stops_and_saves_at_the_first_eval_that_reaches_it(char_data, run40, tmp_path):
    full = run40[1]  # the same run without a target
    vals = val_losses(full)
    assert vals[20] < min(vals[0], vals[10]) - 0.01, vals  # it learns, so step 20 is the first below this:
    target = vals[20] + (min(vals[0], vals[10]) - vals[20]) / 2
    proc = train(char_data, tmp_path / "target", "--max_iters=40", "--eval_interval=10", "--always_save_checkpoint=False",
                 f"--target_val_loss={target}")
    assert re.search(rf"^reached target_val_loss={target:g} at iter 20: val loss {vals[20]:.4f}, [\d.]+s after",
                     proc.stdout, re.M), proc.stdout
    assert max(losses(proc.stdout)) == 20 and all(losses(proc.stdout)[i] == losses(full)[i] for i in range(1, 21))
    assert checkpoint.load(str(tmp_path / "target" / "ckpt.pt"))["iter_num"] == 20  # saved there: resumable


def test_eval_only_and_snapshots(char_data, tmp_path):
    proc = train(char_data, tmp_path, "--max_iters=8", "--eval_interval=2", "--keep_last_n=2")
    snapshots = sorted(p for p in os.listdir(tmp_path) if p.startswith("ckpt_"))
    assert snapshots == ["ckpt_0000006.pt", "ckpt_0000008.pt"]
    assert checkpoint.load(str(tmp_path / "ckpt_0000006.pt"))["iter_num"] == 6
    before = os.stat(tmp_path / "ckpt.pt").st_mtime_ns
    proc = train(char_data, tmp_path, "--init_from=resume", "--eval_only=True")
    assert re.search(r"^step 8: train loss \S+, val loss \S+ \| val bpb \S+$", proc.stdout, re.M)
    assert "iter " not in proc.stdout and os.stat(tmp_path / "ckpt.pt").st_mtime_ns == before
