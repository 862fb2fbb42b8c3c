"""bench/gpu_check.py, the one-command GPU check, as a dry run on the CPU at tiny shapes: every row runs and reports."""

import re

import pytest

from conftest import run


@pytest.mark.slow
def test_dry_run_on_the_cpu_fills_every_row(char_data):
    out = run("bench/gpu_check.py", "--device=cpu", f"--dataset={char_data}", timeout=900)
    table = out.stdout[out.stdout.index("| check |"):]
    rows = {m[1]: m[2] for m in re.finditer(r"^\| (\w+) \| `[^`]+` \| (.*) \| \d+ \|$", table, re.M)}
    assert list(rows) == ["tests", "preset", "gpt2", "float16", "fsdp", "sample"], table
    assert re.match(r"\d+ passed", rows["tests"]) and "failed" not in rows["tests"], rows["tests"]
    assert re.match(r"val [\d.]+ at iter \d+, [\d.]+ s after the run started", rows["preset"]), rows["preset"]
    for name in ("gpt2", "float16"):
        assert re.match(r"[\d.]+ ms/iter, [\d,]+ tokens/s, mfu", rows[name]), rows[name]
    assert "the same; full state gathered" in rows["fsdp"], rows["fsdp"]
    assert re.match(r"char-gpt2 / 1 / 8 / [\d,]+ tok/s", rows["sample"]), rows["sample"]


def test_an_unknown_row_is_one_line():
    out = run("bench/gpu_check.py", "--device=cpu", "--only=gpt2,nonsense", check=False)
    assert out.returncode == 1 and out.stderr.strip() == (
        "error: only='gpt2,nonsense' cannot work: only must be '' (every row) or a comma-separated list of tests, "
        "preset, gpt2, float16, fsdp and sample")
