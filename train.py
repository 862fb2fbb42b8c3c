"""
Train a GPT, on one CPU or GPU or on many GPUs with torchrun (DDP, or FSDP2 with --parallelism=fsdp: lib/parallel.py).

    python train.py config/train_shakespeare_char.py              # one device
    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False
    torchrun --standalone --nproc_per_node=8 train.py config/train_shakespeare_char.py \
        --gradient_accumulation_steps=8                                     # 8 GPUs, one node

Settings: the defaults below, then config files, then --key=value overrides (see configurator.py).
"""

import gc
import math
import os
import sys
import time

import torch

from configurator import configure
from lib import chat, chat_data, checkpoint, core_eval, finetune, freeze, optim, parallel, scaling
from lib.batches import dataset_dir
from lib.metrics import RunLog, mean_over_ranks
from lib.runtime import UserError, can_compile, install_error_hook, peak_flops, setup
from lib.step import StepAbandoned, StopSignal, check_size, estimate_loss, seed_iteration, train_step
from model import GPT, GPTConfig

# ----------------------------------------------------------------------------- settings (defaults: GPT-2 124M)
# I/O
out_dir = "out"
eval_interval = 2000  # evaluate (and maybe checkpoint) every this many steps
log_interval = 1  # print a line every this many steps; the only place the loop waits for the GPU
eval_iters = 200  # batches per split in each evaluation
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # write ckpt.pt at every evaluation, not only when val loss improves
keep_last_n = 0  # also keep the last n checkpoints as ckpt_NNNNNNN.pt (0: none)
checkpoint_format = "full"  # 'full': one ckpt.pt file; 'sharded': ckpt.dcp/, every rank writes its shard (big FSDP)
init_from = "scratch"  # 'scratch', 'resume', 'gpt2'..'gpt2-xl', a HF GPT-2 folder, or a checkpoint to finetune (a .pt)
overwrite = False  # let a run that does not resume replace the checkpoints already in out_dir
# wandb logging
wandb_log = False
wandb_project = "owt"
wandb_run_name = "gpt2"
# data
dataset = "openwebtext"  # a folder under data/ (or an absolute path) holding train.bin, val.bin, meta.json
gradient_accumulation_steps = 5 * 8  # micro-steps per optimizer step, in total over all ranks
batch_size = 12  # sequences per micro-step per rank
block_size = 1024  # tokens per sequence
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # 0 for pretraining, 0.1+ for finetuning
bias = False  # biases in Linears and LayerNorms?
# AdamW
learning_rate = 6e-4  # peak learning rate
max_iters = 600000  # optimizer steps in total
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the gradient norm to this (0: no clipping)
# learning rate schedule: linear warmup, then cosine decay to min_lr
decay_lr = True
warmup_iters = 2000
lr_decay_iters = 600000  # ~= max_iters per Chinchilla
min_lr = 6e-5  # ~= learning_rate / 10 per Chinchilla
# faults
max_bad_steps = 25  # stop after this many skipped (non-finite) steps in a row
# system
device = "auto"  # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto' (CUDA: bfloat16 > float16; CPU: native bfloat16 > float32), 'float32', 'bfloat16', 'float16'
compile = True  # torch.compile the model (skipped where it does not work)
seed = 1337
# what the run shows and keeps (lib/metrics.py): out_dir/metrics.jsonl and loss.png, samples, the training doctor
sample_interval = 2000  # print a short sample every this many steps, and at the end (0: never)
sample_prompt = "\n"  # the prompt of those samples
sample_tokens = 100  # the length of those samples, in tokens
eval_every = 0  # score eval_tasks every this many steps and at the end, on BPE runs (0: never; docs/eval.md)
eval_tasks = "core"  # as eval.py's --tasks: 'core' (CORE's 22 tasks), 'hellaswag', or task names, comma-separated
eval_limit = 500  # at most this many examples per task (0: all): an estimate, the same examples every time
eval_bundle = ""  # CORE's eval bundle folder ('': downloaded once into data/eval_bundle/)
hellaswag_file = ""  # hellaswag_val.jsonl for eval_tasks='hellaswag' ('': downloaded once into data/hellaswag/)
# many processes and big models (lib/parallel.py)
parallelism = "ddp"  # under torchrun: 'ddp' (a full copy per GPU) or 'fsdp' (FSDP2: weights, grads, AdamW sharded)
activation_checkpointing = False  # recompute each Block in backward: less activation memory, ~1/3 more compute
total_batch_size = 0  # tokens per optimizer step over all ranks; sets gradient_accumulation_steps (0: off)
# experiments (lib/scaling.py, lib/freeze.py)
target_flops = 0.0  # total training FLOPs, which then set max_iters (and lr_decay_iters unless given); 0: off
tokens_per_param = 0.0  # or tokens per parameter (Chinchilla: ~20), which then set max_iters; 0: off
depth = 0  # the depth dial: n_layer=depth, n_embd=depth_aspect*depth, heads of size 64; explicit ones win; 0: off
depth_aspect = 64  # the dial's width per layer
freeze_layers = 0  # finetuning: freeze the embeddings and the bottom freeze_layers blocks (0: train everything)
freeze_train_head = True  # with freeze_layers: still train ln_f and the head (tied to wte: the token embedding)
unfreeze_every = 0  # progressive unfreezing: one more block trains every this many steps (0: never)
# the recipe (model.GPTConfig, lib/optim.py): 'gpt2' is GPT-2 with AdamW and cosine; 'modern' turns on everything below
# (optim.RECIPES); a setting given in a config file or on the command line wins over the recipe's
recipe = "gpt2"  # 'gpt2' or 'modern'
rotary = False  # rotary position embeddings instead of the learned position table
rmsnorm = False  # parameter-free RMSNorm instead of LayerNorm
qk_norm = False  # RMS-normalize queries and keys per head
relu2 = False  # ReLU^2 MLP instead of GELU
zero_init = False  # output projections into the residual stream start at zero
tie_head = True  # lm_head shares wte's weight (False: an untied output matrix)
logit_softcap = 0.0  # > 0: logits squashed into (-cap, cap) by cap * tanh(logits / cap)
x0_mix = False  # embedding shortcut: every block mixes in the embeddings, x = a_i * x + b_i * x0 (learned)
optimizer = "adamw"  # 'adamw', or 'muon': Muon (muon_lr) for the blocks' Linears, AdamW (learning_rate) for the rest
muon_lr = 0.02  # Muon's peak lr (scheduled like learning_rate)
muon_momentum = 0.95
lr_schedule = "cosine"  # 'cosine' (warmup, cosine to min_lr) or 'wsd' (warmup, stable, linear cooldown)
cooldown_frac = 0.4  # wsd: the final fraction of lr_decay_iters spent cooling down
final_lr_frac = 0.0  # wsd: the lr at the end of the cooldown, as a fraction of the peak
max_seconds = 0.0  # > 0: stop and save once the loop has run this long (wall time, evals included; per process)
target_val_loss = 0.0  # > 0: stop and save at the first evaluation with val loss <= this (time to a target loss)
# -----------------------------------------------------------------------------
install_error_hook()
config, explicit = configure(globals(), sys.argv[1:])
recipe_keys = optim.recipe_settings(recipe, explicit)  # what the config file and the command line did not set
globals().update(recipe_keys)
config.update(recipe_keys)
dial = scaling.apply_depth_dial({}, explicit, depth, depth_aspect)  # depth=N: n_layer, n_embd, n_head
globals().update(dial)
config.update(dial)

