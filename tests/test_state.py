"""
State is checked, not trusted: meta.json against its schema, a best.pt of another run, a damaged sharded checkpoint,
settings a resumed run cannot change; and special tokens' spellings in a corpus are text on every path.
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, run
from lib import checkpoint
from lib.batches import Batches, load_meta
from lib.corpus import GPT2_EOT, encode_chars, encode_gpt2, encode_hf, hf_meta
from lib.runtime import UserError
from lib.tokenizer import load_tokenizer
from test_faults import fails

EOT = "<|endoftext|>"


def train(data, out_dir, *args, check=True):
    return run("train.py", *TINY, f"--dataset={data}", f"--out_dir={out_dir}", "--sample_interval=0", *args,
               check=check)


# ----------------------------------------------------------------------------- meta.json

def with_meta(char_data, folder, edit):
    """char_data's bins beside its meta.json changed by edit (a dict -> dict function)."""
    os.makedirs(folder)
    for name in ("train.bin", "val.bin"):
        shutil.copy(os.path.join(char_data, name), folder / name)
    meta = json.load(open(os.path.join(char_data, "meta.json"), encoding="utf-8"))
    (folder / "meta.json").write_text(json.dumps(edit(meta)), encoding="utf-8")
    return folder


@pytest.mark.parametrize("edit, problems", [
    (lambda m: {}, ["no format", "tokenizer None", "vocab_size None", "dtype None", "tokens None"]),
    (lambda m: {**m, "vocab": m["vocab"][:-1]}, ['a "vocab" of 64 characters for vocab_size 65']),
    (lambda m: {**m, "format": 2}, ["format 2, but this repo reads format 1"]),
    (lambda m: {**m, "tokenizer": "bpe"}, ["tokenizer 'bpe', not 'gpt2', 'char' or 'hf:<hash>'"]),
    (lambda m: {**m, "tokenizer": "gpt2"}, ["tokenizer 'gpt2' with 65 ids of its own, not GPT-2's 50257"]),
    (lambda m: {**m, "vocab_size": 70, "chat": {"tokens": {"<|user|>": 65, "<|end|>": 66}}},
     ['a "chat" entry whose markers are not the last ids of vocab_size 70']),
    (lambda m: {**m, "dtype": "uint8"}, ["dtype 'uint8', not uint16 or uint32"]),
    (lambda m: {**m, "vocab": m["vocab"][:-1] + [m["vocab"][0]]}, ['a "vocab" that lists a character twice']),
    (lambda m: {**m, "eot": 65}, ["eot 65, not an id of the vocabulary"]),
    (lambda m: {**m, "tokenizer": "hf:0123456789abcdef"}, ["without the tokenizer.json itself"]),
    (lambda m: {**m, "tokenizer": "hf:0123456789abcdef", "tokenizer_json": "{"}, ["a tokenizer_json that"]),
])
def test_meta_json_is_checked_against_its_schema(char_data, tmp_path, edit, problems):
    folder = with_meta(char_data, tmp_path / "data", edit)
    with pytest.raises(UserError) as e:
        Batches(str(folder), 32, 4, "cpu")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{folder / 'meta.json'} is not metadata this repo can trust")
    assert all(p in message for p in problems), message
    assert message.endswith("Re-run the dataset's prepare.py, which writes it")


def test_a_valid_meta_json_passes(char_data, tmp_path):
    folder = with_meta(char_data, tmp_path / "data", lambda m: m)
    assert Batches(str(folder), 32, 4, "cpu").meta["vocab_size"] == 65 == len(load_meta(folder)["itos"])


def test_a_characters_list_shorter_than_the_vocabulary_is_refused_in_a_nanogpt_meta_pkl(char_data, tmp_path):
    import pickle

    folder = tmp_path / "data"
    os.makedirs(folder)
    meta = load_meta(char_data)
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 65, "itos": {i: c for i, c in meta["itos"].items() if i < 60}, "stoi": {}}, f)
    with pytest.raises(UserError, match="lists 60 characters for a vocabulary of 65 ids"):
        load_meta(folder)


# ----------------------------------------------------------------------------- best.pt of another run

