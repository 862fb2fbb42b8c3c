"""The experimenter's toolkit: horizons, the depth dial, the LR range test, the scaling sweep and its power-law fit,
your own BPE tokenizer, and finetuning with frozen layers (issue 13)."""

import json
import re

import numpy as np
import pytest
import torch

from conftest import TINY, run
from lib import checkpoint, freeze, scaling
from model import GPT, GPTConfig


def train(data, out_dir, *args, check=True):
    return run("train.py", *TINY, f"--dataset={data}", f"--out_dir={out_dir}", "--sample_interval=0", *args,
               check=check)


def losses(stdout):
    return {int(i): v for i, v in re.findall(r"^iter (\d+): loss (\S+),", stdout, re.M)}


# ----------------------------------------------------------------------------- horizon and depth dial

def test_horizon_rules():
    assert scaling.horizon(0, 0, 1e6, 1e5, 1000) is None  # off: max_iters decides
    assert scaling.horizon(6e9, 0, 1e6, 1e5, 1000) == (6, "target_flops=6e+09")  # 6e9 / 1e6 = 6000 tokens
    assert scaling.horizon(6.0001e9, 0, 1e6, 1e5, 1000)[0] == 7  # rounded up: the budget is reached
    assert scaling.horizon(0, 20, 1e6, 1e5, 1000) == (2000, "tokens_per_param=20")  # 20 * 1e5 tokens / 1000
    assert scaling.horizon(1, 0, 1e6, 1e5, 1000)[0] == 1  # at least one step
    with pytest.raises(ValueError):
        scaling.horizon(1e9, 20, 1e6, 1e5, 1000)


def test_horizon_sets_max_iters_and_schedule(char_data, tmp_path):
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, bias=False))
    tokens_per_iter = 4 * 32
    flops = gpt.flops_per_token() * tokens_per_iter * 12  # 12 steps' worth
    proc = train(char_data, tmp_path / "a", f"--target_flops={flops}", "--eval_interval=100")
    assert re.search(r"^horizon: 12 steps = .*; set by target_flops=", proc.stdout, re.M)
    state = checkpoint.load(str(tmp_path / "a" / "ckpt.pt"))
    assert state["iter_num"] == 12 and state["config"]["lr_decay_iters"] == 12  # the schedule follows
    expected = -(-gpt.get_num_params() // tokens_per_iter)  # tokens_per_param=1: one token per parameter
    proc = train(char_data, tmp_path / "b", "--tokens_per_param=1", "--lr_decay_iters=1000", "--max_iters=1",
                 "--eval_only=True")
    assert re.search(rf"^horizon: {expected:,} steps .*; set by tokens_per_param=1$", proc.stdout, re.M)
    proc = train(char_data, tmp_path / "c", "--tokens_per_param=1", "--target_flops=1e9", check=False)
    assert proc.returncode == 1 and "not both" in proc.stderr


def test_depth_dial():
    assert scaling.depth_dial(12) == {"n_layer": 12, "n_embd": 768, "n_head": 12}  # GPT-2 small
    assert scaling.depth_dial(1) == {"n_layer": 1, "n_embd": 64, "n_head": 1}
    assert scaling.depth_dial(3, aspect=32) == {"n_layer": 3, "n_embd": 96, "n_head": 1}
    for depth in range(1, 40):
        for aspect in (8, 16, 32, 64, 96, 128):
            shape = scaling.depth_dial(depth, aspect)
            assert shape["n_embd"] % shape["n_head"] == 0 and shape["n_embd"] // shape["n_head"] >= min(64,
                                                                                                          aspect * depth)
    assert scaling.apply_depth_dial({}, {"n_embd"}, 4) == {"n_layer": 4, "n_head": 4}  # explicit settings win
    assert scaling.apply_depth_dial({}, set(), 0) == {}


def test_depth_dial_in_train(char_data, tmp_path):
    proc = train(char_data, tmp_path, "--depth=3", "--depth_aspect=16", "--max_iters=1", "--eval_interval=100")
    assert "2 layers, 32 wide" in proc.stdout  # TINY sets n_layer, n_head and n_embd explicitly: they win
    args = [a for a in TINY if not a.startswith(("--n_layer", "--n_head", "--n_embd"))]
    proc = run("train.py", *args, f"--dataset={char_data}", f"--out_dir={tmp_path / 'd'}", "--depth=3",
               "--depth_aspect=16", "--max_iters=1", "--eval_interval=100", "--sample_interval=0")
    state = checkpoint.load(str(tmp_path / "d" / "ckpt.pt"))
    assert {k: state["model_args"][k] for k in ("n_layer", "n_embd", "n_head")} == scaling.depth_dial(3, 16)


