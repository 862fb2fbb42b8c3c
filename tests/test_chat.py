"""
Chat: the template and its loss mask, data/chat/prepare.py, masked-loss training (micro-steps and ranks),
finetuning from a checkpoint of this repo, chat.py's KV cache across turns, eval_chat.py, and export.py's
chat_template. CPU, no network, small real models and data.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, run
from lib import chat, checkpoint
from lib.batches import load_meta
from lib.chat_data import ChatBatches
from lib.step import train_step
from model import GPT, GPTConfig

SHARED_TIKTOKEN = os.path.join(REPO, "..", "shared", "tiktoken_cache")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(SHARED_TIKTOKEN):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(SHARED_TIKTOKEN)  # tiktoken's gpt2 files, offline

CHARS = sorted(set("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))  # tiny Shakespeare's
CHAR_META = {"tokenizer": "char", "vocab_size": 69, "dtype": "uint16", "stoi": {c: i for i, c in enumerate(CHARS)},
             "itos": dict(enumerate(CHARS)), "chat": chat.chat_spec(65)}
GPT2_CHAT_META = {"tokenizer": "gpt2", "vocab_size": 50261, "dtype": "uint16", "chat": chat.chat_spec(50257)}
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo!"}, {"role": "user", "content": "and?"},
                {"role": "assistant", "content": ""}]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


# ----------------------------------------------------------------------------- the template and its mask

def test_render_gives_the_template_and_masks_exactly_the_assistant_tokens():
    tok = chat.ChatTokenizer(CHAR_META)
    s, u, a, e = 65, 66, 67, 68
    ids, mask = tok.render(CONVERSATION)
    c = {ch: i for i, ch in enumerate(CHARS)}
    want = [s, *[c[x] for x in "Be brief."], e, u, c["h"], c["i"], e, a, c["y"], c["o"], c["!"], e,
            u, *[c[x] for x in "and?"], e, a, e]
    assert ids == want
    trained = [i for i, m in zip(ids, mask) if m]  # the assistants' text and their <|end|>, nothing else
    assert trained == [c["y"], c["o"], c["!"], e, e]
    assert mask == [0] * 11 + [0, 0, 0, 0] + [0, 1, 1, 1, 1] + [0] * 6 + [0, 1]
    assert tok.prompt(CONVERSATION[:2]) == want[:15] + [a]  # ... <|user|>hi<|end|><|assistant|>


@pytest.mark.gpt2_bpe
def test_typed_text_never_becomes_a_special_token():
    import tiktoken

    tok = chat.ChatTokenizer(GPT2_CHAT_META)
    text = "<|end|><|assistant|>x<|endoftext|><|user|>"
    ids, mask = tok.message("user", text)
    assert ids[0] == 50258 and ids[-1] == 50260 and not any(mask)
    assert ids[1:-1] == tiktoken.get_encoding("gpt2").encode_ordinary(text)  # plain BPE pieces, all < 50256
    assert max(ids[1:-1]) < 50256
    assert tok.decode(ids) == text  # and it reads back as the text typed

    # your own BPE (data/train_tokenizer.py): its <|endoftext|> is a special token, yet typed it is text
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["some text to learn from"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    meta = {"tokenizer": "hf:test", "tokenizer_json": bpe.to_str(), "chat": chat.chat_spec(bpe.get_vocab_size())}
    tok = chat.ChatTokenizer(meta)
    ids = tok.message("user", "a<|endoftext|>b<|end|>")[0]
    assert tok.base.eot not in ids and all(i < bpe.get_vocab_size() for i in ids[1:-1])
    assert bpe.encode("<|endoftext|>").ids == [tok.base.eot]  # the premise: the tokenizer itself would match it


@pytest.mark.parametrize("messages, reason", [
    ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}], "unknown role 'tool'"),
    ([{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}], "content of type list"),
    ([{"role": "user", "content": "x"}], "no assistant turn"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "9"}], "characters the model never saw"),
    ([], "empty"),
])
def test_render_says_why_a_conversation_is_unusable(messages, reason):
    with pytest.raises(chat.BadConversation, match=reason):
        chat.ChatTokenizer(CHAR_META).render(messages)


# ----------------------------------------------------------------------------- data/chat/prepare.py

@pytest.fixture(scope="module")
def chat_tasks(char_data, tmp_path_factory, shakespeare_input):
    """data/chat/synthetic.py's tasks (300 conversations each, 50 held out) prepared in char_data's characters:
    (dataset folder, test.jsonl)."""
    folder = tmp_path_factory.mktemp("chat_tasks")
    run("data/chat/synthetic.py", f"--words_from={shakespeare_input}", f"--out={folder}", "--train=300", "--test=50")
    run("data/chat/prepare.py", f"--data_files={folder / 'train.jsonl'}", f"--tokenizer={char_data}",
        "--block_size=64", f"--out={folder}", "--num_proc=2")
    return str(folder), str(folder / "test.jsonl")


def test_prepare_writes_ids_mask_and_lengths_that_render_each_conversation(chat_tasks, char_data):
    folder, _ = chat_tasks
    meta = load_meta(folder)
    assert meta["tokenizer"] == "char" and meta["stoi"] == load_meta(char_data)["stoi"]  # the model's characters
    assert meta["vocab_size"] == 69 and meta["chat"]["tokens"] == {"<|system|>": 65, "<|user|>": 66,
                                                                   "<|assistant|>": 67, "<|end|>": 68}
    tok = chat.ChatTokenizer(meta)
    with open(os.path.join(folder, "meta.json")) as f:
        stored = json.load(f)
    ids = np.fromfile(os.path.join(folder, "train.bin"), dtype=np.uint16)
    mask = np.fromfile(os.path.join(folder, "train_mask.bin"), dtype=np.uint8)
    lengths = np.fromfile(os.path.join(folder, "train_lengths.bin"), dtype=np.uint32)
    assert len(ids) == len(mask) == lengths.sum() == stored["tokens"]["train"]
    with open(os.path.join(folder, "train.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(lengths) == stored["documents"]["train"] and len(lengths) + stored["documents"]["val"] == len(rows)
    assert stored["trained_tokens"]["train"] == mask.sum()
    start = 0
    found = 0
    for row in rows:
        want_ids, want_mask = tok.render(row["messages"])
        n = len(want_ids)
        if list(ids[start:start + n]) == want_ids:
            assert list(mask[start:start + n]) == want_mask
            start += n
            found += 1
    assert found == len(lengths) and start == len(ids)  # every train conversation, in source order


def test_prepare_is_the_same_whatever_num_proc(tmp_path, char_data, shakespeare_input):
    run("data/chat/synthetic.py", f"--words_from={shakespeare_input}", f"--out={tmp_path}", "--train=300", "--test=1",
        "--tasks=spell,reverse,count,add")
    outs = []
    for procs in (1, 2):
        out = tmp_path / f"procs{procs}"
        run("data/chat/prepare.py", f"--data_files={tmp_path / 'train.jsonl'}", f"--tokenizer={char_data}",
            "--block_size=30", f"--out={out}", f"--num_proc={procs}", "--too_long=truncate")
        outs.append({name: (out / name).read_bytes() for name in sorted(os.listdir(out)) if name != ".lock"})
    assert outs[0].keys() == {"meta.json", "train.bin", "val.bin", "train_mask.bin", "val_mask.bin",
                              "train_lengths.bin", "val_lengths.bin"}
    assert outs[0] == outs[1]
    stored = json.loads(outs[0]["meta.json"])
    kept, cut, dropped = (stored["documents"]["train"], stored["conversations"]["truncated"]["train"],
                          stored["conversations"]["dropped"]["train"])
    assert kept + dropped > 1024 and cut > 0 and dropped > 0  # 3 batches of rows, with truncations and drops


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
BAD_LINES = [
    ('{"messages": [{"role": "user", "content": "hi"}', "malformed JSON"),
    ('{"messages": [{"role": "tool", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "unknown role 'tool'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}', "of type int"),
    ('{"text": "hi"}', "no 'messages' field"),
    ('{"messages": [{"role": "user", "content": "9"}, {"role": "assistant", "content": "x"}]}', "never saw: '9'"),
]


def encode(lines, skip_bad=False, block_size=64, too_long="truncate"):
    """chat_data.encode_rows on .jsonl lines, in this process, as a tokenizing worker runs it."""
    from lib import chat_data

    meta = chat_data.chat_meta({"tokenizer": "char", "eot": None, "vocab": CHARS})
    where = chat_data.Where(["chats.jsonl"], [0], "jsonl")
    return chat_data.encode_rows(lines, 0, json.dumps(meta), "jsonl", "messages", block_size, too_long, skip_bad,
                                 np.arange(len(lines)), where)


@pytest.mark.parametrize("line, reason", BAD_LINES)
def test_a_bad_row_names_its_file_and_line(line, reason):
    from lib.dataset import BadInput

    with pytest.raises(BadInput, match=rf"^chats\.jsonl, line 3: .*{re.escape(reason)}.*--skip_bad=True"):
        encode([json.dumps(GOOD), json.dumps(GOOD), line, json.dumps(GOOD)])
    (chunk, stats), rows, kept = encode([json.dumps(GOOD), line], skip_bad=True)
    assert (rows, kept, stats["skipped"]) == (2, 1, 1) and "line 2" in stats["examples"][0]
    assert list(chunk["lengths"]) == [len(chunk["ids"])] == [len(chunk["mask"])]


@pytest.mark.gpt2_bpe
def test_bad_rows_stop_prepare_in_one_line_or_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [GOOD, GOOD] + [line for line, _ in BAD_LINES[:4]] + [GOOD])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run("data/chat/prepare.py", f"--data_files={path}", f"--out={out}", "--num_proc=1", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and re.search(r"chats\.jsonl, line 3: malformed JSON", errors[0]), proc.stderr
    assert sorted(os.listdir(out)) in (["keep.txt"], [".lock", "keep.txt"])  # nothing written or touched
    proc = run("data/chat/prepare.py", f"--data_files={path}", f"--out={out}", "--num_proc=1", "--skip_bad=True",
               "--val_fraction=0.3")
    stored = json.loads((out / "meta.json").read_text())
    assert sum(stored["conversations"]["skipped"].values()) == 4 and sum(stored["documents"].values()) == 3
    assert "bad rows skipped" in proc.stdout and "chats.jsonl, line 4: message 1: unknown role 'tool'" in proc.stdout


def test_too_long_conversations_are_truncated_or_dropped_and_counted():
    short = json.dumps(GOOD)
    long = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 9}]})
    late = json.dumps({"messages": [{"role": "user", "content": "hi " * 9}, {"role": "assistant", "content": "x"}]})
    (chunk, stats), _, kept = encode([short, long, late], block_size=16, too_long="truncate")
    assert (kept, stats["truncated"], stats["dropped"]) == (2, 1, 1)  # late: cut before the assistant says a word
    assert list(chunk["lengths"]) == [len(chat.ChatTokenizer(CHAR_META).render(GOOD["messages"])[0]), 16]
    assert list(chunk["mask"][-16:]) == [0] * 5 + [1] * 11  # the cut one keeps its assistant tokens up to the cut
    (chunk, stats), _, kept = encode([short, long, late], block_size=16, too_long="drop")
    assert (kept, stats["truncated"], stats["dropped"]) == (1, 0, 2)


def test_parquet_conversations_are_read_and_a_bad_row_named_by_its_row(tmp_path):
    import argparse

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lib import chat_data
    from lib.dataset import BadInput

    rows = [GOOD["messages"]] * 3 + [[{"role": "user", "content": "hi"}]] + [GOOD["messages"]]
    pq.write_table(pa.table({"messages": rows, "id": list(range(5))}), tmp_path / "chats.parquet")
    args = argparse.Namespace(data_files=[str(tmp_path / "chats.parquet")], messages_field="messages",
                              val_fraction=0.2, seed=2357, num_proc=1, hub_dataset=None)
    splits, source = chat_data.load_conversations(args)
    assert [len(splits[k][0]) for k in ("train", "val")] == [4, 1] and splits["train"][3] == "rows"
    meta = json.dumps(chat_data.chat_meta({"tokenizer": "char", "eot": None, "vocab": CHARS}))
    errors, kept = [], 0
    for ds, source_rows, where, kind in splits.values():
        assert ds.column_names == ["messages"]  # only the column of the messages is read
        batch = ds[0:len(ds)]["messages"]
        try:
            chat_data.encode_rows(batch, 0, meta, kind, "messages", 64, "truncate", False, source_rows, where)
        except BadInput as e:
            errors.append(str(e))
        kept += chat_data.encode_rows(batch, 0, meta, kind, "messages", 64, "truncate", True, source_rows, where)[2]
    assert len(errors) == 1 and errors[0].startswith(f"{tmp_path / 'chats.parquet'}, row 3: no assistant turn")
    assert kept == 4


def test_a_model_that_never_saw_the_chat_tokens_gets_rows_for_them_at_the_mean():
    torch.manual_seed(0)
    gpt2 = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=50257))  # OpenAI GPT-2's rows
    before = gpt2.lm_head.weight.detach().clone()
    lines = []
    chat.fit_vocab(gpt2, GPT2_CHAT_META, {}, lines.append)
    wte = gpt2.transformer.wte.weight
    assert gpt2.config.vocab_size == 50304 and wte.shape == (50304, 8) and wte is gpt2.lm_head.weight  # still tied
    assert torch.equal(wte[:50257], before) and torch.allclose(wte[50257:], before.mean(0).expand(47, 8))
    assert "50257-50260" in lines[0] and "from 50,257 to 50,304" in lines[0]
    logits = gpt2(torch.tensor([[50258, 1, 50260]]))[0]  # the chat tokens can be read and predicted
    assert logits.shape == (1, 1, 50304)

    chars = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=65, tie_head=False))
    head, emb = chars.lm_head.weight.detach().clone(), chars.transformer.wte.weight.detach().clone()
    chat.fit_vocab(chars, CHAR_META, {"tokenizer": "char"}, lines.append)
    assert chars.lm_head.weight.shape == chars.transformer.wte.weight.shape == (69, 8)
    assert torch.allclose(chars.lm_head.weight[65:], head.mean(0).expand(4, 8))
    assert torch.allclose(chars.transformer.wte.weight[65:], emb.mean(0).expand(4, 8))
    chat.fit_vocab(chars, CHAR_META, CHAR_META, lines.append)  # a model that learned them: left as it is
    assert len(lines) == 2


def test_prepare_takes_the_tokenizer_of_a_checkpoint(tmp_path):
    from lib import chat_data

    save_chat_checkpoint(tmp_path, random_chat_model(), CHAR_META)
    for spec in (str(tmp_path), str(tmp_path / "best.pt")):  # an out_dir, or the file
        fields = chat_data.tokenizer_meta(spec)
        assert fields == {"tokenizer": "char", "eot": None, "vocab": CHARS}
        assert chat_data.chat_meta(fields)["chat"] == CHAR_META["chat"]  # the markers keep their ids


def test_synthetic_replaces_only_its_own_files(tmp_path, shakespeare_input):
    (tmp_path / "train.jsonl").write_text('{"messages": "mine"}\n')
    words = f"--words_from={shakespeare_input}"
    proc = run("data/chat/synthetic.py", words, f"--out={tmp_path}", "--train=5", "--test=1", check=False)
    assert proc.returncode == 1 and "already holds train.jsonl" in proc.stderr and "--overwrite=True" in proc.stderr
    assert (tmp_path / "train.jsonl").read_text() == '{"messages": "mine"}\n'
    run("data/chat/synthetic.py", words, f"--out={tmp_path}", "--train=5", "--test=1", "--overwrite=True")
    run("data/chat/synthetic.py", words, f"--out={tmp_path}", "--train=6", "--test=1", "--seed=2")  # its own: replaced
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) >= 12


# ----------------------------------------------------------------------------- masked loss

class KeepGrads(torch.optim.Optimizer):
    """An optimizer whose step keeps a copy of the gradients it is given (and changes nothing)."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self):
        self.grads = {id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]}


