"""
What a training run shows and keeps, for train.py: the run header, the step and eval lines, out_dir/metrics.jsonl,
out_dir/loss.png, samples during training, the training doctor, wandb, and the summary at the end.

    run_log = RunLog(config, gpt, meta, rt, ...)   # prints the header; opens metrics.jsonl (and wandb)
    run_log.count_step(grad_norm)                   # every step: counts gradient clipping on the device, no wait
    run_log.step(iter_num, loss, lr, ...)           # at log lines: the step line, metrics.jsonl, the doctor
    run_log.eval(iter_num, losses, best, saved)     # at evals: the eval line, metrics.jsonl, loss.png, the doctor
    run_log.maybe_sample(iter_num)                  # every sample_interval steps: a short sample
    run_log.saved()                                 # after each checkpoint save: a new run's files replace the old
    run_log.finish(iter_num)                        # the summary, loss.png, wandb.finish()

Only rank 0 prints and writes; every rank makes the same calls (the loss is averaged over ranks at log lines).
metrics.jsonl holds one JSON object per line, each with a "kind" (step, eval, sample, warning, summary) and a
"step"; a resumed run keeps the records up to its checkpoint's step and drops the rest, so none is duplicated.
"""

import json
import math
import os
import statistics
import sys
import time
from array import array
from collections import deque

import torch

from lib import files
from lib.runtime import UserError, for_decoding, why_not_compile
from lib.tokenizer import load_tokenizer

METRICS, PLOT = "metrics.jsonl", "loss.png"
PLOT_SECONDS = 30  # loss.png is redrawn at an eval at most this often (0.3 s each on a CPU), and at the end
CHINCHILLA = 20  # tokens per parameter of a compute-optimal run (Hoffmann et al. 2022)


# ----------------------------------------------------------------------------- small helpers

def human(n):
    """1234567 -> '1.23M', 50000 -> '50K' (three significant digits)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def duration(seconds):
    """3725 -> '1h02m05s', 65 -> '1m05s', 5.2 -> '5.2s'."""
    if seconds is None or not math.isfinite(seconds):
        return "--"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m{s % 60:02d}s" if h else f"{m}m{s % 60:02d}s"


def finite_or_none(x):
    return x if isinstance(x, (int, bool)) or (isinstance(x, float) and math.isfinite(x)) else None


def mean_over_ranks(t, world_size):
    """A device scalar averaged over all ranks (each rank calls this), as a Python float."""
    if world_size > 1:
        import torch.distributed as dist

        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
    return t.item()


def peak_memory(device):
    """(bytes, what they measure): the most the device held at once, or the process's peak RSS on a CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device), "max allocated by torch on the GPU"
    if device.startswith("mps"):
        return torch.mps.driver_allocated_memory(), "allocated by the MPS driver now"
    import resource  # ru_maxrss is in KiB on Linux, bytes on macOS

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "peak RSS of the process"


# ----------------------------------------------------------------------------- the training doctor

