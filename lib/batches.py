"""
Token batches from the train.bin / val.bin files that data/<dataset>/prepare.py writes, and their metadata.

A .bin file is a flat stream of token ids, uint16 or uint32 as meta.json says (lib/dataset.py has the
format). meta.json is checked against that format (check_meta_json) before anything trusts it: a field missing or
inconsistent with another is refused in one line that names each problem. nanoGPT-style folders with a meta.pkl
instead still work: it is read by an unpickler that builds only plain dicts, lists, strings and numbers, so a
pickle in a downloaded data folder cannot run code. A folder with no metadata at all is read as GPT-2 BPE in
uint16, after a check that its ids fit, said in one line.

Each batch is a pure function of (seed, split, iteration, micro-step), where the micro-step counts over the
whole step (rank r of N draws micro-steps r * k ... r * k + k - 1 of a step of N * k), so 1, 2 or 8 ranks with
the same total gradient accumulation train on the same batches: resuming at iteration k draws
exactly the batches an uninterrupted run would, with no sampler state to save, and every evaluation scores
the same eval_iters batches, so changes in val loss are the model's, not sampling noise.
"""

import io
import json
import os
import pickle
import sys

import numpy as np
import torch

from lib.dataset import FORMAT_VERSION
from lib.runtime import UserError

TRAIN_STEP, EVAL = 0, 1  # streams of batches that never overlap
SPLITS = ("train", "val")
GPT2_META = {"vocab_size": 50257, "dtype": "uint16", "tokenizer": "gpt2"}  # also what OpenAI's GPT-2 was trained on
DTYPES = {"uint16": 1 << 16, "uint32": 1 << 32}  # token dtype -> how many ids it holds
SAMPLE_TOKENS = 10_000_000  # at most this many tokens per split are read to find the largest id


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # lib/ is one level down


def dataset_dir(dataset):
    """Where a dataset lives: data/<dataset> in this repo, or the path itself when it is absolute."""
    return os.path.join(REPO, "data", dataset)


def checkpoint_meta(state):
    """The vocabulary metadata a checkpoint was trained with; older (and nanoGPT's) checkpoints name their dataset."""
    if state.get("meta"):
        return plain_meta(state["meta"], "the checkpoint's metadata")
    data_dir = dataset_dir(state.get("config", {}).get("dataset", ""))
    found = read_metadata(data_dir)[1]
    print(f"note: the checkpoint carries no vocabulary: {f'using {found}' if found else 'assuming GPT-2 BPE'}")
    return load_meta(data_dir)


def available_datasets():
    """The datasets under data/ (those with a prepare.py), marking the ones already prepared."""
    root = os.path.join(REPO, "data")
    names = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "prepare.py")))
    return ", ".join(f"{d} (prepared)" if os.path.exists(os.path.join(root, d, "train.bin")) else d for d in names)


class _PlainUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, strings, numbers, booleans and None, which need no class lookup; refuses the
    rest, and with it every way a pickle can call a function (os.system, eval, ...)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it asks for {module}.{name}")


def read_metadata(data_dir):
    """(metadata as stored, its path): meta.json, else a legacy meta.pkl, else (None, None)."""
    path = os.path.join(data_dir, "meta.json")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f), path
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is unreadable ({type(e).__name__}); re-run that dataset's prepare.py") from None
    path = os.path.join(data_dir, "meta.pkl")
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                return _PlainUnpickler(io.BytesIO(f.read())).load(), path
        except pickle.UnpicklingError as e:
            raise UserError(f"{path} is refused: {e}, and a data file needs nothing but plain values (a pickle can "
                            f"run code when loaded). Delete it and re-run that dataset's prepare.py, which writes "
                            f"meta.json") from None
        except Exception as e:
            raise UserError(f"{path} is unreadable ({type(e).__name__}); re-run that dataset's prepare.py") from None
    return None, None


