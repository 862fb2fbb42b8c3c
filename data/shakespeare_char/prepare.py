"""
Tiny Shakespeare (or any UTF-8 text) at the character level, for train.py --dataset=shakespeare_char.

    python data/shakespeare_char/prepare.py                         # input.txt here, else downloaded
    python data/shakespeare_char/prepare.py --input=path/to/text.txt

Writes train.bin and val.bin (uint16 character ids: the first 90% and the last 10% of the text) and
meta.pkl (vocab_size, stoi, itos) into this folder, or into --out_dir.
"""

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # data/, for prepare_common.py
from prepare_common import parse_args, read_text, write_dataset  # noqa: E402

args = parse_args(__doc__.split("\n\n")[0], HERE)

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
write_dataset(args.out_dir, train_ids, val_ids, dict(vocab_size=vocab_size, itos=itos, stoi=stoi, dtype="uint16"))
