"""
Decoding speed: tokens/s of model.generate_tokens (eager), of lib/decode.Decoder (its step compiled; timed after
the compile, which is reported apart) and of transformers' generate on the same weights exported by export.py,
greedy, from the same prompt; and whether all of them produce the same tokens.

    python bench/decode.py                                   # every model below, batch 1 and 16, on this machine
    python bench/decode.py --models=gpt2 --batch_sizes=1 --device=cuda
    python bench/decode.py --models=char --ckpt_dir=out-shakespeare-char   # the trained CPU preset

Models (random weights, offline, unless ckpt_dir holds a checkpoint for 'char'):
    char       the CPU preset's model (config/train_shakespeare_char_cpu.py: the modern recipe, 4 x 128, block 64, 65
               characters). export.py writes GPT-2 only, so transformers has no twin of it: see char-gpt2.
    char-gpt2  the same shape with the GPT-2 recipe (--recipe=gpt2), which export.py writes.
    gpt2       GPT-2 124M's shape (12 x 768, block 1024, vocab 50304).

One line per model and batch size, a markdown table; the last column says whether the three agree token for token
(at an exact tie two implementations may pick different tokens: compare in float32).
"""

import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from configurator import configure  # noqa: E402
from lib import checkpoint  # noqa: E402
from lib.decode import Decoder  # noqa: E402
from lib.runtime import UserError, install_error_hook, setup, synchronize, why_not_compile  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# ----------------------------------------------------------------------------- settings
models = "char,char-gpt2,gpt2"  # which models, comma-separated (see above)
ckpt_dir = ""  # a checkpoint folder for 'char' (e.g. out-shakespeare-char); '': random weights
batch_sizes = "1,16"  # comma-separated
prompt_tokens = 8  # the prompt's length (random tokens, the same row repeated over the batch)
new_tokens = 0  # tokens generated per row; 0: the model's block_size - prompt_tokens (transformers cannot go past it)
max_new_tokens = 200  # at most this many, whatever block_size
rounds = 3  # timed runs of each; the fastest counts
compare_hf = True  # time transformers' generate too (needs transformers)
compile = True  # time the compiled Decoder too
device = "auto"
dtype = "float32"  # float32: the three can be compared token for token
clock = "wall"  # 'wall', or 'cpu': this process's CPU time (a CPU shared with other work; set OMP_NUM_THREADS=1)
seed = 1337
# -----------------------------------------------------------------------------
MODELS = {
    "char": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, rotary=True, rmsnorm=True, relu2=True,
                 zero_init=True, tie_head=False, logit_softcap=15.0, bias=False),
    "char-gpt2": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
}


def build(name):
    if name == "char" and ckpt_dir:
        model, _ = checkpoint.load_for_inference("resume", ckpt_dir, "best")
        return model, f"char ({ckpt_dir})"
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**MODELS[name]))
    if MODELS[name].get("zero_init"):  # zero output projections would make every block the identity
        for block in model.transformer.h:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.02)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.02)
    return model, name


def exported(model, folder):
    """model as transformers' GPT2LMHeadModel, through export.py (a checkpoint, then the command a user runs)."""
    from transformers import GPT2LMHeadModel

    args = {k: getattr(model.config, k) for k in checkpoint.ARCH_KEYS + ("dropout",)}
    meta = {"vocab_size": model.config.vocab_size, "tokenizer": "none (random weights)"}
    checkpoint.save(dict(model=model.state_dict(), model_args=args, iter_num=0, config={}, meta=meta), folder,
                    is_best=True)
    subprocess.run([sys.executable, os.path.join(REPO, "export.py"), f"--out_dir={folder}",
                    f"--hf_dir={folder}/hf"], check=True, capture_output=True, cwd=REPO)
    return GPT2LMHeadModel.from_pretrained(f"{folder}/hf").eval()


def timed(fn, runs=None):
    """(tokens (B, n), the fastest of `rounds` runs in seconds)."""
    best, out = float("inf"), None
    timer = time.process_time if clock == "cpu" else time.perf_counter
    for _ in range(runs or rounds):
        synchronize(rt.device)
        t0 = timer()
        out = fn()
        synchronize(rt.device)
        best = min(best, timer() - t0)
    return out, best


def main():
    global rt
    install_error_hook()
    configure(globals(), sys.argv[1:])
    rt = setup(device, dtype)
    compiled = compile and why_not_compile(rt.device_type) is None
    print(f"| model | batch | new tokens | model.generate_tokens | Decoder, compiled (compile s) | transformers | "
          f"same tokens |\n|---|---|---|---|---|---|---|", flush=True)
    for name in models.split(","):
        model, label = build(name)
        model.to(rt.device).eval()
        hf = None
        if compare_hf and name != "char":
            with tempfile.TemporaryDirectory() as folder:
                hf = exported(model, folder).to(rt.device)
        decoder = Decoder(model, compile=True) if compiled else None
        T = prompt_tokens
        n = min(new_tokens or model.config.block_size - T, max_new_tokens)
        for B in (int(b) for b in batch_sizes.split(",")):
            torch.manual_seed(seed)
            prompt = torch.randint(model.config.vocab_size, (1, T), device=rt.device).expand(B, T).contiguous()
            cells, outs = [], []
            with torch.no_grad(), rt.autocast:
                out, s = timed(lambda: torch.cat(list(model.generate_tokens(prompt, n, temperature=0)), dim=1))
                outs.append(out)
                cells.append(f"{B * n / s:,.0f} tok/s")
                if decoder is not None:
                    _, first = timed(lambda: list(decoder.generate_tokens(prompt, n, temperature=0)), 1)
                    out, s = timed(lambda: torch.cat(list(decoder.generate_tokens(prompt, n, temperature=0)), dim=1))
                    outs.append(out)
                    cells.append(f"{B * n / s:,.0f} tok/s ({first - s:.1f})")
                else:
                    cells.append(f"n/a ({why_not_compile(rt.device_type) or 'compile=False'})")
                if hf is not None:
                    out, s = timed(lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                       max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                       pad_token_id=0)[:, T:])
                    outs.append(out)
                    cells.append(f"{B * n / s:,.0f} tok/s")
                else:
                    cells.append("n/a (export.py writes GPT-2 only)" if name == "char" else "n/a")
            same = all(torch.equal(outs[0], o) for o in outs[1:])
            print(f"| {label} | {B} | {n} | {' | '.join(cells)} | {'yes' if same else 'NO'} |", flush=True)
    print(f"\n{rt.device} {rt.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads; greedy; "
          f"tokens/s = batch x new tokens / {'CPU ' if clock == 'cpu' else ''}seconds, the fastest of {rounds} runs")


if __name__ == "__main__":
    main()
