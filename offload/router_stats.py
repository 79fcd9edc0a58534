"""Router statistics: per-layer expert use and next-layer co-occurrence, counted online and saved
to a profile beside the model (or in the user cache dir) so the next start knows the hot experts.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from localglm.errors import LocalGLMError

if TYPE_CHECKING:
    import torch  # annotations only: `localglm simulate --stats` reads a profile without torch

PROFILE_NAME = "localglm_router_stats.npz"


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "localglm" / "router_stats"


def profile_path(model_root: str | Path) -> Path:
    """Beside the model when its folder is writable, else in the user cache dir (keyed by path)."""
    root = Path(model_root).expanduser().resolve()
    folder = root if root.is_dir() else root.parent
    if os.access(folder, os.W_OK):
        return folder / PROFILE_NAME
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:16]
    return user_cache_dir() / f"{root.name}-{digest}.npz"


def _shape_of(meta: Any) -> tuple[list[int], int, int]:
    """(moe_layers, n_experts, top_k) of a profile's metadata; ValueError when they are not that."""
    if not isinstance(meta, dict):
        raise ValueError("its metadata is not a JSON object")
    layers, n_experts, top_k = meta["moe_layers"], meta["n_experts"], meta["top_k"]
    ints = [n_experts, top_k, *layers] if isinstance(layers, list) else None
    if ints is None or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints) or not 0 < top_k <= n_experts:
        raise ValueError(f"moe_layers {layers!r}, n_experts {n_experts!r}, top_k {top_k!r} describe no MoE model")
    return layers, n_experts, top_k


class RouterStats:
    def __init__(self, moe_layers: list[int], n_experts: int, top_k: int) -> None:
        self.moe_layers = list(moe_layers)
        self.n_experts = n_experts
        self.top_k = top_k
        self.index = {layer: i for i, layer in enumerate(self.moe_layers)}
        n = len(self.moe_layers)
        self.counts = np.zeros((n, n_experts), dtype=np.float64)
        self.cooc = np.zeros((max(0, n - 1), n_experts, n_experts), dtype=np.float64)
        self.tokens = 0  # tokens seen at the first MoE layer
        self._prev: tuple[int, np.ndarray] | None = None

    def update(self, layer: int, expert_ids: torch.Tensor | np.ndarray) -> None:
        ids = expert_ids.detach().cpu().numpy() if hasattr(expert_ids, "detach") else np.asarray(expert_ids)  # a torch tensor
        ids = ids.reshape(-1, ids.shape[-1]).astype(np.int64)
        li = self.index[layer]
        np.add.at(self.counts[li], ids.reshape(-1), 1.0)
        if li == 0:
            self.tokens += len(ids)
        if self._prev is not None and self._prev[0] == li - 1 and len(self._prev[1]) == len(ids) and li > 0:
            prev = self._prev[1]
            k1, k2 = prev.shape[1], ids.shape[1]
            a = np.repeat(prev, k2, axis=1).reshape(-1)
            b = np.tile(ids, (1, k1)).reshape(-1)
            np.add.at(self.cooc[li - 1], (a, b), 1.0)
        self._prev = (li, ids)

    def rates(self) -> np.ndarray:
        """Uses per token of every (layer, expert), flat [n_moe * E]."""
        return (self.counts / max(1, self.tokens)).reshape(-1)

    def hottest(self, n: int) -> list[int]:
        """The n most used flat keys (layer index * E + expert), hottest first."""
        flat = self.counts.reshape(-1)
        order = np.argsort(-flat, kind="stable")
        return [int(k) for k in order[:n] if flat[k] > 0]

    def next_given(self, li: int, experts: np.ndarray) -> np.ndarray:
        """P(expert f chosen at MoE layer li+1 | the given experts at li), averaged over them: [E]."""
        if li >= len(self.cooc) or len(experts) == 0:
            return np.zeros(self.n_experts)
        rows = self.cooc[li][experts]
        denom = self.counts[li][experts][:, None]
        return (rows / np.maximum(denom, 1.0)).mean(axis=0)

    def heat(self) -> dict[int, list[float]]:
        """Per layer: each expert's share of that layer's uses."""
        out = {}
        for layer, li in self.index.items():
            total = self.counts[li].sum()
            out[layer] = (self.counts[li] / total).round(4).tolist() if total else [0.0] * self.n_experts
        return out

    def merge(self, other: RouterStats) -> None:
        self._check(other.moe_layers, other.n_experts, "merge")
        self.counts += other.counts
        self.cooc += other.cooc
        self.tokens += other.tokens

    def _check(self, moe_layers: list[int], n_experts: int, what: str) -> None:
        if list(moe_layers) != self.moe_layers or n_experts != self.n_experts:
            raise LocalGLMError(
                f"router statistics {what}: profile is for {len(moe_layers)} MoE layers x {n_experts} experts, "
                f"the model has {len(self.moe_layers)} x {self.n_experts}"
            )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"moe_layers": self.moe_layers, "n_experts": self.n_experts, "top_k": self.top_k, "tokens": self.tokens})
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez_compressed(tmp, counts=self.counts.astype(np.float32), cooc=self.cooc.astype(np.float32), meta=np.array(meta))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RouterStats:
        path = Path(path)
        try:
            with np.load(path) as z:
                meta = json.loads(str(z["meta"]))
                st = cls(*_shape_of(meta))
                st.counts = z["counts"].astype(np.float64)
                st.cooc = z["cooc"].astype(np.float64)
                st.tokens = int(meta["tokens"])
        except FileNotFoundError:
            raise LocalGLMError(f"{path}: no router statistics profile there") from None
        except (KeyError, ValueError, TypeError, OSError) as exc:
            raise LocalGLMError(f"{path}: not a router statistics profile ({exc})") from None
        n, e = len(st.moe_layers), st.n_experts
        if st.counts.shape != (n, e) or st.cooc.shape != (max(0, n - 1), e, e) or st.tokens < 0:
            raise LocalGLMError(f"{path}: not a router statistics profile (its arrays or token count are not those of {n} MoE layers x {e} experts)")
        return st

    @classmethod
    def load_or_new(cls, path: str | Path | None, moe_layers: list[int], n_experts: int, top_k: int) -> RouterStats:
        """The saved profile if there is a matching one, else empty statistics."""
        if path is not None and Path(path).is_file():
            try:
                st = cls.load(path)
                if st.n_experts == n_experts and st.moe_layers != list(moe_layers) and set(st.moe_layers) & set(moe_layers):
                    return st.restricted(moe_layers)  # saved with or without the MTP block's layer: keep the common ones
                st._check(moe_layers, n_experts, "load")
                return st
            except LocalGLMError:
                pass  # a stale or foreign profile: start afresh rather than fail the load
        return cls(moe_layers, n_experts, top_k)

    def restricted(self, moe_layers: list[int]) -> RouterStats:
        """These statistics over other layers: the rows of layers both have kept (and the co-occurrences
        of pairs consecutive in both), the others empty."""
        out = RouterStats(moe_layers, self.n_experts, self.top_k)
        out.tokens = self.tokens
        for layer, li in out.index.items():
            if layer in self.index:
                out.counts[li] = self.counts[self.index[layer]]
                if li > 0 and self.index.get(out.moe_layers[li - 1]) == self.index[layer] - 1:
                    out.cooc[li - 1] = self.cooc[self.index[layer] - 1]
        return out
