"""What a run shows and keeps (lib/metrics.py): metrics.jsonl across resumes, bits per byte, loss.png, samples,
the training doctor on sick and healthy runs, and wandb (offline) continuing one run across a resume."""

import glob
import json
import math
import os
import re
import struct

import pytest
import torch

from conftest import TINY, run
from lib import checkpoint
from lib.batches import Batches
from lib.metrics import Doctor, MetricsFile
from lib.runtime import autocast
from lib.step import estimate_loss
from model import GPT, GPTConfig

COMMON = ["--eval_interval=4", "--lr_decay_iters=12", "--dropout=0.1", "--sample_interval=4", "--sample_tokens=20"]
STEP_FIELDS = {"kind", "step", "tokens", "loss", "lr", "grad_norm", "clipped", "clip_steps", "ms_per_iter", "tok_per_s",
               "mfu", "elapsed_s", "eta_s", "skipped", "time"}
EVAL_FIELDS = {"kind", "step", "tokens", "train_loss", "val_loss", "val_bpb", "best_val_loss", "best_val_bpb", "saved",
               "elapsed_s", "time"}


def train(char_data, out_dir, *args, env=None, check=True):
    return run("train.py", *TINY, f"--dataset={char_data}", f"--out_dir={out_dir}", *args, env=env, check=check)


def records(out_dir, kind=None):
    return [r for r in MetricsFile.read(os.path.join(out_dir, "metrics.jsonl")) if kind in (None, r["kind"])]


def step_losses(stdout):
    return re.findall(r"^iter (\d+): loss (\S+),", stdout, re.M)


@pytest.fixture(scope="module")
def runs(char_data, tmp_path_factory):
    """0 -> 12 in one go, and 0 -> 8, a crash that logged steps 9-10, then a resume 8 -> 12."""
    tmp = tmp_path_factory.mktemp("metrics")
    whole = train(char_data, tmp / "whole", *COMMON, "--max_iters=12").stdout
    first = train(char_data, tmp / "pieces", *COMMON, "--max_iters=8").stdout
    with open(tmp / "pieces" / "metrics.jsonl", "a") as f:  # what a run killed after step 10 had logged
        for step in (9, 10):
            f.write(json.dumps({"kind": "step", "step": step, "loss": 9.0}) + "\n")
        f.write('{"kind": "step", "st')  # and a line cut short by the kill
    second = train(char_data, tmp / "pieces", *COMMON, "--max_iters=12", "--init_from=resume").stdout
    return {"whole": (str(tmp / "whole"), whole), "pieces": (str(tmp / "pieces"), first + second)}


@pytest.mark.slow
def test_metrics_jsonl_one_record_per_line_no_duplicates_across_resume(runs):
    for name, (out, stdout) in runs.items():
        steps, evals = records(out, "step"), records(out, "eval")
        assert [r["step"] for r in steps] == list(range(1, 13)), name
        assert [r["step"] for r in evals] == [0, 4, 8, 12], name
        assert all(set(r) == STEP_FIELDS for r in steps) and all(set(r) == EVAL_FIELDS for r in evals)
        keys = [(r["kind"], r["step"], r.get("check")) for r in records(out)]
        assert len(keys) == len(set(keys)), name
        # the file says what the lines said
        assert [(str(r["step"]), f"{r['loss']:.4f}") for r in steps] == step_losses(stdout)[-12:]
        printed = re.findall(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+) \| val bpb ([\d.]+)", stdout, re.M)
        logged = printed if name == "whole" else printed[:2] + printed[3:]  # the resumed run's eval at 8 replaced
        assert [(str(r["step"]), f"{r['train_loss']:.4f}", f"{r['val_loss']:.4f}", f"{r['val_bpb']:.4f}")
                for r in evals] == logged
        assert [r["tokens"] for r in steps] == [128 * s for s in range(1, 13)]
        assert all(r["clip_steps"] == 1 and r["clipped"] in (0, 1) and r["lr"] > 0 for r in steps)
        assert [r["step"] for r in records(out, "sample")] == [4, 8, 12]
        assert [r["step"] for r in records(out, "summary")] == ([12] if name == "whole" else [8, 12])
    # sampling (at 4 and 8) left the training bit-exact: the resumed run's losses are the uninterrupted run's
    assert step_losses(runs["pieces"][1]) == step_losses(runs["whole"][1])
    whole, pieces = records(runs["whole"][0], "step"), records(runs["pieces"][0], "step")
    assert [r["loss"] for r in whole] == [r["loss"] for r in pieces]
    assert [r["saved"] for r in records(runs["pieces"][0], "eval")] == [False, True, False, True]  # 8: logged again


