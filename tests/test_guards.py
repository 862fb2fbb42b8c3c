"""
Nothing a user has is replaced unasked, every file goes through one atomic writer, and one process writes into an
output folder at a time (lib/files.py): the out_dir guard over every kind of checkpoint, prepares, the tokenizer
trainer and export.py over someone else's files, full disks and folders in the way, two prepares into one folder,
and --overwrite=True keeping the old run's files until the new run's first save.
"""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading

import pytest
import torch

from conftest import REPO, TINY, run
from lib import checkpoint, files, metrics
from lib.metrics import MetricsFile
from lib.runtime import UserError
from test_data import big_corpus, hf_env, wait_for_temp_bin  # noqa: F401 (hf_env: a fixture)
from test_faults import fails
from test_gpt2 import GPT2_META, export, padded_bpe_checkpoint
from test_safety import FillsUp, no_temp_files, small_filesystem, start_training  # noqa: F401 (a fixture)


def train(char_data, out_dir, *args, check=True):
    return run("train.py", *TINY, f"--dataset={char_data}", f"--out_dir={out_dir}", *args, check=check)


def state(it):
    """A small checkpoint's content, as train.py saves it (iter it, best val loss 1/it)."""
    return {"model": {"w": torch.full((1000,), float(it))}, "optimizer": {}, "model_args": {}, "iter_num": it,
            "best_val_loss": 1.0 / it, "val_loss": 1.0 / it}


def contents(folder):
    """Every file under folder: relative path -> bytes."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def full_disk(monkeypatch, module=files, room=10):
    """Writes through module's open() fail as on a full disk after `room` bytes (ENOSPC)."""
    real_open = open
    monkeypatch.setattr(module, "open", lambda path, mode="r", **kw: FillsUp(real_open(path, mode, **kw), room),
                        raising=False)


# ----------------------------------------------------------------------------- training runs

@pytest.mark.parametrize("left", ["best.pt", "snapshot", "best.dcp", "snapshot.dcp"])
def test_the_out_dir_guard_counts_every_checkpoint(tmp_path, left):
    """An out_dir whose ckpt.pt (or ckpt.dcp) was deleted to save space still holds a trained model."""
    out = str(tmp_path)
    checkpoint.save(state(3), out, is_best=True, keep_last_n=1, sharded=left.endswith(".dcp"))
    for name in os.listdir(out):
        if not (name.startswith("best.") if left.startswith("best") else name.startswith("ckpt_")):
            checkpoint._remove(os.path.join(out, name))
    assert len(os.listdir(out)) == 1
    with pytest.raises(UserError, match=r"out_dir '.*' already holds a model trained for 3 iterations \(best val loss "
                                        r"0.3333\) in (best|ckpt_0000003)\.(pt|dcp): .*replace it with "
                                        r"--overwrite=True \(at the new run's first save\), or pick another --out_dir"):
        checkpoint.guard(out, "scratch", overwrite=False)
    checkpoint.guard(out, "scratch", overwrite=True)


def test_train_refuses_an_out_dir_holding_only_best_pt(char_data, tmp_path):
    checkpoint.save(state(7), str(tmp_path), is_best=True)
    os.remove(tmp_path / "ckpt.pt")
    before = contents(tmp_path)
    fails(train(char_data, tmp_path, "--max_iters=2", check=False),
          f"out_dir '{tmp_path}' already holds a model trained for 7 iterations (best val loss 0.1429) in best.pt",
          "--overwrite=True")
    assert {k: v for k, v in contents(tmp_path).items() if k != ".lock"} == before


def test_overwrite_removes_the_old_run_only_once_the_new_save_is_written(tmp_path, monkeypatch):
    out = str(tmp_path)
    for it in (5, 6):
        checkpoint.save(state(it), out, is_best=True, keep_last_n=2)
    before = contents(out)
    full_disk(monkeypatch, room=100)
    with pytest.raises(UserError, match="disk full while saving .*ckpt.pt"):
        checkpoint.save(state(1), out, keep_last_n=2, replace=True)  # the new run's first save fails
    assert contents(out) == before  # best.pt and the snapshots of the old run are all still there
    monkeypatch.undo()
    checkpoint.save(state(1), out, keep_last_n=2, replace=True)
    assert sorted(os.listdir(out)) == ["ckpt.pt", "ckpt_0000001.pt"]  # the old run's best.pt and snapshots went


