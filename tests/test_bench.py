"""bench.py as a user runs it: a train config, a tiny model on CPU, synthetic and real data, the profiler, a bad setting."""

import gzip
import json
import math
import os
import re

import pytest

from conftest import run
from lib.runtime import pick_dtype, why_not_compile

AUTO = pick_dtype("auto", "cpu")  # bfloat16 on CPUs with native bfloat16, else float32
PRESET_COMPILE = f"off ({why_not_compile('cpu')})" if why_not_compile("cpu") else "on"  # the CPU preset compiles

TINY_BENCH = ["--device=cpu", "--dtype=float32", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32",
              "--block_size=32", "--batch_size=4", "--warmup_steps=2", "--num_steps=8", "--learning_rate=1e-2",
              "--dataset=", "--gradient_accumulation_steps=1"]
SUMMARY = re.compile(r"bench: ([\d.]+) ms/iter, ([\d,]+) tokens/s, mfu ([\d.]+)%, peak memory ([\d.]+) MiB \((.+)\)")
LOSS = re.compile(r"^loss: first ([\d.]+), final ([\d.]+)$", re.M)


def parse(stdout):
    """(ms/iter, tokens/s, mfu %, peak MiB, first loss, final loss) from bench.py's output; the summary is last."""
    last = stdout.strip().splitlines()[-1]
    summary, loss = SUMMARY.fullmatch(last), LOSS.search(stdout)
    assert summary and loss, stdout
    ms, tok_s, mfu, mib = float(summary[1]), int(summary[2].replace(",", "")), float(summary[3]), float(summary[4])
    return ms, tok_s, mfu, mib, float(loss[1]), float(loss[2])


def check_rates(ms, tok_s, tokens_per_iter):
    """tokens/s must be tokens_per_iter / (ms/iter), allowing for both numbers' printed rounding."""
    assert ms > 0
    low = tokens_per_iter / ((ms + 0.005) / 1000) - 0.5
    high = tokens_per_iter / ((ms - 0.005) / 1000) + 0.5 if ms > 0.005 else math.inf
    assert low <= tok_s <= high, (ms, tok_s, tokens_per_iter)


def test_synthetic_data_with_accumulation():
    proc = run("bench.py", *TINY_BENCH, "--vocab_size=256", "--gradient_accumulation_steps=2", "--dataset=no_such_data")
    out = proc.stdout
    assert "no_such_data is not prepared: timing synthetic tokens (vocab 256)" in out, out
    assert "cpu float32 | compile off | 256 tokens per iteration | synthetic tokens (vocab 256)" in out, out
    ms, tok_s, mfu, mib, first, final = parse(out)
    check_rates(ms, tok_s, 4 * 32 * 2)
    assert mfu >= 0 and mib > 0
    assert "peak RSS" in out.strip().splitlines()[-1]
    assert abs(first - math.log(256)) < 0.1, out  # an untrained model is ~uniform over the vocabulary
    assert final < first - 0.2, out  # the Zipf-distributed tokens are learnable: it trains


@pytest.mark.slow
@pytest.mark.xdist_group("inductor")  # after (or before) test_model's compile of the same kernels, on the same worker
def test_no_config_on_a_cpu_times_the_cpu_preset_as_it_trains(char_data):
    """The CPU preset's shapes, batch, data and torch.compile, as train.py would run them (fewer steps). Naming the
    config (bench.py config/train_shakespeare_char_cpu.py) reads the same file, as the first line says."""
    # on 2 threads, as test_model's compile test: the same kernels, compiled once (Inductor caches them on disk)
    proc = run("bench.py", f"--dataset={char_data}", "--warmup_steps=1", "--num_steps=2", env={"OMP_NUM_THREADS": "2"})
    out = proc.stdout
    assert "no config given and no GPU: timing config/train_shakespeare_char_cpu.py" in out
    assert f"0.79M parameters | cpu {AUTO} | compile {PRESET_COMPILE} | 768 tokens per iteration" in out, out  # 12 x 64 x 1
    assert f"{char_data} (vocab 65)" in out
    ms, tok_s, mfu, mib, _, _ = parse(out)
    check_rates(ms, tok_s, 12 * 64)
    print(out.strip().splitlines()[-1])  # the figures, for the log; no timing is asserted


