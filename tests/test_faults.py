"""Nothing lost: kills during saves, preemption, non-finite steps, and bad input with one-line errors."""

import os
import pickle
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from conftest import TINY, copy_run, popen, run
from lib import checkpoint
from lib.batches import Batches
from lib.runtime import autocast
from lib.step import train_step
from model import GPT, GPTConfig

SAVER = """
import sys, torch
from lib import checkpoint
out_dir = sys.argv[1]
for i in range(1, 10**6):  # ever-new states of ~16 MB, each one all i
    checkpoint.save({"model": {"w": torch.full((4_000_000,), float(i))}, "model_args": {}, "iter_num": i}, out_dir,
                    is_best=i % 3 == 1, keep_last_n=2)
    print(i, flush=True)
"""


def test_sigkill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    last = 0
    for attempt in range(8):
        proc = popen("-c", SAVER, str(tmp_path), stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # one save finished: from now on a good checkpoint exists
        time.sleep(rng.uniform(0, 0.3))  # then kill at a random moment, mostly mid-save
        proc.kill()
        proc.wait()
        for name in ("ckpt.pt", "best.pt"):
            state = checkpoint.load(str(tmp_path / name))
            w = state["model"]["w"]
            assert w.numel() == 4_000_000 and bool((w == state["iter_num"]).all()), f"{name} is torn"
        last = checkpoint.load(str(tmp_path / "ckpt.pt"))["iter_num"]
        assert last >= 1
    snapshots = sorted(p for p in os.listdir(tmp_path) if p.startswith("ckpt_"))
    assert 1 <= len(snapshots) <= 3  # keep_last_n=2, plus at most one the kill caught before pruning


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.slow
def test_signal_saves_and_resumes_exactly(char_data, tmp_path, sig):
    common = [*TINY, f"--dataset={char_data}", "--dropout=0.1", "--eval_interval=1000", "--lr_decay_iters=1000"]
    proc = popen("train.py", *common, f"--out_dir={tmp_path / 'run'}", "--max_iters=1000", stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter 5:"):
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=120)
    out = "".join(lines) + out
    assert proc.returncode == 0, err
    stop = int(re.search(r"stopped by SIG\w+ at iter (\d+); resume with: python train.py .*--init_from=resume", out)[1])
    assert checkpoint.load(str(tmp_path / "run" / "ckpt.pt"))["iter_num"] == stop >= 5

    resumed = run("train.py", *common, f"--out_dir={tmp_path / 'run'}", f"--max_iters={stop + 4}",
                  "--init_from=resume").stdout
    whole = run("train.py", *common, f"--out_dir={tmp_path / 'whole'}", f"--max_iters={stop + 4}").stdout
    pick = lambda s: re.findall(r"^iter (\d+): loss (\S+),", s, re.M)  # noqa: E731
    assert pick(resumed) == pick(whole)[stop:] and len(pick(resumed)) == 4


def tiny_setup(data_dir, dtype):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == "float16")
    return model, optimizer, scaler, Batches(data_dir, 32, 4, "cpu"), autocast("cpu", dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_non_finite_step_is_skipped_and_training_continues(char_data, dtype):
    model, optimizer, scaler, batches, ctx = tiny_setup(char_data, dtype)
    poison = {"on": False}
    model.transformer.ln_f.register_forward_hook(lambda m, i, out: out * float("nan") if poison["on"] else out)
    step = lambda it: train_step(model, optimizer, scaler, batches, it, 2, ctx, grad_clip=1.0)  # noqa: E731

    assert not step(0)[2].item()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
    steps = [s["step"].clone() for s in optimizer.state.values()]
    poison["on"] = True
    loss, grad_norm, skipped = step(1)
    assert skipped.item() and not torch.isfinite(loss) and not torch.isfinite(grad_norm)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "a bad step changed the weights"
    assert all(torch.equal(s["exp_avg"], m) for s, m in zip(optimizer.state.values(), moments))
    assert all(torch.equal(s["step"], t) for s, t in zip(optimizer.state.values(), steps))
    poison["on"] = False
    loss, _, skipped = step(2)
    assert not skipped.item() and torch.isfinite(loss)
    assert not torch.equal(model.state_dict()["lm_head.weight"], before["lm_head.weight"])


def test_runaway_non_finite_steps_stop_and_keep_the_checkpoint(char_data, char_run, tmp_path):
    out = copy_run(char_run, tmp_path / "run")  # trained 4 steps
    best = (out / "best.pt").read_bytes()
    state = checkpoint.load(str(out / "ckpt.pt"))
    state["model"]["transformer.h.0.attn.c_attn.weight"][0, 0] = float("nan")  # a poisoned model: every step fails
    torch.save(state, out / "ckpt.pt")
    poisoned = (out / "ckpt.pt").read_bytes()
    proc = run("train.py", *TINY, f"--dataset={char_data}", f"--out_dir={out}", "--init_from=resume", "--max_iters=100",
               "--eval_interval=3", "--max_bad_steps=5", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert re.search(r"error: 5 steps in a row had a non-finite loss or gradient \(iter 9\); .*ckpt.pt still holds",
                     proc.stderr)
    assert "5 skipped non-finite steps (5 in a row)" in proc.stdout
    assert (out / "ckpt.pt").read_bytes() == poisoned  # nothing was saved over it
    assert (out / "best.pt").read_bytes() == best


# ----------------------------------------------------------------------------- bad input: one line, exit 1

def fails(proc, *fragments):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def make_dataset(path, tokens, vocab_size=65, **meta):
    os.makedirs(path, exist_ok=True)
    for split in ("train", "val"):
        np.asarray(tokens, dtype=np.uint16).tofile(os.path.join(path, f"{split}.bin"))
    with open(os.path.join(path, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": vocab_size, **meta}, f)
    return str(path)


@pytest.mark.slow
def test_data_errors(tmp_path, char_run):
    train = lambda *a: run("train.py", *TINY, "--max_iters=2", f"--out_dir={tmp_path / 'o'}", *a, check=False)  # noqa
    fails(train("--dataset=no_such_dataset"), "no dataset at", "shakespeare_char")
    (tmp_path / "unprepared").mkdir()
    fails(train(f"--dataset={tmp_path / 'unprepared'}"), "train.bin not found: prepare it first")
    empty = make_dataset(tmp_path / "empty", [])
    fails(train(f"--dataset={empty}"), "is empty")
    truncated = make_dataset(tmp_path / "truncated", range(100))
    with open(os.path.join(truncated, "train.bin"), "ab") as f:
        f.write(b"\x01")
    fails(train(f"--dataset={truncated}"), "truncated")
    short = make_dataset(tmp_path / "short", range(20))
    fails(train(f"--dataset={short}"), "too few for block_size=32")
    wide = make_dataset(tmp_path / "wide", np.arange(1000) % 100, vocab_size=100)
    trained = copy_run(char_run, tmp_path / "trained")
    fails(run("train.py", *TINY, f"--dataset={wide}", f"--out_dir={trained}", "--init_from=resume", check=False),
          "vocabulary of 100 tokens but the model only 65")


@pytest.mark.slow
def test_checkpoint_errors(char_data, tmp_path, char_run):
    train = lambda out, *a: run("train.py", *TINY, f"--dataset={char_data}", f"--out_dir={out}", "--max_iters=8",  # noqa
                                *a, check=False)
    trained = copy_run(char_run, tmp_path / "trained")
    fails(train(trained, "--init_from=resume", "--n_layer=3"), "trained with n_layer=2 but the config asks for n_layer=3")
    fails(train(tmp_path / "none", "--init_from=resume"), "no checkpoint at")
    half = tmp_path / "half"
    half.mkdir()
    data = open(os.path.join(trained, "ckpt.pt"), "rb").read()
    (half / "ckpt.pt").write_bytes(data[: len(data) // 2])
    fails(train(half, "--init_from=resume"), "is corrupt or incomplete")
    fails(run("sample.py", f"--out_dir={half}", "--ckpt=latest", check=False), "is corrupt or incomplete")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    fails(train(blocker / "out"), "cannot write checkpoints to out_dir")


def test_device_and_sampling_errors(char_run):
    fails(run("train.py", "--device=gpu", check=False), "device='gpu' cannot work: device must be auto, cpu, cuda")
    if not torch.cuda.is_available():
        fails(run("train.py", "--device=cuda", check=False), "no CUDA GPU is visible")
    fails(run("train.py", "--dtype=fp8", check=False), "dtype='fp8' cannot work: dtype must be one of 'auto'")
    fails(run("sample.py", f"--out_dir={char_run}", "--start=日本", check=False), "characters the model never saw")


def test_out_of_memory_gets_advice():
    code = "from lib import runtime; import torch; runtime.install_error_hook(); raise torch.OutOfMemoryError('CUDA OOM')"
    fails(run("-c", code, check=False), "out of GPU memory", "--gradient_accumulation_steps")
