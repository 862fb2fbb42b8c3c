"""
Sample from a trained model, or from OpenAI's GPT-2.

    python sample.py --out_dir=out-shakespeare-char
    python sample.py --init_from=gpt2 --start="What is the answer to life?" --num_samples=3 --max_new_tokens=100
    python sample.py --init_from=path/to/hf_gpt2_folder --start=FILE:prompt.txt
    python sample.py --out_dir=out-shakespeare-char --stream=True     # text as it is generated
    python sample.py --init_from=gpt2 --interactive=True               # type a prompt, get a completion
    printf 'ROMEO:\nJULIET:\n' | python sample.py --interactive=True  # prompts from a pipe, one per line

Each sample is printed with its prompt, then a line of 15 dashes. Streamed or not, the text is the same for the
same seed. Importable: TextStream (incremental decoding) is used by the tests.
"""

import codecs
import sys
import time

import torch
from tqdm import tqdm

from configurator import configure
from lib import checkpoint
from lib.decode import Decoder
from lib.runtime import UserError, for_decoding, install_error_hook, setup, why_not_compile
from lib.tokenizer import load_tokenizer

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
stream = False  # print each sample as it is generated, token by token
interactive = False  # prompts from stdin, one per line, instead of start; an empty line or Ctrl-D quits.
#                      Unless given, num_samples is then 1 and stream True
batch_size = 16  # samples generated together when not streaming (each is the same text as when made alone)
progress = True  # a progress bar on stderr (when it is a terminal) while a sample is generated, not streamed
progress_delay = 1.0  # seconds before the bar appears, so short samples print without one
seed = 1337
device = "auto"
dtype = "auto"  # as train.py's, but a CPU decodes models under 512 wide in float32 (runtime.for_decoding)
compile = False  # compile the one-token step (lib/decode.py): several times the tokens/s of a small model, after a
#                  compile of a few seconds (more on a machine's first run); for long or many samples, and chat
# -----------------------------------------------------------------------------
SEPARATOR = "---------------"


class TextStream:
    """
    Text from token ids as they are generated, never printing a broken character. token_bytes(id) gives a token's
    bytes, and a GPT-2 BPE token may hold only part of a multi-byte UTF-8 character (an emoji, a CJK character):
    push() returns the longest prefix of the bytes so far that is complete text and keeps the rest for the next
    token; finish() returns what is left. Joined, the pieces equal bytes.decode('utf-8', errors='replace') of all
    the bytes at once, which is what tiktoken's decode does, so a streamed sample is identical to a printed one.
    """

    def __init__(self, token_bytes):
        self.token_bytes = token_bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids):
        return self.decoder.decode(b"".join(self.token_bytes(i) for i in ids))

    def finish(self):
        return self.decoder.decode(b"", final=True)


