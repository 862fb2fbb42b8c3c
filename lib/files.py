"""
Writing a file so that nothing is ever half-written: the one writer for every file a script keeps (checkpoints,
metrics.jsonl, loss.png, tokenizers, exports, eval results).

    write_atomic(path, lambda f: f.write(data))          # bytes; text=True gives a text file (UTF-8)
    write_json(path, obj)                                # JSON, the same way
    fsync_dir(folder)                                    # make renames in folder durable

The content goes to `path.<pid>.tmp` in the same folder, is flushed and fsynced, then renamed over `path` in one
atomic step: a process killed at any moment leaves the previous file whole (or no file), never a partial one. On
any failure the temporary file is removed; a full disk, or a folder where the file should be, becomes one line
(a UserError) that says what to do.
"""

import errno
import json
import os
import shutil

from lib.runtime import UserError


class DiskFull(UserError):
    """A write ran out of space; the previous file is intact."""


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
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, where this would write a file: move it away, or pick another name")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w" if text else "wb", **({"encoding": "utf-8"} if text else {})) as f:
            recorded = _Recorded(f)
            try:
                write(recorded)
            except Exception:
                if recorded.error is not None:
                    raise recorded.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync_folder:
            fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException as e:  # a full disk, a second Ctrl-C (a UserError), anything: no temporary file stays
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            folder = os.path.dirname(os.path.abspath(path))
            need = f"it needs about {needs_bytes / 2**20:,.1f} MiB and " if needs_bytes else ""
            raise DiskFull(f"disk full while saving {path}: {need}{shutil.disk_usage(folder).free / 2**20:,.1f} MiB "
                           f"are free in {folder}; the previous {kind} there is intact. Free some space or pick "
                           f"another folder") from None
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS, errno.ENOENT, errno.ENOTDIR):
            raise UserError(f"cannot write {path} ({e.strerror}): check the folder, or pick another one") from None
        raise


def write_json(path, obj, **kwargs):
    """obj as JSON (indented, UTF-8) at path, atomically."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1, ensure_ascii=False) + "\n"), text=True, **kwargs)