class Doctor:
    """
    Watches the numbers a run logs for the classic symptoms of a sick run. step() and eval() return a list of
    (check, message) warnings; a check speaks at most once per `quiet_steps` steps. The thresholds are meant to
    never fire on a healthy run: each symptom is a large, sustained departure, never a bit of noise.
    """

    SPIKE = 2.0  # a loss this many times its recent mean
    SLOW = 0.5  # throughput below this fraction of its earlier level
    CLIPPED = 0.9  # clipping on this fraction of the steps ...
    CLIP_WINDOW = 100  # ... of at least this many steps after warmup ...
    CLIP_NORM = 4.0  # ... with gradient norms this many times grad_clip (a healthy small-batch run can sit at 2x)
    NOT_LEARNING = 0.97  # loss above this fraction of ln(vocab) ...
    GRACE = 20  # ... this many steps after warmup
    RATE_WINDOW = 60.0  # seconds of recent log lines whose throughput is compared with the lines before

    def __init__(self, vocab_size, warmup_iters=0, grad_clip=0.0, quiet_steps=1000):
        self.ln_vocab, self.warmup, self.grad_clip = math.log(vocab_size), warmup_iters, grad_clip
        self.quiet = quiet_steps
        self.losses = deque(maxlen=20)  # recent finite losses of step lines
        self.evals = []  # (train, val) of each eval
        self.clips = deque()  # (steps, clipped) of the lines after warmup
        self.recent_rates, self.old_rates = deque(), deque(maxlen=100)  # (elapsed, tokens/s) of the log lines
        self.skipped_seen = 0
        self.fired = {}  # check -> step it last spoke

    def _say(self, out, check, step, message):
        if check not in self.fired or step - self.fired[check] >= self.quiet:
            self.fired[check] = step
            out.append((check, message))

    def _not_learning(self, out, step, loss, what):
        if step >= self.warmup + self.GRACE and math.isfinite(loss) and loss > self.NOT_LEARNING * self.ln_vocab:
            if loss > self.ln_vocab + 0.5:
                what = f"{what} {loss:.3f} at step {step} is above ln(vocab_size) = {self.ln_vocab:.3f}, worse than " \
                       f"a uniform guess, after warmup: training diverged. Lower --learning_rate, lengthen " \
                       f"--warmup_iters, keep --grad_clip on"
            else:
                what = f"{what} {loss:.3f} at step {step} is still about ln(vocab_size) = {self.ln_vocab:.3f} (a " \
                       f"uniform guess) after warmup: the model is not learning. Check that --learning_rate is not " \
                       f"~0 and that the data is real text; compare with a short run at a preset's settings"
            self._say(out, "not_learning", step, what)

    def step(self, step, loss, steps=1, clipped=0, grad_norm=None, tok_per_s=None, elapsed=None, skipped_total=0):
        """A step line: the loss and gradient norm of step `step`, and `clipped` of the `steps` steps since the last
        line clipped; tokens/s and elapsed seconds."""
        out = []
        if skipped_total > self.skipped_seen:
            self._say(out, "non_finite", step,
                      f"{skipped_total - self.skipped_seen} step(s) before step {step} had a non-finite loss or "
                      f"gradient and were skipped ({skipped_total} in all): lower --learning_rate, keep --grad_clip "
                      f"on (1.0), or use --dtype=bfloat16 instead of float16")
            self.skipped_seen = skipped_total
        if math.isfinite(loss):
            if len(self.losses) >= 3:
                recent = sum(self.losses) / len(self.losses)
                if loss > self.SPIKE * recent:
                    self._say(out, "spike", step,
                              f"loss spiked to {loss:.3f} at step {step}, {loss / recent:.1f}x its recent mean "
                              f"{recent:.3f}: lower --learning_rate, lengthen --warmup_iters, or keep --grad_clip on; "
                              f"a checkpoint from before the spike can be resumed")
            self.losses.append(loss)
            self._not_learning(out, step, loss, "loss")
        if self.grad_clip > 0 and step > self.warmup and grad_norm is not None and math.isfinite(grad_norm):
            self.clips.append((steps, clipped, grad_norm))
            while len(self.clips) > 1 and sum(s for s, _, _ in self.clips) - self.clips[0][0] >= self.CLIP_WINDOW:
                self.clips.popleft()
            n, c = sum(s for s, _, _ in self.clips), sum(c for _, c, _ in self.clips)
            norm = statistics.median(g for _, _, g in self.clips)
            if n >= self.CLIP_WINDOW and c >= self.CLIPPED * n and norm >= self.CLIP_NORM * self.grad_clip:
                self._say(out, "clipping", step,
                          f"gradient clipping fired on {c} of the last {n} steps, at norms around {norm:.3g} "
                          f"(grad_clip={self.grad_clip:g}): every step has the same size whatever --learning_rate "
                          f"says; lower --learning_rate, or raise --grad_clip if the norms are steady")
        if tok_per_s is not None and elapsed is not None and tok_per_s > 0:
            self.recent_rates.append((elapsed, tok_per_s))
            while len(self.recent_rates) > 3 and elapsed - self.recent_rates[0][0] > self.RATE_WINDOW:
                self.old_rates.append(self.recent_rates.popleft()[1])
            if len(self.old_rates) >= 10 and len(self.recent_rates) >= 5 \
                    and elapsed - self.recent_rates[0][0] >= self.RATE_WINDOW / 2:
                before = statistics.median(self.old_rates)
                now = statistics.median(r for _, r in self.recent_rates)
                if now < self.SLOW * before:
                    self._say(out, "throughput", step,
                              f"throughput fell from {before:,.0f} to {now:,.0f} tokens/s: is another process using "
                              f"the device or the CPU, the GPU throttling (nvidia-smi), the machine swapping, or the "
                              f"data on a slow disk?")
        return out

    def eval(self, step, train_loss, val_loss):
        out = []
        self._not_learning(out, step, train_loss, "train loss")
        if math.isfinite(train_loss) and math.isfinite(val_loss):
            self.evals.append((train_loss, val_loss))
        if len(self.evals) >= 3:
            (t0, v0), (_, v1), (t2, v2) = self.evals[-3:]
            if v0 < v1 < v2 and t2 < t0:
                self._say(out, "overfitting", step,
                          f"val loss rose over the last 3 evals ({v0:.4f} -> {v1:.4f} -> {v2:.4f}) while train loss "
                          f"fell ({t0:.4f} -> {t2:.4f}): the model is overfitting (best.pt keeps the best one). Try "
                          f"more --dropout, more --weight_decay, a smaller model, more data, or stop here")
        return out


