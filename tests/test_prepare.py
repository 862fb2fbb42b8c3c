"""data/shakespeare_char/prepare.py: counts on tiny Shakespeare, exact round trip, clear input errors."""

import os

import numpy as np
import pytest

from conftest import run
from lib.batches import load_meta


def load(out_dir):
    meta = load_meta(out_dir)
    train = np.fromfile(os.path.join(out_dir, "train.bin"), dtype=np.uint16)
    val = np.fromfile(os.path.join(out_dir, "val.bin"), dtype=np.uint16)
    return meta, train, val


def test_tiny_shakespeare_counts_and_round_trip(char_data, shakespeare_input):
    meta, train, val = load(char_data)
    assert meta["vocab_size"] == 65 and len(meta["stoi"]) == 65
    with open(shakespeare_input, encoding="utf-8") as f:
        text = f.read()
    n = len(text)  # the whole corpus: 1,003,854 and 111,540 characters, as nanoGPT's prepare.py
    assert (len(train), len(val)) == (int(n * 0.9), n - int(n * 0.9))
    decoded = "".join(meta["itos"][i] for i in np.concatenate([train, val]).tolist())
    assert decoded == text
    assert all(meta["stoi"][meta["itos"][i]] == i for i in range(65))


def test_any_local_utf8_text(tmp_path):
    text = "Ünïcödé lines\nand émoji 🙂 too\n" * 50
    src = tmp_path / "my.txt"
    src.write_text(text, encoding="utf-8")
    proc = run("data/shakespeare_char/prepare.py", f"--input={src}", f"--out_dir={tmp_path}")
    meta, train, val = load(tmp_path)
    assert meta["vocab_size"] == len(set(text)) and f"vocab size: {len(set(text))}" in proc.stdout
    assert len(train) == int(len(text) * 0.9) and len(train) + len(val) == len(text)
    assert "".join(meta["itos"][i] for i in np.concatenate([train, val]).tolist()) == text


def test_bad_inputs_fail_in_one_line(tmp_path):
    proc = run("data/shakespeare_char/prepare.py", f"--input={tmp_path / 'missing.txt'}", check=False)
    assert proc.returncode == 1 and "not found" in proc.stderr and "Traceback" not in proc.stderr
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    proc = run("data/shakespeare_char/prepare.py", f"--input={binary}", f"--out_dir={tmp_path}", check=False)
    assert proc.returncode == 1 and "not UTF-8" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "train.bin").exists()


def test_failed_download_says_how_to_pass_a_local_file(tmp_path, capsys):
    from lib.dataset import read_text

    with pytest.raises(SystemExit) as e:
        read_text(None, str(tmp_path), url="http://127.0.0.1:9/input.txt")  # nothing listens on port 9
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "could not download" in err and "--input=path/to/input.txt" in err
    assert not (tmp_path / "input.txt").exists()  # no half-written download left behind
