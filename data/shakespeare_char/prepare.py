"""
Tiny Shakespeare (or any UTF-8 text) at the character level, for train.py --dataset=shakespeare_char.

    python data/shakespeare_char/prepare.py                         # input.txt here, else downloaded
    python data/shakespeare_char/prepare.py --input=path/to/text.txt

Writes train.bin and val.bin (character ids of the first 90% and the last 10% of the text: uint16, or uint32
past 65,536 distinct characters) and meta.json (the characters in id order) into this folder, or into --out_dir.
"""

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo, for lib/
from lib.dataset import parse_args, read_text, write_dataset  # noqa: E402

args = parse_args(__doc__.split("\n\n")[0], HERE)

text = read_text(args.input, HERE)
chars = sorted(set(text))
print(f"length of dataset in characters: {len(text):,}")
print(f"vocab size: {len(chars):,} (all the unique characters: {''.join(chars)!r})")

stoi = {ch: i for i, ch in enumerate(chars)}
ids = np.array([stoi[c] for c in text], dtype=np.uint32)
n = len(text)
meta = {"tokenizer": "char", "vocab_size": len(chars), "eot": None, "vocab": chars,
        "source": {"input": os.path.abspath(args.input) if args.input else "tiny Shakespeare", "val": "last 10%"}}
write_dataset(args.out_dir, {"train": [ids[: int(n * 0.9)]], "val": [ids[int(n * 0.9):]]}, meta)
