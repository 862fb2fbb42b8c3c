"""
Configuration: the defaults at the top of a script, then config files, then --key=value overrides.

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

The defaults are the script's plain globals (lowercase names: an UPPER_CASE name is a constant, a _name private)
and their types are the schema: a config file or an override may only set a key that exists, to a value of the
default's type. An int is fine where a float is expected (--learning_rate=1), and None where the default is None.
Then every setting's value is checked against RULES, which says what each setting may be (a range, or a list of
choices), by name, for every script. Anything else fails, before any work starts, with one line that names the
key, the value and what is allowed.

A new setting: its default (with a comment) in the script's settings block, and, unless every value of its type
works (a prompt, a path), an entry in RULES: `at_least(1)`, `between(0, 1)`, `one_of("a", "b")`, or a Rule of its
own. tests/test_settings.py walks every setting that each script's --help lists and fails for a setting that no
rule covers and that is not listed there as free. A new script: its settings block and `configure(globals(),
sys.argv[1:])` (or, for a data script, `ArgumentParser` below with rule= beside each default), then one more entry
in that test's list of scripts.
"""

import argparse
import ast
import difflib
import os
import re
import sys
from collections import namedtuple


class ConfigError(ValueError):
    """A bad config key or value: printed as one line (see runtime.install_error_hook)."""


# what a setting may be: ok(value) says whether value works, allowed says so in words, and bad is a value that does
# not (tests/test_settings.py gives it to every setting)
Rule = namedtuple("Rule", "ok allowed bad choices", defaults=((),))


def at_least(low, why=""):
    return Rule(lambda v: v >= low, f">= {low}{why}", low - 1)


def above(low, why=""):
    return Rule(lambda v: v > low, f"> {low}{why}", low)


def between(low, high, high_open=False):
    """low <= value <= high (or < high)."""
    return Rule(lambda v: low <= v < high if high_open else low <= v <= high,
                f"in [{low}, {high}{')' if high_open else ']'}", high + 1)


def one_of(*choices):
    return Rule(lambda v: v in choices, f"one of {', '.join(map(repr, choices))}", "bogus", choices)


GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# Every setting of every script whose values are not all fine, by name. Values outside these cannot work (e.g.
# eval_iters=0 averages no batches into a NaN loss) or would be quietly read as something else (lr_schedule='bogus'
# trained cosine). A script checks the keys it has; a name means the same in every script that has it.
RULES = {
    **dict.fromkeys(["batch_size", "block_size", "n_layer", "n_head", "n_embd", "eval_interval", "log_interval",
                     "eval_iters", "gradient_accumulation_steps", "max_bad_steps", "num_samples", "num_steps",
                     "depth_aspect", "sample_tokens", "rounds", "vocab_size"], at_least(1)),
    **dict.fromkeys(["max_iters", "warmup_iters", "lr_decay_iters", "learning_rate", "min_lr", "weight_decay",
                     "grad_clip", "keep_last_n", "temperature", "top_k", "max_new_tokens", "warmup_steps", "seed",
                     "sample_interval", "eval_every", "eval_limit", "limit", "batch_tokens", "total_batch_size",
                     "target_flops", "tokens_per_param", "depth", "freeze_layers", "unfreeze_every", "logit_softcap",
                     "muon_lr", "max_seconds", "target_val_loss", "progress_delay", "show"], at_least(0)),
    **dict.fromkeys(["dropout", "beta1", "beta2", "muon_momentum", "smooth"], between(0, 1, high_open=True)),
    **dict.fromkeys(["cooldown_frac", "final_lr_frac"], between(0, 1)),
    **dict.fromkeys(["lr_start", "lr_end"], above(0)),
    "diverge": above(1),
    "checkpoint_format": one_of("full", "sharded"),
    "parallelism": one_of("ddp", "fsdp"),
    "recipe": one_of("gpt2", "modern"),
    "optimizer": one_of("adamw", "muon"),
    "lr_schedule": one_of("cosine", "wsd"),
    "dtype": one_of("auto", "float32", "bfloat16", "float16"),
    "device": Rule(lambda v: bool(_DEVICE.fullmatch(v)), "auto, cpu, cuda, cuda:N or mps", "bogus"),
    "clock": one_of("wall", "cpu"),
    "prompt_tokens": at_least(1),
    "new_tokens": at_least(0),
    "budget": above(0),
    "models": Rule(lambda v: set(v.split(",")) <= {"char", "char-gpt2", "gpt2"},
                   "a comma-separated list of char, char-gpt2 and gpt2", "bogus", ("char", "char-gpt2", "gpt2")),
    "batch_sizes": Rule(lambda v: all(b.isdigit() and int(b) > 0 for b in v.split(",")),
                        "a comma-separated list of integers >= 1", "0"),
    "only": Rule(lambda v: not v or set(v.split(",")) <= {"tests", "preset", "gpt2", "float16", "fsdp", "sample"},
                 "'' (every row) or a comma-separated list of tests, preset, gpt2, float16, fsdp and sample", "bogus",
                 ("tests", "preset", "gpt2", "float16", "fsdp", "sample")),
    "init_from": Rule(lambda v: v in ("scratch", "resume", *GPT2_NAMES) or "/" in v or os.path.isdir(v),
                      f"'scratch' (train.py), 'resume', {', '.join(map(repr, GPT2_NAMES))}, a hub id (org/name) or "
                      f"a local transformers GPT-2 folder", "bogus", ("scratch", "resume", *GPT2_NAMES)),
}


def rule_error(key, value, rule):
    """The one line for a value that rule refuses, with the closest choice if the value looks like a typo of one."""
    choices = {str(c).lower(): c for c in rule.choices}
    close = difflib.get_close_matches(value.lower(), choices, n=1) if isinstance(value, str) else []
    hint = f" (did you mean {choices[close[0]]!r}?)" if close else ""
    return f"{key}={value!r} cannot work: {key} must be {rule.allowed}{hint}"


