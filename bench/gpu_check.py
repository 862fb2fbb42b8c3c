"""
What this repo does on a GPU, in one command and one markdown table, in under 8 minutes on one CUDA GPU:

    python bench/gpu_check.py                    # on the GPU (cuda)
    python bench/gpu_check.py --device=cpu       # a dry run at tiny shapes, in ~1 minute (tests/test_gpu_check.py)
    python bench/gpu_check.py --only=gpt2,sample # some of the rows

Rows (each a command a user can rerun, in a process of its own with a time limit, so a failure or a hang costs its
own row only):
    tests    the device tests: pytest tests/test_device.py --device=cuda (generation, the Decoder with CUDA graphs,
             training in float32 / bfloat16 / float16 with the grad scaler, the compiled step, train.py, sample.py)
    preset   the GPU Shakespeare preset's time to val loss 1.47 (nanoGPT's 1.4697 after its 5,000 steps)
    gpt2     GPT-2 124M's training step compiled in bfloat16: ms/iter, tokens/s, MFU (bench.py)
    float16  the same step in float16 with the grad scaler (uncompiled: its own cost, no second compile; a dry
             run times float32, as a CPU refuses float16)
    fsdp     FSDP2 in one process (a 1-rank process group): the same losses as without it, the full state gathered
    sample   decoding tokens/s at batch 1 and 16 against transformers (bench/decode.py)

The preset needs data/shakespeare_char prepared: it is prepared here from --input, $TINY_SHAKESPEARE or
data/shakespeare_char/input.txt when one exists (no network), else the row says how. Runs on torch 2.11+ (CUDA 12
or 13) and needs no datasets or wandb. --check=NAME runs one check in this process (what each row runs for fsdp).
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configurator import ConfigError, configure  # noqa: E402

# ----------------------------------------------------------------------------- settings
device = "cuda"  # cuda (cuda:N), or cpu for a dry run at tiny shapes
only = ""  # comma-separated rows to run (tests, preset, gpt2, float16, fsdp, sample); '': all
input = ""  # tiny Shakespeare's input.txt, to prepare data/shakespeare_char for the preset row if it is not prepared
dataset = ""  # the preset row's prepared character-level dataset; '': data/shakespeare_char
budget = 480.0  # seconds for the whole check: a row that would end later is cut short (its limit is what is left)
check = ""  # run this one check here and print its result (the rows of the fsdp check run this way)
# -----------------------------------------------------------------------------
ROWS = ("tests", "preset", "gpt2", "float16", "fsdp", "sample")
LIMITS = {"tests": 110, "preset": 140, "gpt2": 100, "float16": 30, "fsdp": 25, "sample": 90}  # seconds on a GPU
TARGET = 1.47


def commands(dry, out_dir):
    """Each row's command; a dry run (on the cpu) at tiny shapes. The preset's checkpoints go to out_dir."""
    py, dev = sys.executable, f"--device={device}"
    tiny = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=2"]
    tiny_bench = [*tiny, "--vocab_size=256", "--num_steps=2", "--warmup_steps=1", "--compile=False", "--dtype=float32"]
    gpt2 = [py, "bench.py", "config/train_gpt2.py", dev, "--gradient_accumulation_steps=1"]
    return {
        "tests": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_device.py", dev],
        "preset": [py, "train.py", "config/train_shakespeare_char.py", dev, f"--out_dir={out_dir}", "--max_seconds=125",
                   *([f"--dataset={dataset}"] if dataset else []),
                   *([*tiny, "--max_iters=30", "--eval_interval=10", "--eval_iters=2", "--warmup_iters=2",
                      "--compile=False", "--target_val_loss=4.1"] if dry else [f"--target_val_loss={TARGET}"])],
        "gpt2": [*gpt2, *(tiny_bench if dry else ["--batch_size=16", "--dtype=bfloat16", "--compile=True",
                                                  "--num_steps=20", "--warmup_steps=10"])],
        "float16": [*gpt2, *(tiny_bench if dry else ["--batch_size=16", "--dtype=float16", "--compile=False",
                                                     "--num_steps=10", "--warmup_steps=3"])],
        "fsdp": [py, os.path.abspath(__file__), dev, "--check=fsdp"],
        "sample": [py, "bench/decode.py", dev, *(["--models=char-gpt2", "--batch_sizes=1", "--max_new_tokens=8",
                                                   "--compile=False", "--rounds=1", "--compare_hf=False"] if dry else
                                                 ["--models=gpt2", "--batch_sizes=1,16", "--max_new_tokens=128",
                                                  "--rounds=2"])],
    }


def summarize(name, out):
    """The row's result, from the command's output."""
    lines = out.strip().splitlines()
    if name == "tests":
        return next((ln.strip("= ") for ln in reversed(lines) if re.search(r"\d+ (passed|failed)", ln)), None)
    if name == "preset":
        reached = re.search(r"reached target_val_loss=\S+ at iter (\d+): val loss ([\d.]+), ([\d.]+)s after", out)
        if reached:
            return f"val {reached[2]} at iter {reached[1]}, {reached[3]} s after the run started"
        best = re.search(r"best val loss ([\d.]+).*? at step ([\d,]+)", out)
        return f"not reached: best val {best[1]} at iter {best[2]}" if best else None
    if name in ("gpt2", "float16"):
        bench = next((ln[len("bench: "):] for ln in lines if ln.startswith("bench: ")), None)
        loss = next((ln for ln in lines if ln.startswith("loss: ")), "")
        return f"{bench}; {loss}" if bench else None
    if name == "fsdp":
        return next((json.loads(ln[len("RESULT "):]) for ln in lines if ln.startswith("RESULT ")), None)
    if name == "sample":
        rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| model")]
        return "<br>".join(" / ".join(c.strip() for c in row.strip("|").split("|")) for row in rows) or None
    return None


def run_row(name, cmd, limit):
    """(result, ok, seconds): the command run from the repo root, killed with its children after `limit` s."""
    t0 = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"TINY_SHAKESPEARE": os.path.abspath(input)} if input else {})}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)  # (the device tests' train.py and sample.py need the text)
    try:
        out, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return f"TIMED OUT after {limit:.0f} s; last line: {tail(out)}", False, time.time() - t0
    result = summarize(name, out)
    ok = proc.returncode == 0 and result is not None and "failed" not in str(result)
    if not ok:
        result = f"FAILED (exit {proc.returncode}): {result or tail(out)}"
    return result, ok, time.time() - t0


def tail(out):
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    return lines[-1][:300].replace("|", "/") if lines else "(no output)"


def prepare_shakespeare():
    """None when data/shakespeare_char is ready (prepared here from a local input.txt if need be), else why not."""
    data = os.path.join(REPO, "data", "shakespeare_char")
    if all(os.path.exists(os.path.join(data, f)) for f in ("train.bin", "val.bin", "meta.json")):
        return None
    for path in (input, os.environ.get("TINY_SHAKESPEARE", ""), os.path.join(data, "input.txt")):
        if path and os.path.isfile(path):
            subprocess.run([sys.executable, os.path.join(data, "prepare.py"), f"--input={path}"], cwd=REPO,
                           check=True, capture_output=True)
            return None
    return ("skipped: data/shakespeare_char is not prepared and there is no input.txt: pass --input=input.txt "
            "(or run python data/shakespeare_char/prepare.py where there is a network)")


def fsdp_check():
    """FSDP2 on a 1-rank process group against the same model without it: the same losses (to bfloat16 rounding on a
    GPU), and the full state gathered as train.py saves it."""
    import socket

    import torch
    import torch.distributed as dist

    from lib import parallel
    from lib.runtime import setup
    from lib.step import train_step
    from model import GPT, GPTConfig

    rt = setup(device, "float32" if device == "cpu" else "bfloat16")
    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    size = dict(n_layer=2, n_head=2, n_embd=64, block_size=64) if device == "cpu" else \
        dict(n_layer=4, n_head=8, n_embd=512, block_size=256)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(512, (8, size["block_size"] + 1), generator=g).to(rt.device) for _ in range(10)]

    class Fixed:  # lib.batches' interface over fixed random batches
        def get(self, split, step, micro_step=0):
            return data[step][:, :-1], data[step][:, 1:]

        def prefetch(self, *args):
            pass

    losses = {}
    for mode in ("plain", "fsdp"):
        if mode == "fsdp":
            dist.init_process_group("nccl" if rt.device_type == "cuda" else "gloo")
        torch.manual_seed(0)
        gpt = GPT(GPTConfig(vocab_size=512, bias=False, **size)).to(rt.device)
        model = parallel.wrap(gpt, rt, mode if mode == "fsdp" else "ddp", compile=False)
        opt = gpt.configure_optimizers(0.1, 1e-3, (0.9, 0.95), rt.device_type)
        scaler = torch.amp.GradScaler(rt.device_type, enabled=False)
        losses[mode] = [train_step(model, opt, scaler, Fixed(), step, 1, rt.autocast, 1.0)[0].item()
                        for step in range(len(data))]
        if mode == "fsdp":
            model_sd, optim_sd = parallel.full_state(gpt, opt, fsdp=True)
            dist.destroy_process_group()
    tolerance = 1e-4 if device == "cpu" else 2e-2
    same = all(abs(a - b) < tolerance for a, b in zip(losses["plain"], losses["fsdp"]))
    result = (f"loss after {len(data)} steps {losses['fsdp'][-1]:.4f} (without FSDP {losses['plain'][-1]:.4f}): "
              f"{'the same' if same else 'DIFFERENT'}; full state gathered: {len(model_sd)} tensors, optimizer "
              f"state of {len(optim_sd['state'])} parameters")
    print("RESULT " + json.dumps(result if same and model_sd else f"failed: {result}"))


def environment():
    import torch

    where = (f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}" if device.startswith("cuda")
             and torch.cuda.is_available() else device)
    return f"{where}, torch {torch.__version__}, Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M')}"


def main():
    try:
        configure(globals(), sys.argv[1:])
    except ConfigError as e:  # (no torch here for runtime's error hook: this process only starts the rows)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if check:
        return {"fsdp": fsdp_check}[check]()
    dry = device == "cpu"
    names = [n for n in ROWS if not only or n in only.split(",")]
    print(f"gpu_check on {environment()}{' (a dry run at tiny shapes)' if dry else ''}", flush=True)
    scratch = tempfile.TemporaryDirectory(prefix="gpu_check_")  # the preset's checkpoints, deleted at the end
    cmds, rows, start = commands(dry, scratch.name), [], time.time()
    for name in names:
        left = budget - (time.time() - start)
        skip = prepare_shakespeare() if name == "preset" and not dataset else None
        if skip or left < 5:
            result, ok, seconds = skip or "skipped: the time budget is spent", True, 0.0
        else:
            result, ok, seconds = run_row(name, cmds[name], min(left, 600 if dry else LIMITS[name]))
        shown = " ".join("python" if c == sys.executable else "--out_dir=TMP" if c.startswith("--out_dir=") else c
                         for c in cmds[name]).replace(REPO + "/", "")
        rows.append(f"| {name} | `{shown}` | {result} | {seconds:.0f} |")
        print(f"{name}: {'ok' if ok else 'FAILED'} in {seconds:.0f} s", flush=True)
    print(f"\n| check | command | result | seconds |\n|---|---|---|---|\n" + "\n".join(rows))
    print(f"\n{environment()}; {time.time() - start:.0f} s in all")
    scratch.cleanup()
    return 0 if all("FAILED" not in r and "TIMED OUT" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
