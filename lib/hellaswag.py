"""
HellaSwag (Zellers et al. 2019, https://github.com/rowanz/hellaswag): given the start of a sentence, pick the
right one of 4 endings. eval_hellaswag.py is the command line; evaluate() is for any script (train.py).

Scoring is "completion style", as in the published GPT-2 reproductions (karpathy/build-nanogpt, llm.c): each
ending, prefixed with a space, is appended to the context, and the model's cross-entropy is taken on the ending's
tokens only. acc_norm picks the ending with the lowest mean loss per token, acc the lowest summed loss. The 4
rows of an example run as one right-padded batch (padding comes after the ending, so causal attention never sees
it). OpenAI's GPT-2 124M scores about 29-30% acc_norm this way (29.55%, acc 28.59%, in build-nanogpt); chance is
25%. lm-evaluation-harness rewrites the text and normalises by characters, so its numbers (31.14%) differ.

The official files are JSON lines; what is used of each example: ctx (str), endings (4 str), label (0-3).
"""

import http.client
import json
import os
import urllib.request
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch.nn import functional as F

from lib.runtime import UserError

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
VAL_EXAMPLES = 10042  # in the validation file
CACHE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "hellaswag")
REFERENCE = "OpenAI's GPT-2 124M scores about 29-30% acc_norm on the 10,042 examples in published reproductions"


class Result(NamedTuple):
    acc: float  # share of examples whose lowest summed ending loss is the right ending
    acc_norm: float  # the same with the mean loss per ending token: the number usually reported
    n: int  # examples scored


def download(cache_dir=CACHE_DIR, url=URL):
    """The validation file's path in cache_dir, downloaded there the first time (whole, or not at all)."""
    path = os.path.join(cache_dir, os.path.basename(url))
    if os.path.exists(path):
        return path
    print(f"downloading {url} to {path}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (OSError, ValueError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"could not download {url} ({reason}): download it where there is network and pass "
                        f"--input=path/to/hellaswag_val.jsonl") from None
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def load_examples(path, limit=0):
    """The examples of a HellaSwag .jsonl file as dicts with ctx, endings and label; the first `limit` if > 0."""
    if not os.path.isfile(path):
        raise UserError(f"HellaSwag file {path} not found: pass --input=path/to/hellaswag_val.jsonl, or leave "
                        f"--input empty to download it")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where} is not JSON ({e.msg}): is this a HellaSwag .jsonl file?") from None
            if not isinstance(ex, dict) or not isinstance(ex.get("ctx"), str) or not isinstance(ex.get("endings"), list) \
                    or len(ex["endings"]) != 4 or not all(isinstance(e, str) for e in ex["endings"]):
                raise UserError(f"{where} is not a HellaSwag example (it needs ctx: text and endings: 4 texts)")
            label = ex.get("label")
            if isinstance(label, str) and label.isdigit():
                label = int(label)
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < 4:
                raise UserError(f"{where} has no label 0-3 (label={ex.get('label')!r}): the test split is unlabeled, "
                                f"use the validation file")
            examples.append({"ctx": ex["ctx"], "endings": ex["endings"], "label": label})
            if 0 < limit <= len(examples):
                break
    if not examples:
        raise UserError(f"{path} has no examples")
    return examples


def render_example(example, encode, block_size=None):
    """
    (tokens, mask), both (4, T) long tensors: row i is context + ' ' + ending i, right-padded with 0; mask is 1 on
    the ending's tokens. A row longer than block_size keeps its last block_size tokens (the context is cut first).
    """
    ctx = encode(example["ctx"])
    rows, masks = [], []
    for ending in example["endings"]:
        end = encode(" " + ending)  # GPT-2 BPE: the space belongs to the ending's first token
        row, mask = ctx + end, [0] * len(ctx) + [1] * len(end)
        if block_size is not None and len(row) > block_size:
            row, mask = row[-block_size:], mask[-block_size:]
        rows.append(row)
        masks.append(mask)
    T = max(len(r) for r in rows)
    tokens = torch.zeros((4, T), dtype=torch.long)
    mask = torch.zeros((4, T), dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(r)] = torch.tensor(r)
        mask[i, :len(m)] = torch.tensor(m)
    return tokens, mask


def ending_losses(model, tokens, mask):
    """(summed, mean) cross-entropy of each row's masked tokens, (4,) float32 each; the first token is never scored."""
    targets = tokens[:, 1:]
    scored = mask[:, 1:].float()
    # with targets the model returns the logits of every position; -1 where nothing is scored
    logits, _ = model(tokens[:, :-1], targets=targets.masked_fill(scored == 0, -1))
    losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    summed = (losses.view(targets.shape) * scored).sum(dim=1)
    return summed, summed / scored.sum(dim=1)


def score_example(model, example, encode, device="cpu", autocast=None):
    """(summed, mean) loss of each of the 4 endings, (4,) float32 tensors on the CPU. The model must be in eval mode."""
    tokens, mask = render_example(example, encode, model.config.block_size)
    with torch.no_grad(), autocast or nullcontext():
        summed, mean = ending_losses(model, tokens.to(device), mask.to(device))
    return summed.cpu(), mean.cpu()


def for_training(meta, path="", limit=0):
    """(examples, encode) for train.py's hellaswag_interval: only a GPT-2 BPE run can score HellaSwag's text."""
    if meta.get("tokenizer", "gpt2") != "gpt2":
        raise UserError(f"hellaswag_interval needs a GPT-2 BPE dataset, and this one is in {meta['tokenizer']} "
                        f"tokens: set --hellaswag_interval=0")
    import tiktoken

    return load_examples(path or download(), limit), tiktoken.get_encoding("gpt2").encode_ordinary


def evaluate(model, examples, encode, device="cpu", autocast=None, rank=0, world_size=1, progress=False):
    """
    HellaSwag accuracy of `model` (this repo's GPT; pass the raw model, not a DDP or torch.compile wrapper) on
    `examples` (load_examples), encode: text -> GPT-2 BPE ids. A model in train mode is switched to eval mode (no
    dropout) and back. Under torchrun, pass rank and world_size: each rank scores every world_size-th example and
    the counts are summed over ranks (all_reduce), so every rank returns the same Result. progress: a bar on
    stderr when it is a terminal.
    """
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.long)  # examples, right by summed loss, right by mean loss
    try:
        for i in tqdm(range(rank, len(examples), world_size), desc="hellaswag", unit="ex",
                  disable=None if progress else True):  # None: only on a terminal
            summed, mean = score_example(model, examples[i], encode, device, autocast)
            label = examples[i]["label"]
            counts += torch.tensor([1, int(summed.argmin()) == label, int(mean.argmin()) == label])
    finally:
        model.train(was_training)
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        counts = counts.to(device)
        torch.distributed.all_reduce(counts)
        counts = counts.cpu()
    n, right, right_norm = counts.tolist()
    return Result(right / max(n, 1), right_norm / max(n, 1), n)
