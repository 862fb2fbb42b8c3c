"""
HellaSwag accuracy of OpenAI's GPT-2 or of a checkpoint trained on GPT-2 BPE tokens (the method: lib/hellaswag.py).

    python eval_hellaswag.py --init_from=gpt2                      # downloads the validation file once (10,042 examples)
    python eval_hellaswag.py --out_dir=out-shakespeare             # a checkpoint of train.py
    python eval_hellaswag.py --init_from=path/to/hf_gpt2_folder --input=path/to/hellaswag_val.jsonl --limit=1000

Prints acc and acc_norm next to the published reference for GPT-2 124M (about 29-30% acc_norm).
"""

import sys

import torch

from configurator import configure
from lib import checkpoint, hellaswag
from lib.runtime import UserError, install_error_hook, setup

# ----------------------------------------------------------------------------- settings
init_from = "resume"  # 'resume' (a checkpoint in out_dir), 'gpt2'..'gpt2-xl', or a local HF GPT-2 folder
out_dir = "out"
ckpt = "best"  # with init_from='resume': 'best' (best.pt, else ckpt.pt), 'latest' (ckpt.pt), or a file in out_dir
input = ""  # a local hellaswag_val.jsonl; empty: data/hellaswag/hellaswag_val.jsonl, downloaded the first time
limit = 0  # score only the first `limit` examples (0: all)
progress = True  # a progress bar on stderr (when it is a terminal)
device = "auto"
dtype = "auto"
# -----------------------------------------------------------------------------


def main():
    install_error_hook()
    configure(globals(), sys.argv[1:])
    if limit < 0:
        raise UserError(f"--limit={limit}: give a number of examples, or 0 for all")
    rt = setup(device, dtype)
    path = input or hellaswag.download()
    examples = hellaswag.load_examples(path, limit)

    model, meta = checkpoint.load_for_inference(init_from, out_dir, ckpt)
    name = f"the checkpoint in {out_dir}" if init_from == "resume" else init_from
    if "stoi" in meta:
        raise UserError(f"{name} is a character-level model: HellaSwag needs a GPT-2 BPE model (--init_from=gpt2, "
                        f"or a checkpoint trained on GPT-2 tokens, e.g. data/shakespeare)")
    import tiktoken

    enc = tiktoken.get_encoding(meta.get("tokenizer", "gpt2"))
    if model.config.vocab_size < enc.n_vocab:
        raise UserError(f"{name} has a vocabulary of {model.config.vocab_size} tokens, fewer than GPT-2 BPE's "
                        f"{enc.n_vocab}: it was not trained on GPT-2 tokens")
    model.to(rt.device)
    print(f"hellaswag: {len(examples):,} examples from {path}")
    print(f"model: {out_dir if init_from == 'resume' else init_from}, {model.get_num_params() / 1e6:.2f}M parameters, "
          f"{rt.device} {rt.dtype}")
    result = hellaswag.evaluate(model, examples, enc.encode_ordinary, rt.device, rt.autocast, progress=progress)
    n = result.n
    print(f"hellaswag acc {result.acc:.2%} ({round(result.acc * n)}/{n}), "
          f"acc_norm {result.acc_norm:.2%} ({round(result.acc_norm * n)}/{n})")
    subset = f"; this run scored {n:,} of them" if n != hellaswag.VAL_EXAMPLES else ""
    print(f"reference: {hellaswag.REFERENCE}{subset}; chance is 25%")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
