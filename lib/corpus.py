"""
The pipeline behind data/openwebtext, data/fineweb_edu, data/tinystories and data/text (whose prepare.py scripts
only set its defaults): documents in, train.bin / val.bin / meta.json out (the format: lib/dataset.py).

    documents  a Hugging Face hub dataset: load_dataset(--hub_dataset, name=--name, revision=--revision,
               split=--split), or local files: load_dataset("text" | "json" | "parquet", data_files=--data_files)
    val split  the source's own (--val_split), else a fixed-seed sample of the documents: those that nanoGPT's
               train_test_split(test_size=--val_fraction, seed=--seed, shuffle=True) picks, in source order
    tokens     --tokenizer=gpt2: tiktoken's encode_ordinary(document) then GPT-2's end-of-text token (50256),
               for every document; --tokenizer=char: the document's characters then a newline (no end-of-text
               token exists), the vocabulary being every character of the corpus; --tokenizer=tokenizer.json: its
               ids, then its <|endoftext|>. Empty documents are skipped. On every path a special token's spelling
               in a document (a literal "<|endoftext|>") is text: only the boundary after a document is the token.

Batches of documents are tokenized by --num_proc processes and written in document order, so the bins are
byte-identical whatever --num_proc is, and memory holds only the batches in flight, never the corpus. The source
itself stays on disk: load_dataset keeps it as memory-mapped Arrow files in the Hugging Face cache.
"""

import argparse
import collections
import datetime
import glob
import math
import multiprocessing
import os
import signal
import sys
import time
from functools import partial

import numpy as np
from tqdm import tqdm

from configurator import RULES, ArgumentParser, Rule, at_least
from lib.dataset import BadInput, add_overwrite, claim, fail, gpt2_encoding, token_dtype, write_dataset

GPT2_VOCAB, GPT2_EOT = 50257, 50256
BATCH_DOCS = 512  # documents per task: enough to amortize passing it between processes, little enough to keep RAM low
TASKS_PER_WORKER = 20  # batches a tokenizing process does before a fresh one takes over
LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # file kind -> datasets builder
SAMPLE_BY = {"file": "document", "paragraph": "paragraph", "line": "line"}  # --split_by -> the text builder's sample_by


def add_source_arguments(p, hub_help, rows, val_fraction):
    """The options of where the data comes from (a hub dataset) and how val is drawn from it, which every
    corpus-style prepare shares (this module's and lib/chat_data.py's); rows: what one row is, for the help."""
    p.add_argument("--hub_dataset", help=hub_help)
    p.add_argument("--name", help="the hub dataset's configuration (subset)")
    p.add_argument("--revision", help="a branch, tag or commit of the hub dataset")
    p.add_argument("--split", default="train", help="the hub dataset's split to train on")
    p.add_argument("--val_split", help="the hub dataset's split to validate on (default: part of --split)")
    p.add_argument("--val_fraction", type=float, default=val_fraction, help=f"share of {rows} that go to val",
                   rule=Rule(lambda v: 0 < v < 1, f"in (0, 1), e.g. {val_fraction:g}", 1.0))
    p.add_argument("--seed", type=int, default=2357, help="seed of the validation sample", rule=RULES["seed"])


def parse_args(description, out_dir, paths_positional=False, **defaults):
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if paths_positional:
        p.add_argument("data_files", nargs="+", metavar="PATH", help="text, JSON lines or parquet files, or folders")
    else:
        p.add_argument("--data_files", nargs="+", metavar="PATH",
                       help="local .txt, .jsonl/.json or .parquet files or folders, instead of the hub dataset")
    p.add_argument("--out_dir", "--out", default=out_dir, help="where to write train.bin, val.bin, meta.json")
    add_source_arguments(p, "a dataset on the Hugging Face hub", "documents", 0.0005)
    p.add_argument("--text_field", default="text", help="the column holding the text (.jsonl, .parquet, hub)")
    p.add_argument("--split_by", choices=SAMPLE_BY, default="file", help="what one document is, in .txt files")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2, char, or a tokenizer.json (data/train_tokenizer.py)",
                   rule=Rule(lambda v: v in ("gpt2", "char") or (v.endswith(".json") and os.path.isfile(v)),
                             "gpt2, char, or the path of a tokenizer.json (data/train_tokenizer.py)", "bogus"))
    p.add_argument("--num_proc", type=int, default=os.cpu_count(), help="processes that tokenize (default: all cores)",
                   rule=at_least(1))
    add_overwrite(p)
    p.set_defaults(**defaults)
    args = p.parse_args()
    if not args.data_files and not args.hub_dataset:
        fail("no documents: pass --data_files=PATH (files or folders) or --hub_dataset=NAME")
    claim(args.out_dir, args.overwrite)  # the only prepare writing there, over nothing it did not write
    return args


