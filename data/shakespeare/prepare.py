"""
Tiny Shakespeare (or any UTF-8 text) in GPT-2's BPE tokens, for finetuning GPT-2: train.py --dataset=shakespeare.

    python data/shakespeare/prepare.py                         # input.txt here, else downloaded
    python data/shakespeare/prepare.py --input=path/to/text.txt

Writes train.bin and val.bin (uint16 GPT-2 token ids of the first 90% and the last 10% of the text's
characters, no end-of-text tokens: the text is one document) and meta.json into this folder, or into --out_dir.
On tiny Shakespeare: 301,966 train and 36,059 val tokens.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo, for lib/
from lib.dataset import gpt2_encoding, parse_args, read_text, write_dataset  # noqa: E402

args = parse_args(__doc__.split("\n\n")[0], HERE)

text = read_text(args.input, HERE)
enc = gpt2_encoding()
n = len(text)
print(f"length of dataset in characters: {n:,}")
train_ids = enc.encode_ordinary(text[: int(n * 0.9)])  # ordinary: no special tokens
val_ids = enc.encode_ordinary(text[int(n * 0.9):])
meta = {"tokenizer": "gpt2", "vocab_size": enc.n_vocab, "eot": enc.eot_token,
        "source": {"input": os.path.abspath(args.input) if args.input else "tiny Shakespeare", "val": "last 10%"}}
write_dataset(args.out_dir, {"train": [train_ids], "val": [val_ids]}, meta)
