"""
What a model can do: the CORE metric (DCLM, Li et al. 2024, arXiv 2406.11794), any of its tasks, and HellaSwag from
its own file. eval.py is the command line; train.py's eval_every calls evaluate() during training.

CORE is the mean over 22 tasks of the centered accuracy, (accuracy - baseline) / (1 - baseline), where baseline is
the accuracy of random guessing: 0 is chance, 1 is every answer right. The tasks, shot counts, delimiters and
baselines come from the evaluation bundle's own files, in the layout nanochat uses (BUNDLE_URL):

    eval_bundle/core.yaml             icl_tasks: label, dataset_uri, num_fewshot: [k], icl_task_type,
                                      continuation_delimiter (default ' ')
    eval_bundle/eval_meta_data.csv    'Eval Task', 'Random baseline' (in percent), ...
    eval_bundle/eval_data/<dataset_uri>   one example per line (JSON)

An example is scored in one of three ways, all its rows in one forward pass:

    multiple_choice    {query, choices, gold}: the same context followed by each choice; right when the gold
                       choice has the lowest mean loss per token (over what follows the rows' common prefix)
    schema             {context_options, continuation, gold}: each context followed by the same continuation; the
                       same rule, over the common suffix
    language_modeling  {context, continuation}: right when greedy decoding gives the continuation exactly

Prompts are nanochat's (nanochat/core_eval.py): k few-shot examples drawn with random.Random(1234 + i) from the
task's other examples, each as 'context delimiter answer' and a blank line, then the example itself; the token
<|endoftext|> first (as BOS); a row longer than the model's context keeps its end. A task's examples are shuffled
with random.Random(1337) first, so limit=N scores the same N examples as nanochat's --max-per-task=N. Two departures,
both where nanochat would fail: fewer shots when a task has too few other examples, and a span that would be empty
or start at the first token keeps at least one scored token.
"""

import csv
import http.client
import json
import os
import random
import shutil
import time
import urllib.request
import zipfile
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch.nn import functional as F

from lib import hellaswag
from lib.files import fsync_dir, write_atomic
from lib.runtime import UserError
from lib.tokenizer import load_tokenizer

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
CACHE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")  # data/eval_bundle/
KINDS = ("multiple_choice", "schema", "language_modeling")
FIELDS = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
          "language_modeling": ("context", "continuation")}
# published CORE of OpenAI's GPT-2 (nanochat's dev/estimate_gpt3_core.ipynb and README); docs/eval.md has the rest
REFERENCE = "OpenAI's GPT-2 scores CORE 0.1139 (124M), 0.1849 (355M), 0.2146 (774M), 0.2565 (1.5B) in nanochat"


class Task(NamedTuple):
    label: str  # its name in core.yaml (and in results)
    kind: str  # one of KINDS
    shots: int  # few-shot examples before each example
    delimiter: str  # between a context and its answer
    baseline: float  # the accuracy of random guessing, 0-1
    path: str  # its examples' file
    read: object = None  # Task -> its examples (read_jsonl for a task of the bundle)


# ----------------------------------------------------------------------------- tasks and their files