# ----------------------------------------------------------------------------- metrics.jsonl

class MetricsFile:
    """
    out_dir/metrics.jsonl. A resumed run from step k keeps the records with step <= k; a record that a resumed
    run logs again at step k (its first eval) replaces the old one. A run that starts over where an earlier run's
    metrics.jsonl is keeps that file until its own first save (commit()), holding its records in memory until
    then, as the old checkpoints stay until then too. Rewrites go through files.write_atomic; appends stay appends.
    """

    def __init__(self, path, resume_step=None):
        self.path = path
        files.check_file(path)  # a folder in the way: one line now, not at the first log line
        kept, self.pending = [], None
        if resume_step is not None and os.path.exists(path):
            kept = [r for r in self.read(path) if r.get("step", 0) <= resume_step]
        earlier = [os.path.join(os.path.dirname(path), name) for name in (METRICS, PLOT)]
        if resume_step is None and any(map(os.path.exists, earlier)):
            self.pending = []  # an earlier run's files: replaced at this run's first save
        else:
            self._rewrite(kept)
        self.replaceable = {self.key(r) for r in kept if r.get("step") == resume_step}
        self.kept = kept

    @staticmethod
    def key(record):
        return record.get("kind"), record.get("step"), record.get("check")

    @staticmethod
    def read(path):
        """The records of a metrics.jsonl; a line cut short by a crash is skipped."""
        records = []
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {path} ({getattr(e, 'strerror', None) or e}): move it away, or pick "
                            f"another --out_dir") from None
        return records

    def _rewrite(self, records):
        files.write_atomic(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records)), text=True,
                           kind="metrics.jsonl")

    def commit(self):
        """The first save of a run that started over: its records replace the earlier run's file."""
        if self.pending is not None:
            self._rewrite(self.pending)
            self.pending = None

    def append(self, record):
        if self.pending is not None:
            self.pending.append(record)
            return
        key = self.key(record)
        if key in self.replaceable:
            self.replaceable.discard(key)
            self._rewrite([r for r in self.read(self.path) if self.key(r) != key])
        line = memoryview((json.dumps(record) + "\n").encode("utf-8"))
        try:
            with open(self.path, "ab", buffering=0) as f:  # unbuffered: a failed write fails here, not at close
                size = f.tell()
                try:
                    while line:
                        line = line[f.write(line):]
                except OSError:
                    f.truncate(size)  # no half line for the next record to run into
                    raise
        except OSError as e:
            raise files.failed(e, self.path, "metrics.jsonl") from None


# ----------------------------------------------------------------------------- loss.png

