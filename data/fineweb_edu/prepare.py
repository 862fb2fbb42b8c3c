"""
FineWeb-Edu (web pages that a classifier rated educational) in GPT-2 BPE tokens, for train.py --dataset=fineweb_edu
(config/train_gpt2_fineweb.py: the 10B-token GPT-2 124M recipe of llm.c and build-nanogpt).

    python data/fineweb_edu/prepare.py                      # sample-10BT: ~9.67M documents, ~10B tokens
    python data/fineweb_edu/prepare.py --name=sample-100BT  # another sample of HuggingFaceFW/fineweb-edu
    python data/fineweb_edu/prepare.py --data_files=fw/     # local parquet files (a "text" column)

What it loads: load_dataset("HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train") (parquet files; the
only split is train), column "text". The validation documents are a fixed sample, those train_test_split(
test_size=0.0005, seed=2357, shuffle=True) picks: about 4,800 documents and 5M tokens. Each document is encode_ordinary(text)
followed by the end-of-text token 50256, in uint16: train.bin ~20 GB for sample-10BT (2 bytes a token), beside
the download and its Arrow copy in the Hugging Face cache.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo, for lib/
from lib.corpus import main  # noqa: E402

if __name__ == "__main__":  # tokenizing processes may import this file: run only when it is the script
    main(__doc__, HERE, hub_dataset="HuggingFaceFW/fineweb-edu", name="sample-10BT", val_fraction=0.0005, seed=2357)
