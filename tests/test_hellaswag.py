"""
HellaSwag: completion-style scoring (lib/hellaswag.py) checked against a direct computation with the model, and
eval_hellaswag.py end to end, on a small file in the official format with small random models. CPU, no network.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import REPO, TINY, run
from lib import checkpoint, hellaswag
from lib.runtime import UserError
from model import GPT, GPTConfig

SHARED_TIKTOKEN = os.path.join(REPO, "..", "shared", "tiktoken_cache")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(SHARED_TIKTOKEN):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(SHARED_TIKTOKEN)  # tiktoken's gpt2 files, offline

GPT2_META = {"vocab_size": 50257, "tokenizer": "gpt2", "dtype": "uint16"}

# (activity_label, ctx_a, ctx_b, endings, label), written below as the official files lay them out
EXAMPLES = [
    ("Roof shingle removal", "A man is sitting on a roof.", "he",
     ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
      "starts pulling up roofing on a roof."], 3),
    ("Baking cookies", "A woman pours flour into a large bowl. She", "",
     ["adds two eggs and starts to stir the dough with a wooden spoon.", "jumps into the pool.",
      "paints the fence green.", "sings."], 0),
    ("Making a café latte", "The barista steams the milk until it foams.", "then she",
     ["pours it slowly over the espresso, drawing a leaf on top.", "throws the cup at the wall.",
      "rides a bicycle down the street while the milk boils over and over again.", "sleeps."], 0),
    ("Playing the guitar", "A boy tunes his guitar on the couch. He", "",
     ["eats the guitar.", "starts to strum a few chords and hums along.", "drives to work.",
      "puts on ski boots."], 1),
    ("Washing the car", "A man sprays the car with a hose.", "he",
     ["then scrubs the doors with a soapy sponge.", "flies away.", "reads a newspaper about politics in France.",
      "is"], 0),
    ("Running a marathon", "Runners crowd the starting line as the gun fires.", "they",
     ["sit down.", "take off down the road, elbows and sneakers everywhere.", "cook pasta.",
      "go to bed early because tomorrow is another long day at the office."], 1),
]


def write_examples(path, examples=EXAMPLES):
    """A .jsonl file with every field of the official HellaSwag files."""
    with open(path, "w", encoding="utf-8") as f:
        for i, (activity, ctx_a, ctx_b, endings, label) in enumerate(examples):
            ctx = f"{ctx_a} {ctx_b}" if ctx_b else ctx_a
            f.write(json.dumps({"ind": 100 + i, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b,
                                "ctx": ctx, "split": "val", "split_type": "indomain", "label": label,
                                "endings": endings, "source_id": f"activitynet~v_{i:011d}"}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def enc():
    import tiktoken

    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def val_file(tmp_path_factory):
    return write_examples(tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl")


def random_gpt(block_size=64, vocab_size=50304, dropout=0.0, seed=0):
    """A small GPT with every parameter ~N(0, 0.2), so the endings' losses differ clearly."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab_size, bias=True,
                          dropout=dropout))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def save_checkpoint(model, out_dir, meta):
    """model as train.py's best.pt and ckpt.pt in out_dir, with the vocabulary metadata `meta`."""
    args = {k: getattr(model.config, k) for k in checkpoint.ARCH_KEYS + ("dropout",)}
    os.makedirs(out_dir, exist_ok=True)
    checkpoint.save(dict(model=model.state_dict(), model_args=args, iter_num=5, config={}, meta=meta), str(out_dir),
                    is_best=True)


