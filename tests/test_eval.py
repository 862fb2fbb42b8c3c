"""
eval.py and lib/core_eval.py: CORE's three kinds of task checked against a direct computation with the model, the
prompts against nanochat's templates, centered accuracy, torchrun, a transformers folder against the checkpoint it
was exported from, HellaSwag's own file, and train.py's eval_every. A tiny bundle in the official layout, small
random models; CPU, no network.
"""

import csv
import importlib
import json
import os
import random
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import REPO, TINY, run
from lib import checkpoint, core_eval, hellaswag
from lib.runtime import UserError
from model import GPT, GPTConfig

SHARED_TIKTOKEN = os.path.join(REPO, "..", "shared", "tiktoken_cache")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(SHARED_TIKTOKEN):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(SHARED_TIKTOKEN)  # tiktoken's gpt2 files, offline

GPT2_META = {"vocab_size": 50257, "tokenizer": "gpt2", "dtype": "uint16"}
EOT = 50256
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the models here are tiny: threads only wait for each other


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# ----------------------------------------------------------------------------- a tiny bundle, official layout

MC_ZEROSHOT = [  # HellaSwag-like: the same context, 4 endings
    {"query": "A man is sitting on a roof. He", "gold": 3, "choices": [
        "is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
        "starts pulling up roofing on a roof."]},
    {"query": "A woman pours flour into a large bowl. She", "gold": 0, "choices": [
        "adds two eggs and stirs.", "jumps into the pool.", "paints the fence green.", "sings."]},
    {"query": "The barista steams the milk until it foams. Then she", "gold": 0, "choices": [
        "pours it over the espresso.", "throws the cup.", "rides a bicycle down the street.", "sleeps."]},
    {"query": "A boy tunes his guitar on the couch. He", "gold": 1, "choices": [
        "eats the guitar.", "strums a few chords.", "drives to work.", "puts on ski boots."]},
    {"query": "Runners crowd the starting line as the gun fires. They", "gold": 1, "choices": [
        "sit down.", "take off down the road.", "cook pasta.", "go to bed early."]},
]
MC_FEWSHOT = [  # ARC-like: a question, 'Answer:' and the choices, 2-shot
    {"query": "Question: Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "helium"], "gold": 1},
    {"query": "Question: What is frozen water called?", "choices": ["ice", "steam", "sand"], "gold": 0},
    {"query": "Question: Which planet is closest to the Sun?", "choices": ["Mars", "Venus", "Mercury"], "gold": 2},
    {"query": "Question: How many legs does a spider have?", "choices": ["six", "eight", "ten"], "gold": 1},
    {"query": "Question: What pulls objects toward the Earth?", "choices": ["gravity", "light", "sound"], "gold": 0},
]
SCHEMA_ZEROSHOT = [  # Winograd-like: two contexts, one continuation
    {"context_options": ["The trophy didn't fit in the suitcase because the trophy",
                         "The trophy didn't fit in the suitcase because the suitcase"],
     "continuation": "was too big.", "gold": 0},
    {"context_options": ["Joan thanked Susan for the help Joan", "Joan thanked Susan for the help Susan"],
     "continuation": "had given.", "gold": 1},
    {"context_options": ["The city council refused the demonstrators a permit because the council",
                         "The city council refused the demonstrators a permit because the demonstrators"],
     "continuation": "feared violence.", "gold": 0},
    {"context_options": ["The man lifted the boy onto his shoulders because the man",
                         "The man lifted the boy onto his shoulders because the boy"],
     "continuation": "was so strong.", "gold": 0},
]
SCHEMA_FEWSHOT = [dict(ex, continuation=ex["continuation"] + " Indeed.") for ex in SCHEMA_ZEROSHOT]
LM_ZEROSHOT = [  # LAMBADA-like: the last word; contexts with stray whitespace, which is stripped
    {"context": "He opened the door and the dog ran out into the ", "continuation": "yard"},
    {"context": "  She poured a cup of hot", "continuation": "tea"},
    {"context": "The sun rises in the east and sets in the", "continuation": "west"},
    {"context": "Two plus two equals", "continuation": "four"},
    {"context": "Bread is made from flour, water and ", "continuation": "yeast"},
]
LM_FEWSHOT = [  # BIG-bench-like, 2-shot, with a delimiter
    {"context": "Repeat: cat", "continuation": "cat"},
    {"context": "Repeat: dog dog", "continuation": "dog dog"},
    {"context": "Repeat: red blue", "continuation": "red blue"},
    {"context": "Repeat: one", "continuation": "one"},
    {"context": "Repeat: sun moon sun", "continuation": "sun moon sun"},
]
# label: (kind, shots, delimiter or None (the default ' '), baseline %, dataset_uri, examples)
TASKS = {
    "mc_zeroshot": ("multiple_choice", 0, None, 25, "language_understanding/mc_zeroshot.jsonl", MC_ZEROSHOT),
    "mc_fewshot": ("multiple_choice", 2, "\nAnswer: ", 33.3, "world_knowledge/mc_fewshot.jsonl", MC_FEWSHOT),
    "schema_zeroshot": ("schema", 0, None, 50, "language_understanding/schema_zeroshot.jsonl", SCHEMA_ZEROSHOT),
    "schema_fewshot": ("schema", 1, " ", 50, "language_understanding/schema_fewshot.jsonl", SCHEMA_FEWSHOT),
    "lm_zeroshot": ("language_modeling", 0, None, 0, "language_understanding/lm_zeroshot.jsonl", LM_ZEROSHOT),
    "lm_fewshot": ("language_modeling", 2, "\nAnswer: ", 0, "symbolic_problem_solving/lm_fewshot.jsonl",
                   LM_FEWSHOT),
}


def write_bundle(folder):
    """core.yaml, eval_meta_data.csv and eval_data/ as the official eval_bundle lays them out."""
    lines = ["icl_tasks:"]
    for label, (kind, shots, delimiter, _, uri, examples) in TASKS.items():
        lines += ["-", f"  label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {kind}"]
        if delimiter is not None:
            lines.append(f"  continuation_delimiter: {json.dumps(delimiter)}")
        path = os.path.join(folder, "eval_data", uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(ex) + "\n" for ex in examples)
    with open(os.path.join(folder, "core.yaml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(folder, "eval_meta_data.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline",
                    "Centered Metric?", "Description"])
        w.writerow(["unused_task", "safety", "multiple choice", 3, 10, 50, "", "a task core.yaml does not list"])
        for label, (kind, shots, _, baseline, _, examples) in TASKS.items():
            w.writerow([label, "test", kind.replace("_", " "), shots, len(examples), baseline, "", "tiny, made up"])
    return str(folder)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return write_bundle(tmp_path_factory.mktemp("bundle") / "eval_bundle")


@pytest.fixture(scope="module")
def enc():
    import tiktoken

    return tiktoken.get_encoding("gpt2")


def random_gpt(block_size=128, vocab_size=50304, dropout=0.0, seed=0):
    """A small GPT with every parameter ~N(0, 0.2), so the rows' losses differ clearly."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab_size, bias=True,
                          dropout=dropout))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def save_checkpoint(model, out_dir, meta):
    """model as train.py's best.pt and ckpt.pt in out_dir, with the vocabulary metadata `meta`."""
    args = {k: getattr(model.config, k) for k in checkpoint.ARCH_KEYS + ("dropout",)}
    os.makedirs(out_dir, exist_ok=True)
    checkpoint.save(dict(model=model.state_dict(), model_args=args, iter_num=5, config={}, meta=meta), str(out_dir),
                    is_best=True)


def evalset(bundle, spec="core", limit=0):
    model_vocab = 50304
    return core_eval.prepare(spec, GPT2_META, model_vocab, bundle=bundle, limit=limit)


# ----------------------------------------------------------------------------- the reference, written out

# nanochat's templates (nanochat/core_eval.py), rendered with jinja2 as there
TEMPLATES = {
    "multiple_choice": """
{%- for example in fewshot_examples -%}
{{ example.query }}{{ continuation_delimiter }}{{ example.choices[example.gold] }}

{% endfor -%}
{{ item.query }}{{ continuation_delimiter }}{{ choice }}""".strip(),
    "schema": """
{%- for example in fewshot_examples -%}
{{ example.context_options[example.gold] }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ context }}{{ continuation_delimiter }}{{ item.continuation }}""".strip(),
    "language_modeling": """
{%- for example in fewshot_examples -%}
{{ example.context | trim }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ item.context | trim }}{{ continuation_delimiter }}{% if include_continuation %}{{ item.continuation }}{% endif %}\
""".strip(),
}


def reference_prompts(kind, examples, i, shots, delimiter):
    from jinja2 import Template

    fewshot = []
    if shots > 0:
        available = [j for j in range(len(examples)) if j != i]
        fewshot = [examples[j] for j in random.Random(1234 + i).sample(available, shots)]
    template, ctx = Template(TEMPLATES[kind]), dict(fewshot_examples=fewshot, continuation_delimiter=delimiter,
                                                    item=examples[i])
    if kind == "multiple_choice":
        return [template.render(choice=c, **ctx) for c in examples[i]["choices"]]
    if kind == "schema":
        return [template.render(context=c, **ctx) for c in examples[i]["context_options"]]
    return [template.render(include_continuation=False, **ctx).strip(),
            template.render(include_continuation=True, **ctx)]


def common_length(seqs, direction):
    """nanochat's find_common_length: the common prefix ('left') or suffix ('right') of token sequences."""
    n = min(len(s) for s in seqs)
    idx = range(n) if direction == "left" else range(-1, -n - 1, -1)
    for k, j in enumerate(idx):
        if not all(s[j] == seqs[0][j] for s in seqs):
            return k
    return n


def direct(model, enc, kind, prompts, block_size, vocab=50257):
    """Each row through the model alone (no batch, no padding): (mean loss of its scored tokens, all greedy right)."""
    tokens = [[EOT] + enc.encode_ordinary(p) for p in prompts]
    if kind == "multiple_choice":
        start = common_length(tokens, "left")
        spans = [(start, len(t)) for t in tokens]
    elif kind == "schema":
        n = common_length(tokens, "right")
        spans = [(len(t) - n, len(t)) for t in tokens]
    else:
        assert tokens[1][:len(tokens[0])] == tokens[0]
        spans, tokens = [(len(tokens[0]), len(tokens[1]))], tokens[1:]
    means, exact = [], []
    for t, (s, e) in zip(tokens, spans):
        cut = max(0, len(t) - block_size)
        t, s, e = t[cut:], s - cut, e - cut
        assert s >= 1
        with torch.no_grad():
            logits, _ = model(torch.tensor([t]), targets=torch.tensor([t]))
        logp = F.log_softmax(logits[0, :, :vocab].float(), dim=-1)
        nll = [-logp[p - 1, t[p]].item() for p in range(s, e)]
        means.append(sum(nll) / len(nll))
        exact.append(all(int(logp[p - 1].argmax()) == t[p] for p in range(s, e)))
    return torch.tensor(means), exact


# ----------------------------------------------------------------------------- the bundle and the prompts

def test_bundle_gives_tasks_shots_delimiters_and_baselines(bundle):
    tasks = core_eval.load_bundle(bundle)
    assert list(tasks) == list(TASKS)  # core.yaml's order; the csv's other rows are not tasks
    for label, (kind, shots, delimiter, baseline, uri, _) in TASKS.items():
        t = tasks[label]
        assert (t.kind, t.shots, t.delimiter) == (kind, shots, " " if delimiter is None else delimiter)
        assert t.baseline == pytest.approx(baseline / 100) and t.path == os.path.join(bundle, "eval_data", uri)
    chosen, core = core_eval.select("lm_fewshot, mc_zeroshot", bundle)
    assert [t.label for t in chosen] == ["lm_fewshot", "mc_zeroshot"] and core is None
    chosen, core = core_eval.select("core", bundle)
    assert [t.label for t in chosen] == core == list(TASKS)
    for spec, message in [("core,hellaswag", "cannot run together"), ("piqa", "unknown task 'piqa'"),
                          (" ", "no tasks given")]:
        with pytest.raises(UserError, match=message):
            core_eval.select(spec, bundle)
    with pytest.raises(UserError, match="--bundle must be the eval_bundle folder"):
        core_eval.select("core", os.path.dirname(bundle))


def test_few_shot_examples_and_prompts_are_nanochats(bundle):
    for n, k in [(5, 2), (100, 10), (20321, 10), (3, 3)]:  # (3, 3): only 2 others, so 2 shots
        for i in (0, 1, n // 2, n - 1):
            available = [j for j in range(n) if j != i]
            assert core_eval.few_shot(n, i, k) == random.Random(1234 + i).sample(available, min(k, n - 1))
    tasks = core_eval.load_bundle(bundle)
    for label, task in tasks.items():
        examples = core_eval.load_examples(task)
        for i in range(len(examples)):
            assert core_eval.render(task, examples, i) == reference_prompts(task.kind, examples, i, task.shots,
                                                                            task.delimiter), (label, i)
    # what the prompts look like, spelled out once per kind
    ex = core_eval.load_examples(tasks["mc_fewshot"])
    shots = [ex[j] for j in core_eval.few_shot(len(ex), 0, 2)]
    assert core_eval.render(tasks["mc_fewshot"], ex, 0)[1] == "".join(
        f"{s['query']}\nAnswer: {s['choices'][s['gold']]}\n\n" for s in shots) + ex[0]["query"] + "\nAnswer: " + \
        ex[0]["choices"][1]
    assert core_eval.render(tasks["lm_zeroshot"], core_eval.load_examples(tasks["lm_zeroshot"]), 0) in (
        [c.strip(), c.strip() + " " + e["continuation"]] for c, e in ((e["context"], e) for e in LM_ZEROSHOT))
    assert core_eval.render(tasks["schema_zeroshot"], SCHEMA_ZEROSHOT, 1) == [
        "Joan thanked Susan for the help Joan had given.", "Joan thanked Susan for the help Susan had given."]


def test_examples_are_shuffled_once_with_seed_1337_and_limited(bundle):
    task = core_eval.load_bundle(bundle)["mc_zeroshot"]
    expected = list(MC_ZEROSHOT)
    random.Random(1337).shuffle(expected)
    assert core_eval.load_examples(task) == expected
    assert core_eval.load_examples(task, limit=3) == expected[:3]


# ----------------------------------------------------------------------------- scoring

@pytest.mark.gpt2_bpe
def test_each_kind_predicts_as_a_direct_computation_does(bundle, enc):
    model = random_gpt(block_size=128)
    with torch.no_grad():  # the vocabulary's padding (ids 50257-50303, never text) with large logits: never predicted
        model.lm_head.weight[50257:] *= 5
    es = evalset(bundle)
    reports = [core_eval.evaluate(model, es, batch_tokens=n) for n in (1, 2000)]  # one example per pass; several
    wrong_somewhere = 0
    for t, (task, examples) in enumerate(es.tasks):
        right = 0
        for i in range(len(examples)):
            prompts = reference_prompts(task.kind, examples, i, task.shots, task.delimiter)
            means, exact = direct(model, enc, task.kind, prompts, 128)
            rows = core_eval.rows_of(task.kind, prompts, es.encode, 128)
            mean_loss, greedy = core_eval.score_rows(model, rows, es.vocab)
            assert torch.allclose(mean_loss, means, rtol=1e-5, atol=1e-5), (task.label, i)
            assert greedy.tolist() == exact
            ok = exact[0] if task.kind == "language_modeling" else int(means.argmin()) == examples[i]["gold"]
            right += ok
            wrong_somewhere += not ok
        for report in reports:
            assert (report.scores[t].examples, report.scores[t].right) == (len(examples), right), task.label
    assert wrong_somewhere and reports[0].examples == sum(len(t[5]) for t in TASKS.values())


@pytest.mark.gpt2_bpe
def test_language_modeling_is_right_only_on_the_exact_greedy_continuation(enc):
    """An example whose continuation is the model's own greedy output is right; one token changed, it is not."""
    model = random_gpt(seed=4)
    encode = lambda text: [EOT] + enc.encode_ordinary(text)  # noqa: E731
    examples = []
    for word in ["Hello", "The river", "Once upon a time", "In 1999", "Sky", "Paper boats", "My cat", "Tomorrow",
                 "Rain", "A door", "Music", "Winter"]:
        ids = encode(word)
        for _ in range(2):  # two greedy tokens
            with torch.no_grad():
                logits, _ = model(torch.tensor([ids]), targets=torch.tensor([ids]))
            ids.append(int(logits[0, -1, :50257].argmax()))
        text = enc.decode(ids[-2:])
        if text.startswith(" ") and len(text) > 1 and encode(f"{word}{text}") == ids:  # the delimiter is the space
            examples.append({"context": word, "continuation": text[1:]})
    assert len(examples) >= 2, "no greedy continuation of these words round-trips through the tokenizer"
    examples.append(dict(examples[0], continuation=examples[0]["continuation"] + " zebra"))
    task = core_eval.Task("greedy", "language_modeling", 0, " ", 0.0, "", lambda t: list(examples))
    es = core_eval.EvalSet([(task, examples)], None, 0, encode, 50257)
    assert core_eval.evaluate(model, es).scores[0].right == len(examples) - 1


@pytest.mark.gpt2_bpe
def test_rows_longer_than_the_context_keep_their_end(bundle, enc):
    model = random_gpt(block_size=24, seed=2)
    task = core_eval.load_bundle(bundle)["mc_fewshot"]  # 2-shot prompts: ~60 tokens, cut to 24
    examples = core_eval.load_examples(task)
    es = evalset(bundle, "mc_fewshot")
    for i in range(len(examples)):
        prompts = core_eval.render(task, examples, i)
        rows = core_eval.rows_of(task.kind, prompts, es.encode, 24)
        full = [[EOT] + enc.encode_ordinary(p) for p in prompts]
        assert all(len(f) > 24 and t == f[-24:] for (t, _, _), f in zip(rows, full))
        means, _ = direct(model, enc, task.kind, prompts, 24)
        assert torch.allclose(core_eval.score_rows(model, rows, es.vocab)[0], means, rtol=1e-4, atol=1e-4)


def test_centered_accuracy_and_core_on_hand_made_results():
    t = lambda label, baseline: core_eval.Task(label, "multiple_choice", 0, " ", baseline, "")  # noqa: E731
    scores = [core_eval.Score(t("a", 0.25), 100, 40, 2.0),  # (0.40 - 0.25) / 0.75 = 0.2
              core_eval.Score(t("b", 0.5), 10, 5, 1.0),  # chance: 0
              core_eval.Score(t("c", 0.0), 50, 10, 1.0),  # 0.2
              core_eval.Score(t("d", 0.5), 20, 6, 1.0)]  # below chance: (0.3 - 0.5) / 0.5 = -0.4
    assert [s.centered for s in scores] == pytest.approx([0.2, 0.0, 0.2, -0.4])
    report = core_eval.Report(scores, ["a", "b", "c", "d"], 0)
    assert report.core_metric == pytest.approx(0.0) and report.examples == 180
    assert report.summary() == "CORE 0.0000 over 4 tasks (180 examples in 5.0s)"
    record = report.record()
    assert record["centered_d"] == pytest.approx(-0.4) and record["acc_a"] == pytest.approx(0.4)
    subset = core_eval.Report(scores[:2], None, 10)
    assert subset.core_metric is None and subset.mean_centered == pytest.approx(0.1)
    assert subset.summary() == "a 40.00%, b 50.00%, mean centered 0.1000 (110 examples in 3.0s)"
    out = report.as_json(model="m")
    assert out["model"] == "m" and out["tasks"]["a"]["centered"] == pytest.approx(0.2)
    assert out["examples_per_s"] == pytest.approx(36.0) and out["core"] == pytest.approx(0.0)


@pytest.mark.gpt2_bpe
def test_evaluate_switches_a_training_model_to_eval_and_back(bundle):
    es = evalset(bundle, "mc_zeroshot,schema_fewshot")
    model = random_gpt(dropout=0.5)
    expected = [s.right for s in core_eval.evaluate(model, es).scores]
    model.train()
    assert [s.right for s in core_eval.evaluate(model, es).scores] == expected  # no dropout: switched to eval
    assert model.training  # and back
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)  # an autocast context, as train.py has one
    assert core_eval.evaluate(model, es, autocast=bf16).examples == 9 and model.training


@pytest.mark.gpt2_bpe
def test_ranks_share_the_examples(bundle):
    """Without a process group each rank returns its own counts; together they are the whole evaluation."""
    es = evalset(bundle)
    model = random_gpt(seed=1)
    whole = core_eval.evaluate(model, es)
    parts = [core_eval.evaluate(model, es, rank=r, world_size=2) for r in (0, 1)]
    for w, a, b in zip(whole.scores, *[p.scores for p in parts]):
        assert (a.examples + b.examples, a.right + b.right) == (w.examples, w.right)
        assert a.examples - b.examples in (0, 1)


# ----------------------------------------------------------------------------- files: HellaSwag's, the bundle's

HELLASWAG = [(ex["query"], ex["choices"], ex["gold"]) for ex in MC_ZEROSHOT]


def write_hellaswag(path):
    """A .jsonl file with every field of the official HellaSwag files."""
    with open(path, "w", encoding="utf-8") as f:
        for i, (ctx, endings, label) in enumerate(HELLASWAG):
            ctx_a, _, ctx_b = ctx.rpartition(". ")
            f.write(json.dumps({"ind": 100 + i, "activity_label": "x", "ctx_a": ctx_a + ".", "ctx_b": ctx_b,
                                "ctx": ctx, "split": "val", "split_type": "indomain", "label": label,
                                "endings": endings, "source_id": f"activitynet~v_{i:011d}"}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory):
    return write_hellaswag(tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl")


@pytest.mark.gpt2_bpe
def test_hellaswag_file_is_a_zero_shot_multiple_choice_task(hellaswag_file, bundle):
    examples = hellaswag.load_examples(hellaswag_file)
    assert examples[0] == {"query": HELLASWAG[0][0], "choices": HELLASWAG[0][1], "gold": 3}
    tasks, core = core_eval.select("hellaswag", hellaswag_file=hellaswag_file)
    assert core is None and tasks[0][:5] == ("hellaswag", "multiple_choice", 0, " ", 0.25)
    assert sorted(map(json.dumps, core_eval.load_examples(tasks[0]))) == sorted(map(json.dumps, examples))
    # scored exactly as the bundle's multiple-choice task holding the same examples
    model = random_gpt(seed=3)
    es_file = core_eval.prepare("hellaswag", GPT2_META, 50304, hellaswag_file=hellaswag_file)
    es_bundle = evalset(bundle, "mc_zeroshot")
    assert core_eval.evaluate(model, es_file).scores[0].right == core_eval.evaluate(model, es_bundle).scores[0].right


@pytest.mark.parametrize("line, message", [
    ("not json", "line 2 is not JSON"),
    (json.dumps({"ctx": "a", "endings": ["b", "c"], "label": 0}), "line 2 is not a HellaSwag example"),
    (json.dumps({"ctx": "a", "endings": ["b", "c", "d", "e"], "label": ""}), "line 2 has no label"),
])
def test_hellaswag_rejects_other_files(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 1}) + "\n" + line + "\n")
    with pytest.raises(UserError, match=message):
        hellaswag.load_examples(str(path))
    with pytest.raises(UserError, match="not found: pass --hellaswag_file"):
        hellaswag.load_examples(str(tmp_path / "missing.jsonl"))


def test_bundle_tasks_reject_bad_lines(tmp_path):
    folder = write_bundle(tmp_path / "eval_bundle")
    with open(os.path.join(folder, "eval_data", TASKS["schema_zeroshot"][4]), "a") as f:
        f.write(json.dumps({"context_options": ["a", "b"], "gold": 0}) + "\n")
    with pytest.raises(UserError, match=r"line 5 is not a schema example \(it needs context_options, continuation"):
        core_eval.load_examples(core_eval.load_bundle(folder)["schema_zeroshot"])


def test_downloads_happen_once_and_failing_says_what_to_pass(tmp_path, bundle, hellaswag_file):
    archive = tmp_path / "server" / "eval_bundle.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        for root, _, files in os.walk(bundle):
            for name in files:
                path = os.path.join(root, name)
                z.write(path, os.path.join("eval_bundle", os.path.relpath(path, bundle)))
    cache = tmp_path / "cache"
    folder = core_eval.download_bundle(str(cache), url=archive.as_uri())
    assert folder == str(cache / "eval_bundle") and list(core_eval.load_bundle(folder)) == list(TASKS)
    assert sorted(os.listdir(cache)) == ["eval_bundle"]  # the zip and the staging folder are gone
    archive.unlink()
    assert core_eval.download_bundle(str(cache), url=archive.as_uri()) == folder  # cached: not fetched again
    with pytest.raises(UserError, match=r"could not download .*: download it .* pass --bundle=path/to/eval_bundle"):
        core_eval.download_bundle(str(tmp_path / "cache2"), url="http://127.0.0.1:9/eval_bundle.zip")
    assert not os.path.exists(tmp_path / "cache2" / "eval_bundle.zip")
    (tmp_path / "cache3").mkdir()
    (tmp_path / "cache3" / "eval_bundle.zip").write_bytes(b"not a zip")  # e.g. an error page saved as the file
    with pytest.raises(UserError, match="was not a whole zip file"):
        core_eval.download_bundle(str(tmp_path / "cache3"), url="http://127.0.0.1:9/eval_bundle.zip")
    assert os.listdir(tmp_path / "cache3") == []

    source = tmp_path / "server" / "hellaswag_val.jsonl"
    source.write_bytes(open(hellaswag_file, "rb").read())
    path = core_eval.fetch(source.as_uri(), str(cache / "hellaswag" / "hellaswag_val.jsonl"), "pass it")
    assert len(hellaswag.load_examples(path)) == len(HELLASWAG)
    with pytest.raises(UserError, match=r"could not download .*hellaswag_val.jsonl .*: pass it"):
        core_eval.fetch("http://127.0.0.1:9/hellaswag_val.jsonl", str(tmp_path / "h" / "h.jsonl"), "pass it")


# ----------------------------------------------------------------------------- eval.py

def read_results(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.gpt2_bpe
@pytest.mark.slow
def test_eval_on_a_hf_folder_equals_its_checkpoint(monkeypatch, tmp_path, bundle):
    """A GPT-2-shaped checkpoint (vocabulary padded to 50304) and the transformers folder export.py makes of it."""
    import runpy

    model = random_gpt(block_size=64, seed=5)
    save_checkpoint(model, tmp_path / "out", GPT2_META)
    monkeypatch.setattr(sys, "argv", ["export.py", f"--out_dir={tmp_path / 'out'}", f"--hf_dir={tmp_path / 'hf'}"])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    runpy.run_path(os.path.join(REPO, "export.py"), run_name="__main__")

    proc = run("eval.py", f"--out_dir={tmp_path / 'out'}", f"--bundle={bundle}", "--device=cpu", "--dtype=float32",
               env=ONE_THREAD)
    assert "eval: 6 task(s) (core), 28 examples, on 1 process(es)" in proc.stdout
    assert re.search(r"^CORE +28 +-?[\d.]+ +[\d.]+$", proc.stdout, re.M), proc.stdout  # examples, CORE, ex/s
    assert "reference: OpenAI's GPT-2 scores CORE 0.1139 (124M)" in proc.stdout
    from_ckpt = read_results(tmp_path / "out" / "best.core.json")  # beside the checkpoint
    assert f"wrote {tmp_path / 'out' / 'best.core.json'}" in proc.stdout
    for label, row in from_ckpt["tasks"].items():
        assert re.search(rf"^{label} +\w+ +\d+ +{row['examples']} +{row['accuracy']:.4f} +{row['centered']:.4f} ",
                         proc.stdout, re.M), proc.stdout

    proc = run("eval.py", f"--init_from={tmp_path / 'hf'}", f"--bundle={bundle}", "--device=cpu", "--dtype=float32",
               f"--results={tmp_path / 'hf.json'}", env=ONE_THREAD)
    from_hf = read_results(tmp_path / "hf.json")
    assert [(r["right"], r["examples"]) for r in from_hf["tasks"].values()] == \
           [(r["right"], r["examples"]) for r in from_ckpt["tasks"].values()]
    assert from_hf["core"] == pytest.approx(from_ckpt["core"])
    es = evalset(bundle)
    direct_report = core_eval.evaluate(model, es)
    assert [s.right for s in direct_report.scores] == [r["right"] for r in from_ckpt["tasks"].values()]
    assert from_ckpt["core"] == pytest.approx(direct_report.core_metric)


@pytest.mark.gpt2_bpe
def test_eval_hellaswag_alone_with_a_limit(tmp_path, hellaswag_file):
    model = random_gpt(block_size=48, seed=3)
    save_checkpoint(model, tmp_path / "out", GPT2_META)
    proc = run("eval.py", f"--out_dir={tmp_path / 'out'}", "--tasks=hellaswag", f"--hellaswag_file={hellaswag_file}",
               "--device=cpu", "--limit=4", "--ckpt=latest", env=ONE_THREAD)
    assert "eval: 1 task(s) (hellaswag), 4 examples (at most 4 per task)" in proc.stdout
    assert "reference: OpenAI's GPT-2 124M: 30.9% on CORE's 0-shot HellaSwag" in proc.stdout
    results = read_results(tmp_path / "out" / "ckpt.hellaswag-limit4.json")
    es = core_eval.prepare("hellaswag", GPT2_META, 50304, hellaswag_file=hellaswag_file, limit=4)
    assert results["tasks"]["hellaswag"]["right"] == core_eval.evaluate(model, es).scores[0].right
    assert results["limit"] == 4 and results["core"] is None
    assert importlib.import_module("eval").written_here(tmp_path / "out" / "ckpt.hellaswag-limit4.json")  # replaceable


@pytest.mark.gpt2_bpe
@pytest.mark.slow
def test_eval_under_torchrun_with_two_ranks_equals_one_process(tmp_path, bundle):
    model = random_gpt(seed=1)
    save_checkpoint(model, tmp_path / "out", GPT2_META)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "eval.py", f"--out_dir={tmp_path / 'out'}", f"--bundle={bundle}", "--device=cpu",
                           "--dtype=float32", "--batch_tokens=300"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **ONE_THREAD}, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("eval: 6 task(s) (core), 28 examples, on 2 process(es)") == 1  # rank 0 alone prints
    results = read_results(tmp_path / "out" / "best.core.json")
    whole = core_eval.evaluate(model, evalset(bundle))
    assert results["world_size"] == 2 and results["core"] == pytest.approx(whole.core_metric)
    assert [(r["examples"], r["right"]) for r in results["tasks"].values()] == \
           [(s.examples, s.right) for s in whole.scores]


@pytest.mark.gpt2_bpe
def test_eval_errors_are_one_line(tmp_path, bundle):
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=65))
    chars = [chr(32 + i) for i in range(65)]
    save_checkpoint(model, tmp_path / "char", {"vocab_size": 65, "itos": dict(enumerate(chars)),
                                               "stoi": {c: i for i, c in enumerate(chars)}})
    save_checkpoint(GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=1000)), tmp_path / "small",
                    {"vocab_size": 1000, "tokenizer": "gpt2", "dtype": "uint16"})
    for args, message in [
        ([f"--out_dir={tmp_path / 'char'}"], "is character-level: CORE and HellaSwag are text"),
        ([f"--out_dir={tmp_path / 'small'}"], "has a vocabulary of 1000 tokens, fewer than its tokenizer's 50257"),
        ([f"--out_dir={tmp_path / 'none'}"], "no checkpoint at"),
        (["--limit=-1"], "limit=-1 cannot work: limit must be >= 0"),
        ([f"--results={tmp_path / 'no' / 'r.json'}"], "its folder does not exist"),
        ([f"--results={tmp_path / 'notes.json'}"], f"results '{tmp_path / 'notes.json'}' is a file eval.py did not "
                                                   f"write: replace it with --overwrite=True (once the evaluation"),
        ([f"--results={tmp_path}"], f"results '{tmp_path}' is a folder: "),
    ]:
        proc = run("eval.py", "--device=cpu", f"--bundle={bundle}", *args, env=ONE_THREAD, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        last = proc.stderr.strip().splitlines()
        assert len(last) == 1 and last[0].startswith("error: ") and message in last[0], proc.stderr
    assert (tmp_path / "notes.json").read_text() == '{"mine": 1}'


# ----------------------------------------------------------------------------- train.py --eval_every

@pytest.mark.gpt2_bpe
def test_train_scores_tasks_every_n_steps_and_refuses_char_data(tmp_path, bundle, char_data):
    data = tmp_path / "bpe"
    data.mkdir()
    ids = np.random.default_rng(0).integers(0, 50257, size=4000).astype(np.uint16)  # random GPT-2 ids
    for split in ("train", "val"):
        ids.tofile(data / f"{split}.bin")
    meta = {"format": 1, **GPT2_META, "eot": 50256, "tokens": {"train": len(ids), "val": len(ids)}}  # as prepare writes
    (data / "meta.json").write_text(json.dumps(meta))
    args = [*TINY, "--max_iters=3", "--eval_interval=3", "--sample_interval=0", "--eval_every=2",
            f"--eval_bundle={bundle}", "--eval_limit=3"]
    proc = run("train.py", *args, f"--dataset={data}", f"--out_dir={tmp_path / 'out'}", env=ONE_THREAD)
    lines = re.findall(r"^eval at step (\d+): CORE (-?[\d.]+) \(estimate\) over 6 tasks, at most 3 examples per task",
                       proc.stdout, re.M)
    assert [step for step, _ in lines] == ["2", "3"], proc.stdout  # every 2 steps, and at the end
    with open(tmp_path / "out" / "metrics.jsonl") as f:
        records = [json.loads(r) for r in f if '"tasks"' in r]
    assert [r["step"] for r in records] == [2, 3] and records[0]["examples"] == 18 and records[0]["limit"] == 3
    assert records[1]["core"] == pytest.approx(float(lines[1][1]), abs=1e-4)
    assert set(records[0]) >= {f"centered_{label}" for label in TASKS}
    proc = run("train.py", *args, f"--dataset={char_data}", f"--out_dir={tmp_path / 'char'}", env=ONE_THREAD,
               check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: the dataset is character-level"), proc.stderr
    assert proc.stderr.strip().endswith("or set --eval_every=0")


def test_loss_png_draws_the_task_scores_under_the_losses(tmp_path):
    from lib import metrics

    curve = ([1, 2, 3], [3.0, 2.5, 2.0], [1e-3] * 3)
    evals = [{"step": 3, "train_loss": 2.0, "val_loss": 2.1}]
    fig = metrics.plot_losses(str(tmp_path / "a.png"), *curve, evals, 64, "plain")
    assert [a.get_ylabel() for a in fig.axes if a.get_ylabel() in ("CORE", "mean centered\naccuracy")] == []
    scores = [{"kind": "tasks", "step": 2, "core": 0.01, "mean_centered": 0.01},
              {"kind": "tasks", "step": 3, "core": 0.03, "mean_centered": 0.03}]
    for given, label, values in [(scores, "CORE", [0.01, 0.03]),
                                 ([{**r, "core": None} for r in scores], "mean centered\naccuracy", [0.01, 0.03])]:
        fig = metrics.plot_losses(str(tmp_path / "b.png"), *curve, evals, 64, "with scores", given)
        (panel,) = [a for a in fig.axes if a.get_ylabel() == label]
        assert list(panel.lines[0].get_xdata()) == [2, 3] and list(panel.lines[0].get_ydata()) == values
        assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
