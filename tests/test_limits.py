"""
Limits said before they bite: a model or batch that cannot fit is refused before anything is allocated, a step of
minutes is announced, a signal does not wait for a long step, a second Ctrl-C always ends the run, wandb without
network or key never stalls, and a torchrun rank that dies is named by the others.
"""

import itertools
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TINY, run
from lib import checkpoint
from lib.runtime import UserError, autocast, setup, training_memory
from lib.step import check_size, model_size
from model import GPT, GPTConfig
from test_distributed import rank_pid
from test_faults import fails


def train(data, out_dir, *args, check=True, **kwargs):
    return run("train.py", *TINY, f"--dataset={data}", f"--out_dir={out_dir}", "--sample_interval=0", *args,
               check=check, **kwargs)


# ----------------------------------------------------------------------------- sizes, before allocating

def test_model_size_is_the_models_own_count():
    for bias, rotary, rmsnorm, tie_head, x0_mix in itertools.product([True, False], repeat=5):
        cfg = GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=8, vocab_size=40, bias=bias, rotary=rotary,
                        rmsnorm=rmsnorm, tie_head=tie_head, x0_mix=x0_mix)
        gpt = GPT(cfg)
        assert model_size(cfg) == (gpt.get_num_params(non_embedding=False), gpt.flops_per_token())


@pytest.mark.parametrize("dtype, recipe", [("float32", {}), ("bfloat16", {}), ("float32", {"rotary": True,
                         "rmsnorm": True, "qk_norm": True, "relu2": True, "tie_head": False, "x0_mix": True})])
def test_the_activation_estimate_is_at_most_what_backward_keeps(dtype, recipe):
    """training_memory's activations against the bytes of every tensor autograd saves for backward."""
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=96, bias=False, **recipe)
    gpt, B = GPT(cfg), 4
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(96, (B, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast("cpu", dtype):
        gpt(x, x)
    weights = {p.untyped_storage().data_ptr() for p in gpt.parameters()}
    kept = sum(n for ptr, n in saved.items() if ptr not in weights)
    estimate = training_memory(model_size(cfg)[0], cfg, B, dtype, "cpu")["activations"]
    assert 0.7 * kept < estimate <= kept  # a lower bound, and not a loose one


def test_a_model_that_cannot_fit_is_refused_before_allocating(char_data, tmp_path):
    """--depth=1000 (49 trillion parameters) used to die in the allocator with a traceback."""
    args = [a for a in TINY if not a.startswith(("--n_layer", "--n_head", "--n_embd"))]
    proc = run("train.py", *args, f"--dataset={char_data}", f"--out_dir={tmp_path}", "--depth=1000", check=False,
               timeout=120)
    fails(proc, "training this model (49,152,134,272,000 parameters) with batch_size=4 and block_size=32 needs at "
                "least 716 TiB of memory (weights 179 TiB,", "use a smaller model (--n_layer, --n_embd or --depth)")


def test_a_batch_that_cannot_fit_is_refused_with_what_to_change():
    rt = setup("cpu", "float32")
    config = {"batch_size": 64, "parallelism": "ddp", "optimizer": "adamw", "activation_checkpointing": False}
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=100_000, vocab_size=65, rotary=True)
    with pytest.raises(UserError, match=r"needs at least .* activations .*: use a smaller --batch_size \(a larger "
                                        r"--gradient_accumulation_steps keeps the tokens per step\), a smaller "
                                        r"--block_size, or --activation_checkpointing=True$"):
        check_size(cfg, rt, config, 1)


def test_a_step_of_minutes_is_announced(capsys):
    rt = setup("cpu", "float32")
    config = {"batch_size": 1, "parallelism": "ddp", "optimizer": "adamw", "activation_checkpointing": False}
    check_size(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=20_000, vocab_size=65), rt, config, 1000)
    note = capsys.readouterr().out
    assert re.fullmatch(r"note: one step is \S+ FLOPs per process: at least [\d,]+ minutes at the device's peak of "
                        r"\S+ TFLOP/s \(measured cpu float32 matmul\), more in practice, before the first step line "
                        r"\(Ctrl-C or SIGTERM stops it within seconds\)\n", note), note
    check_size(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65), rt, config, 1)
    assert capsys.readouterr().out == ""  # a quick step says nothing


# ----------------------------------------------------------------------------- signals