def save(state, folder, is_best=True):
    os.makedirs(folder, exist_ok=True)
    checkpoint.save(state, str(folder), is_best=is_best)


def tiny_state(run_id, iter_num=2, val_loss=3.0, n_embd=8):
    return {"model": {"w": torch.zeros(n_embd)}, "model_args": {"n_embd": n_embd}, "iter_num": iter_num,
            "best_val_loss": val_loss, "val_loss": val_loss, **({"run_id": run_id} if run_id else {})}


def test_a_best_pt_of_another_run_is_passed_over_and_set_aside(tmp_path, capsys):
    out = str(tmp_path)
    save(tiny_state("ours", val_loss=3.0), tmp_path)
    save(tiny_state("theirs", val_loss=1.0), tmp_path / "other")
    shutil.copy(tmp_path / "other" / "best.pt", tmp_path / "best.pt")  # a better-looking model of another run
    assert checkpoint.find(out, "best") == os.path.join(out, "ckpt.pt")
    assert "best.pt is from another run than" in capsys.readouterr().err
    assert checkpoint.find(out, "best.pt") == os.path.join(out, "best.pt")  # asked for by name: taken
    assert checkpoint.reconcile_best(out, checkpoint.load(os.path.join(out, "ckpt.pt"))) == 3.0  # not theirs, 1.0
    assert "set aside as" in capsys.readouterr().out
    assert checkpoint.load(os.path.join(out, "best.foreign.pt"))["run_id"] == "theirs"  # kept, not deleted
    assert checkpoint.load(os.path.join(out, "best.pt"))["run_id"] == "ours"  # ckpt.pt's weights were its best
    assert checkpoint.find(out, "best") == os.path.join(out, "best.pt")


def test_checkpoints_from_before_run_ids_are_told_apart_by_their_model(tmp_path):
    assert checkpoint.same_run(tiny_state(None), tiny_state(None))
    assert not checkpoint.same_run(tiny_state(None), tiny_state(None, n_embd=16))
    resumed_with_dropout = {**tiny_state(None), "model_args": {"n_embd": 8, "dropout": 0.1}}
    assert checkpoint.same_run(tiny_state(None), resumed_with_dropout)  # dropout may change on resume
    assert checkpoint.same_run(tiny_state("a"), tiny_state(None))  # one old, one new: the model decides
    assert not checkpoint.same_run(tiny_state("a"), tiny_state("b"))


@pytest.fixture(scope="module")
def trained(char_data, tmp_path_factory):
    """A run trained 2 steps (ckpt.pt and best.pt at iter 2): copy it before changing it."""
    out = tmp_path_factory.mktemp("trained")
    train(char_data, out, "--max_iters=2", "--eval_interval=2")
    return out


def test_train_writes_the_run_id_into_every_checkpoint_and_resume_keeps_it(char_data, trained, tmp_path):
    tmp_path = tmp_path / "out"
    shutil.copytree(trained, tmp_path)
    run_id = checkpoint.load(str(tmp_path / "ckpt.pt"))["run_id"]
    assert run_id and checkpoint.load(str(tmp_path / "best.pt"))["run_id"] == run_id
    save(tiny_state("theirs", val_loss=0.1), tmp_path / "other")
    shutil.copy(tmp_path / "other" / "best.pt", tmp_path / "best.pt")
    proc = train(char_data, tmp_path, "--max_iters=4", "--eval_interval=2", "--init_from=resume")
    assert f"note: {tmp_path / 'best.pt'} is from another run (run theirs, not {run_id})" in proc.stdout
    assert "best val loss 0.1" not in proc.stdout  # another run's loss is not this run's best
    for name in ("ckpt.pt", "best.pt"):
        assert checkpoint.load(str(tmp_path / name))["run_id"] == run_id
    assert checkpoint.load(str(tmp_path / "best.foreign.pt"))["run_id"] == "theirs"


# ----------------------------------------------------------------------------- sharded checkpoints

