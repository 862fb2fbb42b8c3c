"""
Shared fixtures: the repo's scripts run as a user runs them (processes of their own), on small real data. The suite
needs nothing beside the repo and no network: the text is committed here, and the tests that need GPT-2's BPE files
skip (one reason line each) where tiktoken has not cached them and cannot download them.

The text
    shakespeare_input   the path of a text file: $TINY_SHAKESPEARE when set (the whole tiny Shakespeare), else
                        tests/tiny_shakespeare_excerpt.txt (its first ~99 KB and four short speeches that hold the
                        rarest characters, so the 65 characters of the whole corpus are all there). Tests must pass
                        on either: derive expected counts from the text, do not write them down.

Prepared once per session and shared (read-only: copy what you change, e.g. with copy_run)
    char_data           shakespeare_input at the character level (data/shakespeare_char/prepare.py), a folder to
                        pass as --dataset=<path> (vocab 65)
    char_run            a model trained TINY_STEPS (4) steps on char_data with the TINY settings, evaluated and saved
                        every 2 (train.py): an out_dir (a pathlib.Path) with ckpt.pt, best.pt, metrics.jsonl and
                        loss.png. Use it to sample, export, resume (in a copy) or break a checkpoint instead of
                        training one more model.

Running scripts
    run(script, *args)  `python script args` from the repo root, as a user runs it: a CompletedProcess (text);
                        check=False to look at a failure, input= for its stdin, env= on top of this environment.
                        script may also be "-c", code or "-m", module.
    popen(script, *args, **popen_kwargs)   the same as a subprocess.Popen, for a process to signal, kill or read
                        as it runs.
                        Both start the process through tests/forkserver.py, which has torch imported: a tiny
                        training run costs ~0.5 s of CPU instead of ~4 s (TESTS_FORK_SERVER=0: new interpreters).
                        torchrun under popen starts its workers that way too. A test that measures a process's own
                        memory or page faults starts a new interpreter (subprocess with sys.executable) instead.
    TINY                the settings of a training run that takes seconds on a 2-core CPU
    copy_run(src, dst)  a copy of an out_dir (or any folder) that a test may change

Markers
    @pytest.mark.gpt2_bpe   the test needs tiktoken's GPT-2 BPE files: it skips, saying why, where they cannot be
                        had (TIKTOKEN_CACHE_DIR is set to ../shared/tiktoken_cache when that exists and it is unset)
    @pytest.mark.slow   takes more than ~10 s: `bash test.sh -m "not slow"` leaves it out
    @pytest.mark.xdist_group(name)  test.sh runs the tests on every core (pytest-xdist, --dist=loadgroup); tests of
                        one group run on one worker, e.g. those that share an expensive module fixture
"""

import atexit
import functools
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading

import pytest

from forkserver import ScriptPopen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # import model, configurator, ... as the scripts do

# one thread per process, here and in the scripts the tests run: tiny models gain nothing from more, and with pytest-xdist
# (or anything else) sharing the cores, threads that spin-wait for each other cost several times the work
os.environ.setdefault("OMP_NUM_THREADS", "1")
EXCERPT = os.path.join(REPO, "tests", "tiny_shakespeare_excerpt.txt")
SHARED_TIKTOKEN = os.path.join(REPO, "..", "shared", "tiktoken_cache")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(SHARED_TIKTOKEN):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(SHARED_TIKTOKEN)  # tiktoken's gpt2 files, offline

# tiny settings so a training run takes seconds on a 2-core CPU
# float32: the same numbers on every CPU ('auto' is bfloat16 on CPUs with native bfloat16; tests that want it say so)
TINY = ["--device=cpu", "--dtype=float32", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--gradient_accumulation_steps=1", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2",
        "--learning_rate=1e-3", "--min_lr=1e-4"]
TINY_STEPS = 4  # char_run's length


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="where the tests of device code run (the `device` fixture, tests/test_device.py): cpu "
                          "(the default), cuda, cuda:N or mps")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~10 s (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "gpt2_bpe: needs tiktoken's GPT-2 BPE files (skips where they cannot be had)")
    config.addinivalue_line("markers", "xdist_group(name): pytest-xdist --dist=loadgroup runs a group on one worker")


@pytest.fixture(scope="session")
def device(request):
    """--device: the device the tests of device code run on (cpu unless given)."""
    import torch

    name = request.config.getoption("--device")
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available() or kind == "mps" and not torch.backends.mps.is_available():
        raise pytest.UsageError(f"--device={name}, but PyTorch sees no such device here")
    return name


