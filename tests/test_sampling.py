"""
sample.py beyond one printed batch: streaming (never a broken UTF-8 character, the same text as without it),
the interactive prompt loop driven through stdin, the progress bar, and model.generate_tokens.
"""

import os
import random
import re
import subprocess
import threading

import pytest
import torch

from conftest import popen, run
from lib import checkpoint
from model import GPT, GPTConfig
from sample import SEPARATOR, TextStream

GPT2_META = {"vocab_size": 50257, "tokenizer": "gpt2", "dtype": "uint16"}
# GPT-2 BPE tokens that are each only part of a UTF-8 character: '日' is 33768 98, '本' 17312 105, '🙂' 8582 25081
SPLIT_TOKENS = [33768, 98, 17312, 105, 8582, 25081]


def sample(*args, input=None):
    """sample.py's CompletedProcess, with `input` on its stdin (a pipe, as when a script drives it)."""
    return run("sample.py", "--device=cpu", *args, input=input)


def samples(stdout):
    parts = stdout.split(SEPARATOR + "\n")
    assert parts[-1] == ""
    return [p[:-1] for p in parts[:-1]]  # each sample's text (print adds one newline)


@pytest.fixture
def char_ckpt(char_run):
    """A character-level checkpoint trained a few steps on tiny Shakespeare."""
    return str(char_run)


@pytest.fixture(scope="module")
def split_bpe_ckpt(tmp_path_factory):
    """
    A GPT-2 BPE checkpoint (vocab padded to 50304) that samples almost only SPLIT_TOKENS: ln_f's zero gain makes
    every hidden state all ones, so the logits are the row sums of the (tied) embedding, large for those tokens.
    """
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=32, vocab_size=50304, bias=True))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight.normal_(0.0, 0.01)
        model.lm_head.weight[SPLIT_TOKENS] = 1.5  # logit 12 against about 0
    args = {k: getattr(model.config, k) for k in checkpoint.ARCH_KEYS + ("dropout",)}
    out = tmp_path_factory.mktemp("bpe_ckpt")
    checkpoint.save(dict(model=model.state_dict(), model_args=args, iter_num=0, config={}, meta=GPT2_META), str(out),
                    is_best=True)
    return str(out)


# ----------------------------------------------------------------------------- incremental decoding

def test_text_stream_holds_a_split_character_until_it_is_whole():
    pieces = {0: b"\xe6\x97", 1: b"\xa5", 2: b"a", 3: b"\xf0", 4: b"\x9f\x99", 5: b"\x82", 6: b"\xe6"}
    stream = TextStream(pieces.__getitem__)
    assert [stream.push([i]) for i in (0, 1, 2, 3, 4, 5)] == ["", "日", "a", "", "", "🙂"]
    assert stream.push([6]) == "" and stream.finish() == "\ufffd"  # an unfinished character at the end
    stream = TextStream(pieces.__getitem__)
    assert stream.push([2, 0]) == "a" and stream.push([2]) == "\ufffda"  # a broken character is replaced, as decode does


@pytest.mark.gpt2_bpe
def test_text_stream_on_gpt2_tokens_emits_the_longest_whole_prefix():
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    text = "日本語の文章 🙂 — café, naïve Ω≈ç 👩‍👩‍👧"
    ids = enc.encode(text)
    token_bytes = [enc.decode_single_token_bytes(i) for i in ids]
    broken = []
    for b in token_bytes:
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            broken.append(b)
    assert len(broken) >= 6  # the premise: many tokens are parts of characters

    stream, out, so_far = TextStream(enc.decode_single_token_bytes), "", b""
    for i, b in zip(ids, token_bytes):
        piece = stream.push([i])
        so_far += b
        assert "\ufffd" not in piece
        out += piece
        whole = max(k for k in range(len(so_far) + 1) if _decodes(so_far[:k]))
        assert out == so_far[:whole].decode("utf-8")  # everything complete is out, nothing more
    assert out + stream.finish() == text == enc.decode(ids)


