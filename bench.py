"""
Time the training step a config trains (forward, backward, optimizer), through exactly the code train.py runs:
step.train_step, with train.py's settings, config files and overrides.

    python bench.py config/train_shakespeare_char_cpu.py                # what that config trains, on its data
    python bench.py config/train_gpt2.py --batch_size=16 --compile=True  # any train config, any override
    python bench.py                          # GPT-2 124M (train.py's defaults) on a GPU; the CPU preset on a CPU
    python bench.py config/train_shakespeare_char.py --profile=True     # a torch.profiler trace and the top ops
    python bench.py config/train_shakespeare_char_cpu.py --against=HEAD  # is my edited model.py faster than HEAD's?
    python bench.py config/train_shakespeare_char_cpu.py --against="--qk_norm=True"  # what does QK-norm cost?

The data is the config's dataset when it is prepared, else synthetic tokens (--vocab_size of them, a note says so).
The last line is the result: `bench: 12.34 ms/iter, 45,678 tokens/s, mfu 12.3%, peak memory 456.7 MiB (...)`.
With --against, the step of this model.py and of the other one (or of this one with other settings) are timed in
turns in one process, and the last line is their ratio: a machine whose speed drifts by 20% between runs still shows
a 5% change.
"""

import builtins
import importlib
import os
import shlex
import statistics
import subprocess
import sys
import time
import types

import numpy as np
import torch

import model as model_py
from configurator import configure, script_settings
from lib import optim
from lib.batches import SPLITS, TRAIN_STEP, Batches, dataset_dir
from lib.checkpoint import RECIPE_KEYS
from lib.runtime import (UserError, can_compile, compile_model, install_error_hook, peak_flops, setup, synchronize,
                         why_not_compile)
from lib.step import seed_iteration, train_step

REPO = os.path.dirname(os.path.abspath(__file__))
CPU_DEFAULT = "config/train_shakespeare_char_cpu.py"  # GPT-2 124M takes seconds per step on a CPU: time this there
GPT2_SHAPES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
               "gpt2-xl": (48, 25, 1600)}  # (n_layer, n_head, n_embd) of a finetuning config's init_from

# ----------------------------------------------------------------------------- settings
globals().update(script_settings(os.path.join(REPO, "train.py")))  # train.py's, with its defaults
vocab_size = 50304  # of the synthetic tokens, used when the dataset is not prepared (or --dataset='')
warmup_steps = 10  # steps run before timing (compilation, allocator and cache warmup)
num_steps = 20  # timed steps
profile = False  # instead of timing, record a few steps with torch.profiler and print the top ops
profile_dir = "bench_profile"  # where the profiler's trace (Chrome / Perfetto JSON) goes
against = ""  # a git revision (HEAD, main~3), a path to another model.py, or "--key=value ...": time both in turns
rounds = 10  # with against: timed rounds, num_steps of each model per round, the order alternating
# -----------------------------------------------------------------------------
install_error_hook()
DEFAULTS = dict(globals())  # (configure picks the settings out of a script's globals)
# what --against="--key=value ..." may change: the model and the optimizer, not the batches both runs share
AGAINST_KEYS = {"recipe", "n_layer", "n_head", "n_embd", "bias", "dropout", "optimizer", "learning_rate",
                "weight_decay", "beta1", "beta2", "muon_lr", "muon_momentum", *RECIPE_KEYS}


def resolve(argv):
    """The settings of a run with these arguments, as train.py resolves them: defaults, config files, overrides, then
    the recipe's settings for what the config and command line did not set."""
    settings, explicit = configure(dict(DEFAULTS), argv)
    return {**settings, **optim.recipe_settings(settings["recipe"], explicit)}


argv = sys.argv[1:]
if not any(not a.startswith("-") for a in argv) and not torch.cuda.is_available() and "--device=cuda" not in argv:
    print(f"no config given and no GPU: timing {CPU_DEFAULT} (name a config to time another)")
    argv = [os.path.join(REPO, CPU_DEFAULT), *argv]
globals().update(resolve(argv))

rt = setup(device, dtype)
device, device_type, dtype, ctx = rt.device, rt.device_type, rt.dtype, rt.autocast


