"""
Writing what a script keeps without ever losing what was there: the one atomic writer, the one rule for what a
script may replace, and the one lock per output folder. Every file a script keeps goes through here: checkpoints,
metrics.jsonl, loss.png, datasets, tokenizers, exports, the HellaSwag download, the experiments' results.

    write_atomic(path, lambda f: f.write(data))    # bytes; text=True gives a text file (UTF-8)
    write_json(path, obj)                          # JSON, the same way
    save_figure(fig, path)                         # a matplotlib figure, the same way
    fsync_dir(folder)                              # make renames in folder durable
    lock(folder, "prepare")                        # this process is folder's only writer until it ends (unlock)
    guard(paths, overwrite, "--out_dir", folder)   # stop unless what a write would replace is the script's own
    swap_folder(staged, folder, keep)              # a folder written in full beside folder, swapped in whole

Atomic: the content goes to `path.<pid>.tmp` in the same folder, is flushed and fsynced, then renamed over `path` in
one step: a process killed at any moment leaves the previous file whole (or no file), never a partial one. On any
failure the temporary file is removed; a full disk, or a folder where the file should be, becomes one line (a
UserError) that says what to do (failed()).

The rule (guard): a script replaces or removes only what it wrote itself earlier, which it recognises by a marker or
its metadata (a prepare's meta.json, an export's export.json, train_tokenizer.py's kind of tokenizer file). Anything
else where it would write stops it in one line, before any work, unless --overwrite=True; and since every write is
atomic or staged, even then the old files go only at the new output's first successful write. A trained model is
never a training run's own to replace: train.py asks for --init_from=resume or --overwrite=True.
"""

import errno
import json
import os
import re
import shutil
import socket
import sys

from lib.errors import UserError

LOCK = ".lock"  # the lock file in every output folder


class DiskFull(UserError):
    """A write ran out of space; the previous file is intact."""


def errno_of(e):
    """The error number of a failed write: an OSError's, or the '(os error N)' that libraries written in Rust
    (safetensors, tokenizers) put in their messages; None for any other error."""
    if isinstance(e, OSError):
        return e.errno
    found = re.search(r"\(os error (\d+)\)", str(e))
    return int(found[1]) if found else None


def failed(e, path, kind="file", needs_bytes=None):
    """The error e (an OSError, or errno_of(e) is not None), raised writing path, as one line (a UserError) that
    says what to do; kind names what path is."""
    folder = os.path.dirname(os.path.abspath(path))
    number = errno_of(e)
    if not isinstance(e, OSError):
        e = OSError(number, os.strerror(number) if number else str(e))
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        need = f"it needs about {needs_bytes / 2**20:,.1f} MiB and " if needs_bytes else ""
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:,.1f} MiB are"
        except OSError:
            free = "too little is"
        return DiskFull(f"disk full while saving {path}: {need}{free} free in {folder}; the previous {kind} there is "
                        f"intact. Free some space or pick another folder")
    if e.errno == errno.EISDIR or (e.errno == errno.EEXIST and os.path.isdir(path)):
        return UserError(f"{path} is a folder, where this would write a file: move it away, or pick another name")
    return UserError(f"cannot write {path} ({e.strerror or e}): check the folder, or pick another one")