def _decodes(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_text_stream_equals_one_shot_decode_on_any_bytes():
    """Random bytes (valid, truncated and invalid UTF-8), split into random tokens: streamed == decoded at once."""
    rng = random.Random(0)
    alphabet = "aé日🙂\n".encode("utf-8") + bytes([0x80, 0xbf, 0xc0, 0xe0, 0xed, 0xf0, 0xf4, 0xf5, 0xff])
    for _ in range(2000):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        cuts = sorted(rng.sample(range(len(data) + 1), rng.randrange(0, len(data) + 2)))
        tokens = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        stream = TextStream(tokens.__getitem__)
        streamed = "".join(stream.push([i]) for i in range(len(tokens))) + stream.finish()
        assert streamed == data.decode("utf-8", errors="replace"), (data, tokens)


def test_generate_tokens_yields_what_generate_returns():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=50)).eval()
    prompt = torch.randint(0, 50, (2, 3))
    for kwargs in (dict(temperature=0), dict(temperature=1.0, top_k=5), dict(temperature=0.8, vocab_limit=40)):
        torch.manual_seed(1)
        full = model.generate(prompt, 12, **kwargs)  # runs past block_size=8: the cache, then cropped windows
        torch.manual_seed(1)
        steps = list(model.generate_tokens(prompt, 12, **kwargs))
        assert all(t.shape == (2, 1) for t in steps)
        assert torch.equal(torch.cat([prompt, *steps], dim=1), full)
    greedy = model.generate(prompt[:1], 10, temperature=0)
    stop = greedy[0, 6].item()
    steps = list(model.generate_tokens(prompt[:1], 10, temperature=0, stop_token=stop))
    assert torch.cat(steps, dim=1)[0].tolist() == greedy[0, 3:3 + len(steps)].tolist() and steps[-1].item() == stop


# ----------------------------------------------------------------------------- sample.py --stream=True

def test_stream_equals_printed_samples_char_model(char_ckpt):
    args = [f"--out_dir={char_ckpt}", "--num_samples=3", "--max_new_tokens=80", "--start=ROMEO:", "--seed=7"]
    printed = sample(*args).stdout
    streamed = sample(*args, "--stream=True").stdout
    assert streamed == printed
    assert len(samples(printed)) == 3 and all(s.startswith("ROMEO:") for s in samples(printed))
    assert sample(*args, "--stream=True", "--seed=8").stdout != streamed


@pytest.mark.gpt2_bpe
def test_stream_equals_printed_samples_with_split_bpe_characters(split_bpe_ckpt):
    prompt = "日本語 🙂 café:"
    args = [f"--out_dir={split_bpe_ckpt}", "--num_samples=2", "--max_new_tokens=60", f"--start={prompt}", "--seed=3"]
    printed = sample(*args).stdout
    streamed = sample(*args, "--stream=True").stdout
    assert streamed == printed
    texts = samples(printed)
    assert len(texts) == 2 and all(t.startswith(prompt) for t in texts)
    new = "".join(t[len(prompt):] for t in texts)
    # every sampled token is only part of a character, so each character here was put together across tokens
    whole = [c for c in new if c != "\ufffd"]
    assert len(whole) >= 5 and all(len(c.encode("utf-8")) >= 3 for c in whole) and "日" in whole


# ----------------------------------------------------------------------------- sample.py --interactive=True

def test_interactive_reads_prompts_from_stdin(char_ckpt):
    args = [f"--out_dir={char_ckpt}", "--max_new_tokens=40", "--seed=5"]
    proc = sample(*args, "--interactive=True", input="ROMEO:\nJULIET:\n\nKING:\n")
    texts = samples(proc.stdout)
    assert len(texts) == 2  # the empty line quits: no sample for KING:
    assert texts[0].startswith("ROMEO:") and texts[1].startswith("JULIET:")
    assert len(texts[0]) == len("ROMEO:") + 40 and len(texts[1]) == len("JULIET:") + 40  # one char per token
    assert ">>>" not in proc.stdout + proc.stderr  # no prompt marker when stdin is a pipe
    # the first completion is what a plain run with that prompt and seed prints
    assert samples(sample(*args, "--start=ROMEO:", "--num_samples=1").stdout)[0] == texts[0]


