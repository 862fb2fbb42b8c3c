"""
Many processes (torchrun): wrapping the model for DDP or FSDP2, activation checkpointing, the gradient
accumulation switch, and full (single-file) state dicts that any world size can save and load.

    model = parallel.wrap(gpt, rt, parallelism, compile, activation_checkpointing)   # once, before the optimizer
    parallel.set_gradient_sync(model, last_micro_step)                                # in step.train_step
    model_sd, optim_sd = parallel.full_state(gpt, optimizer, fsdp)                      # every rank; rank 0 writes
    parallel.load_optimizer(gpt, optimizer, optim_sd, fsdp)                             # every rank
    parallel.sharded_state(gpt, optimizer), parallel.load_training_state(...)           # checkpoint_format='sharded'

DDP keeps a full copy of the weights, gradients and AdamW moments on every GPU and all-reduces the gradients.
FSDP2 (`fully_shard`) keeps 1/N of each on each of N GPUs and gathers a Block's weights just before it runs:
each Block is its own group, then the root (which holds the tied wte/lm_head weight and the rest). Under FSDP
the weights are float32 master copies; with dtype=bfloat16 they are cast to bfloat16 for compute and the
gradients are reduced in float32 (MixedPrecisionPolicy).

Checkpoints are one format whatever the parallelism: the plain model's state_dict and the optimizer's
state_dict (parameters numbered 0, 1, ... in param-group order, as torch.optim numbers them), gathered in full
on the CPU of rank 0. So a run saved by FSDP on N ranks resumes under FSDP on M ranks, under DDP, or in one
process, and sample.py / export.py read it as any other.

checkpoint_format='sharded' skips the gathering: every rank hands its shards (get_state_dict's default: DTensors,
the optimizer keyed by parameter name, which DCP needs to reshard) to checkpoint.save_sharded, and on resume reads
only its shards of them back (load_training_state), at any world size.
"""

import torch

from lib import checkpoint
from lib.runtime import UserError, compile_model

FQN_NOISE = ("_orig_mod.", "_checkpoint_wrapped_module.", "module.")  # torch.compile, checkpoint_wrapper, DDP


def clean_name(name):
    for noise in FQN_NOISE:
        name = name.replace(noise, "")
    return name


def checkpoint_blocks(gpt):
    """Activation checkpointing: each Block keeps only its input for backward and recomputes the rest there."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(gpt.transformer.h):
        gpt.transformer.h[i] = checkpoint_wrapper(block)  # non-reentrant torch.utils.checkpoint


def wrap(gpt, rt, parallelism="ddp", compile=False, activation_checkpointing=False):
    """
    The module to train: gpt (changed in place) with activation checkpointing, torch.compile and, under torchrun,
    DDP or FSDP2. The order is torchtitan's: checkpointing, then compile, then sharding.
    """

    if parallelism not in ("ddp", "fsdp"):
        raise UserError(f"unknown parallelism '{parallelism}': use ddp or fsdp")
    # FSDP needs a process group: torchrun's, or one a 1-GPU check of this path made (bench/gpu_check.py)
    fsdp = parallelism == "fsdp" and (rt.world_size > 1 or torch.distributed.is_initialized())
    if fsdp and rt.dtype == "float16":
        raise UserError("--parallelism=fsdp trains in float32 or bfloat16 (float16 would need a sharded grad "
                        "scaler): use --dtype=bfloat16")
    if activation_checkpointing:
        checkpoint_blocks(gpt)
    if not fsdp:
        model = compile_model(gpt, rt.device_type) if compile else gpt
        if rt.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None,
                        broadcast_buffers=False)  # the only buffers, rotary's tables, never change
        return model

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(rt.device_type, (rt.world_size,))  # explicit: on CPU (gloo) there is no default
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if rt.dtype == "bfloat16" else MixedPrecisionPolicy()
    blocks = gpt.transformer.h
    for i, block in enumerate(blocks):
        if compile:  # per Block: FSDP's hooks between Blocks are graph breaks
            block = compile_model(block, rt.device_type)
            blocks[i] = block
        # the last Block's weights are gathered again at once by backward: keep them
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(gpt, mesh=mesh, mp_policy=mp)  # the root: embeddings (tied to lm_head), ln_f
    return gpt


def is_fsdp(model):
    return hasattr(model, "set_requires_gradient_sync")


def set_gradient_sync(model, sync):
    """Reduce gradients over ranks at the end of this backward (the last micro-step) or not (the ones before)."""
    if is_fsdp(model):
        model.set_requires_gradient_sync(sync)
    else:
        model.require_backward_grad_sync = sync  # DDP reads it; a plain module ignores it


def full_tensor(t):
    """A DTensor (a shard under FSDP) gathered in full (every rank calls this); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(gpt, optimizer, fsdp):
    """
    (model state_dict, optimizer state_dict) in full on the CPU, in the checkpoint format (see the module
    docstring). Under FSDP every rank must call this (it gathers); only rank 0 gets the tensors, others get {}.
    """
    if not fsdp:
        return {clean_name(k): v for k, v in gpt.state_dict().items()}, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(gpt, optimizer, options=_options(cpu_offload=True))
    if not model_sd:  # ranks other than 0
        return {}, {}
    return model_sd, checkpoint.numbered(optim_sd)