@pytest.mark.slow
def test_step_eval_and_summary_lines(runs):
    out, stdout = runs["whole"]
    assert re.search(r"^model: [\d.]+K parameters \([\d.]+K non-embedding\), 2 layers, 32 wide, vocab 65; "
                     r"[\d.]+K FLOPs per token$", stdout, re.M)
    assert "batch: 128 tokens per step = 4 sequences x 32 tokens x 1 micro-steps x 1 process(es)" in stdout
    assert re.search(r"^horizon: 12 steps = 1.54K tokens, [\d.]+ tokens per parameter \(compute-optimal: ~20\), "
                     r"[\d.e+]+ FLOPs in all$", stdout, re.M)
    assert re.search(r"^device: cpu float32, compile off, 1 process\(es\), MFU against", stdout, re.M)
    assert re.search(r"^iter 12: loss [\d.]+, lr [\d.e+-]+, grad norm [\d.]+ \(clipped [01]/1\), [\d.]+ms, "
                     r"[\d,]+ tok/s, mfu [\d.]+% \| 12/12 \(100.0%\), [\dhms.]+ elapsed, eta [\dhms.]+$", stdout, re.M)
    assert re.search(r"^step 12: train loss [\d.]+, val loss [\d.]+ \| val bpb [\d.]+ \| best val loss [\d.]+ "
                     r"\((this eval|step \d+)\) \| (checkpoint saved|no checkpoint)$", stdout, re.M)
    assert re.search(r"^sample at step 12 \(20 tokens after '\\n', [\d.]+s\):\n(  > .*\n)+summary", stdout, re.M)
    assert re.search(r"^summary: 12 steps \(12 in this run\), 1.54K tokens seen, [\d.]+s wall time, "
                     r"peak memory [\d,.]+ MiB", stdout, re.M)
    assert re.search(r"^summary: best val loss [\d.]+ \([\d.]+ bits per byte\) at step \d+; \d+ doctor warning", stdout,
                     re.M)
    assert f"summary: sample with: python sample.py --out_dir={out}" in stdout
    summary = records(out, "summary")[0]
    assert summary["tokens"] == 12 * 128 and summary["peak_memory_bytes"] > 0


def warnings_of(stdout, out_dir):
    """The doctor's warnings, printed and kept, but throughput: that one depends on what else the machine runs."""
    printed = [w for w in re.findall(r"^warning: (.*)$", stdout, re.M) if not w.startswith("throughput")]
    kept = [r for r in records(out_dir, "warning") if r["check"] != "throughput"]
    assert printed == [r["message"] for r in kept]
    return kept


def test_compile_without_a_compiler_trains_uncompiled_and_says_why(char_data, tmp_path):
    """--compile=True on a CPU with no C++ compiler on PATH (nor CXX): the run trains eagerly, and its header says
    what is missing instead of the first step failing deep inside Inductor."""
    proc = run("train.py", *TINY, f"--dataset={char_data}", f"--out_dir={tmp_path / 'out'}", "--compile=True",
               "--max_iters=2", "--eval_interval=2", "--sample_interval=0",
               env={"PATH": str(tmp_path), "CXX": "no-such-compiler"})
    assert re.search(r"^device: cpu float32, compile off \(a CPU needs a C\+\+ compiler for it: install g\+\+ or "
                     r"set CXX\), 1 process", proc.stdout, re.M), proc.stdout
    assert "step 2: train loss" in proc.stdout


@pytest.mark.slow
def test_the_doctor_is_silent_on_healthy_runs(runs):
    for out, stdout in runs.values():
        assert warnings_of(stdout, out) == []


