"""
Where and how a script runs: device, dtype and autocast, torch.compile, torchrun, peak FLOP/s, and clear errors.
Shared by train.py, sample.py and bench.py.
"""

import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from configurator import ConfigError
from lib.errors import UserError  # noqa: F401 (defined without torch, for the data scripts; imported from here)


def install_error_hook():
    """Print UserError, ConfigError and CUDA out-of-memory as one line; anything else keeps its traceback."""
    default_hook = sys.excepthook

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, (UserError, ConfigError)):
            print(f"error: {exc}", file=sys.stderr)
        elif issubclass(exc_type, torch.OutOfMemoryError):
            print("error: out of GPU memory. Use a smaller --batch_size with a larger --gradient_accumulation_steps "
                  "(same tokens per step), a smaller --block_size or model, or --dtype=bfloat16.", file=sys.stderr)
        else:
            default_hook(exc_type, exc, tb)

    sys.excepthook = hook


def pick_device(requested="auto"):
    """'auto' picks cuda, then mps, then cpu; anything else must name a device this machine has."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"unknown device '{requested}': use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={requested} but no CUDA GPU is visible to PyTorch: use --device=cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device={requested} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device={requested} but MPS (Apple silicon) is not available: use --device=cpu (or auto)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported device '{requested}': use auto, cpu, cuda, cuda:N or mps")
    return requested


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_native_bfloat16():
    """Whether this CPU computes bfloat16 in hardware (x86 AVX-512 BF16 or AMX, Arm BF16), from Linux's cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = {word for line in f if line.lower().startswith(("flags", "features")) for word in line.split()}
    except OSError:
        return False  # not Linux: macOS has MPS, which 'auto' picks first
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def pick_dtype(requested, device_type):
    """
    'auto': bfloat16 on CUDA GPUs that have it, else float16 (with a grad scaler); bfloat16 on CPUs with native
    bfloat16 (the CPU preset's 2,000 steps with the GPT-2 recipe: 1.6x faster than float32, val loss 1.9208 vs
    1.9204; docs/log.md, 2026-11-21), float32 on other CPUs and on mps.
    """
    if requested == "auto":
        if device_type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "bfloat16" if device_type == "cpu" and cpu_has_native_bfloat16() else "float32"
    if requested not in DTYPES:
        raise UserError(f"unknown dtype '{requested}': use auto, float32, bfloat16 or float16")
    if requested == "float16" and device_type == "cpu":  # measured: ~19x slower than float32 on a 2-core x86 CPU
        raise UserError("--dtype=float16 on the CPU is emulated and trains ~19x slower than float32: use "
                        "--dtype=float32, or --dtype=bfloat16 on a CPU with native bfloat16 (AVX-512 BF16, AMX)")
    return requested


def autocast(device_type, dtype):
    """Mixed precision for the forward pass; parameters and optimizer state stay float32."""
    return nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=DTYPES[dtype])


@dataclass
class Runtime:
    """Where a script runs: its rank among torchrun's processes (0 of 1 without torchrun), device and precision."""
    rank: int
    local_rank: int
    world_size: int
    device: str  # 'cpu', 'cuda:0', 'mps'
    device_type: str  # 'cpu', 'cuda' or 'mps'
    dtype: str  # 'float32', 'bfloat16' or 'float16'
    autocast: object  # the context manager for forward passes


def setup(device="auto", dtype="auto", distributed=False):
    """The one setup call of every script: device (joining torchrun's process group if distributed), dtype,
    backend flags and the autocast context."""
    device = pick_device(device)
    rank, local_rank, world_size = 0, 0, 1
    if distributed:
        rank, local_rank, world_size, device = init_distributed(device)
    device_type = device.split(":")[0]
    dtype = pick_dtype(dtype, device_type)
    setup_backends(device_type)
    return Runtime(rank, local_rank, world_size, device, device_type, dtype, autocast(device_type, dtype))


def setup_backends(device_type):
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
        torch.backends.cudnn.allow_tf32 = True
    if device_type == "cpu":
        keep_freed_memory()