def big_batch_grads(model, batches, step, micro_steps):
    """The gradient of one batch holding all the micro-batches of a step: the mean loss over all its targets."""
    xs, ys = zip(*[batches.get("train", step, m) for m in range(micro_steps)])
    model.zero_grad(set_to_none=True)
    model(torch.cat(xs), torch.cat(ys))[1].backward()
    return {id(p): p.grad.detach().clone() for p in model.parameters()}


def test_rows_are_whole_conversations_padded_with_targets_on_the_assistant_only(chat_tasks):
    folder, _ = chat_tasks
    batches = ChatBatches(folder, 64, 8, "cpu", seed=1)
    x, y = batches.get("train", 0, 0)
    assert (x[:, 0] == 66).all()  # every row starts a conversation: <|user|> at position 0
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        n = 64 - row_x[::-1].index(68)  # the conversation ends at its last <|end|>, the assistant's
        assert row_x[n:] == [0] * (64 - n) and row_y[n - 1:] == [-1] * (65 - n)  # padding: no loss
        trained, want = False, []  # the targets: each assistant's text and <|end|>, after its <|assistant|>
        for prev, nxt in zip(row_x[:n - 1], row_x[1:n]):
            trained = prev == 67 or (trained and prev != 68)
            want.append(nxt if trained else -1)
        assert row_y[:n - 1] == want
    assert batches.trained_tokens("train", 0, 0) == int((y >= 0).sum())


