"""Shared fixtures: the repo's scripts run as a user runs them (subprocesses), on small real data."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # import model, configurator, ... as the scripts do

# tiny settings so a training run takes seconds on a 2-core CPU
# float32: the same numbers on every CPU ('auto' is bfloat16 on CPUs with native bfloat16; tests that want it say so)
TINY = ["--device=cpu", "--dtype=float32", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--gradient_accumulation_steps=1", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2",
        "--learning_rate=1e-3", "--min_lr=1e-4"]


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="where the tests of device code run (the `device` fixture, tests/test_device.py): cpu "
                          "(the default), cuda, cuda:N or mps")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~10 s (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def device(request):
    """--device: the device the tests of device code run on (cpu unless given)."""
    import torch

    name = request.config.getoption("--device")
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available() or kind == "mps" and not torch.backends.mps.is_available():
        raise pytest.UsageError(f"--device={name}, but PyTorch sees no such device here")
    return name


def shakespeare_path():
    """The tiny Shakespeare corpus: $TINY_SHAKESPEARE, data/shakespeare_char/input.txt, or ../shared's copy."""
    for path in (os.environ.get("TINY_SHAKESPEARE"), os.path.join(REPO, "data", "shakespeare_char", "input.txt"),
                 os.path.join(REPO, "..", "shared", "data", "tinyshakespeare", "input.txt")):
        if path and os.path.isfile(path):
            return os.path.abspath(path)
    return None


@pytest.fixture(scope="session")
def shakespeare_input():
    path = shakespeare_path()
    if path is None:
        pytest.skip("tiny Shakespeare not found: set TINY_SHAKESPEARE=path/to/input.txt")
    return path


def run(script, *args, env=None, timeout=600, check=True):
    """Run a repo script with this Python, from the repo root, as a user would. Returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
                **(env or {})}
    proc = subprocess.run([sys.executable, script, *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, shakespeare_input):
    """tiny Shakespeare prepared at the character level in a temp folder (pass as --dataset=<path>)."""
    out = tmp_path_factory.mktemp("shakespeare_char")
    run("data/shakespeare_char/prepare.py", f"--input={shakespeare_input}", f"--out_dir={out}")
    return str(out)
