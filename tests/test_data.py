"""
The data pipeline (lib/corpus.py, data/text/prepare.py) on small local .txt, .jsonl and .parquet corpora written
here, and what train.py and sample.py do with its output and with older or broken data folders. CPU, no network.
"""

import json
import os
import pickle
import random
import runpy
import signal
import subprocess
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO, TINY, popen, run
from lib.batches import Batches, load_meta

EOT = 50256
WORDS = ("the a of to and in that is was he for it with as his on be at by I had not are but from or have an they "
         "which one you were her all she there would their we him been has when who will more no if out so said what "
         "up its about into than them can only other new some could time these two may then do first any my now such "
         "like our over man me even most made after also did many before must through back years where much your way "
         "ROMEO: JULIET: Ünïcödé émoji 🙂 日本語 <|endoftext|> 1234 \t tabs  double  spaces").split(" ")


def words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def corpus(seed=0, n=1500):
    """Documents of varied length and content, including an empty one (which the pipeline skips)."""
    rng = random.Random(seed)
    docs = [words(rng, rng.randint(1, 120)) + ("\n" if i % 3 else "") for i in range(n)]
    docs[7], docs[11] = "", "  "
    docs[13] = "a literal <|endoftext|> is plain text" + "\n\n" * 3 + "日本語 🙂"
    return docs


