"""Mixed-precision recipes: how many bits each class of tensor gets, overridable per layer range.

A recipe maps tensor *classes* to bits (2, 4, 8, or 16 = keep the checkpoint's float dtype):

    experts   routed experts (the bulk of a MoE checkpoint)          default 4
    shared    shared experts                                          default 8
    dense     dense FFN of the first layers                           default 8
    attn      attention projections (q, k, v, o)                      default 8; 4 with 2-bit experts
    embed     token embeddings                                        default 8
    lm_head   output projection                                       default 8
    router    MoE router (computed in fp32; only 16 is accepted)      default 16
    indexer   sparse-attention indexer projections (GLM-5's DSA)      default 16
    mtp       the MTP (next-n prediction) block: every weight of it   default 8
              but its router and indexer (an int4 draft head is reported to
              collapse speculative acceptance to a few percent)

With 2-bit routed experts attention defaults to 4 bits (`default_bits`); anything given explicitly wins.
Per-layer overrides: `LayerOverride(first, last, cls, bits)` (inclusive) such as "0-2:experts=8".
Norms, biases and the router's correction bias are never quantized. The classifier takes the
caller's own function from tensor name to (class, layer) -- `quant` knows no model layouts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .spec import QuantError, QuantSpec

CLASSES = ("experts", "shared", "dense", "attn", "embed", "lm_head", "router", "indexer", "mtp")
KEEP = 16
# The indexer stays precise by default: it picks which tokens attention sees, and a token it misses is lost
# to every head, while its projections are ~1% of a layer's always-used weights.
DEFAULT_BITS: dict[str, int] = {"experts": 4, "shared": 8, "dense": 8, "attn": 8, "embed": 8, "lm_head": 8, "router": KEEP, "indexer": KEEP, "mtp": 8}
ALLOWED_BITS = (2, 4, 8, KEEP)


def default_bits(experts: int | None = None) -> dict[str, int]:
    """The bits of every class not given, for a recipe whose routed experts get `experts` bits.

    At 2-bit experts attention drops to 4 bits. Whoever picks 2 bits is short of memory, and a decoded token
    reads every attention weight but only top-k experts: at GLM-4.5-Air's widths 8-bit attention was over half of
    a 2-bit token's weight bytes (1.30x llama.cpp's Q2_K file). 4 bits: KL 0.068 against 0.057 at 8 (Q2_K 0.274)
    for 0.82x the file, and decode 0.95x -> 1.25x llama.cpp's Q2_K (BENCHMARKS.md, Air widths).
    """
    bits = dict(DEFAULT_BITS)
    if experts == 2:
        bits["attn"] = 4
    return bits


# name -> (class or None for never-quantized, layer index or None)
Classifier = Callable[[str], tuple[str | None, int | None]]


def check_class(cls: str) -> str:
    if cls not in CLASSES:
        raise QuantError(f"unknown tensor class {cls!r} (known: {', '.join(CLASSES)})")
    return cls


def check_bits(cls: str, bits: int | str) -> int:
    try:
        b = int(str(bits).lower().replace("bf16", "16").replace("fp16", "16"))
    except ValueError:
        raise QuantError(f"{cls}: bits must be one of 2, 4, 8 or 16 (keep), got {bits!r}") from None
    if b not in ALLOWED_BITS:
        raise QuantError(f"{cls}: bits must be one of 2, 4, 8 or 16 (keep), got {b}")
    if cls == "router" and b != KEEP:
        raise QuantError("router: the router is computed in fp32 and is kept unquantized (only 16 is accepted)")
    return b


@dataclass(frozen=True)
class LayerOverride:
    first: int
    last: int
    cls: str
    bits: int

    @classmethod
    def parse(cls, text: str) -> list[LayerOverride]:
        """'A-B:class=bits[,class=bits...]' or 'A:class=bits' -> overrides."""
        m = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*:\s*(.+)", text)
        if not m:
            raise QuantError(f"layer override {text!r}: expected FIRST-LAST:CLASS=BITS[,CLASS=BITS] (e.g. 0-2:experts=8)")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        if last < first:
            raise QuantError(f"layer override {text!r}: range {first}-{last} is empty")
        out = []
        for item in m.group(3).split(","):
            name, eq, bits = item.partition("=")
            if not eq:
                raise QuantError(f"layer override {text!r}: {item!r} is not CLASS=BITS")
            c = check_class(name.strip())
            out.append(cls(first, last, c, check_bits(c, bits.strip())))
        return out

    def __str__(self) -> str:
        return f"{self.first}-{self.last}:{self.cls}={self.bits}"


@dataclass
class Recipe:
    bits: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_BITS))
    overrides: list[LayerOverride] = field(default_factory=list)
    # the classes whose bits were chosen by name (from_options), for `unmatched`; not saved
    chosen: frozenset[str] = field(default=frozenset(), compare=False)

    def __post_init__(self) -> None:
        for cls, b in list(self.bits.items()):
            self.bits[check_class(cls)] = check_bits(cls, b)
        for cls, b in default_bits(self.bits.get("experts")).items():
            self.bits.setdefault(cls, b)

    @classmethod
    def from_options(cls, bits: Mapping[str, int | str | None] | None = None, overrides: list[str] | None = None) -> Recipe:
        """Defaults (`default_bits`), with the given class bits (None entries ignored) and 'A-B:cls=bits' overrides."""
        chosen: dict[str, int] = {}
        for k, v in (bits or {}).items():
            if v is not None:
                chosen[check_class(k)] = check_bits(k, v)
        ovs = [o for text in overrides or [] for o in LayerOverride.parse(text)]
        return cls(chosen, ovs, frozenset(chosen))

    def bits_for(self, cls: str | None, layer: int | None) -> int:
        """Bits for a tensor of `cls` in `layer` (KEEP when cls is None)."""
        if cls is None:
            return KEEP
        b = self.bits[cls]
        if layer is not None:
            for o in self.overrides:  # later overrides win
                if o.cls == cls and o.first <= layer <= o.last:
                    b = o.bits
        return b

    def unmatched(self, names: Iterable[str], classify: Classifier) -> list[str]:
        """The choices that change no tensor among `names`: a class chosen by name that the checkpoint lacks
        (--indexer on a model without DSA, --mtp on one without an MTP layer) or an override whose layers hold
        no tensor of its class. One recipe may serve several models, so the caller warns rather than refuses."""
        layers: dict[str, set[int]] = {}
        for name in names:
            cls, layer = classify(name)
            if cls is not None:
                layers.setdefault(cls, set()).update([] if layer is None else [layer])
        out = [f"{cls}={self.bits[cls]}: this checkpoint has no {cls} tensors" for cls in sorted(self.chosen) if cls not in layers]
        for o in self.overrides:
            held = layers.get(o.cls, set())
            if not any(o.first <= i <= o.last for i in held):
                where = (
                    f"its {o.cls} tensors are in layers {min(held)}-{max(held)}" if held
                    else f"its {o.cls} tensors belong to no layer" if o.cls in layers else f"it has no {o.cls} tensors"
                )  # fmt: skip
                out.append(f"layer override {o}: no {o.cls} tensor lies in layers {o.first}-{o.last} ({where})")
        return out

    def spec_for(self, name: str, classify: Classifier) -> QuantSpec | None:
        cls, layer = classify(name)
        b = self.bits_for(cls, layer)
        return None if b == KEEP else QuantSpec.for_bits(b)

    def to_json(self) -> dict:
        return {"bits": dict(self.bits), "overrides": [str(o) for o in self.overrides]}

    @classmethod
    def from_json(cls, d: Mapping) -> Recipe:
        return cls(dict(d.get("bits", {})), [o for t in d.get("overrides", []) for o in LayerOverride.parse(t)])

    def describe(self) -> str:
        s = ", ".join(f"{c}={'bf16' if self.bits[c] == KEEP else self.bits[c]}" for c in CLASSES)
        return s + ("; " + "; ".join(map(str, self.overrides)) if self.overrides else "")

    def __str__(self) -> str:
        return json.dumps(self.to_json())