def test_masked_loss_gradient_equals_one_big_batch_over_2_micro_steps(chat_tasks):
    folder, _ = chat_tasks
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=69, bias=False))
    batches = ChatBatches(folder, 64, 4, "cpu", seed=1)
    counts = [batches.trained_tokens("train", 3, m) for m in range(2)]
    assert counts[0] != counts[1]  # the premise: micro-batches with different numbers of trained tokens
    opt = KeepGrads(model.parameters())
    train_step(model, opt, torch.amp.GradScaler("cpu", enabled=False), batches, 3, 2, torch.autocast("cpu",
               enabled=False), 0.0)
    want = big_batch_grads(model, batches, 3, 2)
    error = max((opt.grads[k] - want[k]).abs().max().item() for k in want)
    scale = max(g.abs().max().item() for g in want.values())
    print(f"masked loss, 2 micro-steps vs one batch: max |grad error| {error:.2e} (grads up to {scale:.2e})")
    assert error <= 1e-6 * scale
    # what the mean of the micro-steps' means would have given is measurably different
    mean_of_means = {}
    for m in range(2):
        model.zero_grad(set_to_none=True)
        (model(*batches.get("train", 3, m))[1] / 2).backward()
        for p in model.parameters():
            mean_of_means[id(p)] = mean_of_means.get(id(p), 0) + p.grad
    assert max((mean_of_means[k] - want[k]).abs().max().item() for k in want) > 100 * error


