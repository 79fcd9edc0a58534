"""What `localglm.load` can be asked for, as typed option dataclasses.

The Python API takes keywords (`experts_bits=4`, `offload="sim"`, `gpu_mem="24GiB"`, ...) and the
CLI flags map onto the same keywords (localglm/commands/flags.py); `LoadOptions.from_kwargs`
turns them into these dataclasses once, at the boundary, with one-line errors for unknown names and
bad values. From there on the loader, the quantizer and the offload backend read typed fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quant.formats import QuantError
from quant.recipe import CLASSES, Recipe

from .errors import LocalGLMError

CACHE_POLICIES = ("lru", "lfu", "stat")
MAX_DRAFT = 16  # drafted tokens a step (--draft's ceiling)
MISS_MODES = ("cost", "copy", "cpu")
OFFLOAD_KINDS = ("sim", "cuda")


@dataclass(frozen=True)
class QuantOptions:
    """Quantize while loading: `recipe` (None: load as stored), optionally saved to `save_to` once.
    `given`: the classes whose bits the user chose (a plan may choose the others' when offloading)."""

    recipe: Recipe | None = None
    save_to: Path | None = None
    given: frozenset[str] = frozenset()

    @classmethod
    def from_kwargs(cls, kw: dict[str, Any]) -> QuantOptions:
        """Pops `recipe`, `<class>_bits`, `quant_layers` and `save_quantized` from kw."""
        recipe = kw.pop("recipe", None)
        bits = {c: kw.pop(f"{c}_bits") for c in CLASSES if f"{c}_bits" in kw}
        layers = kw.pop("quant_layers", None) or []
        save = kw.pop("save_quantized", None)
        given = frozenset(CLASSES) if recipe is not None else frozenset(c for c, v in bits.items() if v is not None)
        if recipe is not None and not isinstance(recipe, Recipe):
            recipe = Recipe.from_json(recipe)
        elif recipe is None and ({k: v for k, v in bits.items() if v is not None} or layers):
            try:
                recipe = Recipe.from_options(bits, [layers] if isinstance(layers, str) else list(layers))
            except QuantError as exc:
                raise LocalGLMError(str(exc)) from None
        if save and recipe is None:
            recipe = Recipe()
        return cls(recipe, Path(save).expanduser() if save else None, given)


@dataclass(frozen=True)
class OffloadOptions:
    """Routed experts in host RAM behind a device expert cache (`kind` "cuda" or "sim"), and/or a
    routing trace. The budgets are bytes (or None: the planner's defaults)."""

    kind: str | None = None
    gpu_mem: int | None = None
    cpu_mem: int | None = None
    cache_policy: str = "stat"
    cache_slots: int | None = None  # override the planner
    prefetch: bool = True
    prefetch_extra: int = 0  # predict top-(k + extra) per token: more recall, less precision
    stats_path: Path | None = None  # router statistics profile (default: beside the model)
    miss: str = "cost"  # where a missed expert runs: cost model, always copy, always the CPU
    bandwidths: Any = None  # offload.cost_model.Bandwidths (None: assumed)
    trace: Path | None = None  # record every MoE call's routing here (.jsonl)
    kv: str = "auto"  # the KV cache's place with a device: "gpu", "ram" (DSA's latent rows), "auto" (the plan's)

    @property
    def offloaded(self) -> bool:
        return self.kind is not None

    @classmethod
    def from_kwargs(cls, kw: dict[str, Any]) -> OffloadOptions:
        """Pops the offloading keywords from kw: offload, gpu_mem, cpu_mem, cache_policy, cache_slots,
        prefetch, prefetch_extra, stats_path, miss, bandwidths, trace, kv."""
        from .model_info import KV_PLACES, parse_size

        kind = kw.pop("offload", None)
        if kind not in (None, *OFFLOAD_KINDS):
            raise LocalGLMError(f"offload={kind!r}: use 'sim' (simulated device) or 'cuda'")
        policy = kw.pop("cache_policy", None) or "stat"
        if policy not in CACHE_POLICIES:
            raise LocalGLMError(f"cache_policy={policy!r}: use one of {', '.join(CACHE_POLICIES)}")
        miss = kw.pop("miss", None) or "cost"
        if miss not in MISS_MODES:
            raise LocalGLMError(f"offload miss mode {miss!r}: use one of {', '.join(MISS_MODES)}")
        slots = kw.pop("cache_slots", None)
        stats, trace = kw.pop("stats_path", None), kw.pop("trace", None)
        kv = kw.pop("kv", None) or "auto"
        if kv not in KV_PLACES:
            raise LocalGLMError(f"kv={kv!r}: use one of {', '.join(KV_PLACES)}")
        return cls(
            kind=kind,
            gpu_mem=parse_size(kw.pop("gpu_mem", None), "gpu_mem"),
            cpu_mem=parse_size(kw.pop("cpu_mem", None), "cpu_mem"),
            cache_policy=policy,
            cache_slots=None if slots is None else int(slots),
            prefetch=bool(kw.pop("prefetch", True)),
            prefetch_extra=int(kw.pop("prefetch_extra", 0) or 0),
            stats_path=Path(stats) if stats else None,
            miss=miss,
            bandwidths=kw.pop("bandwidths", None),
            trace=Path(trace) if trace else None,
            kv=kv,
        )


@dataclass(frozen=True)
class LoadOptions:
    """Everything beyond device, dtype and context: quantization, offloading, `mmap` (a quantized
    directory's experts: True stay in their mapped files, False copied into RAM, None automatic) and
    `verify` (check a quantized directory's shards against the manifest's CRC-32s first) and `mtp`
    (load the MTP draft block for speculative decoding: True, False, None = where the checkpoint
    has one and the device budget is not a planned GPU's) and `draft` (the most tokens it drafts a
    step; the depth policy chooses 0..draft each step; 0 turns speculation off) and `draft_vocab`
    (the drafter scores only the N most frequent tokens of the checkpoint's draft_vocab.json:
    draft_vocab.py; None: its default where the file exists, else the whole head; 0: the whole head) and
    `draft_fixed` (every step drafts `draft` tokens, not the depth policy's 0..draft: a depth measured as
    it is, and a seeded generation that speculates, depths and all reproducible)."""

    quant: QuantOptions = field(default_factory=QuantOptions)
    offload: OffloadOptions = field(default_factory=OffloadOptions)
    mmap: bool | None = None
    verify: bool = True
    mtp: bool | None = None
    draft: int = 3  # speculative.DEFAULT_DRAFT
    draft_vocab: int | None = None
    draft_fixed: bool = False

    @classmethod
    def from_kwargs(cls, **kw: Any) -> LoadOptions:
        """The keyword options of `localglm.load`; unknown names and bad values are one-line errors."""
        quant = QuantOptions.from_kwargs(kw)
        offload = OffloadOptions.from_kwargs(kw)
        mmap = kw.pop("mmap", None)
        if mmap not in (None, True, False):
            raise LocalGLMError(f"mmap={mmap!r}: use True, False or None (auto)")
        verify = kw.pop("verify", True)
        if verify not in (True, False):
            raise LocalGLMError(f"verify={verify!r}: use True or False")
        mtp = kw.pop("mtp", None)
        if mtp not in (None, True, False):
            raise LocalGLMError(f"mtp={mtp!r}: use True, False or None (auto)")
        draft = kw.pop("draft", None)
        if draft is None:
            draft = cls.draft
        if isinstance(draft, bool) or not isinstance(draft, int) or not 0 <= draft <= MAX_DRAFT:
            raise LocalGLMError(f"draft={draft!r}: the most drafted tokens a step, 0 (no speculation) to {MAX_DRAFT}")
        draft_vocab = kw.pop("draft_vocab", None)
        if draft_vocab is not None and (isinstance(draft_vocab, bool) or not isinstance(draft_vocab, int) or draft_vocab < 0):
            raise LocalGLMError(f"draft_vocab={draft_vocab!r}: the most frequent tokens the drafter scores, 0 (the whole head) or more")
        draft_fixed = kw.pop("draft_fixed", False)
        if draft_fixed not in (True, False):
            raise LocalGLMError(f"draft_fixed={draft_fixed!r}: use True (draft `draft` tokens every step) or False (the depth policy chooses)")
        if kw:
            raise LocalGLMError(f"load: unknown option(s) {', '.join(sorted(kw))}")
        return cls(quant, offload, mmap, verify, mtp, draft, draft_vocab, draft_fixed)
