"""
Synthetic conversations with exact answers, for a chat finetuning demo that runs offline on a CPU (docs/chat.md):

    python data/chat/synthetic.py --out=data/chat_tasks      # train.jsonl and test.jsonl of four tasks
    python data/chat/prepare.py --data_files=data/chat_tasks/train.jsonl --tokenizer=data/shakespeare_char \
        --block_size=64 --out=data/chat_tasks
    python eval_chat.py --out_dir=out-chat-tasks --tests=data/chat_tasks/test.jsonl     # held-out accuracy

The tasks, in the spirit of nanochat's SpellingBee, written in tiny Shakespeare's characters (letters, spaces and a
little punctuation: no digits but 3), so a model pretrained there can read them:

    spell    "spell honour"                                    -> "h-o-n-o-u-r"
    reverse  "spell honour backwards"                          -> "ruonoh"
    count    "how many times does the letter o appear in honour?" -> "two"
    add      "what is seven plus five?"                        -> "twelve"

The words are the lowercase words of 3 to 8 letters (--letters) of a text (tiny Shakespeare by default), split at
random into training words and held-out words; test.jsonl asks only about held-out words (and held-out pairs of
numbers), so its accuracy measures what the model learned to do, not what it memorized. Some training conversations
(--two_turns: a quarter are paired, when short enough) ask two questions, so that the model also answers in a
conversation that has earlier turns. Every row has a "task" field (of its last question) for eval_chat.py's per-task
accuracy. The same --seed gives the same files.
"""

import json
import os
import random
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)  # the repo, for lib/
from configurator import RULES, ArgumentParser, Rule, at_least, between  # noqa: E402
from lib import files  # noqa: E402
from lib.dataset import add_overwrite  # noqa: E402

NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
           "seventeen eighteen nineteen twenty").split()
TASKS = ("spell", "reverse", "count", "add")
MAX_TERM = 10  # add: both terms in 0..10, so every sum has a word


def conversation(task, question, answer):
    return {"task": task, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def spell(word, rng):
    return conversation("spell", f"spell {word}", "-".join(word))


def reverse(word, rng):
    return conversation("reverse", f"spell {word} backwards", word[::-1])


def count(word, rng):
    # half the time a letter of the word, else any letter: answers from zero up
    letter = rng.choice(word) if rng.random() < 0.5 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    return conversation("count", f"how many times does the letter {letter} appear in {word}?",
                        NUMBERS[word.count(letter)])


def add(pair, rng):
    a, b = pair
    return conversation("add", f"what is {NUMBERS[a]} plus {NUMBERS[b]}?", NUMBERS[a + b])


def join_some(rows, share, max_chars, rng):
    """The rows, with about share of them joined in pairs of two questions and answers (when short enough)."""
    out, waiting = [], None
    for row in rows:
        if rng.random() >= share:
            out.append(row)
        elif waiting is None:
            waiting = row
        elif sum(len(m["content"]) for m in waiting["messages"] + row["messages"]) <= max_chars:
            out.append({"task": row["task"], "messages": waiting["messages"] + row["messages"]})
            waiting = None
        else:  # too long together: the first goes alone, the second waits for a partner
            out.append(waiting)
            waiting = row
    return out + ([waiting] if waiting else [])


def written_here(path):
    """Whether path is a file this script wrote: JSON lines whose first is a conversation of one of its tasks."""
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline())
        return first.get("task") in TASKS and isinstance(first.get("messages"), list)
    except (OSError, ValueError, AttributeError):
        return False


def default_text():
    for path in (os.environ.get("TINY_SHAKESPEARE"), os.path.join(REPO, "data", "shakespeare_char", "input.txt")):
        if path and os.path.isfile(path):
            return path
    sys.exit("error: no text for the words: pass --words_from=path/to/input.txt (e.g. tiny Shakespeare)")


