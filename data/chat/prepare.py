"""
Conversations for chat finetuning (SFT): token ids, a loss mask on the assistant's tokens, and the chat template.

    python data/chat/prepare.py --hub_dataset=HuggingFaceTB/smol-smoltalk --val_split=test    # GPT-2 BPE, 1024
    python data/chat/prepare.py --hub_dataset=HuggingFaceH4/no_robots --val_split=test --out=data/no_robots
    python data/chat/prepare.py --data_files=chats.jsonl --tokenizer=data/shakespeare_char --block_size=64 \
        --out=data/chat_mine                             # in the tokenizer of the model you will finetune
    python data/chat/prepare.py --data_files=chats/ --skip_bad=True --too_long=drop

Each row is a conversation: a line {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
of .jsonl files, or that column of .parquet files or of a hub dataset. --tokenizer: gpt2 (default), char, a
tokenizer.json (data/train_tokenizer.py), or a dataset folder or checkpoint whose tokenizer to use. Conversations
longer than --block_size tokens are cut there (--too_long=truncate, the default) or left out (--too_long=drop), and
counted. A row that is not a conversation stops the prepare with its file and line, unless --skip_bad=True.

Writes train.bin, val.bin, train_mask.bin, val_mask.bin, train_lengths.bin, val_lengths.bin and meta.json into this
folder or --out (lib/chat_data.py has the format); then train.py --dataset=... trains on the assistant's tokens.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo, for lib/
from lib.chat_data import main  # noqa: E402

if __name__ == "__main__":  # tokenizing processes may import this file: run only when it is the script
    main(__doc__.split("\n\n")[0], HERE)