def direct_losses(model, example, enc, block_size=None):
    """(summed, mean) loss of each ending: one forward pass per ending on context + ending, no padding, no batching."""
    summed, mean = [], []
    ctx = enc.encode(example["ctx"])
    for ending in example["endings"]:
        end = enc.encode(" " + ending)
        ids = ctx + end
        first = len(ctx)  # position of the ending's first token
        if block_size and len(ids) > block_size:
            first -= len(ids) - block_size
            ids = ids[-block_size:]
        x = torch.tensor([ids])
        with torch.no_grad():
            logits, _ = model(x, targets=x)  # with targets: the logits of every position
        logp = F.log_softmax(logits[0].float(), dim=-1)
        nll = [-logp[t - 1, ids[t]].item() for t in range(max(first, 1), len(ids))]
        summed.append(sum(nll))
        mean.append(sum(nll) / len(nll))
    return torch.tensor(summed), torch.tensor(mean)


def argmin(xs):
    return min(range(len(xs)), key=lambda i: xs[i])


# ----------------------------------------------------------------------------- scoring

def test_load_examples_reads_the_official_format(val_file):
    examples = hellaswag.load_examples(val_file)
    assert len(examples) == len(EXAMPLES)
    assert examples[0] == {"ctx": "A man is sitting on a roof. he", "endings": EXAMPLES[0][3], "label": 3}
    assert examples[1]["ctx"] == "A woman pours flour into a large bowl. She"
    assert len(hellaswag.load_examples(val_file, limit=4)) == 4


def test_scoring_picks_the_lowest_mean_loss_as_a_direct_computation_does(val_file, enc):
    model = random_gpt()
    examples = hellaswag.load_examples(val_file)
    right = right_norm = 0
    differ = 0
    for ex in examples:
        summed, mean = hellaswag.score_example(model, ex, enc.encode_ordinary)
        want_summed, want_mean = direct_losses(model, ex, enc)
        assert torch.allclose(summed, want_summed, rtol=1e-4, atol=1e-4)
        assert torch.allclose(mean, want_mean, rtol=1e-4, atol=1e-4)
        pred, pred_norm = argmin(want_summed.tolist()), argmin(want_mean.tolist())
        assert (int(summed.argmin()), int(mean.argmin())) == (pred, pred_norm)
        right += pred == ex["label"]
        right_norm += pred_norm == ex["label"]
        differ += pred != pred_norm
    assert differ >= 1  # the premise: summed and mean losses pick differently somewhere, so both are checked
    result = hellaswag.evaluate(model, examples, enc.encode_ordinary)
    assert result == (right / len(examples), right_norm / len(examples), len(examples))
    print(f"random model: acc {result.acc:.3f}, acc_norm {result.acc_norm:.3f} on {result.n} examples")


def test_evaluate_switches_a_training_model_to_eval_and_back(val_file, enc):
    examples = hellaswag.load_examples(val_file)
    model = random_gpt(dropout=0.5)
    expected = hellaswag.evaluate(model, examples, enc.encode_ordinary)  # in eval mode
    model.train()
    assert hellaswag.evaluate(model, examples, enc.encode_ordinary) == expected  # no dropout: switched to eval
    assert model.training  # and back
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)  # an autocast context, as train.py has one
    assert hellaswag.evaluate(model, examples, enc.encode_ordinary, autocast=bf16).n == expected.n and model.training


def test_ranks_share_the_examples(val_file, enc):
    """Without a process group each rank returns its own counts; together they are the whole evaluation."""
    examples = hellaswag.load_examples(val_file)
    model = random_gpt(seed=1)
    whole = hellaswag.evaluate(model, examples, enc.encode_ordinary)
    parts = [hellaswag.evaluate(model, examples, enc.encode_ordinary, rank=r, world_size=2) for r in (0, 1)]
    assert [p.n for p in parts] == [3, 3]
    assert sum(p.acc * p.n for p in parts) == pytest.approx(whole.acc * whole.n)
    assert sum(p.acc_norm * p.n for p in parts) == pytest.approx(whole.acc_norm * whole.n)