def plot_losses(path, steps, losses, lrs, evals, tokens_per_iter, title, scores=()):
    """Train loss (every log line, and at evals) and val loss against steps (tokens on the top axis), lr on the
    right axis; under them, when train.py scored tasks (--eval_every), CORE (or the tasks' mean centered accuracy)
    against the same steps. Written atomically (files.write_atomic); returns the figure."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state (the Agg canvas)

    fig = Figure(figsize=(9, 7.5 if scores else 5.5), dpi=100)
    if scores:
        ax, ax_scores = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
        core = all(r.get("core") is not None for r in scores)
        ax_scores.plot([r["step"] for r in scores], [r["core" if core else "mean_centered"] for r in scores], "o-",
                       color="tab:green", ms=3)
        ax_scores.set_ylabel("CORE" if core else "mean centered\naccuracy")
        ax_scores.set_xlabel("step")
        ax_scores.grid(alpha=0.3)
    else:
        ax = fig.add_subplot()
    stride = max(1, len(steps) // 5000)  # a curve of 5,000 points at most
    ax.plot(steps[::stride], losses[::stride], color="tab:blue", lw=0.8, alpha=0.45, label="train loss (steps)")
    if evals:
        e_steps, e_train, e_val = zip(*[(e["step"], e["train_loss"], e["val_loss"]) for e in evals])
        ax.plot(e_steps, e_train, "o-", color="tab:blue", ms=3, label="train loss (eval)")
        ax.plot(e_steps, e_val, "o-", color="tab:orange", ms=3, label="val loss (eval)")
    steps_losses = np.array(losses, dtype=float)
    steps_losses = steps_losses[np.isfinite(steps_losses)]
    evals_losses = np.array([v for e in evals for v in (e["train_loss"], e["val_loss"]) if v is not None], dtype=float)
    evals_losses = evals_losses[np.isfinite(evals_losses)]
    values = np.concatenate([steps_losses, evals_losses])
    if len(values):  # the evals in full, but a spike of a single step off the scale rather than squash the curve
        top = max(evals_losses.max(initial=0.0), 1.2 * np.percentile(steps_losses, 98) if len(steps_losses) else 0.0)
        top = min(top, values.max())
        ax.set_ylim(max(0.0, values.min() - 0.05 * (top - values.min())), top + 0.02 * (top - values.min()) + 1e-6)
    ax.set_xlabel("" if scores else "step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    if tokens_per_iter:
        from matplotlib.ticker import FuncFormatter

        top_axis = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_iter, lambda t: t / tokens_per_iter))
        top_axis.xaxis.set_major_formatter(FuncFormatter(lambda t, _: human(t)))
        top_axis.set_xlabel("tokens")
    handles, labels = ax.get_legend_handles_labels()
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(steps[::stride], lrs[::stride], color="gray", lw=1, ls="--", label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.set_ylim(bottom=0)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=4, fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    files.save_figure(fig, path)
    return fig


# ----------------------------------------------------------------------------- wandb

WANDB_PROBE_SECONDS = 5  # how long wandb's server may take to accept a connection before the run logs offline


def _wandb_server_unreachable():
    """Why wandb's server (WANDB_BASE_URL, else api.wandb.ai) cannot be reached, in a few words; None if it can.
    Asked first, because wandb.init itself retries for ~90 s before it fails with a traceback."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=WANDB_PROBE_SECONDS).close()
        return None
    except OSError as e:
        return f"{url.hostname}:{port} cannot be reached ({e.strerror or type(e).__name__})"


