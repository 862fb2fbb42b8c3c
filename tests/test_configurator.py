"""Settings: config files then --key=value, typed by the defaults, with one-line errors."""

import pytest

from configurator import ConfigError, configure
from conftest import REPO, run


def defaults():
    return dict(batch_size=12, learning_rate=6e-4, compile=True, out_dir="out", wandb_run_name=None, max_iters=100)


def test_overrides_are_typed_by_their_defaults():
    ns = defaults()
    config, explicit = configure(ns, ["--batch_size=32", "--learning_rate=1", "--compile=False", "--out_dir=123",
                                      "--max_iters=5e3"])
    assert ns["batch_size"] == 32 and ns["learning_rate"] == 1.0 and isinstance(ns["learning_rate"], float)
    assert ns["compile"] is False and ns["out_dir"] == "123" and ns["max_iters"] == 5000
    assert isinstance(ns["max_iters"], int)
    assert explicit == {"batch_size", "learning_rate", "compile", "out_dir", "max_iters"} and config == ns


def test_none_is_allowed_where_the_default_is_none():
    ns = defaults()
    configure(ns, ["--wandb_run_name=run-1"])
    assert ns["wandb_run_name"] == "run-1"
    ns = defaults()
    configure(ns, ["--wandb_run_name=None"])
    assert ns["wandb_run_name"] is None
    with pytest.raises(ConfigError, match="batch_size=None is a NoneType, expected int"):
        configure(defaults(), ["--batch_size=None"])


@pytest.mark.parametrize("arg, message", [
    ("--batch_size=abc", "--batch_size=abc: batch_size='abc' is a str, expected int"),
    ("--batch_size=1.5", "batch_size=1.5 is a float, expected int"),
    ("--compile=1", "compile=1 is a int, expected bool"),
    ("--learning_rate=fast", "learning_rate='fast' is a str, expected float"),
    ("--batch_sise=3", "unknown config key 'batch_sise' (did you mean batch_size?)"),
    ("--batch_size", "--batch_size: settings are given as --key=value"),
    ("nope.py", "config file nope.py not found"),
])
def test_bad_overrides_name_key_value_and_type(arg, message):
    with pytest.raises(ConfigError) as e:
        configure(defaults(), [arg])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_file_then_overrides(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("import math\nbatch_size = 4 * 8  # arithmetic is fine\nlearning_rate = 1\n_private = 'x'\n"
                   "max_iters = int(math.sqrt(batch_size * 2))\n")
    ns = defaults()
    _, explicit = configure(ns, [str(cfg), "--batch_size=7"])
    assert ns["batch_size"] == 7 and ns["learning_rate"] == 1.0 and ns["max_iters"] == 8
    assert explicit == {"batch_size", "learning_rate", "max_iters"}
    assert "_private" not in ns and "math" not in ns


def test_config_file_keys_are_checked_even_when_equal_to_the_default(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("batch_size = 12\n")
    _, explicit = configure(defaults(), [str(cfg)])
    assert explicit == {"batch_size"}  # explicitly set, so a checkpoint with another value is a conflict
    cfg.write_text("batch_sizes = 12\n")
    with pytest.raises(ConfigError, match=r"config file .*cfg.py: unknown config key 'batch_sizes'"):
        configure(defaults(), [str(cfg)])
    cfg.write_text("compile = 'yes'\n")
    with pytest.raises(ConfigError, match="compile='yes' is a str, expected bool"):
        configure(defaults(), [str(cfg)])


def test_every_shipped_config_loads_in_train_py():
    import glob

    configs = sorted(glob.glob("config/*.py", root_dir=REPO))
    assert "config/train_shakespeare_char.py" in configs
    proc = run("train.py", *configs, "--help")  # each file is checked as it is applied, then --help exits
    assert "--batch_size=" in proc.stdout


def test_train_py_reports_bad_settings_in_one_line():
    proc = run("train.py", "--n_layers=2", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: --n_layers=2: unknown config key 'n_layers' (did you mean n_layer?)"
    proc = run("train.py", "--batch_size=big", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "batch_size='big' is a str, expected int" in proc.stderr


def test_help_lists_the_settings():
    proc = run("train.py", "--help")
    assert "--batch_size=12" in proc.stdout and "--init_from='scratch'" in proc.stdout