@pytest.fixture(scope="session")
def hf_env(tmp_path_factory):
    """The Hugging Face cache in a temp folder, offline: nothing is downloaded, nothing left in ~/.cache."""
    return {"HF_HOME": str(tmp_path_factory.mktemp("hf_home")), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def prepare(hf_env, *args, check=True):
    return run("data/text/prepare.py", *args, env=hf_env, check=check)


def read_bins(out):
    meta = json.load(open(os.path.join(out, "meta.json"), encoding="utf-8"))
    bins = [np.fromfile(os.path.join(out, f"{s}.bin"), dtype=meta["dtype"]) for s in ("train", "val")]
    return meta, *bins


def nanogpt_split(docs, fraction, seed=2357):
    """The documents nanoGPT's train_test_split puts in each split, in the corpus's order, without empty ones."""
    from datasets import Dataset

    parts = Dataset.from_dict({"row": range(len(docs))}).train_test_split(test_size=fraction, seed=seed, shuffle=True)
    return [[docs[i] for i in sorted(parts[split]["row"]) if docs[i]] for split in ("train", "test")]


def gpt2_tokens(docs):
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    return np.array([i for d in docs for i in enc.encode_ordinary(d) + [EOT]], dtype=np.uint16)


def write_corpus(kind, folder, docs):
    """docs as a folder of .txt files (one document each), a .jsonl file, or a .parquet file (column 'content')."""
    os.makedirs(folder, exist_ok=True)
    if kind == "txt":
        for i, d in enumerate(docs):
            with open(os.path.join(folder, f"doc{i:05d}.txt"), "w", encoding="utf-8", newline="") as f:
                f.write(d)
        return [str(folder)], []
    if kind == "jsonl":
        path = os.path.join(folder, "docs.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for i, d in enumerate(docs):
                f.write(json.dumps({"id": i, "text": d}) + "\n")
        return [path], []
    path = os.path.join(folder, "docs.parquet")
    pq.write_table(pa.table({"content": docs, "id": list(range(len(docs)))}), path, row_group_size=100)
    return [path], ["--text_field=content"]


# ----------------------------------------------------------------------------- tokens

@pytest.mark.gpt2_bpe
@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
@pytest.mark.slow
def test_gpt2_tokens_are_each_document_then_eot_in_order(kind, hf_env, tmp_path):
    docs = corpus(n=300 if kind == "txt" else 1500)  # several batches of 512 documents
    paths, options = write_corpus(kind, tmp_path / "src", docs)
    out1, out2 = tmp_path / "np1", tmp_path / "np2"
    proc = prepare(hf_env, *paths, *options, f"--out={out1}", "--num_proc=1", "--val_fraction=0.05")
    meta, train, val = read_bins(out1)
    want_train, want_val = nanogpt_split(docs, 0.05)
    assert np.array_equal(train, gpt2_tokens(want_train)) and np.array_equal(val, gpt2_tokens(want_val))
    assert (meta["format"], meta["tokenizer"], meta["vocab_size"], meta["dtype"], meta["eot"]) == \
        (1, "gpt2", 50257, "uint16", EOT)
    assert meta["tokens"] == {"train": len(train), "val": len(val)}
    assert meta["documents"] == {"train": len(want_train), "val": len(want_val)}
    assert f"train has {len(train):,} tokens in {len(want_train):,} documents" in proc.stdout
    assert load_meta(out1) == {"vocab_size": 50257, "dtype": "uint16", "tokenizer": "gpt2"}

    prepare(hf_env, *paths, *options, f"--out={out2}", "--num_proc=2", "--val_fraction=0.05")
    for name in ("train.bin", "val.bin"):  # the same bytes whatever the number of processes
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes()


@pytest.mark.gpt2_bpe
@pytest.mark.slow
def test_txt_split_by_paragraph_and_line_and_char_tokens(hf_env, tmp_path):
    text = "First paragraph,\nstill first.\n\nSecond 🙂 one.\n\n\nThird.\n\n" * 40
    src = tmp_path / "book.txt"
    src.write_text(text, encoding="utf-8")
    prepare(hf_env, str(src), f"--out={tmp_path / 'para'}", "--split_by=paragraph", "--val_fraction=0.1")
    _, train, val = read_bins(tmp_path / "para")
    assert (train == EOT).sum() + (val == EOT).sum() == 120  # 3 paragraphs, 40 times

    prepare(hf_env, str(src), f"--out={tmp_path / 'char'}", "--split_by=line", "--tokenizer=char",
            "--val_fraction=0.1", "--num_proc=2")
    meta, train, val = read_bins(tmp_path / "char")
    assert meta["tokenizer"] == "char" and meta["eot"] is None and meta["vocab"] == sorted(set(text))
    lines = text.split("\n")[:-1]  # the text loader's documents: one per line, without the newline
    want_train, want_val = nanogpt_split(lines, 0.1)
    chars = meta["vocab"]
    assert "".join(chars[i] for i in train) == "".join(d + "\n" for d in want_train)
    assert "".join(chars[i] for i in val) == "".join(d + "\n" for d in want_val)
    plain = load_meta(tmp_path / "char")
    assert plain["tokenizer"] == "char" and plain["itos"] == dict(enumerate(chars))
    assert plain["stoi"] == {c: i for i, c in enumerate(chars)}


@pytest.mark.slow
def test_uint32_character_vocabulary_trains_and_samples(hf_env, tmp_path):
    points = [c for c in range(0x21, 0x21 + 73_000) if not 0xD800 <= c < 0xE000][:70_000]  # no surrogates
    rng = random.Random(0)
    rng.shuffle(points)
    text = "".join(chr(c) for c in points)
    src = tmp_path / "many_chars.txt"
    src.write_text("\n".join(text[i:i + 100] for i in range(0, len(text), 100)) + "\n", encoding="utf-8")
    data = tmp_path / "wide"
    prepare(hf_env, str(src), f"--out={data}", "--split_by=line", "--tokenizer=char", "--val_fraction=0.1")
    meta, train, val = read_bins(data)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_001  # and the newline
    assert os.path.getsize(data / "train.bin") == 4 * len(train) and train.max() > 65_535
    out = tmp_path / "out"
    proc = run("train.py", *TINY, f"--dataset={data}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2")
    assert "step 2:" in proc.stdout
    sample = run("sample.py", f"--out_dir={out}", "--device=cpu", "--num_samples=1", "--max_new_tokens=20",
                 f"--start={text[:5]}").stdout
    assert sample.startswith(text[:5]) and len(sample.split("---------------")[0].rstrip("\n")) >= 20


# ----------------------------------------------------------------------------- failures leave the old dataset whole

def big_corpus(path, mb=24):
    rng = random.Random(1)
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < mb << 20:
            f.write(json.dumps({"text": words(rng, 2000)}) + "\n")


def wait_for_temp_bin(proc, out, timeout=120):
    """Wait until the prepare has started writing its temporary train.bin; returns the temp folder."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        temps = [n for n in os.listdir(out) if n.startswith(".prepare-")] if os.path.isdir(out) else []
        if temps and os.path.exists(os.path.join(out, temps[0], "train.bin")) and \
                os.path.getsize(os.path.join(out, temps[0], "train.bin")) > 0:
            return os.path.join(out, temps[0])
        time.sleep(0.01)
    raise AssertionError(f"the prepare never started writing (exit code {proc.poll()}): {proc.communicate()}")


def start_prepare(hf_env, *args):
    return popen("data/text/prepare.py", *args, env=hf_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def snapshot(out):
    return {n: (out / n).read_bytes() for n in ("train.bin", "val.bin", "meta.json")}


@pytest.mark.gpt2_bpe
@pytest.mark.slow
def test_interrupted_or_failed_prepare_leaves_the_old_dataset(hf_env, tmp_path):
    big = tmp_path / "big.jsonl"
    big_corpus(big)
    out = tmp_path / "data"

    # killed while writing into a fresh folder: nothing there looks like a dataset
    proc = start_prepare(hf_env, str(big), f"--out={out}", "--num_proc=1")
    wait_for_temp_bin(proc, out)
    proc.kill()
    proc.wait()
    assert not (out / "train.bin").exists() and not (out / "meta.json").exists()

    small, _ = write_corpus("jsonl", tmp_path / "small", corpus(n=200))
    prepare(hf_env, *small, f"--out={out}", "--val_fraction=0.1")  # also removes the killed prepare's temp folder
    assert [n for n in os.listdir(out) if n.startswith(".prepare-")] == []
    before = snapshot(out)

    # Ctrl-C: the temp files are removed, the old dataset is untouched, one line says so
    proc = start_prepare(hf_env, str(big), f"--out={out}", "--num_proc=2")
    temp = wait_for_temp_bin(proc, out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err.strip().splitlines()[-1].startswith("error: interrupted;")
    assert "Traceback" not in err and not os.path.exists(temp) and snapshot(out) == before

    # SIGKILL: no chance to clean up, and still the old dataset is whole
    proc = start_prepare(hf_env, str(big), f"--out={out}", "--num_proc=1")
    wait_for_temp_bin(proc, out)
    proc.kill()
    proc.wait()
    assert snapshot(out) == before

    # a bad document half-way: one error line, the old dataset untouched
    docs = corpus(n=1500)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": None if i == 1400 else d}) + "\n" for i, d in enumerate(docs)))
    proc = prepare(hf_env, str(bad), f"--out={out}", "--num_proc=2", check=False)
    assert proc.returncode == 1 and "'text' of type NoneType, not text" in proc.stderr.strip().splitlines()[-1]
    assert snapshot(out) == before and [n for n in os.listdir(out) if n.startswith(".prepare-")] == []


@pytest.mark.slow
def test_bad_sources_fail_in_one_line(hf_env, tmp_path):
    def fails(*args, message):
        proc = prepare(hf_env, *args, f"--out={tmp_path / 'out'}", check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and "Traceback" not in proc.stderr and last.startswith("error:"), proc.stderr
        assert message in last, last

    fails(str(tmp_path / "missing.txt"), message="not found")
    (tmp_path / "one.txt").write_text("a single document\n")
    fails(str(tmp_path / "one.txt"), message="a validation split needs at least 2")
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n{"body": "y"}\n')
    fails(str(tmp_path / "d.jsonl"), message="no 'text' column (it has body): pass --text_field=NAME")
    fails(str(tmp_path / "one.txt"), str(tmp_path / "d.jsonl"), message="prepare one kind at a time")
    proc = run("data/openwebtext/prepare.py", f"--out={tmp_path / 'owt'}", check=False, env=hf_env)
    assert proc.returncode == 1 and "could not load Skylion007/openwebtext" in proc.stderr.strip().splitlines()[-1]
    assert "--data_files=PATH" in proc.stderr and not (tmp_path / "owt" / "train.bin").exists()


# ----------------------------------------------------------------------------- train.py and sample.py on the data

@pytest.fixture(scope="module")
def bpe_and_char(hf_env, tmp_path_factory):
    """A GPT-2 BPE and a character-level dataset of the same documents."""
    root = tmp_path_factory.mktemp("bpe_and_char")
    paths, _ = write_corpus("jsonl", root / "src", corpus(n=600))
    prepare(hf_env, *paths, f"--out={root / 'bpe'}", "--val_fraction=0.1")
    prepare(hf_env, *paths, f"--out={root / 'char'}", "--val_fraction=0.1", "--tokenizer=char")
    return root


def fails(proc, *fragments):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


@pytest.mark.gpt2_bpe  # bpe_and_char
@pytest.mark.slow
def test_resume_refuses_another_tokenizer(bpe_and_char, tmp_path):
    out = tmp_path / "out"
    train = lambda data, *a: run("train.py", *TINY, f"--dataset={data}", f"--out_dir={out}", *a, check=False)  # noqa
    assert train(bpe_and_char / "bpe", "--max_iters=2", "--eval_interval=2").returncode == 0
    # the characters' ids all fit the 50304-token model: only the tokenizer check stands between them and garbage
    fails(train(bpe_and_char / "char", "--init_from=resume", "--max_iters=4"),
          "is in characters but the checkpoint was trained on GPT-2 BPE tokens", "--init_from=scratch")


@pytest.mark.gpt2_bpe  # bpe_and_char
@pytest.mark.slow
def test_bins_that_disagree_with_their_metadata_are_refused(bpe_and_char, tmp_path):
    train = lambda data: run("train.py", *TINY, f"--dataset={data}", f"--out_dir={tmp_path / 'o'}",  # noqa
                             "--max_iters=1", check=False)
    # BPE bins beside a character meta.pkl (today: an IndexError deep in the model)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("train.bin", "val.bin"):
        (mixed / name).write_bytes((bpe_and_char / "bpe" / name).read_bytes())
    chars = sorted(set("abcdefgh \n"))
    with open(mixed / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    fails(train(mixed), "but its metadata says vocab_size 10", "different prepares")
    # a bin from another prepare than its meta.json (a prepare killed between its renames)
    other = tmp_path / "other"
    other.mkdir()
    for name in ("train.bin", "meta.json"):
        (other / name).write_bytes((bpe_and_char / "bpe" / name).read_bytes())
    (other / "val.bin").write_bytes((bpe_and_char / "bpe" / "train.bin").read_bytes())
    fails(train(other), "val.bin has", "but", "meta.json says", "different prepares")


@pytest.mark.gpt2_bpe  # bpe_and_char
@pytest.mark.slow
def test_folder_without_metadata_is_gpt2_only_if_its_ids_fit(bpe_and_char, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("train.bin", "val.bin"):
        (bare / name).write_bytes((bpe_and_char / "bpe" / name).read_bytes())
    proc = run("train.py", *TINY, f"--dataset={bare}", f"--out_dir={tmp_path / 'o'}", "--eval_only=True")
    assert "has no meta.json, and its ids fit GPT-2's vocabulary" in proc.stderr and "step 0:" in proc.stdout
    assert proc.stderr.count("note:") == 1
    wide = tmp_path / "wide"
    wide.mkdir()
    for name in ("train.bin", "val.bin"):
        np.arange(60_000, 60_100, dtype=np.uint16).tofile(wide / name)
    fails(run("train.py", *TINY, f"--dataset={wide}", f"--out_dir={tmp_path / 'o'}", check=False),
          "has no meta.json, and its token ids (up to 60099) are not GPT-2 BPE")


class _WritesAFile:
    """Unpickling this creates a file: what a malicious meta.pkl could do (or run any command)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_nanogpt_meta_pkl_trains_and_samples_and_a_crafted_one_is_refused(char_data, tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("train.bin", "val.bin"):
        (legacy / name).write_bytes(open(os.path.join(char_data, name), "rb").read())
    meta = load_meta(char_data)
    with open(legacy / "meta.pkl", "wb") as f:  # exactly what nanoGPT's shakespeare_char/prepare.py pickles
        pickle.dump({"vocab_size": meta["vocab_size"], "itos": meta["itos"], "stoi": meta["stoi"]}, f)
    out = tmp_path / "out"
    run("train.py", *TINY, f"--dataset={legacy}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2")
    sample = run("sample.py", f"--out_dir={out}", "--device=cpu", "--num_samples=1", "--max_new_tokens=30",
                 "--start=ROMEO:").stdout
    assert sample.startswith("ROMEO:") and len(sample.split("---------------")[0]) > 30

    crafted = tmp_path / "crafted"
    crafted.mkdir()
    for name in ("train.bin", "val.bin"):
        (crafted / name).write_bytes((legacy / name).read_bytes())
    marker = tmp_path / "pwned"
    with open(crafted / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 65, "x": _WritesAFile(str(marker))}, f)
    fails(run("train.py", *TINY, f"--dataset={crafted}", f"--out_dir={tmp_path / 'o'}", check=False),
          "meta.pkl is refused: it asks for io.open", "re-run that dataset's prepare.py")
    assert not marker.exists()


def test_reproduction_configs():
    gpt2 = runpy.run_path(os.path.join(REPO, "config/train_gpt2.py"))
    assert gpt2["batch_size"] * gpt2["block_size"] * gpt2["gradient_accumulation_steps"] == 491_520
    assert (gpt2["n_layer"], gpt2["n_head"], gpt2["n_embd"], gpt2["dataset"]) == (12, 12, 768, "openwebtext")
    assert (gpt2["max_iters"], gpt2["lr_decay_iters"], gpt2["warmup_iters"]) == (600_000, 600_000, 2000)
    assert (gpt2["learning_rate"], gpt2["min_lr"], gpt2["weight_decay"]) == (6e-4, 6e-5, 0.1)
    fw = runpy.run_path(os.path.join(REPO, "config/train_gpt2_fineweb.py"))
    assert fw["batch_size"] * fw["block_size"] * fw["gradient_accumulation_steps"] == 524_288
    assert (fw["max_iters"], fw["lr_decay_iters"], fw["warmup_iters"], fw["dataset"]) == \
        (19_073, 19_073, 715, "fineweb_edu")
    assert (fw["learning_rate"], fw["min_lr"]) == (6e-4, 6e-5)
    ts = runpy.run_path(os.path.join(REPO, "config/train_tinystories.py"))
    assert (ts["n_layer"], ts["n_head"], ts["n_embd"], ts["dataset"]) == (6, 6, 384, "tinystories")
    proc = run("train.py", "config/train_gpt2.py", "config/train_gpt2_fineweb.py", "config/train_tinystories.py",
               "--help")  # each is a valid config for train.py
    assert "--dataset='tinystories'" in proc.stdout


def test_a_prefetched_batch_is_the_batch_asked_for(char_data):
    batches = Batches(char_data, 32, 4, "cpu")
    fresh = batches.get("train", 7, 1)
    batches.prefetch("train", 7, 1)
    made = batches.prefetched[1]
    got = batches.get("train", 7, 1)
    assert got is made and all(torch.equal(a, b) for a, b in zip(got, fresh))
    batches.prefetch("train", 8, 0)
    other = batches.get("train", 9, 0)  # not the one prefetched: drawn as usual, and the prefetched one dropped
    assert all(torch.equal(a, b) for a, b in zip(other, Batches(char_data, 32, 4, "cpu").get("train", 9, 0)))
    assert batches.prefetched is None
