"""
Crash-safe checkpoints, and building a model from scratch, a checkpoint, or GPT-2 weights.

out_dir/ckpt.pt          the latest full state (model, optimizer, ...), for init_from='resume'
out_dir/best.pt          the model with the best val loss (weights only), for sampling and export
out_dir/ckpt_NNNNNNN.pt  copies of the last keep_last_n ckpt.pt files (keep_last_n > 0)

Every file is written to a temporary name, flushed and fsynced, then renamed over the old one in one
atomic step, so a process killed at any moment leaves the previous checkpoint whole. Each name is its own
file (no hard links), so editing one can never change another.
"""

import glob
import os
import re

import torch

from model import GPT, GPTConfig
from runtime import UserError

LATEST, BEST = "ckpt.pt", "best.pt"
ARCH_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")  # what a checkpoint fixes


def check_writable(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write checkpoints to out_dir '{out_dir}' ({e.strerror}): pick another --out_dir") from None


def _fsync_dir(path):
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path, write):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(state, out_dir, is_best=False, keep_last_n=0):
    """Write state as out_dir/ckpt.pt (and best.pt, and a snapshot), never leaving a half-written file."""
    for stale in glob.glob(os.path.join(out_dir, "*.pt.*.tmp")):  # leftovers of a process killed mid-save
        os.remove(stale)
    latest = os.path.join(out_dir, LATEST)
    _write_atomic(latest, lambda f: torch.save(state, f))
    if is_best:
        weights = {k: v for k, v in state.items() if k not in ("optimizer", "scaler")}
        _write_atomic(os.path.join(out_dir, BEST), lambda f: torch.save(weights, f))
    if keep_last_n > 0:
        snapshot = os.path.join(out_dir, f"ckpt_{state['iter_num']:07d}.pt")
        _write_atomic(snapshot, lambda f: torch.save(state, f))
        snapshots = sorted(p for p in os.listdir(out_dir) if re.fullmatch(r"ckpt_\d{7}\.pt", p))
        for old in snapshots[:-keep_last_n]:
            os.remove(os.path.join(out_dir, old))
    _fsync_dir(out_dir)


def load(path):
    """Read a checkpoint onto the CPU, or say clearly why it cannot be read."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: train first, or check --out_dir")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"model", "model_args", "iter_num"} - set(state)
    except Exception as e:
        others = sorted(glob.glob(os.path.join(os.path.dirname(path), "*.pt")))
        hint = f"; other checkpoints there: {', '.join(others)}" if others else ""
        raise UserError(f"{path} is corrupt or incomplete ({type(e).__name__}){hint}") from None
    if missing:
        raise UserError(f"{path} is not a checkpoint of this repo (it lacks {', '.join(sorted(missing))})")
    return state


def model_from_checkpoint(state, dropout=None):
    args = dict(state["model_args"])
    if dropout is not None:
        args["dropout"] = dropout  # not part of the architecture: a resumed or sampled run may change it
    model = GPT(GPTConfig(**args))
    model.load_state_dict(state["model"])
    return model


def check_model_args(state, path, config, explicit):
    """A setting the user gave explicitly must agree with the checkpoint's architecture."""
    for k in ARCH_KEYS:
        if k in explicit and config[k] != state["model_args"][k]:
            raise UserError(f"{path} was trained with {k}={state['model_args'][k]!r} but the config asks for "
                            f"{k}={config[k]!r}: drop that setting, or use a new --out_dir to train from scratch")


def load_pretrained(name_or_path, dropout=0.0):
    """GPT-2 weights from the Hugging Face hub by name, or from a local transformers folder."""
    try:
        return GPT.from_pretrained(name_or_path, dict(dropout=dropout))
    except ValueError as e:
        raise UserError(str(e)) from None
    except RuntimeError as e:  # weights whose shapes disagree with config.json
        raise UserError(f"{name_or_path}: its weights do not match its config.json ({str(e).splitlines()[0]})") from None
    except OSError as e:
        if os.path.isdir(name_or_path):
            raise UserError(f"{name_or_path} is not a transformers GPT-2 folder (config.json + model weights): "
                            f"{str(e).splitlines()[0]}") from None
        raise UserError(f"could not get '{name_or_path}' from the Hugging Face hub (offline?): download it where "
                        f"there is network and pass the local folder, e.g. --init_from=path/to/{name_or_path}") from None


def load_for_inference(init_from, out_dir="out", ckpt="best"):
    """
    (model, meta) to sample from or evaluate: a checkpoint in out_dir (init_from='resume'; ckpt is 'best': best.pt,
    else ckpt.pt; 'latest': ckpt.pt; or a file name in out_dir) or GPT-2 weights (a hub name or a local folder).
    The model is in eval mode on the CPU, dropout off; meta is the vocabulary it was trained with ({} for GPT-2).
    """
    from batches import checkpoint_meta

    if init_from == "resume":
        names = {"best": [BEST, LATEST], "latest": [LATEST]}.get(ckpt, [ckpt])
        paths = [os.path.join(out_dir, name) for name in names]
        path = next((p for p in paths if os.path.exists(p)), paths[-1])
        state = load(path)
        model = model_from_checkpoint(state, dropout=0.0)
        meta = checkpoint_meta(state)
    else:
        model = load_pretrained(init_from)
        meta = {}
    return model.eval(), meta
