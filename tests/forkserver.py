"""
Python processes for the tests without Python's start-up: `python train.py ...` spends 3-4 s of CPU importing torch
(and torch._dynamo, which its optimizers import, and matplotlib) before its first line, more than a tiny training
run costs. This server imports them once; then for each command it forks a child that becomes the command:

    python forkserver.py SOCKET       # the server (conftest starts one per pytest process)
    ScriptPopen(["train.py", ...])    # in a test: a subprocess.Popen of `python train.py ...`
    python forkserver.py --relay SOCKET -u train.py ...   # a `python` for other programs to start (torchrun's
                                      # PYTHON_EXEC): it hands its command to the server, passes signals on to the
                                      # child and exits as the child exits; if it is killed, so is the child

The child is a process of its own, as a fresh `python` would be: its own pid (signals and SIGKILL reach it), argv,
environment, working directory, stdin/stdout/stderr (passed over the Unix socket), __main__, exit code, and
interpreter shutdown (atexit, threads joined). What it shares with the server: the modules above, as an import leaves
them (nothing of the repo: model.py and lib/ are imported fresh by each child), and the hash seed of str keys.
Each child's `random` and numpy's global generator are seeded anew, as in a fresh process.

TESTS_FORK_SERVER=0 runs every command in a new interpreter instead (plain subprocess.Popen), to compare.
"""

import io
import json
import os
import select
import signal
import socket
import subprocess
import sys

MAX_FDS = 3  # stdin, stdout, stderr


# ----------------------------------------------------------------------------- the client: a Popen

class ScriptPopen(subprocess.Popen):
    """subprocess.Popen of [sys.executable, *command] (command: a script and its arguments, "-c" code, or "-m" module),
    run by the fork server at `server` (a socket path) or, with server=None, by a new interpreter."""

    def __init__(self, command, server=None, **kwargs):
        self._server, self._status = server, None
        super().__init__([sys.executable, *command], **kwargs)

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo, creationflags,
                       shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite, *rest):
        if self._server is None:
            return super()._execute_child(args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                                          creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread,
                                          errwrite, *rest)
        try:
            request = {"argv": list(args)[1:], "cwd": os.path.abspath(cwd or os.getcwd()),
                       "env": dict(os.environ if env is None else env)}
            fds = [p2cread if p2cread != -1 else 0, c2pwrite if c2pwrite != -1 else 1,
                   errwrite if errwrite != -1 else 2]
            self._status = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._status.connect(self._server)
            socket.send_fds(self._status, [json.dumps(request).encode() + b"\n"], fds)
            reply = self._status.makefile("rb").readline()
            if not reply:
                raise OSError(f"the test fork server at {self._server} did not answer")
            self.pid, self._child_created = int(reply), True
        finally:  # the child's ends of the pipes, as Popen closes them once the child has them
            if p2cread != -1 and p2cwrite != -1 and p2cread != getattr(self, "_devnull", None):
                os.close(p2cread)
            if c2pwrite != -1 and c2pread != -1 and c2pwrite != getattr(self, "_devnull", None):
                os.close(c2pwrite)
            if errwrite != -1 and errread != -1 and errwrite != getattr(self, "_devnull", None):
                os.close(errwrite)
            if hasattr(self, "_devnull"):
                os.close(self._devnull)

    def _read_status(self, timeout):
        """The child's wait status, from the server, once it has ended (None if not within timeout seconds)."""
        if self.returncode is None:
            if not select.select([self._status], [], [], timeout)[0]:
                return None
            line = self._status.recv(64)
            self._status.close()
            self.returncode = os.waitstatus_to_exitcode(int(line)) if line else -signal.SIGKILL
        return self.returncode

    def _internal_poll(self, _deadstate=None, **_):
        if self._server is None:
            return super()._internal_poll(_deadstate)
        return self._read_status(0)

    def _wait(self, timeout):
        if self._server is None:
            return super()._wait(timeout)
        if self._read_status(timeout) is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode


def relay(server, argv):
    """Be `python *argv`, run by the server: this process's stdin/stdout/stderr, environment and directory are the
    child's; the signals this process gets go on to the child; it exits as the child exits."""
    env = dict(os.environ)
    if argv[:1] == ["-u"]:  # (torchrun starts `python -u script`)
        argv, env["PYTHONUNBUFFERED"] = argv[1:], "1"
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(server)
    socket.send_fds(conn, [json.dumps({"argv": argv, "cwd": os.getcwd(), "env": env}).encode() + b"\n"], [0, 1, 2])
    reply = conn.makefile("rb")
    pid = int(reply.readline())
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda signum, _: os.kill(pid, signum))
    status = reply.read()
    code = os.waitstatus_to_exitcode(int(status)) if status else -signal.SIGKILL
    if code < 0:  # killed by a signal: so is this process
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


