"""
The optimizer step and the evaluation, shared by train.py and bench.py so that the benchmark times
exactly the code that trains; the handler that turns SIGTERM / Ctrl-C into a clean stop; and the check, before a
model is allocated, that its training fits in memory and how long a step will take (check_size).
"""

import math
import os
import signal
import sys
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch.nn import functional as F

from lib import parallel
from lib.batches import EVAL
from lib.runtime import UserError, available_memory, human_bytes, peak_flops, training_memory


def manual_seed(seed):
    """torch.manual_seed for the generators in use: the CPU's, and CUDA's once CUDA is initialized. torch.manual_seed
    itself also queues a seed for a CUDA that may start later, formatting the caller's stack trace each time: on a
    CPU-only torch, 50 us from a shallow stack and more from the training loop's, twice per step."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    elif torch.backends.mps.is_available():
        torch.mps.manual_seed(seed)


def seed_iteration(seed, rank, iter_num):
    """Dropout draws from (seed, rank, iteration): a resumed run is exact with no RNG state to restore. train.py
    passes rank 0 on every rank, and train_step reseeds each micro-step by its index in the whole step, so the
    dropout masks too are the same for 1, 2 or 8 ranks."""
    manual_seed(int(np.random.SeedSequence([seed, rank, iter_num]).generate_state(1)[0]))


def train_step(model, optimizer, scaler, batches, iter_num, accum_steps, autocast, grad_clip, rank=0, world_size=1,
               stop=None):
    """
    One optimizer step over accum_steps micro-batches. Returns (loss, grad_norm, skipped) as device tensors,
    so nothing here waits for the GPU. A step whose gradients are not finite is skipped: no update at all.
    Under torchrun, rank r draws the step's micro-batches r * accum_steps ... (r + 1) * accum_steps - 1: the
    batches of a step are the same for 1, 2 or 8 ranks with the same total accumulation.
    The loss is the mean over the step's targets: with every target trained (text), the mean of the micro-steps'
    means; with a loss mask (chat data: lib/chat_data.py), micro-batches weigh by how many trained targets they hold.
    stop (a StopSignal): a signal during the forward and backward passes abandons the step (StepAbandoned): the
    weights change only at the optimizer step, so they are still those before it.
    """
    first = rank * accum_steps  # this rank's first micro-batch, by its index in the whole step
    base_seed = torch.initial_seed()  # seed_iteration's; micro-step k of the step draws dropout from base_seed + k
    mean_loss = 0.0  # over the micro-batches
    try:
        with stop.abandonable() if stop is not None else nullcontext():
            weights = batches.loss_weights(iter_num, first, accum_steps, world_size) \
                if hasattr(batches, "loss_weights") else None
            X, Y = batches.get("train", iter_num, first)
            for micro_step in range(accum_steps):
                # under DDP or FSDP, reduce the gradients over ranks only after the last micro-step
                parallel.set_gradient_sync(model, micro_step == accum_steps - 1)
                manual_seed(base_seed + first + micro_step)
                with autocast:
                    _, loss = model(X, Y)
                    # the gradient of the mean over all the step's targets
                    loss = loss / accum_steps if weights is None else loss * weights[micro_step]
                if micro_step + 1 < accum_steps:
                    X, Y = batches.get("train", iter_num, first + micro_step + 1)  # prepared while the device computes
                else:
                    batches.prefetch("train", iter_num + 1, first)  # the next step's first batch, ready before the end
                scaler.scale(loss).backward()
                mean_loss = mean_loss + loss.detach()
    except StepAbandoned:
        optimizer.zero_grad(set_to_none=True)  # the partial gradients go; the weights never saw them
        raise
    for opt in getattr(optimizer, "optimizers", (optimizer,)):  # optim.MuonAdamW holds two
        scaler.unscale_(opt)  # clip the true gradients (no-op unless float16)
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    grad_norm = parallel.full_tensor(grad_norm)  # under FSDP a (replicated) DTensor: as a plain tensor
    skipped = ~torch.isfinite(grad_norm)  # a NaN or inf loss makes the gradients non-finite too
    if hasattr(optimizer, "optimizers"):  # optim.MuonAdamW: both step, or neither (one host sync, for Muon)
        optimizer.step(skipped, scaler)
    elif scaler.is_enabled():
        scaler.step(optimizer)  # the float16 grad scaler skips non-finite steps itself
        scaler.update()
    elif optimizer.defaults.get("fused"):
        optimizer.found_inf = skipped.float()  # the fused kernel skips the update on the device: no host sync
        optimizer.step()
    elif not skipped.item():  # other optimizers need the host to decide
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, grad_norm, skipped


@torch.no_grad()
def estimate_loss(model, batches, eval_iters, autocast, world_size=1, token_bytes=None, stop=None):
    """
    Mean loss over the same eval_iters batches of each split every time. Every rank scores the same batches (FSDP
    needs every rank in every forward pass), so the mean does not depend on the number of ranks. With token_bytes
    (the UTF-8 bytes each token id stands for: tokenizer.token_bytes) also out['val_bpb'], val bits per byte:
    the nats summed over the val targets / (ln 2 * the bytes they stand for), which compares across tokenizers.
    Targets that stand for no bytes (special tokens) are left out of both sums. stop: a signal abandons it.
    """
    with stop.abandonable() if stop is not None else nullcontext():
        try:
            model.eval()
            return _estimate_loss(model, batches, eval_iters, autocast, world_size, token_bytes)
        finally:
            model.train()


def _estimate_loss(model, batches, eval_iters, autocast, world_size, token_bytes):
    out = {}
    nats_bytes = torch.zeros(2, device=batches.device)  # val: the sum of nats, the sum of bytes
    for split in ("train", "val"):
        losses = torch.zeros(eval_iters, device=batches.device)
        for k in range(eval_iters):
            X, Y = batches.get(split, k, stream=EVAL)
            with autocast:
                logits, losses[k] = model(X, Y)
                if split == "val" and token_bytes is not None:
                    y = Y.view(-1)
                    nats = F.cross_entropy(logits.view(-1, logits.size(-1)), y, ignore_index=-1, reduction="none")
                    nbytes = token_bytes[y.clamp(min=0)] * (y >= 0)
                    nats_bytes += torch.stack([(nats.float() * (nbytes > 0)).sum(), nbytes.sum().float()])
                del logits  # not held through the next forward pass
        mean = losses.mean()
        if world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
            if split == "val" and token_bytes is not None:
                dist.all_reduce(nats_bytes, op=dist.ReduceOp.SUM)
        out[split] = mean.item()
    if token_bytes is not None:
        nats, nbytes = nats_bytes.tolist()
        out["val_bpb"] = nats / (math.log(2) * nbytes) if nbytes else float("nan")
    return out


class StepAbandoned(BaseException):
    """
    A signal arrived during a training step's forward and backward passes, or an evaluation (StopSignal.abandonable):
    the weights are as they were before it, and train.py saves them and stops at once instead of finishing it. A
    BaseException, like KeyboardInterrupt, so that no library's `except Exception` takes it for its own error.
    """


class Interrupted(UserError):
    """A second Ctrl-C: the run ends at once, with one line and exit status 1."""


class StopSignal:
    """
    SIGTERM (a scheduler preempting the job) or Ctrl-C asks training to stop: it saves a checkpoint and exits 0.
    In one process a step (or evaluation) under way is abandoned (abandonable), so that happens within seconds
    whatever a step costs; ranks of torchrun, which must agree, finish the step and stop together. A second Ctrl-C
    interrupts at once (even mid-save) with exit 1, also when it lands in a garbage-collection callback or a
    __del__, where Python would only print the exception and go on.
    """

    def __init__(self, world_size=1, interrupted=lambda: "interrupted"):
        # interrupted(): the line to print when a second Ctrl-C interrupts at once (the last good checkpoint)
        self.received, self.world_size, self.group, self.interrupted = None, world_size, None, interrupted
        self.in_abandonable = False
        if world_size > 1:
            import torch.distributed as dist

            # agree on the flag over a CPU (gloo) group: checking it every step then never waits for the GPU
            if dist.get_backend() != "gloo":
                self.group = dist.new_group(backend="gloo")
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        self._unraisable = sys.unraisablehook
        sys.unraisablehook = self._swallowed

    @property
    def now(self):
        """A signal this process stops on at once: skip what is left before saving (one process only)."""
        return self.received is not None and self.world_size == 1

    @contextmanager
    def abandonable(self):
        """Work that a signal may abandon (StepAbandoned) because it changes no state: in one process only."""
        if self.now:
            raise StepAbandoned(self.received)
        self.in_abandonable = self.world_size == 1
        try:
            yield
        finally:
            self.in_abandonable = False

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise Interrupted(self.interrupted())  # one line, exit 1; a checkpoint being written is left unchanged
        self.received = signal.Signals(signum).name
        if self.in_abandonable:
            self.in_abandonable = False
            raise StepAbandoned(self.received)

    def _swallowed(self, unraisable):
        """sys.unraisablehook: an exception Python cannot raise (in a gc callback, a __del__) and would only print.
        The second Ctrl-C's still ends the run; a StepAbandoned lost there leaves the step to finish."""
        if isinstance(unraisable.exc_value, Interrupted):
            print(f"error: {unraisable.exc_value}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)
        if not isinstance(unraisable.exc_value, StepAbandoned):
            self._unraisable(unraisable)

    def should_stop(self):
        """True on every rank as soon as any rank received a signal."""
        if self.world_size == 1:
            return self.received is not None
        import torch.distributed as dist

        flag = torch.tensor([int(self.received is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())


def model_size(cfg):
    """(parameters, training FLOPs per token) of a GPT of model.GPTConfig cfg, as model.GPT counts them
    (get_num_params(False), flops_per_token()), without building it: a GPT of the size asked for may not fit
    (tests/test_limits.py checks the two agree)."""
    C, V, T, L = cfg.n_embd, cfg.vocab_size, cfg.block_size, cfg.n_layer
    norm = 0 if cfg.rmsnorm else C * (2 if cfg.bias else 1)  # LayerNorm's weight and bias; RMSNorm has none

    def linear(n_in, n_out):
        return n_in * n_out + (n_out if cfg.bias else 0)
    block = 2 * norm + linear(C, 3 * C) + linear(C, C) + linear(C, 4 * C) + linear(4 * C, C) + (2 if cfg.x0_mix else 0)
    lookups = (0 if cfg.rotary else T * C) + (0 if cfg.tie_head else V * C)  # wpe, and an untied wte
    total = V * C + lookups + L * block + norm
    return total, 6 * (total - lookups) + 12 * L * C * T  # 12 * L * H * (C / H) * T: attention


def check_size(model_config, rt, config, accum_steps):
    """
    Before a model is allocated (train.py, a model from scratch): the memory its training needs at the least
    (runtime.training_memory) against what the device has, refused in one line with the estimate and what to change
    if it cannot fit; and a note when one step will take a minute or more even at the device's peak FLOP/s
    (runtime.peak_flops), so that a run which prints nothing for minutes has said why first.
    """
    n_params, flops_per_token = model_size(model_config)
    shards = rt.world_size if config["parallelism"] == "fsdp" else 1
    parts = training_memory(n_params, model_config, config["batch_size"], rt.dtype, rt.device_type,
                            config["optimizer"], config["activation_checkpointing"], shards)
    need, (have, what) = sum(parts.values()), available_memory(rt.device)
    if have is not None and need > have:
        if need - parts["activations"] > have / 2:  # the model itself
            fix = "a smaller model (--n_layer, --n_embd or --depth)" + (
                ", or shard it over more GPUs (torchrun, --parallelism=fsdp)" if rt.device_type == "cuda" else "")
        else:
            fix = ("a smaller --batch_size (a larger --gradient_accumulation_steps keeps the tokens per step), a "
                   "smaller --block_size, or --activation_checkpointing=True")
        raise UserError(f"training this model ({n_params:,} parameters) with batch_size={config['batch_size']} and "
                        f"block_size={model_config.block_size} needs at least {human_bytes(need)} of memory "
                        f"({', '.join(f'{k} {human_bytes(v)}' for k, v in parts.items())}), but {rt.device} has "
                        f"{human_bytes(have)} ({what}): use {fix}")
    flops = flops_per_token * accum_steps * config["batch_size"] * model_config.block_size  # per process
    peak, source = peak_flops(rt.device, rt.dtype)
    if flops / peak >= 60 and rt.rank == 0:
        print(f"note: one step is {flops:.2g} FLOPs per process: at least {flops / peak / 60:,.0f} minutes at the "
              f"device's peak of {peak / 1e12:.3g} TFLOP/s ({source}), more in practice, before the first step line "
              f"(Ctrl-C or SIGTERM stops it within seconds)", flush=True)