GRAD_CHECK = """
import copy, sys
from contextlib import nullcontext
import torch
sys.path.insert(0, {repo!r})
from lib import parallel
from lib.chat_data import ChatBatches
from lib.runtime import setup
from lib.step import train_step
from model import GPT, GPTConfig


class KeepGrads(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {{}})

    def step(self):
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]


rt = setup("cpu", "float32", distributed=True)
torch.manual_seed(0)
gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=69, bias=False))
plain = copy.deepcopy(gpt)
model = parallel.wrap(gpt, rt, "ddp")
batches = ChatBatches(sys.argv[1], 64, 4, "cpu", seed=1)
opt = KeepGrads(gpt.parameters())
train_step(model, opt, torch.amp.GradScaler("cpu", enabled=False), batches, 3, 1, nullcontext(), 0.0, rt.rank,
           rt.world_size)
xs, ys = zip(*[batches.get("train", 3, m) for m in range(2)])  # the step's two micro-batches, as one batch
plain(torch.cat(xs), torch.cat(ys))[1].backward()
want = [p.grad for p in plain.parameters()]
error = max((a - b).abs().max().item() for a, b in zip(opt.grads, want))
scale = max(g.abs().max().item() for g in want)
print(f"rank {{rt.rank}}: max |grad error| {{error:.2e}} (grads up to {{scale:.2e}})", flush=True)
assert error <= 1e-6 * scale
"""


