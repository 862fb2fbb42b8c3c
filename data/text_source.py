"""Where a prepare script's text comes from: --input=PATH, else input.txt beside the script, else a download."""

import os
import sys
import urllib.request

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
