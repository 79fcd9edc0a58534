"""Devices for the expert cache: a simulated one (runs everywhere, used in CI) and CUDA.

Both offer the same small interface:
  alloc(nbytes, what)       device memory, charged against a byte budget that is never exceeded
  reserve(nbytes, what)     charge memory used by others (dense weights, KV cache) to the budget
  host_buffer(nbytes)       host memory for the expert store (pinned on CUDA)
  copy_async(dst, src)      one host-to-device copy on the transfer stream -> event
  wait(event)               make the compute stream wait for a copy (stall time is counted)
  compute(seconds)          (simulated only) advance the compute clock by a kernel's modeled time
The simulated device keeps device buffers as separate CPU tensors and performs the real copies,
with a timing model (copy stream and compute stream clocks) from the cost model's bandwidths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from localglm.errors import LocalGLMError

from .cost_model import Bandwidths


class BudgetExceeded(LocalGLMError):
    pass


class _Budget:
    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.used = 0
        self.peak = 0
        self.by_what: dict[str, int] = {}

    def charge(self, nbytes: int, what: str) -> None:
        if self.used + nbytes > self.capacity:
            raise BudgetExceeded(
                f"device memory budget exceeded: {what} needs {nbytes} bytes, {self.capacity - self.used} of {self.capacity} free"
            )
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        self.by_what[what] = self.by_what.get(what, 0) + nbytes

    def release(self, nbytes: int, what: str) -> None:
        self.used -= nbytes
        self.by_what[what] = self.by_what.get(what, 0) - nbytes


@dataclass
class SimEvent:
    ready_s: float  # simulated time the copy completes


class SimulatedDevice:
    """A GPU stand-in: separate buffers, real copies, an enforced budget, and a timing model."""

    kind = "sim"

    def __init__(self, capacity_bytes: int, bandwidths: Bandwidths | None = None) -> None:
        self.budget = _Budget(capacity_bytes)
        self.bw = bandwidths or Bandwidths()
        self.torch_device = torch.device("cpu")
        self.now_s = 0.0  # compute stream clock
        self.copy_free_s = 0.0  # when the copy stream is next idle
        self.stall_s = 0.0
        self.bytes_h2d = 0
        self.copies = 0

    def alloc(self, nbytes: int, what: str = "buffer") -> torch.Tensor:
        self.budget.charge(nbytes, what)
        return torch.empty(nbytes, dtype=torch.uint8)

    def reserve(self, nbytes: int, what: str) -> None:
        self.budget.charge(nbytes, what)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def record_use(self) -> None:  # compute is in program order here: nothing to wait for
        return None

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, after: object = None) -> SimEvent:
        dst.copy_(src)  # a real copy into the device's own buffer
        n = src.numel() * src.element_size()
        start = max(self.copy_free_s, self.now_s)
        self.copy_free_s = start + self.bw.latency_s + n / self.bw.h2d
        self.bytes_h2d += n
        self.copies += 1
        return SimEvent(self.copy_free_s)

    def wait(self, event: SimEvent | None) -> None:
        if event is not None and event.ready_s > self.now_s:
            self.stall_s += event.ready_s - self.now_s
            self.now_s = event.ready_s

    def compute(self, seconds: float) -> None:
        self.now_s += seconds

    def synchronize(self) -> None:
        self.wait(SimEvent(self.copy_free_s))

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def fetch(self, src: torch.Tensor) -> torch.Tensor:
        """A host tensor brought to the device now (KV rows kept in RAM): a real copy on the copy stream,
        counted and waited for; transient, so not charged to the budget (the plan's workspace holds it)."""
        dst = torch.empty_like(src)
        self.wait(self.copy_async(dst, src))
        return dst

    def elapsed_s(self) -> float:
        return self.now_s


class CudaDevice:
    """Real CUDA: a dedicated copy stream, pinned host buffers, events; copies overlap compute.

    Not exercised in CI (no GPU there); gated on torch.cuda.is_available(). Reviewed, not yet run on
    a GPU: benchmarks/gpu_check.py runs it (and tests/test_gpu_check.py's `cuda` tests) when one is lent.
    """

    kind = "cuda"

    def __init__(self, capacity_bytes: int, index: int = 0, bandwidths: Bandwidths | None = None) -> None:
        if not torch.cuda.is_available():
            raise LocalGLMError("offload='cuda' needs a CUDA GPU, and this torch build sees none (use offload='sim')")
        self.budget = _Budget(capacity_bytes)
        self.bw = bandwidths or Bandwidths()
        self.torch_device = torch.device("cuda", index)
        self.copy_stream = torch.cuda.Stream(self.torch_device)
        self.stall_s = 0.0
        self.bytes_h2d = 0
        self.copies = 0
        self.now_s = 0.0
        self._registered: list[torch.Tensor] = []  # host buffers page-locked by host_buffer

    def alloc(self, nbytes: int, what: str = "buffer") -> torch.Tensor:
        self.budget.charge(nbytes, what)
        return torch.empty(nbytes, dtype=torch.uint8, device=self.torch_device)

    def reserve(self, nbytes: int, what: str) -> None:
        self.budget.charge(nbytes, what)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """Page-locked host memory of exactly `nbytes`. Not `pin_memory=True`: torch's pinned allocator
        rounds every block up to a power of two, so a 1.26 GB layer of GLM-4.5-Air experts would pin
        2 GiB (58 GB of experts -> 92 GiB). A plain allocation is registered with cudaHostRegister
        instead, kept (and unregistered) by this device; if registering fails, the rounded pinned
        allocator is the fallback."""
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes == 0:
            return buf
        buf.zero_()  # fault the pages in on all threads: registering faults them one by one otherwise
        err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)
        if int(getattr(err, "value", err)) != 0:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self._registered.append(buf)
        return buf

    def close(self) -> None:
        """Unregister the host buffers (after the GPU is done with them); they stay valid, pageable."""
        if self._registered:
            torch.cuda.synchronize(self.torch_device)
        while self._registered:
            torch.cuda.cudart().cudaHostUnregister(self._registered.pop().data_ptr())

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the driver unpins at process exit anyway
            pass

    def record_use(self) -> torch.cuda.Event:
        """An event after the kernels queued so far that read a slot (its next copy waits on it)."""
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.torch_device))
        return ev

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, after: torch.cuda.Event | None = None) -> torch.cuda.Event:
        # The copy must not start before the compute stream is done with the slot it overwrites
        # (`after`: the slot's last-use event); other queued compute does not hold it up.
        if after is not None:
            self.copy_stream.wait_event(after)
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
        self.bytes_h2d += src.numel() * src.element_size()
        self.copies += 1
        return ev

    def wait(self, event: torch.cuda.Event | None) -> None:
        if event is None:
            return
        # No host sync: the compute stream waits on the GPU, so the host keeps queuing work.
        # (Stall time is therefore not measured on CUDA; use the profiler or the simulated device.)
        torch.cuda.current_stream(self.torch_device).wait_event(event)

    def compute(self, seconds: float) -> None:  # real kernels take real time
        return None

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.torch_device)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.torch_device, non_blocking=True)

    def fetch(self, src: torch.Tensor) -> torch.Tensor:
        """A host tensor brought to the device (KV rows kept in RAM), on the copy stream; the compute
        stream waits for it on the GPU. A gathered selection is pageable memory, so the copy stages it."""
        dst = torch.empty(src.shape, dtype=src.dtype, device=self.torch_device)
        # dst's memory comes from the compute stream's pool: kernels queued there may still read a tensor
        # freed into it, so the copy stream waits for them before writing (record_use: an event after them).
        self.wait(self.copy_async(dst, src, after=self.record_use()))
        return dst

    def elapsed_s(self) -> float:
        return 0.0
