"""How many CPU threads to compute with, and how idle threads wait: so that a busy machine slows
decoding down by the share of the CPU the other work takes, not by 10-100x.

Two causes of the collapse seen beside a compile job (issue 15: 9.2 tok/s with 2 threads, 107.7 with 1):

- Spinning. torch and the native kernels share one OpenMP runtime (libgomp). By default its idle
  threads spin ~300,000 times between parallel loops before sleeping, so they never sleep during a
  decode: each of them looks CPU-bound to the scheduler, which then runs the thread a loop is waiting
  for only after the neighbour's full time slice, at every one of the hundreds of loops of a token.
  `configure_waiting` loads the runtime with GOMP_SPINCOUNT set (spin about a microsecond, then
  block on a futex); it must run before torch is imported, so `localglm/__init__.py` calls it first
  thing. A user's own OMP_WAIT_POLICY / GOMP_SPINCOUNT are kept.
- Too many threads. The default count is the free physical cores (`default_threads`), measured when
  the command starts; the native loops also split their work dynamically (quant/native/lg_kernels.h
  lg_chunk), so a thread the OS runs late takes less of it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import MutableMapping
from dataclasses import dataclass

# libgomp's spin count before a waiting thread blocks: ~1 us (100 pause loops), enough for the next
# loop of the same kernel on an idle machine, too little to hold a core from another process.
SPIN_COUNT = "100"
SAMPLE_S = 0.1  # how long `measure_load` watches the CPUs


def configure_waiting(environ: MutableMapping[str, str] | None = None) -> bool:
    """Make OpenMP threads spin briefly and then block, unless the user chose a wait policy. Returns
    whether it had effect: False when the user set one, or when torch (and with it the OpenMP
    runtime, which reads its settings once, when loaded) was imported before localglm.

    On the process's own environment it loads torch's OpenMP runtime right away, with the setting,
    and then takes the setting out again: processes this one starts (a benchmark's llama.cpp, also
    built on libgomp) keep the user's environment."""
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return False
    if environ is not None:
        env["GOMP_SPINCOUNT"] = SPIN_COUNT
        return True
    if "torch" in sys.modules:
        return False
    env["GOMP_SPINCOUNT"] = SPIN_COUNT
    if _load_torch_openmp():
        del env["GOMP_SPINCOUNT"]  # read already; where the runtime was not found, torch's load reads it
    return True


def _load_torch_openmp() -> bool:
    """Load the OpenMP runtime torch ships (torch/lib/libgomp.so.1, or auditwheel's torch.libs/libgomp-*.so*)
    without importing torch; torch's libraries then use this copy (same soname). False where there
    is none (a build of torch on another runtime)."""
    import ctypes
    import glob
    import importlib.util

    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return False
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for lib in sorted(glob.glob(os.path.join(folder, "lib", "libgomp*.so*")) + glob.glob(os.path.join(folder + ".libs", "libgomp*.so*"))):
            try:
                ctypes.CDLL(lib)
            except OSError:
                continue
            return True
    return False


@dataclass(frozen=True)
class CpuLoad:
    """The machine's CPUs as this process may use them, and the load other processes put on them."""

    physical: int  # physical cores this process may run on
    logical: int  # logical CPUs (hardware threads) this process may run on
    foreign: float  # busy logical CPUs, not counting this process's own threads, averaged over the sample


def free_cores(load: CpuLoad) -> int:
    """Physical cores not taken by other processes: physical - round(foreign busy CPUs, in physical
    cores), at least 1. A logical CPU's load counts as physical / logical of a core (half a core with
    2-way SMT); a core is taken from half a busy core up, so a 100% neighbour takes one core of two
    and a 30% one none."""
    per_core = load.physical / max(1, load.logical)
    taken = int(load.foreign * per_core + 0.5)
    return max(1, load.physical - taken)


def _cores() -> tuple[int, int]:
    """(physical, logical) cores this process may run on: its affinity mask, in physical cores by
    the machine's ratio of physical to logical."""
    import psutil

    logical_all = psutil.cpu_count(logical=True) or 1
    physical_all = psutil.cpu_count(logical=False) or logical_all
    try:
        logical = len(os.sched_getaffinity(0)) or logical_all
    except AttributeError:  # not on Linux
        logical = logical_all
    return max(1, round(logical * physical_all / logical_all)), logical


def measure_load(seconds: float = SAMPLE_S) -> CpuLoad:
    """Watch the CPUs for `seconds`: all busy time (user, system, ...: everything but idle and
    iowait) minus this process's own CPU time, per second of wall time."""
    import psutil

    me = psutil.Process()

    def busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)

    def mine() -> float:
        t = me.cpu_times()
        return t.user + t.system

    b0, m0, w0 = busy(), mine(), time.monotonic()
    time.sleep(seconds)
    b1, m1, w1 = busy(), mine(), time.monotonic()
    physical, logical = _cores()
    foreign = max(0.0, ((b1 - b0) - (m1 - m0)) / max(w1 - w0, 1e-6))
    return CpuLoad(physical, logical, min(foreign, float(logical)))


def default_threads(load: CpuLoad | None = None) -> int:
    """The thread count used when --threads is not given: the free physical cores (`free_cores`) of
    the machine now (`measure_load`) or of `load`."""
    return free_cores(load if load is not None else measure_load())
