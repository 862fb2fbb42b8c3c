"""
Exact-match accuracy of a chat model's greedy replies on held-out conversations (e.g. data/chat/synthetic.py's).

    python eval_chat.py --out_dir=out-chat-tasks --tests=data/chat_tasks/test.jsonl
    python eval_chat.py --out_dir=out-shakespeare-char --tests=data/chat_tasks/test.jsonl --dataset=chat_tasks

Each line of --tests is a conversation ({"messages": [...], "task": optional}) whose last message is the assistant's
answer: the model gets the messages before it, replies greedily until <|end|>, and scores 1 when its reply is that
answer exactly (spaces around it aside). A model without a chat template (before SFT) gets the one of --dataset, its
chat tokens' rows starting as SFT starts them (lib/chat.py fit_vocab): the accuracy SFT starts from.
"""

import json
import sys
import time

from configurator import configure
from lib import chat, checkpoint
from lib.batches import dataset_dir, load_meta
from lib.runtime import UserError, install_error_hook, setup

# ----------------------------------------------------------------------------- settings
init_from = "resume"  # 'resume' (a checkpoint in out_dir), or 'gpt2'..'gpt2-xl' / a HF GPT-2 folder with --dataset
out_dir = "out"
ckpt = "best"  # 'best' (best.pt, else ckpt.pt), 'latest' (ckpt.pt), or a file in out_dir
tests = ""  # the .jsonl of conversations to score (required)
dataset = ""  # a chat dataset whose template to use when the model has none (its accuracy before SFT)
max_new_tokens = 64  # the longest reply
batch_size = 64  # prompts of the same length answered together
show = 3  # how many wrong answers to print
device = "auto"
dtype = "auto"
# -----------------------------------------------------------------------------


def read_tests(path, tok):
    """(prompts, answers, tasks, questions) of the conversations in path; a bad line is one error naming it."""
    prompts, answers, tasks, questions = [], [], [], []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise UserError(f"--tests={path}: {e.strerror}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                messages = row["messages"]
                if messages[-1]["role"] != "assistant" or not isinstance(messages[-1]["content"], str):
                    raise chat.BadConversation("the last message is not the assistant's answer")
                prompts.append(tok.prompt(messages[:-1]))
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise UserError(f"{path}, line {n}: not a conversation ending with the assistant's answer "
                                f"({type(e).__name__}: {e})") from None
            answers.append(messages[-1]["content"].strip())
            tasks.append(str(row.get("task", "all")))
            questions.append(messages[-2]["content"] if len(messages) > 1 else "")
    if not prompts:
        raise UserError(f"--tests={path} holds no conversations")
    return prompts, answers, tasks, questions


def main():
    install_error_hook()
    configure(globals(), sys.argv[1:])
    if not tests:
        raise UserError("pass --tests=FILE.jsonl: the conversations to score")
    rt = setup(device, dtype)
    model, meta = checkpoint.load_for_inference(init_from, out_dir, ckpt)
    note = ""
    if not meta.get("chat"):
        if not dataset:
            raise UserError("this model has no chat template (it was not finetuned on chat data): pass "
                            "--dataset=CHAT_DATASET to score it with that data's template, as SFT would start it")
        data_meta = load_meta(dataset_dir(dataset))
        if not data_meta.get("chat") or data_meta.get("stoi") != meta.get("stoi") or \
                data_meta["tokenizer"] != meta.get("tokenizer", "gpt2"):
            raise UserError(f"--dataset={dataset} is not chat data in this model's tokenizer")
        chat.fit_vocab(model, data_meta, meta, say=lambda line: None)
        meta, note = data_meta, f" (no chat template of its own: {dataset}'s, its tokens' rows at the mean)"
    tok = chat.ChatTokenizer(meta)
    prompts, answers, tasks, questions = read_tests(tests, tok)
    model.to(rt.device)
    t0 = time.time()
    replies = chat.greedy_replies(model, tok, prompts, max_new_tokens, batch_size, rt.autocast)
    right = [r.strip() == a for r, a in zip(replies, answers)]
    where = f"{out_dir} ({ckpt})" if init_from == "resume" else init_from
    print(f"{where}{note} on {tests}: {sum(right)}/{len(right)} = {sum(right) / len(right):.1%} exact answers "
          f"({time.time() - t0:.1f}s)")
    for task in sorted(set(tasks)):
        rows = [ok for ok, t in zip(right, tasks) if t == task]
        print(f"  {task:>10}: {sum(rows)}/{len(rows)} = {sum(rows) / len(rows):.1%}")
    wrong = [i for i, ok in enumerate(right) if not ok][:show]
    for i in wrong:
        print(f"  wrong: {questions[i]!r} -> {replies[i]!r} (expected {answers[i]!r})")


if __name__ == "__main__":
    main()