# ----------------------------------------------------------------------------- where and how to run
rt = setup(device, dtype, distributed=True)
rank, local_rank, world_size, device, device_type, dtype, ctx = (rt.rank, rt.local_rank, rt.world_size, rt.device,
                                                                 rt.device_type, rt.dtype, rt.autocast)
master = rank == 0  # the process that logs and writes checkpoints
if max_seconds > 0 and world_size > 1:
    raise UserError("max_seconds works in one process only (ranks' clocks would disagree on when to stop)")
if unfreeze_every and optimizer == "muon":
    raise UserError("unfreeze_every works with optimizer='adamw' only (Muon's groups are fixed when it is built)")
checkpoint.check_format(checkpoint_format, optimizer)
source = finetune.source(init_from, out_dir)  # a checkpoint of this repo to finetune (weights, tokenizer), or None
if decay_lr and not warmup_iters < lr_decay_iters:
    raise UserError(f"warmup_iters={warmup_iters} must be smaller than lr_decay_iters={lr_decay_iters}")
if master and not eval_only:
    checkpoint.check_writable(out_dir)
    out_dir_lock = checkpoint.lock(out_dir)  # one training run per out_dir; released when this process ends
    checkpoint.guard(out_dir, init_from, overwrite)  # never replace a trained model by mistake

