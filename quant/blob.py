"""One routed expert = one contiguous uint8 blob: [gate_up QuantTensor | down QuantTensor].

gate_up is the gate and up projections stacked along the rows ([2I, H]: rows 0..I-1 gate, I..2I-1
up); down is [H, I]. Each part is a QuantTensor buffer (see formats.layout) starting at a 64-byte
aligned offset. So an expert moves between files, RAM and devices with one copy of `nbytes`
bytes, and `ExpertBlobLayout.unpack` gives zero-copy QuantTensor views of a blob wherever it is.

    lay = ExpertBlobLayout(hidden=H, inter=I, gate_up=QuantSpec.for_bits(4), down=QuantSpec.for_bits(4))
    blob = lay.pack(gate_up_qt, down_qt)          # uint8 [lay.nbytes]
    y = expert_forward(lay, blob, x)              # x [T, H] -> [T, H]; kernels prepared on each call
    pe = PreparedExpert(lay, blob); y = pe(x)     # kernels prepared once (what backends keep)
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import kquants
from .formats import QuantError, QuantSpec, QuantTensor, layout_nbytes
from .native import LgMat, NativeExpert, NativeLib, bf16_expert, bf16_expert_takes, native_lib


@dataclass(frozen=True)
class ExpertBlobLayout:
    hidden: int
    inter: int
    gate_up: QuantSpec
    down: QuantSpec

    @property
    def gate_up_shape(self) -> tuple[int, int]:
        return (2 * self.inter, self.hidden)

    @property
    def down_shape(self) -> tuple[int, int]:
        return (self.hidden, self.inter)

    @property
    def parts(self) -> dict[str, tuple[int, int, tuple[int, int], QuantSpec]]:
        """part -> (byte offset, byte length, shape, spec)."""
        gu = layout_nbytes(self.gate_up, self.gate_up_shape)
        dn = layout_nbytes(self.down, self.down_shape)
        return {"gate_up": (0, gu, self.gate_up_shape, self.gate_up), "down": (gu, dn, self.down_shape, self.down)}

    @property
    def nbytes(self) -> int:
        off, size, _, _ = self.parts["down"]
        return off + size

    def pack(self, gate_up: QuantTensor | list[QuantTensor], down: QuantTensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The blob of one expert, written into `out` (uint8 [nbytes], e.g. a row of a layer's buffer)
        or a new tensor. gate_up may be given as [gate, up]: GGUF block types (raw_blocks) are stacked
        by writing each part's bytes in turn, so a GGUF expert goes from the mapped file into its blob
        with one copy (was four: clone, cat, pack, copy); other specs are stacked by cat_rows."""
        if out is None:
            out = torch.zeros(self.nbytes, dtype=torch.uint8)
        elif out.dtype != torch.uint8 or out.numel() != self.nbytes:
            raise QuantError(f"expert blob buffer is {out.dtype} [{out.numel()}], the layout needs uint8 [{self.nbytes}]")
        for (off, size, shape, spec), given in zip(self.parts.values(), (gate_up, down)):
            pieces = list(given) if isinstance(given, (list, tuple)) else [given]
            if len(pieces) > 1 and not getattr(spec, "raw_blocks", False):
                pieces = [QuantTensor.cat_rows(pieces)]
            rows = sum(p.shape[0] for p in pieces)
            if any(p.spec != spec or p.shape[1] != shape[1] for p in pieces) or rows != shape[0]:
                got = " + ".join(f"{p.spec.name} {list(p.shape)}" for p in pieces)
                raise QuantError(f"expert part {got} does not match the layout's {spec.name} {list(shape)}")
            at = off
            for p in pieces:
                out[at : at + p.nbytes] = p.buf[: p.nbytes]
                at += p.nbytes
            out[at : off + size] = 0  # the padding to the next part's aligned offset
        return out

    def unpack(self, blob: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple[QuantTensor, QuantTensor]:
        if blob.numel() < self.nbytes:
            raise QuantError(f"expert blob has {blob.numel()} bytes, layout needs {self.nbytes}")
        out = []
        for off, size, shape, spec in self.parts.values():
            out.append(QuantTensor(spec, shape, blob[off : off + size], dtype))
        return out[0], out[1]

    def to_json(self) -> dict:
        return {"hidden": self.hidden, "inter": self.inter, "gate_up": self.gate_up.name, "down": self.down.name, "nbytes": self.nbytes}

    @classmethod
    def from_json(cls, d: dict) -> ExpertBlobLayout:
        return cls(int(d["hidden"]), int(d["inter"]), QuantSpec.parse(d["gate_up"]), QuantSpec.parse(d["down"]))


def quantize_expert(lay: ExpertBlobLayout, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, pool: Executor | None = None) -> torch.Tensor:
    """Float gate [I, H], up [I, H], down [H, I] -> the expert's blob (chunks on `pool`'s threads: QuantTensor.quantize)."""
    gu = QuantTensor.quantize(torch.cat([gate, up], 0), lay.gate_up, pool=pool)
    dn = QuantTensor.quantize(down, lay.down, pool=pool)
    return lay.pack(gu, dn)


class PreparedExpert:
    """An expert with its kernels built once for the blob's device; call it on x [T, H].

    On the CPU with the native kernels built, the expert runs as `quant.native.NativeExpert` (the
    same arithmetic as a whole MoE layer through the native kernel); elsewhere through each part's
    `QuantTensor.matmul`. On the CPU the result is fp32 (callers sum a token's experts in fp32, as
    the MoE kernel does), elsewhere x's dtype."""

    def __init__(self, lay: ExpertBlobLayout, blob: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> None:
        self.layout = lay
        self.blob = blob
        self.gate_up, self.down = lay.unpack(blob, dtype)
        lib = native_lib() if blob.device.type == "cpu" else None
        self.native: NativeExpert | None = None  # set where the native kernels take both parts
        # GGUF blocks as stored (a part or both): the C views lg_dense_expert multiplies in fp32, the
        # expert's numbers in the fused decode too (its LgExperts tables are these)
        self.mats: tuple[LgMat, LgMat] | None = None
        self._lib = lib
        if lib is not None and NativeLib.supports(self.gate_up) and NativeLib.supports(self.down):
            self.native = NativeExpert(lib, self.gate_up, self.down)
            return
        if lib is not None:
            gu, dn = NativeLib.describe_matrix(self.gate_up, torch.float32), NativeLib.describe_matrix(self.down, torch.float32)
            if gu is not None and dn is not None:
                self.mats = (gu, dn)
                return
        self.gate_up.prepare()
        self.down.prepare()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return self.native(x)
        if self.mats is not None and bf16_expert_takes(x.dtype, x.shape[0]):
            # a prompt's tokens that chose this expert, on a CPU with a native bf16 GEMM: the blocks to bf16 tiles
            return bf16_expert(self.gate_up.matmul, self.down.matmul, x)
        if self.mats is not None and self._lib is not None and x.shape[0] <= kquants.NATIVE_MAX_ROWS:
            return self._lib.expert(*self.mats, x.float().contiguous())
        xf = x.float() if x.device.type == "cpu" else x
        gate, up = self.gate_up.matmul(xf).chunk(2, dim=-1)
        return self.down.matmul(F.silu(gate) * up)


def expert_forward(lay: ExpertBlobLayout, blob: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) straight from a blob (prepares the kernels each call: use
    PreparedExpert for an expert that is used more than once)."""
    gu, dn = lay.unpack(blob, x.dtype)
    gate, up = gu.matmul(x).chunk(2, dim=-1)
    return dn.matmul(F.silu(gate) * up)
