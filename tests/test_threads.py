"""The thread count and the OpenMP wait policy (localglm/threads.py), with the machine's load mocked;
and that the native kernels' dynamic work split gives the same numbers on any thread count."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

from localglm import threads
from localglm.commands.flags import set_threads
from localglm.threads import CpuLoad, configure_waiting, default_threads, free_cores, measure_load


@pytest.mark.parametrize(
    ("load", "expected"),
    [
        (CpuLoad(2, 2, 0.0), 2),  # idle: every core
        (CpuLoad(2, 2, 0.3), 2),  # a light neighbour takes no core
        (CpuLoad(2, 2, 1.0), 1),  # one CPU-bound neighbour (a compile job) takes one of two
        (CpuLoad(2, 2, 0.6), 1),  # from half a core up, the core is taken
        (CpuLoad(2, 2, 2.0), 1),  # all taken: still one thread
        (CpuLoad(2, 2, 7.5), 1),
        (CpuLoad(8, 16, 4.0), 6),  # 2-way SMT: 4 busy hardware threads are 2 physical cores
        (CpuLoad(8, 16, 0.0), 8),  # physical cores, not hardware threads
        (CpuLoad(1, 1, 0.0), 1),
    ],
)
def test_the_default_is_the_free_physical_cores(load: CpuLoad, expected: int) -> None:
    assert free_cores(load) == expected
    assert default_threads(load) == expected


class FakeClock:
    """psutil's counters and the clock, advanced by the sleep measure_load takes."""

    def __init__(self, cpus: int, busy_per_s: float, mine_per_s: float) -> None:
        self.cpus, self.busy_per_s, self.mine_per_s = cpus, busy_per_s, mine_per_s
        self.now = 100.0

    def cpu_times(self) -> SimpleNamespace:
        busy = 5000.0 + self.busy_per_s * self.now
        idle = self.cpus * self.now - busy
        # psutil's Linux fields: guest time is already inside user, so it must not be counted twice
        return _Times(user=busy - 3.0, nice=0.0, system=3.0, idle=idle, iowait=7.0, irq=0.0, softirq=0.0, steal=0.0, guest=2.0, guest_nice=0.0)

    def process(self) -> SimpleNamespace:
        return SimpleNamespace(cpu_times=lambda: SimpleNamespace(user=self.mine_per_s * self.now, system=0.0))


class _Times(SimpleNamespace):
    def __iter__(self) -> Iterator[float]:
        return iter(vars(self).values())


@pytest.fixture
def fake_machine(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    import psutil

    clock = FakeClock(cpus=2, busy_per_s=0.0, mine_per_s=0.0)

    def sleep(s: float) -> None:
        clock.now += s

    monkeypatch.setattr(psutil, "cpu_times", clock.cpu_times)
    monkeypatch.setattr(psutil, "Process", clock.process)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: clock.cpus)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(clock.cpus)), raising=False)
    monkeypatch.setattr(threads.time, "sleep", sleep)
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock.now)
    yield clock


@pytest.mark.parametrize(("busy", "mine", "foreign", "expected"), [(0.0, 0.0, 0.0, 2), (1.0, 0.0, 1.0, 1), (1.0, 1.0, 0.0, 2), (2.0, 0.5, 1.5, 1)])
def test_the_load_not_ours_is_measured(fake_machine: FakeClock, busy: float, mine: float, foreign: float, expected: int) -> None:
    """Busy time of all CPUs minus this process's own, per second: our own threads never count
    against us."""
    fake_machine.busy_per_s, fake_machine.mine_per_s = busy, mine
    load = measure_load(0.5)
    assert (load.physical, load.logical) == (2, 2)
    assert load.foreign == pytest.approx(foreign)
    assert default_threads(load) == expected


def test_threads_not_given_take_the_free_cores(fake_machine: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)
    fake_machine.busy_per_s = 1.0  # a CPU-bound neighbour on a 2-core machine
    set_threads(None)
    fake_machine.busy_per_s = 0.0
    set_threads(None)
    set_threads(2)  # given: used as given, whatever the load
    assert asked == [1, 2, 2]


def test_openmp_threads_are_told_to_block_not_spin() -> None:
    env: dict[str, str] = {}
    assert configure_waiting(env)
    assert env == {"GOMP_SPINCOUNT": threads.SPIN_COUNT}
    for mine in ({"OMP_WAIT_POLICY": "active"}, {"GOMP_SPINCOUNT": "300000"}):  # the user's choice stays
        env = dict(mine)
        assert not configure_waiting(env)
        assert env == mine


def test_importing_localglm_loads_openmp_with_the_setting_before_torch() -> None:
    """Before torch: either torch's runtime is loaded already (it has read the setting) and the
    environment children inherit is as it was, or (no runtime found) the setting waits in the
    environment for torch's load."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = ("import sys, os, localglm; maps = open('/proc/self/maps').read().splitlines(); "
            "print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'), any('libgomp' in l and 'torch' in l for l in maps))")
    torch_loaded, setting, runtime = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.split()
    assert torch_loaded == "False"
    assert (setting, runtime) in (("None", "True"), (threads.SPIN_COUNT, "False"))


def test_the_native_kernels_give_the_same_numbers_on_any_thread_count() -> None:
    """Work is split dynamically (whichever thread is free takes the next chunk): each output must
    still be computed by one thread alone, so 1 and 2 threads agree bit for bit."""
    from quant.blob import ExpertBlobLayout, quantize_expert
    from quant.formats import QuantSpec, QuantTensor
    from quant.native import NativeLib, native_lib

    lib = native_lib()
    if lib is None:
        pytest.skip("no native kernels on this machine (no C compiler)")
    torch.manual_seed(0)
    w = QuantTensor.quantize(torch.randn(512, 256) * 0.1, QuantSpec.for_bits(4), torch.float32)
    hidden, inter, n_exp = 256, 128, 8
    lay = ExpertBlobLayout(hidden, inter, QuantSpec.for_bits(4), QuantSpec.for_bits(4))
    parts = [lay.unpack(quantize_expert(lay, *(torch.randn(s) * 0.1 for s in ((inter, hidden), (inter, hidden), (hidden, inter)))), torch.float32) for _ in range(n_exp)]
    gu = (type(NativeLib.describe(parts[0][0])) * n_exp)(*(NativeLib.describe(p[0]) for p in parts))
    dn = (type(gu[0]) * n_exp)(*(NativeLib.describe(p[1]) for p in parts))
    x = torch.randn(6, hidden)
    ids = torch.stack([torch.randperm(n_exp)[:3] for _ in range(6)])
    wts = torch.rand(6, 3)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((lib.linear(NativeLib.describe(w), x), lib.moe(gu, dn, inter, x, ids, wts), lib.dequantize(NativeLib.describe(w))))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
