"""
Chat data: conversations in, token ids and a loss mask out (data/chat/prepare.py), and the batches train.py draws
from them (ChatBatches).

    conversations  one JSON object per line of .jsonl files with "messages": [{"role", "content"}, ...], or the same
                   column in .parquet files or a Hugging Face hub dataset (load_dataset(--hub_dataset, ...))
    tokens         each conversation rendered by lib/chat.py's template, in a tokenizer: GPT-2's BPE, characters,
                   your own BPE, or the one a dataset folder or a checkpoint uses (--tokenizer=PATH: the model you
                   will finetune); conversations longer than --block_size are truncated or dropped (--too_long)
    files          train.bin / val.bin (the ids, lib/dataset.py's format), train_mask.bin / val_mask.bin (uint8, 1
                   where the token is trained on: an assistant's text and its <|end|>), train_lengths.bin /
                   val_lengths.bin (uint32, each conversation's token count), meta.json (with "chat": the template)

Batches of conversations are tokenized by --num_proc processes and written in order (lib/corpus.py), so the files are
byte-identical whatever --num_proc is; they are written through lib/dataset.py's temporary folder, so a failure
leaves the dataset that was there. A row that is not a usable conversation (malformed JSON, an unknown role, content
that is not text, no assistant turn, characters the vocabulary lacks) stops the prepare with one line naming its file
and line (or row), unless --skip_bad=True, which skips and counts such rows.

Training pads rather than packs: each row of a batch is one conversation from position 0, padded to block_size, so no
token ever attends to another conversation and positions start at 0 as they do in chat.py, with no change to the
model, its attention kernel or torch.compile's single graph; the cost is the padding's compute.
"""

import argparse
import json
import os
import time
from functools import partial

import numpy as np
import torch

from configurator import ArgumentParser, at_least
from lib import chat
from lib.batches import SPLITS, TRAIN_STEP, Batches, checkpoint_meta, load_meta, read_metadata
from lib.corpus import _reason, add_source_arguments, in_batches, local_files, progress, validation_rows
from lib.dataset import BadInput, add_overwrite, claim, fail, token_dtype, write_dataset
from lib.runtime import UserError

MASK, LENGTHS = "mask", "lengths"  # the sidecar files: <split>_mask.bin, <split>_lengths.bin
EXAMPLES = 3  # bad rows quoted in the summary of --skip_bad=True


# ----------------------------------------------------------------------------- the tokenizer to prepare in

def tokenizer_meta(spec):
    """meta.json's tokenizer fields (without the chat entry) for --tokenizer: 'gpt2', a tokenizer.json, a dataset
    folder (its meta.json), or a checkpoint (.pt, .dcp or an out_dir); None for 'char' (built from the data)."""
    from lib import checkpoint
    from lib.corpus import hf_meta

    if spec == "char":
        return None
    if spec == "gpt2":
        return {"tokenizer": "gpt2", "eot": 50256}
    if spec.endswith(".json") and os.path.isfile(spec) and os.path.basename(spec) != "meta.json":
        return hf_meta(spec)
    folder = os.path.dirname(spec) if os.path.basename(spec) == "meta.json" else spec
    ckpt = checkpoint.find(spec) if os.path.isdir(spec) else spec  # an out_dir's best.pt (else ckpt.pt), or the file
    if os.path.isdir(folder) and read_metadata(folder)[0] is not None:
        plain = load_meta(folder)
    elif os.path.exists(ckpt):
        plain = checkpoint_meta(checkpoint._peek(ckpt))  # the metadata only: the weights are not read
    else:
        fail(f"--tokenizer={spec}: use gpt2, char, a tokenizer.json, a prepared dataset folder or a checkpoint (its "
             f"tokenizer: the model you will finetune)")
    if "stoi" in plain:
        return {"tokenizer": "char", "eot": None, "vocab": [plain["itos"][i] for i in range(len(plain["itos"]))]}
    if plain["tokenizer"].startswith("hf:"):
        from lib.tokenizer import load_tokenizer

        return {"tokenizer": plain["tokenizer"], "eot": load_tokenizer(plain).eot,
                "tokenizer_json": plain["tokenizer_json"]}
    return {"tokenizer": "gpt2", "eot": 50256}


