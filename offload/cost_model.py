"""The cost model: from measured (or assumed) bandwidths, what a missing expert costs on each path,
which path to take, and what tok/s a placement should reach.

A missing expert can be copied host-to-device and run on the GPU, or run on the CPU where its
weights already are. Copying costs `bytes / h2d`; computing on the CPU costs about
`max(bytes / ram, flops / cpu_flops)`. With one token (decode) both paths read the whole expert
once, so the CPU wins when RAM bandwidth beats PCIe (it usually does: 60-80 vs 25 GB/s) unless
the copy will be reused; with many tokens (prefill) the CPU becomes compute-bound and copying wins.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class Bandwidths:
    """Bytes/s and FLOP/s. Defaults: a PCIe 4.0 desktop with dual-channel DDR5 (assumed, not measured;
    `localglm plan --measure` measures this machine's)."""

    h2d: float = 25e9  # pinned host -> device copies
    gpu_mem: float = 900e9  # the GPU reading its own memory
    ram: float = 60e9  # the CPU reading weights from RAM
    disk: float = 3e9  # NVMe, for experts left memory-mapped on disk
    cpu_flops: float = 1.0e12  # CPU matmul throughput on expert weights (all cores)
    gpu_flops: float = 100e12
    latency_s: float = 10e-6  # per copy or kernel launch
    measured: list[str] = field(default_factory=list)  # which fields were measured here

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Bandwidths:
        """Bandwidths saved by `save`; ValueError when a field is not what the cost model divides by
        (a positive finite number; latency_s may be 0) or `measured` is not a list of names."""
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("expected a JSON object of bandwidths")
        bw = cls(**raw)
        for f in fields(bw):
            v = getattr(bw, f.name)
            if f.name == "measured":
                if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                    raise ValueError(f"'measured' must be a list of field names, got {v!r}")
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (v == 0 and f.name != "latency_s"):
                raise ValueError(f"{f.name!r} must be a positive number, got {v!r}")
        return bw


def _best_time(fn, repeat: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bandwidths(device: str = "cpu", nbytes: int = 64 << 20, base: Bandwidths | None = None) -> Bandwidths:
    """Measure RAM copy bandwidth and CPU matmul throughput (and, on CUDA, host-to-device and
    device bandwidth) with short microbenchmarks; unmeasured fields keep `base`'s values."""
    import torch  # here, not at import: `localglm plan` reads sizes and prices without torch

    bw = Bandwidths(**{k: v for k, v in asdict(base or Bandwidths()).items() if k != "measured"})
    src = torch.empty(nbytes, dtype=torch.uint8)
    src.fill_(1)
    dst = torch.empty_like(src)
    t = _best_time(lambda: dst.copy_(src))
    bw.ram = 2 * nbytes / t  # a copy reads and writes
    n = 1024
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    t = _best_time(lambda: a @ b, 3)
    bw.cpu_flops = 2 * n**3 / t
    bw.measured = ["ram", "cpu_flops"]
    if device == "cuda" and torch.cuda.is_available():
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

        def h2d() -> None:
            dev.copy_(pinned, non_blocking=True)
            torch.cuda.synchronize()

        bw.h2d = nbytes / _best_time(h2d)
        dev2 = torch.empty_like(dev)

        def d2d() -> None:
            dev2.copy_(dev)
            torch.cuda.synchronize()

        bw.gpu_mem = 2 * nbytes / _best_time(d2d)
        x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

        def mm() -> None:
            x @ x
            torch.cuda.synchronize()

        bw.gpu_flops = 2 * 4096**3 / _best_time(mm)
        bw.measured += ["h2d", "gpu_mem", "gpu_flops"]
    return bw


class CostModel:
    """Per-expert costs for one expert of `expert_bytes` bytes and `flops_per_token` FLOPs a token."""

    def __init__(self, bw: Bandwidths, expert_bytes: int, flops_per_token: float) -> None:
        self.bw = bw
        self.expert_bytes = expert_bytes
        self.flops = flops_per_token

    def gpu_s(self, tokens: int) -> float:
        return self.bw.latency_s + max(self.expert_bytes / self.bw.gpu_mem, tokens * self.flops / self.bw.gpu_flops)

    def cpu_s(self, tokens: int, on_disk: bool = False) -> float:
        read = self.expert_bytes / (self.bw.disk if on_disk else self.bw.ram)
        return self.bw.latency_s + max(read, tokens * self.flops / self.bw.cpu_flops)

    def copy_s(self, on_disk: bool = False) -> float:
        extra = self.expert_bytes / self.bw.disk if on_disk else 0.0
        return self.bw.latency_s + self.expert_bytes / self.bw.h2d + extra

    def decide(self, tokens: int, expected_reuse: float = 0.0, on_disk: bool = False) -> str:
        """'copy' (to the GPU, then run there) or 'cpu' for a missing expert hit by `tokens` tokens.

        `expected_reuse`: how many later uses a copy is expected to serve from the cache (each
        saves one CPU run of a token). Prefill streams (copy); decode computes cold experts on the CPU.
        """
        copy = self.copy_s(on_disk) + self.gpu_s(tokens) - expected_reuse * max(0.0, self.cpu_s(1, on_disk) - self.gpu_s(1))
        return "copy" if copy < self.cpu_s(tokens, on_disk) else "cpu"

    def miss_s(self, tokens: int = 1, on_disk: bool = False) -> float:
        return min(self.copy_s(on_disk) + self.gpu_s(tokens), self.cpu_s(tokens, on_disk))
