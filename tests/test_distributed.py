"""train.py under torchrun (DDP over gloo on CPU): ranks train together and stop together."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY, popen, run
from lib import checkpoint

pytestmark = pytest.mark.xdist_group("distributed")  # one pytest-xdist worker: the module fixtures train once


def torchrun(*args):
    return popen("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args,
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={"OMP_NUM_THREADS": "1"})


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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ----------------------------------------------------------------------------- issue 10: FSDP2, activation
# checkpointing, multi-node, total_batch_size. Every run below trains the same 8 steps of 256 tokens (4 sequences x
# 32 tokens x 2 micro-steps in all), so all of them must reach the reference's losses and weights.

import shutil  # noqa: E402
import socket  # noqa: E402

import torch  # noqa: E402

STEPS = ["--eval_interval=4", "--max_iters=8", "--lr_decay_iters=8", "--keep_last_n=2", "--dropout=0.1"]


def single(*args):
    return run("train.py", *args, timeout=300, check=False, env={"OMP_NUM_THREADS": "1"})


def finished(proc):
    out = proc.communicate(timeout=300)[0] if isinstance(proc, subprocess.Popen) else proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


def losses(out):
    return {int(i): float(v) for i, v in re.findall(r"^iter (\d+): loss (\S+),", out, re.M)}


def max_weight_error(dir_a, dir_b, name="ckpt.pt"):
    a, b = (checkpoint.load(os.path.join(d, name))["model"] for d in (dir_a, dir_b))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_run(out, ref_out, first=1):
    got, want = losses(out), {i: v for i, v in losses(ref_out).items() if i >= first}
    assert got.keys() == want.keys(), out
    assert all(abs(got[i] - want[i]) <= 2e-4 for i in got), (got, want)  # printed to 4 decimals


@pytest.fixture(scope="module")
def reference(char_data, tmp_path_factory):
    """One process, 2 micro-steps per step: (out_dir, output)."""
    out_dir = str(tmp_path_factory.mktemp("reference"))
    out = finished(single(*TINY, f"--dataset={char_data}", f"--out_dir={out_dir}", *STEPS,
                          "--gradient_accumulation_steps=2"))
    return out_dir, out


@pytest.fixture(scope="module")
def fsdp_run(char_data, tmp_path_factory):
    """FSDP2 on 2 ranks, 1 micro-step each: (out_dir, output)."""
    out_dir = str(tmp_path_factory.mktemp("fsdp"))
    out = finished(torchrun(*TINY, f"--dataset={char_data}", f"--out_dir={out_dir}", *STEPS,
                            "--gradient_accumulation_steps=2", "--parallelism=fsdp"))
    return out_dir, out


@pytest.mark.parametrize("activation_checkpointing", [False, True])
@pytest.mark.slow
def test_fsdp_on_2_ranks_matches_one_process(reference, fsdp_run, char_data, tmp_path, activation_checkpointing):
    if activation_checkpointing:
        out_dir = str(tmp_path)
        out = finished(torchrun(*TINY, f"--dataset={char_data}", f"--out_dir={out_dir}", *STEPS,
                                "--gradient_accumulation_steps=2", "--parallelism=fsdp",
                                "--activation_checkpointing=True"))
        assert "2 process(es) (fsdp), activation checkpointing" in out
    else:
        out_dir, out = fsdp_run
        assert "2 process(es) (fsdp)" in out
    assert_same_run(out, reference[1])
    error = max_weight_error(out_dir, reference[0])
    print(f"FSDP (activation_checkpointing={activation_checkpointing}) vs one process: max |weight error| {error:.2e}")
    assert error < 1e-5


@pytest.mark.slow
def test_checkpoints_resume_across_world_sizes(reference, fsdp_run, char_data, tmp_path):
    """Saved by FSDP on 2 ranks at step 4 -> resumed in one process, and the other way round: both continue with
    the losses and weights of the uninterrupted run."""
    ref_dir, ref_out = reference
    for name, saved_by, launch in (("fsdp_to_one", fsdp_run[0], lambda *a: single(*a)),
                                   ("one_to_fsdp", ref_dir, lambda *a: torchrun(*a, "--parallelism=fsdp"))):
        out_dir = tmp_path / name
        out_dir.mkdir()
        shutil.copy(os.path.join(saved_by, "ckpt_0000004.pt"), out_dir / "ckpt.pt")
        out = finished(launch(*TINY, f"--dataset={char_data}", f"--out_dir={out_dir}", *STEPS,
                              "--gradient_accumulation_steps=2", "--init_from=resume"))
        assert_same_run(out, ref_out, first=5)
        error = max_weight_error(str(out_dir), ref_dir)
        print(f"{name}: max |weight error| after resuming {error:.2e}")
        assert error < 1e-5


MEMORY_PROBE = """
import resource, sys
import torch
from lib import parallel
from model import GPT, GPTConfig
torch.manual_seed(0)
gpt = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=256, vocab_size=65, bias=False, dropout=0.0))
if sys.argv[1] == "True":
    parallel.checkpoint_blocks(gpt)