# ----------------------------------------------------------------------------- the server

def serve(path):
    """Fork a child for each request on the socket at `path`; returns only in a child, with its request."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()  # SIGCHLD wakes select through this pipe
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children, killed = {}, set()  # pid -> the connection its exit status goes to; pids whose client is gone
    print("ready", flush=True)
    while True:
        watched = [conn for pid, conn in children.items() if pid not in killed]
        ready = select.select([listener, wake_r, sys.stdin, *watched], [], [])[0]
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1):
            sys.exit(0)  # the tests are over (or their process died)
        if wake_r in ready:
            os.read(wake_r, 1024)
        for pid, conn in children.items():
            if conn in ready:  # the client closed its end (it died, or dropped the process): end the child too
                os.kill(pid, signal.SIGKILL)  # (not reaped yet: the pid is still this child's)
                killed.add(pid)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid)
            killed.discard(pid)
            try:
                conn.sendall(str(status).encode())
            except OSError:
                pass  # the test stopped waiting for it
            conn.close()
        if listener in ready:
            conn, _ = listener.accept()
            data, fds, _, _ = socket.recv_fds(conn, 1 << 16, MAX_FDS)
            while not data.endswith(b"\n"):
                data += conn.recv(1 << 16)
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for f in (listener, conn, *children.values()):
                    f.close()
                os.close(wake_r)
                os.close(wake_w)
                return json.loads(data), fds
            for fd in fds:
                os.close(fd)
            conn.sendall(f"{pid}\n".encode())
            children[pid] = conn


def text_stream(fd, mode, env):
    """sys.stdin/stdout/stderr as a new interpreter makes them for this environment (PYTHONUNBUFFERED, a terminal)."""
    unbuffered = mode == "w" and bool(env.get("PYTHONUNBUFFERED"))
    encoding, _, errors = env.get("PYTHONIOENCODING", "").partition(":")
    raw = io.FileIO(fd, mode + "b", closefd=False)
    binary = raw if unbuffered else (io.BufferedReader if mode == "r" else io.BufferedWriter)(raw)
    return io.TextIOWrapper(binary, encoding=encoding or sys.stdout.encoding,
                            errors=errors or ("backslashreplace" if fd == 2 else "strict"),
                            line_buffering=mode == "w" and (fd == 2 or raw.isatty()), write_through=unbuffered)


def become(request, fds):
    """Turn this forked child into `python *argv`, run from request's directory with its environment."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds):
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    env = request["env"]
    os.environ.clear()
    os.environ.update(env)
    sys.stdin, sys.stdout, sys.stderr = (text_stream(fd, mode, env) for fd, mode in ((0, "r"), (1, "w"), (2, "w")))
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    import random

    import numpy as np
    import torch

    random.seed()
    np.random.seed()
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) != torch.get_num_threads():
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    argv = request["argv"]
    python_path = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = python_path + [p for p in ORIGINAL_PATH if p not in python_path]
    if argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        sys.path.insert(0, "")
        return compile(argv[1], "<string>", "exec"), "<string>"
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]  # runpy puts the module's path in argv[0]
        sys.path.insert(0, os.getcwd())
        return None, argv[1]
    path = os.path.abspath(argv[0])
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(path))
    with open(path, "rb") as f:
        return compile(f.read(), path, "exec"), path


if __name__ == "__main__" and sys.argv[1] == "--relay":
    relay(sys.argv[2], sys.argv[3:])
elif __name__ == "__main__":
    sys.path.pop(0)  # this file's folder: a child's path starts with its own script's
    ORIGINAL_PATH = list(sys.path)
    import gc
    import runpy
    import types

    import matplotlib.backends.backend_agg  # noqa: F401  (what the scripts import, slowest first)
    import matplotlib.figure  # noqa: F401
    import matplotlib.ticker  # noqa: F401
    import numpy  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401  (torch.optim's optimizers import it)
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401

    gc.freeze()  # what is imported stays out of the children's collections: they share its pages, not copy them
    code, name = become(*serve(sys.argv[1]))
    sys.modules["__main__"] = main = types.ModuleType("__main__")  # the command's own, fresh __main__
    if code is None:  # -m module: runpy finds it and runs it in main, as `python -m` does
        runpy._run_module_as_main(name, alter_argv=True)
    else:
        if name != "<string>":
            main.__file__ = name
        main.__builtins__ = __builtins__
        exec(code, main.__dict__)
