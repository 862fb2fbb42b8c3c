"""
Finetuning a model pretrained here: train.py --init_from=path/to/ckpt.pt (or an out_dir, or a .dcp folder).

Unlike --init_from=resume, which continues a run (its optimizer state, iteration, lr schedule and out_dir), this takes
the checkpoint's weights, architecture and tokenizer only: training starts at iteration 0 with a fresh optimizer and
schedule, under this run's settings (a lower learning rate, --freeze_layers, chat data, ...), and writes to its own
out_dir, never the source's. The architecture, the modern recipe's options included (rotary, RMSNorm, ...), is the
checkpoint's; block_size may be cut shorter, like GPT-2's when finetuning it.

    source = finetune.source(init_from, out_dir)      # the checkpoint init_from names, or None (scratch, GPT-2, ...)
    state, arch = finetune.load(source, config, explicit)   # its weights and metadata; its architecture's settings
"""

import os

from lib import checkpoint
from lib.runtime import UserError
from model import GPTConfig


def source(init_from, out_dir):
    """
    The checkpoint file or .dcp folder init_from names when it is one of this repo's: that path, or an out_dir holding
    best.pt (else ckpt.pt, or their .dcp forms). None for 'scratch', 'resume', GPT-2 names and transformers folders.
    A run must not write where its source is: that out_dir is refused here, before anything is written.
    """
    if init_from in ("scratch", "resume") or init_from in checkpoint.GPT2_NAMES:
        return None
    path = None
    if os.path.isfile(init_from) or init_from.rstrip(os.sep).endswith(".dcp"):
        path = init_from
    elif os.path.isdir(init_from):
        found = checkpoint.find(init_from, "best")
        path = found if os.path.exists(found) else None  # else a transformers folder (or nothing usable)
    elif init_from.endswith(".pt"):
        raise UserError(f"--init_from={init_from}: no such checkpoint file")
    if path is None:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.realpath(folder) == os.path.realpath(out_dir):
        raise UserError(f"--out_dir={out_dir} holds the checkpoint to finetune ({path}): finetuning writes to a new "
                        f"out_dir and leaves its source as it is; pick another --out_dir (or --init_from=resume to "
                        f"continue that run)")
    return path


def load(path, config, explicit):
    """
    (state, arch): the checkpoint (its weights, model_args, meta; no optimizer) and the settings its architecture
    fixes (block_size and the recipe's model options), for train.py to use instead of its own. A setting given
    explicitly that the checkpoint contradicts is refused, but for a shorter block_size, which crops.
    """
    state = checkpoint.load(path)
    state.pop("optimizer", None)
    state.pop("scaler", None)
    args = state["model_args"]
    trained = {k: args.get(k, getattr(GPTConfig, k)) for k in checkpoint.ARCH_KEYS}
    for k in checkpoint.ARCH_KEYS:
        if k in explicit and k not in ("block_size", "vocab_size") and config[k] != trained[k]:
            raise UserError(f"{path} was trained with {k}={trained[k]!r} but the config asks for {k}={config[k]!r}: "
                            f"a finetuned model keeps its architecture; drop that setting")
    block_size = config["block_size"] if "block_size" in explicit else trained["block_size"]
    if block_size > trained["block_size"]:
        raise UserError(f"block_size={block_size} is longer than the {trained['block_size']} positions {path} was "
                        f"trained with: use --block_size={trained['block_size']} or less")
    arch = {k: trained[k] for k in checkpoint.RECIPE_KEYS + ("n_layer", "n_head", "n_embd", "bias")}
    arch["block_size"] = block_size
    return state, arch


def model(path, state, block_size, dropout, master=True):
    """The checkpoint's model with this run's dropout, cropped to block_size; rank 0 says what it is."""
    gpt = checkpoint.model_from_checkpoint(state, dropout)
    gpt.crop_block_size(block_size)
    if master:
        val = state.get("best_val_loss")
        val = f", best val loss {float(val):.4f}" if isinstance(val, (int, float)) and val < float("inf") else ""
        print(f"finetuning {path} (trained {state['iter_num']:,} iterations{val}): its weights and tokenizer, from "
              f"iteration 0 with a fresh optimizer and lr schedule")
    return gpt