def sharded_state(gpt, optimizer):
    """
    checkpoint_format='sharded': (model, optimizer) state dicts as this rank holds them, keyed by parameter name,
    nothing gathered (under FSDP DTensors of this rank's shards), for torch.distributed.checkpoint (DCP) to write.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(gpt, optimizer)


def load_training_state(gpt, optimizer, state, fsdp):
    """On resume, after wrapping: the optimizer state of a checkpoint file (every rank read it whole), or, from a DCP
    folder (checkpoint.load_latest), the weights and optimizer state, each rank reading its shards, any world size."""
    if "dcp" not in state:
        return load_optimizer(gpt, optimizer, state["optimizer"], fsdp)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_sd, optim_sd = sharded_state(gpt, optimizer)  # the shapes and shards to fill (and initialized moments)
    tensors = {"model": model_sd, "optimizer": optim_sd}
    try:
        checkpoint._quiet(dcp.load, tensors, checkpoint_id=state["dcp"])
    except Exception as e:  # a shard missing or cut short (DCP's own error names the rank and file)
        raise UserError(f"{state['dcp']} is corrupt or incomplete ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                        ) from None
    set_state_dict(gpt, optimizer, model_state_dict=tensors["model"], optim_state_dict=tensors["optimizer"])


def _param_names(gpt, optimizer):
    """The names of the optimizer's parameters in its order, which is torch.optim's numbering 0, 1, ..."""
    names = {p: clean_name(n) for n, p in gpt.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def named(gpt, optimizer, optim_sd):
    """The inverse of checkpoint.numbered(), for this optimizer's parameters."""
    order = _param_names(gpt, optimizer)
    groups = [{**group, "params": [order[i] for i in group["params"]]} for group in optim_sd["param_groups"]]
    return {"state": {order[i]: v for i, v in optim_sd["state"].items()}, "param_groups": groups}


def load_optimizer(gpt, optimizer, optim_sd, fsdp):
    """Load a full optimizer state_dict (every rank has it, as every rank reads the checkpoint): under FSDP each
    rank keeps its shard of the moments."""
    if not fsdp:
        optimizer.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(gpt, optimizer, named(gpt, optimizer, optim_sd), options=_options())


def accumulation(total_batch_size, gradient_accumulation_steps, batch_size, block_size, world_size):
    """Micro-steps per rank in one optimizer step: from total_batch_size (tokens per step over all ranks) when it
    is set, else from gradient_accumulation_steps (micro-steps per step over all ranks)."""

    if total_batch_size:
        per_micro_step = batch_size * block_size * world_size
        if total_batch_size <= 0 or total_batch_size % per_micro_step:
            raise UserError(f"total_batch_size={total_batch_size:,} tokens is not a multiple of batch_size x block_size"
                            f" x processes = {batch_size} x {block_size} x {world_size} = {per_micro_step:,}: change "
                            f"one of them")
        return total_batch_size // per_micro_step
    if gradient_accumulation_steps % world_size:
        raise UserError(f"gradient_accumulation_steps={gradient_accumulation_steps} must be divisible by the "
                        f"{world_size} processes")
    return gradient_accumulation_steps // world_size


# ----------------------------------------------------------------------------- memory per GPU (docs/multi-gpu.md)
GPT2_SIZES = {"GPT-2 124M": (12, 12, 768), "GPT-2 350M": (24, 16, 1024), "GPT-2 774M": (36, 20, 1280),
              "GPT-2 1.5B": (48, 25, 1600)}


def memory_table(world_size=8):
    """
    A Markdown table of the bytes per GPU that the weights (float32), gradients (float32) and AdamW moments
    (2 x float32) take under DDP (a full copy on each GPU) and under FSDP on world_size GPUs (1/world_size each),
    from the parameter counts of this repo's GPT (vocab 50304, block 1024). Activations, the bfloat16 copies of
    the Blocks FSDP gathers at a time, and DDP's gradient buckets come on top.
    """
    from model import GPT, GPTConfig

    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    rows = [f"| model | parameters | DDP: weights / grads / AdamW / total per GPU | FSDP on {world_size}: weights / "
            f"grads / AdamW / total per GPU |", "|---|---|---|---|"]
    for name, (n_layer, n_head, n_embd) in GPT2_SIZES.items():
        with torch.device("meta"):  # shapes only: nothing is allocated
            gpt = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024, vocab_size=50304,
                                bias=False))
        n = sum(p.numel() for p in gpt.parameters())
        parts = [4 * n, 4 * n, 8 * n]
        cells = [" / ".join(gib(b / shards) for b in parts + [sum(parts)]) for shards in (1, world_size)]
        rows.append(f"| {name} | {n / 1e6:,.0f}M | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m lib.parallel: the memory table in docs/multi-gpu.md
    print(memory_table())