def check_meta_json(meta, path):
    """
    meta.json as lib/dataset.py writes it, or one line naming each thing wrong with it: the format version, the
    tokenizer ('gpt2', 'char' or 'hf:<hash>'), vocab_size agreeing with the tokenizer (GPT-2's 50,257; one id per
    character of "vocab"; the size of the embedded tokenizer.json; chat data's markers right after those: the
    "chat" entry, lib/chat.py), a dtype that holds every id, eot, token counts.
    """
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a JSON object of metadata: re-run that dataset's prepare.py")
    problems = []
    if meta.get("format") != FORMAT_VERSION:
        problems.append(f"format {meta['format']!r}, but this repo reads format {FORMAT_VERSION}" if "format" in meta
                        else f"no format (this repo's prepare.py scripts write format {FORMAT_VERSION})")
    tokenizer, vocab_size, dtype = meta.get("tokenizer"), meta.get("vocab_size"), meta.get("dtype")
    kind = tokenizer if tokenizer in ("gpt2", "char") else "hf" if str(tokenizer).startswith("hf:") else None
    if kind is None:
        problems.append(f"tokenizer {tokenizer!r}, not 'gpt2', 'char' or 'hf:<hash>' (a tokenizer.json)")
    sized = isinstance(vocab_size, int) and not isinstance(vocab_size, bool) and vocab_size > 0
    if not sized:
        problems.append(f"vocab_size {vocab_size!r}, not a positive whole number")
    if dtype not in DTYPES:
        problems.append(f"dtype {dtype!r}, not {' or '.join(DTYPES)}")
    elif sized and vocab_size > DTYPES[dtype]:
        problems.append(f"vocab_size {vocab_size:,}, more ids than {dtype} holds")
    base = vocab_size  # the tokenizer's own ids; chat data's markers come after them
    if "chat" in meta:
        markers = meta["chat"].get("tokens") if isinstance(meta["chat"], dict) else None
        ids = sorted(markers.values()) if isinstance(markers, dict) and markers else []
        if not ids or not all(isinstance(i, int) for i in ids) or ids != list(range(ids[0], ids[0] + len(ids))) \
                or ids[-1] + 1 != vocab_size:
            problems.append(f"a \"chat\" entry whose markers are not the last ids of vocab_size {vocab_size!r}")
        else:
            base = ids[0]
    if kind == "gpt2" and base != GPT2_META["vocab_size"]:
        problems.append(f"tokenizer 'gpt2' with {base!r} ids of its own, not GPT-2's {GPT2_META['vocab_size']}")
    if kind == "char":
        vocab = meta.get("vocab")
        if not isinstance(vocab, list) or not all(isinstance(c, str) and len(c) == 1 for c in vocab):
            problems.append("tokenizer 'char' without a \"vocab\" list of single characters (one per id)")
        elif len(set(vocab)) != len(vocab):
            problems.append("a \"vocab\" that lists a character twice")
        elif len(vocab) != base:
            problems.append(f"a \"vocab\" of {len(vocab):,} characters for vocab_size {vocab_size!r}")
    if kind == "hf":
        problems += _tokenizer_json_problems(meta.get("tokenizer_json"), base)
    eot = meta.get("eot")
    if eot is not None and not (isinstance(eot, int) and sized and 0 <= eot < vocab_size):
        problems.append(f"eot {eot!r}, not an id of the vocabulary")
    tokens = meta.get("tokens")
    if not isinstance(tokens, dict) or not all(isinstance(tokens.get(s), int) and tokens[s] > 0 for s in SPLITS):
        problems.append(f"tokens {tokens!r}, not a count of each split's tokens")
    if problems:
        raise UserError(f"{path} is not metadata this repo can trust: {'; '.join(problems)}. Re-run the "
                        f"dataset's prepare.py, which writes it")
    return meta


def _tokenizer_json_problems(text, vocab_size):
    if not isinstance(text, str):
        return ["tokenizer 'hf:...' without the tokenizer.json itself (\"tokenizer_json\")"]
    try:
        from tokenizers import Tokenizer

        size = Tokenizer.from_str(text).get_vocab_size()
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        return [f"a tokenizer_json that tokenizers cannot load ({why})"]
    return [] if size == vocab_size else [f"a tokenizer_json of {size:,} tokens for vocab_size {vocab_size!r}"]


def plain_meta(meta, where):
    """
    meta.json, a nanoGPT meta.pkl or a checkpoint's metadata as the dict the scripts use: vocab_size, dtype,
    tokenizer ('gpt2' for GPT-2 BPE, 'char' for characters) and, for characters, stoi (str -> int) and itos
    (int -> str).
    """
    if not isinstance(meta, dict):
        raise UserError(f"{where} is not a dict of metadata; re-run that dataset's prepare.py")
    itos = None
    if "vocab" in meta:  # meta.json: the characters in id order
        itos = dict(enumerate(meta["vocab"]))
    elif "itos" in meta:  # meta.pkl or a checkpoint; JSON would have made the keys strings
        itos = {int(i): ch for i, ch in meta["itos"].items()}
    plain = {"vocab_size": meta.get("vocab_size") or (len(itos) if itos else GPT2_META["vocab_size"]),
             "dtype": meta.get("dtype", "uint16"),
             "tokenizer": meta.get("tokenizer") or ("char" if itos is not None else "gpt2")}
    if plain["dtype"] not in DTYPES:
        raise UserError(f"{where} says dtype {plain['dtype']!r}; this repo reads {' and '.join(DTYPES)} tokens")
    if not isinstance(plain["vocab_size"], int) or not 0 < plain["vocab_size"] <= DTYPES[plain["dtype"]]:
        raise UserError(f"{where} says vocab_size {plain['vocab_size']!r}, which {plain['dtype']} cannot hold: re-run "
                        f"that dataset's prepare.py")
    if isinstance(meta.get("tokenizer_json"), str):  # your own tokenizer (data/train_tokenizer.py): checkpoints keep it
        plain["tokenizer_json"] = meta["tokenizer_json"]
    if isinstance(meta.get("chat"), dict):  # chat data's template (lib/chat.py): checkpoints keep it too
        plain["chat"] = meta["chat"]
    if itos is not None:
        markers = len(meta["chat"].get("tokens", {})) if isinstance(meta.get("chat"), dict) else 0  # chat data's
        if len(itos) + markers != plain["vocab_size"] or set(itos) != set(range(len(itos))):
            raise UserError(f"{where} lists {len(itos):,} characters for a vocabulary of {plain['vocab_size']:,} ids "
                            f"(ids 0 .. vocab_size - 1, one character each): re-run that dataset's prepare.py")
        plain["stoi"] = {ch: i for i, ch in itos.items()}
        plain["itos"] = itos
    return plain