# ----------------------------------------------------------------------------- model and data
resume_path = os.path.join(out_dir, checkpoint.FORMATS[checkpoint_format])  # where this run saves
state = source_state = None
if init_from == "resume":
    loaded_path, state = checkpoint.load_latest(out_dir, checkpoint_format)  # a .dcp: weights come after wrapping
    kept = checkpoint.check_model_args(state, loaded_path, config, explicit)  # its shape, optimizer, frozen layers
    globals().update(kept)
    config.update(kept)
elif source:  # its architecture, and its block_size unless a shorter one is asked for
    source_state, arch = finetune.load(source, config, explicit)
    globals().update(arch)
    config.update(arch)
accum_steps = parallel.accumulation(total_batch_size, gradient_accumulation_steps, batch_size, block_size, world_size)
gradient_accumulation_steps = config["gradient_accumulation_steps"] = accum_steps * world_size
batches = chat_data.open_batches(dataset_dir(dataset), block_size, batch_size, device, seed)  # chat data: masked

iter_num, best_val_loss = 0, float("inf")
saved_iter = state["iter_num"] if init_from == "resume" else None  # the iteration ckpt.pt holds, once there is one
torch.manual_seed(seed)  # the same initial weights on every rank and every run
if init_from == "scratch":
    vocab_size = batches.vocab_size or 50304  # GPT-2's 50257 padded to a multiple of 64
    model_config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                             vocab_size=vocab_size, dropout=dropout, **{k: config[k] for k in checkpoint.RECIPE_KEYS})
    check_size(model_config, rt, config, accum_steps)  # refused before allocating if it cannot fit; slow steps said
    model = GPT(model_config)
elif init_from == "resume":
    model = checkpoint.model_from_checkpoint(state, dropout if "dropout" in explicit else None)
    iter_num = state["iter_num"]
    best_val_loss = checkpoint.reconcile_best(out_dir, state) if master else state["best_val_loss"]
elif source:
    model = finetune.model(source, source_state, block_size, dropout, master)
else:  # OpenAI GPT-2 weights, by name or from a local folder
    model = checkpoint.load_pretrained(init_from, dropout, also_valid="scratch, resume")
    if block_size > model.config.block_size:
        raise UserError(f"block_size={block_size} is longer than {init_from}'s {model.config.block_size} positions")
    model.crop_block_size(block_size)
if init_from not in ("scratch", "resume"):  # finetuning on chat data: rows for the chat tokens the model never saw
    chat.fit_vocab(model, batches.meta, (source_state or {}).get("meta"), print if master else lambda line: None)
batches.check_vocab(model.config.vocab_size)
batches.check_tokenizer(init_from, state or source_state)  # resuming or finetuning needs data in the model's tokenizer
model_args = {k: getattr(model.config, k) for k in checkpoint.ARCH_KEYS + ("dropout",)}
model.to(device)

gpt = model  # the plain module: its state_dict has no torch.compile or DDP prefixes
frz = (freeze_layers, unfreeze_every, freeze_train_head)  # the trainable set at step k: lib/freeze.py
freeze.freeze(gpt, *frz, 0, world_size)  # requires_grad, before DDP/FSDP wrap it and the optimizer is built
fsdp = parallelism == "fsdp" and world_size > 1  # FSDP2 shards gpt's weights in place
compiled = compile and can_compile(device_type)
model = parallel.wrap(gpt, rt, parallelism, compiled, activation_checkpointing)
# a CPU evaluates with the plain module: compiling the no-grad graph too would cost more than all its evals save
scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")  # float16 needs loss scaling
optimizer = optim.create(gpt, optimizer, learning_rate, weight_decay, (beta1, beta2), device_type, muon_lr,
                         muon_momentum, parallelism)  # the setting's name now holds the optimizer
if state is not None:
    freeze.catch_up(gpt, optimizer, *frz, iter_num, weight_decay, learning_rate)  # groups unfrozen before
    parallel.load_training_state(gpt, optimizer, state, fsdp)  # the optimizer (and for a .dcp, the weights)
    if "scaler" in state:  # nanoGPT's checkpoints have none
        scaler.load_state_dict(state["scaler"])
