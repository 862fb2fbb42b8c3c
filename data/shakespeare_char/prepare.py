"""
Tiny Shakespeare (or any UTF-8 text) at the character level, for train.py --dataset=shakespeare_char.

    python data/shakespeare_char/prepare.py                         # input.txt here, else downloaded
    python data/shakespeare_char/prepare.py --input=path/to/text.txt

Writes train.bin and val.bin (uint16 character ids: the first 90% and the last 10% of the text) and
meta.pkl (vocab_size, stoi, itos) into this folder, or into --out_dir.
"""

import argparse
import os
import pickle
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # data/, for text_source.py
from text_source import read_text  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--input", help="a local UTF-8 text file (default: input.txt here, downloaded if missing)")
parser.add_argument("--out_dir", default=HERE, help="where to write train.bin, val.bin and meta.pkl")
args = parser.parse_args()

text = read_text(args.input, HERE)
chars = sorted(set(text))
vocab_size = len(chars)
if vocab_size > 65535:
    raise SystemExit(f"error: {vocab_size} distinct characters do not fit in uint16")
print(f"length of dataset in characters: {len(text):,}")
print(f"vocab size: {vocab_size:,} (all the unique characters: {''.join(chars)!r})")

stoi = {ch: i for i, ch in enumerate(chars)}
itos = {i: ch for i, ch in enumerate(chars)}
n = len(text)
train_ids = np.array([stoi[c] for c in text[: int(n * 0.9)]], dtype=np.uint16)
val_ids = np.array([stoi[c] for c in text[int(n * 0.9):]], dtype=np.uint16)
print(f"train has {len(train_ids):,} tokens")
print(f"val has {len(val_ids):,} tokens")

os.makedirs(args.out_dir, exist_ok=True)
train_ids.tofile(os.path.join(args.out_dir, "train.bin"))
val_ids.tofile(os.path.join(args.out_dir, "val.bin"))
with open(os.path.join(args.out_dir, "meta.pkl"), "wb") as f:
    pickle.dump({"vocab_size": vocab_size, "itos": itos, "stoi": stoi, "dtype": "uint16"}, f)