# ----------------------------------------------------------------------------- LR finder, power law, sweep

def test_lr_find_stops_at_divergence(char_data, tmp_path):
    png = tmp_path / "lr.png"
    proc = run("experiments/lr_find.py", *TINY, f"--dataset={char_data}", "--num_steps=80", "--lr_start=1e-4",
               "--lr_end=1000", "--smooth=0.8", "--grad_clip=0", f"--out_png={png}")
    m = re.search(r"^diverged at step (\d+)", proc.stdout, re.M)
    assert m and int(m.group(1)) < 79  # stopped before the end
    lr = float(re.search(r"^suggested learning_rate: (\S+) \(the min-loss lr / 10\)", proc.stdout, re.M).group(1))
    assert 1e-4 / 10 <= lr <= 1000
    assert png.stat().st_size > 1000


def test_power_law_fit_recovers_constants():
    a, alpha, c = 12.0, 0.35, 1.7
    N = np.geomspace(1e4, 1e8, 6)
    fit = scaling.fit_power_law(N, a * N ** -alpha + c)
    assert fit == pytest.approx((a, alpha, c), rel=0.03)
    rng = np.random.default_rng(0)
    noisy = (a * N ** -alpha + c) * (1 + 0.002 * rng.standard_normal(len(N)))
    assert scaling.fit_power_law(N, noisy)[1] == pytest.approx(alpha, rel=0.1)


@pytest.mark.slow
def test_sweep_end_to_end(char_data, tmp_path):
    args = [a for a in TINY if not a.startswith(("--n_layer", "--n_head", "--n_embd", "--warmup"))]
    proc = run("experiments/scaling_sweep.py", f"--dataset={char_data}", "--aspect=8", "--depths=1,2,3",
               "--predict=4", "--target_flops=2e8", f"--out_dir={tmp_path}", *args, "--warmup_iters=2",
               "--eval_iters=2")
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert [p["depth"] for p in result["points"]] == [1, 2, 3, 4]
    assert set(result["fit"]) >= {"a", "alpha", "c"} and result["prediction"]["depth"] == 4
    assert abs(result["prediction"]["error"]) < 5  # a number, from a model that trained
    assert "| 2e+08 | 4 (predicted) |" in (tmp_path / "sweep.md").read_text() and "error" in proc.stdout
    assert (tmp_path / "sweep.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- your own tokenizer

@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory, shakespeare_input):
    folder = tmp_path_factory.mktemp("bpe")
    corpus = folder / "corpus.txt"
    corpus.write_text(open(shakespeare_input, encoding="utf-8").read()[:60000] + "\ncafé, naïve — 😀 日本\n",
                      encoding="utf-8")
    run("data/train_tokenizer.py", str(corpus), "--vocab_size=400", f"--out={folder / 'data' / 'tokenizer.json'}")
    run("data/text/prepare.py", str(corpus), "--split_by=paragraph", f"--tokenizer={folder / 'data' / 'tokenizer.json'}",
        f"--out={folder / 'data'}", "--num_proc=1", "--val_fraction=0.1")
    return folder / "data"


def test_own_tokenizer_round_trips(bpe_data):
    from lib.batches import load_meta
    from lib.tokenizer import load_tokenizer

    meta = load_meta(str(bpe_data))
    assert meta["tokenizer"].startswith("hf:") and meta["vocab_size"] == 400
    tok = load_tokenizer(meta, 400)
    for text in ("ROMEO:\nWhat light through yonder window breaks?\n", "  tabs\tand  spaces ", "émoji 😀 日本語 ∑",
                 "<|endoftext|>", ""):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert b"".join(tok.bytes_of(i) for i in ids).decode("utf-8") == text  # what streaming prints
    assert tok.eot is not None and tok.token_bytes(512)[tok.eot] == 0 and tok.token_bytes(512)[400:].sum() == 0