@pytest.mark.slow
def test_sigterm_during_a_long_step_saves_the_state_before_it_within_seconds(char_data, tmp_path):
    train(char_data, tmp_path, "--max_iters=2", "--eval_interval=2")
    before = (tmp_path / "ckpt.pt").read_bytes()
    # the resumed run's steps take ~20 s each (3,000 micro-steps): SIGTERM right after its first evaluation
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, f"--dataset={char_data}", f"--out_dir={tmp_path}",
                             "--sample_interval=0", "--max_iters=4", "--eval_interval=2", "--init_from=resume",
                             "--gradient_accumulation_steps=3000"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("step 2:"):
            break
    time.sleep(0.5)  # into the step
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and time.time() - t0 < 10, err
    assert "stopped by SIGTERM at iter 2; resume with: python train.py" in out and "iter 3:" not in out
    assert (tmp_path / "ckpt.pt").read_bytes() == before  # the state before the step, already saved


GC_CALLBACK = """
import gc, signal, sys, time
from lib.runtime import install_error_hook
from lib.step import StopSignal
install_error_hook()
stop = StopSignal(interrupted=lambda: "interrupted by a second Ctrl-C at iter 7; ckpt.pt holds iter 6")
signal.raise_signal(signal.SIGINT)  # the first Ctrl-C: stop at the next step

def callback(phase, info):  # Python only prints what a gc callback raises, and goes on
    if phase == "start":
        signal.raise_signal(signal.SIGINT)  # the second, handled inside the callback
        time.sleep(0.01)
gc.callbacks.append(callback)
gc.collect()
print("still running")
"""


def test_a_second_ctrl_c_in_a_garbage_collection_callback_ends_the_run():
    proc = subprocess.run([sys.executable, "-c", GC_CALLBACK], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        1, "", "error: interrupted by a second Ctrl-C at iter 7; ckpt.pt holds iter 6\n")


# ----------------------------------------------------------------------------- wandb without network or key

@pytest.mark.slow
def test_wandb_without_network_or_key_logs_offline_in_seconds(char_data, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_DIR=str(tmp_path), WANDB_BASE_URL="http://127.0.0.1:9",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")  # (no ~/.netrc key; nothing listens on port 9)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "train.py", *TINY, f"--dataset={char_data}", f"--out_dir={tmp_path / 'o'}",
                           "--max_iters=2", "--eval_interval=2", "--sample_interval=0", "--wandb_log=True"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    note = re.search(r"^note: wandb logs offline \(127\.0\.0\.1:9 cannot be reached \(Connection refused\)\); "
                     r"upload later with: wandb sync (\S+)$", proc.stdout, re.M)
    assert note and os.path.isdir(note[1]) and note[1].startswith(str(tmp_path))
    assert time.time() - t0 < 60  # (wandb.init alone used to retry for ~100 s, then raise)
    assert checkpoint.load(str(tmp_path / "o" / "ckpt.pt"))["wandb_run_id"]  # resumes continue this run


# ----------------------------------------------------------------------------- a torchrun rank dies

def test_when_a_rank_dies_the_others_name_it_in_one_line(char_data, tmp_path):
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", f"--log-dir={logs}",
           "--redirects=3", "train.py", *TINY, f"--dataset={char_data}", f"--out_dir={tmp_path / 'out'}",
           "--gradient_accumulation_steps=2", "--max_iters=100000", "--eval_interval=1000", "--lr_decay_iters=1000",
           "--sample_interval=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    rank0_out = lambda: next(logs.rglob("0/stdout.log"), None)  # noqa: E731
    deadline = time.time() + 120
    while time.time() < deadline and not (rank0_out() and "iter 3:" in rank0_out().read_text()):
        time.sleep(0.2)
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)  # rank 1 is gone (the kernel's OOM killer, a node failing)
    killed = time.time()
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, out
    err = next(logs.rglob("0/stderr.log")).read_text()
    lines = [line for line in err.splitlines() if "Warning" not in line and "model = DDP(" not in line]
    seen = f"{err}\nrank 0's stdout:\n{rank0_out().read_text()[-2000:]}\ntorchrun:\n{out[-3000:]}\n" \
           f"{time.time() - killed:.1f} s after the kill"
    assert "Traceback" not in err and len(lines) == 1, seen
    assert re.fullmatch(r"\[rank0\]: error: rank 1 of this torchrun run stopped \(.*Connection (reset|closed) by "
                        r"peer.*\), so rank 0 stops too; rank 1's own output says why \(nothing if it was killed, e.g. "
                        r"for lack of memory\)", lines[0]), lines[0]
