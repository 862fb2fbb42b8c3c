"""
Where and how a script runs: device, dtype and autocast, torch.compile, torchrun, peak FLOP/s, and clear errors.
Shared by train.py, sample.py and bench.py.
"""

import datetime
import os
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

from configurator import ConfigError
from lib.errors import UserError  # noqa: F401 (defined without torch, for the data scripts; imported from here)


def install_error_hook():
    """Print UserError, ConfigError, CUDA out-of-memory and the loss of another torchrun rank as one line; anything
    else keeps its traceback."""
    default_hook = sys.excepthook

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, (UserError, ConfigError)):
            print(f"error: {exc}", file=sys.stderr)
        elif (lost := lost_rank(exc)) is not None:
            print(f"error: {lost}", file=sys.stderr)
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


def for_decoding(rt, requested, n_embd):
    """
    sample.py's and chat.py's precision: with --dtype=auto a CPU decodes models narrower than 512 in float32. Decoding
    multiplies a few rows at a time, and a bfloat16 matmul of one row pays ~25 us of oneDNN setup against ~5 in
    float32: the CPU preset's model (128 wide) decodes 2.6-2.8x faster in float32 at batch 1 and 16, GPT-2 124M (768)
    1.17x faster at batch 1 but 1.74x slower at batch 16 (bench/decode.py --compile=False, 2-core CPU, 2026-12-02).
    """
    if requested != "auto" or rt.device_type != "cpu" or rt.dtype == "float32" or n_embd >= 512:
        return rt
    return replace(rt, dtype="float32", autocast=autocast("cpu", "float32"))


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
    try:  # where this rank runs, so that another rank can tell when it died (lost_rank)
        dist.distributed_c10d._get_default_store().set(f"pid{rank}", f"{socket.gethostname()} {os.getpid()}")
    except Exception:
        pass
    return rank, local_rank, world_size, device


def _running(pid):
    """Whether process pid is alive on this machine (a zombie, dead but not yet reaped by torchrun, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS)
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def lost_rank(exc):
    """
    For a torchrun rank whose collective failed because another rank's process is gone (killed, out of memory,
    crashed; gloo: 'Connection reset by peer' or 'closed by peer'; a DistError under NCCL): the one line to say so,
    naming the rank that died when it ran on this machine (each rank wrote its host and pid into torchrun's store).
    None for any other exception.
    """
    import torch.distributed as dist

    text = str(exc)
    if not (dist.is_available() and dist.is_initialized()) or not (
            isinstance(exc, getattr(dist, "DistError", ())) or
            isinstance(exc, RuntimeError) and "gloo" in text and "peer" in text):
        return None
    me, world = dist.get_rank(), dist.get_world_size()
    dead = []
    try:
        store, host = dist.distributed_c10d._get_default_store(), socket.gethostname()
        store.set_timeout(datetime.timedelta(seconds=5))  # torchrun's store may be stopping too: never wait on it
        for r in range(world):
            if r != me and store.check([f"pid{r}"]):
                their_host, pid = store.get(f"pid{r}").decode().split()
                if their_host == host and not _running(int(pid)):
                    dead.append(r)
    except Exception:
        pass
    who = (f"rank {dead[0]}" if len(dead) == 1 else f"ranks {', '.join(map(str, dead))}") if dead else "another rank"
    why = text.split("] ", 1)[-1].split(". This is typically", 1)[0].strip()
    return (f"{who} of this torchrun run stopped ({why}), so rank {me} stops too; {who}'s own output says why "
            f"(nothing if it was killed, e.g. for lack of memory)")


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
        own = torch.Generator(device).manual_seed(0)  # the global generator stays as it was: it seeds the model's init
        a = torch.randn(n, n, device=device, dtype=DTYPES[dtype], generator=own)
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


# ----------------------------------------------------------------------------- memory, before allocating

def human_bytes(n):
    """1536 -> '1.5 KiB', 3e12 -> '2.7 TiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def available_memory(device):
    """(bytes the device can still give, what they are), or (None, None) where it cannot be told."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0], f"free on {torch.cuda.get_device_name(device)}"
    if device.startswith("mps"):
        limit = getattr(torch.mps, "recommended_max_memory", None)
        return (limit(), "MPS's recommended working set") if limit else (None, None)
    try:  # Linux: what the kernel can give without swapping, the page cache included
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024, "available host memory"
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory"
        except (ValueError, OSError, AttributeError):
            return None, None


def training_memory(n_params, cfg, batch_size, dtype, device_type, optimizer="adamw", activation_checkpointing=False,
                    shards=1):
    """
    A lower bound of the bytes one training step holds at its peak, by part: float32 weights, gradients and
    optimizer state (AdamW: two moments; Muon: about one; FSDP divides all three over `shards` ranks), and the
    activations that backward keeps for one micro-batch of batch_size sequences of cfg.block_size tokens. Per
    block about 16 values per token and channel in the compute dtype (norm, attention and MLP inputs, queries,
    keys, values, the 4x MLP), with flash attention; where attention is written out (a CPU under bfloat16 autocast,
    MPS) also its two (T, T) score tables per head; and the logits with their float32 log-softmax. Activation
    checkpointing keeps each block's input and one block's activations. Real steps take more (allocator slack,
    temporaries), so a refusal by this estimate is never wrong.
    """
    B, T, C, L, H, V = batch_size, cfg.block_size, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.vocab_size
    s = 4 if dtype == "float32" else 2  # bytes per activation value
    block = 16 * s * B * T * C
    if device_type == "mps" or (device_type == "cpu" and dtype != "float32"):
        block += 2 * s * B * H * T * T
    blocks = L * 4 * B * T * C + block if activation_checkpointing else L * block
    return {"weights": 4 * n_params / shards, "gradients": 4 * n_params / shards,
            "optimizer state": (8 if optimizer == "adamw" else 4) * n_params / shards,
            "activations": blocks + (s + 4) * B * T * V}
