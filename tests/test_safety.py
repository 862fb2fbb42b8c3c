"""Never lose a trained model: the out_dir guard and lock, failed saves, best.pt across a kill, values that cannot
work, nanoGPT checkpoints, and exports that leave no stale files."""

import errno
import os
import re
import shutil
import signal
import subprocess

import pytest
import torch

from configurator import ConfigError, configure
from conftest import REPO, TINY, copy_run, popen, run
from lib import checkpoint, files
from lib.runtime import UserError
from test_faults import fails
from test_gpt2 import GPT2_META, export, padded_bpe_checkpoint


def train(char_data, out_dir, *args, check=True):
    return run("train.py", *TINY, f"--dataset={char_data}", f"--out_dir={out_dir}", *args, check=check)


def pt_bytes(out_dir):
    return {name: (out_dir / name).read_bytes() for name in ("ckpt.pt", "best.pt")}


def no_temp_files(folder):
    return not [p for p in os.listdir(folder) if p.endswith(".tmp")]


# ----------------------------------------------------------------------------- 1. a new run never replaces a trained one

@pytest.mark.slow
def test_a_scratch_run_does_not_replace_a_trained_model(char_data, char_run, tmp_path):
    copy_run(char_run, tmp_path)  # trained 4 steps, saved every 2
    before = pt_bytes(tmp_path)
    for slip in ([], ["--init_from=gpt2"]):  # the same command again; or GPT-2 weights, refused before any download
        proc = train(char_data, tmp_path, "--max_iters=2", *slip, check=False)
        fails(proc, "already holds a model trained for 4 iterations (best val loss", "--init_from=resume",
              "--overwrite=True")
        assert pt_bytes(tmp_path) == before
    train(char_data, tmp_path, "--max_iters=6", "--eval_interval=2", "--keep_last_n=1", "--init_from=resume")
    assert os.path.exists(tmp_path / "ckpt_0000006.pt")
    proc = train(char_data, tmp_path, "--max_iters=1", "--eval_interval=1", "--overwrite=True",
                 "--always_save_checkpoint=False")
    assert "saved best and latest checkpoint" in proc.stdout
    assert checkpoint.load(str(tmp_path / "ckpt.pt"))["iter_num"] == 1
    assert checkpoint.load(str(tmp_path / "best.pt"))["iter_num"] == 1
    assert not [p for p in os.listdir(tmp_path) if p.startswith("ckpt_")]  # the replaced run's snapshots are gone


def test_eval_only_needs_no_overwrite(char_data, char_run, tmp_path):
    copy_run(char_run, tmp_path)
    before = pt_bytes(tmp_path)
    assert "val loss" in train(char_data, tmp_path, "--eval_only=True").stdout
    assert pt_bytes(tmp_path) == before


def start_training(char_data, out_dir, *args):
    """A long run in the background, returned once it has taken its first step."""
    proc = popen("train.py", *TINY, f"--dataset={char_data}", f"--out_dir={out_dir}", "--max_iters=100000",
                 "--eval_interval=100000", "--lr_decay_iters=100000", *args, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("iter 1:"):
            return proc
    raise AssertionError(proc.stderr.read())


@pytest.mark.slow
def test_a_second_run_on_the_same_out_dir_is_refused_and_a_killed_one_leaves_no_lock(char_data, tmp_path):
    first = start_training(char_data, tmp_path)
    try:
        proc = train(char_data, tmp_path, "--max_iters=2", "--init_from=resume", check=False)
        fails(proc, f"out_dir '{tmp_path}' is in use by another training run (pid {first.pid}")
        proc = train(char_data, tmp_path, "--max_iters=2", "--overwrite=True", check=False)
        fails(proc, "is in use by another training run")
    finally:
        first.kill()  # SIGKILL: no handler runs, the lock file stays behind
        first.wait()
    assert os.path.exists(tmp_path / ".lock")
    proc = train(char_data, tmp_path, "--max_iters=2", "--eval_interval=2", "--overwrite=True")
    assert "saved best and latest checkpoint" in proc.stdout


# ----------------------------------------------------------------------------- 2. saves that fail, fail cleanly

@pytest.fixture
def small_filesystem(tmp_path):
    """A folder on a tmpfs of a given size (needs root), unmounted afterwards."""
    mounted = []

    def make(size_bytes):
        path = tmp_path / "tmpfs"
        path.mkdir()
        size_kib = (size_bytes + 1023) // 1024
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                              capture_output=True)
        if proc.returncode != 0:
            return None
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", str(path)])