RANK_SCRIPT = """
import json, sys
import torch.distributed as dist
import tiktoken
from lib import checkpoint, hellaswag, runtime
rt = runtime.setup("cpu", "float32", distributed=True)
model, _ = checkpoint.load_for_inference("resume", sys.argv[1])
result = hellaswag.evaluate(model, hellaswag.load_examples(sys.argv[2]), tiktoken.get_encoding("gpt2").encode_ordinary,
                            rt.device, rank=rt.rank, world_size=rt.world_size)
with open(f"{sys.argv[3]}/rank{rt.rank}.json", "w") as f:  # not stdout, where the ranks' lines can mix
    json.dump([rt.world_size, *result], f)
dist.destroy_process_group()  # as train.py ends: leaving it to exit can abort
"""


def test_ranks_under_torchrun_agree_on_the_whole_result(tmp_path, val_file, enc):
    model = random_gpt(seed=1)
    save_checkpoint(model, tmp_path / "out", GPT2_META)
    script = tmp_path / "rank_eval.py"
    script.write_text(RANK_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path / "out"), val_file, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    whole = hellaswag.evaluate(model, hellaswag.load_examples(val_file), enc.encode_ordinary)
    for rank in (0, 1):
        world_size, *result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert world_size == 2 and result == pytest.approx(list(whole))  # each rank scored 3, the sums are all 6


def test_rows_longer_than_block_size_keep_their_last_tokens(enc):
    model = random_gpt(block_size=16, seed=2)
    ex = {"ctx": "A very long context that goes on and on about many things " * 2, "label": 2,
          "endings": ["ends.", "ends here with a few more words than the first one.", "stops", "halts now."]}
    tokens, mask = hellaswag.render_example(ex, enc.encode_ordinary, block_size=16)
    assert tokens.shape == (4, 16) and mask[1].sum() == len(enc.encode(" " + ex["endings"][1]))
    summed, mean = hellaswag.score_example(model, ex, enc.encode_ordinary)
    want_summed, want_mean = direct_losses(model, ex, enc, block_size=16)
    assert torch.allclose(summed, want_summed, rtol=1e-4, atol=1e-4)
    assert torch.allclose(mean, want_mean, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("line, message", [
    ("not json", "line 2 is not JSON"),
    (json.dumps({"ctx": "a", "endings": ["b", "c"], "label": 0}), "line 2 is not a HellaSwag example"),
    (json.dumps({"ctx": "a", "endings": ["b", "c", "d", "e"], "label": ""}), "line 2 has no label"),
])
def test_load_examples_rejects_other_files(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 1}) + "\n" + line + "\n")
    with pytest.raises(UserError, match=message):
        hellaswag.load_examples(str(path))
    with pytest.raises(UserError, match="not found: pass --input"):
        hellaswag.load_examples(str(tmp_path / "missing.jsonl"))


def test_download_happens_once_and_failing_says_pass_input(tmp_path, val_file):
    source = tmp_path / "server" / "hellaswag_val.jsonl"
    source.parent.mkdir()
    source.write_bytes(open(val_file, "rb").read())
    cache = tmp_path / "cache"
    path = hellaswag.download(str(cache), url=source.as_uri())
    assert path == str(cache / "hellaswag_val.jsonl") and len(hellaswag.load_examples(path)) == len(EXAMPLES)
    source.unlink()
    assert hellaswag.download(str(cache), url=source.as_uri()) == path  # cached: not fetched again
    with pytest.raises(UserError, match=r"could not download .* --input=path/to/hellaswag_val.jsonl"):
        hellaswag.download(str(tmp_path / "cache2"), url="http://127.0.0.1:9/hellaswag_val.jsonl")
    assert not (tmp_path / "cache2" / "hellaswag_val.jsonl").exists()


# ----------------------------------------------------------------------------- eval_hellaswag.py

def parse(stdout):
    m = re.search(r"^hellaswag acc (\S+)% \((\d+)/(\d+)\), acc_norm (\S+)% \((\d+)/(\d+)\)$", stdout, re.M)
    assert m, stdout
    return int(m[2]) / int(m[3]), int(m[5]) / int(m[6]), int(m[3])


