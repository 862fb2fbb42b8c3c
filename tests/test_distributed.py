"""train.py under torchrun (DDP over gloo on CPU): ranks train together and stop together."""

import os
import re
import signal
import subprocess
import sys
import time

import checkpoint
from conftest import REPO, TINY


def torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})


def rank_pid(parent, rank, timeout=60):
    """The pid of the torchrun worker with RANK=rank (read from /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split():
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if f"RANK={rank}".encode() in f.read().split(b"\0"):
                        return int(pid)
            except OSError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank}")


def test_a_signal_to_one_rank_stops_all_ranks_at_the_same_step(char_data, tmp_path):
    proc = torchrun(*TINY, f"--dataset={char_data}", f"--out_dir={tmp_path}", "--max_iters=100000",
                    "--eval_interval=1000", "--gradient_accumulation_steps=2", "--lr_decay_iters=1000")
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter 5:"):
            os.kill(rank_pid(proc.pid, 1), signal.SIGTERM)  # rank 1 alone is preempted
            break
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "2 process(es)" in out
    stops = re.findall(r"stopped by a signal to another rank at iter (\d+); resume with: torchrun --nproc_per_node=2 "
                       r"train.py .*--init_from=resume", out)
    assert len(stops) == 1, out  # printed once, by rank 0, which itself got no signal
    assert checkpoint.load(str(tmp_path / "ckpt.pt"))["iter_num"] == int(stops[0]) >= 5


def test_resume_under_torchrun_is_exact(char_data, tmp_path):
    """Two ranks, 0 -> 8 in one go equals 0 -> 4 -> 8: every rank's batches and dropout come back."""
    common = [*TINY, f"--dataset={char_data}", "--dropout=0.2", "--gradient_accumulation_steps=2",
              "--eval_interval=4", "--lr_decay_iters=8"]
    outputs = {}
    for name, stops in (("whole", (8,)), ("pieces", (4, 8))):
        outputs[name] = ""
        for i, stop in enumerate(stops):
            proc = torchrun(*common, f"--out_dir={tmp_path / name}", f"--max_iters={stop}",
                            *(["--init_from=resume"] if i else []))
            out = proc.communicate(timeout=120)[0]
            assert proc.returncode == 0, out
            outputs[name] += out
    pick = lambda s: re.findall(r"^iter (\d+): loss (\S+),", s, re.M)  # noqa: E731
    assert len(pick(outputs["whole"])) == 8 and pick(outputs["pieces"]) == pick(outputs["whole"])
    a = checkpoint.load(str(tmp_path / "whole" / "ckpt.pt"))["model"]
    b = checkpoint.load(str(tmp_path / "pieces" / "ckpt.pt"))["model"]
    assert all(bool((a[k] == b[k]).all()) for k in a)