def keep_freed_memory():
    """
    Let glibc's malloc keep the memory a training step frees, for the next step. By default it hands blocks over
    128 KiB back to the kernel when freed (unmapped, or trimmed off the heap), so every step's activations come
    back as fresh pages, each a page fault the kernel zeroes: ~2,000 per step at the CPU preset's shapes (its step
    then takes 0.93x the time on 2 cores; the GPT-2 recipe's, which faults less, about the same). Blocks up to
    32 MiB (glibc's most) then come from the heap, which is trimmed only when 1 GiB of it is free: peak memory stays
    the same. Nothing happens where libc is not glibc (macOS, musl).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # (malloc.h)
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 1 << 30)


def why_not_compile(device_type):
    """Why torch.compile cannot run here, in a few words, or None where it can: CUDA, or a CPU with a C++ compiler
    (and, on Linux, Python's headers, which Inductor's CPU kernels include). Not MPS or Windows yet."""
    if sys.platform == "win32" or device_type not in ("cuda", "cpu"):
        return f"not available on {'Windows' if sys.platform == 'win32' else device_type}"
    if device_type == "cpu":
        import shutil
        import sysconfig

        if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", "g++"), "clang++")):
            return "a CPU needs a C++ compiler for it: install g++ or set CXX"
        headers = sysconfig.get_path("include")
        if sys.platform == "linux" and not os.path.isfile(os.path.join(headers, "Python.h")):
            return f"a CPU needs Python's headers for it, not in {headers}: install python3-dev"
    return None


def can_compile(device_type):
    return why_not_compile(device_type) is None


def compile_model(module, device_type):
    """
    torch.compile(module), and on a CPU bit for bit the same every run, as eager mode is (resume relies on it).
    Inductor adds up the embedding's gradient rows with atomic adds from parallel threads there, whose order, and so
    the float rounding, changes from run to run; with deterministic algorithms on it calls ATen's ordered kernel
    instead (the CPU preset's step: the same time, measured). That mode would also fill every torch.empty with NaN,
    which only a search for uninitialized reads needs: left off.
    """
    if device_type == "cpu":
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False
        trust_cpu_vector_flags()
    return torch.compile(module)


def trust_cpu_vector_flags():
    """
    Spare a CPU's first compile Inductor's own check of the vector instructions its C++ compiler can build for: for
    each set the processor has (AMX, AVX-512 VNNI, AVX-512, AVX2 on a recent x86) and each extension, it compiles
    and loads a test program that includes ATen's vector headers, one build after another: ~11 CPU-seconds of a
    first run on a 2-core x86 (its pick_vec_isa with a fresh cache: 13.4 CPU-s, 2.5 with this). The processor's flags
    (/proc/cpuinfo) already say which sets it has; what can still fail is a compiler that does not know them. So one
    empty program is compiled with AVX-512's and AVX2's flags (~0.1 s), and only if the compiler takes them is
    Inductor told to trust the processor's flags (cpp.vec_isa_ok); its cheap checks of the extensions (BF16, VNNI,
    AMX: the compiler's intrinsics alone) still run. Otherwise its full check, with its fallback to a narrower set,
    stays. TORCHINDUCTOR_VEC_ISA_OK, when set, wins.
    """
    import platform
    import subprocess

    from torch._inductor import config

    if config.cpp.vec_isa_ok is not None or sys.platform != "linux" or platform.machine() != "x86_64":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        flags = "-mavx512f -mavx512dq -mavx512vl -mavx512bw -mfma -mavx2 -mf16c".split()
        test = subprocess.run([get_cpp_compiler(), *flags, "-fsyntax-only", "-x", "c++", "-"], capture_output=True,
                              input=b"#include <immintrin.h>\nint main() { return 0; }\n", timeout=60)
    except Exception:  # no compiler found, or an older torch: Inductor checks as it always does
        return
    if test.returncode == 0:
        config.cpp.vec_isa_ok = True


# ----------------------------------------------------------------------------- distributed (torchrun)

def init_distributed(device):
    """Join the torchrun process group if there is one. Returns (rank, local_rank, world_size, device)."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1 or "RANK" not in os.environ:
        return 0, 0, 1, device
    import torch.distributed as dist

    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, local_rank, world_size, device


# ----------------------------------------------------------------------------- peak FLOP/s for MFU

# dense bfloat16/float16 tensor-core peaks from NVIDIA's data sheets, in TFLOP/s; the longest matching name wins
# (so "NVIDIA H200 NVL" is an H200 NVL, not an H200)
GPU_PEAK_TFLOPS = [
    ("GH200", 989), ("H200 NVL", 835), ("H200", 989), ("H100 NVL", 835), ("H100 PCIe", 756), ("H100", 989),
    ("B200", 2250),
    ("A100", 312), ("A800", 312), ("L40S", 362), ("L40", 181), ("L4", 121), ("A6000", 155), ("RTX 4090", 165),
    ("RTX 3090", 71), ("V100", 125), ("T4", 65),
]
_measured_peaks = {}


def peak_flops(device, dtype):
    """(FLOP/s, where the number comes from): a data sheet for known GPUs, else a timed large matmul."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        known = [(key, tflops) for key, tflops in GPU_PEAK_TFLOPS if key in name]
        if known:
            key, tflops = max(known, key=lambda k: len(k[0]))
            scale = 0.5 if dtype == "float32" else 1.0  # float32 matmuls run as TF32 at half the bf16 rate
            return tflops * 1e12 * scale, f"{name} data sheet"
    key = (device, dtype)
    if key not in _measured_peaks:
        n, reps = (4096, 10) if device.startswith("cuda") else (1024, 5)
        a = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
        best = float("inf")
        for _ in range(reps + 1):
            synchronize(device)
            t0 = time.perf_counter()
            a @ a
            synchronize(device)
            best = min(best, time.perf_counter() - t0)
        _measured_peaks[key] = 2 * n**3 / best
    return _measured_peaks[key], f"measured {device} {dtype} matmul"


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    elif device.startswith("mps"):
        torch.mps.synchronize()