wandb_run_id = state.get("wandb_run_id") if state else None  # a resumed run continues its wandb run
run_id = checkpoint.new_run_id(state)  # in every checkpoint of the run: another run's best.pt is told apart
state = source_state = None  # free the checkpoints' memory
if fsdp and (sample_interval or eval_every):  # rank 0 alone, or ranks unevenly: not with sharded weights
    sample_interval = eval_every = config["sample_interval"] = config["eval_every"] = 0
evalset = core_eval.for_training(config, batches.meta, gpt.config.vocab_size, rank, world_size) if eval_every else None

tokens_per_iter = gradient_accumulation_steps * batch_size * block_size  # over all ranks
horizon = scaling.horizon_settings(config, explicit, gpt, tokens_per_iter)  # target_flops / tokens_per_param
globals().update(horizon)
config.update(horizon)
peak, peak_source = peak_flops(device, dtype)
run_log = RunLog(config, gpt, batches.meta, rt, iter_num, tokens_per_iter, (peak, peak_source),
                 compiled, wandb_run_id)  # prints the run's header


def get_lr(it):
    """The schedule's lr for learning_rate at step it (optim.get_lr); other groups get it times their lr_scale."""
    return optim.get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, lr_schedule, cooldown_frac,
                        final_lr_frac)


def save_checkpoint(is_best, val_loss=None):
    global saved_iter
    sharded = checkpoint_format == "sharded"  # then every rank writes its shard, else rank 0 the gathered state
    model_sd, optim_sd = (parallel.sharded_state(gpt, optimizer) if sharded else  # under FSDP every rank gathers
                          parallel.full_state(gpt, optimizer, fsdp))
    if master or sharded:
        t0 = time.time()
        try:
            checkpoint.save(dict(model=model_sd, optimizer=optim_sd, scaler=scaler.state_dict(),
                                 model_args=model_args, iter_num=iter_num, best_val_loss=best_val_loss,
                                 val_loss=val_loss, config=config, meta=batches.meta, wandb_run_id=run_log.wandb_run_id,
                                 run_id=run_id),
                            out_dir, is_best, keep_last_n,
                            replace=init_from != "resume" and saved_iter is None, sharded=sharded)
        except checkpoint.DiskFull as e:  # say how to go on from the checkpoint that is still there
            raise UserError(f"{e}; then {resume_hint()}") from None
    if master:
        print(f"saved {'best and latest' if is_best else 'latest'} checkpoint to {out_dir} "
              f"at iter {iter_num} ({time.time() - t0:.2f}s)")
        run_log.saved()  # a run that started over: its metrics.jsonl and loss.png replace the old run's now
    saved_iter = iter_num


def resume_hint():
    """Where the last good checkpoint is, and the command that continues from it."""
    if saved_iter is None:
        return "nothing was saved, so there is nothing to resume"
    args = [a for a in sys.argv[1:] if not a.startswith(("--init_from=", "--overwrite="))] + ["--init_from=resume"]
    launcher = f"torchrun --nproc_per_node={world_size}" if world_size > 1 else "python"
    return f"resume with: {launcher} train.py {' '.join(args)} ({resume_path} holds iter {saved_iter})"