class SyntheticBatches:
    """Random tokens made on the device, with Batches' interface. Zipf-distributed like text's, so loss can fall."""

    def __init__(self, vocab_size, block_size, batch_size, device, seed):
        self.vocab_size, self.device, self.seed = vocab_size, device, seed
        self.block_size, self.batch_size = block_size, batch_size
        self.weights = 1.0 / torch.arange(1, vocab_size + 1, device=device)  # token k has frequency ~ 1/k
        self.generator = torch.Generator(device=device)

    def prefetch(self, split, step, micro_step=0):
        pass  # made on the device: nothing to prepare ahead

    def get(self, split, step, micro_step=0, stream=TRAIN_STEP):
        key = [self.seed, SPLITS.index(split), stream, step, micro_step]
        self.generator.manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
        n = self.batch_size * (self.block_size + 1)
        data = torch.multinomial(self.weights, n, replacement=True, generator=self.generator)
        data = data.view(self.batch_size, self.block_size + 1)
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()  # (B, T) inputs, (B, T) next-token targets


prepared = bool(dataset) and os.path.exists(os.path.join(dataset_dir(dataset), "train.bin"))
if prepared:
    batches = Batches(dataset_dir(dataset), block_size, batch_size, device, seed)
    data_name = f"{dataset_dir(dataset)} (vocab {batches.vocab_size or 50304})"
else:
    if dataset:
        print(f"note: {dataset_dir(dataset)} is not prepared: timing synthetic tokens (vocab {vocab_size}) instead")
    batches = SyntheticBatches(vocab_size, block_size, batch_size, device, seed)
    data_name = f"synthetic tokens (vocab {vocab_size})"
if init_from in GPT2_SHAPES:  # a finetuning config: time the GPT-2 it starts from
    n_layer, n_head, n_embd = GPT2_SHAPES[init_from]
    bias = True
scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")  # float16 needs loss scaling
compiled = compile and can_compile(device_type)
if against and profile:
    raise UserError("--against and --profile are separate runs: drop one of them")


def load_model_py(rev_or_path):
    """Another model.py, as a module of its own: a file, or this repo's model.py at a git revision."""
    if os.path.isfile(rev_or_path):
        with open(rev_or_path) as f:
            source, name = f.read(), rev_or_path
    else:
        try:
            git = subprocess.run(["git", "show", f"{rev_or_path}:model.py"], cwd=REPO, capture_output=True, text=True)
        except FileNotFoundError:
            raise UserError(f"--against={rev_or_path}: no such file, and no git to look it up as a revision") from None
        if git.returncode != 0:
            raise UserError(f"--against={rev_or_path}: not a file, and git has no model.py at that revision "
                            f"({(git.stderr.strip().splitlines() or ['git failed'])[-1]})")
        source, name = git.stdout, f"{rev_or_path}:model.py"
    module = sys.modules["model_against"] = types.ModuleType("model_against")  # dataclasses look it up there
    module.__file__ = name
    # a model.py from before lib/ existed imports its helpers as top-level modules (kernels, optim): alias them
    legacy = {m: importlib.import_module(f"lib.{m}") for m in ("kernels", "optim") if m not in sys.modules}
    sys.modules.update(legacy)
    try:
        exec(builtins.compile(source, name, "exec"), module.__dict__)  # (compile is a setting here)
    finally:
        for m in legacy:
            del sys.modules[m]
    return module


def against_settings(overrides):
    """This run's settings with --against's "--key=value ..." on top (config files, recipe: as train.py takes them)."""
    extra = shlex.split(overrides)
    changed = {a[2:].split("=", 1)[0] for a in extra if a.startswith("--")}
    if any(not a.startswith("--") for a in extra) or not changed <= AGAINST_KEYS:
        raise UserError(f"--against={overrides!r}: as settings it may change only the model and optimizer "
                        f"({', '.join(sorted(AGAINST_KEYS))}); time other shapes or dtypes in a bench.py run of their own")
    return resolve(argv + extra)


def build(module, settings=None, name=""):
    """module's GPT with this run's settings (or `settings`) and seed, its optimizer (constant lr), its steps run."""
    s = settings or globals()
    torch.manual_seed(seed)
    try:
        gpt = module.GPT(module.GPTConfig(n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"],
                                          block_size=block_size, bias=s["bias"], dropout=s["dropout"],
                                          vocab_size=batches.vocab_size or 50304, **{k: s[k] for k in RECIPE_KEYS}))
    except TypeError as e:  # an older model.py without a setting this one has
        raise UserError(f"{module.__file__}: {e}") from None
    if prepared:
        batches.check_vocab(gpt.config.vocab_size)
    gpt.to(device)
    opt = optim.create(gpt, s["optimizer"], s["learning_rate"], s["weight_decay"], (s["beta1"], s["beta2"]),
                       device_type, s["muon_lr"], s["muon_momentum"])
    model = compile_model(gpt, device_type) if compiled else gpt
    return dict(gpt=gpt, model=model, optimizer=opt, iter_num=0, losses=[],
                name=name or ("" if module is model_py else f" of {module.__file__}"))


