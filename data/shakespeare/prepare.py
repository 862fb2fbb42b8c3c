"""
Tiny Shakespeare (or any UTF-8 text) in GPT-2's BPE tokens, for finetuning GPT-2: train.py --dataset=shakespeare.

    python data/shakespeare/prepare.py                         # input.txt here, else downloaded
    python data/shakespeare/prepare.py --input=path/to/text.txt

Writes train.bin and val.bin (uint16 GPT-2 token ids of the first 90% and the last 10% of the text's
characters) and meta.pkl (vocab_size 50257, tokenizer 'gpt2', dtype) into this folder, or into --out_dir.
On tiny Shakespeare: 301,966 train and 36,059 val tokens.
"""

import argparse
import os
import pickle
import sys

import numpy as np
import tiktoken

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # data/, for text_source.py
from text_source import fail, read_text  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--input", help="a local UTF-8 text file (default: input.txt here, downloaded if missing)")
parser.add_argument("--out_dir", default=HERE, help="where to write train.bin, val.bin and meta.pkl")
args = parser.parse_args()

text = read_text(args.input, HERE)
try:
    enc = tiktoken.get_encoding("gpt2")
except Exception as e:  # tiktoken downloads its files once, then reads them from its cache
    fail(f"could not load tiktoken's gpt2 encoding ({type(e).__name__}); without network, set TIKTOKEN_CACHE_DIR "
         f"to a folder holding its cached files")
n = len(text)
train_ids = np.array(enc.encode_ordinary(text[: int(n * 0.9)]), dtype=np.uint16)  # ordinary: no special tokens
val_ids = np.array(enc.encode_ordinary(text[int(n * 0.9):]), dtype=np.uint16)
print(f"length of dataset in characters: {n:,}")
print(f"train has {len(train_ids):,} tokens")
print(f"val has {len(val_ids):,} tokens")

os.makedirs(args.out_dir, exist_ok=True)
train_ids.tofile(os.path.join(args.out_dir, "train.bin"))
val_ids.tofile(os.path.join(args.out_dir, "val.bin"))
with open(os.path.join(args.out_dir, "meta.pkl"), "wb") as f:
    pickle.dump({"vocab_size": enc.n_vocab, "tokenizer": "gpt2", "dtype": "uint16"}, f)