# ----------------------------------------------------------------------------- training loop
# Evaluation, checkpoints and stopping all happen at the top of an iteration, so a checkpoint holds
# the state just before step iter_num, which is where a resumed run starts.
stop = StopSignal(world_size, interrupted=lambda: f"interrupted by a second Ctrl-C at iter {iter_num}; {resume_hint()}")
start_iter, healthy, reached_target = iter_num, True, False
bad_total = bad_streak = torch.zeros((), dtype=torch.long, device=device)  # skipped steps, counted on device
running_mfu, t0, t0_iter = -1.0, time.time(), iter_num  # step timing: time and iteration it starts from
loop_start = t0  # for max_seconds
while True:
    out_of_time = max_seconds > 0 and time.time() - loop_start >= max_seconds  # then evaluate, save and stop
    if (iter_num % eval_interval == 0 or iter_num == max_iters or eval_only or out_of_time) and not stop.now:
        try:
            losses = estimate_loss(gpt if device_type == "cpu" else model, batches, eval_iters, ctx, world_size,
                                   run_log.token_bytes, stop)
        except StepAbandoned:  # a signal mid-evaluation: none this time; the state is saved below
            continue
        if eval_only:
            run_log.eval(iter_num, losses, min(best_val_loss, losses["val"]))
            break
        improved = losses["val"] < best_val_loss
        best_val_loss = min(best_val_loss, losses["val"])
        healthy = math.isfinite(losses["val"])  # never overwrite a good checkpoint with a broken model
        reached_target = 0 < target_val_loss and losses["val"] <= target_val_loss  # the same on every rank
        if healthy and iter_num > start_iter and (improved or always_save_checkpoint):
            save_checkpoint(is_best=improved, val_loss=losses["val"])
        run_log.eval(iter_num, losses, best_val_loss, saved=saved_iter == iter_num > start_iter)  # + metrics, loss.png, doctor
        t0, t0_iter = time.time(), iter_num  # leave evaluation and saving out of the step timing
    if not stop.now and run_log.maybe_sample(iter_num):  # every sample_interval steps (rank 0)
        t0, t0_iter = time.time(), iter_num
    if eval_every and not stop.now and iter_num > start_iter and (iter_num % eval_every == 0 or iter_num == max_iters):
        run_log.tasks(iter_num, core_eval.evaluate(gpt, evalset, device, ctx, rank, world_size))
        t0, t0_iter = time.time(), iter_num
    if out_of_time and stop.received is None:
        stop.received = f"max_seconds={max_seconds:g}"
    stopping = stop.should_stop()  # a signal on any rank stops all of them at this same iteration
    if iter_num >= max_iters or stopping or reached_target:
        if healthy and saved_iter != iter_num and iter_num > start_iter:
            save_checkpoint(is_best=False)
        if stopping and master:
            print(f"stopped by {stop.received or 'a signal to another rank'} at iter {iter_num}; {resume_hint()}")
        elif reached_target and master:
            print(f"reached target_val_loss={target_val_loss:g} at iter {iter_num}: val loss {losses['val']:.4f}, "
                  f"{time.time() - run_log.t_start:.1f}s after the run started (evaluations included)")
        break

    lr = get_lr(iter_num) if decay_lr else learning_rate
    if (unfrozen := freeze.unfreeze(gpt, optimizer, *frz, iter_num, weight_decay, lr)) and master:
        print(f"iter {iter_num}: {freeze.describe(gpt, unfrozen)}")
    optim.set_lr(optimizer, lr)
    seed_iteration(seed, 0, iter_num)  # the same on every rank: train_step seeds each micro-step by its index
    try:  # (not abandoned when an unfreeze just changed the optimizer: a checkpoint before it would not resume)
        loss, grad_norm, skipped = train_step(model, optimizer, scaler, batches, iter_num, accum_steps, ctx, grad_clip,
                                              rank, world_size, None if unfrozen else stop)
    except StepAbandoned:  # a signal mid-step: the weights are still those before it, saved at the top of the loop
        continue
    run_log.count_step(grad_norm)  # clipping, counted on the device
    bad_total = bad_total + skipped
    bad_streak = (bad_streak + 1) * skipped  # back to 0 on a good step
    iter_num += 1

    if iter_num % log_interval == 0:  # the one place the loop waits for the device (.item())
        lossf = mean_over_ranks(loss, world_size)  # the step's loss, over its micro-steps and all ranks
        normf, streak, total = grad_norm.item(), int(bad_streak), int(bad_total)
        dt = (time.time() - t0) / (iter_num - t0_iter)  # per step since the last line, or eval if that was later
        t0, t0_iter = time.time(), iter_num
        if iter_num - start_iter >= 5 * log_interval:  # let the first steps (compilation, warmup) pass
            mfu = gpt.estimate_mfu(tokens_per_iter // world_size, dt, peak)
            running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
        run_log.step(iter_num, lossf, lr, normf, dt, running_mfu, total, streak)  # + metrics.jsonl, doctor
        if streak >= max_bad_steps:
            raise UserError(f"{streak} steps in a row had a non-finite loss or gradient (iter {iter_num}); "
                            f"{resume_path} still holds the last good state. Lower --learning_rate, check the "
                            f"data, or use --dtype=bfloat16 instead of float16.")
run_log.finish(iter_num)  # the summary, and wandb.finish()
gc.freeze()  # the interpreter's last garbage collection then skips every object alive now (~0.6 s, most torch._dynamo's)

if world_size > 1:
    import torch.distributed as dist

    dist.destroy_process_group()
    # skip interpreter teardown, where gloo's threads can still abort a finished process (SIGABRT, torch 2.13)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