x = torch.randint(0, 65, (16, 256))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
gpt(x, x)[1].backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.slow
def test_activation_checkpointing_same_loss_and_grads_less_memory():
    from lib import parallel
    from model import GPT, GPTConfig

    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        gpt = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=32, vocab_size=65, bias=False, dropout=0.0))
        if checkpointed:
            parallel.checkpoint_blocks(gpt)
        x = torch.randint(0, 65, (4, 32), generator=torch.Generator().manual_seed(1))
        _, loss = gpt(x, x)
        loss.backward()
        results.append((loss.item(), {parallel.clean_name(n): p.grad for n, p in gpt.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert grads_a.keys() == grads_b.keys()
    assert abs(loss_a - loss_b) <= 1e-6
    assert max((grads_a[k] - grads_b[k]).abs().max().item() for k in grads_a) <= 1e-6
    # peak memory, measured: the growth of the peak RSS over one forward + backward, in a fresh process each
    grown = {}
    for checkpointed in (False, True):
        proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(checkpointed)], cwd=REPO, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO})
        assert proc.returncode == 0, proc.stderr
        grown[checkpointed] = int(proc.stdout.split()[-1])
    print(f"peak RSS growth over forward + backward: {grown[False] / 2**20:.0f} MiB without activation "
          f"checkpointing, {grown[True] / 2**20:.0f} MiB with")
    assert grown[True] < 0.8 * grown[False]  # measured here: 635 vs 396 MiB


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_match_one_process(reference, char_data, tmp_path):
    """Two torchrun launches, one process each, meeting at a c10d rendezvous on 127.0.0.1 as two nodes would."""
    port = free_port()
    procs = [popen("-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
                   "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test", "train.py", *TINY,
                   f"--dataset={char_data}", f"--out_dir={tmp_path}", *STEPS, "--gradient_accumulation_steps=2",
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={"OMP_NUM_THREADS": "1"})
             for node in (0, 1)]
    outs = [finished(p) for p in procs]
    out = next(o for o in outs if "iter 8:" in o)  # the node that got rank 0 prints
    assert sum("iter 8:" in o for o in outs) == 1, outs  # only rank 0 prints
    assert "2 process(es) (ddp)" in out
    assert_same_run(out, reference[1])
    error = max_weight_error(str(tmp_path), reference[0])
    print(f"two nodes vs one process: max |weight error| {error:.2e}")
    assert error < 1e-5