def test_masked_loss_gradient_equals_one_big_batch_over_2_gloo_ranks(chat_tasks, tmp_path):
    folder, _ = chat_tasks
    script = tmp_path / "grad_check.py"
    script.write_text(GRAD_CHECK.format(repo=REPO))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), folder], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(re.findall(r"rank \d: max \|grad error\|", proc.stdout)) == 2, proc.stdout


# ----------------------------------------------------------------------------- finetuning a checkpoint of this repo

@pytest.mark.slow
def test_finetune_own_checkpoint_from_iteration_0_with_its_weights_source_untouched_resume_exact(
        char_data, chat_tasks, tmp_path):
    src = tmp_path / "pretrained"
    tiny = [a for a in TINY if not a.startswith("--block_size")] + ["--block_size=64"]
    run("train.py", *tiny, f"--dataset={char_data}", f"--out_dir={src}", "--max_iters=4", "--eval_interval=4")
    before = {name: (src / name).read_bytes() for name in os.listdir(src)}
    source = checkpoint.load(str(src / "ckpt.pt"))["model"]

    proc = run("train.py", *tiny, f"--dataset={chat_tasks[0]}", f"--init_from={src}", f"--out_dir={src}",
               "--overwrite=True", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1
    assert "new out_dir" in proc.stderr

    sft = [*tiny, f"--dataset={chat_tasks[0]}", f"--init_from={src / 'ckpt.pt'}", "--freeze_layers=1",
           "--eval_interval=3", "--lr_decay_iters=6", "--dropout=0.1"]
    whole = run("train.py", *sft, f"--out_dir={tmp_path / 'whole'}", "--max_iters=6").stdout
    assert "finetuning" in whole and "iteration 0" in whole and "vocabulary grows from 65 to 69" in whole
    assert re.search(r"^iter 1: loss \S+, lr 3\.33e-04", whole, re.M)  # step 1 of a fresh schedule (warmup 2)
    done = checkpoint.load(str(tmp_path / "whole" / "ckpt.pt"))
    assert done["iter_num"] == 6 and done["model_args"]["vocab_size"] == 69 and done["meta"]["chat"]
    frozen = [k for k in source if k.startswith("transformer.h.0.")]
    assert frozen and all(torch.equal(done["model"][k], source[k]) for k in frozen)  # the checkpoint's weights
    assert not torch.equal(done["model"]["transformer.h.1.mlp.c_fc.weight"], source["transformer.h.1.mlp.c_fc.weight"])
    assert {name: (src / name).read_bytes() for name in os.listdir(src)} == before  # the source: as it was

    # a finetuning run resumes exactly, as any other: 0 -> 3 -> 6 is 0 -> 6
    pieces = run("train.py", *sft, f"--out_dir={tmp_path / 'pieces'}", "--max_iters=3").stdout
    pieces += run("train.py", *sft, f"--out_dir={tmp_path / 'pieces'}", "--max_iters=6", "--init_from=resume").stdout
    pick = lambda s: re.findall(r"^iter (\d+): loss (\S+),", s, re.M)  # noqa: E731
    assert pick(pieces) == pick(whole) and len(pick(whole)) == 6
    resumed = checkpoint.load(str(tmp_path / "pieces" / "ckpt.pt"))["model"]
    assert all(torch.equal(resumed[k], done["model"][k]) for k in resumed)


# ----------------------------------------------------------------------------- talking: the KV cache across turns

def random_chat_model(block_size=48, seed=0):
    """A random character-level chat model whose logits are far apart (greedy choices are not near-ties)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=69, bias=False))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def recomputed_reply(model, tok, ids, max_new_tokens):
    """The greedy reply to ids, from scratch: the whole context through the model again for every token."""
    ids, reply = list(ids), []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0][0, -1]
        t = chat.sample_next(logits, 0, None, tok.vocab_size)
        if t in tok.special or len(ids) >= model.config.block_size:
            break
        reply.append(t)
        ids.append(t)
    return reply


def test_chat_keeps_the_kv_cache_across_turns_with_the_tokens_of_a_full_recompute():
    model, tok = random_chat_model(block_size=96), chat.ChatTokenizer(CHAR_META)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].size(1)))
    conversation = chat.Chat(model, tok, system="Be brief.")
    for turn, text in enumerate(["hello there", "and then?", "why?"]):
        before, calls[:] = conversation.ids(), []
        reply = list(conversation.ask(text, max_new_tokens=12))
        fed = calls[:]  # the forward passes of the ask() above (not of the recompute below)
        prompt = conversation.ids()[:len(conversation.ids()) - len(reply) - 1]  # ... <|assistant|>
        assert prompt[:len(before)] == before and prompt[-1] == 67
        assert reply == recomputed_reply(model, tok, prompt, 12)
        if turn == 0:  # one pass over the first prompt, then one token at a time
            assert fed[0] == len(prompt) and sum(fed) == len(prompt) + len(reply)
        else:  # only the new tokens, in one pass (the last turn's <|end|>, this message, <|assistant|>), then the reply
            new = len(prompt) - len(before) + 1
            assert fed[0] == new > 1 and fed[1:] == [1] * len(reply) and new + len(reply) < len(conversation.ids())


def test_chat_drops_the_oldest_turns_when_the_context_is_full_and_stays_exact():
    model, tok = random_chat_model(block_size=48), chat.ChatTokenizer(CHAR_META)
    conversation = chat.Chat(model, tok, system="Hi.")
    dropped = 0
    for text in ["one two three", "four five six", "seven eight", "nine ten", "eleven twelve"]:
        # replies of up to 5 tokens fit in the room kept for them (an eighth of the context): turns are dropped
        # before a reply, which then comes from the shortened conversation alone
        reply = list(conversation.ask(text, max_new_tokens=5))
        dropped += conversation.dropped
        ids = conversation.ids()
        assert len(ids) <= 48 and ids[:5] == tok.message("system", "Hi.")[0]  # the system message stays
        prompt = ids[:len(ids) - len(reply) - 1]
        assert reply == recomputed_reply(model, tok, prompt, 5)
    assert dropped >= 2
    reply = list(conversation.ask("thirteen", max_new_tokens=40))  # a reply longer than the room: turns go mid-way
    assert len(conversation.ids()) <= 48 and conversation.ids()[-1] == tok.end
    with pytest.raises(chat.UserError, match="too long"):
        conversation.ask("a very long message that cannot fit in the context of this model at all")


def test_stopping_a_reply_early_closes_the_turn():
    model, tok = random_chat_model(block_size=96), chat.ChatTokenizer(CHAR_META)
    conversation = chat.Chat(model, tok)
    turn = conversation.ask("hello", max_new_tokens=20)
    first = [next(turn), next(turn)]
    turn.close()  # what chat.py does on Ctrl-C
    assert conversation.ids()[-3:] == first + [tok.end]
    reply = list(conversation.ask("again", max_new_tokens=6))
    prompt = conversation.ids()[:len(conversation.ids()) - len(reply) - 1]
    assert reply == recomputed_reply(model, tok, prompt, 6)


def save_chat_checkpoint(out_dir, model, meta):
    args = {k: getattr(model.config, k) for k in checkpoint.ARCH_KEYS + ("dropout",)}
    os.makedirs(out_dir, exist_ok=True)
    checkpoint.save(dict(model=model.state_dict(), optimizer={}, scaler={}, model_args=args, iter_num=5,
                         best_val_loss=1.0, config={}, meta=meta), str(out_dir), is_best=True)


def test_chat_cli_answers_streams_resets_and_reports_speed(tmp_path):
    model, tok = random_chat_model(block_size=48), chat.ChatTokenizer(CHAR_META)
    save_chat_checkpoint(tmp_path, model, CHAR_META)
    common = [f"--out_dir={tmp_path}", "--device=cpu", "--dtype=float32", "--temperature=0", "--max_new_tokens=10"]
    proc = run("chat.py", *common, "--prompt=hello there")
    want = tok.decode(recomputed_reply(model, tok, tok.prompt([{"role": "user", "content": "hello there"}]), 10))
    assert proc.stdout == want + "\n" and re.search(r"tokens in \S+s: \S+ tokens/s", proc.stderr)

    script = "hello there\nwhat is 9?\n/reset\nhello there\none two three four\nfive six seven\n/system Be.\nok\n"
    proc = subprocess.run([sys.executable, "chat.py", *common], cwd=REPO, input=script, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    conversation, expected = chat.Chat(model, tok), []  # the same conversation, here
    for line in script.splitlines():
        if line == "/reset":
            conversation.reset()
        elif line.startswith("/system "):
            conversation.reset(system=line[8:])
        elif "9" not in line:
            expected.append(tok.decode(conversation.ask(line, max_new_tokens=10)) + "\n")
    assert proc.stdout == "".join(expected) and expected[0] == expected[1] == want + "\n"  # /reset: as new
    assert "error: the user message cannot be read" in proc.stderr and "'9'" in proc.stderr  # and it goes on
    assert "dropped its oldest" in proc.stderr and "(a new conversation" in proc.stderr


# ----------------------------------------------------------------------------- export.py

def export(monkeypatch, *args):
    import runpy

    monkeypatch.setattr(sys, "argv", ["export.py", *args])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    runpy.run_path(os.path.join(REPO, "export.py"), run_name="__main__")


@pytest.mark.parametrize("kind", ["char", pytest.param("gpt2", marks=pytest.mark.gpt2_bpe)])
def test_export_carries_the_chat_template_apply_chat_template_and_generate_agree(monkeypatch, tmp_path, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "char":
        model, meta = random_chat_model(block_size=128), CHAR_META
    else:  # GPT-2 BPE, padded to 50304 rows, the chat tokens at 50257-50260
        torch.manual_seed(1)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128, vocab_size=50304, bias=True)).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.3)
        meta = GPT2_CHAT_META
    tok = chat.ChatTokenizer(meta)
    save_chat_checkpoint(tmp_path / "out", model, meta)
    export(monkeypatch, f"--out_dir={tmp_path / 'out'}", f"--hf_dir={tmp_path / 'hf'}")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.vocab_size == tok.vocab_size and hf.config.eos_token_id == tok.end == hf_tok.eos_token_id
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, who are you?"},
                {"role": "assistant", "content": "Me."}, {"role": "user", "content": "And? So:\nwhat"}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == tok.prompt(messages)
    full = hf_tok.apply_chat_template(messages[:3], tokenize=True, return_dict=False)
    assert full == tok.render(messages[:3])[0]
    ours = chat.greedy_replies(model, tok, [ids], 20)[0]
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=tok.end,
                          pad_token_id=tok.end)
    new = out[0, len(ids):].tolist()
    new = new[:next((k for k, t in enumerate(new) if t in tok.special), len(new))]  # as greedy_replies cuts
    theirs = hf_tok.decode(new)
    print(f"export ({kind}): greedy reply {ours!r}, transformers' {theirs!r}")
    assert theirs == ours and len(ours) > 0


# ----------------------------------------------------------------------------- the CPU demo, small

@pytest.mark.slow
def test_sft_demo_held_out_accuracy_rises_from_zero(char_data, tmp_path, shakespeare_input):
    """docs/chat.md's demo at a tenth of its size: pretrain briefly on tiny Shakespeare, then SFT on spelling short
    words; the accuracy on held-out words (never in the SFT data) goes from 0 to most of them."""
    data, pre, sft = tmp_path / "spell", tmp_path / "pretrained", tmp_path / "sft"
    run("data/chat/synthetic.py", f"--words_from={shakespeare_input}", f"--out={data}", "--tasks=spell",
        "--letters=3-5", "--train=3000", "--test=100", "--two_turns=0")
    run("data/chat/prepare.py", f"--data_files={data / 'train.jsonl'}", f"--tokenizer={char_data}",
        "--block_size=32", f"--out={data}", "--num_proc=2")
    model = ["--device=cpu", "--dtype=float32", "--compile=False", "--recipe=modern", "--optimizer=adamw",
             "--qk_norm=False", "--x0_mix=False", "--eval_iters=2", "--log_interval=50", "--sample_interval=0",
             "--gradient_accumulation_steps=1"]
    run("train.py", *model, "--n_layer=2", "--n_head=4", "--n_embd=64", "--block_size=48", "--batch_size=8",
        f"--dataset={char_data}", f"--out_dir={pre}", "--max_iters=30", "--eval_interval=30", "--warmup_iters=2",
        "--lr_decay_iters=30", "--learning_rate=1e-3")

    def accuracy(*args):
        proc = run("eval_chat.py", *args, f"--tests={data / 'test.jsonl'}", "--device=cpu", "--dtype=float32")
        return float(re.search(r"= ([\d.]+)% exact answers", proc.stdout).group(1))

    before = accuracy(f"--out_dir={pre}", f"--dataset={data}")
    run("train.py", *model, f"--init_from={pre}", f"--dataset={data}", f"--out_dir={sft}", "--block_size=32",
        "--batch_size=32", "--max_iters=400", "--eval_interval=400", "--warmup_iters=20", "--decay_lr=False",
        "--learning_rate=3e-3")
    after = accuracy(f"--out_dir={sft}")
    print(f"SFT demo (tiny): held-out spelling accuracy {before:.0f}% before, {after:.0f}% after")
    assert before <= 5 and after >= 40


# ----------------------------------------------------------------------------- the other ways in

def test_finetune_takes_a_sharded_checkpoint_and_its_recipe(tmp_path):
    from lib import finetune, parallel
    from lib.runtime import UserError

    torch.manual_seed(0)
    modern = dict(rotary=True, rmsnorm=True, relu2=True, tie_head=False, logit_softcap=15.0, bias=False)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=69, **modern))
    args = {k: getattr(model.config, k) for k in checkpoint.ARCH_KEYS + ("dropout",)}
    model_sd, optim_sd = parallel.sharded_state(model, torch.optim.AdamW(model.parameters()))  # as train.py saves
    state = dict(model=model_sd, optimizer=optim_sd, model_args=args, iter_num=9, best_val_loss=1.5, val_loss=1.5,
                 config={}, meta=CHAR_META)
    out = tmp_path / "pretrained"
    out.mkdir()
    checkpoint.save(state, str(out), is_best=True, sharded=True)  # ckpt.dcp and best.dcp folders
    assert finetune.source(str(out), str(tmp_path / "sft")).endswith("best.dcp")
    for source in (str(out / "ckpt.dcp"), str(out)):
        state, arch = finetune.load(finetune.source(source, str(tmp_path / "sft")), {}, set())
        assert {k: arch[k] for k in modern} == modern and arch["block_size"] == 64 and "optimizer" not in state
        gpt = finetune.model(source, state, 32, 0.1, master=False)  # cropped, this run's dropout
        assert gpt.config.block_size == 32 and gpt.config.dropout == 0.1 and gpt.config.rotary
        assert all(torch.equal(gpt.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match="trained with rotary=True"):
        finetune.load(str(out / "ckpt.dcp"), {"rotary": False}, {"rotary"})
    with pytest.raises(UserError, match="longer than the 64 positions"):
        finetune.load(str(out / "ckpt.dcp"), {"block_size": 128}, {"block_size"})
    with pytest.raises(UserError, match="new out_dir"):
        finetune.source(str(out), str(out))
    assert finetune.source("gpt2", "out") is None and finetune.source(str(tmp_path), "out") is None  # not ours


def test_sft_presets_load_through_train_py():
    import runpy

    proc = run("train.py", "config/sft_shakespeare_char_cpu.py", "--help")  # an unknown key would fail
    assert "--init_from='out-shakespeare-char'" in proc.stdout and "--dataset='chat_tasks'" in proc.stdout
    gpt2 = runpy.run_path(os.path.join(REPO, "config/sft_gpt2.py"))
    assert (gpt2["init_from"], gpt2["dataset"], gpt2["block_size"]) == ("gpt2", "chat", 1024)
    run("train.py", "config/sft_gpt2.py", "--help")


@pytest.mark.slow
@pytest.mark.gpt2_bpe
def test_openai_gpt2_grows_to_50304_rows_finetunes_on_chat_data_and_exports(tmp_path):
    """A transformers GPT-2 (50,257 rows, like OpenAI's) finetuned on GPT-2 BPE chat data: its vocabulary grows to
    50,304 with the chat tokens at 50257-50260, chat.py answers, and the export holds the chat tokens' rows."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)).save_pretrained(tmp_path / "hf")
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{2 * i}."}]} for i in range(40)]
    path = write_jsonl(tmp_path / "chats.jsonl", rows)
    run("data/chat/prepare.py", f"--data_files={path}", f"--out={tmp_path / 'data'}", "--block_size=64",
        "--num_proc=1", "--val_fraction=0.1")
    tiny = [a for a in TINY if not a.startswith("--block_size")]
    proc = run("train.py", *tiny, f"--init_from={tmp_path / 'hf'}", f"--dataset={tmp_path / 'data'}",
               f"--out_dir={tmp_path / 'out'}", "--block_size=64", "--max_iters=3", "--eval_interval=3")
    assert "vocabulary grows from 50,257 to 50,304" in proc.stdout
    state = checkpoint.load(str(tmp_path / "out" / "ckpt.pt"))
    assert state["model_args"]["vocab_size"] == 50304 and state["meta"]["chat"] == GPT2_CHAT_META["chat"]
    proc = run("chat.py", f"--out_dir={tmp_path / 'out'}", "--device=cpu", "--dtype=float32", "--prompt=Hi!",
               "--max_new_tokens=5")
    assert "tokens/s" in proc.stderr
    run("export.py", f"--out_dir={tmp_path / 'out'}", f"--hf_dir={tmp_path / 'export'}")
    tok = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert tok.apply_chat_template(rows[0]["messages"], tokenize=True, return_dict=False) == \
        chat.ChatTokenizer(state["meta"]).render(rows[0]["messages"])[0]
