"""Routing traces: which experts each token chose at each MoE layer, recorded from any run.

File format (JSON lines, `.jsonl`): a header object, then one object per MoE-layer call:
  {"format": "localglm-trace", "version": 1, "n_experts": E, "top_k": k, "moe_layers": [...],
   "expert_bytes": B, "model": "..."}
  {"s": step, "l": layer, "e": [[e0, e1, ...], ...]}      # one row of k ids per token in the call
  {"s": step, "l": layer, "p": [e, ...]}                  # optional: experts predicted for this call
A step is one forward pass (a prefill chunk or one decoded token). Predictions are recorded by
the offloaded backend (or TracingExperts with a predictor) before the layer runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from localglm.checkpoint.writing import refuse_odd_target
from localglm.errors import LocalGLMError

if TYPE_CHECKING:
    import torch  # annotations only: `localglm simulate` replays a trace without torch

FORMAT = "localglm-trace"


def check_trace_target(path: str | Path) -> Path:
    """`path` as a place to write a trace: new, empty, or an earlier trace (whose first line is a trace header).
    Anything else -- a model's shard or config.json, a directory, a device -- is refused in one line: `--trace
    model/config.json` replaced the config, and a trace written over a memory-mapped shard killed the run with
    SIGBUS (found by a hostile-input sweep)."""
    path = Path(path)
    refuse_odd_target(path, "file")
    if not path.exists():
        return path
    try:
        with path.open("rb") as f:
            first = f.readline(1 << 16)
        ours = not first or json.loads(first).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise LocalGLMError(f"{path}: exists and is not a localglm trace; refusing to overwrite it (remove it, or choose another path)")
    return path


MAX_KEYS = 1 << 22  # MoE layers x experts a trace may hold: far above any GLM (GLM-5: 75 x 256), and arrays of that many fit in RAM


@dataclass
class TraceCall:
    step: int
    layer: int
    experts: np.ndarray  # [N, k] int
    predicted: np.ndarray | None = None  # experts predicted for this call before it ran


@dataclass
class Trace:
    n_experts: int
    top_k: int
    moe_layers: list[int]
    expert_bytes: int = 0
    model: str = ""
    calls: list[TraceCall] = field(default_factory=list)

    @property
    def n_keys(self) -> int:
        return len(self.moe_layers) * self.n_experts

    def layer_index(self) -> dict[int, int]:
        return {layer: i for i, layer in enumerate(self.moe_layers)}

    @property
    def tokens(self) -> int:
        """Tokens that went through the first MoE layer."""
        first = self.moe_layers[0] if self.moe_layers else -1
        return sum(len(c.experts) for c in self.calls if c.layer == first)

    def header(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": 1, "n_experts": self.n_experts, "top_k": self.top_k,
            "moe_layers": self.moe_layers, "expert_bytes": self.expert_bytes, "model": self.model,
        }  # fmt: skip

    def save(self, path: str | Path) -> Path:
        path = check_trace_target(path)
        with path.open("w") as f:
            f.write(json.dumps(self.header()) + "\n")
            for c in self.calls:
                if c.predicted is not None:
                    f.write(json.dumps({"s": c.step, "l": c.layer, "p": [int(e) for e in c.predicted]}) + "\n")
                f.write(json.dumps({"s": c.step, "l": c.layer, "e": np.asarray(c.experts).tolist()}) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        path = Path(path)
        if not path.is_file():
            raise LocalGLMError(f"{path}: no such trace file")
        try:
            with path.open(encoding="utf-8") as f:
                tr = cls._from_header(f.readline(), path)
                pending: dict[tuple[int, int], np.ndarray] = {}
                for n, line in enumerate(f, start=2):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                        key = (int(rec["s"]), int(rec["l"]))
                        if "p" in rec:
                            pending[key] = tr._ids(rec["p"], 1)
                        else:
                            ids = tr._ids(rec["e"], 2) if rec["e"] else np.zeros((0, tr.top_k), np.int64)
                            tr.calls.append(TraceCall(key[0], key[1], ids, pending.pop(key, None)))
                    except (KeyError, ValueError, TypeError, OverflowError, json.JSONDecodeError) as exc:
                        raise LocalGLMError(f"{path}:{n}: bad trace record ({exc})") from None
        except UnicodeDecodeError:
            raise LocalGLMError(f"{path}: not a localglm routing trace (not UTF-8 text)") from None
        bad = {c.layer for c in tr.calls} - set(tr.moe_layers)
        if bad:
            raise LocalGLMError(f"{path}: layers {sorted(bad)} are not in the header's moe_layers")
        return tr

    @classmethod
    def _from_header(cls, line: str, path: Path) -> Trace:
        """The empty trace a header line describes, its fields checked (the simulator sizes arrays by them)."""
        try:
            head = json.loads(line)
        except json.JSONDecodeError:
            head = None
        if not isinstance(head, dict) or head.get("format") != FORMAT:
            raise LocalGLMError(f"{path}: not a localglm routing trace (first line must be its header)")

        def field(key: str, ok: bool, want: str) -> None:
            if not ok:
                raise LocalGLMError(f"{path}: trace header field {key!r} must be {want}, got {head.get(key)!r}")

        n_experts, top_k, layers, nbytes = head.get("n_experts"), head.get("top_k"), head.get("moe_layers"), head.get("expert_bytes", 0)
        field("n_experts", _count(n_experts, 1), "a positive integer")
        field("top_k", _count(top_k, 1) and top_k <= n_experts, f"an integer from 1 to n_experts ({n_experts})")
        field("moe_layers", isinstance(layers, list) and all(_count(x, 0) for x in layers), "a list of layer numbers")
        field("n_experts", len(layers) * n_experts <= MAX_KEYS, f"at most {MAX_KEYS // max(1, len(layers))} for {len(layers)} MoE layers")
        field("expert_bytes", _count(nbytes, 0), "an integer, 0 or more")
        return cls(n_experts, top_k, list(layers), nbytes, str(head.get("model", "")))

    def _ids(self, value: Any, ndim: int) -> np.ndarray:
        """A record's expert ids (rows of top_k for calls, a flat list for predictions), each an expert
        of the header's (numpy would read a negative id as one counted from the end)."""
        ids = np.asarray(value, dtype=np.int64)
        ids = ids.reshape(-1, self.top_k) if ndim == 2 else ids
        if ids.ndim != ndim or (ids.size and not (0 <= ids.min() and ids.max() < self.n_experts)):
            raise ValueError(f"expert ids must be {'rows of top_k ' if ndim == 2 else 'a list of '}ids from 0 to {self.n_experts - 1}")
        return ids


def _count(v: Any, least: int) -> bool:
    """Whether a header value is an integer (not a bool) of at least `least`."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


class TraceRecorder:
    """Collects calls as they happen; a new step starts whenever a layer index does not increase."""

    def __init__(self, n_experts: int, top_k: int, moe_layers: list[int], expert_bytes: int = 0, model: str = "", path: str | Path | None = None) -> None:
        self.trace = Trace(n_experts, top_k, list(moe_layers), expert_bytes, model)
        self.path = check_trace_target(path) if path is not None else None
        self.step = -1
        self._last_layer = 10**9
        self._pred: dict[int, np.ndarray] = {}
        self._file: TextIO | None = None

    def predicted(self, layer: int, experts: Any) -> None:
        """Experts predicted for `layer`'s coming call (recorded with it)."""
        self._pred[layer] = np.asarray(list(experts), dtype=np.int64)

    def record(self, layer: int, expert_ids: torch.Tensor | np.ndarray) -> None:
        if layer <= self._last_layer:
            self.step += 1
        self._last_layer = layer
        ids = expert_ids.detach().cpu().numpy() if hasattr(expert_ids, "detach") else np.asarray(expert_ids)  # a torch tensor
        call = TraceCall(self.step, layer, ids.astype(np.int64).reshape(-1, self.trace.top_k), self._pred.pop(layer, None))
        self.trace.calls.append(call)
        if self.path is not None:  # stream to disk so a killed run still leaves its trace
            if self._file is None:
                self._file = self.path.open("w")
                self._file.write(json.dumps(self.trace.header()) + "\n")
            if call.predicted is not None:
                self._file.write(json.dumps({"s": call.step, "l": layer, "p": call.predicted.tolist()}) + "\n")
            self._file.write(json.dumps({"s": call.step, "l": layer, "e": call.experts.tolist()}) + "\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TracingExperts:
    """Wraps any ExpertBackend and records its routing (and, given a predictor, its predictions)."""

    def __init__(self, inner: Any, recorder: TraceRecorder, predictor: Any | None = None) -> None:
        self.inner = inner
        self.recorder = recorder
        self.predictor = predictor

    def hint(self, layer: int, x: torch.Tensor) -> None:
        if self.predictor is not None:
            for target, experts in self.predictor.predict(layer, x).items():
                self.recorder.predicted(target, experts)
        self.inner.hint(layer, x)

    def attended(self, layer: int, x: torch.Tensor) -> None:
        if self.predictor is not None:
            self.predictor.attended(layer, x)
        self.inner.attended(layer, x)

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        self.recorder.record(layer, expert_ids)
        return self.inner.forward(layer, x, expert_ids, expert_weights)

    def stats_snapshot(self) -> dict[str, Any]:
        snap = getattr(self.inner, "stats_snapshot", None)
        d = dict(snap()) if snap else {}
        self.recorder.flush()
        d["trace_calls"] = len(self.recorder.trace.calls)
        return d

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def tracing_experts(
    experts: Any, cfg: Any, routing: Any, dtype: torch.dtype, model: str = "", path: str | Path | None = None, predict: bool = True
) -> TracingExperts:
    """`experts` wrapped so every MoE call is recorded (streamed to `path`), with the default
    predictor's guesses (from `routing`, the model's MoE routers) unless `predict` is False."""
    import torch

    from .prefetch import predictor_for

    expert_bytes = 3 * cfg.hidden_size * cfg.moe_intermediate_size * torch.tensor([], dtype=dtype).element_size()
    rec = TraceRecorder(cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_layers, expert_bytes, model, path)
    return TracingExperts(experts, rec, predictor_for(routing) if predict else None)


def attach_tracer(model: Any, path: str | Path | None = None, predict: bool = True) -> TraceRecorder:
    """Wrap an already loaded Model's expert backend in a tracer (for tests and benchmarks that
    trace a model they hold; `localglm.load(..., trace=PATH)` builds the tracer in at load)."""
    net = model.net
    net.experts = tracing_experts(net.experts, model.config, net, net.dtype, str(getattr(model, "path", "")), path, predict)
    return net.experts.recorder