@pytest.fixture(scope="module")
def sharded_run(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    train(char_data, out, "--max_iters=2", "--eval_interval=2", "--checkpoint_format=sharded")
    return out


def damaged_copy(sharded_run, folder):
    shutil.copytree(sharded_run, folder)
    shard = sorted(p for p in os.listdir(folder / "ckpt.dcp") if p.endswith(".distcp"))[0]
    with open(folder / "ckpt.dcp" / shard, "r+b") as f:
        f.truncate(100)  # a copy cut short, a disk that filled
    return folder


def test_a_truncated_dcp_gets_the_one_line_of_a_damaged_checkpoint(sharded_run, tmp_path):
    out = damaged_copy(sharded_run, tmp_path / "out")
    path = str(out / "ckpt.dcp")
    for read in (lambda: checkpoint.load(path), lambda: checkpoint.load_latest(str(out), "sharded"),
                 lambda: checkpoint.load_for_inference("resume", str(out), "latest")):
        with pytest.raises(UserError) as e:
            read()
        message = str(e.value)
        assert message.startswith(f"{path} is corrupt or incomplete (__0_0.distcp is truncated") and "\n" not in message
        assert f"other checkpoints there: {out / 'best.dcp'}" in message
    proc = run("-m", "lib.checkpoint", "convert", path, str(tmp_path / "ckpt.pt"), check=False)
    fails(proc, f"error: {path} is corrupt or incomplete (__0_0.distcp is truncated")
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_damaged_dcp_falls_back_to_the_other_format(sharded_run, tmp_path):
    out = damaged_copy(sharded_run, tmp_path / "out")
    checkpoint.save({**tiny_state("x", iter_num=1), "model": {}}, str(out))  # an older ckpt.pt, whole
    assert checkpoint.latest(str(out), prefer="sharded") == str(out / "ckpt.pt")


def test_convert_into_a_missing_folder_is_one_line_before_reading(sharded_run, tmp_path):
    proc = run("-m", "lib.checkpoint", "convert", str(sharded_run / "ckpt.dcp"), str(tmp_path / "no" / "ckpt.pt"),
               check=False)
    fails(proc, f"cannot write {tmp_path / 'no' / 'ckpt.pt'}: there is no folder {tmp_path / 'no'}")


# ----------------------------------------------------------------------------- what a resumed run keeps

def resumed(config_before, model_args=None, **asked):
    """check_model_args for a run resumed with the settings `asked` (explicit) on a checkpoint trained with
    config_before: what it keeps, or the error."""
    from lib.optim import RECIPES

    defaults = {"recipe": "gpt2", **RECIPES["gpt2"], "n_layer": 2, "bias": False, "freeze_layers": 0,
                "unfreeze_every": 0, "freeze_train_head": True}
    config = {**defaults, **asked}
    if asked.get("recipe"):
        config.update({k: v for k, v in RECIPES[asked["recipe"]].items() if k not in asked})
    state = {"model_args": {"n_layer": 2, "bias": False, **(model_args or {})}, "config": config_before}
    return checkpoint.check_model_args(state, "out/ckpt.pt", config, set(asked))


def test_resume_refuses_what_would_change_the_model_or_its_optimizer_state():
    with pytest.raises(UserError, match=r"trained with rotary=False but --recipe=modern sets rotary=True"):
        resumed({"recipe": "gpt2"}, recipe="modern")
    with pytest.raises(UserError, match=r"trained with freeze_layers=0 but the config asks for freeze_layers=1: a "
                                        r"resumed run keeps its optimizer and frozen layers"):
        resumed({}, freeze_layers=1)
    with pytest.raises(UserError, match=r"trained with optimizer='adamw' but the config asks for optimizer='muon'"):
        resumed({"optimizer": "adamw"}, optimizer="muon")


def test_resume_keeps_the_checkpoints_optimizer_freezing_and_recipe_unless_asked():
    modern = {"recipe": "modern", "optimizer": "muon", "lr_schedule": "wsd", "freeze_layers": 1, "unfreeze_every": 5}
    kept = resumed(modern, model_args={"rotary": True})
    assert kept["optimizer"] == "muon" and kept["lr_schedule"] == "wsd" and kept["recipe"] == "modern"
    assert kept["rotary"] is True and kept["freeze_layers"] == 1 and kept["unfreeze_every"] == 5
    assert resumed(modern, model_args={"rotary": True}, lr_schedule="cosine").get("lr_schedule") is None


def test_resume_with_freezing_the_run_did_not_have_is_one_line(char_data, trained):
    proc = train(char_data, trained, "--max_iters=4", "--init_from=resume", "--freeze_layers=1", check=False)
    fails(proc, "was trained with freeze_layers=0 but the config asks for freeze_layers=1")


# ----------------------------------------------------------------------------- special tokens' spellings are text

TEXTS = ["a literal <|endoftext|> is text", "<|endoftext|>", "x<|endoftext|><|endoftext|>y"]


@pytest.fixture(scope="module")
def own_tokenizer(tmp_path_factory):
    """A byte-level BPE of data/train_tokenizer.py, trained on a corpus that holds the literal."""
    sys.path.insert(0, os.path.join(REPO, "data"))
    from train_tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    (folder / "corpus.txt").write_text("ROMEO: a <|endoftext|> b\n" * 50 + "some more words here\n", encoding="utf-8")
    train_tokenizer([str(folder / "corpus.txt")], 300).save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.mark.gpt2_bpe
def test_prepare_encodes_the_spelling_as_text_with_every_tokenizer(own_tokenizer):
    gpt2 = encode_gpt2(TEXTS)
    assert (gpt2 == GPT2_EOT).sum() == len(TEXTS)  # only the one after each document
    meta = hf_meta(str(own_tokenizer))
    own = encode_hf(TEXTS, str(own_tokenizer), meta["eot"], np.uint16)
    assert (own == meta["eot"]).sum() == len(TEXTS)
    chars = sorted(set("".join(TEXTS)) | {"\n"})
    ids = encode_chars(TEXTS, np.array([ord(c) for c in chars], dtype=np.uint32), np.uint16)
    assert "".join(chars[i] for i in ids) == "".join(t + "\n" for t in TEXTS)


@pytest.mark.gpt2_bpe
def test_tokenizers_encode_the_spelling_as_text_and_a_prompt_may_ask_for_the_token(own_tokenizer):
    meta = {"tokenizer": "hf:test", "tokenizer_json": own_tokenizer.read_text(encoding="utf-8")}
    for tok in (load_tokenizer({}), load_tokenizer(meta)):
        for text in TEXTS:
            ids = tok.encode(text)
            assert tok.eot not in ids and tok.decode(ids) == text
            assert b"".join(tok.bytes_of(i) for i in ids).decode() == text
        assert tok.encode(EOT, allow_special=True) == [tok.eot]


def test_train_tokenizer_takes_a_corpus_with_the_spelling_and_refuses_an_empty_one(tmp_path):
    (tmp_path / "a.txt").write_text("hello <|endoftext|> world\n" * 20, encoding="utf-8")
    proc = run("data/train_tokenizer.py", str(tmp_path / "a.txt"), "--vocab_size=300",
               f"--out={tmp_path / 'tok.json'}")
    assert "compression on the corpus" in proc.stdout
    (tmp_path / "empty.txt").write_text("")
    proc = run("data/train_tokenizer.py", str(tmp_path / "empty.txt"), f"--out={tmp_path / 't2.json'}", check=False)
    fails(proc, f"error: the corpus ({tmp_path / 'empty.txt'}) is empty")
    assert not (tmp_path / "t2.json").exists()


def test_a_corrupt_tokenizer_json_is_one_line(tmp_path):
    (tmp_path / "tok.json").write_text('{"version": "1.0", "model": ', encoding="utf-8")
    (tmp_path / "a.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    proc = run("data/text/prepare.py", str(tmp_path / "a.txt"), f"--tokenizer={tmp_path / 'tok.json'}",
               f"--out={tmp_path / 'out'}", check=False)
    fails(proc, f"--tokenizer={tmp_path / 'tok.json'} is not a tokenizer.json that Hugging Face tokenizers can load")
    with pytest.raises(UserError, match="the tokenizer.json that the metadata of hf:x holds cannot be loaded"):
        load_tokenizer({"tokenizer": "hf:x", "tokenizer_json": "{"})
