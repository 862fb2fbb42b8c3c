"""
Crash-safe checkpoints, and building a model from scratch, a checkpoint, or GPT-2 weights.

out_dir/ckpt.pt          the latest full state (model, optimizer, ...), for init_from='resume'
out_dir/best.pt          the model with the best val loss (weights only), for sampling and export
out_dir/ckpt_NNNNNNN.pt  copies of the last keep_last_n ckpt.pt files (keep_last_n > 0)
out_dir/.lock            held (flock) by the training run writing here; the kernel releases it when that run dies

Every file is written to a temporary name, flushed and fsynced, then renamed over the old one in one
atomic step, so a process killed at any moment leaves the previous checkpoint whole; a save that fails
(full disk, a second Ctrl-C) removes its temporary file. Each name is its own file (no hard links), so
editing one can never change another. best.pt is written before ckpt.pt: a kill between the two leaves a
best.pt at least as good as ckpt.pt records, and resume (reconcile_best) takes the best of both.

Every checkpoint of a run carries its run_id (new_run_id: a run from scratch or GPT-2 gets one, a resumed run keeps
its checkpoint's), so a best.pt of another run beside ckpt.pt (copied there, or left by another model) is never
taken for this run's best: resume sets it aside with a note (best.foreign.pt), and sampling or exporting 'best'
uses ckpt.pt instead, with a note. Checkpoints from before run ids are told apart by their model_args.

checkpoint_format='sharded' keeps the same things as folders that torch.distributed.checkpoint (DCP) writes, every
rank its own shard and nothing gathered: out_dir/ckpt.dcp, best.dcp (weights only), ckpt_NNNNNNN.dcp; each holds
extra.pt, everything but the tensors (iter_num, config, ...). A folder is written whole as NAME.dcp.tmp and then
swapped in (_swap_in), so NAME.dcp, or NAME.dcp.old during the swap, is always complete. Any world size resumes
from it (DCP reshards); `python -m lib.checkpoint convert out/ckpt.dcp out/ckpt.pt` turns it into the single file,
and load() / find() read a folder as that file, in memory. All ranks must see out_dir (a shared filesystem). A
folder whose shard files are missing or shorter than its .metadata says is damaged (check_dcp): it gets the same
one line as a damaged ckpt.pt, and resume falls back to the other format's checkpoint when there is one.
"""

import glob
import os
import re
import shutil
import sys
import uuid
import warnings

import torch

from configurator import GPT2_NAMES
from lib import files
from lib.files import DiskFull, fsync_dir, write_atomic  # noqa: F401 (DiskFull: train.py catches it)
from lib.runtime import UserError
from model import GPT, GPTConfig

LATEST, BEST = "ckpt.pt", "best.pt"
LATEST_DCP, BEST_DCP, EXTRA = "ckpt.dcp", "best.dcp", "extra.pt"  # checkpoint_format='sharded': DCP folders
FORMATS = {"full": LATEST, "sharded": LATEST_DCP}  # where each checkpoint_format keeps the latest state
GPT2_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")  # what a GPT-2 is made of
# the modern recipe's options (model.GPTConfig); a checkpoint without them (older) gets GPTConfig's defaults: GPT-2
RECIPE_KEYS = ("rotary", "rmsnorm", "qk_norm", "relu2", "zero_init", "tie_head", "logit_softcap", "x0_mix")
ARCH_KEYS = GPT2_KEYS + RECIPE_KEYS  # what a checkpoint fixes
# what a resumed run keeps from its checkpoint too: the optimizer's state is for this optimizer and these trainable
# parameters (freeze.py); (setting name, its value in checkpoints from before it existed)
STATE_KEYS = (("optimizer", "adamw"), ("freeze_layers", 0), ("unfreeze_every", 0), ("freeze_train_head", True))


