"""
GPT-2 checkpoints in and out: transformers folders -> our GPT (load), tiny Shakespeare in GPT-2 BPE, finetuning
from a folder and resuming, sampling, and our checkpoints -> transformers folders (export.py). CPU, no network:
every transformers model here is a small random one saved to a temp folder.
"""

import json
import os
import runpy
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from conftest import REPO, TINY, run
from lib import checkpoint
from lib.batches import load_meta
from lib.runtime import UserError
from model import GPT, GPTConfig

GPT2_META = {"vocab_size": 50257, "tokenizer": "gpt2", "dtype": "uint16"}
TOL = 1e-5  # float32 parity of our GPT and transformers' GPT2LMHeadModel


def small_gpt2(vocab_size=101, n_positions=64, seed=0, randomize=True, **config):
    """A random 2-layer transformers GPT-2. randomize: every parameter ~N(0, 0.2), biases and LayerNorms too."""
    torch.manual_seed(seed)
    ids = dict(bos_token_id=None, eos_token_id=None) if vocab_size < 50257 else {}
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=n_positions, vocab_size=vocab_size,
                                    **ids, **config))
    if randomize:
        with torch.no_grad():
            for p in hf.parameters():  # wte and lm_head are one tensor (tied) unless the config unties them
                p.normal_(0.0, 0.2)
    return hf.eval()


def max_logit_diff(ours, hf, vocab_size, lengths=(1, 17, 64), batch=3, seed=0):
    """Largest |logit difference| at every position of random sequences; ours in eval mode, float32."""
    ours.eval()
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for T in lengths:
        x = torch.randint(0, vocab_size, (batch, T), generator=g)
        with torch.no_grad():
            a, _ = ours(x, targets=x)  # with targets our model returns the logits of all positions
            b = hf(x).logits
        assert b.shape == (batch, T, vocab_size)
        worst = max(worst, (a[..., :vocab_size] - b).abs().max().item())
    return worst


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    hf = small_gpt2()
    folder = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(folder)
    return hf, str(folder)


@pytest.fixture(scope="module")
def gpt2_vocab_folder(tmp_path_factory):
    """A small random transformers GPT-2 with GPT-2's 50257-token vocabulary, for sample.py and train.py."""
    folder = tmp_path_factory.mktemp("hf_gpt2_vocab")
    small_gpt2(vocab_size=50257, randomize=False).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory, shakespeare_input):
    out = tmp_path_factory.mktemp("shakespeare_bpe")
    proc = run("data/shakespeare/prepare.py", f"--input={shakespeare_input}", f"--out_dir={out}")
    return str(out), proc.stdout


# ----------------------------------------------------------------------------- transformers folder -> our GPT

def test_load_safetensors_folder_matches_transformers(hf_folder):
    hf, folder = hf_folder
    assert os.path.exists(os.path.join(folder, "model.safetensors"))
    model = GPT.from_pretrained(folder)
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size, c.bias) == (2, 2, 32, 64, 101, True)
    diff = max_logit_diff(model, hf, 101)
    print(f"load parity (safetensors): max abs logit diff {diff:.3g}")
    assert diff < TOL


def test_load_bin_folder_matches_transformers(tmp_path):
    """A pytorch_model.bin as the hub's original GPT-2 repos have it: no 'transformer.' prefix, attn.bias buffers."""
    hf = small_gpt2(seed=1)
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(hf.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
    hf.config.save_pretrained(tmp_path)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    diff = max_logit_diff(GPT.from_pretrained(str(tmp_path)), hf, 101)
    print(f"load parity (.bin): max abs logit diff {diff:.3g}")
    assert diff < TOL


@pytest.mark.parametrize("change, message", [
    (dict(tie_word_embeddings=False), "not tied"),
    (dict(activation_function="relu"), "not a plain GPT-2"),
    (dict(scale_attn_by_inverse_layer_idx=True), "not a plain GPT-2"),
    (dict(n_inner=48), "shape"),
])
def test_load_rejects_what_our_gpt_cannot_hold(tmp_path, change, message):
    small_gpt2(**change).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=message):
        checkpoint.load_pretrained(str(tmp_path))