@functools.cache
def gpt2_bpe_missing(timeout=60):
    """None where tiktoken's GPT-2 encoding loads (from its cache, or downloaded once into it), else why not."""
    failure = []

    def load():
        try:
            import tiktoken

            tiktoken.get_encoding("gpt2")
        except Exception as e:  # no network and no cache: a ConnectionError, or whatever the network gives
            failure.append(f"{type(e).__name__}")

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    loader.join(timeout)
    if loader.is_alive():
        failure.append(f"no answer in {timeout} s")
    if not failure:
        return None
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", "tiktoken's default cache")
    return (f"GPT-2's BPE files are not in {cache} and could not be downloaded ({failure[0]}): set TIKTOKEN_CACHE_DIR "
            f"to a tiktoken cache that holds them")


def pytest_collection_modifyitems(config, items):
    needs_bpe = [item for item in items if item.get_closest_marker("gpt2_bpe")]
    if needs_bpe and gpt2_bpe_missing():
        for item in needs_bpe:
            item.add_marker(pytest.mark.skip(reason=gpt2_bpe_missing()))


_server = []  # (process, socket path) of this process's fork server, once started


def fork_server():
    """The socket of this process's fork server (forkserver.py), started on first use; None with TESTS_FORK_SERVER=0,
    and by default where the OS is not Linux (macOS's system libraries are not safe to use in a forked child)."""
    if os.environ.get("TESTS_FORK_SERVER", "1" if sys.platform.startswith("linux") else "0") == "0":
        return None
    if not _server:
        path = os.path.join(tempfile.mkdtemp(prefix="forkserver-"), "socket")
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "forkserver.py"), path], cwd=REPO,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if proc.stdout.readline() != b"ready\n":
            raise RuntimeError(f"the fork server did not start (exit code {proc.wait()})")
        python = os.path.join(os.path.dirname(path), "python")  # a `python` that runs its command through the server
        with open(python, "w") as f:
            command = [sys.executable, os.path.join(REPO, "tests", "forkserver.py"), "--relay", path]
            f.write(f"#!/bin/sh\nexec {shlex.join(command)} \"$@\"\n")
        os.chmod(python, 0o755)
        _server.append((proc, path))
        atexit.register(lambda: (proc.stdin.close(), proc.wait(), shutil.rmtree(os.path.dirname(path))))
    return _server[0][1]


def popen(*command, env=None, **kwargs):
    """subprocess.Popen of `python *command` (a repo script and its arguments, "-c" code, or "-m" module) from the repo
    root, unbuffered, with `env` on top of this environment. Through the fork server: the same process, fast; and
    torchrun, which starts its workers with $PYTHON_EXEC, starts them through it too."""
    server = fork_server()
    relay = {"PYTHON_EXEC": os.path.join(os.path.dirname(server), "python")} if server else {}
    return ScriptPopen(list(command), server, cwd=REPO,
                       env={**os.environ, "PYTHONUNBUFFERED": "1", **relay, **(env or {})}, **kwargs)


def run(script, *args, env=None, timeout=600, check=True, input=None):
    """Run a repo script with this Python, from the repo root, as a user would. Returns the CompletedProcess (text)."""
    with popen(script, *args, env=env, stdin=subprocess.PIPE if input is not None else None, stdout=subprocess.PIPE,
               stderr=subprocess.PIPE, text=True, encoding="utf-8") as proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except BaseException:
            proc.kill()
            raise
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def copy_run(src, dst):
    """A copy of the folder src (but its .lock) at dst, a pathlib.Path, for a test that changes what it holds."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"), dirs_exist_ok=True)
    return dst


@pytest.fixture(scope="session")
def shakespeare_input():
    path = os.environ.get("TINY_SHAKESPEARE") or EXCERPT
    if not os.path.isfile(path):
        pytest.fail(f"TINY_SHAKESPEARE={path} is not a file: point it at tiny Shakespeare's input.txt, or unset it")
    return os.path.abspath(path)


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, shakespeare_input):
    """shakespeare_input prepared at the character level in a temp folder (pass as --dataset=<path>)."""
    out = tmp_path_factory.mktemp("shakespeare_char")
    run("data/shakespeare_char/prepare.py", f"--input={shakespeare_input}", f"--out_dir={out}")
    return str(out)


@pytest.fixture(scope="session")
def char_run(char_data, tmp_path_factory):
    """A character-level model trained TINY_STEPS steps (evaluated and saved at every 2nd): a read-only out_dir."""
    out = tmp_path_factory.mktemp("char_run")
    run("train.py", *TINY, f"--dataset={char_data}", f"--out_dir={out}", f"--max_iters={TINY_STEPS}", "--eval_interval=2")
    return out