# ----------------------------------------------------------------------------- documents

def local_files(paths):
    """(datasets builder, files): the paths, folders searched for .txt/.jsonl/.json/.parquet, all of one kind."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = []
            for folder, subfolders, names in os.walk(path):
                subfolders[:] = [d for d in subfolders if not d.startswith(".")]  # caches, a prepare's temp files
                found += [os.path.join(folder, name) for name in names if os.path.splitext(name)[1].lower() in LOADERS
                          and not name.startswith(".") and name != "meta.json"]  # a dataset's metadata: no text
            found.sort()
            if not found:
                fail(f"{path} holds no .txt, .jsonl, .json or .parquet files")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            matches = sorted(glob.glob(path))  # a pattern the shell did not expand, e.g. --data_files='owt/*.parquet'
            if not matches:
                fail(f"{path} not found")
            files += matches
    kinds = collections.defaultdict(list)
    for f in files:
        kinds[LOADERS.get(os.path.splitext(f)[1].lower())].append(f)
    if None in kinds:
        fail(f"{kinds[None][0]}: not a .txt, .jsonl, .json or .parquet file")
    if len(kinds) > 1:
        fail(f"the files mix {' and '.join(sorted(kinds))} ({', '.join(v[0] for v in kinds.values())}): prepare one "
             f"kind at a time")
    (loader, files), = kinds.items()
    return loader, [os.path.abspath(f) for f in files]


def _reason(e):
    """The innermost cause of a datasets error, in one line."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


def load_documents(args):
    """(train, val, source): the two splits as datasets with one column, the text, and what they came from."""
    from datasets import load_dataset  # slow to import: after the arguments are checked

    if args.data_files:
        loader, files = local_files(args.data_files)
        options = {"sample_by": SAMPLE_BY[args.split_by]} if loader == "text" else {}
        source = {"data_files": [os.path.abspath(p) for p in args.data_files], "loader": loader, **options}
        procs = min(args.num_proc, len(files))
        try:
            train = load_dataset(loader, data_files=files, split="train", num_proc=procs if procs > 1 else None,
                                 **options)
        except Exception as e:
            fail(f"could not read {files[0] if len(files) == 1 else f'the {len(files)} {loader} files'} "
                 f"({_reason(e)}): each must be UTF-8 text, JSON lines or parquet, as its name says")
        val = None
    else:
        source = {"hub_dataset": args.hub_dataset, "name": args.name, "revision": args.revision, "split": args.split}

        def load(split):
            try:
                return load_dataset(args.hub_dataset, name=args.name, revision=args.revision, split=split,
                                    num_proc=args.num_proc if args.num_proc > 1 else None)
            except Exception as e:
                fail(f"could not load {args.hub_dataset} (split {split}) from the Hugging Face hub ({_reason(e)}); "
                     f"without network, get its files where there is network and pass them with --data_files=PATH")

        train = load(args.split)
        val = load(args.val_split) if args.val_split else None
    where = args.data_files[0] if args.data_files else args.hub_dataset
    for ds in (train, val):
        if ds is not None and args.text_field not in ds.column_names:
            fail(f"{where} has no {args.text_field!r} column (it has {', '.join(ds.column_names)}): pass "
                 f"--text_field=NAME")
    train = train.select_columns([args.text_field])  # slices then read only the text, not the other columns
    if val is not None:
        source["val"] = f"split {args.val_split}"
        return train, val.select_columns([args.text_field]), source
    if len(train) < 2:
        fail(f"{where} gives {len(train)} document(s), and a validation split needs at least 2: "
             f"add files, or use --split_by=paragraph or --split_by=line")
    source["val"] = f"{args.val_fraction} of the documents, seed {args.seed}"
    train, val = split_off_validation(train, args.val_fraction, args.seed)
    return train, val, source