def test_load_rejects_a_folder_without_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(UserError, match="not a transformers GPT-2 folder"):
        checkpoint.load_pretrained(str(tmp_path))


def test_load_rejects_a_folder_with_missing_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    small_gpt2().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="c_fc"):
        checkpoint.load_pretrained(str(tmp_path))


@pytest.mark.gpt2_bpe
def test_sample_from_hf_folder(gpt2_vocab_folder):
    proc = run("sample.py", f"--init_from={gpt2_vocab_folder}", "--device=cpu", "--num_samples=2",
               "--max_new_tokens=12", "--start=ROMEO:", "--seed=1")
    samples = proc.stdout.split("---------------\n")
    assert len(samples) == 3 and samples[-1] == ""
    for s in samples[:2]:
        assert s.startswith("ROMEO:") and len(s.rstrip("\n")) > len("ROMEO:")
    assert samples[0] != samples[1]  # sampled, not a fixed output


def test_hub_name_offline_says_pass_a_local_folder(tmp_path):
    proc = run("sample.py", "--init_from=gpt2", "--device=cpu", check=False,
               env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})  # an empty cache: nothing to find offline
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "local folder" in last and "--init_from=" in last


# ----------------------------------------------------------------------------- GPT-2 BPE data, finetuning

@pytest.mark.gpt2_bpe
def test_bpe_prepare_counts_and_round_trip(bpe_data, shakespeare_input):
    import tiktoken

    out, stdout = bpe_data
    assert load_meta(out) == GPT2_META
    train = np.fromfile(os.path.join(out, "train.bin"), dtype=np.uint16)
    val = np.fromfile(os.path.join(out, "val.bin"), dtype=np.uint16)
    with open(shakespeare_input, encoding="utf-8") as f:
        text = f.read()
    enc = tiktoken.get_encoding("gpt2")
    split = int(len(text) * 0.9)  # the first 90% of the characters, then the rest, each encoded on its own
    assert train.tolist() == enc.encode_ordinary(text[:split]) and val.tolist() == enc.encode_ordinary(text[split:])
    assert enc.decode(train.tolist()) == text[:split] and enc.decode(val.tolist()) == text[split:]
    # the whole corpus: 301,966 and 36,059 tokens
    assert f"train has {len(train):,} tokens" in stdout and f"val has {len(val):,} tokens" in stdout


def test_configs_load_through_train_py():
    configs = ["config/finetune_shakespeare.py", "config/eval_gpt2.py", "config/eval_gpt2_medium.py",
               "config/eval_gpt2_large.py", "config/eval_gpt2_xl.py"]
    proc = run("train.py", *configs, "--help")  # applies every file (an unknown key fails), prints the result
    assert "--init_from='gpt2-xl'" in proc.stdout and "--eval_only=True" in proc.stdout
    for path, model in zip(configs[1:], ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]):
        settings = runpy.run_path(os.path.join(REPO, path))
        assert settings["init_from"] == model and settings["eval_only"] is True
        assert (settings["batch_size"], settings["eval_iters"], settings["dataset"]) == (8, 500, "openwebtext")
    ft = runpy.run_path(os.path.join(REPO, configs[0]))
    assert (ft["init_from"], ft["dataset"], ft["out_dir"]) == ("gpt2-xl", "shakespeare", "out-shakespeare")
    assert (ft["learning_rate"], ft["decay_lr"], ft["always_save_checkpoint"]) == (3e-5, False, False)
    assert (ft["batch_size"], ft["gradient_accumulation_steps"], ft["max_iters"]) == (1, 32, 20)