def _tokenizer_name(meta):
    return {"gpt2": "GPT-2 BPE tokens", "char": "characters"}.get(meta["tokenizer"], f"{meta['tokenizer']} tokens")


def _prepare_arg(meta):
    """data/text/prepare.py's --tokenizer for data in this metadata's tokenizer."""
    return "path/to/its/tokenizer.json" if meta["tokenizer"].startswith("hf:") else meta["tokenizer"]


def largest_id(path, dtype):
    """The largest token id in a .bin file, from evenly spaced windows of at most SAMPLE_TOKENS tokens in all."""
    data = np.memmap(path, dtype=dtype, mode="r")
    if len(data) <= SAMPLE_TOKENS:
        return int(data.max()) if len(data) else -1
    window = SAMPLE_TOKENS // 100
    starts = np.linspace(0, len(data) - window, 100).astype(np.int64)
    return max(int(data[s:s + window].max()) for s in starts)


def load_meta(data_dir):
    """The dataset's metadata as plain_meta gives it. A folder without any is GPT-2 BPE in uint16 once its ids
    are checked to fit (an error if they do not), or when it has no bins to check, as for an old checkpoint."""
    meta, path = read_metadata(data_dir)
    if meta is not None:
        return plain_meta(check_meta_json(meta, path) if path.endswith(".json") else meta, path)
    bins = [os.path.join(data_dir, f"{split}.bin") for split in SPLITS]
    bins = [p for p in bins if os.path.exists(p) and os.path.getsize(p) % 2 == 0]  # Batches reports the others
    if not bins:
        return dict(GPT2_META)  # nothing to read (e.g. an old checkpoint's data folder is gone): as before
    largest = max(largest_id(p, np.uint16) for p in bins)
    if largest >= GPT2_META["vocab_size"]:
        raise UserError(f"{data_dir} has no meta.json, and its token ids (up to {largest}) are not GPT-2 BPE: re-run "
                        f"its prepare.py, which writes meta.json")
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process under torchrun
        print(f"note: {data_dir} has no meta.json, and its ids fit GPT-2's vocabulary (largest {largest}), so it is "
              f"read as GPT-2 BPE in uint16; if it is character data, re-run its prepare.py", file=sys.stderr)
    return dict(GPT2_META)