def test_overwrite_keeps_the_old_metrics_and_loss_png_until_the_first_save(char_data, tmp_path):
    checkpoint.save(state(2), str(tmp_path), is_best=True)  # an earlier run's files
    write_records(tmp_path / "metrics.jsonl", [1, 2])
    metrics.plot_losses(str(tmp_path / "loss.png"), [1, 2], [3.0, 2.5], [1e-3, 1e-3], [], 64, "the earlier run")
    names = ("ckpt.pt", "best.pt", "metrics.jsonl", "loss.png")
    before = {n: (tmp_path / n).read_bytes() for n in names}
    proc = start_training(char_data, tmp_path, "--overwrite=True")  # returns once it has logged step 1
    try:
        assert {n: (tmp_path / n).read_bytes() for n in names} == before
    finally:
        proc.kill()
        proc.wait()
    assert {n: (tmp_path / n).read_bytes() for n in names} == before  # killed before its first save: all as it was
    train(char_data, tmp_path, "--max_iters=3", "--eval_interval=3", "--overwrite=True")
    records = MetricsFile.read(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3]  # the new run's, from its start
    assert (tmp_path / "loss.png").read_bytes() != before["loss.png"]


# ----------------------------------------------------------------------------- metrics.jsonl and loss.png

def write_records(path, steps):
    path.write_text("".join(json.dumps({"kind": "step", "step": s, "loss": 1.0}) + "\n" for s in steps))


def test_metrics_rewrite_and_append_on_a_full_disk_keep_the_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    write_records(path, range(1, 6))
    before = path.read_bytes()
    full_disk(monkeypatch)
    with pytest.raises(UserError, match=r"disk full while saving .*metrics.jsonl: .* free in .*; the previous "
                                        r"metrics.jsonl there is intact"):
        MetricsFile(str(path), resume_step=3)  # a resumed run drops steps 4-5: a rewrite
    assert path.read_bytes() == before and no_temp_files(tmp_path)
    monkeypatch.undo()
    log = MetricsFile(str(path), resume_step=5)
    full_disk(monkeypatch, metrics, room=0)
    with pytest.raises(UserError, match="disk full while saving .*metrics.jsonl"):
        log.append({"kind": "step", "step": 6})
    assert path.read_bytes() == before