@pytest.mark.gpt2_bpe
@pytest.mark.slow
def test_finetune_from_hf_folder_crops_and_resumes(gpt2_vocab_folder, bpe_data, tmp_path):
    data, _ = bpe_data
    common = ["config/finetune_shakespeare.py", f"--dataset={data}", f"--out_dir={tmp_path}", "--device=cpu",
              "--compile=False", "--batch_size=2", "--gradient_accumulation_steps=1", "--eval_iters=2",
              "--eval_interval=2", "--log_interval=1"]
    run("train.py", *common, f"--init_from={gpt2_vocab_folder}", "--block_size=32", "--max_iters=3")
    state = checkpoint.load(os.path.join(tmp_path, checkpoint.LATEST))
    assert state["iter_num"] == 3
    assert state["model_args"]["block_size"] == 32 and state["model_args"]["vocab_size"] == 50257
    assert state["model"]["transformer.wpe.weight"].shape == (32, 32)  # cropped from the folder's 64 positions
    assert state["meta"] == GPT2_META

    proc = run("train.py", *common, "--init_from=resume", "--max_iters=5")
    assert "iter 4:" in proc.stdout and "iter 5:" in proc.stdout and "iter 1:" not in proc.stdout
    assert checkpoint.load(os.path.join(tmp_path, checkpoint.LATEST))["iter_num"] == 5


# ----------------------------------------------------------------------------- our checkpoint -> transformers folder

def export(monkeypatch, *args):
    """Run export.py in this process (transformers is imported already); its UserErrors propagate."""
    monkeypatch.setattr(sys, "argv", ["export.py", *args])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # export.py installs its hook; put ours back after
    runpy.run_path(os.path.join(REPO, "export.py"), run_name="__main__")


def test_export_char_checkpoint_round_trip(monkeypatch, char_data, tmp_path):
    out, hf_dir = tmp_path / "out", tmp_path / "hf"
    run("train.py", *TINY, f"--dataset={char_data}", f"--out_dir={out}", "--max_iters=3", "--eval_interval=3")
    export(monkeypatch, f"--out_dir={out}", f"--hf_dir={hf_dir}")
    state = checkpoint.load(os.path.join(out, checkpoint.BEST))
    ours = checkpoint.model_from_checkpoint(state)
    assert ours.config.bias is False  # exported with zero biases
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert hf.config.vocab_size == 65 and hf.config.n_positions == 32
    diff = max_logit_diff(ours, hf, 65, lengths=(1, 9, 32))
    print(f"export parity (char, bias=False): max abs logit diff {diff:.3g}")
    assert diff < TOL
    with open(hf_dir / "char_vocab.json", encoding="utf-8") as f:
        assert json.load(f) == state["meta"]["stoi"]
    assert not (hf_dir / "tokenizer.json").exists()


def padded_bpe_checkpoint(out_dir, meta):
    """A checkpoint as train.py writes it: GPT-2 BPE with the vocab padded to 50304, random biases and norms."""
    torch.manual_seed(2)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=50304, bias=True))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    args = {k: getattr(model.config, k) for k in checkpoint.ARCH_KEYS + ("dropout",)}
    state = dict(model=model.state_dict(), optimizer={}, scaler={}, model_args=args, iter_num=7, best_val_loss=3.0,
                 config={}, meta=meta)
    os.makedirs(out_dir, exist_ok=True)
    checkpoint.save(state, out_dir, is_best=True)
    return model


@pytest.mark.gpt2_bpe
@pytest.mark.parametrize("meta", [GPT2_META, {}], ids=["gpt2-meta", "no-meta"])
def test_export_padded_bpe_checkpoint(monkeypatch, tmp_path, meta):
    import tiktoken

    ours = padded_bpe_checkpoint(tmp_path / "out", meta)
    hf_dir = tmp_path / "hf"
    export(monkeypatch, f"--out_dir={tmp_path / 'out'}", f"--hf_dir={hf_dir}", "--ckpt=latest")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert hf.config.vocab_size == 50257 and hf.lm_head.weight.shape == (50257, 32)
    diff = max_logit_diff(ours, hf, 50257, lengths=(1, 20, 48))
    print(f"export parity (BPE, bias=True, 50304 -> 50257): max abs logit diff {diff:.3g}")
    assert diff < TOL
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert tok("hello world")["input_ids"] == [31373, 995]
    text = "ROMEO:\nBut, soft! what light through yonder window breaks?<|endoftext|> 123"
    assert tok(text)["input_ids"] == tiktoken.get_encoding("gpt2").encode(text, allowed_special="all")
    assert tok.eos_token_id == hf.config.eos_token_id == 50256