def split_off_validation(dataset, fraction, seed):
    """
    The documents that nanoGPT's dataset.train_test_split(test_size=fraction, seed=seed, shuffle=True) puts in
    each split (the same random permutation), each split in the source's order rather than shuffled: batches of
    documents are then read from consecutive rows, which keeps reading the corpus sequential on disk and in memory.
    """
    train_rows, val_rows = validation_rows(len(dataset), fraction, seed)
    return dataset.select(train_rows), dataset.select(val_rows)


def validation_rows(n, fraction, seed):
    """(train rows, val rows) of split_off_validation for n documents: sorted row indices."""
    permutation = np.random.default_rng(seed).permutation(n)
    n_val = math.ceil(fraction * n)
    if n_val >= n:
        fail(f"--val_fraction={fraction} of {n:,} documents leaves none to train on")
    return np.sort(permutation[n_val:]), np.sort(permutation[:n_val])


# ----------------------------------------------------------------------------- tokens, in parallel and in order

def encode_gpt2(texts):
    """GPT-2 BPE ids of each document followed by the end-of-text token, as one array."""
    enc = gpt2_encoding()  # cached by tiktoken: loaded once per process
    eot = np.array([GPT2_EOT], dtype=np.uint16)
    ids = []
    for text in texts:  # one document's ids at a time as Python ints (36 bytes each), then 2 bytes each
        ids += [np.array(enc.encode_ordinary(text), dtype=np.uint16), eot]  # ordinary: "<|endoftext|>" is text
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.uint16)


_HF = {}  # tokenizer.json path -> tokenizers.Tokenizer, loaded once per process


def encode_hf(texts, path, eot, dtype):
    """Ids of each document in a Hugging Face tokenizer (tokenizer.json), then its end-of-text token if it has one."""
    if path not in _HF:
        from tokenizers import Tokenizer

        _HF[path] = Tokenizer.from_file(path)
        _HF[path].encode_special_tokens = True  # a literal "<|endoftext|>" in a document is text, not a boundary
    tok, ids = _HF[path], []
    for encoding in tok.encode_batch(texts, add_special_tokens=False):
        ids += [np.array(encoding.ids, dtype=dtype)] + ([np.array([eot], dtype=dtype)] if eot is not None else [])
    return np.concatenate(ids) if ids else np.zeros(0, dtype=dtype)


def hf_meta(path):
    """meta.json's fields for a tokenizer.json: its name 'hf:<sha256, 16 hex>', its vocabulary, and the file itself
    (so a checkpoint, which carries the metadata, carries the tokenizer)."""
    import hashlib

    from tokenizers import Tokenizer

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        tok = Tokenizer.from_str(text)
    except Exception as e:  # not UTF-8, not JSON, or JSON that is no tokenizer
        fail(f"--tokenizer={path} is not a tokenizer.json that Hugging Face tokenizers can load ({_reason(e)}): "
             f"train one with data/train_tokenizer.py")
    return {"tokenizer": "hf:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
            "vocab_size": tok.get_vocab_size(), "eot": tok.token_to_id("<|endoftext|>"),
            "tokenizer_file": os.path.abspath(path), "tokenizer_json": text}


def encode_chars(texts, codepoints, dtype):
    """Character ids (positions in the sorted codepoints) of each document followed by a newline."""
    text = "".join(t + "\n" for t in texts)
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return np.searchsorted(codepoints, points).astype(dtype)


def chars_of(texts):
    return "".join(set().union(*texts))


_WORK = None  # (dataset, field, fn) in each worker process


def _init_worker(dataset, field, fn):
    global _WORK
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which stops the pool and cleans up
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler: the pool stops workers with SIGTERM
    _WORK = (dataset, field, fn)


def _worker_batch(start):
    """fn of the non-empty documents in rows [start, start + BATCH_DOCS): (result, rows, documents)."""
    dataset, field, fn = _WORK
    texts = dataset[start:start + BATCH_DOCS][field]
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise BadInput(f"row {start + i:,} of a split has a {field!r} of type {type(text).__name__}, not text")
    docs = [t for t in texts if t]  # an empty document adds nothing, not even an end-of-text token
    return fn(docs), len(texts), len(docs)


def _worker_rows(start):
    """fn(rows, start) of the rows [start, start + BATCH_DOCS), whatever they hold: (result, rows, documents)."""
    dataset, field, fn = _WORK
    return fn(dataset[start:start + BATCH_DOCS][field], start)