@pytest.mark.slow
def test_model_on_own_tokenizer_samples_and_exports(bpe_data, char_data, tmp_path):
    out = tmp_path / "out"
    proc = train(bpe_data, out, "--max_iters=20", "--eval_interval=10")
    assert re.search(r"val bpb \d", proc.stdout)
    args = ["--device=cpu", f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=30", "--start=ROMEO:",
            "--seed=3"]
    printed = run("sample.py", *args).stdout
    streamed = run("sample.py", *args, "--stream=True").stdout
    assert printed.startswith("ROMEO:") and len(printed) > len("ROMEO:") + 10 and streamed == printed
    proc = train(char_data, out, "--init_from=resume", "--max_iters=30", check=False)  # other tokens: refused
    assert proc.returncode == 1 and "hf:" in proc.stderr and "characters" in proc.stderr
    run("export.py", f"--out_dir={out}", f"--hf_dir={tmp_path / 'hf'}")
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "ROMEO: café 😀"
    assert hf_tok.decode(hf_tok(text)["input_ids"]) == text and hf_tok.eos_token == "<|endoftext|>"


# ----------------------------------------------------------------------------- frozen layers

def initial_model(**kw):
    torch.manual_seed(1337)  # train.py's seed: the same initial weights
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, bias=False, **kw))


def test_frozen_parameters_stay_and_have_no_optimizer_state(char_data, tmp_path):
    start = initial_model().state_dict()
    for train_head, frozen in ((True, ("transformer.wpe.", "transformer.h.0.")),
                               (False, ("transformer.wpe.", "transformer.h.0.", "transformer.wte.", "lm_head.",
                                        "transformer.ln_f."))):
        out = tmp_path / str(train_head)
        proc = train(char_data, out, "--freeze_layers=1", f"--freeze_train_head={train_head}", "--max_iters=6",
                     "--eval_interval=100")
        trainable = re.search(r"^trainable: (\S+) of (\S+) parameters", proc.stdout, re.M)
        assert trainable and trainable.group(1) != trainable.group(2)
        state = checkpoint.load(str(out / "ckpt.pt"))
        for k, v in state["model"].items():
            assert torch.equal(v, start[k]) == k.startswith(frozen), k  # frozen: bit-identical; the rest trained
        model = initial_model()
        n_trainable = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(frozen))
        exp_avg = sum(s["exp_avg"].numel() for s in state["optimizer"]["state"].values())
        held = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
        assert exp_avg == n_trainable and held == len(state["optimizer"]["state"])


def test_progressive_unfreezing_schedule():
    model = GPT(GPTConfig(n_layer=3, n_head=1, n_embd=16, block_size=8, vocab_size=20, bias=False))
    blocks = lambda names: sorted({int(n.split(".")[2]) for n in names if n.startswith("transformer.h.")})  # noqa
    sched = {k: freeze.trainable_names(model, 3, 5, True, k) for k in (0, 4, 5, 9, 10, 14, 15, 100)}
    assert [blocks(sched[k]) for k in (0, 4, 5, 9, 10, 14)] == [[], [], [2], [2], [1, 2], [1, 2]]
    assert sched[15] == sched[100] == {n for n, _ in model.named_parameters()}  # all, embeddings too
    assert "transformer.wte.weight" in sched[0] and "transformer.wpe.weight" not in sched[14]

    freeze.freeze(model, 3, 5, True, 0)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    before = sum(len(g["params"]) for g in optimizer.param_groups)
    assert freeze.unfreeze(model, optimizer, 3, 5, True, 4, 0.1, 1e-3) == []
    new = freeze.unfreeze(model, optimizer, 3, 5, True, 5, 0.1, 1e-3)
    assert new and all(n.startswith("transformer.h.2.") for n in new)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == before + len(new)
    assert {g["weight_decay"] for g in optimizer.param_groups[-2:]} == {0.1, 0.0}  # matrices decay, the rest not


@pytest.mark.slow
def test_progressive_unfreezing_in_train_and_exact_resume(char_data, tmp_path):
    common = ["--freeze_layers=2", "--unfreeze_every=3", "--dropout=0.1", "--eval_interval=4", "--lr_decay_iters=10"]
    whole = train(char_data, tmp_path / "whole", *common, "--max_iters=10").stdout
    assert re.findall(r"^iter (\d+): unfroze", whole, re.M) == ["3", "6"]
    pieces = ""
    for i, stop in enumerate((4, 7, 10)):  # resumed after the first unfreeze, and right after the second
        pieces += train(char_data, tmp_path / "pieces", *common, f"--max_iters={stop}",
                        *(["--init_from=resume"] if i else [])).stdout
    assert len(losses(whole)) == 10 and losses(pieces) == losses(whole)
    a = checkpoint.load(str(tmp_path / "whole" / "ckpt.pt"))
    b = checkpoint.load(str(tmp_path / "pieces" / "ckpt.pt"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert len(a["optimizer"]["param_groups"]) == len(b["optimizer"]["param_groups"]) == 6  # 2 + 2 unfreezes x 2
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
