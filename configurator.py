"""
Configuration: the defaults at the top of a script, then config files, then --key=value overrides.

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

The defaults are the script's plain globals and their types are the schema: a config file or an
override may only set a key that exists, to a value of the default's type. An int is fine where a
float is expected (--learning_rate=1), and None where the default is None. Anything else fails with
one line that names the key, the value and the expected type.
"""

import ast
import difflib
import os


class ConfigError(ValueError):
    """A bad config key or value: printed as one line (see runtime.install_error_hook)."""


# What each setting may be, checked after every config file and override; a script checks the keys it has.
# Values outside these cannot work (e.g. eval_iters=0 averages no batches into a NaN loss).
_AT_LEAST_1, _AT_LEAST_0 = (lambda v: v >= 1, ">= 1"), (lambda v: v >= 0, ">= 0")
_FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
RULES = {
    **dict.fromkeys(["batch_size", "block_size", "n_layer", "n_head", "n_embd", "eval_interval", "log_interval",
                     "eval_iters", "gradient_accumulation_steps", "max_bad_steps", "num_samples", "num_steps"],
                    _AT_LEAST_1),
    **dict.fromkeys(["max_iters", "warmup_iters", "lr_decay_iters", "learning_rate", "min_lr", "weight_decay",
                     "grad_clip", "keep_last_n", "temperature", "top_k", "max_new_tokens", "warmup_steps"],
                    _AT_LEAST_0),
    **dict.fromkeys(["eval_every", "eval_limit", "limit", "batch_tokens"], _AT_LEAST_0),  # eval.py, train.py
    **dict.fromkeys(["dropout", "beta1", "beta2"], _FRACTION),
}


def check_ranges(config):
    """Refuse, in one line naming the setting and its allowed range, a value that cannot work."""
    for key, (ok, allowed) in RULES.items():
        if key in config and config[key] is not None and not ok(config[key]):
            raise ConfigError(f"{key}={config[key]!r} cannot work: {key} must be {allowed}")
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
    return not name.startswith("_") and isinstance(value, (bool, int, float, str, type(None)))


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
                print(f"  --{k}={v!r}")
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
