"""
What the data/<dataset>/prepare.py scripts share: their command line, where their text comes from (--input=PATH,
else input.txt beside the script, else a download), and writing train.bin / val.bin / meta.pkl.
"""

import argparse
import os
import pickle
import sys
import urllib.request

import numpy as np

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def read_text(input_path, dataset_dir, url=TINY_SHAKESPEARE_URL):
    """The corpus as a str. A download is saved as dataset_dir/input.txt so it happens once."""
    script = os.path.join(os.path.relpath(dataset_dir), "prepare.py")
    if input_path is None:
        input_path = os.path.join(dataset_dir, "input.txt")
        if not os.path.exists(input_path):
            print(f"downloading {url}")
            try:
                with urllib.request.urlopen(url, timeout=30) as response:
                    data = response.read()
            except OSError as e:
                fail(f"could not download {url} ({getattr(e, 'reason', e)}); pass a local copy of the text: "
                     f"python {script} --input=path/to/input.txt")
            with open(input_path, "wb") as f:
                f.write(data)
    if not os.path.isfile(input_path):
        fail(f"input file {input_path} not found")
    try:
        with open(input_path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        fail(f"{input_path} is not UTF-8 text ({e.reason} at byte {e.start})")
    if not text:
        fail(f"{input_path} is empty")
    return text


def parse_args(description, dataset_dir):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--input", help="a local UTF-8 text file (default: input.txt here, downloaded if missing)")
    parser.add_argument("--out_dir", default=dataset_dir, help="where to write train.bin, val.bin and meta.pkl")
    return parser.parse_args()


def write_dataset(out_dir, train_ids, val_ids, meta):
    """The token streams as flat .bin files of meta['dtype'], and meta.pkl beside them."""
    print(f"train has {len(train_ids):,} tokens")
    print(f"val has {len(val_ids):,} tokens")
    os.makedirs(out_dir, exist_ok=True)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        np.asarray(ids, dtype=meta["dtype"]).tofile(os.path.join(out_dir, f"{split}.bin"))
    with open(os.path.join(out_dir, "meta.pkl"), "wb") as f:
        pickle.dump(meta, f)