def test_a_full_disk_keeps_the_old_checkpoint_and_says_so(char_data, char_run, tmp_path, small_filesystem):
    latest, best = os.path.getsize(char_run / "ckpt.pt"), os.path.getsize(char_run / "best.pt")
    # room for one checkpoint pair and half a file more: the first save fits, a second cannot
    out = small_filesystem(latest + best + latest // 2) if os.geteuid() == 0 else None
    if out is None:
        pytest.skip("mounting a tmpfs needs root (test_a_failing_write_* simulates ENOSPC instead)")
    copy_run(char_run, out)  # trained 4 steps (and its metrics.jsonl and loss.png)
    before = pt_bytes(out)
    proc = train(char_data, out, "--init_from=resume", "--max_iters=8", "--eval_interval=2", check=False)
    fails(proc, "disk full while saving", "MiB are free in", "the previous checkpoint there is intact")
    needed = float(re.search(r"needs about ([\d.,]+) MiB", proc.stderr)[1].replace(",", ""))
    assert 0.8 * min(latest, best) / 2**20 < needed < 1.5 * latest / 2**20
    assert (out / "ckpt.pt").read_bytes() == before["ckpt.pt"] and no_temp_files(out)
    assert checkpoint.load(str(out / "ckpt.pt"))["iter_num"] == 4
    assert checkpoint.load(str(out / "best.pt"))["iter_num"] in (4, 6)  # whole: the old one, or a new best that fit


class FillsUp:
    """A file that takes `room` bytes, then fails as a full disk does (ENOSPC)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_failing_write_removes_its_temp_file_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    state = lambda i: {"model": {"w": torch.full((100_000,), float(i))}, "model_args": {}, "iter_num": i,  # noqa
                       "best_val_loss": 1.0}
    checkpoint.save(state(1), str(tmp_path), is_best=True)
    before = pt_bytes(tmp_path)
    real_open = open
    monkeypatch.setattr(files, "open", lambda path, mode="r": FillsUp(real_open(path, mode), 200_000),
                        raising=False)
    with pytest.raises(UserError, match=r"disk full while saving .*best.pt: it needs about 0.4 MiB"):
        checkpoint.save(state(2), str(tmp_path), is_best=True)
    assert pt_bytes(tmp_path) == before and no_temp_files(tmp_path)


SAVER = """
import sys, torch
from lib import checkpoint, runtime, step
runtime.install_error_hook()
stop = step.StopSignal(interrupted=lambda: "interrupted by a second Ctrl-C; the last good checkpoint stays")
for i in range(1, 10**6):  # ~32 MB states, saving most of the time
    checkpoint.save({"model": {"w": torch.full((8_000_000,), float(i))}, "model_args": {}, "iter_num": i}, sys.argv[1])
    print(i, flush=True)
"""


def test_a_second_ctrl_c_during_a_save_is_one_line_and_leaves_no_temp_file(tmp_path):
    proc = popen("-c", SAVER, str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()  # one whole checkpoint exists
    proc.send_signal(signal.SIGINT)  # the first Ctrl-C only asks to stop (this loop does not check)
    proc.stdout.readline()  # one more save: its handler has run (two signals before it runs would be taken as one)
    proc.send_signal(signal.SIGINT)  # the second interrupts, most likely mid-save
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err == "error: interrupted by a second Ctrl-C; the last good checkpoint stays\n"
    state = checkpoint.load(str(tmp_path / "ckpt.pt"))
    assert bool((state["model"]["w"] == state["iter_num"]).all()) and no_temp_files(tmp_path)


# ----------------------------------------------------------------------------- 3. best.pt survives a kill

KILL_AFTER_BEST = """
import os, runpy, signal, sys
from lib import checkpoint
write = checkpoint._write_atomic
def write_then_die(path, obj):  # SIGKILL right after best.pt is written at iteration {kill_at}, before ckpt.pt
    write(path, obj)
    if path.endswith("best.pt") and obj["iter_num"] == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint._write_atomic = write_then_die
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def best_weights(out_dir):
    state = checkpoint.load(os.path.join(out_dir, "best.pt"))
    return state["iter_num"], state["model"]


@pytest.mark.slow
def test_a_kill_between_best_and_latest_keeps_the_best_model(char_data, tmp_path):
    common = ["--eval_interval=2", "--max_iters=8", "--lr_decay_iters=8", "--always_save_checkpoint=False"]
    whole = train(char_data, tmp_path / "whole", *common)
    vals = dict(re.findall(r"^step (\d+): train loss \S+, val loss (\S+)", whole.stdout, re.M))
    kill_at = 4
    assert float(vals["4"]) < float(vals["2"])  # iteration 4 is a new best, so the kill lands between the writes
    proc = run("-c", KILL_AFTER_BEST.replace("{kill_at}", str(kill_at)), *TINY, f"--dataset={char_data}", *common,
               f"--out_dir={tmp_path / 'killed'}", check=False)
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint.load(str(tmp_path / "killed" / "ckpt.pt"))["iter_num"] == 2  # ckpt.pt is a step behind
    assert best_weights(tmp_path / "killed")[0] == kill_at  # ... but best.pt already holds the new best
    train(char_data, tmp_path / "killed", *common, "--init_from=resume")
    (it_a, a), (it_b, b) = best_weights(tmp_path / "whole"), best_weights(tmp_path / "killed")
    assert it_a == it_b and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_repairs_a_best_pt_left_behind(char_data, tmp_path):
    """Files as an older version could leave them: ckpt.pt records a best val loss that best.pt does not hold."""
    args = ["--eval_interval=2", "--lr_decay_iters=100", "--always_save_checkpoint=False"]
    train(char_data, tmp_path, *args, "--max_iters=2")
    stale = (tmp_path / "best.pt").read_bytes()
    train(char_data, tmp_path, *args, "--max_iters=4", "--init_from=resume")
    latest = checkpoint.load(str(tmp_path / "ckpt.pt"))
    assert latest["iter_num"] == 4 and latest["val_loss"] == latest["best_val_loss"]  # iteration 4 was a new best
    (tmp_path / "best.pt").write_bytes(stale)
    proc = train(char_data, tmp_path, *args, "--max_iters=4", "--init_from=resume")  # loads, repairs, stops
    assert f"repaired {tmp_path / 'best.pt'}" in proc.stdout
    best = checkpoint.load(str(tmp_path / "best.pt"))
    assert best["iter_num"] == 4 and all(torch.equal(best["model"][k], latest["model"][k]) for k in best["model"])


# ----------------------------------------------------------------------------- 4, 5. values that cannot work

BAD_VALUES = ["batch_size=0", "block_size=0", "n_layer=0", "n_head=0", "n_embd=0", "eval_interval=0", "log_interval=0",
              "eval_iters=0", "max_iters=-1", "gradient_accumulation_steps=0", "learning_rate=-1e-3", "min_lr=-1",
              "dropout=1.0", "dropout=-0.1", "grad_clip=-1", "keep_last_n=-1", "warmup_iters=-5", "beta2=1.0"]


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_values_that_cannot_work_are_refused_naming_the_setting(bad):
    key = bad.split("=")[0]
    defaults = {"batch_size": 12, "block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768, "eval_interval": 1,
                "log_interval": 1, "eval_iters": 1, "max_iters": 1, "gradient_accumulation_steps": 1,
                "learning_rate": 1e-3, "min_lr": 1e-4, "dropout": 0.0, "grad_clip": 1.0, "keep_last_n": 0,
                "warmup_iters": 0, "beta2": 0.95}
    with pytest.raises(ConfigError, match=rf"^{key}=\S+ cannot work: {key} must be (>= [01]|in \[0, 1\))$"):
        configure(dict(defaults), [f"--{bad}"])


@pytest.mark.slow
def test_bad_values_are_one_line_before_training(char_data, tmp_path):
    """Through the real scripts: exit 1, one error line, nothing trained or written."""
    out = f"--out_dir={tmp_path / 'out'}"
    fails(run("train.py", "--eval_iters=0", out, check=False), "eval_iters=0 cannot work: eval_iters must be >= 1")
    fails(run("train.py", "--n_embd=100", "--n_head=3", out, check=False), "n_embd=100 must be divisible by n_head=3")
    fails(run("train.py", "--warmup_iters=10", "--lr_decay_iters=10", out, check=False),
          "warmup_iters=10 must be smaller than lr_decay_iters=10")
    fails(run("train.py", "--device=cpu", "--dtype=float16", out, check=False), "float16 on the CPU", "bfloat16")
    fails(run("train.py", *TINY, f"--dataset={char_data}", "--init_from=scrath", out, check=False),
          "init_from='scrath' cannot work: init_from must be 'scratch' (train.py), 'resume', 'gpt2',",
          "(did you mean 'scratch'?)")
    fails(run("sample.py", "--init_from=gpt-2", check=False), "init_from='gpt-2' cannot work", "gpt2-medium")
    fails(run("train.py", "--dataset=no_such_data", out, check=False), "no dataset at", "--dataset is a folder under "
          "data/ (", "shakespeare_char")
    assert not os.path.exists(tmp_path / "out" / "ckpt.pt")
    config = tmp_path / "my_config.py"
    config.write_text("batch_size = 4\nmax_iters = (\n")
    fails(run("train.py", str(config), check=False), f"config file {config}, line 2")
    config.write_text("batch_size = 4\nlearning_rate = 6e-4 / warmup\n")
    fails(run("train.py", str(config), check=False), f"config file {config}, line 2: NameError")
    fails(run("sample.py", "--temperature=-1", check=False), "temperature=-1.0 cannot work")
    fails(run("sample.py", "--top_k=-5", check=False), "top_k=-5 cannot work")
    fails(run("sample.py", "--max_new_tokens=-1", check=False), "max_new_tokens=-1 cannot work")


def test_sample_prompt_file_errors(char_run, tmp_path):
    sample = lambda start: run("sample.py", "--device=cpu", f"--out_dir={char_run}", f"--start={start}",  # noqa
                               "--num_samples=1", "--max_new_tokens=5", check=False)
    fails(sample(f"FILE:{tmp_path / 'missing.txt'}"), "cannot read the prompt file (No such file or directory)")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    fails(sample(f"FILE:{tmp_path / 'latin1.txt'}"), "cannot read the prompt file (not UTF-8 text")
    (tmp_path / "prompt.txt").write_text("ROMEO:", encoding="utf-8")
    assert sample(f"FILE:{tmp_path / 'prompt.txt'}").stdout.startswith("ROMEO:")


# ----------------------------------------------------------------------------- 6. nanoGPT checkpoints load

def as_nanogpt(state):
    """A checkpoint in karpathy/nanoGPT's format: compiled-model keys, no scaler, no meta, a tensor best_val_loss."""
    return dict(model={f"_orig_mod.{k}": v for k, v in state["model"].items()}, optimizer=state["optimizer"],
                model_args=state["model_args"], iter_num=state["iter_num"],
                best_val_loss=torch.tensor(state["best_val_loss"]), config=dict(state["config"], backend="nccl"))


@pytest.mark.slow
def test_a_nanogpt_checkpoint_samples_resumes_and_exports(char_data, char_run, tmp_path, monkeypatch):
    ours = checkpoint.load(str(char_run / "ckpt.pt"))  # trained 4 steps
    nano = tmp_path / "nano"
    nano.mkdir()
    torch.save(as_nanogpt(ours), nano / "ckpt.pt")
    original = (nano / "ckpt.pt").read_bytes()

    sample = run("sample.py", "--device=cpu", f"--out_dir={nano}", "--num_samples=1", "--max_new_tokens=20",
                 "--start=ROMEO:", "--temperature=0")
    same = run("sample.py", "--device=cpu", f"--out_dir={char_run}", "--ckpt=latest", "--num_samples=1",
               "--max_new_tokens=20", "--start=ROMEO:", "--temperature=0")
    assert "is a nanoGPT checkpoint" in sample.stdout and "the checkpoint carries no vocabulary: using" in sample.stdout
    assert sample.stdout.endswith(same.stdout)  # the same text as the checkpoint it was made from
    assert (nano / "ckpt.pt").read_bytes() == original

    export(monkeypatch, f"--out_dir={nano}", f"--hf_dir={tmp_path / 'hf'}")
    assert (tmp_path / "hf" / "model.safetensors").exists() and (tmp_path / "hf" / "char_vocab.json").exists()
    assert (nano / "ckpt.pt").read_bytes() == original

    resumed = train(char_data, nano, "--max_iters=6", "--eval_interval=6", "--init_from=resume").stdout
    whole = train(char_data, tmp_path / "whole", "--max_iters=6", "--eval_interval=2").stdout
    pick = lambda s: re.findall(r"^iter (\d+): loss (\S+),", s, re.M)  # noqa: E731
    assert pick(resumed) == pick(whole)[4:] and len(pick(resumed)) == 2  # continues exactly where it stopped


# ----------------------------------------------------------------------------- 7. export into an existing folder

@pytest.mark.gpt2_bpe
def test_export_replaces_an_earlier_export_whole_and_refuses_other_folders(char_run, tmp_path, monkeypatch):
    padded_bpe_checkpoint(tmp_path / "bpe", GPT2_META)
    hf_dir = tmp_path / "hf"
    export(monkeypatch, f"--out_dir={tmp_path / 'bpe'}", f"--hf_dir={hf_dir}")
    assert (hf_dir / "tokenizer.json").exists() and (hf_dir / "merges.txt").exists()
    export(monkeypatch, f"--out_dir={char_run}", f"--hf_dir={hf_dir}")  # a char model over the BPE export
    assert sorted(os.listdir(hf_dir)) == ["char_vocab.json", "config.json", "export.json", "generation_config.json",
                                          "model.safetensors"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("hf.")]  # no staging or old folder left

    other = tmp_path / "someone_elses"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not empty and is not an earlier export"):
        export(monkeypatch, f"--out_dir={char_run}", f"--hf_dir={other}")
    assert os.listdir(other) == ["notes.txt"]
    shutil.rmtree(hf_dir)


def unsupported_python():
    """A real interpreter outside 3.11-3.13 on this machine (python3.10, or pyenv's), or None."""
    import glob

    found = [shutil.which(f"python3.{minor}") for minor in (10, 9, 14)]
    found += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3")))
    for python in filter(None, found):  # (a pyenv shim can exist and fail)
        check = "import sys; sys.exit((3, 11) <= sys.version_info[:2] <= (3, 13))"  # 0: outside
        if subprocess.run([python, "-c", check], capture_output=True).returncode == 0:
            return python
    return None


@pytest.mark.parametrize("script", ["quickstart.sh", "test.sh"])
def test_scripts_refuse_an_unsupported_python_before_installing(script, tmp_path):
    python = unsupported_python()
    if python is None:
        pytest.skip("no Python outside 3.11-3.13 installed here")
    shutil.copy(os.path.join(REPO, script), tmp_path)  # a copy: it must not make a .venv in the repo
    proc = subprocess.run(["bash", script], cwd=tmp_path, env={**os.environ, "PYTHON": python},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.fullmatch(r"error: Python 3\.\d+\.\d+ found; this repo needs Python 3\.11-3\.13: install one and run "
                        r"PYTHON=python3\.12 bash .*\n", proc.stderr), proc.stderr
    assert not (tmp_path / ".venv").exists()
