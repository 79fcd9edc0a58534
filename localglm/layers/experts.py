"""The ExpertBackend protocol and the all-in-memory backend.

The model never touches routed-expert weights itself: it hands each MoE layer's tokens, chosen
expert ids and weights to a backend, which may hold experts in RAM, on a GPU cache, or quantized
(offload/ and quant/ provide those). The in-memory backend is the degenerate placement plan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from quant.native import LgMat, NativeExpert

from .linear import linear
from .native import LayerLib, native


class ExpertBackend(Protocol):
    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum over each token's chosen experts: x [N, H], ids/weights [N, k] -> [N, H]."""
        ...

    def hint(self, layer: int, x: torch.Tensor) -> None:
        """The residual stream entering MoE layer `layer` (before its attention), called before the
        layer runs, so a backend can predict and prefetch its experts and those of the layers ahead.
        x (here and in `attended`) is only valid during the call: the fused decoder updates it in
        place afterwards, so a backend that keeps it must copy it."""
        ...

    def attended(self, layer: int, x: torch.Tensor) -> None:
        """The residual stream after `layer`'s attention (before its norm and MoE): what attention
        added, which a predictor carries over to the next token's guess for this layer."""
        ...


EXACT_ROWS = 16  # rows of one expert call computed as decoded tokens are (expert_swiglu): a verification's tokens


def group_by_expert(expert_ids: torch.Tensor) -> tuple[list[int], list[int], torch.Tensor]:
    """Sort the (token, slot) pairs by expert.

    Returns the used expert ids, how many pairs each has, and the flat pair indices in expert
    order (pair p is token p // k, slot p % k). Only experts that were chosen appear.
    """
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    used, counts = torch.unique_consecutive(flat[order], return_counts=True)
    return used.tolist(), counts.tolist(), order


def combine_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    compute: Callable[[int, torch.Tensor], torch.Tensor],
    used: list[int] | None = None,
    counts: list[int] | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weighted sum over each token's chosen experts, every backend's one dispatch loop.

    `compute(e, xs)` runs expert e on the rows xs. Decode (one token) skips
    the gather/scatter; batches are grouped by expert so each used expert runs once. A caller that
    already grouped (to issue copies first) passes its `used, counts, order`.
    """
    n, k = expert_ids.shape
    out = torch.zeros(x.shape, dtype=torch.float32 if x.device.type == "cpu" else x.dtype, device=x.device)
    if n == 1:  # in expert order, summed in fp32 on the CPU: the native MoE kernel's numbers exactly
        for e, wt in sorted(zip(expert_ids[0].tolist(), expert_weights[0].tolist())):
            out += compute(e, x) * wt
        return out.to(x.dtype)
    if used is None or counts is None or order is None:
        used, counts, order = group_by_expert(expert_ids)
    flat_w = expert_weights.reshape(-1)
    start = 0
    for e, cnt in zip(used, counts):
        pairs = order[start : start + cnt]
        start += cnt
        tokens = pairs // k
        r = compute(e, x[tokens])
        y = r * flat_w[pairs, None]
        if x.device.type == "cpu":  # each product rounded to the expert's output dtype, as the one-token sum above rounds it
            y = y.to(r.dtype)  # (x's for a float expert; fp32 for a quantized one, which PreparedExpert returns on the CPU)
        out.index_add_(0, tokens, y.to(out.dtype))
    return out.to(x.dtype)


def experts_alone(expert_ids: torch.Tensor, dtype: torch.dtype) -> list[int]:
    """The experts chosen by too many of these tokens for the native MoE kernel (NativeExpert.in_moe_kernel):
    each of them runs by itself, through a GEMM, while the rest share one MoE kernel call."""
    counts = torch.bincount(expert_ids.reshape(-1))
    return [e for e in torch.nonzero(counts).flatten().tolist() if not NativeExpert.in_moe_kernel(int(counts[e]), dtype)]


def expert_swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One dense expert: down(silu(gate(x)) * up(x)), gate_up [2I, H] fused, x [N, H].

    Up to EXACT_ROWS rows on the CPU (a decoded token, a speculative verification's few tokens) go
    through the native kernel, which takes its rows one by one: each row gets a decoded token's
    numbers exactly, so greedy speculation is plain decoding. More rows (prompts) go through torch's
    GEMM. InMemoryExperts and the offloading backend's float codec both call this, and the fused
    decode computes the same numbers, so an expert gives the same result wherever it runs.
    """
    if x.shape[0] <= EXACT_ROWS and x.device.type == "cpu":
        lib = native()
        y = lib.dense_expert(gate_up, down, x.contiguous()) if lib is not None else None
        if y is not None:
            return y
    gate, up = linear(x, gate_up).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, down)


