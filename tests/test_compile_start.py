"""A CPU's first compile: runtime.trust_cpu_vector_flags spares Inductor's test builds only when the compiler takes the
vector flags, and leaves its own check (and fallback) in place otherwise."""

import platform
import shutil
import sys

import pytest
from torch._inductor import config

from lib.runtime import trust_cpu_vector_flags

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64" or not shutil.which("g++"),
                                reason="the check is for x86 Linux with g++")


def test_inductor_trusts_the_cpus_flags_once_the_compiler_takes_them():
    with config.patch({"cpp.vec_isa_ok": None, "cpp.cxx": ("g++",)}):
        trust_cpu_vector_flags()
        assert config.cpp.vec_isa_ok is True


def test_a_compiler_that_refuses_the_flags_keeps_inductors_own_check(tmp_path):
    old = tmp_path / "old-g++"  # answers --version, fails to compile anything (as one without AVX-512 would)
    old.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "g++ (old) 4.8" && exit 0\nexit 1\n')
    old.chmod(0o755)
    with config.patch({"cpp.vec_isa_ok": None, "cpp.cxx": (str(old),)}):
        trust_cpu_vector_flags()
        assert config.cpp.vec_isa_ok is None


def test_an_explicit_setting_wins():
    with config.patch({"cpp.vec_isa_ok": False}):  # TORCHINDUCTOR_VEC_ISA_OK=0
        trust_cpu_vector_flags()
        assert config.cpp.vec_isa_ok is False
