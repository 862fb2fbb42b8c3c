"""
HellaSwag (Zellers et al. 2019, https://github.com/rowanz/hellaswag) from its official validation file: given the
start of a scene, pick the right one of 4 endings. The file is one task of eval.py (`--tasks=hellaswag`, 0-shot),
scored as every multiple-choice task is (lib/core_eval.py); CORE holds HellaSwag too, from its own bundle.

The official files are JSON lines; what is used of each example: ctx (str), endings (4 str), label (0-3). They
become multiple-choice examples {query: ctx, choices: endings, gold: label}, each choice after a space.
"""

import json
import os

from lib.runtime import UserError

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
DELIMITER = " "  # between the context and an ending
BASELINE = 0.25  # random guessing: 1 of 4 endings
REFERENCE = ("OpenAI's GPT-2 124M: 30.9% on CORE's 0-shot HellaSwag in nanochat (the same scoring, on the bundle's "
             "version of the file); 29.55% acc_norm in build-nanogpt (no <|endoftext|> first); chance is 25%")


def load_examples(path):
    """The examples of a HellaSwag .jsonl file as multiple-choice examples (query, choices, gold)."""
    if not os.path.isfile(path):
        raise UserError(f"HellaSwag file {path} not found: pass --hellaswag_file=path/to/hellaswag_val.jsonl, or "
                        f"leave it empty to download it")
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
            endings = ex.get("endings") if isinstance(ex, dict) else None
            if not isinstance(ex, dict) or not isinstance(ex.get("ctx"), str) or not isinstance(endings, list) \
                    or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
                raise UserError(f"{where} is not a HellaSwag example (it needs ctx: text and endings: 4 texts)")
            label = ex.get("label")
            if isinstance(label, str) and label.isdigit():
                label = int(label)
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < 4:
                raise UserError(f"{where} has no label 0-3 (label={ex.get('label')!r}): the test split is unlabeled, "
                                f"use the validation file")
            examples.append({"query": ex["ctx"], "choices": ex["endings"], "gold": label})
    if not examples:
        raise UserError(f"{path} has no examples")
    return examples
