"""The depth policy's measured step prices, kept from one process to the next (speculative.DepthPolicy).

Why: a new process's policy starts from the cost model, and where drafting does not pay (the default model
on a 2-core CPU: multi-token steps cost 2-3x one) it spends its first requests finding that out (0.83-0.91x
plain decoding over its first 8 requests on a Zen 4). Started from the last process's measured prices, it
drafts at once where they said drafting pays, and where they said it does not it probes only at the back-off
it had reached.

One JSON file for every model and machine: `$XDG_CACHE_HOME/localglm/mtp_prices.json` (`~/.cache/...`), or
the file LOCALGLM_MTP_PRICES names (`off` keeps nothing). An entry per setup: the model's path and config,
how it was loaded (dtype, device, quantization, offload and draft options), the CPU or GPU, the localglm
version and the thread count. It holds each timed depth's price (seconds then; only their proportions are
used, as the machine's speed drifts), the acceptance and the probe back-off. A cache: a file that cannot be
read or written is ignored, never an error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ENV = "LOCALGLM_MTP_PRICES"
FILE_NAME = "mtp_prices.json"
MAX_ENTRIES = 64  # setups kept, the most recently updated
SAVE_EVERY_S = 10.0  # a server's generations write at most this often (a process's first one always)
MAX_DEPTH = 16  # options.MAX_DRAFT
MAX_EXPLORE = 1 << 16


@dataclass(frozen=True)
class Remembered:
    """What one setup's policy had measured: depth -> a step's price (seconds as measured then), the
    per-token acceptance, and the depth-0 steps it waited between probes."""

    prices: dict[int, float]
    acceptance: float
    explore_every: int

    def to_json(self) -> dict[str, Any]:
        return {"prices": {str(k): v for k, v in sorted(self.prices.items())}, "acceptance": self.acceptance, "explore_every": self.explore_every}

    @classmethod
    def from_json(cls, d: Any) -> Remembered | None:
        """None for anything malformed (a hand-edited or truncated file)."""
        try:
            prices = {int(k): float(v) for k, v in d["prices"].items()}
            acceptance, explore = float(d["acceptance"]), int(d["explore_every"])
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        if not prices or not all(0 <= k <= MAX_DEPTH and math.isfinite(v) and v > 0 for k, v in prices.items()):
            return None
        if not 0.0 <= acceptance <= 1.0 or not 1 <= explore <= MAX_EXPLORE:
            return None
        return cls(prices, acceptance, explore)


def default_path() -> Path | None:
    """The prices file: LOCALGLM_MTP_PRICES (`off`, `0` or empty: none), else the user cache dir's."""
    env = os.environ.get(ENV)
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "none") else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "localglm" / FILE_NAME


def processor_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows: prices differ between CPUs."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def setup_of(root: Path, config: str, dtype: torch.dtype, device: torch.device, options: Any) -> str:
    """What a step's price depends on, but the thread count (read when the prices are): the model, how it
    was loaded, the processor (and GPU), the code."""
    from . import __version__

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    digest = hashlib.sha1(config.encode()).hexdigest()[:16]
    return f"localglm {__version__} | {Path(root).expanduser().resolve()} | config {digest} | {dtype} | {device} {gpu} | {processor_name()} | {options!r}"


@dataclass
class PriceMemory:
    """One setup's entry in the prices file."""

    path: Path
    setup: str
    saved_at: float = field(default=-math.inf, init=False)

    def key(self) -> str:
        return hashlib.sha1(f"{self.setup} | threads {torch.get_num_threads()}".encode()).hexdigest()[:24]

    def load(self) -> Remembered | None:
        entry = _read(self.path).get(self.key())
        return Remembered.from_json(entry) if isinstance(entry, dict) else None

    def save(self, remembered: Remembered, *, now: float | None = None) -> bool:
        """Write this setup's entry (at most every SAVE_EVERY_S); True when written."""
        now = time.monotonic() if now is None else now
        if now - self.saved_at < SAVE_EVERY_S:
            return False
        self.saved_at = now
        entries = _read(self.path)
        entries[self.key()] = {**remembered.to_json(), "updated": time.time(), "setup": self.setup, "threads": torch.get_num_threads()}
        if len(entries) > MAX_ENTRIES:
            keep = sorted(entries, key=lambda k: _updated(entries[k]), reverse=True)[:MAX_ENTRIES]
            entries = {k: entries[k] for k in keep}
        return _write(self.path, {"version": 1, "entries": entries})


def _updated(entry: Any) -> float:
    try:
        return float(entry.get("updated", 0.0))
    except (AttributeError, TypeError, ValueError):
        return 0.0


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) and data.get("version") == 1 else None
    return dict(entries) if isinstance(entries, dict) else {}


def _write(path: Path, data: dict[str, Any]) -> bool:
    """Whole or not at all: a temporary file beside it, renamed over it."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False, encoding="utf-8") as f:
            tmp = Path(f.name)
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
        return True
    except OSError:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        return False


def price_memory(root: Path, config: str, dtype: torch.dtype, device: torch.device, options: Any) -> PriceMemory | None:
    """The loaded model's entry in the default prices file (`config`: the model config's repr); None
    where it is turned off."""
    path = default_path()
    return None if path is None else PriceMemory(path, setup_of(root, config, dtype, device, options))
