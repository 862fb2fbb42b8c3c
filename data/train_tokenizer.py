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
import os
import time

EOT = "<|endoftext|>"


def corpus_files(paths):
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise SystemExit(f"error: {path} not found")
    if not files:
        raise SystemExit(f"error: no .txt files in {', '.join(paths)}")
    return files


def train_tokenizer(files, vocab_size, min_frequency=2):
    """A byte-level BPE tokenizers.Tokenizer trained on the files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split, on bytes
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    return tok


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help=".txt files or folders of them")
    p.add_argument("--vocab_size", type=int, default=4096, help="tokens in all: 256 bytes + merges + <|endoftext|>")
    p.add_argument("--min_frequency", type=int, default=2, help="a merge must occur at least this often")
    p.add_argument("--out", required=True, help="the tokenizer.json to write (beside the data it will tokenize)")
    args = p.parse_args()
    if args.vocab_size < 257:
        raise SystemExit("error: --vocab_size must be at least 257 (256 bytes and <|endoftext|>)")
    files = corpus_files(args.paths)
    t0 = time.time()
    tok = train_tokenizer(files, args.vocab_size, args.min_frequency)
    seconds = time.time() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tok.save(args.out)
    print(f"trained a byte-level BPE of {tok.get_vocab_size():,} tokens on {len(files)} file(s) in {seconds:.1f}s; "
          f"wrote {args.out}")
    text = "".join(open(f, encoding="utf-8").read() for f in files)
    n_bytes = len(text.encode("utf-8"))
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text, "byte-level BPE must round-trip"
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
    main()