def start_wandb(config, resume_id=None):
    """
    The wandb module with a run started (train.py's --wandb_log=True), continuing run resume_id if given. Without
    network or without an API key the run logs offline (`wandb sync` uploads it later), with one note saying why:
    a run never dies, stalls or prints a traceback for its logging. None, with a note, if wandb cannot even do that.
    """
    import wandb

    options = dict(project=config["wandb_project"], name=config["wandb_run_name"], id=resume_id,
                   resume="allow" if resume_id else None, config=config, allow_val_change=True)
    why = None
    if os.environ.get("WANDB_MODE", "online") not in ("offline", "dryrun", "disabled"):
        why = _wandb_server_unreachable()
    try:
        if why is None:
            try:
                wandb.init(**options)
            except Exception as e:  # no API key (wandb.errors.UsageError), a key the server refuses, ...
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        if why is not None:
            wandb.init(mode="offline", **options)
            print(f"note: wandb logs offline ({why}); upload later with: wandb sync {os.path.dirname(wandb.run.dir)}")
    except Exception as e:
        print(f"note: no wandb logging ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return None
    wandb.define_metric("step")
    wandb.define_metric("*", step_metric="step")  # our step is the x axis, across resumes too
    return wandb


# ----------------------------------------------------------------------------- the run log

class RunLog:
    """What train.py reports about a run, in one place (see the module docstring)."""

    def __init__(self, config, gpt, meta, rt, start_iter, tokens_per_iter, peak_flops, compiled, wandb_run_id=None):
        self.c, self.gpt, self.rt, self.master = config, gpt, rt, rt.rank == 0
        self.start_iter, self.tokens_per_iter, self.out_dir = start_iter, tokens_per_iter, config["out_dir"]
        self.max_iters, self.eval_only = config["max_iters"], config["eval_only"]
        self.writes = self.master and not self.eval_only  # an evaluation leaves the run's records alone
        self.t_start = self.t_last_step = time.time()
        self.t_plot = -math.inf  # when loss.png was last drawn
        self.last_line_step, self.dt_ema, self.dt_provisional, self.eval_seconds = start_iter, None, True, 0.0
        self.clipped = torch.zeros((), dtype=torch.long, device=rt.device)  # clipped steps since the last line
        self.best, self.warnings = None, 0  # (val loss, step, val bpb) of the best eval
        self.curve = (array("d"), array("d"), array("d"))  # steps, losses, lrs of the step lines, for loss.png
        self.evals = []
        self.task_scores = []  # the tasks records (--eval_every), for loss.png
        vocab_size = gpt.config.vocab_size

        # the tokenizer: bits per byte at evals, and samples
        self.tok, self.token_bytes, note = None, None, None
        try:
            self.tok = load_tokenizer(meta, vocab_size)
            self.token_bytes = self.tok.token_bytes(vocab_size).to(rt.device)
        except UserError as e:
            note = f"no bits per byte or samples: {e}"
        self.prompt_ids = None
        if self.tok is not None and config["sample_interval"] > 0:
            try:
                self.prompt_ids = self.tok.encode(config["sample_prompt"], allow_special=True) or None
            except UserError as e:
                note = f"no samples during training: --sample_prompt={config['sample_prompt']!r}: {e}"
        self.doctor = Doctor(self.tok.valid_vocab if self.tok else vocab_size, config["warmup_iters"],
                             config["grad_clip"], quiet_steps=max(config["eval_interval"], 10 * config["log_interval"]))

        # metrics.jsonl: a resumed run continues the file, a new run starts it anew (at its first save, where an
        # earlier run's file is: saved())
        self.file, self.elapsed_before = None, 0.0
        if self.writes:
            resumed = config["init_from"] == "resume"
            files.check_file(os.path.join(self.out_dir, PLOT))
            self.file = MetricsFile(os.path.join(self.out_dir, METRICS), start_iter if resumed else None)
            for r in self.file.kept:
                self._remember(r)
                self.elapsed_before = max(self.elapsed_before, r.get("elapsed_s") or 0.0)

        # wandb: a resumed run continues the checkpoint's wandb run
        self.wandb, self.wandb_run_id = None, wandb_run_id  # kept through runs without wandb too
        if config["wandb_log"] and self.master:
            resume_id = wandb_run_id if config["init_from"] == "resume" and not self.eval_only else None
            self.wandb = start_wandb(config, resume_id)
            self.wandb_run_id = self.wandb.run.id if self.wandb else wandb_run_id  # saved in the checkpoints

        if self.master:
            self._header(peak_flops, compiled)
            if note:
                print(f"note: {note}")

    # ------------------------------------------------------------------------- header
    def _header(self, peak_flops, compiled):
        c, gpt, rt = self.c, self.gpt, self.rt
        total = sum(p.numel() for p in gpt.parameters())  # wte is tied to lm_head: counted once
        embedding = sum(gpt.transformer[k].weight.numel() for k in ("wte", "wpe") if k in gpt.transformer)
        flops_per_token = gpt.flops_per_token()
        horizon_tokens = self.max_iters * self.tokens_per_iter
        accum = c["gradient_accumulation_steps"] // rt.world_size
        peak, peak_source = peak_flops
        print(f"model: {human(total)} parameters ({human(total - embedding)} non-embedding), {gpt.config.n_layer} "
              f"layers, {gpt.config.n_embd} wide, vocab {gpt.config.vocab_size:,}; "
              f"{human(flops_per_token)} FLOPs per token")
        given = " (total_batch_size)" if c.get("total_batch_size") else ""
        print(f"batch: {self.tokens_per_iter:,} tokens per step{given} = {c['batch_size']} sequences x "
              f"{gpt.config.block_size} tokens x {accum} micro-steps x {rt.world_size} process(es)")
        print(f"horizon: {self.max_iters:,} steps = {human(horizon_tokens)} tokens"
              f"{f' (from step {self.start_iter:,})' if self.start_iter else ''}, "
              f"{horizon_tokens / total:.1f} tokens per parameter (compute-optimal: ~{CHINCHILLA}), "
              f"{flops_per_token * horizon_tokens:.2e} FLOPs in all"
              f"{f'; set by {rule}' if (rule := c.get('horizon_rule')) else ''}")
        trainable = sum(p.numel() for p in gpt.parameters() if p.requires_grad)
        if trainable < total:  # freeze_layers (lib/freeze.py)
            print(f"trainable: {human(trainable)} of {human(total)} parameters ({100 * trainable / total:.1f}%), "
                  f"freeze_layers={c.get('freeze_layers')}, unfreeze_every={c.get('unfreeze_every')}")
        how = f" ({c.get('parallelism', 'ddp')})" if rt.world_size > 1 else ""
        how += ", activation checkpointing" if c.get("activation_checkpointing") else ""
        compile_state = "on" if compiled else f"off ({why_not_compile(rt.device_type)})" if c.get("compile") else "off"
        print(f"device: {rt.device} {rt.dtype}, compile {compile_state}, {rt.world_size} process(es){how}, "
              f"MFU against {peak / 1e12:.3g} TFLOP/s ({peak_source})")

    # ------------------------------------------------------------------------- records
    def _remember(self, r):
        """Keep what loss.png and the summary need from a record."""
        if r.get("kind") == "step" and r.get("loss") is not None:
            for series, v in zip(self.curve, (r["step"], r["loss"], r.get("lr"))):
                series.append(v if v is not None else float("nan"))
        elif r.get("kind") == "tasks":
            self.task_scores.append(r)
        elif r.get("kind") == "eval" and r.get("val_loss") is not None:
            self.evals.append(r)
            if self.best is None or r["val_loss"] < self.best[0]:
                self.best = (r["val_loss"], r["step"], r.get("val_bpb"))

    def _record(self, kind, step, **fields):
        record = {"kind": kind, "step": step, **{k: finite_or_none(v) if isinstance(v, float) else v
                                                 for k, v in fields.items()}}
        if self.file is not None:
            self.file.append(record)
        if self.wandb is not None:
            self.wandb.log({"step": step, **{f"{kind}/{k}": v for k, v in record.items() if k not in ("kind", "step")}})
        return record

    def _warn(self, step, warnings):
        for check, message in warnings:
            self.warnings += 1
            print(f"warning: {message}")
            self._record("warning", step, check=check, message=message)

    # ------------------------------------------------------------------------- the loop's calls
    def count_step(self, grad_norm):
        """After every optimizer step: one more clipped step if the norm (before clipping) was over grad_clip."""
        if self.c["grad_clip"] > 0:
            self.clipped += grad_norm > self.c["grad_clip"]
        self.t_last_step = time.time()

    def step(self, step, loss, lr, grad_norm, dt, mfu, skipped_total=0, skipped_streak=0):
        """A log line after step `step`; loss is already averaged over micro-steps and ranks (mean_over_ranks)."""
        clipped, steps = int(self.clipped), step - self.last_line_step
        self.clipped.zero_()
        now = time.time()
        if self.dt_ema is None or self.dt_provisional:  # the first line's dt includes warmup and compilation
            self.dt_ema, self.dt_provisional = dt, self.dt_ema is None
        else:
            self.dt_ema = 0.9 * self.dt_ema + 0.1 * dt
        self.last_line_step = step
        if not self.master:
            return
        elapsed = self.elapsed_before + now - self.t_start
        every = self.c["eval_interval"]
        evals_left = self.max_iters // every - step // every + (1 if self.max_iters % every else 0)
        eta = (self.max_iters - step) * self.dt_ema + evals_left * self.eval_seconds
        tok_s = self.tokens_per_iter / dt
        clip = f" (clipped {clipped}/{steps})" if self.c["grad_clip"] > 0 else ""
        bad = f", {skipped_total} skipped non-finite steps ({skipped_streak} in a row)" if skipped_total else ""
        print(f"iter {step}: loss {loss:.4f}, lr {lr:.2e}, grad norm {grad_norm:.2f}{clip}, {dt * 1000:.2f}ms, "
              f"{tok_s:,.0f} tok/s, mfu {f'{mfu:.2%}' if mfu >= 0 else '--'}{bad} | {step}/{self.max_iters} "
              f"({step / max(self.max_iters, 1):.1%}), {duration(elapsed)} elapsed, eta {duration(eta)}")
        r = self._record("step", step, tokens=step * self.tokens_per_iter, loss=loss, lr=lr, grad_norm=grad_norm,
                         clipped=clipped, clip_steps=steps, ms_per_iter=dt * 1000, tok_per_s=tok_s,
                         mfu=mfu if mfu >= 0 else None, elapsed_s=round(elapsed, 3), eta_s=round(eta, 3),
                         skipped=skipped_total, time=now)
        self._remember(r)
        self._warn(step, self.doctor.step(step, loss, steps, clipped, grad_norm, tok_s, elapsed, skipped_total))

    def eval(self, step, losses, best_val_loss, saved=False):
        """The eval line at step `step` (after any checkpoint was written); refreshes loss.png."""
        self.eval_seconds = time.time() - self.t_last_step  # evaluation and saving, for the ETA
        if not self.master:
            return
        val, bpb = losses["val"], losses.get("val_bpb")
        line = f"step {step}: train loss {losses['train']:.4f}, val loss {val:.4f}" \
               f"{f' | val bpb {bpb:.4f}' if bpb is not None else ''}"
        if self.eval_only:
            print(line)
            if self.wandb is not None:
                self._record("eval", step, train_loss=losses["train"], val_loss=val, val_bpb=bpb)
            return
        if val <= best_val_loss:
            self.best = (val, step, bpb)
        best_step = self.best[1] if self.best and self.best[0] <= best_val_loss else None  # unknown: no records
        print(f"{line} | best val loss {best_val_loss:.4f}"
              f"{' (this eval)' if best_step == step else f' (step {best_step})' if best_step is not None else ''}"
              f" | {'checkpoint saved' if saved else 'no checkpoint'}")
        best_bpb = self.best[2] if best_step is not None else None
        r = self._record("eval", step, tokens=step * self.tokens_per_iter, train_loss=losses["train"], val_loss=val,
                         val_bpb=bpb, best_val_loss=best_val_loss, best_val_bpb=best_bpb, saved=saved,
                         elapsed_s=round(self.elapsed_before + time.time() - self.t_start, 3), time=time.time())
        self._remember(r)
        self._warn(step, self.doctor.eval(step, losses["train"], val))
        if time.time() - self.t_plot >= PLOT_SECONDS:
            self.plot()

    def tasks(self, step, report):
        """train.py's eval_every line (a core_eval.Report: CORE, HellaSwag, ...), into metrics.jsonl and wandb too."""
        if self.writes:
            print(f"eval at step {step}: {report.summary()}")
            self._remember(self._record("tasks", step, **report.record()))

    def saved(self):
        """After every checkpoint save (rank 0): the first one of a run that started over replaces the earlier run's
        metrics.jsonl and loss.png, which stayed until then."""
        if self.file is not None and self.file.pending is not None:
            self.file.commit()
            self.plot()

    def plot(self):
        self.t_plot = time.time()
        if self.writes and (self.curve[0] or self.evals) and self.file.pending is None:
            name = os.path.basename(os.path.abspath(self.out_dir))
            best = min((e["val_loss"] for e in self.evals), default=None)
            plot_losses(os.path.join(self.out_dir, PLOT), *self.curve, self.evals, self.tokens_per_iter,
                        f"{name}: {self.gpt.config.n_layer} layers x {self.gpt.config.n_embd}"
                        f"{f', best val loss {best:.4f}' if best is not None else ''}", self.task_scores)

    def maybe_sample(self, step):
        """Every sample_interval steps, and at the last: a short sample from sample_prompt. Returns whether it
        sampled (the caller leaves that time out of the step timing)."""
        every = self.c["sample_interval"]
        if not (self.writes and self.prompt_ids and every > 0 and step > self.start_iter
                and (step % every == 0 or step == self.max_iters)):
            return False
        t0, was_training = time.time(), self.gpt.training
        self.gpt.eval()
        # a fixed seed: the same randomness at every sample, so they differ only by what the model learned;
        # the training RNG is untouched in effect, since every step reseeds it (step.seed_iteration)
        torch.manual_seed(self.c["seed"])
        x = torch.tensor(self.prompt_ids, dtype=torch.long, device=self.rt.device)[None]
        decoding = for_decoding(self.rt, self.c.get("dtype", "auto"), self.gpt.config.n_embd)  # as sample.py decodes
        with torch.no_grad(), decoding.autocast:
            y = self.gpt.generate(x, self.c["sample_tokens"], temperature=0.8, top_k=200,
                                  vocab_limit=self.tok.valid_vocab)
        self.gpt.train(was_training)
        text = self.tok.decode(y[0, len(self.prompt_ids):].tolist())
        shown = (self.c["sample_prompt"] + text).rstrip("\n").split("\n")
        print(f"sample at step {step} ({len(y[0]) - len(self.prompt_ids)} tokens after "
              f"{self.c['sample_prompt']!r}, {time.time() - t0:.1f}s):")
        print("\n".join(f"  > {line}" for line in shown))
        self._record("sample", step, prompt=self.c["sample_prompt"], text=text)
        return True

    def finish(self, step):
        """The summary (rank 0), loss.png a last time, and wandb.finish(), on every normal way out of training."""
        if self.master and not self.eval_only:
            self.plot()
            memory, source = peak_memory(self.rt.device)
            wall = time.time() - self.t_start
            total_wall = self.elapsed_before + wall
            files = [f for f in ("ckpt.pt", "best.pt", "ckpt.dcp", "best.dcp")  # .dcp: checkpoint_format='sharded'
                     if os.path.exists(os.path.join(self.out_dir, f))]
            snapshots = sorted(f for f in os.listdir(self.out_dir)
                               if f.startswith("ckpt_") and f.endswith((".pt", ".dcp")))
            print(f"summary: {step:,} steps ({step - self.start_iter:,} in this run), "
                  f"{human(step * self.tokens_per_iter)} tokens seen, {duration(wall)} wall time"
                  f"{f' ({duration(total_wall)} with earlier runs)' if self.elapsed_before else ''}, "
                  f"peak memory {memory / 2**20:,.1f} MiB ({source})")
            best, best_step, bpb = self.best or (None, None, None)
            if best is not None:
                print(f"summary: best val loss {best:.4f}{f' ({bpb:.4f} bits per byte)' if bpb is not None else ''} "
                      f"at step {best_step:,}; {self.warnings} doctor warning(s) in this run")
            print(f"summary: in {self.out_dir}: {', '.join(files + snapshots) or 'no checkpoints'}, {METRICS}, {PLOT}")
            if files:
                print(f"summary: sample with: python sample.py --out_dir={self.out_dir}")
            self._record("summary", step, steps_this_run=step - self.start_iter, tokens=step * self.tokens_per_iter,
                         wall_s=round(wall, 3), elapsed_s=round(total_wall, 3), peak_memory_bytes=memory,
                         best_val_loss=best, best_val_bpb=bpb, best_step=best_step, warnings=self.warnings)
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
