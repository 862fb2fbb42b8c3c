"""
The modern recipe's ablation on the CPU preset: the GPT-2 recipe, then each technique added alone, then all of them
(recipe='modern'), every run with the same wall-clock budget and seed. Prints a table of the final val loss and
draws the val-loss curves (from each run's out_dir/metrics.jsonl) to --plot.

    python data/shakespeare_char/prepare.py
    python experiments/ablation.py --seconds=45 --out=out-ablation --plot=docs/ablation.png

The lr schedule is computed for max_iters as usual, so each run first times a few of its own training steps
(in this process) and sets max_iters (= lr_decay_iters) to the steps that fit in the budget; train.py's
max_seconds then stops it at the budget in any case, with a last evaluation.
"""

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lib import files  # noqa: E402

PRESET = "config/train_shakespeare_char_cpu.py"
# name -> the train.py settings that add the technique to the GPT-2 recipe (biases are already off in the preset)
RUNS = {
    "gpt2 (baseline)": [],
    "+ muon": ["--optimizer=muon"],
    "+ wsd": ["--lr_schedule=wsd"],
    "+ rotary": ["--rotary=True"],
    "+ rmsnorm": ["--rmsnorm=True"],
    "+ qk_norm": ["--qk_norm=True"],
    "+ relu2": ["--relu2=True"],
    "+ zero_init": ["--zero_init=True"],
    "+ untied head": ["--tie_head=False"],
    "+ softcap 15": ["--logit_softcap=15.0"],
    "+ x0 shortcut": ["--x0_mix=True"],
    # (the preset itself sets optimizer, qk_norm and x0_mix: spelled out here so that "all" is all)
    "all (modern)": ["--recipe=modern", "--optimizer=muon", "--qk_norm=True", "--x0_mix=True"],
    "all, adamw instead of muon": ["--recipe=modern", "--optimizer=adamw", "--qk_norm=True", "--x0_mix=True"],
    "the CPU preset: all but muon, qk_norm, x0": ["--recipe=modern", "--optimizer=adamw", "--qk_norm=False",
                                                  "--x0_mix=False"],
    "gpt2 (repeat)": [],  # the baseline again, last: how much the shared machine's load moves a result
}