def in_batches(fn, dataset, field, num_proc, whole_rows=False):
    """(fn(documents), rows, documents) for consecutive batches of the dataset, in order. num_proc processes work
    on at most 2 * num_proc batches at a time, so memory stays bounded whatever the corpus size. whole_rows: fn gets
    each batch's rows as they are (not only non-empty text) and its first row's index, and returns the triple itself
    (lib/chat_data.py's conversations)."""
    starts = range(0, len(dataset), BATCH_DOCS)
    work = _worker_rows if whole_rows else _worker_batch
    # fork starts workers that already hold the dataset and the tokenizer; elsewhere spawn pickles them over
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    # each worker is replaced after TASKS_PER_WORKER batches: the pages of the memory-mapped corpus that it read
    # (resident memory too, until the process ends) never add up to more than that
    with context.Pool(max(1, min(num_proc, len(starts))), _init_worker, (dataset, field, fn),
                      maxtasksperchild=TASKS_PER_WORKER) as pool:
        pending = collections.deque()
        for start in starts:
            pending.append(pool.apply_async(work, (start,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def progress(desc, total):
    return tqdm(total=total, desc=desc, unit=" docs", unit_scale=True, mininterval=1, dynamic_ncols=True)


def tokens_of(split, dataset, field, encode, num_proc, documents):
    """The split's token arrays, batch by batch, with a progress bar; counts its documents into documents[split]."""
    tokens, t0 = 0, time.time()
    documents[split] = 0
    with progress(f"tokenizing {split}", len(dataset)) as bar:
        for ids, rows, docs in in_batches(encode, dataset, field, num_proc):
            tokens += len(ids)
            documents[split] += docs
            bar.set_postfix_str(f"{tokens / max(time.time() - t0, 1e-6):,.0f} tokens/s", refresh=False)
            bar.update(rows)
            yield ids


def vocabulary(splits, field, num_proc):
    """Every character of the corpus, sorted, with the newline that ends each document."""
    chars = {"\n"}
    for split, dataset in splits.items():
        with progress(f"collecting characters of {split}", len(dataset)) as bar:
            for found, rows, _ in in_batches(chars_of, dataset, field, num_proc):
                chars.update(found)
                bar.update(rows)
    return sorted(chars)


def main(description, out_dir, paths_positional=False, **defaults):
    t0 = time.time()
    args = parse_args(description, out_dir, paths_positional, **defaults)
    own = hf_meta(args.tokenizer) if args.tokenizer.endswith(".json") else None  # a bad file: one line, at once
    train, val, source = load_documents(args)
    splits = {"train": train, "val": val}
    print(f"{len(train):,} train and {len(val):,} val documents from "
          f"{source.get('hub_dataset') or ', '.join(args.data_files)}")
    field, documents = args.text_field, {}  # documents: filled in as the splits are tokenized
    meta = {"tokenizer": args.tokenizer, "documents": documents, "source": source}
    if args.tokenizer == "gpt2":
        gpt2_encoding()  # fails here, in one line, if tiktoken's files are unavailable
        encode = encode_gpt2
        meta.update(vocab_size=GPT2_VOCAB, eot=GPT2_EOT)
    elif args.tokenizer.endswith(".json"):
        meta.update(own)
        encode = partial(encode_hf, path=os.path.abspath(args.tokenizer), eot=meta["eot"],
                         dtype=token_dtype(meta["vocab_size"]))
        print(f"tokenizer: {args.tokenizer} ({meta['tokenizer']}), {meta['vocab_size']:,} tokens")
    else:
        chars = vocabulary(splits, field, args.num_proc)
        codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)
        encode = partial(encode_chars, codepoints=codepoints, dtype=token_dtype(len(chars)))
        meta.update(vocab_size=len(chars), eot=None, vocab=chars)
        print(f"vocabulary: {len(chars):,} characters")
    tokens = {split: tokens_of(split, ds, field, encode, args.num_proc, documents) for split, ds in splits.items()}
    meta = write_dataset(args.out_dir, tokens, meta)
    total, elapsed = sum(meta["tokens"].values()), time.time() - t0
    print(f"prepared {args.out_dir} in {datetime.timedelta(seconds=round(elapsed))}: {total:,} tokens, "
          f"{total / elapsed:,.0f} tokens/s overall with --num_proc={args.num_proc}")