def check_ranges(config):
    """Refuse, in one line naming the setting and what it may be, a value that cannot work."""
    for key, rule in RULES.items():
        if key in config and config[key] is not None and not rule.ok(config[key]):
            raise ConfigError(rule_error(key, config[key], rule))
    if "n_embd" in config and "n_head" in config and config["n_embd"] % config["n_head"]:
        raise ConfigError(f"n_embd={config['n_embd']} must be divisible by n_head={config['n_head']} "
                          f"(each head gets n_embd / n_head dimensions)")


def _run_config_file(path, scope):
    """exec a config file; a Python error in it becomes one line naming the file and line."""
    with open(path) as f:
        source = f.read()
    try:
        exec(compile(source, path, "exec"), scope)
    except SyntaxError as e:
        raise ConfigError(f"config file {path}, line {e.lineno}: {e.msg}") from None
    except Exception as e:
        tb, line = e.__traceback__, "?"
        while tb is not None:  # the deepest frame that is the config file itself
            if tb.tb_frame.f_code.co_filename == path:
                line = tb.tb_lineno
            tb = tb.tb_next
        raise ConfigError(f"config file {path}, line {line}: {type(e).__name__}: {e}") from None
    return source


def _is_setting(name, value):
    """A script's setting: a lowercase global of a plain type (UPPER_CASE names are constants, _names private)."""
    return not name.startswith("_") and not name.isupper() and isinstance(value, (bool, int, float, str, type(None)))


def _check(key, value, defaults, where):
    """Return value converted to the type of defaults[key], or raise ConfigError."""
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{where}: unknown config key '{key}'{hint}")
    default = defaults[key]
    if default is None:
        return value  # keys that default to None take any literal
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, float) and value.is_integer():
        return int(value)  # --max_iters=5e3
    if type(value) is expected:
        return value
    raise ConfigError(f"{where}: {key}={value!r} is a {type(value).__name__}, expected {expected.__name__} "
                      f"(default {default!r})")


def _parse(raw, default):
    """Turn the text of --key=text into a Python value: a literal if it parses as one, else the text."""
    if isinstance(default, str):
        return raw  # a string setting takes the text as typed, even if it looks like a number
    if isinstance(default, bool) and raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def script_settings(path):
    """
    The settings a script defines at its top: its assignments after the docstring and imports, up to its first other
    statement. bench.py takes train.py's this way, so it reads the same config files and overrides as train.py.
    """
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    scope = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)) or (isinstance(node, ast.Expr) and
                                                              isinstance(node.value, ast.Constant)):
            continue
        if not isinstance(node, ast.Assign):
            break
        exec(compile(ast.Module([node], []), path, "exec"), scope)
    return {k: v for k, v in scope.items() if _is_setting(k, v)}


def configure(namespace, argv):
    """
    Apply config files and --key=value overrides in argv to the settings in `namespace` (a script's globals()),
    in place. Returns (config, explicit): all settings as a dict, and the set of keys the user set.
    """
    defaults = {k: v for k, v in namespace.items() if _is_setting(k, v)}
    explicit = set()
    for arg in argv:
        if arg in ("-h", "--help"):
            print("settings (override with --key=value, or in a config file):")
            for k, v in defaults.items():
                print(f"  --{k}={v!r}" + (f"  ({RULES[k].allowed})" if k in RULES else ""))
            raise SystemExit(0)
        if not arg.startswith("--"):  # a config file: Python that assigns settings
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg} not found (settings are given as --key=value)")
            scope = dict(defaults)  # a config file may read the settings so far
            source = _run_config_file(arg, scope)
            for node in ast.parse(source).body:  # the names the file assigns at top level are what it sets
                if not isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                    continue
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for k in (t.id for t in targets if isinstance(t, ast.Name) and not t.id.startswith("_")):
                    defaults[k] = _check(k, scope[k], defaults, f"config file {arg}")
                    explicit.add(k)
        else:
            if "=" not in arg:
                raise ConfigError(f"{arg}: settings are given as --key=value")
            key, raw = arg[2:].split("=", 1)
            value = _parse(raw, defaults.get(key))
            defaults[key] = _check(key, value, defaults, f"--{key}={raw}")
            explicit.add(key)
    check_ranges(defaults)
    namespace.update(defaults)
    return dict(defaults), explicit


class ArgumentParser(argparse.ArgumentParser):
    """
    argparse for the data scripts, with this module's rules and errors: add_argument(..., type=int, rule=at_least(1))
    checks each value against its Rule as it is parsed, and a bad argument is one line, `error: ...`, exit 1 (plain
    argparse prints its usage and exits 2).
    """

    def add_argument(self, *args, rule=None, **kwargs):
        if rule is not None:
            kwargs["type"] = _RuleType(kwargs.get("type", str), rule)
        action = super().add_argument(*args, **kwargs)
        action.rule = rule
        if rule is not None and action.help is not None:
            action.help += f" ({rule.allowed})"
        return action

    def error(self, message):
        print(f"error: {message.removeprefix('argument ')} (see --help)", file=sys.stderr)
        raise SystemExit(1)


class _RuleType:
    """argparse's type= for a Rule: the text as the type, then the rule; its name is what argparse's message says."""

    def __init__(self, type, rule):
        self.type, self.rule, self.__name__ = type, rule, type.__name__

    def __call__(self, text):
        value = self.type(text)
        if not self.rule.ok(value):
            raise argparse.ArgumentTypeError(f"{value!r} cannot work: it must be {self.rule.allowed}")
        return value