def fetch(url, path, hint):
    """The file at path, downloaded from url the first time (whole or not at all); hint says what to do offline."""
    if os.path.exists(path):
        return path
    print(f"downloading {url} to {path}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            write_atomic(path, lambda f: shutil.copyfileobj(response, f, 1 << 20), kind="download")
    except (OSError, ValueError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"could not download {url} ({reason}): {hint}") from None
    return path


def download_bundle(cache_dir=CACHE_DIR, url=BUNDLE_URL):
    """The bundle's folder, cache_dir/eval_bundle, downloaded and unzipped there the first time."""
    folder = os.path.join(cache_dir, "eval_bundle")
    if os.path.isfile(os.path.join(folder, "core.yaml")):
        return folder
    hint = "download it where there is network, unzip it and pass --bundle=path/to/eval_bundle"
    archive = fetch(url, folder + ".zip", hint)
    staging = f"{folder}.{os.getpid()}.tmp"  # unzipped in full first, then renamed into place
    try:
        with zipfile.ZipFile(archive) as z:
            for member in z.infolist():
                target = os.path.normpath(os.path.join(staging, member.filename))
                if member.is_dir() or not target.startswith(staging + os.sep):  # folders; nothing outside staging
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with z.open(member) as src:
                    write_atomic(target, lambda f: shutil.copyfileobj(src, f, 1 << 20))
        if not os.path.isfile(os.path.join(staging, "eval_bundle", "core.yaml")):
            raise UserError(f"{archive} holds no eval_bundle/core.yaml: remove it and run again, or {hint}")
        if not os.path.isdir(folder):  # another process (a torchrun rank) may have placed it meanwhile
            os.replace(os.path.join(staging, "eval_bundle"), folder)
    except zipfile.BadZipFile:
        os.remove(archive)
        raise UserError(f"{archive} was not a whole zip file (removed): run again, or {hint}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fsync_dir(cache_dir)
    if os.path.exists(archive):
        os.remove(archive)
    return folder


def load_bundle(folder):
    """The tasks of a bundle's core.yaml, in its order, with the random baselines of its eval_meta_data.csv."""
    import yaml  # PyYAML: a dependency of transformers

    config_path, meta_path = os.path.join(folder, "core.yaml"), os.path.join(folder, "eval_meta_data.csv")
    for path in (config_path, meta_path):
        if not os.path.isfile(path):
            raise UserError(f"{path} not found: --bundle must be the eval_bundle folder (core.yaml, "
                            f"eval_meta_data.csv, eval_data/), or leave it empty to download it")
    with open(meta_path, encoding="utf-8", newline="") as f:
        try:
            baselines = {row["Eval Task"]: float(row["Random baseline"]) / 100 for row in csv.DictReader(f)}
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{meta_path} needs the columns 'Eval Task' and 'Random baseline' (a percentage): "
                            f"{type(e).__name__}: {e}") from None
    with open(config_path, encoding="utf-8") as f:
        entries = (yaml.safe_load(f) or {}).get("icl_tasks") or []
    tasks = {}
    for entry in entries:
        label = entry.get("label")
        shots = entry.get("num_fewshot", [0])
        shots = shots[0] if isinstance(shots, list) and shots else shots
        kind = entry.get("icl_task_type")
        if kind not in KINDS or not isinstance(shots, int) or not entry.get("dataset_uri"):
            raise UserError(f"{config_path}: task {label!r} needs dataset_uri, num_fewshot and an icl_task_type of "
                            f"{', '.join(KINDS)} (it has {kind!r})")
        if label not in baselines or not 0 <= baselines[label] < 1:
            raise UserError(f"{meta_path} has no random baseline under 100 for task {label!r}")
        tasks[label] = Task(label, kind, shots, entry.get("continuation_delimiter", " "), baselines[label],
                            os.path.join(folder, "eval_data", entry["dataset_uri"]), read_jsonl)
    if not tasks:
        raise UserError(f"{config_path} lists no icl_tasks")
    return tasks


def load_examples(task, limit=0):
    """A task's examples, shuffled with random.Random(1337) as nanochat does; the first `limit` of them if > 0."""
    examples = task.read(task)
    random.Random(1337).shuffle(examples)
    return examples[:limit] if limit > 0 else examples


def read_jsonl(task):
    """The examples of a bundle's task file, each checked for the fields its kind needs."""
    if not os.path.isfile(task.path):
        raise UserError(f"{task.path} (task {task.label}) not found: is the bundle complete? Download it again")
    examples, need = [], FIELDS[task.kind]
    with open(task.path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{task.path} line {lineno} is not JSON ({e.msg})") from None
            if not isinstance(ex, dict) or any(k not in ex for k in need):
                raise UserError(f"{task.path} line {lineno} is not a {task.kind} example (it needs "
                                f"{', '.join(need)})")
            examples.append(ex)
    if not examples:
        raise UserError(f"{task.path} (task {task.label}) has no examples")
    return examples


def select(spec, bundle="", hellaswag_file="", rank=0, world_size=1):
    """
    The tasks spec names: 'core' (every task of the bundle's core.yaml), 'hellaswag' (HellaSwag's validation file,
    0-shot), or labels of core.yaml, comma-separated. Files are downloaded once, by rank 0 alone under torchrun.
    Returns (tasks, core): core is CORE's list of labels when spec asks for CORE, else None.
    """
    names = list(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))  # in order, once each
    if not names:
        raise UserError("no tasks given: name core, hellaswag, or tasks of the bundle, comma-separated")
    if "hellaswag" in names and "core" in names:
        raise UserError("tasks core and hellaswag cannot run together: core has its own task named hellaswag "
                        "(10-shot, from the bundle); score HellaSwag's validation file in a run of its own")
    needs_bundle = any(n != "hellaswag" for n in names)
    hellaswag_path = hellaswag_file or os.path.join(CACHE_DIR, "hellaswag", "hellaswag_val.jsonl")
    if rank == 0:  # the downloads, once
        if needs_bundle and not bundle:
            download_bundle()
        if "hellaswag" in names and not hellaswag_file:
            fetch(hellaswag.URL, hellaswag_path, "download it where there is network and pass "
                                                 "--hellaswag_file=path/to/hellaswag_val.jsonl")
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
    folder = bundle or os.path.join(CACHE_DIR, "eval_bundle")
    bundle_tasks = load_bundle(folder) if needs_bundle else {}
    tasks, core = {}, None
    for name in names:
        if name == "core":
            core = list(bundle_tasks)
            tasks.update({label: t for label, t in bundle_tasks.items() if label not in tasks})
        elif name == "hellaswag":
            tasks[name] = Task(name, "multiple_choice", 0, hellaswag.DELIMITER, hellaswag.BASELINE, hellaswag_path,
                               lambda task: hellaswag.load_examples(task.path))
        elif name in bundle_tasks:
            tasks.setdefault(name, bundle_tasks[name])
        else:
            raise UserError(f"unknown task {name!r}: give core, hellaswag, or tasks of {folder}/core.yaml: "
                            f"{', '.join(bundle_tasks)}")
    return list(tasks.values()), core


# ----------------------------------------------------------------------------- prompts, one function per kind

def few_shot(n, i, k):
    """The indices of k examples other than i among n, as nanochat draws them: random.Random(1234 + i).sample of the
    other indices (sampling range(n - 1) and skipping i draws the same ones, without building that list)."""
    k = min(k, n - 1)
    return [j + (j >= i) for j in random.Random(1234 + i).sample(range(n - 1), k)] if k > 0 else []


def multiple_choice(item, shots, delimiter):
    """The same context followed by each choice (scored on what follows the rows' common prefix)."""
    context = "".join(f"{s['query']}{delimiter}{s['choices'][s['gold']]}\n\n" for s in shots)
    return [f"{context}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def schema(item, shots, delimiter):
    """Each context followed by the same continuation (scored on the rows' common suffix)."""
    context = "".join(f"{s['context_options'][s['gold']]}{delimiter}{s['continuation']}\n\n" for s in shots)
    return [f"{context}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]


def language_modeling(item, shots, delimiter):
    """The prompt without and with the continuation (scored on what the second adds); contexts are stripped."""
    prompt = "".join(f"{s['context'].strip()}{delimiter}{s['continuation']}\n\n" for s in shots)
    prompt += f"{item['context'].strip()}{delimiter}"
    return [prompt.strip(), prompt + item["continuation"]]


PROMPTS = {"multiple_choice": multiple_choice, "schema": schema, "language_modeling": language_modeling}


def render(task, examples, i):
    """The prompts of example i of a task: its few-shot examples, then the example itself."""
    return PROMPTS[task.kind](examples[i], [examples[j] for j in few_shot(len(examples), i, task.shots)],
                              task.delimiter)


def common_prefix(rows):
    n = 0
    for column in zip(*rows):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


def rows_of(kind, prompts, encode, block_size):
    """(tokens, start, end) per row: tokens[start:end] are scored, each from the logits one position before."""
    tokens = [encode(p) for p in prompts]
    if kind == "multiple_choice":
        start = common_prefix(tokens)
        spans = [(start, len(t)) for t in tokens]
    elif kind == "schema":
        common = common_prefix([t[::-1] for t in tokens])
        spans = [(len(t) - common, len(t)) for t in tokens]
    else:  # language_modeling: one row, the prompt with its continuation
        spans, tokens = [(common_prefix(tokens), len(tokens[1]))], tokens[1:]
    rows = []
    for t, (start, end) in zip(tokens, spans):
        cut = max(0, len(t) - block_size)  # too long: keep the end
        end -= cut
        rows.append((t[cut:], max(1, min(start - cut, end - 1)), end))
    return rows


# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def score_rows(model, rows, vocab, device="cpu", autocast=None):
    """
    For rows of (tokens, start, end), in one right-padded forward pass: each row's mean loss over tokens[start:end],
    and whether greedy decoding gives them exactly, as (len(rows),) float and bool CPU tensors. Only ids < vocab
    (the tokenizer's) are candidates: a checkpoint's padding rows of the vocabulary are never a prediction.
    """
    x = torch.zeros((len(rows), max(len(t) for t, _, _ in rows)), dtype=torch.long)
    for r, (t, _, _) in enumerate(rows):
        x[r, :len(t)] = torch.tensor(t)  # padding after a row: causal attention never lets the row see it
    which = torch.cat([torch.full((end - start,), r) for r, (_, start, end) in enumerate(rows)])
    pos = torch.cat([torch.arange(start - 1, end - 1) for _, start, end in rows])  # the predicting positions
    targets = x[which, pos + 1]
    with autocast or nullcontext():
        logits, _ = model(x.to(device), targets=x.to(device))  # with targets: the logits of every position
    picked = logits[which.to(device), pos.to(device), :vocab].float()  # (scored tokens, vocab)
    loss = F.cross_entropy(picked, targets.to(device), reduction="none").cpu()
    wrong = (picked.argmax(dim=-1).cpu() != targets).long()
    counts = torch.tensor([end - start for _, start, end in rows])
    return (torch.zeros(len(rows)).index_add_(0, which, loss) / counts,
            torch.zeros(len(rows), dtype=torch.long).index_add_(0, which, wrong) == 0)


def batched(task, examples, indices, encode, block_size, batch_tokens):
    """The examples' rows (rows_of), whole examples in order, in batches of at most batch_tokens (rows x longest
    row) unless one example alone is more: lists of (example index, its rows)."""
    batch, n_rows, width = [], 0, 0
    for i in indices:
        rows = rows_of(task.kind, render(task, examples, i), encode, block_size)
        longest = max(len(t) for t, _, _ in rows)
        if batch and (n_rows + len(rows)) * max(width, longest) > batch_tokens:
            yield batch
            batch, n_rows, width = [], 0, 0
        batch.append((i, rows))
        n_rows, width = n_rows + len(rows), max(width, longest)
    if batch:
        yield batch


def is_right(kind, example, mean_loss, exact):
    """Whether an example was answered right, from its rows' mean losses and exact matches (score_rows)."""
    if kind == "language_modeling":
        return bool(exact[0])
    return int(mean_loss.argmin()) == int(example["gold"])  # the first of equal losses, as nanochat's list.index


class Score(NamedTuple):
    task: Task
    examples: int  # scored, over all ranks
    right: int
    seconds: float

    @property
    def accuracy(self):
        return self.right / max(self.examples, 1)

    @property
    def centered(self):
        return (self.accuracy - self.task.baseline) / (1 - self.task.baseline)


class EvalSet(NamedTuple):
    """What evaluate() scores: tasks with their examples, the tokenizer's encode (BOS first) and vocabulary."""
    tasks: list  # [(Task, examples)]
    core: object  # CORE's labels when the tasks are CORE's, else None
    limit: int
    encode: object
    vocab: int


def prepare(spec, meta, model_vocab, bundle="", hellaswag_file="", limit=0, rank=0, world_size=1, what="the model"):
    """An EvalSet for the tasks spec names (select), with the tokenizer of meta (a checkpoint's vocabulary)."""
    if "stoi" in (meta or {}):
        raise UserError(f"{what} is character-level: CORE and HellaSwag are text, scored with a BPE tokenizer "
                        f"(GPT-2's, as data/shakespeare and data/openwebtext prepare, or your own)")
    tok = load_tokenizer(meta)
    if tok.valid_vocab > model_vocab:
        raise UserError(f"{what} has a vocabulary of {model_vocab} tokens, fewer than its tokenizer's "
                        f"{tok.valid_vocab}: it was not trained on {tok.name} tokens")
    if tok.eot is None:
        raise UserError(f"{what}'s tokenizer {tok.name} has no <|endoftext|> token, which starts every prompt")
    tasks, core = select(spec, bundle, hellaswag_file, rank, world_size)
    encode = getattr(getattr(tok, "enc", None), "encode_ordinary", tok.encode)  # tiktoken: '<|endoftext|>' as text
    return EvalSet([(t, load_examples(t, limit)) for t in tasks], core, limit, lambda text: [tok.eot] + encode(text),
                   tok.valid_vocab)


def for_training(config, meta, model_vocab, rank=0, world_size=1):
    """train.py's eval_every: the EvalSet of its eval_tasks, or one line that says why there is none."""
    try:
        return prepare(config["eval_tasks"], meta, model_vocab, config["eval_bundle"], config["hellaswag_file"],
                       config["eval_limit"], rank, world_size, what="the dataset")
    except UserError as e:
        raise UserError(f"{e}; or set --eval_every=0") from None


def evaluate(model, evalset, device="cpu", autocast=None, rank=0, world_size=1, batch_tokens=0, progress=False,
             on_score=None):
    """
    Score `model` (this repo's GPT; the plain module, not a DDP or torch.compile wrapper) on every task of evalset.
    Whole examples are batched up to batch_tokens (rows x longest row; 0: 16,384 on a GPU, 4,096 elsewhere: the
    logits take tokens x vocabulary x 4 bytes, twice, 1.6 GiB at 4,096 GPT-2 tokens). Under torchrun each rank scores
    every world_size-th example and the counts are summed (all_reduce): every rank returns the same Report. A model in
    train mode is switched to eval mode (no dropout) and back. progress: a bar per task on stderr (rank 0, when it
    is a terminal); on_score(score) is called after each task.
    """
    from tqdm import tqdm

    batch_tokens = batch_tokens or (16384 if str(device).startswith("cuda") else 4096)
    was_training = model.training
    model.eval()
    scores = []
    try:
        for task, examples in evalset.tasks:
            t0, right = time.time(), 0
            mine = range(rank, len(examples), world_size)
            bar = tqdm(total=len(mine), desc=task.label, unit="ex", leave=False,
                       disable=None if progress and rank == 0 else True)  # None: only on a terminal
            for batch in batched(task, examples, mine, evalset.encode, model.config.block_size, batch_tokens):
                mean_loss, exact = score_rows(model, [row for _, rows in batch for row in rows], evalset.vocab,
                                              device, autocast)
                first = 0
                for i, rows in batch:
                    right += is_right(task.kind, examples[i], mean_loss[first:first + len(rows)],
                                      exact[first:first + len(rows)])
                    first += len(rows)
                bar.update(len(batch))
            counts = torch.tensor([len(mine), right], dtype=torch.long)
            if world_size > 1 and torch.distributed.is_initialized():
                counts = counts.to(device)
                torch.distributed.all_reduce(counts)
                counts = counts.cpu()
            bar.close()
            scores.append(Score(task, *counts.tolist(), time.time() - t0))
            if on_score is not None:
                on_score(scores[-1])
    finally:
        model.train(was_training)
    return Report(scores, evalset.core, evalset.limit)


class Report(NamedTuple):
    scores: list  # [Score], in the order the tasks ran
    core: object  # CORE's labels when the tasks asked for are CORE's, else None
    limit: int  # at most this many examples per task (0: all)

    @property
    def core_metric(self):
        """CORE: the mean centered accuracy over CORE's tasks (None when they were not asked for)."""
        if self.core is None:
            return None
        centered = [s.centered for s in self.scores if s.task.label in self.core]
        return sum(centered) / len(centered)

    @property
    def mean_centered(self):
        return sum(s.centered for s in self.scores) / len(self.scores)

    @property
    def examples(self):
        return sum(s.examples for s in self.scores)

    @property
    def seconds(self):
        return sum(s.seconds for s in self.scores)

    def summary(self):
        """One line: CORE, or each task's accuracy."""
        per = f", at most {self.limit:,} examples per task" if self.limit else ""
        rate = f"{self.examples:,} examples in {self.seconds:.1f}s"
        if self.core is not None:
            return f"CORE {self.core_metric:.4f}{' (estimate)' if self.limit else ''} over {len(self.core)} tasks" \
                   f"{per} ({rate})"
        accuracies = ", ".join(f"{s.task.label} {s.accuracy:.2%}" for s in self.scores)
        mean = f", mean centered {self.mean_centered:.4f}" if len(self.scores) > 1 else ""
        return f"{accuracies}{mean} ({rate})"

    def record(self):
        """The scores as flat fields for metrics.jsonl and wandb."""
        fields = {"core": self.core_metric, "mean_centered": self.mean_centered, "examples": self.examples,
                  "limit": self.limit, "seconds": round(self.seconds, 3)}
        for s in self.scores:
            fields[f"acc_{s.task.label}"] = s.accuracy
            fields[f"centered_{s.task.label}"] = s.centered
        return fields

    def as_json(self, **about):
        """Everything, for a results file: `about` (the model, ...) first."""
        return {**about, "core": self.core_metric, "mean_centered": self.mean_centered, "limit": self.limit,
                "examples": self.examples, "seconds": round(self.seconds, 3),
                "examples_per_s": round(self.examples / max(self.seconds, 1e-9), 2),
                "tasks": {s.task.label: {"accuracy": s.accuracy, "centered": s.centered, "right": s.right,
                                         "examples": s.examples, "kind": s.task.kind, "shots": s.task.shots,
                                         "baseline": s.task.baseline, "seconds": round(s.seconds, 3)}
                          for s in self.scores}}
