"""
A scaling-law sweep: train a family of models (the depth dial) at matched compute, fit L(N) = a * N**-alpha + c
to their val losses (N: non-embedding parameters), predict the loss of the next larger model, train it, and
report the prediction's error. Writes a table (sweep.md), a log-log picture (sweep.png) and the fitted constants
with every point (sweep.json) into --out_dir.

    python experiments/scaling_sweep.py --dataset=shakespeare_char   # the tiny Shakespeare sweep: depths 2-5
        # (aspect 16) at 3e11 FLOPs each, then depth 6; ~3 minutes on 2 CPU cores, into out-sweep/
    python experiments/scaling_sweep.py --dataset=shakespeare_char --aspect=8 --depths=3,4,5,6 --predict=8 \
        --target_flops=2e12 --batch_size=32 --out_dir=out-sweep-2e12          # a bigger one, ~20 minutes
    python experiments/scaling_sweep.py --target_flops=1e11,3e11 ...   # several budgets: the compute-optimal
                                                                       # depth of each (fit: the largest budget)

Every other --key=value goes to train.py as it is (e.g. --batch_size=32 --learning_rate=2e-3 --device=cuda).
Each model trains with train.py --depth=D --depth_aspect=A --target_flops=C into out_dir/c<C>_d<D> (replaced if
there); the loss is the val loss of train.py's eval at the horizon.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configurator import ConfigError  # noqa: E402
from lib import files, scaling  # noqa: E402


def non_embedding_params(depth, aspect, vocab_size=65, block_size=64):
    from model import GPT, GPTConfig

    shape = scaling.depth_dial(depth, aspect)
    gpt = GPT(GPTConfig(**shape, vocab_size=vocab_size, block_size=block_size, bias=False))
    total = sum(p.numel() for p in gpt.parameters())
    return total - gpt.transformer.wte.weight.numel() - gpt.transformer.wpe.weight.numel()


def train(args, depth, budget, extra):
    """Train one model; returns its row: depth, shape, budget, params, steps, val loss, seconds."""
    out = os.path.join(args.out_dir, f"c{budget:.0e}_d{depth}")
    cmd = [sys.executable, os.path.join(REPO, "train.py"), f"--dataset={args.dataset}", f"--out_dir={out}",
           f"--depth={depth}", f"--depth_aspect={args.aspect}", f"--target_flops={budget}", "--overwrite=True",
           "--always_save_checkpoint=True", "--sample_interval=0", *extra]
    print(f"depth {depth}, {budget:.2g} FLOPs: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.time() - t0
    if proc.returncode:
        sys.exit(f"train.py failed for depth {depth}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    evals = re.findall(r"^step (\d+): train loss \S+, val loss (\S+)", proc.stdout, re.M)
    steps, loss = int(evals[-1][0]), float(evals[-1][1])  # the eval at the horizon
    model = re.search(r"^model: .*; (\S+) FLOPs per token", proc.stdout, re.M).group(1)
    n = non_embedding_params(depth, args.aspect, args.vocab, args.block_size)
    print(f"  val loss {loss:.4f} after {steps} steps, {seconds:.0f}s ({model} FLOPs per token)", flush=True)
    return {"depth": depth, "flops": budget, "params": n, "steps": steps, "val_loss": loss, "seconds": seconds,
            **scaling.depth_dial(depth, args.aspect)}


def plot(path, points, fit, predicted, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for budget in sorted({p["flops"] for p in points}):
        ps = [p for p in points if p["flops"] == budget and p is not predicted]
        ax.plot([p["params"] for p in ps], [p["val_loss"] for p in ps], "o", label=f"trained, {budget:.2g} FLOPs")
    xs = np.geomspace(min(p["params"] for p in points) / 1.5, predicted["params"] * 1.5, 100)
    a, alpha, c = fit
    ax.plot(xs, scaling.predict(fit, xs), "-", color="gray", label=f"fit {a:.3g}·N^(-α) + {c:.3g}, α = {alpha:.3g}")
    ax.plot([predicted["params"]], [predicted["predicted_loss"]], "x", color="red", ms=10, label="predicted")
    ax.plot([predicted["params"]], [predicted["val_loss"]], "s", mfc="none", color="red", label="then trained")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())

    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("val loss")
    ax.set_title(title.replace(", predicting", ",\npredicting"), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.save_figure(fig, path)


def main():
    from lib.runtime import install_error_hook

    install_error_hook()  # a folder where sweep.png goes, a full disk: one line
    from configurator import ArgumentParser, Rule, at_least, configure, script_settings
    from lib.batches import dataset_dir

    def numbers(kind, ok, allowed, bad, least=1):  # a comma-separated list: its rule on the text
        def parsed(text):
            try:
                return [kind(x) for x in text.split(",")]
            except ValueError:
                return []
        return Rule(lambda v: len(parsed(v)) >= least and all(ok(x) for x in parsed(v)), allowed, bad)

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="shakespeare_char")
    p.add_argument("--depths", default="2,3,4,5", help="the family to fit (the depth dial)",
                   rule=numbers(int, lambda d: d >= 1, "at least 3 comma-separated depths >= 1 (a fit of 3 constants)",
                                "0,1,2", least=3))
    p.add_argument("--predict", type=int, default=6, help="the depth to predict, then train", rule=at_least(1))
    p.add_argument("--aspect", type=int, default=16, help="n_embd = aspect * depth (train.py's depth_aspect)",
                   rule=at_least(1))
    p.add_argument("--target_flops", default="3e11", help="training FLOPs per model; a comma list for several",
                   rule=numbers(float, lambda c: c > 0, "comma-separated FLOP counts > 0", "-5"))
    p.add_argument("--out_dir", default="out-sweep")
    p.add_argument("--plot_only", action="store_true", help="redraw sweep.png from out_dir/sweep.json")
    args, extra = p.parse_known_args()
    if not args.plot_only:
        try:  # the settings that go to train.py, checked as train.py checks them, before the first model trains
            configure(script_settings(os.path.join(REPO, "train.py")), extra)
        except ConfigError as e:
            p.error(f"{e} (settings other than the sweep's own go to train.py)")
        if not os.path.exists(os.path.join(dataset_dir(args.dataset), "train.bin")):
            p.error(f"--dataset={args.dataset}: {dataset_dir(args.dataset)} holds no train.bin: prepare it first "
                    f"(python data/shakespeare_char/prepare.py)")
    if args.plot_only:
        with open(os.path.join(args.out_dir, "sweep.json")) as f:
            done = json.load(f)
        points, fit = done["points"], tuple(done["fit"][k] for k in ("a", "alpha", "c"))
        nxt = next(q for q in points if "predicted_loss" in q)
        plot(os.path.join(args.out_dir, "sweep.png"), points, fit, nxt, done.get("title", args.out_dir))
        return
    defaults = ["--device=cpu", "--compile=False", "--block_size=64", "--batch_size=16", "--gradient_accumulation_steps=1",
                "--learning_rate=2e-3", "--min_lr=2e-4", "--warmup_iters=5", "--beta2=0.99", "--eval_interval=1000000",
                "--eval_iters=20", "--log_interval=100"]
    given = {a.split("=")[0] for a in extra}
    extra = [a for a in defaults if a.split("=")[0] not in given] + extra
    args.block_size = int(next(a for a in extra if a.startswith("--block_size=")).split("=")[1])
    from lib.batches import load_meta

    args.vocab = load_meta(dataset_dir(args.dataset))["vocab_size"]
    os.makedirs(args.out_dir, exist_ok=True)
    depths = [int(d) for d in args.depths.split(",")]
    budgets = sorted(float(b) for b in args.target_flops.split(","))

    points = [train(args, d, b, extra) for b in budgets for d in depths]
    optimal = {b: min((p for p in points if p["flops"] == b), key=lambda p: p["val_loss"])["depth"] for b in budgets}
    fit_points = [p for p in points if p["flops"] == budgets[-1]]
    fit = scaling.fit_power_law([p["params"] for p in fit_points], [p["val_loss"] for p in fit_points])
    n_next = non_embedding_params(args.predict, args.aspect, args.vocab, args.block_size)
    predicted_loss = float(scaling.predict(fit, n_next))
    print(f"fit at {budgets[-1]:.2g} FLOPs: L(N) = {fit[0]:.4g} * N^-alpha + {fit[2]:.4g}, alpha = {fit[1]:.4g}; depth "
          f"{args.predict} (N = {n_next:,}) predicted val loss {predicted_loss:.4f}", flush=True)
    nxt = train(args, args.predict, budgets[-1], extra)
    nxt["predicted_loss"] = predicted_loss
    error = nxt["val_loss"] - predicted_loss
    points.append(nxt)

    rows = ["| budget (FLOPs) | depth | n_embd | n_head | N (non-emb.) | steps | val loss | fit | time |",
            "|---|---|---|---|---|---|---|---|---|"]
    for q in points:
        fitted = scaling.predict(fit, q["params"]) if q["flops"] == budgets[-1] else None
        tag = " (predicted)" if q is nxt else (" (optimal)" if optimal[q["flops"]] == q["depth"] else "")
        rows.append(f"| {q['flops']:.2g} | {q['depth']}{tag} | {q['n_embd']} | {q['n_head']} | {q['params']:,} | "
                    f"{q['steps']:,} | {q['val_loss']:.4f} | {f'{fitted:.4f}' if fitted else ''} | "
                    f"{q['seconds']:.0f}s |")
    summary = (f"L(N) = {fit[0]:.4g} * N^-alpha + {fit[2]:.4g}, alpha = {fit[1]:.4g} (fit on depths {args.depths} at "
               f"{budgets[-1]:.2g} FLOPs); depth {args.predict}: predicted {predicted_loss:.4f}, trained "
               f"{nxt['val_loss']:.4f}, error {error:+.4f} ({100 * error / nxt['val_loss']:+.1f}%)")
    title = (f"{os.path.basename(os.path.normpath(args.dataset))}: depths {args.depths} (aspect {args.aspect}) at "
             f"{budgets[-1]:.2g} FLOPs, predicting depth {args.predict}")
    if fit[1] < 0:
        summary += (f"\nnote: alpha < 0: at {budgets[-1]:.2g} FLOPs the loss rises with N, i.e. these models are past the "
                    f"compute-optimal size for the budget (fewer tokens each); the fit extrapolates that trend. Raise "
                    f"--target_flops or use smaller depths to fit the bigger-is-better side.")
    table = "\n".join(rows) + "\n\n" + summary + "\n"
    print("\n" + table)
    files.write_atomic(os.path.join(args.out_dir, "sweep.md"), lambda f: f.write(table), text=True)
    files.write_json(os.path.join(args.out_dir, "sweep.json"), {
        "fit": {"a": fit[0], "alpha": fit[1], "c": fit[2], "budget_flops": budgets[-1]},
        "prediction": {"depth": args.predict, "params": n_next, "predicted_loss": predicted_loss,
                       "val_loss": nxt["val_loss"], "error": error},
        "compute_optimal_depth": {f"{b:.3g}": d for b, d in optimal.items()},
        "points": points, "train_args": extra, "title": title})
    plot(os.path.join(args.out_dir, "sweep.png"), points, fit, nxt, title)
    print(f"wrote {args.out_dir}/sweep.md, sweep.json and sweep.png")


if __name__ == "__main__":
    main()