def test_interactive_ends_at_end_of_input_and_skips_a_bad_prompt(char_ckpt):
    proc = sample(f"--out_dir={char_ckpt}", "--max_new_tokens=20", "--interactive=True", "--num_samples=2",
                  "--stream=False", input="日本\nROMEO:")
    texts = samples(proc.stdout)
    assert len(texts) == 2 and all(t.startswith("ROMEO:") for t in texts)  # --num_samples still applies
    assert proc.stderr.strip() == "error: the prompt has characters the model never saw: '日本'"


@pytest.mark.gpt2_bpe
def test_interactive_with_bpe_model(split_bpe_ckpt):
    proc = sample(f"--out_dir={split_bpe_ckpt}", "--max_new_tokens=10", "--interactive=True",
                  input="日本\n<|endoftext|>\n")
    texts = samples(proc.stdout)
    assert len(texts) == 2 and texts[0].startswith("日本") and texts[1].startswith("<|endoftext|>")


# ----------------------------------------------------------------------------- progress bar

def on_a_terminal(*args):
    """sample.py with stderr on a pseudo-terminal (100 columns): (stdout, what the terminal showed)."""
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = popen("sample.py", "--device=cpu", *args, env={"PYTHONUNBUFFERED": ""}, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    shown = bytearray()

    def read():
        try:
            while chunk := os.read(master, 65536):
                shown.extend(chunk)
        except OSError:  # the terminal is closed
            pass

    reader = threading.Thread(target=read)
    reader.start()
    out, _ = proc.communicate(timeout=600)
    reader.join(10)
    os.close(master)
    assert proc.returncode == 0
    return out.decode("utf-8"), shown.decode("utf-8", errors="replace")


def test_progress_bar_on_a_terminal_only(char_ckpt):
    args = [f"--out_dir={char_ckpt}", "--num_samples=2", "--max_new_tokens=30", "--progress_delay=0", "--batch_size=1"]
    out, shown = on_a_terminal(*args)
    assert "sample 1/2" in shown and "sample 2/2" in shown and "/30 [" in shown and "tok/s" in shown
    assert len(samples(out)) == 2  # stdout holds only the samples
    piped = sample(*args)  # stderr is a pipe: no bar, only the speed
    assert re.fullmatch(r"generated 60 tokens in [\d.]+s: [\d,]+ tokens/s \(batches of up to 1\)\n", piped.stderr)
    assert piped.stdout == out
    _, shown = on_a_terminal(*args[:-1])  # both samples in one batch: one bar
    assert "samples 1-2/2" in shown and "sample 1/2" not in shown
    out, shown = on_a_terminal(*args, "--progress=False")
    assert "sample 1/2" not in shown and out == piped.stdout
    out, shown = on_a_terminal(*args, "--stream=True")  # streamed text is its own progress
    assert "sample 1/2" not in shown and out == piped.stdout


@pytest.mark.slow
def test_batched_sampling_gives_the_same_text_as_one_at_a_time(char_ckpt):
    """Each sample draws from its own generator, so batching (or streaming) changes the speed, not the text."""
    args = ["--device=cpu", f"--out_dir={char_ckpt}", "--num_samples=3", "--max_new_tokens=30", "--start=ROMEO:"]
    for temperature in ("0", "0.8"):
        alone = run("sample.py", *args, f"--temperature={temperature}", "--batch_size=1")
        together = run("sample.py", *args, f"--temperature={temperature}", "--batch_size=3")
        streamed = run("sample.py", *args, f"--temperature={temperature}", "--stream=True")
        assert together.stdout == alone.stdout == streamed.stdout and together.stdout.count("---------------") == 3
        assert "tokens/s (batches of up to 3)" in together.stderr and "tokens/s" in alone.stderr
    texts = together.stdout.split("---------------\n")
    assert len(set(texts[:3])) == 3  # sampled, not greedy: the three differ