def test_a_new_runs_metrics_replace_the_old_file_only_at_commit(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_records(path, [1, 2])
    before = path.read_bytes()
    log = MetricsFile(str(path))  # a run that does not resume
    log.append({"kind": "step", "step": 1, "loss": 2.0})
    assert path.read_bytes() == before
    log.commit()  # its first save
    log.append({"kind": "step", "step": 2, "loss": 1.5})
    assert MetricsFile.read(str(path)) == [{"kind": "step", "step": 1, "loss": 2.0}, {"kind": "step", "step": 2,
                                                                                       "loss": 1.5}]


def test_a_folder_where_metrics_jsonl_or_loss_png_go_is_one_line(char_data, tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(UserError, match="metrics.jsonl is a folder, where this would write a file: move it away"):
        MetricsFile(str(tmp_path / "metrics.jsonl"))
    (tmp_path / "loss.png").mkdir()
    with pytest.raises(UserError, match="loss.png is a folder, where this would write a file"):
        metrics.plot_losses(str(tmp_path / "loss.png"), [1, 2], [3.0, 2.5], [1e-3, 1e-3], [], 64, "a title")
    out = tmp_path / "out"
    (out / "loss.png").mkdir(parents=True)
    fails(train(char_data, out, "--max_iters=2", check=False), f"{out / 'loss.png'} is a folder")  # before training
    assert not os.path.exists(out / "ckpt.pt") and no_temp_files(tmp_path) and no_temp_files(out)


def test_loss_png_on_a_full_disk_keeps_the_old_picture(tmp_path, monkeypatch):
    path = str(tmp_path / "loss.png")
    metrics.plot_losses(path, [1, 2], [3.0, 2.5], [1e-3, 1e-3], [], 64, "before")
    before = open(path, "rb").read()
    full_disk(monkeypatch)
    with pytest.raises(UserError, match=r"disk full while saving .*loss.png"):
        metrics.plot_losses(path, [1, 2, 3], [3.0, 2.5, 2.0], [1e-3] * 3, [], 64, "after")
    assert open(path, "rb").read() == before and no_temp_files(tmp_path)


# ----------------------------------------------------------------------------- prepares and their lock

def small_text(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40, encoding="utf-8")
    return path


def prepare_char(tmp_path, out, *args, check=True):
    return run("data/shakespeare_char/prepare.py", f"--input={small_text(tmp_path)}", f"--out_dir={out}", *args,
               check=check)


def test_a_prepare_replaces_only_a_dataset_that_a_prepare_wrote(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "train.bin").write_bytes(b"someone else's tokens")  # e.g. nanoGPT's prepare: bins, no meta.json
    (out / "notes.txt").write_text("mine")
    before = contents(out)
    fails(prepare_char(tmp_path, out, check=False), f"out_dir '{out}' already holds train.bin, not a dataset that a "
          f"prepare of this repo wrote", "replace it with --overwrite=True (once the new dataset is complete)")
    assert {k: v for k, v in contents(out).items() if k != ".lock"} == before  # (and no temp folder)
    prepare_char(tmp_path, out, "--overwrite=True")
    assert (out / "meta.json").exists() and (out / "notes.txt").read_text() == "mine"
    prepare_char(tmp_path, out)  # its own dataset now: replaced without asking
    (out / "meta.json").write_text('{"name": "not a prepare\'s"}')
    fails(prepare_char(tmp_path, out, check=False), "already holds meta.json, train.bin, val.bin, not a dataset")


@pytest.mark.gpt2_bpe
def test_two_prepares_into_one_folder(hf_env, tmp_path):  # noqa: F811 (hf_env: the fixture)
    """The second stops in one line naming the first; once the first is killed (its tokenizing processes live on
    a moment, orphaned), the folder is free again."""
    big = tmp_path / "big.jsonl"
    big_corpus(big, mb=8)
    out = tmp_path / "data"
    first = subprocess.Popen([sys.executable, "data/text/prepare.py", str(big), f"--out={out}", "--num_proc=1"],
                             cwd=REPO, env={**os.environ, **hf_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_temp_bin(first, out)  # it holds the lock and its tokenizing process runs
        fails(prepare_char(tmp_path, out, check=False),
              f"out_dir '{out}' is in use by another prepare (pid {first.pid} on ", "wait for it to finish")
    finally:
        first.kill()
        first.wait()
    prepare_char(tmp_path, out)
    assert json.loads((out / "meta.json").read_text())["tokenizer"] == "char"


def test_the_lock_is_not_kept_by_forked_children(tmp_path):
    held = files.lock(str(tmp_path), "prepare")
    ready, started = os.pipe()
    child = os.fork()
    if child == 0:  # a tokenizing worker, say, that lives on after its parent
        os.write(started, b"1")  # (os.fork has returned here: the fork handlers have run)
        signal.pause()
        os._exit(0)
    try:
        assert os.read(ready, 1) == b"1"
        files.unlock(held)  # the parent ends
        files.unlock(files.lock(str(tmp_path), "prepare"))  # free: the child did not keep it
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(ready)
        os.close(started)


@pytest.mark.gpt2_bpe
def test_one_writer_per_folder_for_every_script(char_data, tmp_path, monkeypatch):
    """While something holds a folder (here this process), the tokenizer trainer and export.py stop too."""
    out = tmp_path / "data"
    out.mkdir()
    held = files.lock(str(out), "prepare")
    try:
        fails(run("data/train_tokenizer.py", str(small_text(tmp_path)), "--vocab_size=300",
                  f"--out={out / 'tokenizer.json'}", check=False),
              f"is in use by another prepare (pid {os.getpid()} on ")
        padded_bpe_checkpoint(tmp_path / "bpe", GPT2_META)
        with pytest.raises(UserError, match=rf"hf_dir '{out}' is in use by another prepare \(pid {os.getpid()} on "):
            export(monkeypatch, f"--out_dir={tmp_path / 'bpe'}", f"--hf_dir={out}")
        assert sorted(os.listdir(out)) == [".lock"] and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    finally:
        files.unlock(held)


# ----------------------------------------------------------------------------- the tokenizer trainer

def test_train_tokenizer_replaces_only_a_tokenizer_it_wrote(tmp_path):
    corpus = small_text(tmp_path)
    tokenize = lambda out, *args: run("data/train_tokenizer.py", str(corpus), "--vocab_size=300",  # noqa: E731
                                      f"--out={out}", *args, check=False)
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    fails(tokenize(mine), f"out '{mine}' is a file that this script did not write (not a tokenizer of its kind)",
          "replace it with --overwrite=True (once the new one is trained)")
    assert mine.read_text() == '{"my": "notes"}'
    from tokenizers import Tokenizer, models, pre_tokenizers

    other = Tokenizer(models.BPE())  # a tokenizer.json of another kind (someone else's)
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    other.save(str(tmp_path / "other.json"))
    fails(tokenize(tmp_path / "other.json"), "is a file that this script did not write")
    out = tmp_path / "bpe" / "tokenizer.json"
    assert tokenize(out).returncode == 0 and tokenize(out).returncode == 0  # its own file: replaced
    assert tokenize(mine, "--overwrite=True").returncode == 0 and Tokenizer.from_file(str(mine)).get_vocab_size() > 256
    fails(tokenize(tmp_path / "bpe"), "bpe is a folder, where this would write a file")
    assert no_temp_files(tmp_path) and no_temp_files(tmp_path / "bpe")


# ----------------------------------------------------------------------------- export

@pytest.mark.gpt2_bpe
def test_export_keeps_files_it_did_not_write_and_refuses_changed_ones(tmp_path, monkeypatch):
    padded_bpe_checkpoint(tmp_path / "bpe", GPT2_META)
    hf_dir = tmp_path / "hf"
    again = lambda *args: export(monkeypatch, f"--out_dir={tmp_path / 'bpe'}", f"--hf_dir={hf_dir}", *args)  # noqa
    again()
    marker = json.loads((hf_dir / "export.json").read_text())
    assert set(marker["files"]) == set(os.listdir(hf_dir)) - {"export.json"}
    (hf_dir / "README.md").write_text("my model card")
    (hf_dir / ".git").mkdir()
    (hf_dir / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    again()  # an earlier export: its own files are replaced, the user's stay
    assert (hf_dir / "README.md").read_text() == "my model card" and (hf_dir / ".git" / "HEAD").exists()
    assert (hf_dir / "model.safetensors").exists() and not os.path.exists(hf_dir / ".lock")

    (hf_dir / "config.json").write_text('{"edited": true}')  # a file of the export, changed since
    with pytest.raises(UserError, match=r"hf_dir '.*' holds config.json, which this export would replace or remove, "
                                        r"but which were changed since an earlier export wrote them: replace them "
                                        r"with --overwrite=True"):
        again()
    assert (hf_dir / "config.json").read_text() == '{"edited": true}'
    again("--overwrite=True")
    assert "edited" not in (hf_dir / "config.json").read_text() and (hf_dir / "README.md").exists()

    theirs = tmp_path / "theirs"  # a folder that is no export
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"is not empty and is not an earlier export \(no export.json; it holds "
                                        r"notes.txt\): export into it anyway with --overwrite=True"):
        export(monkeypatch, f"--out_dir={tmp_path / 'bpe'}", f"--hf_dir={theirs}")
    assert os.listdir(theirs) == ["notes.txt"]
    export(monkeypatch, f"--out_dir={tmp_path / 'bpe'}", f"--hf_dir={theirs}", "--overwrite=True")
    assert (theirs / "notes.txt").read_text() == "keep me" and (theirs / "model.safetensors").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old-" in p]


# ----------------------------------------------------------------------------- a real full disk

@pytest.mark.gpt2_bpe
def test_a_full_disk_is_one_line_for_every_writer(tmp_path, small_filesystem, monkeypatch):  # noqa: F811
    disk = small_filesystem(256 << 10) if os.geteuid() == 0 else None
    if disk is None:
        pytest.skip("mounting a tmpfs needs root (the other tests simulate ENOSPC)")
    padded_bpe_checkpoint(tmp_path / "bpe", GPT2_META)
    with pytest.raises(UserError, match=rf"disk full while saving {disk / 'hf'}: .* free in {disk}; the previous "
                                        r"export there is intact"):
        export(monkeypatch, f"--out_dir={tmp_path / 'bpe'}", f"--hf_dir={disk / 'hf'}")  # 7 MB into 256 KiB
    assert os.listdir(disk) == []
    with open(disk / "filler", "wb", buffering=0) as f:  # then nothing more fits
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    fails(run("data/train_tokenizer.py", str(small_text(tmp_path)), "--vocab_size=300",
              f"--out={disk / 'bpe' / 'tokenizer.json'}", check=False), "disk full while saving")
    fails(prepare_char(tmp_path, disk / "data", check=False), "free some disk space or pass another --out_dir")
    leftovers = [os.path.join(root, name) for root, dirs, names in os.walk(disk) for name in dirs + names]
    assert sorted(os.path.relpath(p, disk) for p in leftovers) == ["bpe", "bpe/.lock", "data", "data/.lock", "filler"]


# ----------------------------------------------------------------------------- the other writers

def test_a_download_on_a_full_disk_leaves_nothing_and_a_failed_read_stays_a_download_error(tmp_path, monkeypatch):
    """core_eval.fetch (the HellaSwag file, the eval bundle) writes through write_atomic: a full disk is a disk
    error, a source that fails mid-read stays a download error, and neither leaves a file."""
    from lib import core_eval

    source = tmp_path / "hellaswag_val.jsonl"
    source.write_text(json.dumps({"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 0}) + "\n")
    cache = tmp_path / "cache"
    full_disk(monkeypatch)
    with pytest.raises(UserError, match="disk full while saving .*hellaswag_val.jsonl"):
        core_eval.fetch(source.as_uri(), str(cache / "hellaswag_val.jsonl"), "pass --input")
    monkeypatch.undo()

    server = socket.socket()  # a server whose connection drops mid-file (a reset: an OSError while reading)
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/x.jsonl"
    with pytest.raises(UserError, match=rf"could not download {url} \(.*reset.*\): pass --input"):
        core_eval.fetch(url, str(cache / "x.jsonl"), "pass --input")
    thread.join()
    server.close()
    assert os.listdir(cache) == []


def test_sweep_outputs_are_written_atomically(tmp_path):
    """scaling_sweep.py's sweep.png (as --plot_only redraws it): a folder in its way is one line, nothing is left."""
    import importlib.util

    path = os.path.join(REPO, "experiments", "scaling_sweep.py")
    spec = importlib.util.spec_from_file_location("scaling_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    points = [{"flops": 3e11, "params": n, "val_loss": loss} for n, loss in [(1e4, 2.2), (3e4, 2.0)]]
    points.append({"flops": 3e11, "params": 1e5, "val_loss": 1.9, "predicted_loss": 1.85})
    sweep.plot(str(tmp_path / "sweep.png"), points, (10.0, 0.3, 1.0), points[-1], "a sweep")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    os.remove(tmp_path / "sweep.png")
    (tmp_path / "sweep.png").mkdir()
    with pytest.raises(UserError, match="sweep.png is a folder, where this would write a file"):
        sweep.plot(str(tmp_path / "sweep.png"), points, (10.0, 0.3, 1.0), points[-1], "a sweep")
    assert no_temp_files(tmp_path)