class Batches:
    def __init__(self, data_dir, block_size, batch_size, device, seed=1337):
        if not os.path.isdir(data_dir):
            raise UserError(f"no dataset at {data_dir}: --dataset is a folder under data/ ({available_datasets()}) "
                            f"or a path to a folder holding train.bin and val.bin")
        self.meta = load_meta(data_dir)
        stored, meta_path = read_metadata(data_dir)
        counts = stored.get("tokens") if isinstance(stored, dict) else None  # meta.json's, for the bins it wrote
        self.dtype = np.dtype(self.meta["dtype"])
        self.data_dir, self.block_size, self.batch_size = data_dir, block_size, batch_size
        self.device, self.seed = device, seed
        self.prefetched = None  # ((split, step, micro_step), batch) made ahead by prefetch()
        self.paths = {split: os.path.join(data_dir, f"{split}.bin") for split in SPLITS}
        self.prepare = prepare = os.path.join(data_dir, "prepare.py")
        for split, path in self.paths.items():
            if not os.path.exists(path):
                how = f"run `python {prepare}` first" if os.path.exists(prepare) else "prepare it first"
                raise UserError(f"{path} not found: {how} (or set --dataset; datasets here: {available_datasets()})")
            size = os.path.getsize(path)
            if size == 0:
                raise UserError(f"{path} is empty: re-run `python {prepare}`")
            if size % self.dtype.itemsize:
                raise UserError(f"{path} is truncated ({size} bytes is not a whole number of {self.dtype} tokens): "
                                f"re-run `python {prepare}`")
            tokens = size // self.dtype.itemsize
            if counts and split in counts and tokens != counts[split]:
                raise UserError(f"{path} has {tokens:,} tokens but {meta_path} says {counts[split]:,}: they come from "
                                f"different prepares (one interrupted?); re-run `python {prepare}`")
            if tokens <= block_size and not self.meta.get("chat"):  # chat data: whole conversations (chat_data.py)
                raise UserError(f"{path} has {tokens} tokens, too few for block_size={block_size}: "
                                f"use a smaller --block_size")
        # the vocabulary a new model needs; None for GPT-2 BPE, which train.py pads to 50304 (a multiple of 64: faster)
        self.vocab_size = None if self.meta["tokenizer"] == "gpt2" else self.meta["vocab_size"]

    def check_vocab(self, model_vocab_size):
        """Every token id in the data must be < the metadata's vocab_size, which must be <= the model's (else an
        opaque index error on the GPU). The ids are a bounded sample of both bins."""
        largest = max(largest_id(path, self.dtype) for path in self.paths.values())
        data_vocab = self.meta["vocab_size"]
        if largest >= data_vocab:
            raise UserError(f"{self.data_dir} holds token id {largest} but its metadata says vocab_size {data_vocab}: "
                            f"the bins and the metadata come from different prepares; re-run `python {self.prepare}`")
        if data_vocab > model_vocab_size:
            raise UserError(f"the data has a vocabulary of {data_vocab} tokens but the model only {model_vocab_size}: "
                            f"use a checkpoint trained on this dataset, or init_from='scratch'")

    def check_tokenizer(self, init_from, state=None):
        """Resuming (state: the checkpoint) or finetuning GPT-2 needs data in the tokenizer the model learned, where
        every id means the same text; else training goes on quietly with the ids' meanings swapped."""
        if init_from == "scratch":
            return
        if state is not None:  # resuming, or finetuning a checkpoint of this repo
            theirs, what = checkpoint_meta(state), "the checkpoint"
        elif os.path.isfile(os.path.join(init_from, "char_vocab.json")):  # export.py's character-level model
            with open(os.path.join(init_from, "char_vocab.json"), encoding="utf-8") as f:
                theirs, what = {"tokenizer": "char", "stoi": json.load(f)}, init_from
        else:
            theirs, what = GPT2_META, init_from  # OpenAI's GPT-2, by name or from a folder
        if self.meta["tokenizer"] != theirs["tokenizer"]:
            raise UserError(f"{self.data_dir} is in {_tokenizer_name(self.meta)} but {what} was trained on "
                            f"{_tokenizer_name(theirs)}: prepare the data with that tokenizer (e.g. "
                            f"data/text/prepare.py --tokenizer={_prepare_arg(theirs)}), or train from scratch "
                            f"(--init_from=scratch)")
        if self.meta.get("stoi") != theirs.get("stoi"):
            raise UserError(f"{self.data_dir} numbers its characters differently from the data {what} was trained on: "
                            f"prepare it from the same text, or train from scratch (--init_from=scratch)")

    def _open(self, split):
        # re-opened for every batch: a long-lived np.memmap keeps growing the process's resident memory
        return np.memmap(self.paths[split], dtype=self.dtype, mode="r")

    def prefetch(self, split, step, micro_step=0):
        """Prepare a training batch now, while the device still computes; the get() that asks for it returns it."""
        self.prefetched = ((split, step, micro_step), self.get(split, step, micro_step))

    def get(self, split, step, micro_step=0, stream=TRAIN_STEP):
        """Batch `micro_step` (counted over all ranks) of training iteration `step` (or batch `step` of an
        evaluation, stream=EVAL: the same on every rank)."""
        if stream == TRAIN_STEP and self.prefetched:  # (an evaluation in between leaves it for the next step)
            prefetched, self.prefetched = self.prefetched, None
            if prefetched[0] == (split, step, micro_step):
                return prefetched[1]
        data = self._open(split)
        # 0: the rank's slot in older versions, kept so that one process draws the batches it always drew
        rng = np.random.default_rng([self.seed, 0, SPLITS.index(split), stream, step, micro_step])
        ix = rng.integers(len(data) - self.block_size, size=self.batch_size)
        x = torch.from_numpy(np.stack([data[i:i + self.block_size] for i in ix]).astype(np.int64))  # (B, T)
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + self.block_size] for i in ix]).astype(np.int64))  # (B, T)
        if self.device.startswith("cuda"):
            # pinned host memory lets the copy run asynchronously while the GPU works on the previous batch
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)
