"""
Train your own byte-level BPE tokenizer (GPT-2's kind: any text round-trips exactly) with Hugging Face `tokenizers`,
then prepare data in it and train on it:

    python data/train_tokenizer.py input.txt --vocab_size=2048 --out=data/shakespeare_bpe/tokenizer.json
    python data/text/prepare.py input.txt --split_by=paragraph --tokenizer=data/shakespeare_bpe/tokenizer.json \
        --out=data/shakespeare_bpe
    python train.py --dataset=shakespeare_bpe ...

The corpus: .txt files, or folders of them. The vocabulary holds the 256 byte symbols, the merges learned from the
corpus, and one special token, <|endoftext|>, which prepare.py puts after every document. It prints the training
time and the compression it reaches on the corpus (UTF-8 bytes per token), next to GPT-2's when tiktoken has it.
meta.json then names the tokenizer 'hf:<sha256 of tokenizer.json, 16 hex digits>' and embeds the file, so every
checkpoint carries the tokenizer it was trained with (sample.py, bits per byte, export.py all read it there).
"""

import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, for lib/
from configurator import ArgumentParser, at_least  # noqa: E402
from lib import files  # noqa: E402
from lib.dataset import add_overwrite  # noqa: E402
from lib.errors import UserError  # noqa: E402

EOT = "<|endoftext|>"


def corpus_files(paths):
    found = []
    for path in paths:
        if os.path.isdir(path):
            found += sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True))
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise UserError(f"{path} not found")
    if not found:
        raise UserError(f"no .txt files in {', '.join(paths)}")
    return found


def read_corpus(paths):
    """The corpus as one str, or one line saying why it cannot be read or is empty."""
    texts = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise UserError(f"cannot read {path} ({e.strerror})") from None
    if not any(texts):
        raise UserError(f"the corpus ({', '.join(paths)}) is empty: a tokenizer learns its merges from text")
    return "".join(texts)


def train_tokenizer(corpus, vocab_size, min_frequency=2):
    """A byte-level BPE tokenizers.Tokenizer trained on corpus: a list of files, or an iterator of texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split, on bytes
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    if isinstance(corpus, list):
        tok.train(corpus, trainer)
    else:
        tok.train_from_iterator(corpus, trainer)
    tok.encode_special_tokens = True  # a literal "<|endoftext|>" in a text is text (lib/tokenizer.py does the same)
    return tok


def _kind(text):
    """A tokenizer.json's settings: everything but the vocabulary and merges it learned."""
    tokenizer = json.loads(text)
    return {**tokenizer, "model": {k: v for k, v in tokenizer["model"].items() if k not in ("vocab", "merges")}}


def written_here(path):
    """Whether the file at path is a tokenizer this script wrote: a tokenizer.json whose settings (model, pre-
    tokenizer, decoder, special tokens) are exactly those train_tokenizer gives, whatever it learned."""
    try:
        with open(path, encoding="utf-8") as f:
            return _kind(f.read()) == _kind(train_tokenizer(iter([""]), 257).to_str())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def main():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help=".txt files or folders of them")
    p.add_argument("--vocab_size", type=int, default=4096, help="tokens in all: 256 bytes + merges + <|endoftext|>",
                   rule=at_least(257, " (256 bytes and <|endoftext|>)"))
    p.add_argument("--min_frequency", type=int, default=2, help="a merge must occur at least this often",
                   rule=at_least(1))
    p.add_argument("--out", required=True, help="the tokenizer.json to write (beside the data it will tokenize)")
    add_overwrite(p)
    args = p.parse_args()
    files.check_file(args.out)
    folder = os.path.dirname(os.path.abspath(args.out))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise files.failed(e, args.out, "tokenizer") from None
    held = files.lock(folder, "tokenizer training", "--out")  # noqa: F841 (held until this process ends)
    files.guard([args.out], args.overwrite, "--out", args.out, ours=written_here,
                holds=lambda paths: "is a file that this script did not write (not a tokenizer of its kind)",
                when="once the new one is trained")
    corpus = corpus_files(args.paths)
    text = read_corpus(corpus)
    t0 = time.time()
    tok = train_tokenizer(corpus, args.vocab_size, args.min_frequency)
    seconds = time.time() - t0
    files.write_atomic(args.out, lambda f: f.write(tok.to_str(pretty=True)), text=True, kind="tokenizer")
    print(f"trained a byte-level BPE of {tok.get_vocab_size():,} tokens on {len(corpus)} file(s) in {seconds:.1f}s; "
          f"wrote {args.out}")
    n_bytes = len(text.encode("utf-8"))
    ids = tok.encode(text).ids  # special tokens' spellings as text: every byte of the corpus is in these ids
    if tok.decode(ids, skip_special_tokens=False) != text:
        raise UserError("the trained tokenizer does not give the corpus back from its ids, which a byte-level BPE "
                        "always does: please report this, with the corpus")
    line = f"compression on the corpus: {n_bytes / len(ids):.2f} bytes per token ({len(ids):,} tokens)"
    try:
        import tiktoken

        gpt2 = len(tiktoken.get_encoding("gpt2").encode_ordinary(text))
        line += f"; GPT-2's 50,257-token BPE: {n_bytes / gpt2:.2f} bytes per token ({gpt2:,} tokens)"
    except Exception:
        pass
    print(line)
    print(f"next: python data/text/prepare.py {' '.join(args.paths)} --split_by=paragraph --tokenizer={args.out} "
          f"--out={os.path.dirname(args.out) or '.'}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # one line, no traceback
        raise SystemExit(f"error: {e}") from None
