"""
OpenWebText (8,013,769 web pages linked from Reddit, an open copy of GPT-2's WebText) in GPT-2 BPE tokens, the
way nanoGPT prepares it, for train.py --dataset=openwebtext (config/train_gpt2.py).

    python data/openwebtext/prepare.py                    # downloads from the Hugging Face hub
    python data/openwebtext/prepare.py --num_proc=16      # tokenizing processes (default: all cores)
    python data/openwebtext/prepare.py --data_files=owt/  # local parquet or .jsonl files ({"text": ...} per line)

What it loads: load_dataset("Skylion007/openwebtext", revision="cf22a3730519fbb9629cd35ddf1669bbfe9e2b97",
split="train"), a pinned commit of the dataset's own parquet conversion (its pull request refs/pr/18, last commit
"Delete dataset script"): the text as parquet shards data/train-000NN-of-00093.parquet and no loading script.
nanoGPT's load_dataset("openwebtext") runs the repo's loading script, which datasets 5.x refuses ("Dataset
scripts are no longer supported", nanoGPT issue 633). Local files: --data_files takes parquet files, .jsonl files
or folders of them, with the text in a "text" column (--text_field=NAME for another); e.g. those shards fetched
where there is network with `huggingface-cli download Skylion007/openwebtext --repo-type=dataset
--revision=<that commit> --local-dir=owt`. Not a substitute: the hub's automatic conversion
(--revision=refs/convert/parquet) holds only part of the corpus (its "partial-train" folder).

Then nanoGPT's recipe: the validation documents are those of train_test_split(test_size=0.0005, seed=2357,
shuffle=True) (each split is written in the source's order, where nanoGPT writes it shuffled: the same documents
and tokens, read sequentially), and each document is encode_ordinary(text) followed by the end-of-text token
50256, in uint16. nanoGPT's counts,
the reference to check against: 8,009,762 train / 4,007 val documents; 9,035,582,198 train / 4,434,897 val
tokens; train.bin ~17 GB (18.1e9 bytes), val.bin ~8.9 MB. nanoGPT notes ~54 GB in the Hugging Face cache for the
download and its Arrow copy.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo, for lib/
from lib.corpus import main  # noqa: E402

if __name__ == "__main__":  # tokenizing processes may import this file: run only when it is the script
    main(__doc__, HERE, hub_dataset="Skylion007/openwebtext", revision="cf22a3730519fbb9629cd35ddf1669bbfe9e2b97",
         val_fraction=0.0005, seed=2357)