def chat_meta(fields):
    """The full metadata of chat data in a tokenizer (tokenizer_meta's fields): its vocabulary, then the markers."""
    meta = dict(fields)
    base = chat.base_vocab_size(load_meta_fields(meta))
    meta.update(vocab_size=base + len(chat.TOKENS), chat=chat.chat_spec(base))
    return meta


def load_meta_fields(meta):
    """meta.json's fields as batches.plain_meta reads them (stoi/itos for characters)."""
    from lib.batches import plain_meta

    return plain_meta({**meta, "vocab_size": meta.get("vocab_size"), "dtype": "uint32"}, "the tokenizer")


# ----------------------------------------------------------------------------- conversations, with where they are

def _messages(row, kind, field):
    """A row's messages: a .jsonl line is parsed here (BadConversation if it is not JSON with the field)."""
    if kind != "jsonl":
        return row
    try:
        obj = json.loads(row)
    except json.JSONDecodeError as e:
        raise chat.BadConversation(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or field not in obj:
        raise chat.BadConversation(f"no {field!r} field (a line is one JSON object with \"{field}\": [...])")
    return obj[field]


class Where:
    """Says where row i of the source is: 'file, line N' (.jsonl), 'file, row N' (.parquet) or 'dataset, row N'."""

    def __init__(self, names, firsts, kind):
        self.names, self.firsts, self.kind = names, np.asarray(firsts), kind

    def __call__(self, i):
        f = int(np.searchsorted(self.firsts, i, side="right")) - 1
        n = int(i - self.firsts[f])
        return f"{self.names[f]}, line {n + 1}" if self.kind == "jsonl" else f"{self.names[f]}, row {n:,}"


_TOK = {}  # metadata (as JSON) -> (ChatTokenizer, token dtype), once per process


def encode_rows(rows, start, meta_json, kind, field, block_size, too_long, skip_bad, split_rows, where):
    """
    The conversations of rows [start, start + len(rows)) of a split: their ids, mask and lengths, and what was
    truncated, dropped and skipped. split_rows[i] is row i's index in the source, which where() names.
    """
    if meta_json not in _TOK:
        meta = json.loads(meta_json)
        _TOK[meta_json] = chat.ChatTokenizer(load_meta_fields(meta)), token_dtype(meta["vocab_size"])
    tok, dtype = _TOK[meta_json]
    ids, mask, lengths = [], [], []
    stats = {"truncated": 0, "dropped": 0, "skipped": 0, "examples": []}
    for i, row in enumerate(rows):
        try:
            conv_ids, conv_mask = tok.render(_messages(row, kind, field))
        except chat.BadConversation as e:
            message = f"{where(split_rows[start + i])}: {e}"
            if not skip_bad:
                raise BadInput(f"{message} (--skip_bad=True skips such rows)") from None
            stats["skipped"] += 1
            if len(stats["examples"]) < EXAMPLES:
                stats["examples"].append(message)
            continue
        if len(conv_ids) > block_size:
            if too_long == "drop" or not any(conv_mask[1:block_size]):  # nothing left to learn from
                stats["dropped"] += 1
                continue
            conv_ids, conv_mask = conv_ids[:block_size], conv_mask[:block_size]
            stats["truncated"] += 1
        ids += conv_ids
        mask += conv_mask
        lengths.append(len(conv_ids))
    chunk = {"ids": np.array(ids, dtype=dtype), MASK: np.array(mask, dtype=np.uint8),
             LENGTHS: np.array(lengths, dtype=np.uint32)}
    return (chunk, stats), len(rows), len(lengths)


def chars_of_rows(rows, start, kind, field):
    """Every character in the contents of the rows that are usable conversations (for --tokenizer=char)."""
    found = set()
    for row in rows:
        try:
            messages = _messages(row, kind, field)
        except chat.BadConversation:
            continue
        for m in messages if isinstance(messages, list) else []:
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                found.update(m["content"])
    return "".join(found), len(rows), 0


def load_conversations(args):
    """(splits, source): splits maps train / val to (dataset, rows in the source, where, kind)."""
    from datasets import concatenate_datasets, load_dataset

    field = args.messages_field
    if args.data_files:
        loader, files = local_files(args.data_files)
        if loader not in ("json", "parquet"):
            fail(f"{files[0]}: conversations come as .jsonl (one JSON object per line) or .parquet files")
        kind = "jsonl" if loader == "json" else "rows"
        parts = []
        for path in files:
            try:  # a .jsonl file as its lines, parsed by the workers: a bad line then has a line number
                ds = load_dataset("text", data_files=[path], sample_by="line", split="train") if kind == "jsonl" \
                    else load_dataset("parquet", data_files=[path], split="train")
            except Exception as e:
                fail(f"could not read {path} ({_reason(e)})")
            if kind == "rows" and field not in ds.column_names:
                fail(f"{path} has no {field!r} column (it has {', '.join(ds.column_names)}): pass --messages_field")
            parts.append(ds.select_columns(["text" if kind == "jsonl" else field]))
        firsts = np.cumsum([0] + [len(p) for p in parts[:-1]])
        shown = [os.path.relpath(f) if not os.path.relpath(f).startswith("..") else f for f in files]
        where = Where(shown, firsts, kind)
        everything = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        source = {"data_files": [os.path.abspath(p) for p in args.data_files]}
        others = None
    else:
        def load(split):
            try:
                ds = load_dataset(args.hub_dataset, name=args.name, revision=args.revision, split=split,
                                  num_proc=args.num_proc if args.num_proc > 1 else None)
            except Exception as e:
                fail(f"could not load {args.hub_dataset} (split {split}) from the Hugging Face hub ({_reason(e)}); "
                     f"without network, get its files where there is network and pass them with --data_files=PATH")
            if field not in ds.column_names:
                fail(f"{args.hub_dataset} has no {field!r} column (it has {', '.join(ds.column_names)}): pass "
                     f"--messages_field=NAME")
            return ds.select_columns([field])

        kind = "rows"
        everything = load(args.split)
        where = Where([f"{args.hub_dataset} ({args.split})"], [0], kind)
        source = {"hub_dataset": args.hub_dataset, "name": args.name, "revision": args.revision, "split": args.split}
        others = load(args.val_split) if args.val_split else None
    if others is not None:
        source["val"] = f"split {args.val_split}"
        val_where = Where([f"{args.hub_dataset} ({args.val_split})"], [0], kind)
        return {"train": (everything, np.arange(len(everything)), where, kind),
                "val": (others, np.arange(len(others)), val_where, kind)}, source
    if len(everything) < 2:
        fail(f"{len(everything)} conversation(s): a validation split needs at least 2")
    train_rows, val_rows = validation_rows(len(everything), args.val_fraction, args.seed)
    source["val"] = f"{args.val_fraction} of the conversations, seed {args.seed}"
    return {"train": (everything.select(train_rows), train_rows, where, kind),
            "val": (everything.select(val_rows), val_rows, where, kind)}, source


# ----------------------------------------------------------------------------- prepare

def parse_args(description, out_dir):
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)

    def yes(text):  # --skip_bad=True, as train.py writes
        if text.lower() not in ("true", "false"):
            raise argparse.ArgumentTypeError(f"{text!r} is not True or False")
        return text.lower() == "true"

    p.add_argument("--data_files", nargs="+", metavar="PATH", help="local .jsonl or .parquet files, or folders")
    add_source_arguments(p, "a dataset on the Hugging Face hub, e.g. HuggingFaceTB/smol-smoltalk", "conversations",
                         0.01)
    p.add_argument("--messages_field", default="messages", help="the column (or JSON key) holding the messages")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2, char, a tokenizer.json, or a dataset folder or "
                   "checkpoint whose tokenizer to use (the model you will finetune)")
    p.add_argument("--block_size", type=int, default=1024, help="the most tokens of a conversation (training's)",
                   rule=at_least(2, ", the block_size you will train with"))
    p.add_argument("--too_long", choices=("truncate", "drop"), default="truncate",
                   help="a conversation longer than block_size: cut at block_size, or left out")
    p.add_argument("--skip_bad", type=yes, default=False, metavar="True|False",
                   help="skip (and count) rows that are not usable conversations instead of stopping")
    p.add_argument("--num_proc", type=int, default=os.cpu_count(), help="processes that tokenize (default: all cores)",
                   rule=at_least(1))
    p.add_argument("--out_dir", "--out", default=out_dir, help="where to write the dataset")
    add_overwrite(p)
    args = p.parse_args()
    if not args.data_files and not args.hub_dataset:
        fail("no conversations: pass --data_files=PATH (.jsonl or .parquet files or folders) or --hub_dataset=NAME")
    claim(args.out_dir, args.overwrite)  # the only prepare writing there, over nothing it did not write
    return args