def lock(out_dir):
    """Make this process the only training run writing to out_dir, or stop with one line naming the other one
    (files.lock: an flock on out_dir/.lock, released however the process ends). Keep the returned file open."""
    return files.lock(out_dir, "training run", "--out_dir")


def trained(out_dir):
    """Every checkpoint in out_dir, in either format: the latest state, the best model, snapshots (a DCP folder also
    as the .old a kill mid-swap leaves), newest first; [] if it holds none."""
    if not os.path.isdir(out_dir):
        return []
    names = [LATEST, LATEST_DCP, BEST, BEST_DCP] + _snapshots(out_dir)[::-1] + _snapshots(out_dir, ".dcp")[::-1]
    names += [p[:-4] for p in os.listdir(out_dir) if re.fullmatch(r"ckpt_\d{7}\.dcp\.old", p)]  # no newer folder
    paths = dict.fromkeys(p for p in (_complete(os.path.join(out_dir, name)) for name in names) if p)
    return sorted(paths, key=lambda p: -_iters(p))


def guard(out_dir, init_from, overwrite):
    """A run that does not resume must not replace a trained model in out_dir (any checkpoint: ckpt.pt, best.pt,
    snapshots, .dcp folders) unless told to (--overwrite=True: files.guard, the rule every writer follows)."""
    if init_from == "resume":
        return
    found = trained(out_dir)

    def holds(paths):
        state = next((s for s in map(_peek_or_none, paths) if s and "iter_num" in s), None)
        if state is None:
            return f"already holds checkpoints ({files.names(paths)})"
        best = state.get("best_val_loss")
        best = f" (best val loss {float(best):.4f})" if best is not None else ""
        return f"already holds a model trained for {state['iter_num']} iterations{best} in {files.names(paths)}"

    if latest(out_dir):
        other_way = "continue it with --init_from=resume"
    elif any(re.fullmatch(r"ckpt_\d{7}\.(pt|dcp)", os.path.basename(p)) for p in found):
        other_way = f"continue a snapshot by copying it to {LATEST} (or {LATEST_DCP}) and passing --init_from=resume"
    else:
        other_way = ""
    files.guard(found, overwrite, "--out_dir", out_dir, holds=holds, other_way=other_way,
                when="at the new run's first save")