def run_steps(run, n, prof=None):
    for _ in range(n):
        seed_iteration(seed, 0, run["iter_num"])
        loss, _, _ = train_step(run["model"], run["optimizer"], scaler, batches, run["iter_num"],
                                gradient_accumulation_steps, ctx, grad_clip)
        run["losses"].append(loss)  # device tensors: read only at the end, so no step waits for the device
        run["iter_num"] += 1
        if prof is not None:
            prof.step()


runs = [build(model_py)]
if against.startswith("--"):  # the same model.py with other settings
    runs.append(build(model_py, against_settings(against), name=f" with {against}"))
elif against:
    runs.append(build(load_model_py(against)))
gpt, losses = runs[0]["gpt"], runs[0]["losses"]
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
compile_state = "on" if compiled else f"off ({why_not_compile(device_type)})" if compile else "off"
print(f"{gpt.get_num_params() / 1e6:.2f}M parameters | {device} {dtype} | compile {compile_state} | "
      f"{tokens_per_iter:,} tokens per iteration | {data_name}")

for run in runs:
    t0 = time.perf_counter()
    run_steps(run, warmup_steps)
    synchronize(device)
    print(f"{warmup_steps} warmup steps{run['name']} in {time.perf_counter() - t0:.1f}s"
          f"{' (includes compilation)' if compiled else ''}")

if profile:
    # wait 1 step, warm the profiler up for 1, record 3; then the trace is written and the table printed
    os.makedirs(profile_dir, exist_ok=True)
    trace_path = os.path.join(os.path.abspath(profile_dir), f"bench_{device_type}_{time.strftime('%Y%m%d_%H%M%S')}.json")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device_type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, schedule=torch.profiler.schedule(wait=1, warmup=1, active=3),
                                on_trace_ready=lambda p: p.export_chrome_trace(trace_path), record_shapes=True) as prof:
        run_steps(runs[0], 5, prof)
    synchronize(device)
    print(f"trace written to {trace_path} (open it in https://ui.perfetto.dev or chrome://tracing)")
    sort_by = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=15))
    print(f"loss: first {losses[0].item():.4f}, final {losses[-1].item():.4f}")
    sys.exit(0)

if device_type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)
seconds = [[] for _ in runs]  # per timed round, of each run
for r in range(rounds if against else 1):
    for i in (range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))):  # ABBA: no run always goes first
        synchronize(device)
        t0 = time.perf_counter()
        run_steps(runs[i], num_steps)
        synchronize(device)
        seconds[i].append((time.perf_counter() - t0) / num_steps)
dt = statistics.median(seconds[0])  # seconds per iteration

peak, peak_source = peak_flops(device, dtype)
mfu = gpt.estimate_mfu(tokens_per_iter, dt, peak)
if device_type == "cuda":
    memory, memory_source = torch.cuda.max_memory_allocated(device), "max allocated by torch on the GPU"
else:
    import resource  # ru_maxrss is in KiB on Linux, bytes on macOS

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    memory, memory_source = rss * (1 if sys.platform == "darwin" else 1024), "peak RSS of the process"
timed = f"{num_steps} steps in {dt * num_steps:.2f}s" if not against else f"{rounds} rounds of {num_steps} steps, median"
print(f"timed: {timed} | MFU against {peak / 1e12:.2f} TFLOP/s ({peak_source})")
print(f"loss: first {losses[0].item():.4f}, final {losses[-1].item():.4f}")
print(f"bench: {dt * 1000:.2f} ms/iter, {tokens_per_iter / dt:,.0f} tokens/s, mfu {mfu:.1%}, "
      f"peak memory {memory / 2**20:.1f} MiB ({memory_source})")
if against:
    ratios = sorted(a / b for a, b in zip(*seconds))  # this model.py's time over the other's, round by round
    print(f"against {against}: {statistics.median(seconds[1]) * 1000:.2f} ms/iter (its loss: first "
          f"{runs[1]['losses'][0].item():.4f}, final {runs[1]['losses'][-1].item():.4f})")
    this = "this run" if against.startswith("--") else "this model.py"
    print(f"against {against}: {this} takes {statistics.median(ratios):.3f}x its time per step (median of "
          f"{rounds} rounds; middle half {ratios[len(ratios) // 4]:.3f}-{ratios[(3 * len(ratios)) // 4]:.3f})")
