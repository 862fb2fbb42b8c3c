"""
Token batches from the train.bin / val.bin files that data/<dataset>/prepare.py writes.

A .bin file is a flat stream of token ids (uint16, or uint32 when meta.pkl says so). meta.pkl, when present,
holds vocab_size, the dtype, and either the char vocabulary (stoi, itos) or the tokenizer name ("gpt2").

Each batch is a pure function of (seed, rank, split, iteration, micro-step): resuming at iteration k draws
exactly the batches an uninterrupted run would, with no sampler state to save, and every evaluation scores
the same eval_iters batches, so changes in val loss are the model's, not sampling noise.
"""

import os
import pickle

import numpy as np
import torch

from runtime import UserError

TRAIN_STEP, EVAL = 0, 1  # streams of batches that never overlap
SPLITS = ("train", "val")


REPO = os.path.dirname(os.path.abspath(__file__))


def dataset_dir(dataset):
    """Where a dataset lives: data/<dataset> in this repo, or the path itself when it is absolute."""
    return os.path.join(REPO, "data", dataset)


def checkpoint_meta(state):
    """The vocabulary metadata a checkpoint was trained with; older (and nanoGPT's) checkpoints name their dataset."""
    if state.get("meta"):
        return state["meta"]
    data_dir = dataset_dir(state.get("config", {}).get("dataset", ""))
    meta = load_meta(data_dir)
    print(f"note: the checkpoint carries no vocabulary: {f'using the one in {data_dir}' if meta else 'assuming GPT-2 BPE'}")
    return meta


def available_datasets():
    """The datasets under data/ (those with a prepare.py), marking the ones already prepared."""
    root = os.path.join(REPO, "data")
    names = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "prepare.py")))
    return ", ".join(f"{d} (prepared)" if os.path.exists(os.path.join(root, d, "train.bin")) else d for d in names)


def load_meta(data_dir):
    """meta.pkl as a dict, or {} when the dataset has none (then: GPT-2 BPE in uint16)."""
    path = os.path.join(data_dir, "meta.pkl")
    if not os.path.exists(path):
        return {}
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}); re-run that dataset's prepare.py") from None


class Batches:
    def __init__(self, data_dir, block_size, batch_size, device, seed=1337, rank=0):
        self.meta = load_meta(data_dir)
        self.dtype = np.dtype(self.meta.get("dtype", "uint16"))
        self.block_size, self.batch_size, self.device, self.seed, self.rank = block_size, batch_size, device, seed, rank
        self.paths = {split: os.path.join(data_dir, f"{split}.bin") for split in SPLITS}
        prepare = os.path.join(data_dir, "prepare.py")
        if not os.path.isdir(data_dir):
            raise UserError(f"no dataset at {data_dir}: --dataset is a folder under data/ ({available_datasets()}) "
                            f"or a path to a folder holding train.bin and val.bin")
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
            if size // self.dtype.itemsize <= block_size:
                raise UserError(f"{path} has {size // self.dtype.itemsize} tokens, too few for block_size={block_size}: "
                                f"use a smaller --block_size")
        self.vocab_size = self.meta.get("vocab_size")

    def check_vocab(self, model_vocab_size):
        """The data's token ids must all be < the model's vocab_size (else an opaque index error on the GPU)."""
        data_vocab = self.vocab_size
        if data_vocab is None:  # no meta.pkl: look at the largest id in the first 10M tokens of each split
            data_vocab = 1 + max(int(self._open(s)[:10_000_000].max()) for s in SPLITS)
        if data_vocab > model_vocab_size:
            raise UserError(f"the data has a vocabulary of {data_vocab} tokens but the model only {model_vocab_size}: "
                            f"use a checkpoint trained on this dataset, or init_from='scratch'")

    def _open(self, split):
        # re-opened for every batch: a long-lived np.memmap keeps growing the process's resident memory
        return np.memmap(self.paths[split], dtype=self.dtype, mode="r")

    def get(self, split, step, micro_step=0, stream=TRAIN_STEP):
        """Batch `micro_step` of training iteration `step` (or batch `step` of an evaluation, stream=EVAL)."""
        data = self._open(split)
        rng = np.random.default_rng([self.seed, self.rank, SPLITS.index(split), stream, step, micro_step])
        ix = rng.integers(len(data) - self.block_size, size=self.batch_size)
        x = torch.from_numpy(np.stack([data[i:i + self.block_size] for i in ix]).astype(np.int64))  # (B, T)
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + self.block_size] for i in ix]).astype(np.int64))  # (B, T)
        if self.device.startswith("cuda"):
            # pinned host memory lets the copy run asynchronously while the GPU works on the previous batch
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)