@pytest.mark.parametrize("edit, message", [
    ("model_args", "model_args"),  # refused before the tokenizer files are read; the others need them
    pytest.param("extra_weight", "cannot hold: transformer.h.0.attn.q_norm.weight", marks=pytest.mark.gpt2_bpe),
    pytest.param("missing_weight", "lacks transformer.h.1.mlp.c_fc.weight", marks=pytest.mark.gpt2_bpe),
    pytest.param("reshaped", "shape", marks=pytest.mark.gpt2_bpe),
    pytest.param("untied", "not tied", marks=pytest.mark.gpt2_bpe),
])
def test_export_rejects_what_gpt2_cannot_hold(monkeypatch, tmp_path, edit, message):
    padded_bpe_checkpoint(tmp_path, GPT2_META)
    path = os.path.join(tmp_path, checkpoint.LATEST)
    state = checkpoint.load(path)
    sd = state["model"]
    if edit == "model_args":
        state["model_args"]["n_kv_head"] = 1
    elif edit == "extra_weight":
        sd["transformer.h.0.attn.q_norm.weight"] = torch.ones(16)
    elif edit == "missing_weight":
        del sd["transformer.h.1.mlp.c_fc.weight"]
    elif edit == "reshaped":  # an MLP 3x wide instead of GPT-2's 4x
        sd["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(96, 32)
        sd["transformer.h.0.mlp.c_fc.bias"] = torch.zeros(96)
        sd["transformer.h.0.mlp.c_proj.weight"] = torch.zeros(32, 96)
    elif edit == "untied":
        sd["lm_head.weight"] = sd["lm_head.weight"].clone() + 1.0
    checkpoint.save(state, str(tmp_path))
    with pytest.raises(UserError, match=message):
        export(monkeypatch, f"--out_dir={tmp_path}", f"--hf_dir={tmp_path / 'hf'}", "--ckpt=latest")
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_export_error_is_one_line(tmp_path):
    padded_bpe_checkpoint(tmp_path, GPT2_META)
    state = checkpoint.load(os.path.join(tmp_path, checkpoint.LATEST))
    state["model_args"]["n_kv_head"] = 1
    checkpoint.save(state, str(tmp_path))
    proc = run("export.py", f"--out_dir={tmp_path}", f"--hf_dir={tmp_path / 'hf'}", "--ckpt=latest", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "n_kv_head" in proc.stderr and len(proc.stderr.splitlines()) == 1


# ----------------------------------------------------------------------------- padded vocab never sampled

def test_padding_ids_are_never_sampled():
    """Make every padding row's logit the largest: without vocab_limit they win, with it they never appear."""
    torch.manual_seed(3)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=50304, bias=True)).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)  # every position's final hidden state is all ones
        model.lm_head.weight.normal_(0.0, 0.1)
        model.lm_head.weight[50257:] = 5.0  # padding logits 40, real ones about N(0, 0.3)
    x = torch.zeros((4, 1), dtype=torch.long)
    unlimited = model.generate(x, 10, temperature=1.0)
    assert (unlimited[:, 1:] >= 50257).all()  # the test's premise: padding dominates
    for temperature, top_k in [(1.0, None), (2.0, 5), (0.0, None)]:
        y = model.generate(x, 10, temperature=temperature, top_k=top_k, vocab_limit=50257)
        assert y.shape == (4, 11) and (y < 50257).all()