def test_real_data_in_float32_and_cpu_bfloat16(char_data):
    """Real data: the loss starts at ln(vocab) and falls. bfloat16 autocast on the CPU (attention written out in
    bfloat16 there, kernels.attention): the loss falls as in float32. At TINY_BENCH's lr of 1e-2 the preset's AdamW
    makes single-step losses jump by 0.1 from step 10 on in float32 itself, and the two dtypes' last losses land apart
    by that much; at 3e-3 the training is smooth."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        out = run("bench.py", *TINY_BENCH, f"--dataset={char_data}", f"--dtype={dtype}", "--num_steps=20",
                  "--learning_rate=3e-3").stdout
        assert f"cpu {dtype} | compile off | 128 tokens per iteration | {char_data} (vocab 65)" in out, out
        ms, tok_s, _, _, first, final = parse(out)
        check_rates(ms, tok_s, 4 * 32)
        losses[dtype] = first, final
    (first32, final32), (first16, final16) = losses["float32"], losses["bfloat16"]
    assert abs(first32 - math.log(65)) < 0.2 and final32 < first32 - 0.5, losses
    assert abs(first16 - first32) < 0.02 and final16 < first16 - 0.5, losses
    assert abs(final16 - final32) < 0.05, losses  # the same training, up to bfloat16 rounding


def test_profile_writes_a_trace(tmp_path):
    profile_dir = tmp_path / "prof"
    proc = run("bench.py", *TINY_BENCH, "--vocab_size=256", "--warmup_steps=1", "--profile=True",
               f"--profile_dir={profile_dir}")
    traces = [p for p in profile_dir.iterdir() if p.name.endswith((".json", ".json.gz"))]
    assert len(traces) == 1, list(profile_dir.iterdir())
    trace = traces[0]
    assert f"trace written to {trace}" in proc.stdout, proc.stdout
    assert trace.stat().st_size > 0
    opener = gzip.open if trace.name.endswith(".gz") else open
    with opener(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    assert any("aten::mm" in e.get("name", "") for e in events)
    assert "Self CPU" in proc.stdout and "aten::mm" in proc.stdout  # the top-ops table


AGAINST = re.compile(r"against (.+): ([\d.]+) ms/iter \(its loss: first ([\d.]+), final ([\d.]+)\)\n"
                     r"against \1: (?:this model.py|this run) takes ([\d.]+)x its time per step \(median of (\d+) rounds")


def test_against_times_another_model_py_in_turns(tmp_path):
    """--against: the same training with another model.py, timed in alternating rounds; the ratio is this/other."""
    with open(os.path.join(os.path.dirname(__file__), "..", "model.py")) as f:
        source = f.read()
    marker = "        B, T = idx.size()\n"
    assert source.count(marker) == 1
    slow = tmp_path / "slow_model.py"  # the same model, 10 ms slower per forward pass
    slow.write_text(source.replace(marker, marker + "        __import__('time').sleep(0.01)\n"))
    out = run("bench.py", *TINY_BENCH, "--vocab_size=256", "--num_steps=3", f"--against={slow}", "--rounds=3").stdout
    m = AGAINST.search(out)
    assert m and m[1] == str(slow) and m[6] == "3", out
    assert float(m[5]) < 0.9, out  # this model.py skips the 10 ms sleep: far faster whatever the machine
    _, _, _, _, first, final = parse(out.split("\nagainst ")[0])
    assert (float(m[3]), float(m[4])) == (first, final), out  # same seed, same batches, same arithmetic


def test_against_settings_times_this_model_py_with_them():
    """--against="--key=value ...": this model.py with other model or optimizer settings, timed in turns (here a far
    bigger model, so far slower); settings the two runs must share (the batches) are refused in one line."""
    other = "--n_layer=4 --n_embd=128 --optimizer=muon"
    out = run("bench.py", *TINY_BENCH, "--vocab_size=256", "--num_steps=3", f"--against={other}", "--rounds=3").stdout
    m = AGAINST.search(out)
    assert m and m[1] == other and m[6] == "3", out
    assert f"warmup steps with {other}" in out, out
    assert float(m[5]) < 0.9, out  # 2 layers of 32 against 4 of 128
    _, _, _, _, first, _ = parse(out.split("\nagainst ")[0])
    assert float(m[3]) != first, out  # the other run is another model: another initial loss
    proc = run("bench.py", *TINY_BENCH, "--against=--batch_size=8", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "only the model and optimizer" in lines[0], proc.stderr


def test_against_a_model_py_without_a_setting_is_one_line(tmp_path):
    with open(os.path.join(os.path.dirname(__file__), "..", "model.py")) as f:
        source = f.read()
    old = tmp_path / "old_model.py"  # a model.py from before rotary embeddings
    old.write_text(source.replace("    rotary: bool = False", ""))
    for against, expected in ((old, "rotary"), ("no_such_revision", "no model.py at that revision")):
        proc = run("bench.py", *TINY_BENCH, f"--against={against}", check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
        assert expected in lines[0], proc.stderr


def test_bad_setting_is_one_line():
    proc = run("bench.py", "--n_layers=2", check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "n_layer" in lines[0], proc.stderr


PAGE_FAULTS_PER_STEP = """
import resource, sys
import torch
from lib import optim, runtime
from model import GPT, GPTConfig
from lib.step import train_step
from lib.batches import Batches

if sys.argv[1] == "setup":
    runtime.setup("cpu", "float32")  # what train.py, bench.py and sample.py call first
settings = dict(optim.RECIPES["modern"])
optimizer, _ = settings.pop("optimizer"), settings.pop("lr_schedule")
model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, **settings))
opt = optim.create(model, optimizer, 1e-3, 0.1, (0.9, 0.99), "cpu")
batches = Batches(sys.argv[2], 64, 12, "cpu", 1337)
scaler = torch.amp.GradScaler("cpu", enabled=False)
ctx = runtime.autocast("cpu", "float32")  # (bfloat16, where a CPU has it, allocates the same way)
for it in range(15):
    if it == 5:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    train_step(model, opt, scaler, batches, it, 1, ctx, 1.0)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.slow
def test_cpu_training_steps_reuse_freed_memory(char_data):
    """After runtime.setup on a CPU, a training step gets its activations' memory from the steps before it, not as
    fresh pages from the kernel (glibc's default there: hundreds of page faults per step at the CPU preset's shapes)."""
    import subprocess
    import sys

    from conftest import REPO

    def faults_per_step(mode):
        proc = subprocess.run([sys.executable, "-c", PAGE_FAULTS_PER_STEP, mode, char_data], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return float(proc.stdout.split()[-1])

    default, kept = faults_per_step("default"), faults_per_step("setup")
    print(f"page faults per training step: {default:.0f} by glibc's default, {kept:.0f} after runtime.setup")
    if sys.platform.startswith("linux"):
        assert kept < default / 10  # (the few left: the memory-mapped data file's pages)