@pytest.mark.slow
def test_total_batch_size_fixes_the_tokens_per_step_whatever_the_world_size(reference, char_data, tmp_path):
    from lib import parallel
    from lib.runtime import UserError

    assert parallel.accumulation(256, 99, 4, 32, 1) == 2 and parallel.accumulation(256, 99, 4, 32, 2) == 1
    assert parallel.accumulation(0, 4, 4, 32, 2) == 2  # off: gradient_accumulation_steps as before
    with pytest.raises(UserError, match=r"total_batch_size=384 tokens is not a multiple of .* = 4 x 32 x 2 = 256"):
        parallel.accumulation(384, 1, 4, 32, 2)
    out = finished(torchrun(*TINY, f"--dataset={char_data}", f"--out_dir={tmp_path}", *STEPS,
                            "--total_batch_size=256"))
    assert "batch: 256 tokens per step (total_batch_size) = 4 sequences x 32 tokens x 1 micro-steps x 2 " \
           "process(es)" in out
    assert "batch: 256 tokens per step = 4 sequences x 32 tokens x 2 micro-steps x 1 process(es)" in reference[1]
    assert_same_run(out, reference[1])
    assert max_weight_error(str(tmp_path), reference[0]) < 1e-5


# ----------------------------------------------------------------------------- checkpoint_format='sharded': every
# rank writes its shard with torch.distributed.checkpoint (DCP) into ckpt.dcp; the converter gives ckpt.pt

@pytest.fixture(scope="module")
def sharded_run(char_data, tmp_path_factory):
    """fsdp_run's training, saved in the sharded format: (out_dir, output)."""
    out_dir = str(tmp_path_factory.mktemp("sharded"))
    out = finished(torchrun(*TINY, f"--dataset={char_data}", f"--out_dir={out_dir}", *STEPS,
                            "--gradient_accumulation_steps=2", "--parallelism=fsdp", "--checkpoint_format=sharded"))
    return out_dir, out


def convert(*args):
    """python -m lib.checkpoint convert SRC DST: one process, no torch.distributed."""
    return run("-m", "lib.checkpoint", "convert", *args, timeout=300, check=False)


@pytest.mark.slow
def test_sharded_checkpoint_converts_to_the_full_one(fsdp_run, sharded_run, tmp_path):
    """Converted in one process, the shards of 2 ranks are, bit for bit, the ckpt.pt that the full format writes."""
    out_dir, out = sharded_run
    assert_same_run(out, fsdp_run[1])
    assert sorted(os.listdir(out_dir)) == [".lock", "best.dcp", "ckpt.dcp", "ckpt_0000004.dcp", "ckpt_0000008.dcp",
                                           "loss.png", "metrics.jsonl"]
    shards = set(os.listdir(os.path.join(out_dir, "ckpt.dcp")))
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "extra.pt"} <= shards
    dst = str(tmp_path / "ckpt.pt")
    proc = convert(os.path.join(out_dir, "ckpt.dcp"), dst)
    assert proc.returncode == 0 and f"wrote {dst} (iter 8)" in proc.stdout, proc.stdout + proc.stderr
    got, want = checkpoint.load(dst), checkpoint.load(os.path.join(fsdp_run[0], "ckpt.pt"))
    assert got.keys() == want.keys() and got["model"].keys() == want["model"].keys()
    assert all(torch.equal(got["model"][k], want["model"][k]) for k in got["model"])
    (go, wo) = got["optimizer"], want["optimizer"]
    assert go["param_groups"] == wo["param_groups"] and go["state"].keys() == wo["state"].keys()
    assert all(torch.equal(go["state"][i][k], wo["state"][i][k]) for i in go["state"] for k in go["state"][i])
    for k in ("iter_num", "best_val_loss", "val_loss", "model_args", "meta", "scaler"):
        assert got[k] == want[k], k
    again = convert(os.path.join(out_dir, "ckpt.dcp"), dst)
    assert again.returncode == 1 and again.stderr.strip() == f"error: {dst} already exists: remove it first, or pick " \
                                                            f"another name"
    # sample.py and export.py read a .dcp folder as they read a file (the converter, in memory): best.dcp here
    assert checkpoint.find(out_dir) == os.path.join(out_dir, "best.dcp")
    model, meta = checkpoint.load_for_inference("resume", out_dir)
    best = checkpoint.load(os.path.join(fsdp_run[0], "best.pt"))["model"]
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items()) and meta["vocab_size"] == 65