def step_seconds(args):
    """Seconds per training step of the preset with these settings, timed here (a few steps after a warm-up)."""
    import torch

    from configurator import configure
    from lib import optim
    from lib.runtime import autocast, pick_dtype
    from model import GPT, GPTConfig

    cfg = {k: v for k, v in optim.RECIPES["gpt2"].items()}
    scope = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, learning_rate=1e-3, recipe="gpt2",
                 muon_lr=0.02, **cfg)
    _, explicit = configure(scope, list(args))  # the technique's settings
    # then the recipe's, where the run does not set them
    scope.update({k: v for k, v in optim.recipe_settings(scope["recipe"], explicit).items() if k != "bias"})
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, bias=False,
                          **{k: scope[k] for k in ("rotary", "rmsnorm", "qk_norm", "relu2", "zero_init", "tie_head",
                                                   "logit_softcap", "x0_mix")}))
    opt = optim.create(model, scope["optimizer"], 1e-3, 0.1, (0.9, 0.99), "cpu", scope["muon_lr"])
    x = torch.randint(65, (12, 64))
    times = []
    for i in range(8):
        t0 = time.perf_counter()
        with autocast("cpu", pick_dtype("auto", "cpu")):  # the dtype train.py will run in
            _, loss = model(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return sorted(times[2:])[len(times[2:]) // 2]  # the median after two warm-up steps


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    from lib.runtime import install_error_hook

    install_error_hook()  # a folder where the plot goes, a full disk: one line
    from configurator import RULES, ArgumentParser, Rule, above, at_least
    from lib.batches import dataset_dir

    known = Rule(lambda v: not v or set(v.split(",")) <= set(RUNS), f"comma-separated names of {', '.join(RUNS)}",
                 "bogus")
    p = ArgumentParser()
    p.add_argument("--seconds", type=float, default=45.0, help="wall-clock budget of each run's training loop",
                   rule=above(0))
    p.add_argument("--dataset", default="shakespeare_char")
    p.add_argument("--out", default="out-ablation", help="a folder for the runs' out_dirs")
    p.add_argument("--plot", default="docs/ablation.png")
    p.add_argument("--only", default="", help="comma-separated run names to do (default: all)", rule=known)
    p.add_argument("--seed", type=int, default=1337, rule=RULES["seed"])
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of every run (0: torch's default, every "
                   "core); 1 when other processes share the cores, else threads wait on each other (3-6 s per step "
                   "instead of 0.34 s, measured on a loaded 2-core machine)", rule=at_least(0))
    a = p.parse_args()
    if not os.path.exists(os.path.join(dataset_dir(a.dataset), "train.bin")):
        p.error(f"--dataset={a.dataset}: {dataset_dir(a.dataset)} holds no train.bin: prepare it first "
                f"(python data/shakespeare_char/prepare.py)")
    import torch

    env = dict(os.environ)
    if a.threads:
        torch.set_num_threads(a.threads)
        env["OMP_NUM_THREADS"] = str(a.threads)
    names = [n for n in RUNS if not a.only or n in a.only.split(",")]
    results = {}
    for name in names:
        extra = RUNS[name]
        # uncompiled, as step_seconds times it: compiling would take a varying share of each run's budget
        steps = max(20, int(0.9 * a.seconds / step_seconds(extra)))
        out_dir = os.path.join(a.out, name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus"))
        cmd = [sys.executable, "train.py", PRESET, f"--dataset={a.dataset}", f"--out_dir={out_dir}", "--overwrite=True",
               "--recipe=gpt2", "--compile=False", *extra, f"--max_iters={steps}", f"--lr_decay_iters={steps}",
               f"--warmup_iters={min(100, steps // 10)}", f"--eval_interval={max(1, steps // 5)}", "--eval_iters=10",
               f"--max_seconds={a.seconds}", "--sample_interval=0", f"--log_interval={max(1, steps // 10)}",
               f"--seed={a.seed}"]
        print(f"{name}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-2000:])
            continue
        records = read_metrics(os.path.join(REPO, out_dir, "metrics.jsonl"))
        evals = [r for r in records if r["kind"] == "eval"]
        last_step = max((r["step"] for r in records if "step" in r), default=0)
        results[name] = dict(val=evals[-1]["val_loss"], step=evals[-1]["step"], planned=steps, last=last_step,
                             curve=[(r["elapsed_s"] - evals[0]["elapsed_s"], r["val_loss"]) for r in evals])
        print(f"  final val loss {results[name]['val']:.4f} at step {results[name]['step']} (planned {steps})",
              flush=True)

    base = results.get("gpt2 (baseline)", {}).get("val")
    print(f"\n| run | final val loss | vs gpt2 | steps in {a.seconds:g} s (planned) |\n|---|---|---|---|")
    for name, r in results.items():
        delta = f"{r['val'] - base:+.4f}" if base is not None else "-"
        print(f"| {name} | {r['val']:.4f} | {delta} | {r['step']} ({r['planned']}) |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=90)
    for name, r in results.items():
        xs, ys = zip(*r["curve"])
        style = "-" if name.startswith(("gpt2", "all", "the CPU preset")) else ":"
        ax.plot(xs, ys, style, marker=".", label=f"{name}: {r['val']:.3f}", linewidth=2 if style == "-" else 1)
    ax.set_xlabel("seconds since the first evaluation (wall time)")
    ax.set_ylabel("val loss")
    ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
    ax.set_title(f"CPU preset, {a.seconds:g} s per run, seed {a.seed}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(a.plot)), exist_ok=True)
    files.save_figure(fig, a.plot)
    print(f"curves: {a.plot}")


if __name__ == "__main__":
    main()
