"""
Your own corpus, for train.py: text files, JSON lines or parquet files, or folders of them, in GPT-2 BPE tokens
(to train from scratch or finetune GPT-2), as characters (a small vocabulary, for a small model), or in your own
tokenizer (a tokenizer.json from data/train_tokenizer.py).

    python data/text/prepare.py books/ --out=data/books                # every .txt file in books/ is a document
    python train.py --dataset=books ...                                # then train on it
    python data/text/prepare.py corpus.txt --split_by=line --out=data/lines   # or: one document per line
    python data/text/prepare.py corpus.txt --split_by=paragraph --tokenizer=char --out=data/corpus_char
    python data/text/prepare.py docs.jsonl --text_field=content --out=data/docs  # .jsonl/.parquet: one row each
    python data/train_tokenizer.py books/ --vocab_size=8192 --out=data/books_bpe/tokenizer.json   # your own BPE,
    python data/text/prepare.py books/ --tokenizer=data/books_bpe/tokenizer.json --out=data/books_bpe  # then its ids

--split_by (.txt files): file (one document per file), paragraph (split at blank lines) or line. --text_field
(.jsonl, .json, .parquet): the column holding the text. --tokenizer: gpt2 (each document's encode_ordinary ids
then the end-of-text token 50256), char (each document's characters then a newline), or a tokenizer.json (its ids, then
its <|endoftext|>). A fixed-seed sample of
the documents (--val_fraction, default 1%, --seed) becomes val.bin. See lib/corpus.py for the rest.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo, for lib/
from lib.corpus import main  # noqa: E402

if __name__ == "__main__":  # tokenizing processes may import this file: run only when it is the script
    main(__doc__, HERE, paths_positional=True, val_fraction=0.01)
