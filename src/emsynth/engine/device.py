"""Where and in what precision torch runs: device, precision, autocast, threads, seeding.

Every stage (training, inference, synthesis, the study) takes these from here, so `auto` means
the same thing everywhere. bf16 autocast pays only where the hardware computes in bf16: CUDA
GPUs that report bf16 support, and CPUs whose oneDNN build finds AVX512-BF16 or AMX. On other
CPUs (AVX2, AVX-512 without BF16) oneDNN emulates bf16 and a U-Net step runs about 20x
*slower* than in fp32, so `auto` picks fp32 there.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from emsynth.errors import EmsynthError

PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")

Autocast = Callable[[], contextlib.AbstractContextManager]


def resolve_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """auto -> cuda when PyTorch sees a GPU, else cpu; cuda without a GPU is a user error."""
    if requested not in DEVICES:
        raise EmsynthError(f"--device {requested!r} is unknown. Fix: use auto, cpu or cuda")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise EmsynthError(
                "engine.device=cuda but PyTorch sees no CUDA GPU. Fix: use --device cpu (or auto), "
                "or install the CUDA build of torch"
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# --- what the CPU can do --------------------------------------------------------------------


def cpu_bf16_native() -> bool:
    """True where oneDNN computes bf16 natively (AVX512-BF16 or AMX), not by emulation."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def cpu_capability() -> str:
    """The vector ISA torch dispatches its own kernels to: "AVX512", "AVX2", "DEFAULT", ..."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def cpu_model() -> str:
    """The processor's marketing name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_kind() -> str:
    """One line that names the CPU kind, as every reported figure must: e.g.
    "AMD EPYC, AVX512, native bf16" or "Intel Core i7, AVX2, no native bf16"."""
    bf16 = "native bf16" if cpu_bf16_native() else "no native bf16"
    return f"{cpu_model()}, {cpu_capability()}, {bf16}"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; containers and taskset restrict it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


# --- precision ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses and why, as `doctor` prints it and run.json records it."""

    precision: str  # "bf16" or "fp32"
    reason: str


def choose_precision(requested: str, device: torch.device) -> PrecisionChoice:
    """auto -> bf16 only where it is native: CUDA with bf16 support, or a CPU with
    AVX512-BF16/AMX; fp32 everywhere else. An explicit bf16 or fp32 is kept as asked."""
    if requested not in PRECISIONS:
        raise EmsynthError(f"--precision {requested!r} is unknown. Fix: use auto, bf16 or fp32")
    if requested != "auto":
        return PrecisionChoice(requested, "asked for explicitly")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", "this GPU supports bf16")
        return PrecisionChoice("fp32", "this GPU has no bf16 support")
    if device.type == "cpu":
        if cpu_bf16_native():
            return PrecisionChoice("bf16", f"the CPU has native bf16 ({cpu_capability()})")
        return PrecisionChoice(
            "fp32", f"the CPU has no native bf16 ({cpu_capability()}): emulated bf16 is ~20x slower"
        )
    return PrecisionChoice("fp32", f"no bf16 autocast rule for {device.type}")


def resolve_precision(requested: str, device: torch.device, warn: bool = True) -> str:
    """The precision to run in ("bf16" or "fp32"); see `choose_precision`. An explicit bf16 on
    a CPU that only emulates it still runs, after one warning line that says how much slower."""
    precision = choose_precision(requested, device).precision
    if warn and requested == "bf16" and device.type == "cpu" and not cpu_bf16_native():
        warn_emulated_bf16()
    return precision


@functools.cache
def warn_emulated_bf16() -> None:
    """Once per process: explicit bf16 on a CPU without native bf16, with a measured factor."""
    from rich.console import Console

    ratio = bf16_slowdown()
    Console(stderr=True).print(
        f"[yellow]warning:[/] bf16 is emulated on this CPU ({cpu_capability()}, no AVX512-BF16/"
        f"AMX): a quick check ran a convolution {ratio:.0f}x slower than in fp32. Fix: use "
        "--precision auto (or fp32)",
        highlight=False, soft_wrap=True,
    )


def autocast_factory(device: torch.device, precision: str) -> Autocast:
    """A zero-argument factory for the forward-pass context: bf16 autocast or nothing."""
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


# --- seeding and threads --------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


#: The thread count `torch_threads` set for the work inside it (a study, the demo), which
#: engine runs without their own `num_threads` follow; None = every usable core.
_scoped_threads: int | None = None


def thread_count(requested: int | None) -> int:
    """The torch thread count for a run: as asked, else what the enclosing `torch_threads`
    set, else every core this process may use (measured faster than one thread for every
    preset's model on a quiet 2-core machine of either CPU kind: benchmarks/threads.py)."""
    return requested or _scoped_threads or usable_cores()


@contextlib.contextmanager
def torch_threads(num_threads: int | None):
    """Run with `num_threads` torch threads (None: see `thread_count`), also for the engine
    runs inside that set none of their own; restore both after."""
    global _scoped_threads
    before = (torch.get_num_threads(), _scoped_threads)
    count = thread_count(num_threads)
    torch.set_num_threads(count)
    _scoped_threads = count
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        _scoped_threads = before[1]


# --- quick measurements ---------------------------------------------------------------------


def time_call(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best-of-`repeats` seconds of `fn()` after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def bf16_slowdown() -> float:
    """How many times slower a small convolution runs under CPU bf16 autocast than in fp32
    (< 1 means bf16 is faster). About 0.2 s; cached for the process."""
    conv = torch.nn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(2, 32, 64, 64)

    def run(precision: str) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad(), autocast_factory(torch.device("cpu"), precision)():
                return conv(x)
        return call

    return time_call(run("bf16")) / max(time_call(run("fp32")), 1e-9)