def main():
    def lengths(text):  # --letters: "3-8", the shortest and longest word length
        shortest, _, longest = text.partition("-")
        return shortest.isdigit() and longest.isdigit() and 0 < int(shortest) <= int(longest)

    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "data", "chat_tasks"), help="folder for train/test.jsonl")
    p.add_argument("--words_from", help="a text whose words to use (default: tiny Shakespeare)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"some of {','.join(TASKS)}",
                   rule=Rule(lambda v: set(v.split(",")) <= set(TASKS), f"comma-separated, among {','.join(TASKS)}",
                             "bogus"))
    p.add_argument("--train", type=int, default=20000, help="training conversations per task", rule=at_least(1))
    p.add_argument("--test", type=int, default=200, help="held-out conversations per task", rule=at_least(0))
    p.add_argument("--held_out", type=float, default=0.2, help="share of the words (and sums) kept for testing",
                   rule=Rule(lambda v: 0 < v < 1, "in (0, 1): both splits need words", 1.0))
    p.add_argument("--letters", default="3-8", help="the words' lengths, e.g. 3-5 for an easier task",
                   rule=Rule(lengths, "the shortest and longest word length, e.g. 3-8", "8-3"))
    p.add_argument("--two_turns", type=float, default=0.25, help="share of training conversations that ask two "
                   "questions (when both fit in --max_chars), so that a model also answers after earlier turns",
                   rule=between(0, 1))
    p.add_argument("--max_chars", type=int, default=56, help="the longest two-question conversation, in characters "
                   "of its messages (a block_size of 64 holds 56 characters and the 8 chat tokens of 4 messages)",
                   rule=at_least(1))
    p.add_argument("--seed", type=int, default=1337, rule=RULES["seed"])
    add_overwrite(p)
    args = p.parse_args()
    tasks = args.tasks.split(",")
    shortest, _, longest = args.letters.partition("-")
    path = args.words_from or default_text()
    with open(path, encoding="utf-8") as f:
        words = sorted(set(re.findall(rf"\b[a-z]{{{shortest},{longest}}}\b", f.read())))
    if len(words) < 20:
        sys.exit(f"error: {path} has only {len(words)} lowercase words of {args.letters} letters: give a longer text")
    rng = random.Random(args.seed)
    rng.shuffle(words)
    pairs = [(a, b) for a in range(MAX_TERM + 1) for b in range(MAX_TERM + 1)]
    rng.shuffle(pairs)
    cut_words, cut_pairs = int(len(words) * args.held_out), int(len(pairs) * args.held_out)
    pools = {"train": (words[cut_words:], pairs[cut_pairs:]), "test": (words[:cut_words], pairs[:cut_pairs])}
    make = {"spell": spell, "reverse": reverse, "count": count, "add": add}
    outputs = [os.path.join(args.out, f"{split}.jsonl") for split in ("train", "test")]
    try:
        os.makedirs(args.out, exist_ok=True)
        held = files.lock(args.out, "synthetic.py", "--out")  # noqa: F841 (held until the process ends)
        files.guard(outputs, args.overwrite, "--out", args.out, ours=written_here)  # only files it wrote before
    except OSError as e:
        sys.exit(f"error: cannot write to {args.out} ({e.strerror}): pass another --out")
    except files.UserError as e:
        sys.exit(f"error: {e}")
    for split, n in (("train", args.train), ("test", args.test)):
        split_words, split_pairs = pools[split]
        rows = [make[task](rng.choice(split_pairs if task == "add" else split_words), rng)
                for task in tasks for _ in range(n)]
        rng.shuffle(rows)
        if split == "train":  # a share of them joined in pairs: the second question is answered after the first
            rows = join_some(rows, args.two_turns, args.max_chars, rng)
        out = os.path.join(args.out, f"{split}.jsonl")
        try:
            files.write_atomic(out, lambda f: f.writelines(json.dumps(row) + "\n" for row in rows), text=True)
        except files.UserError as e:
            sys.exit(f"error: {e}")
        print(f"wrote {out}: {len(rows):,} conversations ({', '.join(tasks)}) about {len(split_words):,} words "
              f"and {len(split_pairs)} sums")


if __name__ == "__main__":
    main()
