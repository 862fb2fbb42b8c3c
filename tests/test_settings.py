"""
Every setting of every script is checked before any work starts: a walk over the settings each script's --help
lists gives each one a value it cannot take and expects one line naming it (configurator.RULES for the scripts
that use configure, rule= and choices= beside each default for the argparse ones).

The walk runs the scripts in this process (runpy), as `python SCRIPT ARGS` would, so it takes seconds for ~300
settings. A new script is one more entry in SCRIPTS.
"""

import ast
import contextlib
import io
import os
import runpy
import sys

import pytest

import configurator
from configurator import RULES, ConfigError
from conftest import REPO, run

TRAIN_FREE = {"out_dir", "wandb_project", "wandb_run_name", "dataset", "sample_prompt", "eval_tasks", "eval_bundle",
              "hellaswag_file"}
CORPUS_FREE = {"data_files", "out_dir", "hub_dataset", "name", "revision", "split", "val_split", "text_field"}
# script: (arguments after which it stops at once should a bad value ever pass its check ({tmp}: an empty folder),
#          its settings that take any value of their type: names, paths, prompts)
SCRIPTS = {
    "train.py": (["--device=cpu", "--dataset={tmp}/none", "--out_dir={tmp}/out"], TRAIN_FREE),
    "sample.py": (["--device=cpu", "--out_dir={tmp}"], {"out_dir", "ckpt", "start"}),
    "bench.py": (["--device=mps"], TRAIN_FREE | {"profile_dir", "against"}),  # (tests run on Linux: no MPS)
    "export.py": (["--out_dir={tmp}", "--hf_dir={tmp}/hf"], {"out_dir", "ckpt", "hf_dir"}),
    "eval.py": (["--device=cpu", "--out_dir={tmp}"],
                {"out_dir", "ckpt", "tasks", "bundle", "hellaswag_file", "results"}),
    "experiments/lr_find.py": (["--device=cpu", "--dataset={tmp}/none"], TRAIN_FREE | {"out_png"}),
    "experiments/ablation.py": (["--dataset={tmp}/none"], {"dataset", "out", "plot"}),
    "experiments/scaling_sweep.py": (["--dataset={tmp}/none"], {"dataset", "out_dir"}),
    "data/shakespeare/prepare.py": (["--input={tmp}/none.txt"], {"input", "out_dir"}),
    "data/shakespeare_char/prepare.py": (["--input={tmp}/none.txt"], {"input", "out_dir"}),
    "data/openwebtext/prepare.py": (["--data_files={tmp}/none"], CORPUS_FREE),
    "data/fineweb_edu/prepare.py": (["--data_files={tmp}/none"], CORPUS_FREE),
    "data/tinystories/prepare.py": (["--data_files={tmp}/none"], CORPUS_FREE),
    "data/text/prepare.py": (["{tmp}/none"], CORPUS_FREE - {"data_files"}),  # (its files: positional)
    "data/train_tokenizer.py": (["{tmp}/none.txt", "--out={tmp}/tokenizer.json"], {"out"}),
    "chat.py": (["--device=cpu", "--out_dir={tmp}"], {"out_dir", "ckpt", "prompt", "system"}),
    "eval_chat.py": (["--device=cpu", "--out_dir={tmp}", "--tests={tmp}/none.jsonl"],
                     {"out_dir", "ckpt", "tests", "dataset"}),
    "data/chat/prepare.py": (["--data_files={tmp}/none", "--out_dir={tmp}/out"],
                             CORPUS_FREE - {"text_field"} | {"messages_field", "tokenizer"}),
    "data/chat/synthetic.py": (["--out={tmp}/out", "--words_from={tmp}/none.txt"], {"out", "words_from"}),
    "bench/decode.py": (["--device=mps"], {"ckpt_dir"}),
    "bench/gpu_check.py": (["--device=mps"], {"input", "dataset", "check"}),
}


