"""OffloadedExperts: the ExpertBackend with routed experts in host RAM and a device expert cache.

Per MoE call: the call's experts are pinned; each is a hit (computed from its device slot), or a
miss that the cost model sends either to the device (copied into a slot, evicting the policy's
victim) or to the CPU (computed from the host blob; a call's CPU experts share one native call).
A call with more experts than its class has slots (a prompt chunk) runs in waves: a copy that found
every slot pinned is retried when its turn to compute comes, after the call's experts computed
before it were unpinned, so `miss="copy"` never computes on the CPU (the same numbers as the
experts resident on the device). `hint` gets the hidden state entering each MoE layer, predicts
that layer's and the next one's experts by applying their routers to it, and prefetches them into
free or cold slots.
Router statistics are counted online, seed the stat policy and the initial cache contents, and
are saved to a profile beside the model.

Outputs equal InMemoryExperts' bit for bit: the same kernels on the same bytes in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from localglm.errors import LocalGLMError
from localglm.options import MISS_MODES, OffloadOptions
from localglm.layers.experts import InMemoryExperts, combine_experts, group_by_expert
from localglm.model_info import human_bytes
from quant.native import NativeExpert

from .cost_model import Bandwidths, CostModel
from .device import CudaDevice, SimulatedDevice
from .expert_cache import Bf16Codec, ExpertCache, ExpertCodec, SlotClass
from .metrics import OffloadCounters
from .policies import HALF_LIFE, StatGuided, make_policy
from .prefetch import NextLayerPredictor, PredictionCounts, predictor_for
from .router_stats import RouterStats, profile_path
from .trace import TraceRecorder


HOST_PREPARED_MAX = 256  # quantized experts run on the CPU whose prepared kernels are kept (LRU)
GUESS_MIN_PRECISION = 0.9  # a layer's speculation guesses are prefetched while at least this share of them was used (at 0.5 they moved 50% more bytes on the default model: bench_mtp_offload.py)
PREFETCH_MIN_IDLE: float | None = None  # tokens; e.g. 1.0 stops prefetch evicting the last token's experts (measured: it hurts)


class OffloadedExperts:
    def __init__(
        self,
        moe_layers: list[int],
        n_experts: int,
        top_k: int,
        codec: ExpertCodec | dict[int, ExpertCodec],  # one for all layers, or per layer
        host: dict[int, torch.Tensor],  # layer -> [E, codec.nbytes] uint8 (pinned on CUDA)
        device: Any,
        n_slots: int | list[tuple[list[int], int]],  # a count, or (layers, count) per slot size class
        *,
        policy: str = "stat",
        stats: RouterStats | None = None,
        stats_path: str | Path | None = None,
        predictor: NextLayerPredictor | None = None,
        prefetch: bool = True,
        preload: bool = True,
        miss: str = "cost",
        flops_per_token: float = 0.0,
        recorder: TraceRecorder | None = None,
        half_life: float = HALF_LIFE,
    ) -> None:
        if miss not in MISS_MODES:
            raise LocalGLMError(f"offload miss mode {miss!r}: use one of {', '.join(MISS_MODES)}")
        self.moe_layers = list(moe_layers)
        self.index = {layer: i for i, layer in enumerate(self.moe_layers)}
        self.n_experts, self.top_k = n_experts, top_k
        self.codecs = dict(codec) if isinstance(codec, dict) else {layer: codec for layer in self.moe_layers}
        self.codec = self.codecs[self.moe_layers[0]]
        groups = n_slots if isinstance(n_slots, list) else [(self.moe_layers, int(n_slots))]
        self.blob_bytes = max(self.codecs[layer].nbytes for layer in groups[0][0])  # the first class's (the main experts')
        self.host, self.device = host, device
        self.plan: Any = None  # the placement plan that sized this cache (planner.Plan; set by build_offloaded_experts)
        self.n_keys = len(self.moe_layers) * n_experts
        self.stats = stats or RouterStats(self.moe_layers, n_experts, top_k)
        self.stats_path = Path(stats_path) if stats_path else None
        pol = make_policy(policy, self.n_keys, half_life=half_life)
        if isinstance(pol, StatGuided) and self.stats.tokens:
            pol.set_prior(self.stats.rates(), self.stats.tokens)
        classes = [SlotClass(count, max(self.codecs[layer].nbytes for layer in layers)) for layers, count in groups]
        key_class = np.zeros(self.n_keys, dtype=np.int64)
        for ci, (layers, _) in enumerate(groups):
            for layer in layers:
                key_class[self.index[layer] * n_experts : (self.index[layer] + 1) * n_experts] = ci
        self.cache = ExpertCache(device, 0, 0, self.n_keys, pol, classes, key_class)
        n_slots = self.cache.n_slots
        self.cost = CostModel(device.bw, self.blob_bytes, flops_per_token)
        self.predictor = predictor
        self.prefetch = prefetch and predictor is not None and n_slots > 0
        self.miss = miss
        self.recorder = recorder
        self.counters = OffloadCounters()
        self._last = OffloadCounters()
        self._fresh = np.zeros(self.n_keys, dtype=bool)
        self.experts_mapped = 0  # host experts left in their memory-mapped files (set by build_offloaded_experts)
        self.mtp_layer: int | None = None  # the MTP block's MoE layer, when it is one of these (set by build_offloaded_experts)
        self._tok = 0.0
        self._step_tokens = 0
        self._saved_tokens = self.stats.tokens
        self._prepared_slot: dict[int, tuple[int, Any]] = {}
        self._prepared_host: dict[tuple[int, int], Any] = {}
        self._deferred: dict[int, float] = {}  # this call's experts whose copy waits for a slot (expert -> clock)
        if preload and self.stats.tokens and n_slots > 0:
            for key in self.stats.hottest(self.n_keys):
                if self.cache.has_free(key):  # each size class filled with its own hottest
                    li, e = divmod(key, n_experts)
                    self.cache.insert(key, self.host[self.moe_layers[li]][e], 0.0)
            device.synchronize()

    # ---- ExpertBackend ---------------------------------------------------------------------
    def _clock(self, li: int) -> float:
        return self._tok + li / max(1, len(self.moe_layers))

    def hint(self, layer: int, x: torch.Tensor) -> None:
        """x: the residual stream entering MoE layer `layer`. Predict it and the layers after it;
        prefetch the predictions, nearest layer first, into free slots or over cold victims."""
        if self.predictor is None or layer not in self.index:
            return
        preds = self.predictor.predict(layer, x)
        self.predictor.expect(preds, layer)
        if self.recorder is not None:
            for target, experts in preds.items():
                self.recorder.predicted(target, experts)
        if not self.prefetch:
            return
        self._prefetch(preds, self._clock(self.index[layer]))

    def guess(self, streams: torch.Tensor) -> None:
        """Speculation's guesses before a verification: `streams` [n, H] stand in for the drafted tokens'
        residual streams (the MTP block's outputs); every layer's router is applied to them
        (NextLayerPredictor.guess) and the guesses of the layers where they have been right at least
        GUESS_MIN_PRECISION of the time are prefetched, nearest layer first, so their copies overlap the
        verification's first layers instead of waiting for the one-layer-ahead hint."""
        if self.predictor is None:
            return
        preds = self.predictor.guess(streams)
        self.predictor.expect_guess(preds)
        if self.prefetch:
            good = {layer: e for layer, e in preds.items() if self.predictor.guess_precision(layer) >= GUESS_MIN_PRECISION}
            self._prefetch(good, self._clock(0))

    def _prefetch(self, preds: dict[int, np.ndarray], t: float) -> None:
        """Copy predicted experts into free slots or over cold victims, nearest layer first; the
        predictions of every target are protected from each other's evictions."""
        protect = np.zeros(self.n_keys, dtype=bool)
        wanted = []
        for target in sorted(preds):
            experts = preds[target]
            keys = experts.astype(np.int64) + self.index[target] * self.n_experts
            protect[keys] = True
            limit = max(self.top_k, min(len(keys), self.cache.n_slots // 4))
            wanted.append((target, list(zip(keys.tolist(), experts.tolist()))[:limit]))
        for target, pairs in wanted:
            for key, e in pairs:
                if self.cache.cached[key]:
                    continue
                if self.cache.insert(key, self.host[target][e], t, protect, min_idle=PREFETCH_MIN_IDLE) is None:
                    return
                self._fresh[key] = True
                self.counters.prefetched += 1
                self.counters.bytes_moved += self.codecs[target].nbytes

    def attended(self, layer: int, x: torch.Tensor) -> None:
        if self.predictor is not None:
            self.predictor.attended(layer, x)

    def _resolve(self, layer: int, li: int, e: int, tokens: int, t: float) -> int | None:
        """Where expert e runs: its device slot (hit, or a miss copied in now) or None (the CPU)."""
        key = li * self.n_experts + e
        c = self.counters
        slot = self.cache.lookup(key)
        c.layer_uses[layer] = c.layer_uses.get(layer, 0) + 1
        if slot is not None:
            c.hits += 1
            c.layer_hits[layer] = c.layer_hits.get(layer, 0) + 1
            if self._fresh[key]:
                c.prefetch_used += 1
                self._fresh[key] = False
            return slot
        c.misses += 1
        go = self.miss
        if go == "cost":
            if self.cache.has_free(key):  # a free slot: the copy evicts nothing and will serve later uses
                go = "copy"
            else:
                # Tokens a newly cached expert survives, roughly: slots / experts entering per token.
                residency = self.cache.n_slots / max(1, self.top_k * len(self.moe_layers))
                reuse = float(self.stats.counts.flat[key]) / self.stats.tokens * residency if self.stats.tokens else 0.0
                go = self.cost.decide(tokens, reuse)
        if go == "copy" and self.cache.n_slots > 0:
            slot = self._copy_in(layer, key, e, t)  # async: overlaps earlier experts' compute
            if slot is None:  # every slot of its class holds one of this call's experts: next wave
                self._deferred[e] = t
        return slot

    def _copy_in(self, layer: int, key: int, e: int, t: float) -> int | None:
        slot = self.cache.insert(key, self.host[layer][e], t)
        if slot is not None:
            self.counters.copied += 1
            self.counters.bytes_moved += self.codecs[layer].nbytes
        return slot

    def _host_expert(self, layer: int, e: int) -> Any:
        """Host expert e's prepared kernels, for computing it on the CPU (the most recent few kept)."""
        pe = self._prepared_host.pop((layer, e), None)
        if pe is None:
            pe = self.codecs[layer].prepare(self.host[layer][e])
        self._prepared_host[(layer, e)] = pe
        if len(self._prepared_host) > HOST_PREPARED_MAX:
            self._prepared_host.pop(next(iter(self._prepared_host)))
        return pe

    def _cpu_batch(self, layer: int, rows: dict[int, torch.Tensor], device: torch.device) -> dict[int, torch.Tensor]:
        """The call's experts that run on the CPU (rows: expert -> its tokens' rows, on the CPU), all in one
        native MoE call with one row per (token, expert) and weight 1: each expert's rows exactly as its
        PreparedExpert returns them, without a Python round per expert (0.26 ms each on the H200 run's
        host), moved to `device` in one copy. Experts with more rows than the MoE kernel takes (a prompt's
        busiest) are left out, as is everything where the native kernels are missing: the per-expert path
        runs those."""
        if not hasattr(self.codecs[layer], "prepare"):
            return {}
        order = sorted(e for e in rows if NativeExpert.in_moe_kernel(len(rows[e]), rows[e].dtype))  # the rest: a GEMM each
        if len(order) < 2:
            return {}
        pes = [self._host_expert(layer, e) for e in order]
        if any(getattr(pe, "native", None) is None for pe in pes):
            return {}
        desc = type(pes[0].native.gu)
        gu, dn = (desc * len(pes))(*(pe.native.gu for pe in pes)), (desc * len(pes))(*(pe.native.dn for pe in pes))
        sizes = [len(rows[e]) for e in order]
        ids = torch.repeat_interleave(torch.arange(len(order)), torch.tensor(sizes))[:, None]
        y = pes[0].native.lib.moe(gu, dn, pes[0].native.down.shape[1], torch.cat([rows[e].float() for e in order]), ids, torch.ones(len(ids), 1))
        return dict(zip(order, y.to(device).split(sizes)))

    def _compute(self, layer: int, e: int, slot: int | None, xs: torch.Tensor, ready: torch.Tensor | None = None) -> torch.Tensor:
        """Expert e on xs: from its device slot, else on the CPU (`ready`: its rows already computed there
        by _cpu_batch)."""
        key = self.index[layer] * self.n_experts + e
        if slot is None and e in self._deferred:  # the call's experts computed so far are unpinned now
            slot = self._copy_in(layer, key, e, self._deferred.pop(e))
        if slot is None and ready is not None:
            self.counters.cpu_computed += 1
            self.device.compute(self.cost.cpu_s(len(xs)))
            self.cache.unpin([key])
            return ready.to(xs.device)
        if slot is not None:
            self.cache.wait(slot)
            self.device.compute(self.cost.gpu_s(len(xs)))
            blob = self.cache.slot_tensor(slot)[: self.codecs[layer].nbytes]
        else:
            self.counters.cpu_computed += 1
            self.device.compute(self.cost.cpu_s(len(xs)))
            blob = self.host[layer][e]
        codec = self.codecs[layer]
        fn = codec.forward
        if hasattr(codec, "prepare"):  # quantized: kernels built once per resident copy, not per call
            if slot is not None:
                v = int(self.cache.version[slot])
                got = self._prepared_slot.get(slot)
                if got is None or got[0] != v:
                    got = self._prepared_slot[slot] = (v, codec.prepare(blob))
                pe = got[1]
            else:  # host experts computed on the CPU: keep the most recent few prepared
                pe = self._host_expert(layer, e)
            fn = lambda _blob, x: pe(x)  # noqa: E731
        if blob.device != xs.device:
            y = fn(blob, xs.to(blob.device)).to(xs.device)
        else:
            y = fn(blob, xs)
        if slot is not None:
            self.cache.used(slot)
        self.cache.unpin([key])  # queued: a later copy into its slot waits for this compute (cache.used)
        return y

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        li = self.index[layer]
        n, k = expert_ids.shape
        if li == 0:
            self._tok += self._step_tokens
            self._step_tokens = n
            self.counters.tokens += n
        t = self._clock(li)
        self.stats.update(layer, expert_ids)
        if self.predictor is not None:
            self.predictor.observe(layer, expert_ids)
        if self.recorder is not None:
            self.recorder.record(layer, expert_ids)
        stall0 = self.device.stall_s
        order = None
        if n == 1:
            used, counts = expert_ids[0].tolist(), [1] * k
        else:
            used, counts, order = group_by_expert(expert_ids)
        keys = np.asarray(used, dtype=np.int64) + li * self.n_experts
        self._deferred.clear()
        self.cache.pin(keys)  # in use by this call: never a victim until it is done
        # Pass 1 issues every copy (one per expert, on the transfer stream); pass 2 computes in the
        # same order and arithmetic as InMemoryExperts, waiting on each expert's copy only when needed.
        slot_of = {e: self._resolve(layer, li, e, cnt, t) for e, cnt in zip(used, counts)}
        ready = self._cpu_batch(layer, self._cpu_rows(x, k, used, counts, order, slot_of), x.device)
        out = combine_experts(
            x, expert_ids, expert_weights, lambda e, xs: self._compute(layer, e, slot_of[e], xs, ready.get(e)), used, counts, order
        )
        self.cache.policy.access(np.unique(keys), t)
        self.cache.touch(keys, t)
        self.cache.unpin_all()
        self.counters.stall_s += self.device.stall_s - stall0
        return out

    def _cpu_rows(self, x: torch.Tensor, k: int, used: list[int], counts: list[int], order: torch.Tensor | None, slot_of: dict[int, int | None]) -> dict[int, torch.Tensor]:
        """The rows of x (on the CPU) of each expert this call computes on the CPU: no slot, and no copy
        waiting for one. The rows as combine_experts hands them to each expert."""
        cpu = [e for e in used if slot_of[e] is None and e not in self._deferred]
        if len(cpu) < 2:
            return {}
        xc = x.reshape(-1, x.shape[-1]).to("cpu")
        if order is None:  # one token
            return dict.fromkeys(cpu, xc)
        rows, start = {}, 0
        for e, cnt in zip(used, counts):
            if e in cpu:
                rows[e] = xc[order[start : start + cnt].cpu() // k]
            start += cnt
        return rows

    # ---- stats -----------------------------------------------------------------------------
    def save_stats(self, path: str | Path | None = None) -> Path | None:
        path = Path(path) if path else self.stats_path
        if path is None:
            return None
        self._saved_tokens = self.stats.tokens
        try:
            return self.stats.save(path)
        except OSError:
            return None  # a read-only place: statistics are a cache, never a reason to fail

    def stats_snapshot(self) -> dict[str, Any]:
        """Cumulative counters, the change since the previous snapshot (`last`), and cache state."""
        c = self.counters
        delta = c.minus(self._last)
        self._last = c.copy()
        if self.stats_path is not None and self.stats.tokens > self._saved_tokens:
            self.save_stats()
        if self.recorder is not None:
            self.recorder.flush()
        pc = self.predictor.counts if self.predictor is not None else None
        guessed = PredictionCounts()
        for g in (self.predictor.counts_guess.values() if self.predictor is not None else ()):
            guessed.tp, guessed.fp, guessed.fn = guessed.tp + g.tp, guessed.fp + g.fp, guessed.fn + g.fn
        budget = self.device.budget
        d = c.summary()
        d.update(
            offload=self.device.kind,
            policy=self.cache.policy.name,
            cache_slots=self.cache.n_slots,
            experts_total=self.n_keys,
            resident=len(self.cache.slot_of),
            experts_mapped=self.experts_mapped,
            mtp_layer=self.mtp_layer,
            slot_sizes=[[c.n_slots, c.blob_bytes] for c in self.cache.classes],  # [slots, bytes each] per size class
            evictions=self.cache.evictions,
            prefetch_precision=round(pc.precision, 4) if pc else None,
            prefetch_recall=round(pc.recall, 4) if pc else None,
            guess_precision=round(guessed.precision, 4) if guessed.tp + guessed.fp else None,
            guess_recall=round(guessed.recall, 4) if guessed.tp + guessed.fn else None,
            device_bytes_used=budget.used,
            device_bytes_budget=budget.capacity,
            device_bytes_peak=budget.peak,
            sim_time_s=round(self.device.elapsed_s(), 6),
            layer_hit_rate={layer: round(c.layer_hits.get(layer, 0) / u, 4) for layer, u in c.layer_uses.items() if u},
            layer_heat={layer: self._heat(layer) for layer in self.moe_layers},
            last=delta.summary(),
        )
        return d

    def _heat(self, layer: int) -> list[float]:
        row = self.stats.counts[self.index[layer]]
        s = row.sum()
        return (row / s).round(4).tolist() if s else [0.0] * self.n_experts


# ---- construction ------------------------------------------------------------------------------
def pack_in_memory(experts: InMemoryExperts, device: Any, release: bool = True) -> tuple[Bf16Codec, dict[int, torch.Tensor]]:
    """Turn stacked [E, 2I, H] / [E, H, I] tensors into per-expert blobs in host buffers."""
    host: dict[int, torch.Tensor] = {}
    codec = None
    for layer in list(experts.gate_up):
        gu, dn = experts.gate_up[layer], experts.down[layer]
        n, two_i, h = gu.shape
        codec = codec or Bf16Codec(h, two_i // 2, gu.dtype)
        buf = device.host_buffer(n * codec.nbytes).view(n, codec.nbytes)
        for e in range(n):
            codec.pack(gu[e].cpu(), dn[e].cpu(), buf[e])
        host[layer] = buf
        if release:
            del experts.gate_up[layer], experts.down[layer]
    assert codec is not None, "no MoE layers"
    return codec, host


def quantize_in_memory(experts: InMemoryExperts, device: Any, bits: int, release: bool = True) -> tuple[Any, dict[int, torch.Tensor]]:
    """Quantize stacked experts into quant/ blobs (gate_up and down at `bits`) in host buffers."""
    from quant.blob import ExpertBlobLayout, quantize_expert
    from quant.formats import QuantSpec

    from .expert_cache import QuantCodec

    host: dict[int, torch.Tensor] = {}
    codec = None
    for layer in list(experts.gate_up):
        gu, dn = experts.gate_up[layer], experts.down[layer]
        n, two_i, h = gu.shape
        if codec is None:
            spec = QuantSpec.for_bits(bits)
            codec = QuantCodec(ExpertBlobLayout(h, two_i // 2, spec, spec), gu.dtype)
        buf = device.host_buffer(n * codec.nbytes).view(n, codec.nbytes)
        inter = two_i // 2
        for e in range(n):
            g = gu[e].cpu()
            buf[e].copy_(quantize_expert(codec.layout, g[:inter], g[inter:], dn[e].cpu()))
        host[layer] = buf
        if release:
            del experts.gate_up[layer], experts.down[layer]
    assert codec is not None, "no MoE layers"
    return codec, host


def host_from_mapped(
    blobs: dict[int, list[torch.Tensor]], stats: RouterStats, n_in_ram: int, device: Any, budget: int | None = None
) -> dict[int, list[torch.Tensor]]:
    """Per layer, a list of E expert blobs: the `n_in_ram` hottest (by the saved statistics; without
    them spread evenly over the layers), or with `budget` the hottest that fit in that many bytes
    (layers' blobs may differ in size: an MTP block's), copied into the device's (pinned) host buffers,
    the others left as views of the mapped files, which the OS pages in when they are used."""
    layers = sorted(blobs)
    n_experts = len(blobs[layers[0]])
    counts = stats.counts.reshape(-1)  # zeros without a profile: then expert order spreads them over layers
    size = [blobs[layer][0].numel() for layer in layers]
    # hottest first; at equal heat the smaller blobs (more experts fit), then spread over the layers
    keys = sorted(range(len(layers) * n_experts), key=lambda k: (-counts[k], size[k // n_experts], k % n_experts, k // n_experts))
    if budget is None:
        keys = keys[:n_in_ram]
    else:
        taken, room = [], budget
        for key in keys:
            if size[key // n_experts] <= room:
                taken.append(key)
                room -= size[key // n_experts]
        keys = taken
    chosen: dict[int, list[int]] = {}
    for key in keys:
        li, e = divmod(key, n_experts)
        chosen.setdefault(li, []).append(e)
    host: dict[int, list[torch.Tensor]] = {}
    for li, layer in enumerate(layers):
        views = blobs[layer]
        mine = chosen.get(li, [])
        row: list[torch.Tensor] = list(views)
        if mine:
            nbytes = views[0].numel()
            buf = device.host_buffer(len(mine) * nbytes).view(len(mine), nbytes)
            for j, e in enumerate(mine):
                buf[j].copy_(views[e])
                row[e] = buf[j]
        host[layer] = row
    return host


def device_for_plan(kind: str, plan: Any, bw: Bandwidths) -> SimulatedDevice | CudaDevice:
    """The offload device ("sim" or "cuda") with the plan's GPU budget, the always-used weights, KV
    cache and workspace already charged to it (what is left is the expert cache's)."""
    device = SimulatedDevice(plan.gpu_budget, bw) if kind == "sim" else CudaDevice(plan.gpu_budget, bandwidths=bw)
    device.reserve(sum(i.bytes for i in plan.items if i.where == "GPU" and not i.what.startswith("expert cache")), "dense weights, KV cache, workspace")
    return device


def prepared_expert_bytes(codec: Any, device: Any) -> int:
    """Device bytes the kernels prepared for one resident quantized expert keep beside its blob (CUDA
    converts the blob once into tinygemm's tiles, or a dense weight for q8). The simulated device is
    charged what an sm80+ GPU would hold (its experts run from the blob): its cache has the slots the
    planner and a CUDA device give the same budget."""
    lay = getattr(codec, "layout", None)
    if lay is None:  # unquantized (bf16) experts run from the blob itself
        return 0
    if device.kind == "cuda":
        from quant.cuda_kernels import prepared_nbytes

        return sum(prepared_nbytes(spec, shape, codec.dtype, device.torch_device) for _, _, shape, spec in lay.parts.values())
    from quant.spec import cuda_prepared_nbytes

    size = torch.tensor([], dtype=codec.dtype).element_size()
    return sum(cuda_prepared_nbytes(spec, shape, size) for _, _, shape, spec in lay.parts.values())


def size_expert_cache(device: Any, n_keys: int, blob_bytes: int, prepared_bytes: int, slots: int | None = None) -> int:
    """The expert cache's slot count: `slots` if given, else as many as the device's free budget holds
    at blob + prepared kernel bytes each (at most one per expert); the prepared copies are reserved."""
    per_slot = blob_bytes + prepared_bytes
    if slots is None:
        slots = max(0, min(n_keys, (device.budget.capacity - device.budget.used) // per_slot))
    if prepared_bytes:
        device.reserve(slots * prepared_bytes, "prepared kernel copies")
    return slots


@dataclass
class MtpExperts:
    """An MTP block's routed experts, offloaded as one more MoE layer of the backend (router statistics,
    prefetch from its own input, cache slots, counters): the loader's, from models/mtp.py's block."""

    layer: int  # where the block sits (num_hidden_layers)
    experts: Any  # InMemoryExperts or QuantizedExperts (blobs kept) holding `layer` alone, in host RAM
    routing: Any  # the block's one-layer model (MoeRouting): its MoE layer 0 is `layer`
    bits: float = 16  # its always-used weights' bits as loaded (16: the compute dtype)
    own_embed: bool = False  # it reads its own embedding / head rather than the main model's
    own_head: bool = False


def _expert_bits(experts: Any, layers: list[int], cfg: Any, dtype: torch.dtype) -> float:
    """Stored bits per weight of these layers' routed experts (the widest layer's blobs, or the dtype's)."""
    from localglm.layers.experts import QuantizedExperts

    if isinstance(experts, QuantizedExperts):
        return max(experts.layouts[layer].nbytes for layer in layers) * 8 / (3 * cfg.hidden_size * cfg.moe_intermediate_size)
    return float(torch.tensor([], dtype=dtype).element_size() * 8)


def _merge_mtp(experts: Any, mtp: MtpExperts) -> Any:
    """The MTP block's experts merged into the main ones where they are held alike (both float, or both
    quantized and both mapped or both copied): then one packing serves both. Else the block's experts,
    to pack on their own (None when merged)."""
    from localglm.layers.experts import QuantizedExperts

    other, layer = mtp.experts, mtp.layer
    if isinstance(experts, QuantizedExperts) and isinstance(other, QuantizedExperts) and experts.mapped == other.mapped:
        experts.blobs[layer], experts.layouts[layer] = other.blobs.pop(layer), other.layouts[layer]
        return None
    if isinstance(experts, InMemoryExperts) and isinstance(other, InMemoryExperts):
        experts.gate_up[layer], experts.down[layer] = other.gate_up.pop(layer), other.down.pop(layer)
        return None
    return other


def _pack(experts: Any, device: Any) -> tuple[dict[int, Any], dict[int, Any]]:
    """Per layer, the codec and the host blobs of the experts, in the device's (pinned) buffers: copied
    ones as they are, mapped ones (a list of per-expert views of their shard: an MTP block's quantized
    experts beside float main ones) read in whole."""
    from localglm.layers.experts import QuantizedExperts

    from .expert_cache import QuantCodec

    if not isinstance(experts, QuantizedExperts):
        codec, host = pack_in_memory(experts, device)
        return {layer: codec for layer in host}, host
    codecs, host = {}, {}
    for layer, buf in list(experts.blobs.items()):  # into (pinned) host buffers; the device copies come from there
        codecs[layer] = QuantCodec(experts.layouts[layer], experts.dtype)
        if isinstance(buf, list):  # mapped: one view per expert
            nbytes = experts.layouts[layer].nbytes
            host[layer] = device.host_buffer(len(buf) * nbytes).view(len(buf), nbytes)
            for e, row in enumerate(buf):
                host[layer][e].copy_(row)
        else:  # copied: one tensor, one copy
            host[layer] = device.host_buffer(buf.numel()).view(buf.shape)
            host[layer].copy_(buf)
    experts.blobs.clear()
    return codecs, host


def _slot_groups(
    device: Any, codecs: dict[int, Any], main: list[int], mtp_layer: int | None, n_experts: int, top_k: int, slots: int | None
) -> int | list[tuple[list[int], int]]:
    """The expert cache's slots: one count where every layer's blobs fit one size (`size_expert_cache`),
    else the main layers' and the MTP block's each in their own size (planner.split_slots: the same share
    of each, the block at least top_k), given `slots` split the same way. Prepared kernel copies reserved."""
    from .planner import split_slots

    main_bytes = max(codecs[layer].nbytes for layer in main)
    n_keys = (len(main) + (mtp_layer is not None)) * n_experts
    prep = {layer: prepared_expert_bytes(c, device) if hasattr(c, "prepare") else 0 for layer, c in codecs.items()}
    main_prep = max(prep[layer] for layer in main)
    if mtp_layer is None or codecs[mtp_layer].nbytes == main_bytes:
        return size_expert_cache(device, n_keys, main_bytes, max(prep.values()), slots)
    mtp_bytes, mtp_prep = codecs[mtp_layer].nbytes, prep[mtp_layer]
    if slots is None:
        free = device.budget.capacity - device.budget.used
        n_main, n_mtp = split_slots(free, len(main) * n_experts, main_bytes + main_prep, n_experts, mtp_bytes + mtp_prep, top_k)
    else:
        n_mtp = min(n_experts, max(min(top_k, slots), round(slots * n_experts / n_keys)))
        n_main = max(0, slots - n_mtp)
    if main_prep or mtp_prep:
        device.reserve(n_main * main_prep + n_mtp * mtp_prep, "prepared kernel copies")
    return [(main, n_main), ([mtp_layer], n_mtp)]


def build_offloaded_experts(
    cfg: Any, experts: Any, routing: Any, model_device: torch.device, dtype: torch.dtype, root: str | Path, ctx: int, opts: OffloadOptions,
    dense_bits: dict[str, int] | None = None, mtp: MtpExperts | None = None,
) -> OffloadedExperts:
    """The offloading ExpertBackend for a model being built: experts (InMemoryExperts, or
    QuantizedExperts with their blobs kept) move into (pinned) host buffers, or stay mapped where
    the plan leaves them on disk; the device expert cache gets the plan's slots; `routing` (the
    model's MoE routers: models.moe_decoder.MoeRouting) drives the prefetch predictions.
    `dense_bits`: the precision the always-used weights were loaded at (recipe class -> bits; 16 =
    in the compute dtype), which the plan reserves on the device. `mtp`: an MTP block's experts, which
    become one more MoE layer here (the plan reserves the block's always-used weights too); the block
    then runs its experts through this backend (models/mtp.py's LayerOffset)."""
    from localglm.layers.experts import QuantizedExperts

    from .planner import DENSE_CLASSES, MtpPlacement, make_plan

    kind = opts.kind
    if kind == "cuda" and model_device.type != "cuda":
        raise LocalGLMError("offload='cuda' keeps the dense weights on the GPU: load with device='cuda'")
    quantized = isinstance(experts, QuantizedExperts)
    if quantized and not experts.blobs:
        raise LocalGLMError("offload of quantized experts needs their blobs kept (load with keep_blobs)")
    if not quantized and not isinstance(experts, InMemoryExperts):
        raise LocalGLMError("offload needs the model's experts loaded in memory first")
    bw = opts.bandwidths or Bandwidths()
    gpu_mem = opts.gpu_mem
    if kind == "sim" and gpu_mem is None:
        raise LocalGLMError("offload='sim' needs gpu_mem (the simulated device's budget, e.g. gpu_mem='2MiB')")
    if kind == "cuda" and gpu_mem is None:
        from .planner import default_gpu_mem

        gpu_mem = default_gpu_mem() + torch.cuda.memory_allocated(model_device)  # dense weights are loaded already
    bits = torch.tensor([], dtype=dtype).element_size() * 8
    main_layers = list(cfg.moe_layers)
    expert_bits = _expert_bits(experts, main_layers, cfg, dtype)  # size the plan with the real blobs
    placement = None
    if mtp is not None:
        mtp_bits = _expert_bits(mtp.experts, [mtp.layer], cfg, dtype)
        placement = MtpPlacement(bits=mtp.bits, expert_bits=mtp_bits, own_embed=mtp.own_embed, own_head=mtp.own_head)
    fixed = dict(dense_bits or {}) | {c: 16 for c in DENSE_CLASSES if c not in (dense_bits or {})}
    plan = make_plan(cfg, gpu_mem, opts.cpu_mem, ctx, experts=expert_bits, bandwidths=bw, fixed=fixed, float_bits=bits, kv=opts.kv, mtp=placement)
    device = device_for_plan(kind, plan, bw)
    moe_layers = main_layers + ([mtp.layer] if mtp is not None else [])
    stats_path = opts.stats_path or profile_path(root)
    stats = RouterStats.load_or_new(stats_path, moe_layers, cfg.n_routed_experts, cfg.num_experts_per_tok)
    mapped = quantized and experts.mapped
    if plan.experts_on_disk and not mapped:
        raise LocalGLMError(
            f"--cpu-mem {human_bytes(plan.cpu_budget)} holds {plan.experts_in_ram} of {plan.n_experts_total} routed experts; "
            f"leaving the rest memory-mapped on disk needs a localglm quantized directory (`localglm quantize {root} OUT`), "
            f"or give more --cpu-mem"
        )
    apart = _merge_mtp(experts, mtp) if mtp is not None else None
    n_mapped = 0  # experts left in their mapped files
    if mapped:  # the plan's share of experts (hottest first) into host RAM, the rest stay mapped
        from .expert_cache import QuantCodec

        codec: dict[int, Any] = {layer: QuantCodec(experts.layouts[layer], experts.dtype) for layer in experts.blobs}
        host: dict[int, Any] = host_from_mapped(experts.blobs, stats, plan.experts_in_ram, device, plan.expert_ram_bytes)
        n_mapped = sum(v is view for layer, row in host.items() for v, view in zip(row, experts.blobs[layer]))
        experts.blobs.clear()
    else:
        codec, host = _pack(experts, device)
    if apart is not None:  # the block's experts held otherwise than the main ones (float beside quantized)
        more_codec, more_host = _pack(apart, device)
        codec, host = codec | more_codec, host | more_host
    slots = _slot_groups(device, codec, main_layers, mtp.layer if mtp is not None else None, cfg.n_routed_experts, cfg.num_experts_per_tok, opts.cache_slots)
    recorder = None
    if opts.trace:
        recorder = TraceRecorder(cfg.n_routed_experts, cfg.num_experts_per_tok, moe_layers, max(c.nbytes for c in codec.values()), str(root), opts.trace)
    solo = {mtp.layer: mtp.routing.moe_routers()[0]} if mtp is not None else None
    backend = OffloadedExperts(
        moe_layers, cfg.n_routed_experts, cfg.num_experts_per_tok, codec, host, device, slots,
        policy=opts.cache_policy, stats=stats, stats_path=stats_path,
        predictor=predictor_for(routing, stats, extra=opts.prefetch_extra, solo=solo), prefetch=opts.prefetch,
        miss=opts.miss, flops_per_token=2 * 3 * cfg.hidden_size * cfg.moe_intermediate_size,
        recorder=recorder,
    )  # fmt: skip
    backend.experts_mapped = n_mapped
    backend.mtp_layer = mtp.layer if mtp is not None else None
    backend.plan = plan  # the loader reads where the plan put the KV cache
    return backend