def check_writable(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write checkpoints to out_dir '{out_dir}' ({e.strerror}): pick another --out_dir") from None


def state_bytes(state):
    """About how many bytes torch.save writes for state: its tensors, plus a margin for everything else."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values()) + (1 << 16) * isinstance(state.get("model"), dict)
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def _write_atomic(path, obj):
    """torch.save obj to path through a temporary file (lib/files.py); on any failure the temporary file is removed
    and the previous checkpoint stays."""
    write_atomic(path, lambda f: torch.save(obj, f), needs_bytes=state_bytes(obj), kind="checkpoint")


def _snapshots(out_dir, ext=".pt"):
    return sorted(p for p in os.listdir(out_dir) if re.fullmatch(r"ckpt_\d{7}" + re.escape(ext), p))


def _remove(path):
    """A checkpoint file or DCP folder (with a folder's previous version, left by a kill mid-swap)."""
    for p in (path, path + ".old") if path.endswith(".dcp") else (path,):
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)


def _remove_old_run(out_dir, keep):
    """After the first save of a run that started over (--overwrite=True): the old run's checkpoints, every one the
    guard counted (trained()), go, but for the names in keep, which this save wrote."""
    for path in trained(out_dir):
        if os.path.basename(path) not in keep:
            _remove(path)


def save(state, out_dir, is_best=False, keep_last_n=0, replace=False, sharded=False):
    """
    Write state as out_dir/ckpt.pt (and best.pt, and a snapshot), never leaving a half-written file.
    replace: the first save of a run that started over (--overwrite=True): once this save is written, the old run's
    best.pt and snapshots go (until then, everything of the old run stays).
    sharded: checkpoint_format='sharded', every rank calls this with its shards (save_sharded).
    """
    if sharded:
        return save_sharded(state, out_dir, is_best, keep_last_n, replace)
    for stale in glob.glob(os.path.join(out_dir, "*.pt.*.tmp")):  # leftovers of a process killed mid-save
        os.remove(stale)  # (no other run writes here: it would hold out_dir/.lock)
    written = [BEST] if is_best else []
    if is_best:  # first, so that ckpt.pt never records a best val loss that best.pt does not hold
        _write_atomic(os.path.join(out_dir, BEST), {k: v for k, v in state.items() if k not in ("optimizer", "scaler")})
    _write_atomic(os.path.join(out_dir, LATEST), state)
    written.append(LATEST)
    if keep_last_n > 0:
        written.append(f"ckpt_{state['iter_num']:07d}.pt")
        _write_atomic(os.path.join(out_dir, written[-1]), state)
    if replace:
        _remove_old_run(out_dir, keep=written)
    if keep_last_n > 0:
        for old in _snapshots(out_dir)[:-keep_last_n]:
            os.remove(os.path.join(out_dir, old))
    fsync_dir(out_dir)


def _distributed():
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _quiet(fn, *args, **kwargs):
    """fn (a DCP save or load) without its warning that one process without torch.distributed is one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return fn(*args, **kwargs, no_dist=not _distributed())


def _swap_in(tmp, path):
    """
    Make the complete folder tmp the folder path. At every moment path, or else path.old, is a complete checkpoint:
    path becomes path.old, tmp becomes path, then path.old goes. A path.old next to a path is stale (removed here).
    """
    old = path + ".old"
    if os.path.exists(path):
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(path, old)
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    if os.path.exists(old):
        shutil.rmtree(old)


def _write_dcp(path, tensors, extra, master):
    """DCP writes each rank's part of tensors, rank 0 writes extra (EXTRA), into path.tmp; rank 0 swaps it in."""
    import torch.distributed.checkpoint as dcp

    tmp = path + ".tmp"
    _quiet(dcp.save, tensors, checkpoint_id=tmp)  # fsyncs its files; returns on rank 0 once every rank's are written
    if master:
        _write_atomic(os.path.join(tmp, EXTRA), extra)
        fsync_dir(tmp)
        _swap_in(tmp, path)


def save_sharded(state, out_dir, is_best=False, keep_last_n=0, replace=False):
    """
    save() for checkpoint_format='sharded': every rank calls this with its shards (parallel.sharded_state) and writes
    its part of state['model'] and state['optimizer'] into ckpt.dcp (best.dcp, a snapshot) with DCP.
    """
    import torch.distributed as dist

    master = not _distributed() or dist.get_rank() == 0
    if master:
        for stale in glob.glob(os.path.join(out_dir, "*.dcp.tmp")):  # leftovers of a run killed mid-save
            shutil.rmtree(stale)
    if _distributed():
        dist.barrier()  # no rank writes before that
    tensors = {k: state[k] for k in ("model", "optimizer")}
    extra = {k: v for k, v in state.items() if k not in tensors}
    if is_best:  # first, as in save()
        _write_dcp(os.path.join(out_dir, BEST_DCP), {"model": state["model"]},
                   {k: v for k, v in extra.items() if k != "scaler"}, master)
    _write_dcp(os.path.join(out_dir, LATEST_DCP), tensors, extra, master)
    snapshot = f"ckpt_{state['iter_num']:07d}.dcp"
    if keep_last_n > 0:
        _write_dcp(os.path.join(out_dir, snapshot), tensors, extra, master)
    if replace and master:  # as in save(): the old run goes once this save is written
        _remove_old_run(out_dir, keep=[LATEST_DCP] + [BEST_DCP] * is_best + [snapshot] * (keep_last_n > 0))
    for old in _snapshots(out_dir, ".dcp")[:-keep_last_n] if master and keep_last_n > 0 else []:
        _remove(os.path.join(out_dir, old))
    if master:
        fsync_dir(out_dir)


def new_run_id(state=None):
    """The run's identity, written into each of its checkpoints: a resumed checkpoint's, else a new one."""
    return (state or {}).get("run_id") or uuid.uuid4().hex[:12]


def same_run(a, b):
    """Whether two checkpoints (their states, or _peek's) come from one training run: the same run id, or for
    checkpoints from before run ids, the same architecture (dropout may change on resume)."""
    if a.get("run_id") and b.get("run_id"):
        return a["run_id"] == b["run_id"]
    arch = lambda s: {k: v for k, v in s.get("model_args", {}).items() if k != "dropout"}  # noqa: E731
    return arch(a) == arch(b)


def _foreign(best, state):
    """How a best.pt of another run differs from state, in a few words."""
    if best.get("run_id") and state.get("run_id"):
        return f"run {best['run_id']}, not {state['run_id']}"
    return "another model: its model_args differ"


def _set_aside(path):
    """Rename a checkpoint of another run out of the way (never deleted: it is someone's model); the new path."""
    stem, ext = os.path.splitext(path)
    new, n = f"{stem}.foreign{ext}", 1
    while os.path.exists(new):
        n += 1
        new = f"{stem}.foreign{n}{ext}"
    os.rename(path, new)
    return new


def reconcile_best(out_dir, state):
    """
    On resume: the best val loss of ckpt.pt and best.pt together, repairing best.pt when a kill (of an older
    version that wrote ckpt.pt first) left it behind while ckpt.pt's own weights are the best ones. A best.pt of
    another run is set aside (best.foreign.pt), with a note.
    """
    best_val_loss, path = state["best_val_loss"], os.path.join(out_dir, BEST)
    best = None
    found = _pick(out_dir, [BEST, BEST_DCP])
    if found:
        try:
            best = _peek(found)
        except BaseException as e:
            if not _read_error(e):
                raise
            best = None  # unreadable: rewritten below if ckpt.pt holds the best weights, else at the next best eval
    if best is not None and not same_run(best, state):
        print(f"note: {found} is from another run ({_foreign(best, state)}): set aside as {_set_aside(found)}; "
              f"this run's next best evaluation writes its own")
        best = None
    best_file_loss = best.get("val_loss", best.get("best_val_loss")) if best else None
    if best_file_loss is not None and best_file_loss <= best_val_loss:
        return best_file_loss
    # (a sharded checkpoint's weights are not in memory here; its format never wrote ckpt before best)
    if state.get("val_loss") is not None and state["val_loss"] <= best_val_loss and "model" in state:
        _write_atomic(path, {k: v for k, v in state.items() if k not in ("optimizer", "scaler")})
        fsync_dir(out_dir)
        print(f"repaired {path}: it was older than the best model ckpt.pt recorded (val loss {best_val_loss:.4f})")
    return best_val_loss


def _complete(path):
    """path if it exists; for a DCP folder killed mid-swap (_swap_in), its previous version path.old; else None."""
    if os.path.exists(path):
        return path
    return path + ".old" if path.endswith(".dcp") and os.path.isdir(path + ".old") else None


def _peek(path):
    """A checkpoint's iter_num, val losses, config, ...: cheap (the tensors of a .pt file are mapped, not read; a DCP
    folder's shards are checked to be whole, check_dcp)."""
    if os.path.isdir(path):
        check_dcp(path)
        return torch.load(os.path.join(path, EXTRA), map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _peek_or_none(path):
    try:
        return _peek(path)
    except Exception:
        return None  # unreadable


def _iters(path):
    """A checkpoint's iter_num; -1 if it cannot be read."""
    state = _peek_or_none(path)
    return state["iter_num"] if isinstance(state, dict) and isinstance(state.get("iter_num"), int) else -1


class DamagedShards(ValueError):
    """A DCP folder whose shard files lack bytes its .metadata lists."""


def _read_error(e):
    """Whether e says a checkpoint cannot be read: any Exception, and DCP's CheckpointException, a BaseException
    (not imported for this: torch.distributed.checkpoint takes seconds to import)."""
    return isinstance(e, Exception) or type(e).__name__ == "CheckpointException"


def check_dcp(path):
    """Raise DamagedShards unless every byte range that a DCP folder's .metadata lists is in its shard files."""
    from torch.distributed.checkpoint import FileSystemReader

    sizes = {}
    for item, where in FileSystemReader(path).read_metadata().storage_data.items():
        file = os.path.join(path, where.relative_path)
        if file not in sizes:
            sizes[file] = os.path.getsize(file) if os.path.isfile(file) else -1
        if sizes[file] < where.offset + where.length:
            raise DamagedShards(f"{where.relative_path} is {'missing' if sizes[file] < 0 else 'truncated'} "
                                f"({item.fqn} needs bytes {where.offset}-{where.offset + where.length})")


def _pick(out_dir, names):
    """Of the checkpoints names (one per format) that out_dir holds, the newer one (the higher iter_num; a tie: the
    first in names), so that switching checkpoint_format never resumes from the older state; None if none."""
    paths = [p for p in (_complete(os.path.join(out_dir, name)) for name in names) if p]
    if len(paths) < 2:
        return paths[0] if paths else None
    return max(paths, key=_iters)  # unreadable: the other one


def latest(out_dir, prefer="full"):
    """The latest checkpoint in out_dir: ckpt.pt or ckpt.dcp (both: the newer; a tie: prefer's format), or None."""
    return _pick(out_dir, sorted(FORMATS.values(), key=lambda name: name != FORMATS[prefer]))


def numbered(optim_sd):
    """torch.distributed.checkpoint's optimizer state (keyed by parameter name) as torch.optim's (keyed 0, 1, ...
    in the order of the optimizer's parameters, which its param_groups list, whatever order the state is in)."""
    order, start, groups = [name for group in optim_sd["param_groups"] for name in group["params"]], 0, []
    for group in optim_sd["param_groups"]:
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    state = {i: optim_sd["state"][name] for i, name in enumerate(order) if name in optim_sd["state"]}
    if len(state) != len(optim_sd["state"]):
        raise RuntimeError(f"optimizer state for {sorted(set(optim_sd['state']) - set(order))} has no parameter")
    return {"state": state, "param_groups": groups}


def read_dcp(path):
    """
    A DCP folder as the single-file format, in this process's memory, without torch.distributed: the weights and
    optimizer state in full, the optimizer numbered as torch.optim numbers it (numbered).
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    check_dcp(path)  # (a missing or short shard: say which, before DCP fails on it)
    tensors = {}  # filled with everything the folder holds (what DCP's own dcp_to_torch_save does)
    _load_state_dict(tensors, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    state = _peek(path)
    state["model"] = tensors["model"]
    if "optimizer" in tensors:
        state["optimizer"] = numbered(tensors["optimizer"])
    return state


def damaged(path, e):
    """The one line for a checkpoint (a file or a DCP folder) that cannot be read, naming the others in its folder."""
    folder = os.path.dirname(path.rstrip(os.sep)) or "."
    others = sorted(p for p in glob.glob(os.path.join(folder, "*.pt")) + glob.glob(os.path.join(folder, "*.dcp"))
                    if os.path.abspath(p) != os.path.abspath(path.rstrip(os.sep)))
    hint = f"; other checkpoints there: {', '.join(others)}" if others else ""
    why = f"{e}" if isinstance(e, DamagedShards) else type(e).__name__
    return UserError(f"{path} is corrupt or incomplete ({why}){hint}")


def load(path):
    """Read a checkpoint (a file, or a DCP folder: read_dcp) onto the CPU, or say clearly why it cannot be read."""
    path = _complete(path) or path
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: train first, or check --out_dir")
    try:
        state = read_dcp(path) if os.path.isdir(path) else torch.load(path, map_location="cpu", weights_only=True)
        missing = {"model", "model_args", "iter_num"} - set(state)
    except BaseException as e:
        if not _read_error(e):
            raise
        raise damaged(path, e) from None
    if missing:
        raise UserError(f"{path} is not a checkpoint of this repo (it lacks {', '.join(sorted(missing))})")
    return from_nanogpt(state, path)


def from_nanogpt(state, path):
    """
    karpathy/nanoGPT's ckpt.pt, read as this repo's, in memory (the file is not changed): with its default
    compile=True the weights' names start with '_orig_mod.', there is no 'scaler' entry, best_val_loss is a
    tensor, and without flash attention the causal mask is stored as a buffer 'attn.bias' (1, 1, T, T).
    """
    model, prefix = state["model"], "_orig_mod."
    nanogpt = any(k.startswith(prefix) for k in model) or ("optimizer" in state and "scaler" not in state)
    if nanogpt:
        print(f"note: {path} is a nanoGPT checkpoint: reading it as one (the file is not changed)")
    state["model"] = {k.removeprefix(prefix): v for k, v in model.items()
                      if not (k.endswith(".attn.bias") and v.dim() == 4)}
    if isinstance(state.get("best_val_loss"), torch.Tensor):
        state["best_val_loss"] = state["best_val_loss"].item()
    return state


def model_from_checkpoint(state, dropout=None):
    args = dict(state["model_args"])
    if dropout is not None:
        args["dropout"] = dropout  # not part of the architecture: a resumed or sampled run may change it
    model = GPT(GPTConfig(**args))
    if "model" in state:  # (load_latest of a DCP folder: parallel.load_training_state reads it once sharded)
        model.load_state_dict(state["model"])
    return model


def load_latest(out_dir, checkpoint_format):
    """
    init_from='resume': (path, state) of the latest checkpoint (latest()). A DCP folder's state is its extra.pt plus
    'dcp': its path; every rank then reads only its shards of it into the wrapped model (parallel.load_training_state).
    """
    path = latest(out_dir, checkpoint_format) or os.path.join(out_dir, FORMATS[checkpoint_format])
    if not os.path.isdir(path):
        return path, load(path)
    try:
        return path, {**_peek(path), "dcp": path}
    except BaseException as e:
        if not _read_error(e):
            raise
        raise damaged(path, e) from None


def check_model_args(state, path, config, explicit):
    """
    On resume: a setting the user asked for (given explicitly, or set by an explicit --recipe) must agree with what
    the checkpoint fixes: its architecture, its optimizer and its frozen layers (the optimizer state is for exactly
    those parameters). Returns the settings the resumed run takes from the checkpoint instead of its defaults: those,
    and the recipe's schedule, where the user did not ask otherwise.
    """
    from lib.optim import RECIPES

    by_recipe = set(RECIPES[config["recipe"]]) - explicit if "recipe" in explicit else set()
    trained_config = state.get("config", {})
    trained = {k: state["model_args"].get(k, getattr(GPTConfig, k)) for k in ARCH_KEYS}  # older: the defaults
    trained.update({k: trained_config.get(k, default) for k, default in STATE_KEYS})
    for k, value in trained.items():
        if k in explicit | by_recipe and config.get(k, value) != value:
            asked = f"--recipe={config['recipe']} sets" if k in by_recipe else "the config asks for"
            what = "architecture" if k in ARCH_KEYS else "optimizer and frozen layers (its optimizer state is theirs)"
            raise UserError(f"{path} was trained with {k}={value!r} but {asked} {k}={config[k]!r}: a resumed run keeps "
                            f"its {what}; drop that setting, or use a new --out_dir to train from scratch")
    keep = {**trained, **{k: trained_config[k] for k in ("recipe", "lr_schedule") if k in trained_config}}
    return {k: v for k, v in keep.items() if k in config and k not in explicit | by_recipe}


def load_pretrained(name_or_path, dropout=0.0, also_valid="resume"):
    """GPT-2 weights from the Hugging Face hub by name, or from a local transformers folder."""
    if name_or_path not in GPT2_NAMES and "/" not in name_or_path and not os.path.isdir(name_or_path):
        raise UserError(f"init_from='{name_or_path}' is not a valid value: use {also_valid}, {', '.join(GPT2_NAMES)}, "
                        f"a hub id such as openai-community/gpt2, or a local transformers GPT-2 folder")
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


def find(out_dir, ckpt="best"):
    """The checkpoint that ckpt names: 'best' (best.pt, else ckpt.pt), 'latest' (ckpt.pt), or a file in out_dir; a
    .dcp folder where there is no .pt file (or a newer one). A best.pt of another run than ckpt.pt's is passed over,
    with a note."""
    if ckpt not in ("best", "latest"):
        return _complete(os.path.join(out_dir, ckpt)) or os.path.join(out_dir, ckpt)
    best, last = (_pick(out_dir, [BEST, BEST_DCP]) if ckpt == "best" else None), latest(out_dir)
    if best and last:
        try:
            theirs, ours = _peek(best), _peek(last)
        except BaseException as e:
            if not _read_error(e):
                raise
            theirs = ours = {}  # load() then says what is wrong with it
        if not same_run(theirs, ours):
            print(f"note: {best} is from another run than {last} ({_foreign(theirs, ours)}): using {last}; "
                  f"--ckpt={os.path.basename(best)} takes it anyway", file=sys.stderr)
            best = None
    return best or last or os.path.join(out_dir, LATEST)


def load_for_inference(init_from, out_dir="out", ckpt="best"):
    """
    (model, meta) to sample from or evaluate: a checkpoint in out_dir (init_from='resume'; ckpt is 'best': best.pt,
    else ckpt.pt; 'latest': ckpt.pt; or a file name in out_dir) or GPT-2 weights (a hub name or a local folder).
    The model is in eval mode on the CPU, dropout off; meta is the vocabulary it was trained with ({} for GPT-2).
    """
    from lib.batches import checkpoint_meta

    if init_from == "resume":
        state = load(find(out_dir, ckpt))
        model = model_from_checkpoint(state, dropout=0.0)
        meta = checkpoint_meta(state)
    else:
        model = load_pretrained(init_from)
        meta = {}
    return model.eval(), meta


def check_format(checkpoint_format, optimizer):
    if checkpoint_format not in FORMATS:
        raise UserError(f"checkpoint_format={checkpoint_format!r} is not one of {', '.join(map(repr, FORMATS))}")
    if checkpoint_format == "sharded" and optimizer == "muon":
        raise UserError("checkpoint_format='sharded' works with optimizer='adamw' (DCP cannot take Muon's pair of "
                        "optimizers): use checkpoint_format='full'")


def convert(src, dst):
    """A DCP folder (or any checkpoint) as one file in the format save() writes; dst must not exist yet."""
    if os.path.exists(dst):
        raise UserError(f"{dst} already exists: remove it first, or pick another name")
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):  # said before a big checkpoint is read
        raise UserError(f"cannot write {dst}: there is no folder {folder} (create it first, or pick another path)")
    state = load(src)
    _write_atomic(dst, state)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))
    return state


if __name__ == "__main__":  # python -m lib.checkpoint convert out/ckpt.dcp out/ckpt.pt
    from lib.runtime import install_error_hook

    install_error_hook()
    if len(sys.argv) != 4 or sys.argv[1] != "convert":
        raise UserError("usage: python -m lib.checkpoint convert OUT_DIR/ckpt.dcp OUT_DIR/ckpt.pt")
    converted = convert(sys.argv[2], sys.argv[3])
    print(f"wrote {sys.argv[3]} (iter {converted['iter_num']}) from {sys.argv[2]}")