def run_in_process(script, args, parsers=None):
    """Run a script as `python script args` does, here: (what it raised or exited with, stdout, stderr)."""
    path = os.path.join(REPO, script)
    out, err, argv, hook, cwd = io.StringIO(), io.StringIO(), sys.argv, sys.excepthook, os.getcwd()
    sys.argv = [path, *args]
    try:
        os.chdir(REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(path, run_name="__main__")
        outcome = None
    except (Exception, SystemExit) as e:
        outcome = e
    finally:
        sys.argv, sys.excepthook = argv, hook  # (the scripts install their error hook)
        os.chdir(cwd)
    return outcome, out.getvalue(), err.getvalue()


def listed_settings(script, monkeypatch):
    """(name, default or None, Rule or None, choices, option) of every setting --help lists."""
    parsers = []
    parse = configurator.ArgumentParser.parse_known_args

    def keep(self, *args, **kwargs):  # the argparse scripts' parser, as --help finds it
        parsers.append(self)
        return parse(self, *args, **kwargs)

    monkeypatch.setattr(configurator.ArgumentParser, "parse_known_args", keep)
    outcome, out, err = run_in_process(script, ["--help"])
    assert isinstance(outcome, SystemExit) and outcome.code in (0, None), (outcome, err)
    if parsers:  # argparse
        return [(a.dest, a.default, a.rule, a.choices, a.option_strings[-1]) for a in parsers[-1]._actions
                if a.option_strings and a.dest != "help" and a.nargs != 0]  # (store_true: a bool, any is fine)
    settings = []
    for line in out.splitlines():
        if line.startswith("  --") and "=" in line:
            name, text = line[4:].split("=", 1)
            text = text.removesuffix(f"  ({RULES[name].allowed})") if name in RULES else text
            settings.append((name, ast.literal_eval(text), RULES.get(name), None, f"--{name}"))
    assert settings, out
    return settings


def bad_value(name, default, rule, choices):
    """A value the setting cannot take, as typed on the command line; None if it takes any value of its type."""
    if rule is not None:
        return str(rule.bad)
    if choices:
        return "bogus"
    if isinstance(default, bool):
        return "maybe"
    return None


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_setting_refuses_a_value_it_cannot_take_in_one_line(script, monkeypatch, tmp_path):
    stop_args, free = SCRIPTS[script]
    stop_args = [a.format(tmp=tmp_path) for a in stop_args]
    settings = listed_settings(script, monkeypatch)
    unchecked = [name for name, default, rule, choices, _ in settings
                 if bad_value(name, default, rule, choices) is None and name not in free]
    assert not unchecked, (f"{script}: no rule says what {', '.join(unchecked)} may be: add one to configurator.RULES "
                           f"(or rule= beside an argparse default), or list the setting as free here")
    assert not free - {name for name, *_ in settings}, f"{script} has no setting {free - {n for n, *_ in settings}}"
    for name, default, rule, choices, option in settings:
        bad = bad_value(name, default, rule, choices)
        if bad is None:
            continue
        outcome, out, err = run_in_process(script, [*stop_args, f"{option}={bad}"])
        if isinstance(outcome, ConfigError):  # the configure scripts: install_error_hook prints it, exit 1
            message = str(outcome)
        else:  # the argparse scripts print it themselves
            assert isinstance(outcome, SystemExit) and outcome.code == 1, f"{option}={bad}: {outcome!r}\n{err}"
            assert len(err.strip().splitlines()) == 1, f"{option}={bad}: {err}"
            message = err.strip()
            assert message.startswith("error: ")
        assert "\n" not in message and (f"{name}=" in message or f"{option}" in message), f"{option}={bad}: {message}"
        assert bad.strip("'") in message, message  # the value given


def test_the_command_line_gets_the_one_line_and_exit_1(char_data, tmp_path):
    """The walk above in the real command line: stderr is the one line, the exit status 1, nothing else."""
    for script, args, line in [
        ("train.py", ["--lr_schedule=bogus"], "error: lr_schedule='bogus' cannot work: lr_schedule must be one of "
                                              "'cosine', 'wsd'"),
        ("experiments/scaling_sweep.py", [f"--dataset={char_data}", "--depths=2,3"],
         "error: --depths: '2,3' cannot work: it must be at least 3 comma-separated depths >= 1 (a fit of 3 "
         "constants) (see --help)"),
    ]:
        proc = run(script, *args, check=False)
        assert (proc.returncode, proc.stderr.strip()) == (1, line), proc.stderr


def test_the_silent_cases_are_refused():
    """Values that used to train something else than asked (cosine for 'bogus', no cap for -1, one step, ...)."""
    train = configurator.script_settings(os.path.join(REPO, "train.py"))
    for arg in ("--lr_schedule=bogus", "--logit_softcap=-1", "--target_flops=-5", "--cooldown_frac=2",
                "--unfreeze_every=-1", "--optimizer=sgd", "--recipe=new", "--checkpoint_format=zip", "--seed=-1",
                "--parallelism=tp", "--device=gpu", "--dtype=fp8", "--init_from=gpt3"):
        with pytest.raises(ConfigError, match=f"^{arg[2:].split('=')[0]}="):
            configure_copy(train, arg)


def configure_copy(settings, *argv):
    return configurator.configure(dict(settings), list(argv))


def test_module_constants_are_not_settings():
    """UPPER_CASE names are constants: export.py --help used to offer --GPT2_VOCAB, --EOT and --MARKER."""
    outcome, out, _ = run_in_process("export.py", ["--help"])
    assert isinstance(outcome, SystemExit)
    assert "--hf_dir=''" in out and not any(k in out for k in ("GPT2_VOCAB", "EOT", "MARKER", "REPO"))
    assert configurator._is_setting("learning_rate", 1.0) and not configurator._is_setting("GPT2_VOCAB", 50257)


def test_argparse_rules_and_errors():
    p = configurator.ArgumentParser()
    p.add_argument("--num_proc", type=int, default=1, help="processes", rule=configurator.at_least(1))
    assert p.parse_args(["--num_proc=3"]).num_proc == 3
    for args, message in ((["--num_proc=0"], "error: --num_proc: 0 cannot work: it must be >= 1 (see --help)"),
                          (["--num_proc=x"], "error: --num_proc: invalid int value: 'x' (see --help)"),
                          (["--nope=1"], "error: unrecognized arguments: --nope=1 (see --help)")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
            p.parse_args(args)
        assert e.value.code == 1 and err.getvalue() == message + "\n"
    assert "processes (>= 1)" in p.format_help()


def test_a_typo_of_a_choice_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"lr_schedule='WSD' cannot work: .* \(did you mean 'wsd'\?\)$"):
        configure_copy({"lr_schedule": "cosine"}, "--lr_schedule=WSD")
