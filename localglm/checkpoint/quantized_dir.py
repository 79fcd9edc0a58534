"""Reading a localglm quantized checkpoint (written by `localglm quantize`).

Directory: config.json, tokenizer/template files, safetensors shards (+ index), and the manifest
`localglm_quant.json`, which is written last: a directory without it is not a quantized checkpoint
(an interrupted run leaves none). In the shards:

- plain tensors (norms, biases, router, anything the recipe kept) under their hub names;
- each quantized non-expert weight under its hub name as one uint8 tensor (quant.formats layout);
  the manifest's "tensors" gives its spec, shape and float dtype;
- each routed expert as one uint8 blob `model.layers.L.mlp.experts.E.blob` (quant.blob layout:
  gate_up then down); the manifest's "experts" gives each MoE layer's blob layout.

`QuantizedSource` is a TensorSource: `get` returns float tensors (dequantized; an expert's
gate/up/down are cut from its blob), so any reader works. Loaders that want the packed form use
`get_quant`, `expert_layout` and `expert_blob` (a zero-copy view of the mapped file).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from quant.blob import ExpertBlobLayout
from quant.formats import QuantSpec, QuantTensor
from quant.recipe import Recipe

from ..errors import CheckpointError
from .source import MappedSource, SafetensorsSource, TensorInfo, check_expected_shape

MANIFEST = "localglm_quant.json"
FORMAT = "localglm-quant"
VERSION = 2  # 2: q8 in groups of 32 (rowf | data | gscale); 1 had per-row q8
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_EXPERT_PART = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


def blob_name(layer: int, expert: int) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.blob"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a localglm quantized-checkpoint manifest")
    if man.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: format version {man.get('version')} is not supported (this localglm reads {VERSION}); "
            "re-run `localglm quantize` on the original checkpoint"
        )
    return man


class QuantizedSource(MappedSource):
    """TensorSource over a localglm quantized directory (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.recipe = Recipe.from_json(self.manifest.get("recipe", {}))
        self.st = self._mapped = SafetensorsSource(self.root, quantization_config={})
        self._where = self.root
        self.quant = {name: (QuantSpec.parse(d["spec"]), tuple(d["shape"]), _DTYPES[d["dtype"]]) for name, d in self.manifest.get("tensors", {}).items()}
        self.layouts = {int(k): ExpertBlobLayout.from_json(v) for k, v in self.manifest.get("experts", {}).get("layouts", {}).items()}
        self.expert_dtype = _DTYPES[self.manifest.get("experts", {}).get("dtype", "bfloat16")]
        self.n_experts = {int(k): int(v) for k, v in self.manifest.get("experts", {}).get("count", {}).items()}
        for name in self.quant:
            if name not in self.st:
                raise CheckpointError(f"{self.root}: manifest lists quantized tensor {name} but no shard holds it")
        self._infos: dict[str, TensorInfo] = {}
        for name in self.st.names():
            info = self.st.info(name)
            if name in self.quant:
                _, shape, dt = self.quant[name]
                info = TensorInfo(name, shape, dt, info.file, info.offsets, torch.uint8)
            elif name.endswith(".blob"):
                continue
            self._infos[name] = info
        for layer, lay in self.layouts.items():
            for e in range(self.n_experts.get(layer, 0)):
                b = blob_name(layer, e)
                if b not in self.st:
                    raise CheckpointError(f"{self.root}: expert blob {b} is missing")
                bi = self.st.info(b)
                if bi.shape != (lay.nbytes,):
                    raise CheckpointError(f"{self.root}: {b} has {list(bi.shape)} bytes, its layout needs {lay.nbytes}")
                for part, shape in (("gate", (lay.inter, lay.hidden)), ("up", (lay.inter, lay.hidden)), ("down", (lay.hidden, lay.inter))):
                    n = f"model.layers.{layer}.mlp.experts.{e}.{part}_proj.weight"
                    self._infos[n] = TensorInfo(n, shape, self.expert_dtype, bi.file, bi.offsets, torch.uint8)
        self._infos = dict(sorted(self._infos.items()))

    # -- TensorSource ----------------------------------------------------------------------
    def is_quantized(self, name: str) -> bool:
        return name in self.quant

    def get(self, name: str, dtype: torch.dtype | None = None, expected_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        info = self.info(name)
        check_expected_shape(info, expected_shape)
        m = _EXPERT_PART.fullmatch(name)
        if m and int(m.group(1)) in self.layouts:
            layer, e, part = int(m.group(1)), int(m.group(2)), m.group(3)
            gu, dn = self.layouts[layer].unpack(self.expert_blob(layer, e), self.expert_dtype)
            inter = self.layouts[layer].inter
            if part == "down":
                w = dn.dequantize()
            else:
                w = gu.dequantize()[:inter] if part == "gate" else gu.dequantize()[inter:]
            return w.to(dtype or info.dtype)
        if name in self.quant:
            return self.get_quant(name).dequantize(dtype or info.dtype)
        return self.st.get(name, dtype=dtype)

    def get_quant(self, name: str, dtype: torch.dtype | None = None, copy: bool = True) -> QuantTensor:
        """The packed tensor; `copy=False` leaves its buffer a read-only view of the mapped file."""
        spec, shape, dt = self.quant[name]
        raw = self.st.get(name)
        return QuantTensor(spec, shape, raw.clone() if copy else raw, dtype or dt)

    def expert_layout(self, layer: int) -> ExpertBlobLayout:
        return self.layouts[layer]

    def expert_bytes(self) -> int:
        """Bytes of every routed expert's blob together."""
        return sum(lay.nbytes * self.n_experts.get(layer, 0) for layer, lay in self.layouts.items())

    def expert_blob(self, layer: int, expert: int) -> torch.Tensor:
        """uint8 [nbytes]: a read-only view of the mapped file (clone or copy_ it out to keep it)."""
        return self.st.get(blob_name(layer, expert))