@pytest.mark.slow
def test_bits_per_byte_on_ascii_char_data_is_loss_over_ln2(runs, char_data):
    for r in records(runs["whole"][0], "eval"):
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-5)
    # directly: bytes per token scale bpb down, and tokens that stand for no bytes are left out
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=65, n_layer=1, n_head=2, n_embd=16))
    batches, ctx = Batches(char_data, 32, 4, "cpu"), autocast("cpu", "float32")
    ones = estimate_loss(model, batches, 3, ctx, token_bytes=torch.ones(65, dtype=torch.long))
    twos = estimate_loss(model, batches, 3, ctx, token_bytes=torch.full((65,), 2))
    assert ones["val_bpb"] == pytest.approx(ones["val"] / math.log(2), rel=1e-5)
    assert twos["val_bpb"] == pytest.approx(ones["val_bpb"] / 2, rel=1e-6)
    assert "val_bpb" not in estimate_loss(model, batches, 3, ctx)
    space = torch.ones(65, dtype=torch.long)
    space[1] = 0  # ' ' (id 1) as if it were a special token
    nats = nbytes = 0.0
    for k in range(3):
        X, Y = batches.get("val", k, stream=1)
        logits, _ = model(X, Y)
        losses = torch.nn.functional.cross_entropy(logits.view(-1, 65), Y.view(-1), reduction="none")
        keep = Y.view(-1) != 1
        nats, nbytes = nats + losses[keep].sum().item(), nbytes + keep.sum().item()
    assert estimate_loss(model, batches, 3, ctx, token_bytes=space)["val_bpb"] == pytest.approx(
        nats / nbytes / math.log(2), rel=1e-5)