@pytest.mark.slow
def test_sharded_checkpoints_resume_at_any_world_size(reference, sharded_run, char_data, tmp_path):
    """ckpt.dcp of step 4 (2 FSDP ranks) resumed by 2 FSDP ranks, and by one process, which saves ckpt.pt (the
    default format) next to it: both continue with the losses and weights of the uninterrupted run."""
    ref_dir, ref_out = reference
    for name, launch in (("one", single), ("fsdp", lambda *a: torchrun(*a, "--parallelism=fsdp",
                                                                        "--checkpoint_format=sharded"))):
        out_dir = tmp_path / name
        shutil.copytree(os.path.join(sharded_run[0], "ckpt_0000004.dcp"), out_dir / "ckpt.dcp")
        out = finished(launch(*TINY, f"--dataset={char_data}", f"--out_dir={out_dir}", *STEPS,
                              "--gradient_accumulation_steps=2", "--init_from=resume"))
        assert_same_run(out, ref_out, first=5)
        saved = checkpoint.latest(str(out_dir), prefer="sharded")  # the newer: ckpt.pt (step 8) over ckpt.dcp (4)
        assert saved == str(out_dir / ("ckpt.pt" if name == "one" else "ckpt.dcp"))
        got, want = checkpoint.load(saved)["model"], checkpoint.load(os.path.join(ref_dir, "ckpt.pt"))["model"]
        error = max((got[k] - want[k]).abs().max().item() for k in want)
        print(f"sharded, resumed by {name}: max |weight error| {error:.2e}")
        assert error < 1e-5


def test_a_sharded_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    """A kill while ckpt.dcp.tmp is written leaves ckpt.dcp; one between the two renames of the swap leaves only
    ckpt.dcp.old, which load reads; the next save removes both leftovers."""
    from lib import parallel
    from lib.runtime import UserError
    from model import GPT, GPTConfig

    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=65, bias=False, dropout=0.0)
    gpt = GPT(GPTConfig(**args))
    optimizer = torch.optim.AdamW(gpt.parameters())

    def save(it, **kw):
        model_sd, optim_sd = parallel.sharded_state(gpt, optimizer)
        checkpoint.save(dict(model=model_sd, optimizer=optim_sd, model_args=args, iter_num=it, best_val_loss=1.0 / it,
                             val_loss=1.0 / it, config={}, meta={}), str(tmp_path), sharded=True, **kw)

    path = str(tmp_path / "ckpt.dcp")
    save(1, is_best=True)
    shutil.copytree(path, path + ".tmp")  # a later save killed before its swap (its files half written)
    os.remove(os.path.join(path + ".tmp", ".metadata"))
    os.rename(path, path + ".old")  # and a kill between the swap's two renames
    assert checkpoint.latest(str(tmp_path)) == path + ".old" and checkpoint.load(path)["iter_num"] == 1
    with pytest.raises(UserError, match=r"already holds a model trained for 1 iterations \(best val loss 1.0000\)"):
        checkpoint.guard(str(tmp_path), "scratch", overwrite=False)
    save(2)
    assert sorted(os.listdir(tmp_path)) == ["best.dcp", "ckpt.dcp"] and checkpoint.load(path)["iter_num"] == 2
    torch.save({"iter_num": 9}, tmp_path / "ckpt.pt")  # an older run's, in the full format: an overwrite removes it
    save(3, replace=True)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.dcp"]
    shutil.copytree(path, path + ".old")  # a kill after the swap's renames, before the old folder was removed
    save(4)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.dcp"] and checkpoint.load(path)["iter_num"] == 4
