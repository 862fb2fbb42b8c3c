"""
TinyStories (short stories in the words a 3-4 year old knows, written by GPT-3.5 and GPT-4) in GPT-2 BPE tokens,
for train.py --dataset=tinystories (config/train_tinystories.py: a small GPT that writes coherent stories).

    python data/tinystories/prepare.py
    python data/tinystories/prepare.py --data_files=stories/  # local parquet or .jsonl files (a "text" column)

What it loads: load_dataset("roneneldan/TinyStories", split="train") (2,119,719 stories) and its own "validation"
split, column "text" (with --data_files, a fixed 0.5% sample of the documents is the validation set instead).
Each story is encode_ordinary(text) followed by the end-of-text token 50256, in uint16.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo, for lib/
from lib.corpus import main  # noqa: E402

if __name__ == "__main__":  # tokenizing processes may import this file: run only when it is the script
    main(__doc__, HERE, hub_dataset="roneneldan/TinyStories", val_split="validation", val_fraction=0.005)