def check_file(path):
    """Stop now, in one line, if a folder stands where a file will be written later (metrics.jsonl, loss.png)."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, where this would write a file: move it away, or pick another name")


class _Recorded:
    """A file that remembers the exception its write raised: torch.save replaces it by a RuntimeError ('unexpected
    pos'), which would hide whether the disk was full or a second Ctrl-C interrupted."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except BaseException as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()

    def __getattr__(self, name):  # seek, tell, ... for writers that use them
        return getattr(self.f, name)


def fsync_dir(path):
    """Make the renames in folder path durable (POSIX; nothing to do elsewhere)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path, write, text=False, needs_bytes=None, fsync_folder=False, kind="file"):
    """
    Call write(f) on a temporary file beside path, then rename it over path. needs_bytes (an estimate, for the
    disk-full message), fsync_folder (also make the rename durable now) and kind (what the file is, for messages)
    are optional.
    """
    check_file(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    source_error = None  # what write() raised other than by writing (reading what it copies, say): raised as it is
    try:
        with open(tmp, "w" if text else "wb", **({"encoding": "utf-8"} if text else {})) as f:
            recorded = _Recorded(f)
            try:
                write(recorded)
            except Exception as e:
                if recorded.error is not None:
                    raise recorded.error from None
                source_error = e
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync_folder:
            fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException as e:  # a full disk, a second Ctrl-C (a UserError), anything: no temporary file stays
        if os.path.exists(tmp):
            os.remove(tmp)
        # (a full disk, even where the writer wrote to the file descriptor itself, as PIL does)
        if isinstance(e, OSError) and (e is not source_error or e.errno in (errno.ENOSPC, errno.EDQUOT)):
            raise failed(e, path, kind, needs_bytes) from None
        raise


def write_json(path, obj, **kwargs):
    """obj as JSON (indented, UTF-8) at path, atomically."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1, ensure_ascii=False) + "\n"), text=True, **kwargs)


def save_figure(fig, path):
    """A matplotlib figure at path, atomically, in the format its extension names (PNG without one)."""
    fmt = os.path.splitext(path)[1][1:].lower() or "png"
    write_atomic(path, lambda f: fig.savefig(f, format=fmt), kind="picture")


# ----------------------------------------------------------------------------- the rule and the lock

def names(paths, at_most=4):
    """'a, b, c, ...': the names of paths, for a message."""
    return ", ".join(os.path.basename(p.rstrip(os.sep)) for p in paths[:at_most]) + ", ..." * (len(paths) > at_most)


def guard(paths, overwrite, setting, target, ours=lambda path: False, holds=None, other_way="",
          when="once the new one is complete", overwrite_does=None):
    """
    The rule, before a script writes (see above). paths: what the write would replace or remove; those that exist
    must be the script's own earlier output (ours(path)), or overwrite must be on, else one line stops the script.
    setting, target: the setting that named the place and its value ("--out_dir", "out"), for the message; holds:
    what target holds, as a function of the refused paths ("already holds ..."; default: their names); other_way: a
    further way out ("continue it with --init_from=resume"); when: when --overwrite=True replaces them (or
    overwrite_does: what --overwrite=True does, in full). Returns the refused paths.
    """
    refused = [p for p in paths if os.path.lexists(p) and not ours(p)]
    if refused and not overwrite:
        what = holds(refused) if holds else f"already holds {names(refused)}, which this script did not write"
        it = "them" if len(refused) > 1 and not holds else "it"
        other_way = f"{other_way}, " if other_way else ""
        overwrite_does = overwrite_does or f"replace {it} with --overwrite=True ({when})"
        raise UserError(f"{setting.lstrip('-')} '{target}' {what}: {other_way}{overwrite_does}, or pick another "
                        f"{setting}")
    return refused


_held = []  # the lock files this process holds


def _not_in_forked_children():
    """A forked child (a tokenizing worker) closes its copies of the locks: orphaned by a killed parent, it would
    otherwise keep the folder locked. The parent's own descriptors keep holding them."""
    for f in _held:
        f.close()
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_not_in_forked_children)


def lock(folder, what, setting="--out_dir"):
    """
    Make this process the only writer of folder (what: 'training run', 'prepare', ...), or stop with one line
    naming the other one. The lock is an flock on folder/.lock, so it ends with the process however the process
    ends (even SIGKILL): a crashed run never leaves the folder locked. Keep the returned file open while writing.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; writers there are not protected from each other
        return None
    try:
        f = open(os.path.join(folder, LOCK), "a+")
    except OSError as e:
        raise failed(e, os.path.join(folder, LOCK), "lock") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        holder = holder if holder[:1].isalpha() and not holder.startswith("pid ") else f"process ({holder or '?'})"
        raise UserError(f"{setting.lstrip('-')} '{folder}' is in use by another {holder}: wait for it to finish, stop "
                        f"it, or pick another {setting}") from None
    try:  # who holds it, for the message of the next one (only a message: a full disk does not stop the writer)
        f.seek(0)
        f.truncate()
        f.write(f"{what} (pid {os.getpid()} on {socket.gethostname()}: {os.path.basename(sys.argv[0]) or 'python'})")
        f.flush()
    except OSError:
        pass
    _held.append(f)
    return f


def unlock(f):
    """Release a lock of lock() before the process ends (a script run in-process, a test)."""
    if f is not None:
        f.close()
        if f in _held:
            _held.remove(f)


# ----------------------------------------------------------------------------- a folder written whole

def _link_or_copy(src, dst):
    """dst as a hard link to src (no copy), or a copy where the filesystem has no hard links; a symlink as itself."""
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def swap_folder(staged, folder, keep=()):
    """
    Make the complete folder staged (written beside folder) the folder folder, in two renames: folder becomes
    folder.old-<pid>, staged becomes folder, then the old one goes. keep: names in folder that the writer leaves as
    they are (a user's files or folders), carried over first as hard links (copies where the filesystem has none),
    so they are in both until the swap.
    """
    for name in keep:
        src, dst = os.path.join(folder, name), os.path.join(staged, name)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)
    old = f"{folder.rstrip(os.sep)}.old-{os.getpid()}"
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(staged, folder)
    fsync_dir(os.path.dirname(os.path.abspath(folder)))
    shutil.rmtree(old, ignore_errors=True)
