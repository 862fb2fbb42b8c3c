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