def main():
    global num_samples, stream
    install_error_hook()
    _, explicit = configure(globals(), sys.argv[1:])
    rt = setup(device, dtype)
    torch.manual_seed(seed)

    # the model, and the vocabulary it was trained with
    model, meta = checkpoint.load_for_inference(init_from, out_dir, ckpt)
    model.to(rt.device)
    rt = for_decoding(rt, dtype, model.config.n_embd)
    compiled = compile and why_not_compile(rt.device_type) is None
    if compile and not compiled:
        print(f"note: --compile=True skipped: torch.compile is {why_not_compile(rt.device_type)}", file=sys.stderr)
    generate_tokens = Decoder(model, compile=True).generate_tokens if compiled else model.generate_tokens

    tok = load_tokenizer(meta, vocab_size=model.config.vocab_size)  # the dataset's characters, or GPT-2 BPE
    decode, token_bytes, eot, valid_vocab = tok.decode, tok.bytes_of, tok.eot, tok.valid_vocab

    def encode(prompt):  # a prompt may ask for the token "<|endoftext|>" itself by its spelling
        return tok.encode(prompt, allow_special=True)

    if interactive:  # one completion per prompt, as it is written, unless asked otherwise
        num_samples = num_samples if "num_samples" in explicit else 1
        stream = stream if "stream" in explicit else True

    def generators(first, n):
        """Sample i draws from its own generator, seeded by (seed, i): the same text, batched or streamed."""
        return [torch.Generator(rt.device).manual_seed(seed * 1000003 + i) for i in range(first, first + n)]

    def write_samples(start_ids):
        """num_samples continuations of the prompt, each printed with the prompt and followed by SEPARATOR."""
        x = torch.tensor(start_ids, dtype=torch.long, device=rt.device)[None, ...]  # (1, T)
        options = dict(temperature=temperature, top_k=top_k or None, vocab_limit=valid_vocab,
                       stop_token=eot if stop_at_eot else None)
        t0, generated = time.time(), 0
        for first in range(0, num_samples, 1 if stream else batch_size):
            n = 1 if stream else min(batch_size, num_samples - first)
            tokens = generate_tokens(x.expand(n, -1), max_new_tokens, generators=generators(first, n), **options)
            if stream:
                text = TextStream(token_bytes)
                sys.stdout.write(text.push(start_ids))
                sys.stdout.flush()
                try:
                    for t in tokens:
                        t = t.item()
                        generated += 1
                        if stop_at_eot and t == eot:
                            break
                        sys.stdout.write(text.push([t]))
                        sys.stdout.flush()
                finally:  # also when Ctrl-C stops an interactive sample: end its line
                    print(text.finish())
                print(SEPARATOR, flush=True)
                continue
            desc = f"sample {first + 1}/{num_samples}" if n == 1 else f"samples {first + 1}-{first + n}/{num_samples}"
            bar = tqdm(tokens, total=max_new_tokens, desc=desc, unit="tok", leave=False, file=sys.stderr,
                       delay=progress_delay, disable=None if progress else True)
            steps = [t for t in bar]  # (n, 1) tensors, kept on the device: no sync per token
            rows = torch.cat(steps, dim=1).tolist() if steps else [[] for _ in range(n)]
            for new in rows:
                generated += len(new)
                if stop_at_eot and eot in new:
                    new = new[:new.index(eot)]
                print(decode(start_ids + new))
                print(SEPARATOR, flush=True)
        if not interactive:
            seconds = time.time() - t0
            print(f"generated {generated:,} tokens in {seconds:.2f}s: {generated / seconds:,.0f} tokens/s "
                  f"({'streamed, one sample at a time' if stream else f'batches of up to {batch_size}'}"
                  f"{', compiling included' if compiled else ''})", file=sys.stderr)

    with torch.no_grad(), rt.autocast:
        if interactive:
            prompt_loop(encode, write_samples)
            return
        prompt = start
        if prompt.startswith("FILE:"):
            try:
                with open(prompt[5:], encoding="utf-8") as f:
                    prompt = f.read()
            except (OSError, UnicodeDecodeError) as e:
                why = f"not UTF-8 text ({e.reason})" if isinstance(e, UnicodeDecodeError) else e.strerror
                raise UserError(f"--start=FILE:{prompt[5:]}: cannot read the prompt file ({why})") from None
        start_ids = encode(prompt)
        if not start_ids:
            raise UserError("the prompt is empty: pass --start=TEXT (e.g. --start='\\n' or --start='<|endoftext|>')")
        write_samples(start_ids)


def prompt_loop(encode, write_samples):
    """
    Read prompts from stdin, one per line, and complete each; an empty line or end of input (Ctrl-D) quits.
    On a terminal a '>>> ' marker asks for each prompt (on stderr when stdout is redirected) and Ctrl-C stops the
    sample being written; from a pipe nothing but the samples is printed. A prompt the model cannot read (a
    character it never saw) gets one 'error:' line on stderr and the loop goes on.
    """
    tty = sys.stdin.isatty()
    if tty:
        print("type a prompt and press Enter; an empty line or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            if not tty:
                line = sys.stdin.readline()
                if not line:  # end of input
                    break
                line = line.rstrip("\r\n")
            elif sys.stdout.isatty():
                line = input(">>> ")
            else:
                print(">>> ", end="", file=sys.stderr, flush=True)
                line = input()
        except (EOFError, KeyboardInterrupt):
            if tty:
                print(file=sys.stderr)
            break
        if not line:
            break
        try:
            start_ids = encode(line)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        try:
            write_samples(start_ids)
        except KeyboardInterrupt:  # Ctrl-C stops this prompt's samples, not the prompt loop
            print(SEPARATOR, flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: stop quietly
        print(file=sys.stderr)
        sys.exit(130)