def test_eval_hellaswag_on_a_hf_folder_and_a_checkpoint(tmp_path, val_file, enc):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    hf.save_pretrained(tmp_path / "hf")
    proc = run("eval_hellaswag.py", f"--init_from={tmp_path / 'hf'}", f"--input={val_file}", "--device=cpu")
    assert f"hellaswag: 6 examples from {val_file}" in proc.stdout
    assert "about 29-30% acc_norm" in proc.stdout and "reference:" in proc.stdout
    model, _ = checkpoint.load_for_inference(str(tmp_path / "hf"))
    assert parse(proc.stdout) == tuple(hellaswag.evaluate(model, hellaswag.load_examples(val_file), enc.encode_ordinary))

    model = random_gpt(block_size=48, seed=3)  # a checkpoint of train.py: vocab padded to 50304
    save_checkpoint(model, tmp_path / "out", GPT2_META)
    proc = run("eval_hellaswag.py", f"--out_dir={tmp_path / 'out'}", f"--input={val_file}", "--device=cpu",
               "--limit=4")
    examples = hellaswag.load_examples(val_file, limit=4)
    assert parse(proc.stdout) == tuple(hellaswag.evaluate(model, examples, enc.encode_ordinary))
    assert "this run scored 4 of them" in proc.stdout


def test_eval_hellaswag_errors_are_one_line(tmp_path, val_file):
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=65))
    chars = [chr(32 + i) for i in range(65)]
    save_checkpoint(model, tmp_path / "char", {"vocab_size": 65, "itos": dict(enumerate(chars)),
                                               "stoi": {c: i for i, c in enumerate(chars)}})
    for args, message in [
        ([f"--out_dir={tmp_path / 'char'}", f"--input={val_file}"], "is a character-level model"),
        ([f"--out_dir={tmp_path / 'char'}", f"--input={tmp_path / 'missing.jsonl'}"], "not found: pass --input"),
        ([f"--out_dir={tmp_path / 'none'}", f"--input={val_file}"], "no checkpoint at"),
        (["--limit=-1"], "--limit=-1"),
    ]:
        proc = run("eval_hellaswag.py", "--device=cpu", *args, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        last = proc.stderr.strip().splitlines()
        assert len(last) == 1 and last[0].startswith("error: ") and message in last[0], proc.stderr


def test_train_scores_hellaswag_every_interval_on_bpe_runs(tmp_path, val_file, char_data):
    """hellaswag_interval in train.py: a line and a metrics.jsonl record on a GPT-2 BPE run; refused on char data."""
    data = tmp_path / "bpe"
    data.mkdir()
    ids = np.random.default_rng(0).integers(0, 50257, size=4000).astype(np.uint16)  # random GPT-2 ids
    for split in ("train", "val"):
        ids.tofile(data / f"{split}.bin")
    (data / "meta.json").write_text(json.dumps({"vocab_size": 50257, "dtype": "uint16", "tokenizer": "gpt2"}))
    args = [*TINY, "--max_iters=2", "--eval_interval=2", f"--hellaswag_file={val_file}", "--hellaswag_interval=2"]
    proc = run("train.py", *args, f"--dataset={data}", f"--out_dir={tmp_path / 'out'}")
    line = re.search(r"^hellaswag at step 2: acc_norm ([\d.]+)%, acc ([\d.]+)% on (\d+) examples", proc.stdout, re.M)
    assert line and int(line[3]) == len(EXAMPLES), proc.stdout
    with open(tmp_path / "out" / "metrics.jsonl") as f:
        records = [json.loads(r) for r in f if '"hellaswag"' in r]
    assert len(records) == 1 and records[0]["examples"] == len(EXAMPLES)
    assert abs(records[0]["acc_norm"] * 100 - float(line[1])) < 0.01
    proc = run("train.py", *args, f"--dataset={char_data}", f"--out_dir={tmp_path / 'char'}", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: hellaswag_interval needs a GPT-2 BPE dataset")