@pytest.mark.slow
def test_loss_png_is_a_png(runs):
    from matplotlib.image import imread

    path = os.path.join(runs["pieces"][0], "loss.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # a picture, not a blank canvas
    assert not glob.glob(os.path.join(runs["pieces"][0], "*.tmp"))


# ----------------------------------------------------------------------------- the doctor

# the CPU preset's log lines, 2000 steps, val loss 1.92 (step, loss, grad norm, clipped of 50, tokens/s, elapsed s)
# from a 2-core CPU shared with other jobs: the throughput swings tenfold; from step ~650 every step is clipped
CPU_PRESET_STEPS = [
    (50, 2.8749, 1.214, 50, 2291, 27.4), (100, 2.5455, 0.9, 35, 2192, 44.9), (150, 2.523, 1.063, 26, 2132, 62.9),
    (200, 2.4936, 0.934, 30, 762, 113.3), (250, 2.3755, 0.994, 25, 371, 216.9), (300, 2.4171, 0.938, 36, 2054, 251.8),
    (350, 2.394, 1.166, 37, 1515, 277.1), (400, 2.3015, 0.987, 32, 1869, 297.7), (450, 2.3885, 1.156, 42, 2640, 312.2),
    (500, 2.3677, 1.051, 35, 2321, 328.7), (550, 2.2509, 1.066, 36, 2319, 354.7), (600, 2.2274, 1.216, 48, 2600, 369.5),
    (650, 2.1645, 1.325, 49, 2651, 383.9), (700, 2.2586, 1.586, 50, 2384, 400.1), (750, 2.158, 1.354, 50, 2233, 417.2),
    (800, 2.1737, 1.561, 50, 1843, 447.0), (850, 1.998, 1.247, 50, 2553, 462.0), (900, 2.0886, 1.487, 50, 2423, 477.9),
    (950, 2.0329, 1.446, 50, 2342, 494.3), (1000, 2.0629, 1.643, 50, 4626, 502.6),
    (1050, 2.0067, 1.639, 50, 21257, 505.1), (1100, 1.9757, 1.773, 50, 21511, 506.8),
    (1150, 1.9512, 1.541, 50, 22238, 508.6), (1200, 2.0031, 1.485, 50, 20840, 510.4),
    (1250, 1.9103, 1.546, 50, 21442, 512.2), (1300, 1.8897, 1.658, 50, 21987, 514.6),
    (1350, 1.93, 1.599, 50, 19471, 516.6), (1400, 1.7147, 1.746, 50, 21027, 518.4),
    (1450, 1.8262, 1.606, 50, 21137, 520.2), (1500, 1.9004, 1.848, 50, 21184, 522.1),
    (1550, 1.7872, 1.653, 50, 21653, 524.5), (1600, 1.7504, 1.854, 50, 20803, 526.4),
    (1650, 1.7722, 1.703, 50, 20743, 528.2), (1700, 1.8123, 1.829, 50, 20845, 530.1),
    (1750, 1.7615, 1.801, 50, 21298, 531.9), (1800, 1.7455, 1.885, 50, 21249, 534.3),
    (1850, 1.8033, 1.848, 50, 20665, 536.2), (1900, 1.7642, 1.836, 50, 7330, 541.4),
    (1950, 1.7744, 1.919, 50, 1230, 572.7), (2000, 1.7585, 2.042, 50, 1631, 596.2),
]
CPU_PRESET_EVALS = [
    (0, 4.1681, 4.1686), (250, 2.4162, 2.436), (500, 2.2732, 2.3158), (750, 2.1156, 2.1841), (1000, 2.017, 2.1137),
    (1250, 1.9189, 2.0291), (1500, 1.8541, 1.9762), (1750, 1.809, 1.9401), (2000, 1.7845, 1.9204),
]


def feed(doctor, losses, start=1, **kw):
    return [w for i, loss in enumerate(losses) for w in doctor.step(start + i, loss, **kw)]


def healthy_losses(n, ln_vocab=math.log(65)):
    """A loss curve falling from ln(vocab) to ~1.5, with batch noise."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n, generator=g) * 0.08
    return [1.5 + (ln_vocab - 1.5) * math.exp(-i / 60) + float(noise[i]) for i in range(n)]


def test_doctor_stays_silent_on_a_healthy_run():
    d = Doctor(65, warmup_iters=100, grad_clip=1.0, quiet_steps=250)
    warnings = []
    for i, loss in enumerate(healthy_losses(2000)):
        step = i + 1
        grad_norm = 1.0 + step / 2000  # clipping at every step as the norms grow, as the CPU preset does
        warnings += d.step(step, loss, clipped=int(step > 500 or step % 3 == 0), grad_norm=grad_norm,
                           tok_per_s=18000 * (1 + 0.3 * (step % 7 == 0)), elapsed=step * 0.043)
        if step % 250 == 0:
            warnings += d.eval(step, loss + 0.02, loss + 0.08)
    assert warnings == []


def test_doctor_stays_silent_on_the_cpu_preset():
    """The numbers of a real healthy run of config/train_shakespeare_char_cpu.py, replayed."""
    d = Doctor(65, warmup_iters=100, grad_clip=1.0, quiet_steps=250)
    evals = {step: (train, val) for step, train, val in CPU_PRESET_EVALS}
    warnings = d.eval(0, *evals[0])
    for step, loss, grad_norm, clipped, tok_per_s, elapsed in CPU_PRESET_STEPS:
        warnings += d.step(step, loss, 50, clipped, grad_norm, tok_per_s, elapsed)
        if step in evals:
            warnings += d.eval(step, *evals[step])
    assert warnings == []


def test_doctor_warns_once_per_symptom():
    d = Doctor(65, warmup_iters=10, quiet_steps=1000)
    checks = [c for c, _ in feed(d, [math.log(65) + 0.01] * 60)]
    assert checks == ["not_learning"]  # once, at step 10 + 20, not at every step after

    d = Doctor(65)
    warnings = feed(d, [2.0, 1.9, 1.95, 1.9, 7.5, 1.9, 8.0])
    assert [c for c, _ in warnings] == ["spike"] and "3.9x its recent mean" in warnings[0][1]
    d = Doctor(65, quiet_steps=2)
    assert [c for c, _ in feed(d, [2.0, 1.9, 1.95, 1.9, 7.5, 1.9, 8.0])] == ["spike", "spike"]

    d = Doctor(65)
    assert feed(d, [2.0, 1.9], skipped_total=0) == []
    warnings = d.step(3, float("nan"), skipped_total=1) + d.step(4, float("nan"), skipped_total=2)
    assert [c for c, _ in warnings] == ["non_finite"] and "--dtype=bfloat16" in warnings[0][1]

    d = Doctor(65)
    evals = [(2.0, 2.1), (1.8, 1.95), (1.6, 1.97), (1.5, 1.99), (1.4, 2.05)]
    checks = [c for i, (t, v) in enumerate(evals) for c, _ in d.eval(250 * i, t, v)]
    assert checks == ["overfitting"]  # at the third eval in a row with val rising, once
    d = Doctor(65)  # val rising with train rising too is not overfitting (a bad lr, say)
    assert [w for i, (t, v) in enumerate([(2.0, 2.1), (2.1, 2.2), (2.2, 2.3)]) for w in d.eval(i, t, v)] == []

    d = Doctor(65, warmup_iters=10, grad_clip=1.0)
    assert feed(d, [2.0] * 100, clipped=1, grad_norm=6.0) == []  # up to step 100: only 90 steps after warmup
    warnings = feed(d, [2.0] * 50, start=101, clipped=1, grad_norm=6.0)
    assert [c for c, _ in warnings] == ["clipping"] and "100 of the last 100 steps, at norms around 6" in warnings[0][1]
    d = Doctor(65, warmup_iters=10, grad_clip=1.0)  # clipped on 80% of the steps: fine
    assert [w for s in range(10, 500, 10) for w in d.step(s, 2.0, steps=10, clipped=8, grad_norm=6.0)] == []
    d = Doctor(65, warmup_iters=10, grad_clip=1.0)  # on every step, but at twice grad_clip: fine (the CPU preset)
    assert [w for s in range(10, 500, 10) for w in d.step(s, 2.0, steps=10, clipped=10, grad_norm=2.0)] == []

    d = Doctor(65)
    rates = [20000.0] * 100 + [6000.0] * 40  # a line a second; then a third of the throughput
    warnings = [w for i, r in enumerate(rates) for w in d.step(i + 1, 2.0, tok_per_s=r, elapsed=float(i))]
    assert [c for c, _ in warnings] == ["throughput"] and "from 20,000 to 6,000 tokens/s" in warnings[0][1]
    d = Doctor(65)  # a few slow lines (an eval, a checkpoint, a neighbour's burst) are not a trend
    rates = [20000.0] * 100 + [6000.0] * 5 + [20000.0] * 30
    assert [w for i, r in enumerate(rates) for w in d.step(i + 1, 2.0, tok_per_s=r, elapsed=float(i))] == []


def test_doctor_in_train_py(char_data, tmp_path):
    """lr ~0: not learning; a huge lr: a spike, then divergence. Each said once, in one line, and kept."""
    still = train(char_data, tmp_path / "still", "--learning_rate=1e-9", "--min_lr=1e-10", "--max_iters=25",
                  "--eval_interval=1000", "--sample_interval=0").stdout
    warnings = warnings_of(still, tmp_path / "still")
    assert [w["check"] for w in warnings] == ["not_learning"] and warnings[0]["step"] == 22
    assert re.match(r"loss 4\.1\d\d at step 22 is still about ln\(vocab_size\) = 4\.174 \(a uniform guess\) after "
                    r"warmup: the model is not learning", warnings[0]["message"])

    wild = train(char_data, tmp_path / "wild", "--learning_rate=1.0", "--max_iters=25", "--eval_interval=1000",
                 "--sample_interval=0").stdout
    checks = [w["check"] for w in warnings_of(wild, tmp_path / "wild")]
    assert "spike" in checks and len(checks) == len(set(checks))
    assert re.search(r"^warning: loss spiked to [\d.]+ at step \d+, [\d.]+x its recent mean", wild, re.M)


# ----------------------------------------------------------------------------- wandb

def wandb_records(path):
    """The records of a .wandb file (LevelDB-style log of wandb's protobuf Records), with wandb's own protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk = open(path, "rb").read(), 7, b""  # header: ':W&B', magic, version
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


@pytest.mark.slow
def test_wandb_offline_logs_the_metrics_and_a_resume_continues_the_run(char_data, tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    args = ["--wandb_log=True", "--eval_interval=2", "--lr_decay_iters=6", "--sample_interval=2", "--sample_tokens=5"]
    train(char_data, tmp_path / "out", *args, "--max_iters=4", env=env)
    run_id = checkpoint.load(str(tmp_path / "out" / "ckpt.pt"))["wandb_run_id"]
    train(char_data, tmp_path / "out", *args, "--max_iters=6", "--init_from=resume", env=env)
    assert checkpoint.load(str(tmp_path / "out" / "ckpt.pt"))["wandb_run_id"] == run_id

    files = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb")))
    assert len(files) == 2 and all(os.path.basename(f) == f"run-{run_id}.wandb" for f in files)
    history, config = [], {}
    for path in files:
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                assert r.run.run_id == run_id
                config.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
            elif kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    assert config["max_iters"] in (4, 6) and config["wandb_log"] is True
    steps = [h for h in history if "step/loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3, 4, 5, 6]
    assert [h["step/loss"] for h in steps] == [r["loss"] for r in records(tmp_path / "out", "step")]
    evals = [h for h in history if "eval/val_bpb" in h]
    assert [h["step"] for h in evals] == [0, 2, 4, 4, 6]  # the resumed run evaluates its first step again
    assert evals[-1]["eval/val_loss"] == records(tmp_path / "out", "eval")[-1]["val_loss"]
    assert [h["step"] for h in history if "sample/text" in h] == [2, 4, 6]
