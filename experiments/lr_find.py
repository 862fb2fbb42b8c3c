"""
The learning-rate range test (Smith 2015; fastai's lr_find): train a fresh model from a config for up to num_steps
steps with the lr rising exponentially from lr_start to lr_end, stop once the smoothed loss diverges (more than
`diverge` times its minimum), and suggest a peak learning_rate.

    python experiments/lr_find.py config/train_shakespeare_char_cpu.py --dataset=shakespeare_char
    python experiments/lr_find.py config/train_shakespeare_char_cpu.py --num_steps=200 --out_png=lr.png

The rule: the suggestion is the lr at the minimum of the smoothed loss divided by 10 ("min/10"); the lr where the
smoothed loss falls fastest against log(lr) ("steepest") is printed too. Both are guides for the peak of the usual
warmup + cosine schedule (then divide by a further 2-4 if training turns out unstable). The smoothed loss is an
exponential moving average of the step losses with weight `smooth` on the past, bias-corrected.

Everything else is train.py's settings (the same config files and --key=value overrides): the model (depth dial
too), data, batch, AdamW's betas and weight decay, grad_clip; learning_rate and the schedule are replaced by the
test's. Writes out_png: the smoothed and raw loss against the lr (log scale), the suggestion marked.
"""

import math
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configurator import configure, script_settings  # noqa: E402
from lib import files, scaling  # noqa: E402
from lib.batches import Batches, dataset_dir  # noqa: E402
from lib.runtime import UserError, install_error_hook, setup  # noqa: E402
from lib.step import seed_iteration, train_step  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# ----------------------------------------------------------------------------- settings
globals().update(script_settings(os.path.join(REPO, "train.py")))  # train.py's, with its defaults
lr_start = 1e-6  # the lr of the first step
lr_end = 10.0  # the lr the last step would reach
num_steps = 300  # at most this many steps (fewer when the loss diverges first)
smooth = 0.95  # the moving average's weight on the past
diverge = 4.0  # stop once the smoothed loss exceeds this many times its minimum
out_png = "lr_find.png"  # the picture of loss against lr ('' : none)
# -----------------------------------------------------------------------------


def suggest(lrs, smoothed):
    """(min/10 suggestion, steepest-descent lr) from the smoothed curve up to its divergence."""
    lrs, smoothed = np.asarray(lrs), np.asarray(smoothed)
    i_min = int(np.argmin(smoothed))
    slope = np.gradient(smoothed[: i_min + 1], np.log(lrs[: i_min + 1])) if i_min >= 2 else None
    steepest = float(lrs[int(np.argmin(slope))]) if slope is not None else float(lrs[i_min])
    return float(lrs[i_min]) / 10, steepest


def plot(path, lrs, raw, smoothed, suggestion, steepest, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(lrs, raw, color="lightgray", lw=0.8, label="loss")
    ax.plot(lrs, smoothed, color="C0", label="smoothed loss")
    ax.axvline(suggestion, color="C3", ls="--", label=f"suggested (min/10): {suggestion:.2e}")
    ax.axvline(steepest, color="C2", ls=":", label=f"steepest descent: {steepest:.2e}")
    ax.set_xscale("log")
    ax.set_ylim(min(smoothed) * 0.95, min(max(raw[0], smoothed[0]) * 1.3, max(raw) * 1.05))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.save_figure(fig, path)


def main():
    install_error_hook()
    config, explicit = configure(globals(), sys.argv[1:])
    config.update(scaling.apply_depth_dial({}, explicit, config["depth"], config["depth_aspect"]))
    c = config
    if not 0 < c["lr_start"] < c["lr_end"]:
        raise UserError(f"lr_start={c['lr_start']} and lr_end={c['lr_end']}: need 0 < lr_start < lr_end")
    rt = setup(c["device"], c["dtype"])
    batches = Batches(dataset_dir(c["dataset"]), c["block_size"], c["batch_size"], rt.device, c["seed"])
    torch.manual_seed(c["seed"])
    gpt = GPT(GPTConfig(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], block_size=c["block_size"],
                        bias=c["bias"], vocab_size=batches.vocab_size or 50304, dropout=c["dropout"])).to(rt.device)
    batches.check_vocab(gpt.config.vocab_size)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "float16")
    optimizer = gpt.configure_optimizers(c["weight_decay"], c["lr_start"], (c["beta1"], c["beta2"]), rt.device_type)
    n = c["num_steps"]
    print(f"lr range test: {gpt.get_num_params() / 1e6:.2f}M parameters, lr {c['lr_start']:.0e} -> {c['lr_end']:.0e} "
          f"over at most {n} steps, stopping when the smoothed loss exceeds {c['diverge']}x its minimum")
    lrs, raw, smoothed, avg, t0 = [], [], [], 0.0, time.time()
    stopped = None
    for k in range(n):
        lr = c["lr_start"] * (c["lr_end"] / c["lr_start"]) ** (k / max(1, n - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        seed_iteration(c["seed"], 0, k)
        loss, _, _ = train_step(gpt, optimizer, scaler, batches, k, c["gradient_accumulation_steps"], rt.autocast,
                                c["grad_clip"])
        loss = loss.item()
        if not math.isfinite(loss):
            stopped = f"the loss is {loss} at step {k} (lr {lr:.2e})"
            break
        avg = c["smooth"] * avg + (1 - c["smooth"]) * loss
        lrs.append(lr)
        raw.append(loss)
        smoothed.append(avg / (1 - c["smooth"] ** (k + 1)))
        if smoothed[-1] > c["diverge"] * min(smoothed):
            stopped = (f"diverged at step {k} (lr {lr:.2e}): smoothed loss {smoothed[-1]:.3f} > {c['diverge']}x "
                       f"its minimum {min(smoothed):.3f}")
            break
        if k % 25 == 0:
            print(f"step {k}: lr {lr:.2e}, loss {loss:.4f}, smoothed {smoothed[-1]:.4f}", flush=True)
    if len(lrs) < 3:
        raise UserError(f"only {len(lrs)} steps before the loss diverged: lower --lr_start")
    suggestion, steepest = suggest(lrs, smoothed)
    i_min = int(np.argmin(smoothed))
    print(stopped or f"ran all {n} steps without diverging: raise --lr_end to see where it does")
    print(f"min smoothed loss {smoothed[i_min]:.4f} at lr {lrs[i_min]:.2e}; steepest descent at lr {steepest:.2e}")
    print(f"suggested learning_rate: {suggestion:.2e} (the min-loss lr / 10) after {len(lrs)} steps in "
          f"{time.time() - t0:.0f}s")
    if c["out_png"]:
        plot(c["out_png"], lrs, raw, smoothed, suggestion, steepest,
             f"lr range test: {c['n_layer']} layers x {c['n_embd']}, {batches.data_dir}")
        print(f"wrote {c['out_png']}")


if __name__ == "__main__":
    main()
