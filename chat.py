"""
Talk to a chat model (one finetuned on chat data: docs/chat.md), in the terminal.

    python chat.py --out_dir=out-chat-tasks                            # a conversation: type, Enter, read the reply
    python chat.py --out_dir=out-sft --system="You are a pirate."      # with a system message
    python chat.py --out_dir=out-chat-tasks --prompt="spell honour"   # one reply, then exit (for scripts)
    printf 'hi\nand then?\n' | python chat.py --out_dir=out-sft        # messages from a pipe, one per line

In a conversation: /reset starts over, /system TEXT sets the system message (and starts over), /quit or Ctrl-D
ends; Ctrl-C stops the reply being written. Replies stream as they are sampled; each is followed (on stderr) by its
token count and speed. The model's KV cache is kept from turn to turn, so a turn runs only its own new tokens through
the model; when the conversation outgrows the model's context, the oldest turns are dropped, and a note says so.
"""

import contextlib
import sys
import time

import torch

from configurator import configure
from lib import checkpoint
from lib.chat import Chat, ChatTokenizer
from lib.runtime import UserError, for_decoding, install_error_hook, setup
from sample import TextStream

# ----------------------------------------------------------------------------- settings
init_from = "resume"  # 'resume': a checkpoint in out_dir
out_dir = "out"
ckpt = "best"  # 'best' (best.pt, else ckpt.pt), 'latest' (ckpt.pt), or a file in out_dir
prompt = ""  # answer this one message, print the reply and exit
system = ""  # the system message the conversation starts with ('': none)
max_new_tokens = 256  # the longest reply
temperature = 0.7  # 0 is greedy (the same reply every time)
top_k = 50  # sample among the top_k likeliest tokens (0: all)
seed = 1337
device = "auto"
dtype = "auto"  # as train.py's, but a CPU decodes models under 512 wide in float32 (runtime.for_decoding)
# -----------------------------------------------------------------------------
HELP = "type a message and press Enter; /reset starts over, /system TEXT sets the system message, /quit or Ctrl-D ends"


def reply(conversation, text, rt, out=sys.stdout):
    """Write the reply to text as it is sampled; returns (tokens, seconds). Ctrl-C stops it (KeyboardInterrupt is
    re-raised after the turn is closed, for the caller to decide)."""
    stream, tokens, t0 = TextStream(conversation.tok.bytes_of), 0, time.time()
    generator = torch.Generator(rt.device).manual_seed(seed)
    with rt.autocast:
        turn = conversation.ask(text, max_new_tokens, temperature, top_k or None, generator)
        try:
            with contextlib.closing(turn):  # closing: the turn ends with <|end|> however the loop ends
                for t in turn:
                    tokens += 1
                    out.write(stream.push([t]))
                    out.flush()
        finally:
            out.write(stream.finish() + "\n")
            out.flush()
    return tokens, time.time() - t0


def speed(tokens, seconds, conversation):
    n = conversation.dropped
    dropped = f"; the conversation outgrew the {conversation.block_size}-token context: dropped its oldest " \
              f"{'exchange' if n == 1 else f'{n} exchanges'}" if n else ""
    return f"[{tokens} tokens in {seconds:.2f}s: {tokens / max(seconds, 1e-9):,.1f} tokens/s{dropped}]"


def talk(conversation, rt):
    tty = sys.stdin.isatty()
    if tty:
        print(HELP, file=sys.stderr)
    while True:
        try:
            if tty:
                line = input("> ") if sys.stdout.isatty() else (print("> ", end="", file=sys.stderr, flush=True)
                                                                or input())
            else:
                line = sys.stdin.readline()
                if not line:
                    break
                line = line.rstrip("\r\n")
        except (EOFError, KeyboardInterrupt):
            if tty:
                print(file=sys.stderr)
            break
        if not line.strip():
            continue
        if line.strip() in ("/quit", "/exit"):
            break
        if line.strip() == "/reset":
            conversation.reset()
            print("(a new conversation)", file=sys.stderr)
            continue
        if line.startswith("/system"):
            text = line[len("/system"):].strip()
            try:
                conversation.reset(system=text)
            except UserError as e:  # characters the model never saw
                print(f"error: {e}", file=sys.stderr, flush=True)
                continue
            print(f"(a new conversation, {'with that system message' if text else 'without a system message'})",
                  file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}: {HELP}", file=sys.stderr)
            continue
        try:
            tokens, seconds = reply(conversation, line, rt)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the conversation
            print("(stopped)", file=sys.stderr, flush=True)
            continue
        except UserError as e:  # a message the model cannot read, or too long for its context
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        print(speed(tokens, seconds, conversation), file=sys.stderr, flush=True)


def main():
    install_error_hook()
    configure(globals(), sys.argv[1:])
    rt = setup(device, dtype)
    torch.manual_seed(seed)
    model, meta = checkpoint.load_for_inference(init_from, out_dir, ckpt)
    tok = ChatTokenizer(meta)
    model.to(rt.device)
    rt = for_decoding(rt, dtype, model.config.n_embd)
    conversation = Chat(model, tok, system)
    if prompt:
        tokens, seconds = reply(conversation, prompt, rt)
        print(speed(tokens, seconds, conversation), file=sys.stderr)
        return
    talk(conversation, rt)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside a reply: stop quietly
        print(file=sys.stderr)
        sys.exit(130)
