"""
Sample from a trained model, or from OpenAI's GPT-2.

    python sample.py --out_dir=out-shakespeare-char
    python sample.py --init_from=gpt2 --start="What is the answer to life?" --num_samples=3 --max_new_tokens=100
    python sample.py --init_from=path/to/hf_gpt2_folder --start=FILE:prompt.txt
"""

import os
import sys

import torch

import checkpoint
from batches import checkpoint_meta
from configurator import configure
from runtime import UserError, install_error_hook, setup

# ----------------------------------------------------------------------------- settings
init_from = "resume"  # 'resume' (a checkpoint in out_dir), 'gpt2'..'gpt2-xl', or a local HF GPT-2 folder
out_dir = "out"
ckpt = "best"  # with init_from='resume': 'best' (best.pt, else ckpt.pt), 'latest' (ckpt.pt), or a file in out_dir
start = "\n"  # the prompt: text, "<|endoftext|>" (GPT-2 BPE), or "FILE:path" to read it from a file
num_samples = 10
max_new_tokens = 500
temperature = 0.8  # 1.0 as trained, lower is more conservative, 0 is greedy
top_k = 200  # sample only among the top_k likeliest tokens (0: all)
stop_at_eot = False  # end a sample at <|endoftext|> (GPT-2 BPE)
seed = 1337
device = "auto"
dtype = "auto"
# -----------------------------------------------------------------------------
install_error_hook()
configure(globals(), sys.argv[1:])
rt = setup(device, dtype)
device = rt.device
torch.manual_seed(seed)

# the model, and the vocabulary it was trained with
if init_from == "resume":
    names = {"best": [checkpoint.BEST, checkpoint.LATEST], "latest": [checkpoint.LATEST]}.get(ckpt, [ckpt])
    paths = [os.path.join(out_dir, name) for name in names]
    path = next((p for p in paths if os.path.exists(p)), paths[-1])
    state = checkpoint.load(path)
    model = checkpoint.model_from_checkpoint(state, dropout=0.0)
    meta = checkpoint_meta(state)
    state = None
else:
    model = checkpoint.load_pretrained(init_from)
    meta = {}
model.eval()
model.to(device)

vocab_size = model.config.vocab_size
if "stoi" in meta:  # a character-level dataset
    stoi, itos = meta["stoi"], meta["itos"]
    if len(itos) > vocab_size:
        raise UserError(f"the dataset's vocabulary has {len(itos)} characters but the model only {vocab_size} tokens")

    def encode(s):
        unknown = sorted(set(s) - set(stoi))
        if unknown:
            raise UserError(f"the prompt has characters the model never saw: {''.join(unknown)!r}")
        return [stoi[c] for c in s]

    def decode(ids):
        return "".join(itos[i] for i in ids)

    eot, valid_vocab = None, len(itos)
else:  # GPT-2 BPE
    import tiktoken

    enc = tiktoken.get_encoding(meta.get("tokenizer", "gpt2"))
    encode = lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})  # noqa: E731
    decode = enc.decode
    eot, valid_vocab = enc.eot_token, min(enc.n_vocab, vocab_size)  # ids past n_vocab are padding, never sampled

if start.startswith("FILE:"):
    try:
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        why = f"not UTF-8 text ({e.reason})" if isinstance(e, UnicodeDecodeError) else e.strerror
        raise UserError(f"--start=FILE:{start[5:]}: cannot read the prompt file ({why})") from None
start_ids = encode(start)
if not start_ids:
    raise UserError("the prompt is empty: pass --start=TEXT (e.g. --start='\\n' or --start='<|endoftext|>')")
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]  # (1, T)

with torch.no_grad(), rt.autocast:
    for _ in range(num_samples):
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None, vocab_limit=valid_vocab,
                           stop_token=eot if stop_at_eot else None)
        new = y[0, len(start_ids):].tolist()
        if stop_at_eot and eot in new:
            new = new[:new.index(eot)]
        print(decode(start_ids + new))
        print("---------------")
