"""
What a model can do: the CORE metric (DCLM's 22 tasks), any of its tasks, or HellaSwag alone (docs/eval.md).

    python eval.py --init_from=gpt2                          # CORE of OpenAI's GPT-2 124M (downloads the bundle once)
    python eval.py --out_dir=out-owt --limit=500             # a quick estimate for a checkpoint of train.py
    python eval.py --out_dir=out-owt --tasks=hellaswag       # HellaSwag's validation file, 0-shot
    python eval.py --init_from=path/to/hf_gpt2 --tasks=arc_easy,piqa --bundle=path/to/eval_bundle
    torchrun --standalone --nproc_per_node=8 eval.py --init_from=gpt2-xl    # the examples split over 8 GPUs

Prints each task's accuracy and centered accuracy as it finishes, then CORE (or the mean centered accuracy), and
writes them as JSON beside the checkpoint (--results elsewhere).
"""

import json
import os
import re
import sys
import time

import torch

from configurator import configure
from lib import checkpoint, core_eval, hellaswag
from lib.files import guard, write_json
from lib.runtime import UserError, install_error_hook, setup

# ----------------------------------------------------------------------------- settings
init_from = "resume"  # 'resume' (a checkpoint in out_dir), 'gpt2'..'gpt2-xl', or a local HF GPT-2 folder
out_dir = "out"
ckpt = "best"  # with init_from='resume': 'best' (best.pt, else ckpt.pt), 'latest' (ckpt.pt), or a file in out_dir
tasks = "core"  # 'core' (CORE's 22 tasks), 'hellaswag' (its validation file, 0-shot), or core.yaml's labels, a,b,c
limit = 0  # at most this many examples per task, the same ones each time (0: all): a quick, noisier estimate
bundle = ""  # CORE's eval bundle folder (core.yaml, eval_meta_data.csv, eval_data/); '': data/eval_bundle/, downloaded
hellaswag_file = ""  # hellaswag_val.jsonl for tasks=hellaswag; '': data/hellaswag/hellaswag_val.jsonl, downloaded once
results = ""  # the JSON file to write; '': beside the checkpoint (out_dir/best.core.json), none for GPT-2 weights
overwrite = False  # replace a --results file that eval.py did not write (its own earlier results it always replaces)
batch_tokens = 0  # tokens per forward pass (rows x longest row, whole examples); 0: 16,384 on a GPU, 4,096 elsewhere
progress = True  # a progress bar on stderr (when it is a terminal)
device = "auto"
dtype = "auto"
# -----------------------------------------------------------------------------


ROW = "{:<34} {:<17} {:>5} {:>8} {:>8} {:>8} {:>7}"  # task, kind, shots, examples, accuracy, centered, ex/s


def row(score):
    s = score
    return ROW.format(s.task.label, s.task.kind, s.task.shots, f"{s.examples:,}", f"{s.accuracy:.4f}",
                      f"{s.centered:.4f}", f"{s.examples / max(s.seconds, 1e-9):.1f}")


def last_row(report):
    """CORE, or the mean centered accuracy of a subset of tasks, and the speed over all of them."""
    name, value = ("CORE", report.core_metric) if report.core is not None else ("mean", report.mean_centered)
    estimate = f" (estimate: at most {report.limit:,} examples per task)" if report.limit else ""
    return ROW.format(name, "", "", f"{report.examples:,}", "", f"{value:.4f}",
                      f"{report.examples / max(report.seconds, 1e-9):.1f}") + estimate


def results_path():
    """Where the results go: --results, or beside the checkpoint, named by the tasks (and the limit)."""
    if results or init_from != "resume":
        return results or None
    name = re.sub(r"[^\w.-]+", "+", tasks.strip()) + (f"-limit{limit}" if limit else "")
    return f"{os.path.splitext(checkpoint.find(out_dir, ckpt))[0]}.{name}.json"


def written_here(path):
    """Whether path holds results this script wrote (Report.as_json's keys), which a new evaluation replaces."""
    try:
        with open(path, encoding="utf-8") as f:
            return {"asked", "core", "tasks"} <= set(json.load(f))
    except (OSError, ValueError, TypeError):
        return False


def main():
    install_error_hook()
    configure(globals(), sys.argv[1:])
    path = results_path()
    if results and not os.path.isdir(os.path.dirname(os.path.abspath(results))):
        raise UserError(f"--results={results}: its folder does not exist")
    if path:  # checked before the evaluation, not after its minutes
        guard([path], overwrite, "--results", path, ours=written_here, when="once the evaluation is done",
              holds=lambda _: "is a folder" if os.path.isdir(path) else "is a file eval.py did not write")
    rt = setup(device, dtype, distributed=True)
    master = rt.rank == 0
    model, meta = checkpoint.load_for_inference(init_from, out_dir, ckpt)
    name = f"the checkpoint in {out_dir}" if init_from == "resume" else init_from
    evalset = core_eval.prepare(tasks, meta, model.config.vocab_size, bundle, hellaswag_file, limit, rt.rank,
                                rt.world_size, what=name)
    model.to(rt.device)
    if master:
        n = sum(len(examples) for _, examples in evalset.tasks)
        print(f"eval: {len(evalset.tasks)} task(s) ({tasks}), {n:,} examples"
              f"{f' (at most {limit:,} per task)' if limit else ''}, on {rt.world_size} process(es)")
        print(f"model: {out_dir if init_from == 'resume' else init_from}, {model.get_num_params() / 1e6:.2f}M "
              f"parameters, {model.config.block_size} positions, {rt.device} {rt.dtype}")
        print(ROW.format("task", "kind", "shots", "examples", "accuracy", "centered", "ex/s"))
    t0 = time.time()
    report = core_eval.evaluate(model, evalset, rt.device, rt.autocast, rt.rank, rt.world_size, batch_tokens,
                                progress, on_score=lambda score: master and print(row(score)))
    if master:
        print(last_row(report))
        if report.core is not None:
            print(f"reference: {core_eval.REFERENCE}")
        elif [s.task.label for s in report.scores] == ["hellaswag"]:
            print(f"reference: {hellaswag.REFERENCE}")
        if path:
            resumed = init_from == "resume"
            write_json(path, report.as_json(
                model=out_dir if resumed else init_from, checkpoint=checkpoint.find(out_dir, ckpt) if resumed else None,
                asked=tasks, world_size=rt.world_size, device=rt.device, dtype=rt.dtype,
                wall_s=round(time.time() - t0, 3), date=time.strftime("%Y-%m-%d %H:%M")))
            print(f"wrote {path}")
        else:
            print("results not written: pass --results=path/to/results.json to keep them")
    if rt.world_size > 1:
        torch.distributed.destroy_process_group()
        # skip interpreter teardown, where gloo's threads can still abort a finished process (as train.py does)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