def main(description, out_dir):
    t0 = time.time()
    args = parse_args(description, out_dir)
    fields = tokenizer_meta(args.tokenizer)  # before the (slow) data: a bad --tokenizer fails at once
    splits, source = load_conversations(args)
    print(f"{len(splits['train'][0]):,} train and {len(splits['val'][0]):,} val conversations from "
          f"{source.get('hub_dataset') or ', '.join(args.data_files)}")
    if fields is None:  # characters: the vocabulary is every character of the conversations
        chars = set()
        for split, (ds, _, _, kind) in splits.items():
            with progress(f"collecting characters of {split}", len(ds)) as bar:
                for found, rows, _ in in_batches(partial(chars_of_rows, kind=kind, field=args.messages_field), ds,
                                                 ds.column_names[0], args.num_proc, whole_rows=True):
                    chars.update(found)
                    bar.update(rows)
        fields = {"tokenizer": "char", "eot": None, "vocab": sorted(chars)}
    meta = chat_meta(fields)
    meta_json = json.dumps(meta)
    # filled in as write_dataset consumes the splits, before it writes meta.json
    counts = {k: dict.fromkeys(SPLITS, 0) for k in ("truncated", "dropped", "skipped")}
    trained, documents, examples = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0), {s: [] for s in SPLITS}

    def chunks(split):
        ds, rows, where, kind = splits[split]
        encode = partial(encode_rows, meta_json=meta_json, kind=kind, field=args.messages_field,
                         block_size=args.block_size, too_long=args.too_long, skip_bad=args.skip_bad,
                         split_rows=rows, where=where)
        with progress(f"tokenizing {split}", len(ds)) as bar:
            for (chunk, stats), n_rows, n_convs in in_batches(encode, ds, ds.column_names[0], args.num_proc,
                                                              whole_rows=True):
                for k in counts:
                    counts[k][split] += stats[k]
                examples[split] += stats["examples"][:EXAMPLES - len(examples[split])]
                trained[split] += int(chunk[MASK].sum())
                documents[split] += n_convs
                bar.update(n_rows)
                yield chunk

    meta.update(documents=documents, trained_tokens=trained, source=source,
                conversations={"block_size": args.block_size, "too_long": args.too_long, **counts})
    meta = write_dataset(args.out_dir, {split: chunks(split) for split in SPLITS}, meta)
    for split in SPLITS:
        print(f"{split}: {documents[split]:,} conversations, {trained[split]:,} of {meta['tokens'][split]:,} tokens "
              f"trained on ({trained[split] / max(meta['tokens'][split], 1):.1%}); {counts['truncated'][split]:,} "
              f"truncated to and {counts['dropped'][split]:,} dropped at block_size={args.block_size} "
              f"(--too_long={args.too_long}), {counts['skipped'][split]:,} bad rows skipped")
        for example in examples[split]:
            print(f"  skipped {example}")
    print(f"chat template: {', '.join(f'{t} = {i}' for t, i in meta['chat']['tokens'].items())} after the "
          f"{meta['tokenizer']} vocabulary; {time.time() - t0:.1f}s in all")


