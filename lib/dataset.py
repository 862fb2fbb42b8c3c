"""
What the data/<dataset>/prepare.py scripts share: the dataset format, writing it safely, and the tiny Shakespeare
scripts' command line and text source (--input=PATH, else input.txt beside the script, else a download).

A prepared dataset is a folder holding
    train.bin, val.bin  each a flat stream of token ids, little-endian uint16 (vocab_size <= 65,536) or uint32
    meta.json           {"format": 1, "tokenizer": "gpt2" or "char", "vocab_size", "dtype", "eot" (the id after
                        every document, or null), "tokens": {split: count}, "documents": {split: count},
                        "source": where the text came from, and for "char" "vocab": the characters in id order;
                        for a tokenizer.json (data/train_tokenizer.py) tokenizer is "hf:<sha256, 16 hex digits>"
                        and "tokenizer_file" (its path) and "tokenizer_json" (the file itself) come along}
which batches.load_meta reads for train.py, sample.py, bench.py and export.py. Chat data (lib/chat_data.py) adds
    train_mask.bin, val_mask.bin        a byte per token: 1 where it is trained on (the assistant's tokens)
    train_lengths.bin, val_lengths.bin  each conversation's token count, uint32; and meta.json's "chat" (lib/chat.py)

A prepare is the only writer of its --out_dir while it runs (files.lock: a second one stops in one line naming it),
and replaces only a dataset that a prepare wrote there earlier, which its meta.json says; bins or metadata of any
other origin stay unless --overwrite=True, and even then until the new dataset is complete (claim()).
"""

import argparse
import json
import os
import shutil
import signal
import sys
import time
import urllib.request

import numpy as np

from configurator import ArgumentParser
from lib import files
from lib.errors import UserError

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
# the one table of token dtypes: the smallest that holds every id of the vocabulary
TOKEN_DTYPES = ((1 << 16, "uint16"), (1 << 32, "uint32"))  # (largest vocab_size, dtype)
TEMP_PREFIX = ".prepare-"  # out_dir/.prepare-<pid>.tmp/: the files being written
OUTPUTS = ("meta.json", "train.bin", "val.bin")  # what a prepare writes (in this order), and ...
REMOVED = ("meta.pkl",)  # ... what it removes: an older prepare's metadata, out of date once these are written
# chat data's per-split files beside the bins (lib/chat_data.py): written by its prepare, removed by any other
SIDECARS = tuple(f"{split}_{name}.bin" for name in ("mask", "lengths") for split in SPLITS)


