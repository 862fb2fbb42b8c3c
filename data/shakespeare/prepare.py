"""
Tiny Shakespeare (or any UTF-8 text) in GPT-2's BPE tokens, for finetuning GPT-2: train.py --dataset=shakespeare.

    python data/shakespeare/prepare.py                         # input.txt here, else downloaded
    python data/shakespeare/prepare.py --input=path/to/text.txt

Writes train.bin and val.bin (uint16 GPT-2 token ids of the first 90% and the last 10% of the text's
characters) and meta.pkl (vocab_size 50257, tokenizer 'gpt2', dtype) into this folder, or into --out_dir.
On tiny Shakespeare: 301,966 train and 36,059 val tokens.
"""

import os
import sys

import numpy as np
import tiktoken

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # data/, for prepare_common.py
from prepare_common import fail, parse_args, read_text, write_dataset  # noqa: E402

args = parse_args(__doc__.split("\n\n")[0], HERE)

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
meta = {"vocab_size": enc.n_vocab, "tokenizer": "gpt2", "dtype": "uint16"}
write_dataset(args.out_dir, train_ids, val_ids, meta)