# ----------------------------------------------------------------------------- training batches

class ChatBatches(Batches):
    """
    Batches of chat data (a dataset whose meta.json has a chat template): row b of a batch is one conversation from
    position 0, padded to block_size; its targets are the next tokens where the mask is 1 and -1 (no loss) elsewhere,
    padding included. Which conversations a batch holds is a pure function of (seed, split, iteration, micro-step),
    as for Batches, so any rank can count the trained tokens of the whole optimizer step (loss_weights).
    """

    def __init__(self, data_dir, block_size, batch_size, device, seed=1337):
        super().__init__(data_dir, block_size, batch_size, device, seed)
        self.starts, self.lengths = {}, {}
        for split in SPLITS:
            tokens = os.path.getsize(self.paths[split]) // self.dtype.itemsize
            again = f"re-run `python {self.prepare}`" if os.path.exists(self.prepare) else "prepare it again"
            files = {name: os.path.join(data_dir, f"{split}_{name}.bin") for name in (MASK, LENGTHS)}
            for path in files.values():
                if not os.path.exists(path):
                    raise UserError(f"{path} not found: {data_dir} is chat data without its mask; {again}")
            lengths = np.fromfile(files[LENGTHS], dtype=np.uint32).astype(np.int64)
            if os.path.getsize(files[MASK]) != tokens or lengths.sum() != tokens or not len(lengths):
                raise UserError(f"{data_dir}: {split}.bin, {split}_mask.bin and {split}_lengths.bin disagree (an "
                                f"interrupted prepare?); {again}")
            if lengths.max() > block_size:
                raise UserError(f"{data_dir} has conversations of up to {lengths.max()} tokens, longer than "
                                f"block_size={block_size}: train with --block_size={lengths.max()} or more, or prepare "
                                f"it with --block_size={block_size}")
            self.starts[split], self.lengths[split] = np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths
        self.mask_paths = {split: os.path.join(data_dir, f"{split}_{MASK}.bin") for split in SPLITS}
        if os.environ.get("RANK", "0") == "0":
            n, mask = len(self.lengths["train"]), np.memmap(self.mask_paths["train"], dtype=np.uint8, mode="r")
            print(f"chat data: {n:,} train conversations, rows padded to block_size={block_size}; the loss is on the "
                  f"assistant's tokens ({int(mask.sum()) / (n * block_size):.1%} of the padded rows)")

    def _rows(self, split, step, micro_step, stream):
        # the same seeding as Batches.get: one generator per (seed, split, stream, step, micro-step)
        rng = np.random.default_rng([self.seed, 0, SPLITS.index(split), stream, step, micro_step])
        return rng.integers(len(self.lengths[split]), size=self.batch_size)

    def _mask(self, split):
        return np.memmap(self.mask_paths[split], dtype=np.uint8, mode="r")

    def get(self, split, step, micro_step=0, stream=TRAIN_STEP):
        if stream == TRAIN_STEP and self.prefetched:  # Batches.prefetch's batch, made while the device computed
            prefetched, self.prefetched = self.prefetched, None
            if prefetched[0] == (split, step, micro_step):
                return prefetched[1]
        data, mask = self._open(split), self._mask(split)
        x = np.zeros((self.batch_size, self.block_size), dtype=np.int64)  # padding: id 0, never attended to
        y = np.full((self.batch_size, self.block_size), -1, dtype=np.int64)
        for b, i in enumerate(self._rows(split, step, micro_step, stream)):
            start, n = self.starts[split][i], self.lengths[split][i]
            ids = data[start:start + n].astype(np.int64)
            x[b, :n] = ids
            y[b, :n - 1] = np.where(mask[start + 1:start + n] == 1, ids[1:], -1)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        if self.device.startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def trained_tokens(self, split, step, micro_step, stream=TRAIN_STEP):
        """How many targets of a batch carry a loss (without making the batch)."""
        mask = self._mask(split)
        return sum(int(mask[s + 1:s + n].sum()) for s, n in ((self.starts[split][i], self.lengths[split][i])
                                                               for i in self._rows(split, step, micro_step, stream)))

    def loss_weights(self, step, first, accum_steps, world_size):
        """
        What each of this rank's micro-steps' mean loss is multiplied by, so that the step's gradient is that of the
        sum of every trained token's loss over the whole step (all micro-steps, all ranks) divided by their count: a
        micro-batch with n of the step's N trained tokens weighs n / N, times world_size, since DDP and FSDP average
        the ranks' gradients.
        """
        counts = [self.trained_tokens("train", step, m) for m in range(accum_steps * world_size)]
        total = sum(counts)
        return [counts[first + k] * world_size / total for k in range(accum_steps)]


def open_batches(data_dir, block_size, batch_size, device, seed=1337):
    """train.py's batches: ChatBatches for chat data (meta.json has a chat template), else Batches."""
    meta = read_metadata(data_dir)[0] if os.path.isdir(data_dir) else None
    chat_data = isinstance(meta, dict) and meta.get("chat")
    return (ChatBatches if chat_data else Batches)(data_dir, block_size, batch_size, device, seed)