class BadInput(Exception):
    """Input found unusable part-way through writing (a document that is not text, an empty split, ...)."""


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def gpt2_encoding():
    """tiktoken's GPT-2 BPE: it downloads its files once, then reads them from its cache."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        fail(f"could not load tiktoken's gpt2 encoding ({type(e).__name__}); without network, set TIKTOKEN_CACHE_DIR "
             f"to a folder holding its cached files")


def token_dtype(vocab_size):
    for largest, dtype in TOKEN_DTYPES:
        if vocab_size <= largest:
            return dtype
    fail(f"a vocabulary of {vocab_size:,} tokens does not fit in {TOKEN_DTYPES[-1][1]}")


def read_text(input_path, dataset_dir, url=TINY_SHAKESPEARE_URL):
    """The corpus as a str. A download is saved as dataset_dir/input.txt so it happens once."""
    script = os.path.join(os.path.relpath(dataset_dir), "prepare.py")
    if input_path is None:
        input_path = os.path.join(dataset_dir, "input.txt")
        if not os.path.exists(input_path):
            print(f"downloading {url}")
            try:
                with urllib.request.urlopen(url, timeout=30) as response:
                    data = response.read()
            except OSError as e:
                fail(f"could not download {url} ({getattr(e, 'reason', e)}); pass a local copy of the text: "
                     f"python {script} --input=path/to/input.txt")
            try:
                files.write_atomic(input_path, lambda f: f.write(data), kind="text")
            except UserError as e:
                fail(str(e))
    if not os.path.isfile(input_path):
        fail(f"input file {input_path} not found")
    try:
        with open(input_path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        fail(f"{input_path} is not UTF-8 text ({e.reason} at byte {e.start})")
    if not text:
        fail(f"{input_path} is empty")
    return text


def parse_args(description, dataset_dir):
    parser = ArgumentParser(description=description)
    parser.add_argument("--input", help="a local UTF-8 text file (default: input.txt here, downloaded if missing)")
    parser.add_argument("--out_dir", default=dataset_dir, help="where to write train.bin, val.bin and meta.json")
    add_overwrite(parser)
    args = parser.parse_args()
    claim(args.out_dir, args.overwrite)
    return args


def add_overwrite(parser):
    """--overwrite=True (or --overwrite): replace bins or metadata in --out_dir that no prepare of this repo wrote."""
    def boolean(value):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"{value!r} is not True or False")
        return value.lower() in ("true", "1", "yes")
    parser.add_argument("--overwrite", type=boolean, nargs="?", const=True, default=False, metavar="True|False",
                        help="replace train.bin, val.bin, meta.json or meta.pkl in --out_dir even if no prepare of "
                             "this repo wrote them (they stay until the new dataset is complete)")


def prepared_here(out_dir):
    """Whether out_dir's meta.json is one that write_dataset wrote (its bins, and a meta.pkl, belong with it)."""
    try:
        with open(os.path.join(out_dir, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT_VERSION and {"tokenizer", "vocab_size", "dtype",
                                                                                 "tokens"} <= set(meta)


_claimed = {}  # the output folders this process holds: real path -> its lock file


def claim(out_dir, overwrite=False):
    """
    Before any work: make this process the only prepare writing into out_dir (files.lock), and check that what it
    will replace there is an earlier prepare's dataset (files.guard, the rule every writer follows). Once per folder;
    write_dataset claims a folder nobody claimed, without overwrite.
    """
    key = os.path.realpath(out_dir)
    if key in _claimed:
        return
    try:
        os.makedirs(out_dir, exist_ok=True)
        _claimed[key] = files.lock(out_dir, "prepare")
        outputs = [os.path.join(out_dir, name) for name in OUTPUTS + REMOVED + SIDECARS]
        for path in outputs:
            files.check_file(path)
        files.guard(outputs, overwrite, "--out_dir", out_dir,
                    ours=lambda path: prepared_here(out_dir), holds=lambda paths: (
                        f"already holds {files.names(paths)}, not a dataset that a "
                        f"prepare of this repo wrote (its meta.json would say so)"),
                    when="once the new dataset is complete")
    except OSError as e:
        fail(f"cannot write to {out_dir} ({e.strerror or e}): pass another --out_dir")
    except UserError as e:
        _claimed.pop(key, None)
        fail(str(e))


_signals = []  # the signals write_dataset received, should a library swallow the KeyboardInterrupt


def _interrupt(signum, frame):
    _signals.append(signum)
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def _remove_stale_temps(out_dir):
    """Temp folders of prepares that were killed (SIGKILL, power loss): this process holds out_dir's lock, so no
    other prepare is writing them."""
    for name in os.listdir(out_dir):
        if name.startswith(TEMP_PREFIX) and name.endswith(".tmp") and name != f"{TEMP_PREFIX}{os.getpid()}.tmp":
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def _write_split(path, chunks, dtype, vocab_size):
    """
    Stream an iterable of token-id arrays into a flat file; returns the number of tokens. A chunk may instead be a
    dict {"ids": token ids, NAME: array, ...}: each other array goes, in its own dtype, to its own file beside the
    split's, <split>_NAME.bin (chat data's per-token loss mask and conversation lengths: lib/chat_data.py).
    """
    count, sidecars = 0, {}
    with open(path, "wb") as f:
        try:
            for chunk in chunks:
                extra = {k: v for k, v in chunk.items() if k != "ids"} if isinstance(chunk, dict) else {}
                chunk = np.asarray(chunk["ids"] if isinstance(chunk, dict) else chunk)
                if chunk.size and int(chunk.max()) >= vocab_size:  # never write an id the vocabulary lacks
                    raise BadInput(f"token id {int(chunk.max())} is outside the vocabulary of {vocab_size:,}")
                chunk.astype(dtype, copy=False).tofile(f)
                count += chunk.size
                for name, array in extra.items():
                    if name not in sidecars:
                        sidecars[name] = open(f"{path[:-4]}_{name}.bin", "wb")
                    np.asarray(array).tofile(sidecars[name])
            if count == 0:
                raise BadInput(f"the {os.path.basename(path)[:-4]} split has no tokens: give it more text")
            for g in (f, *sidecars.values()):
                g.flush()
                os.fsync(g.fileno())
        finally:
            for g in sidecars.values():
                g.close()
    return count


def write_dataset(out_dir, splits, meta):
    """
    Write train.bin, val.bin and meta.json into out_dir. splits maps "train" and "val" to iterables of token-id
    arrays, streamed to disk in order; meta is meta.json's content without the token counts, which are added here.

    Everything goes into a temporary folder inside out_dir first and is renamed into place only when all three
    files are complete, so a failure or Ctrl-C (or a full disk) leaves the dataset that was there untouched and
    no complete-looking train.bin. meta.json is renamed first: its token counts then disagree with any bin left
    over from before, which lib/batches.py reports, should the process die between the renames.
    """
    t0 = time.time()
    claim(out_dir)  # (a prepare script claimed it already, before its work)
    tmp = os.path.join(out_dir, f"{TEMP_PREFIX}{os.getpid()}.tmp")
    try:
        _remove_stale_temps(out_dir)
        os.makedirs(tmp)
    except OSError as e:
        fail(f"cannot write to {out_dir} ({e.strerror or e}): pass another --out_dir")
    meta = {"format": FORMAT_VERSION, **meta, "dtype": token_dtype(meta["vocab_size"])}
    _signals.clear()
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        meta["tokens"] = {}
        for split in SPLITS:
            meta["tokens"][split] = _write_split(os.path.join(tmp, f"{split}.bin"), splits[split], meta["dtype"],
                                                 meta["vocab_size"])
        if _signals:  # a Ctrl-C whose KeyboardInterrupt something caught (seen once: the prepare finished, exit 0)
            raise KeyboardInterrupt
        order = ("format", "tokenizer", "vocab_size", "dtype", "eot", "tokens", "documents", "source")
        meta = {**{k: meta[k] for k in order if k in meta}, **meta}  # the short fields first, "vocab" last
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        written = OUTPUTS + tuple(sorted(set(os.listdir(tmp)) - set(OUTPUTS)))  # and chat data's sidecars
        for name in written:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        for name in REMOVED + tuple(n for n in SIDECARS if n not in written):  # another kind of prepare's
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
        files.fsync_dir(out_dir)
    except (KeyboardInterrupt, OSError, BadInput) as e:
        for chunks in splits.values():  # stop the tokenizing processes and close their progress bars, then say why
            if hasattr(chunks, "close"):
                chunks.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            fail(f"interrupted; {out_dir} is as it was before this prepare")
        if isinstance(e, OSError):
            fail(f"could not write to {out_dir} ({e.strerror or e}); the dataset there is as it was before: free "
                 f"some disk space or pass another --out_dir")
        fail(f"{e}; {out_dir} is as it was before this prepare")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(tmp, ignore_errors=True)
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        docs = meta.get("documents", {}).get(split)
        in_docs = f" in {docs:,} documents" if docs is not None else ""
        print(f"{split} has {meta['tokens'][split]:,} tokens{in_docs} ({meta['tokens'][split] * itemsize:,} bytes, "
              f"{meta['dtype']})")
    seconds = time.time() - t0
    print(f"wrote {os.path.join(out_dir, 'train.bin')}, val.bin and meta.json in {seconds:.1f}s "
          f"({sum(meta['tokens'].values()) / seconds:,.0f} tokens/s)")
    return meta
