"""Which devices TensorFlow runs the model on, found without a false alarm on hosts that have no GPU.

TensorFlow's GPU build asks the CUDA driver for devices the first time anything needs the device
list, and on a host without an NVIDIA driver its C++ code logs
`E... cuda_platform.cc] failed call to cuInit: ... UNKNOWN ERROR (303)`: an ERROR line for the
normal state of a CPU host. Neither CUDA_VISIBLE_DEVICES (""/-1: the driver is still asked) nor
TF_CPP_MIN_LOG_LEVEL (read once, and 3 would hide every real error too) removes only that line.

So `log_devices` makes that first device query itself, and only on a host with no NVIDIA device
node (/dev/nvidia*, /proc/driver/nvidia, WSL's /dev/dxg) it holds back what is written to stderr
(fd 2) meanwhile and then writes it all back except that one line. On a host with an NVIDIA device
nothing is filtered: a cuInit failure there is a real error and shows.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import sys
import tempfile

log = logging.getLogger(__name__)

_CUINIT_NOISE = b"failed call to cuInit"


def has_nvidia_device() -> bool:
    """True when the host shows an NVIDIA GPU (or may: WSL's GPU device) to this process."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/dxg")


@contextlib.contextmanager
def without_cuinit_noise():
    """Inside: stderr (fd 2, where TensorFlow's C++ logs go) is held back; on leaving it is written out again,
    less the `failed call to cuInit` line. A no-op on hosts with an NVIDIA device."""
    if has_nvidia_device():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = b"".join(line for line in held.read().splitlines(keepends=True) if _CUINIT_NOISE not in line)
            view = memoryview(kept)
            while view:
                view = view[os.write(2, view):]


BFLOAT16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU does bfloat16 maths in hardware (AMX or AVX512-BF16): there Keras's mixed bfloat16
    runs several times faster than float32 (BENCHMARKS.md); elsewhere it is emulated and slower."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in BFLOAT16_CPU_FLAGS)
    except OSError:
        pass
    return False


def resolve_precision(precision: str, backend: str, gpus: int) -> str:
    """The `precision` setting made concrete: "float32", "bfloat16" or "int8" (onnx backend, never chosen by auto)."""
    if precision != "auto":
        return precision
    if backend != "keras":
        return "float32"
    return "bfloat16" if gpus or cpu_has_bfloat16() else "float32"


def log_devices() -> int:
    """Log the GPUs TensorFlow will use, or that the model runs on the CPU; returns the number of GPUs."""
    import tensorflow as tf

    with without_cuinit_noise():
        gpus = tf.config.list_physical_devices("GPU")  # the first device query: CUDA is initialised here
    if gpus:
        log.info("TensorFlow sees %d GPU(s): %s; the model runs there", len(gpus), ", ".join(g.name for g in gpus))
    else:
        log.info("TensorFlow sees no GPU; the model runs on the CPU (%s)", ", ".join(
            d.name for d in tf.config.list_physical_devices("CPU")))
    return len(gpus)