class InMemoryExperts:
    """All routed experts of every MoE layer as stacked tensors in one device's memory.

    Per layer: gate_up [E, 2I, H] and down [E, H, I], so expert e's weights are two contiguous
    slices. Only the chosen experts are computed, tokens grouped by expert.
    """

    def __init__(self, gate_up: dict[int, torch.Tensor], down: dict[int, torch.Tensor]) -> None:
        self.gate_up = gate_up
        self.down = down
        self._fused: dict[int, tuple | None] = {}  # layer -> (LgExperts, the LgMat tables it points into)

    def hint(self, layer: int, x: torch.Tensor) -> None:  # everything is resident already
        return None

    def attended(self, layer: int, x: torch.Tensor) -> None:
        return None

    def _expert(self, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        return expert_swiglu(x, self.gate_up[layer][e], self.down[layer][e])

    def fused_experts(self, layer: int) -> object | None:
        """The layer's experts as the fused decode takes them (layers.native.LgExperts), or None
        where the native kernels do not take these tensors."""
        if layer not in self._fused:  # built once (None too: the kernels do not take these tensors)
            self._fused[layer] = _dense_tables(self.gate_up[layer], self.down[layer])
        got = self._fused[layer]
        return got[0] if got else None

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        return combine_experts(x, expert_ids, expert_weights, lambda e, xs: self._expert(layer, e, xs))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.gate_up, self.down) for t in d.values())


class QuantizedExperts:
    """Routed experts as quantized blobs (quant.blob): one contiguous uint8 blob per expert.

    Per layer, `blobs[layer]` is a uint8 [E, blob_bytes] tensor (row e = expert e's blob, the unit
    an offloading backend moves), or a list of E uint8 [blob_bytes] views of a memory-mapped
    quantized directory (`load(..., mmap=True)`: the experts are never copied, so a model bigger
    than RAM runs from the OS page cache). On the CPU a whole layer runs in one call of the native kernel
    (quant/native.py: every chosen expert, grouped by expert, straight from the blobs). Without it
    (no C compiler, CUDA blobs, shapes it does not take) each expert runs through
    `PreparedExpert` (torch's packed int4 / int8 kernels), grouped by expert as InMemoryExperts.
    """

    def __init__(self, layouts: dict, blobs: dict[int, torch.Tensor | list[torch.Tensor]], dtype: torch.dtype, keep_blobs: bool = True) -> None:
        from quant.blob import PreparedExpert
        from quant.native import native_lib

        self.layouts = layouts
        self.dtype = dtype
        self.blobs = blobs
        self.native = native_lib()
        self.prepared: dict[int, list] = {}
        self._native_layers: dict[int, tuple] = {}
        self._fused: dict[int, object] = {}  # layer -> layers.native.LgExperts over _native_layers' (or GGUF blocks') tables
        self._block_tables: dict[int, tuple] = {}  # layer -> the GGUF-block experts' LgMat tables (_fused's point into them)
        for layer, buf in blobs.items():
            experts = self.prepared[layer] = [PreparedExpert(layouts[layer], buf[e], dtype) for e in range(len(buf))]
            if experts and all(pe.native is not None for pe in experts):
                # one ctypes table per part over every expert: a whole layer in one native call
                gu = (type(experts[0].native.gu) * len(experts))(*(pe.native.gu for pe in experts))
                dn = (type(gu[0]) * len(experts))(*(pe.native.dn for pe in experts))
                self._native_layers[layer] = (gu, dn, layouts[layer].inter)
                self._fused[layer] = LayerLib.quantized_experts(self._native_layers[layer])
            elif experts and all(pe.mats is not None for pe in experts):
                # GGUF blocks as stored: the fused decode runs them inside its layer call, in fp32 as PreparedExpert does
                gu, dn = ((LgMat * len(experts))(*(pe.mats[i] for pe in experts)) for i in (0, 1))
                self._block_tables[layer] = (gu, dn)
                self._fused[layer] = LayerLib.dense_experts(gu, dn, layouts[layer].inter, fp32=True)
        if not keep_blobs and not self._native_layers and not self._block_tables:
            # The torch kernels keep their own packed copy; the canonical blobs are only needed to move or save experts.
            self.blobs = {}
            for experts in self.prepared.values():
                for pe in experts:
                    pe.gate_up.prepare(drop_buffer=True)
                    pe.down.prepare(drop_buffer=True)
                    pe.blob = None

    @property
    def kernel(self) -> str:
        """Which kernels run the experts (for stats and `inspect`)."""
        from quant.kquants import kernel_status
        from quant.native import native_status

        stored = [i for i, lay in self.layouts.items() if lay.gate_up.raw_blocks or lay.down.raw_blocks]  # GGUF blocks
        if len(self._native_layers) == len(self.prepared):
            return native_status()
        if stored:
            rest = len(self.prepared) - len(stored) - len(self._native_layers)
            others = [native_status()] * bool(self._native_layers) + ["torch kernels"] * (rest > 0)
            return ", ".join([f"GGUF blocks as stored: {kernel_status()}", *others])
        return "torch kernels" if not self._native_layers else f"{native_status()}, torch kernels for some layers"

    def hint(self, layer: int, x: torch.Tensor) -> None:
        return None

    def attended(self, layer: int, x: torch.Tensor) -> None:
        return None

    def fused_experts(self, layer: int) -> object | None:
        """The layer's experts as the fused decode takes them (layers.native.LgExperts), or None
        where the layer runs through torch kernels."""
        return self._fused.get(layer)

    def stats_snapshot(self) -> dict[str, str]:
        return {"kernels": self.kernel}

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        native = self._native_layers.get(layer)
        experts = self.prepared[layer]
        if native is None:
            return combine_experts(x, expert_ids, expert_weights, lambda e, xs: experts[e](xs))
        gu, dn, inter = native
        alone = experts_alone(expert_ids, x.dtype) if x.shape[0] > 1 else []
        if not alone:  # the whole layer in one native call
            return self.native.moe(gu, dn, inter, x, expert_ids, expert_weights).to(x.dtype)
        # A prompt whose busiest experts take the bf16 (or a dequantized) GEMM: those run one by one
        # (NativeExpert), every other pair in one native call that skips theirs (id -1), in fp32. One
        # call instead of a Python round per expert: with 64 small experts a layer that round was a
        # third of a 128-token prefill.
        skip = torch.isin(expert_ids, torch.tensor(alone, dtype=expert_ids.dtype))
        if bool(skip.all()):
            out = torch.zeros(x.shape, dtype=torch.float32)
        else:
            out = self.native.moe(gu, dn, inter, x.float(), expert_ids.masked_fill(skip, -1), expert_weights)
        for e in alone:
            tokens, slots = (expert_ids == e).nonzero(as_tuple=True)
            out.index_add_(0, tokens, experts[e](x[tokens]).float() * expert_weights[tokens, slots, None].float())
        return out.to(x.dtype)

    @property
    def mapped(self) -> bool:
        """Whether the blobs are views of the mapped files (not copies in RAM)."""
        return any(isinstance(b, list) for b in self.blobs.values())

    @property
    def nbytes(self) -> int:
        return sum(sum(x.numel() for x in b) if isinstance(b, list) else b.numel() for b in self.blobs.values())


def _dense_tables(gate_up: torch.Tensor, down: torch.Tensor) -> tuple | None:
    """(LgExperts, its LgMat tables) over stacked dense experts gate_up [E, 2I, H], down [E, H, I]."""
    lib = native()
    if lib is None or gate_up.device.type != "cpu":
        return None
    gu = [lib.describe_matrix(gate_up[e], gate_up.dtype) for e in range(gate_up.shape[0])]
    dn = [lib.describe_matrix(down[e], down.dtype) for e in range(down.shape[0])]
    if any(m is None for m in gu + dn):
        return None
    gu_t, dn_t = (type(gu[0]) * len(gu))(*gu), (type(dn[0]) * len(dn))(*dn)
    return lib.dense_experts(gu_t, dn_t, down.shape[2]), gu_t, dn_t


class LayerOffset:
    """An expert backend seen under other layer numbers: the MTP block runs as layer 0 of its own
    one-layer model, while its experts are stored (and quantized, and counted) as layer N."""

    def __init__(self, inner: ExpertBackend, offset: int) -> None:
        self.inner, self.offset = inner, offset

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        return self.inner.forward(layer + self.offset, x, expert_ids, expert_weights)

    def hint(self, layer: int, x: torch.Tensor) -> None:
        self.inner.hint(layer + self.offset, x)

    def attended(self, layer: int, x: torch.Tensor) -> None:
        self.inner.attended(layer + self.offset, x)

    def in_ram(self) -> tuple[InMemoryExperts | QuantizedExperts, int] | None:
        """(the renamed backend, the offset) where it holds its experts in RAM itself (no wrapper that
        must see each call, such as an offload cache): the fused decode then runs them inside its call."""
        return (self.inner, self.offset) if type(self.inner) in (InMemoryExperts, QuantizedExperts) else None
