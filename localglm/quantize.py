"""Quantizing GLM checkpoints: the streaming `localglm quantize` pipeline and quantize-while-loading.

`quantize_checkpoint(SRC, OUT, recipe)` reads the source tensor by tensor in file order (shard by
shard, memory-mapped, pages released as it goes), quantizes each by its class (quant.recipe),
packs every routed expert into one contiguous blob, and writes shards as they fill: peak memory is
about one output shard plus the tensors in flight, never the checkpoint. Everything is written in
a hidden sibling directory `.OUT.partial`; the manifest goes in last, then config.json, then the
directory is renamed to OUT. A failed or interrupted run leaves OUT absent (or the old OUT untouched)
and removes the partial directory; one left by a killed process (no loader accepts it) is removed by
the next run. `overwrite` replaces only an earlier quantize's output, and only when OUT holds nothing
else (the manifest lists what quantize wrote) and does not contain SRC: nothing else is ever deleted.

SRC may also be a glm4moe GGUF (one file or a split set): its tensors are mapped and read one at a
time (a stacked expert tensor one expert slice at a time, the three slices of an expert together),
dequantized through gguf's dequantizers where the recipe quantizes them (Q8_0 held at q8 is taken
as stored), and config.json, the tokenizer and the chat template are written from its metadata
exactly as `localglm.load("x.gguf")` builds them.

For `localglm.load(path, experts_bits=4, ...)`, `quant_getter` and `load_quantized_experts` do the
same per tensor while loading (nothing unquantized is held beyond one tensor / one expert).
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quant.blob import ExpertBlobLayout, quantize_expert
from quant.formats import QuantSpec, QuantTensor
from quant.gguf_packed import PACKED_SPECS
from quant.recipe import KEEP, Classifier, Recipe

from .config import ModelConfig, load_json
from .errors import LocalGLMError
from .models import arch_for_model_type

from .models.moe_decoder import expert_tensor_names
from .checkpoint.gguf import GGUFSource, is_gguf_path
from .checkpoint.quantized_dir import FORMAT, MANIFEST, VERSION, QuantizedSource, blob_name, dtype_name, file_records, is_quantized_dir, read_manifest
from .checkpoint.safetensors import INDEX_FILE_NAME, SHARD_NAME_RE, SINGLE_FILE_NAME, save_safetensors_sharded
from .checkpoint.source import SafetensorsSource
from .checkpoint.writing import publish_dir, writing

DEFAULT_SHARD_BYTES = 256 * 2**20
RELEASE_EVERY = 128 * 2**20

_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


def fit_spec(spec: QuantSpec | None, shape: tuple[int, ...]) -> QuantSpec | None:
    """The spec, or None (kept in float) for non-2-D tensors and rows that do not split into its groups."""
    if spec is None or len(shape) != 2 or shape[1] % spec.group:
        return None
    return spec


def _expert_layout(recipe: Recipe, layer: int, hidden: int, inter: int, cls: str = "experts") -> ExpertBlobLayout | None:
    """The blob layout of `layer`'s routed experts (`cls` "mtp" for an MTP block's), None when kept in float."""
    bits = recipe.bits_for(cls, layer)
    if bits == KEEP:
        return None
    spec = QuantSpec.for_bits(bits)
    gate_up, down = fit_spec(spec, (2 * inter, hidden)), fit_spec(spec, (hidden, inter))
    if gate_up is None or down is None:
        raise LocalGLMError(f"experts of layer {layer}: hidden {hidden} and expert width {inter} must be multiples of {spec.group} to quantize (use experts=16)")
    return ExpertBlobLayout(hidden, inter, gate_up, down)


def _float_for_quant(source: Any, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Tensor `name` to be quantized: a GGUF quantized type dequantized to float32 (its exact values, not
    rounded to the checkpoint's dtype on the way), anything else as stored."""
    if isinstance(source, GGUFSource):
        info = source.info(name)
        if info.stored_dtype != info.dtype:
            return source.get(name, dtype=torch.float32, expected_shape=shape)
    return source.get(name, expected_shape=shape)


def _packed_layout(source: Any, recipe: Recipe | None, layer: int, hidden: int, inter: int, cls: str = "experts") -> ExpertBlobLayout | None:
    """The layout of `layer`'s routed experts as a GGUF stores them, when its types are taken as
    stored (Q8_0 as q8; K-quants, legacy types and i-quants as their blocks: quant.kquants; gate and up of one
    type) and no recipe asks otherwise (none, or one giving them exactly this layout). None otherwise."""
    specs = [source.packed_spec(nm) for nm in expert_tensor_names(layer, 0)] if isinstance(source, GGUFSource) else [None]
    if any(sp is None for sp in specs) or specs[0] != specs[1]:
        return None
    lay = ExpertBlobLayout(hidden, inter, specs[0], specs[2])
    return lay if recipe is None or _expert_layout(recipe, layer, hidden, inter, cls) == lay else None


# GGUF tensor types -> the localglm bits that hold them without losing much more (K-quants and the
# like are dequantized on load; at 8 bits anything above 4.5 bits per weight).
_GGUF_BITS = (("Q8", 8), ("Q6", 8), ("Q5", 8), ("Q4", 4), ("IQ4", 4), ("MXFP4", 4), ("Q3", 2), ("Q2", 2), ("IQ3", 2), ("IQ2", 2), ("IQ1", 2), ("TQ", 2))


def _gguf_bits(kind: str) -> int | None:
    """The localglm bits nearest a GGUF type (None for float types)."""
    return next((b for prefix, b in _GGUF_BITS if kind.upper().startswith(prefix)), None)


def _requantized_layouts(source: GGUFSource, layers: list[int], hidden: int, inter: int) -> dict[int, ExpertBlobLayout]:
    """Layouts for MoE layers whose routed experts are not taken as stored while other layers are
    (a type localglm does not run, or gate and up of different types): re-quantized to the nearest
    localglm bits, with one warning naming the layers and their types."""
    out: dict[int, ExpertBlobLayout] = {}
    why: dict[str, list[int]] = {}
    for i in layers:
        kinds = [source.info(nm).ggml_type.upper() for nm in expert_tensor_names(i, 0)]
        bits = max((_gguf_bits(k) or 8) for k in kinds)
        lay = _expert_layout(Recipe.from_options({"experts": bits}), i, hidden, inter)
        assert lay is not None
        out[i] = lay
        why.setdefault(f"{'/'.join(dict.fromkeys(kinds))} -> q{bits}", []).append(i)
    warnings.warn(
        f"{source.files.where}: routed experts of some layers are in types localglm does not run as stored "
        f"(it does {', '.join(PACKED_SPECS)}, gate and up of one type); re-quantizing them while loading: "
        + "; ".join(f"layers {','.join(map(str, ls))}: {k}" for k, ls in why.items()),
        stacklevel=3,
    )
    return out


def gguf_expert_recipe(source: GGUFSource, cfg: Any, dtype: torch.dtype, available: int) -> tuple[Recipe, str] | None:
    """For a GGUF whose routed experts are stored in a type kept only by dequantizing (K-/I-quants,
    Q4_0, ...): when dequantized they would not fit in `available` bytes of RAM, the recipe that
    re-quantizes just the experts to the nearest localglm bits while loading, and why (one line).
    None when they fit, or are float or Q8_0 (taken as stored)."""
    layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    if not layers or any(_packed_layout(source, None, i, cfg.hidden_size, cfg.moe_intermediate_size) is not None for i in layers):
        return None  # some layers are taken as stored: load_quantized_experts re-quantizes only the others
    stored = source.info(expert_tensor_names(layers[0], 0)[0])
    kind = stored.ggml_type.upper()
    bits = _gguf_bits(kind)
    if bits is None:  # F32 / F16 / BF16: the experts are float as stored
        return None
    need = len(layers) * cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size * torch.tensor([], dtype=dtype).element_size()
    if need <= available:
        return None
    keep = {cls: KEEP for cls in ("shared", "dense", "attn", "embed", "lm_head")}
    why = (
        f"{stored.file}: localglm does not run {kind} as stored (it does {', '.join(PACKED_SPECS)}), and the routed experts "
        f"dequantized would take {need / 2**30:.1f} GiB, more than the "
        f"{available / 2**30:.1f} GiB of RAM available; re-quantizing them to localglm q{bits} while loading "
        f"(experts_bits=16 / --experts 16 dequantizes anyway; `localglm quantize` does it once)"
    )
    return Recipe.from_options({"experts": bits, **keep}), why


# ------------------------------------------------------------------------------------------------
# The streaming pipeline
# ------------------------------------------------------------------------------------------------


@dataclass
class QuantizeResult:
    out: Path
    seconds: float
    source_bytes: int
    out_bytes: int
    peak_rss_bytes: int
    n_params: int
    class_error: dict[str, float] = field(default_factory=dict)  # relative Frobenius error per class
    class_bits: dict[str, float] = field(default_factory=dict)  # stored bits per weight per class

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.out_bytes / max(1, self.n_params)


# (done bytes, total bytes, current tensor name) -> None
Progress = Callable[[int, int, str], None]
_AUX_SKIP = {INDEX_FILE_NAME, SINGLE_FILE_NAME, MANIFEST, "config.json"}
_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # config torch_dtype


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


@dataclass
class _Input:
    """What the pipeline needs from SRC: the tensors (in reading order) and how to write config/tokenizer."""

    source: Any  # SafetensorsSource or GGUFSource
    names: list[str]
    config: dict[str, Any]  # the config.json to write
    about: dict[str, Any]  # the manifest's "source"
    write_aux: Callable[[Path], None]  # tokenizer, chat template, generation config, ... into the partial dir

    @property
    def classify(self) -> Classifier:
        """The architecture's tensor classes (its schema), by the config's model_type; the MTP blocks' are "mtp"."""
        schema = arch_for_model_type(self.config.get("model_type"), "config.json").schema
        return schema.classifier(int(self.config.get("num_hidden_layers", 0)))


def _open_hf(src: Path) -> _Input:
    ModelConfig.from_file(src)  # a config no model can have is refused here, before anything is written
    config = load_json(src / "config.json")
    source = SafetensorsSource(src)
    files = {f: i for i, f in enumerate(source.files)}
    names = sorted(source.names(), key=lambda n: (files.get(source.info(n).file, 0), source.info(n).offsets[0]))

    def write_aux(tmp: Path) -> None:
        for f in src.iterdir():
            if f.is_file() and f.name not in _AUX_SKIP and not f.name.endswith(".safetensors"):
                shutil.copy2(f, tmp / f.name)

    return _Input(source, names, config, {"path": str(src), "dtype": str(config.get("torch_dtype", ""))}, write_aux)


def _open_gguf(src: Path) -> _Input:
    """A glm4moe GGUF (one file or a split set): config and tokenizer from its metadata, as `localglm.load`
    builds them (errors are the GGUF loader's: one line naming the file), so they fail before anything is written."""
    import gguf

    from .config import ModelConfig
    from .checkpoint.gguf import GGUFModelFiles, hf_config_from_gguf, tokenizer_from_gguf

    files = GGUFModelFiles(src)
    try:
        config = hf_config_from_gguf(files)
        ModelConfig.from_dict(config, source=f"{files.where} (GGUF metadata)")
        tokenizer = tokenizer_from_gguf(files)
        # Tensors of GGUF quantized types come back in float32 when they are to be quantized (the exact values)
        # and in the checkpoint's dtype (what the GGUF loader computes in by default) when they are kept in float.
        source = GGUFSource(files, dequant_dtype=_DTYPE[config["torch_dtype"]])
    except BaseException:
        files.close()
        raise
    pos = {f.path: i for i, f in enumerate(files.files)}

    def where(gguf_name: str) -> tuple[int, int]:
        t = files.tensors[gguf_name]
        return pos[t.file], t.offset

    stacks: dict[str, tuple[int, int]] = {}  # layer -> where its stacked expert tensors begin
    for name in source.names():
        m = _EXPERT.fullmatch(name)
        if m:
            at = where(source.info(name).gguf_name)
            stacks[m[1]] = min(stacks.get(m[1], at), at)

    def order(name: str) -> tuple[int, int, int, int]:
        # File order, except that the three slices of one expert (from three stacked tensors) come together,
        # so that one expert at a time is in flight.
        m = _EXPERT.fullmatch(name)
        if m:
            return (*stacks[m[1]], int(m[2]), ("gate", "up", "down").index(m[3]))
        return (*where(source.info(name).gguf_name), 0, 0)

    ftype = files.metadata.get("general.file_type")
    try:
        ftype_name = gguf.LlamaFileType(ftype).name
    except ValueError:
        ftype_name = str(ftype)
    about = {"path": str(src), "format": "gguf", "file_type": ftype_name, "parts": len(files.files), "dtype": config["torch_dtype"]}

    def write_aux(tmp: Path) -> None:
        tokenizer.save(tmp)  # tokenizer.json, tokenizer_config.json, chat_template.jinja

    return _Input(source, sorted(source.names(), key=order), config, about, write_aux)


def quantize_checkpoint(
    src: str | Path,
    out: str | Path,
    recipe: Recipe | None = None,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: Progress | None = None,
    report: bool = False,
) -> QuantizeResult:
    """Quantize the checkpoint at SRC into a localglm quantized directory OUT.

    SRC is a Hugging Face model directory or a glm4moe GGUF file (any part of a split set). From a GGUF,
    config.json, the tokenizer files and the chat template are written from its metadata; its tensors are
    dequantized one at a time (routed experts one expert slice at a time) with gguf's dequantizers, except
    Q8_0 tensors (and Q8_0 experts) the recipe holds at 8 bits, which are taken as stored.
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    recipe = recipe or Recipe()
    t0 = time.perf_counter()
    if not src.exists():
        raise LocalGLMError(f"{src}: no such file or directory")
    from_gguf = is_gguf_path(src)
    if not from_gguf:
        if not src.is_dir():
            raise LocalGLMError(f"{src}: expected a Hugging Face model directory or a .gguf file")
        if is_quantized_dir(src):
            raise LocalGLMError(f"{src} is already a localglm quantized checkpoint; quantize the original Hugging Face checkpoint")
        if not (src / "config.json").is_file():
            raise LocalGLMError(f"{src}: no config.json (expected a Hugging Face model directory)")
    if out.resolve() == src.resolve():
        raise LocalGLMError("OUT must differ from SRC")
    if src.resolve().is_relative_to(out.resolve()):
        raise LocalGLMError(f"{out} contains the source {src}; write OUT somewhere else (it is never replaced)")
    if not from_gguf and out.resolve().is_relative_to(src.resolve()):  # a later run would read OUT's shards as SRC's
        raise LocalGLMError(f"{out} is inside the source directory {src}; write OUT somewhere else")
    if max_shard_bytes <= 0:
        raise LocalGLMError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if out.exists() and not overwrite:
        raise LocalGLMError(f"{out} exists; pass --overwrite to replace it")
    if out.exists():
        _check_replaceable(out)
    inp = _open_gguf(src) if from_gguf else _open_hf(src)  # a bad SRC fails here, before anything is written
    with inp.source, _worker_pool() as pool:
        from .loader import check_gguf_tensors_used, check_tensors

        cfg = ModelConfig.from_dict(inp.config, source=str(src))
        (check_gguf_tensors_used if from_gguf else check_tensors)(cfg, inp.source)  # what loading OUT would need
        for why in recipe.unmatched(inp.names, inp.classify):
            warnings.warn(f"{src}: {why}", stacklevel=2)
        return _quantize(inp, src, out, recipe, t0, max_shard_bytes, progress, report, pool)


@contextmanager
def _worker_pool() -> Iterator[ThreadPoolExecutor | None]:
    """torch's threads (--threads) as a pool that quantizes chunks of rows side by side, each chunk on
    one torch thread: no fork and join per operation, and the small per-group operations run in
    parallel too. The codes are the same as on one thread. torch's thread count is restored after."""
    n = torch.get_num_threads()
    if n <= 1:
        yield None
        return
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(n, thread_name_prefix="localglm-quantize") as pool:
            yield pool
    finally:
        torch.set_num_threads(n)


# What an earlier localglm quantize wrote besides its weights, for outputs whose manifest predates "files".
_AUX_NAMES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json"}


def _written_by_quantize(out: Path) -> set[str]:
    """The names in OUT that an earlier `quantize` wrote: the manifest's "files" (and the manifest and
    config.json, written after it); for an older manifest, the weight files, the usual tokenizer files and
    whatever its source directory holds under the same name (the aux files were copied from there)."""
    man = read_manifest(out)
    files = man.get("files")
    if isinstance(files, dict):
        return {MANIFEST, "config.json", *files}
    names = {MANIFEST, "config.json", INDEX_FILE_NAME, SINGLE_FILE_NAME, *_AUX_NAMES}
    names |= {p.name for p in out.iterdir() if SHARD_NAME_RE.match(p.name)}
    src = Path(str((man.get("source") or {}).get("path", "")))
    if str(src) and src.is_dir():
        names |= {p.name for p in src.iterdir() if p.is_file()}
    return names


def _check_replaceable(out: Path) -> None:
    """Refuse to replace OUT unless it is empty or an earlier quantize output holding nothing else."""
    if not out.is_dir():
        raise LocalGLMError(f"{out} exists and is not a directory; refusing to replace it")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not is_quantized_dir(out):
        raise LocalGLMError(f"{out} exists and is not a localglm quantized checkpoint; refusing to replace it")
    try:
        owned = _written_by_quantize(out)
    except LocalGLMError as exc:
        raise LocalGLMError(f"{out}: cannot tell what an earlier quantize wrote there ({exc}); refusing to replace it") from None
    foreign = [e for e in entries if e not in owned or (out / e).is_dir()]
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise LocalGLMError(
            f"{out} also holds {', '.join(foreign[:3])}{more}, which quantize did not write; --overwrite replaces only "
            "an earlier quantize output: move those out first, or choose another OUT"
        )


def _quantize(
    inp: _Input, src: Path, out: Path, recipe: Recipe, t0: float, max_shard_bytes: int, progress: Progress | None, report: bool,
    pool: ThreadPoolExecutor | None = None,
) -> QuantizeResult:
    tmp = partial_dir(out)
    if tmp.exists():
        shutil.rmtree(tmp)  # an earlier run was killed: start over
    with writing(out, tmp):
        tmp.mkdir(parents=True)
        return _write_quantized(inp, src, out, tmp, recipe, t0, max_shard_bytes, progress, report, pool)


def _write_quantized(
    inp: _Input, src: Path, out: Path, tmp: Path, recipe: Recipe, t0: float, max_shard_bytes: int, progress: Progress | None, report: bool,
    pool: ThreadPoolExecutor | None = None,
) -> QuantizeResult:
    source, names = inp.source, inp.names
    total = sum(source.info(n).nbytes for n in names)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "recipe": recipe.to_json(),
        "source": inp.about,
        "tensors": {},
        "experts": {"layouts": {}, "count": {}, "dtype": "bfloat16"},
    }
    err2: dict[str, float] = {}
    ref2: dict[str, float] = {}
    stored: dict[str, list[int]] = {}  # class -> [bytes, params]
    n_params = 0

    def account(cls: str, numel: int, nbytes: int, pair: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """Count `numel` weights stored in `nbytes`; with `report`, pair() = (source values, stored values)."""
        s = stored.setdefault(cls, [0, 0])
        s[0] += nbytes
        s[1] += numel
        if report and pair is not None:
            w, d = pair()
            wf = w.float()
            err2[cls] = err2.get(cls, 0.0) + float((d.float() - wf).pow(2).sum())
            ref2[cls] = ref2.get(cls, 0.0) + float(wf.pow(2).sum())

    def same(qt: QuantTensor) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """A tensor taken as stored (GGUF Q8_0 as q8): its values are the source's exactly."""

        def pair() -> tuple[torch.Tensor, torch.Tensor]:
            d = qt.dequantize(torch.float32)
            return d, d

        return pair

    is_gguf = isinstance(source, GGUFSource)
    packed_layouts: dict[int, ExpertBlobLayout | None] = {}

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal n_params
        done = since_release = 0
        pending: dict[tuple[int, int], dict[str, Any]] = {}
        for name in names:
            info = source.info(name)
            shape = tuple(info.shape)
            n_params += math.prod(shape)
            cls, layer = inp.classify(name)
            m = _EXPERT.fullmatch(name)
            lay = None
            if m:
                inter, hidden = (shape if m.group(3) != "down" else shape[::-1])
                i = int(m.group(1))
                if i not in packed_layouts:  # GGUF Q8_0 experts the recipe holds at q8: their blocks as they are
                    packed_layouts[i] = _packed_layout(source, recipe, i, hidden, inter, cls or "experts")
                lay = packed_layouts[i] or _expert_layout(recipe, i, hidden, inter, cls or "experts")
            if m and lay is not None:
                key = (int(m.group(1)), int(m.group(2)))
                packed = packed_layouts[key[0]] is not None
                parts = pending.setdefault(key, {})
                parts[m.group(3)] = source.get_quant(name, expected_shape=shape) if packed else _float_for_quant(source, name)
                if len(parts) == 3:
                    del pending[key]
                    if packed:
                        blob = lay.pack([parts["gate"], parts["up"]], parts["down"])
                    else:
                        blob = quantize_expert(lay, parts["gate"], parts["up"], parts["down"], pool)
                    manifest["experts"]["layouts"][str(key[0])] = lay.to_json()
                    cnt = manifest["experts"]["count"]
                    cnt[str(key[0])] = max(cnt.get(str(key[0]), 0), key[1] + 1)
                    manifest["experts"]["dtype"] = dtype_name(info.dtype) if info.dtype.is_floating_point else "bfloat16"
                    gu, dn = lay.unpack(blob, torch.float32)
                    if packed:
                        account("experts", 2 * inter * hidden, gu.nbytes, same(gu))
                        account("experts", inter * hidden, dn.nbytes, same(dn))
                    else:
                        account("experts", 2 * inter * hidden, gu.nbytes, lambda: (torch.cat([parts["gate"], parts["up"]], 0), gu.dequantize()))
                        account("experts", inter * hidden, dn.nbytes, lambda: (parts["down"], dn.dequantize()))
                    yield blob_name(*key), blob
            else:
                spec = fit_spec(recipe.spec_for(name, inp.classify), shape)
                if spec is not None:
                    manifest["tensors"][name] = {"spec": spec.name, "shape": list(shape), "dtype": dtype_name(info.dtype)}
                    if is_gguf and source.packed_spec(name) == spec:  # GGUF Q8_0 held at q8: taken as stored
                        qt = source.get_quant(name, expected_shape=shape)
                        account(cls or "other", math.prod(shape), qt.nbytes, same(qt))
                    else:
                        t = _float_for_quant(source, name)
                        qt = QuantTensor.quantize(t, spec, pool=pool)
                        account(cls or "other", t.numel(), qt.nbytes, lambda: (t, qt.dequantize()))
                    yield name, qt.buf
                else:
                    t = source.get(name)  # kept in float: as stored (a GGUF quantized type: in the checkpoint's dtype)
                    account(cls or "other", t.numel(), t.numel() * t.element_size())
                    yield name, t
            done += info.nbytes
            since_release += info.nbytes
            if since_release >= RELEASE_EVERY:
                source.release_pages()
                since_release = 0
            if progress:
                progress(done, total, name)
        if pending:
            (layer, e), parts = next(iter(pending.items()))
            raise LocalGLMError(f"{src}: expert {e} of layer {layer} lacks {', '.join(sorted({'gate', 'up', 'down'} - set(parts)))}")

    save_safetensors_sharded(tensors(), tmp, max_shard_bytes, metadata={"localglm": FORMAT})
    inp.write_aux(tmp)  # tokenizer, chat template, generation config, ...
    # every file written so far, with its CRC-32: loading checks the weights, --overwrite replaces only these
    manifest["files"] = file_records(tmp, [p.name for p in tmp.iterdir() if p.is_file() and p.name not in (MANIFEST, "config.json")])
    manifest["stats"] = {
        "class_bits_per_weight": {c: 8 * b / max(1, n) for c, (b, n) in stored.items()},
        "class_relative_error": {c: (err2[c] / ref2[c]) ** 0.5 for c in err2 if ref2.get(c)},
    }
    _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    # config.json last: without it nothing loads the directory
    if is_gguf:
        _write_atomic(tmp / "config.json", json.dumps(inp.config, indent=2) + "\n")
    else:
        shutil.copy2(src / "config.json", tmp / "config.json")
    publish_dir(tmp, out)
    out_bytes = sum(p.stat().st_size for p in out.iterdir() if p.name.endswith(".safetensors"))
    return QuantizeResult(
        out=out,
        seconds=time.perf_counter() - t0,
        source_bytes=total,
        out_bytes=out_bytes,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        n_params=n_params,
        class_error=manifest["stats"]["class_relative_error"],
        class_bits=manifest["stats"]["class_bits_per_weight"],
    )


def matches(out: str | Path, src: str | Path, recipe: Recipe) -> bool:
    """True when OUT is a complete quantized checkpoint made from SRC with this recipe (reuse it)."""
    from .checkpoint.quantized_dir import read_manifest

    out = Path(out).expanduser()
    if not is_quantized_dir(out):
        return False
    try:
        man = read_manifest(out)
    except LocalGLMError:
        return False
    return man.get("recipe") == recipe.to_json() and man.get("source", {}).get("path") == str(Path(src).expanduser())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Quantize while loading / load a quantized directory
# ------------------------------------------------------------------------------------------------


def quant_getter(
    source: Any,
    recipe: Recipe | None,
    plain: Callable[[str, tuple[int, ...]], torch.Tensor],
    dev: torch.device,
    dtype: torch.dtype,
    classify: Classifier,
) -> Callable[[str, tuple[int, ...]], Any]:
    """A loader `get(name, shape)` that returns QuantTensors for the recipe's (or the file's) quantized tensors."""

    def get(name: str, shape: tuple[int, ...]) -> Any:
        if isinstance(source, QuantizedSource) and source.is_quantized(name):
            qt = source.get_quant(name, dtype)
            if tuple(qt.shape) != tuple(shape):
                raise LocalGLMError(f"tensor {name} in {source.root} has shape {list(qt.shape)}, expected {list(shape)}")
            return qt.to(dev)
        if recipe is None and isinstance(source, GGUFSource) and not _EXPERT.fullmatch(name):
            # K-quants etc.: their blocks as stored, no dense copy (routed experts are load_quantized_experts'
            # to take as stored; one asked for here is for the float expert path, which needs it dense)
            stored = source.packed_spec(name)
            if stored is not None and stored.raw_blocks:
                return source.get_quant(name, dtype, shape).to(dev)
        if recipe is not None:
            spec = fit_spec(recipe.spec_for(name, classify), shape)
            if spec is not None and isinstance(source, GGUFSource) and source.packed_spec(name) == spec:
                return source.get_quant(name, dtype, shape).to(dev)  # GGUF Q8_0 as stored: no requantizing
            if spec is not None:
                t = _float_for_quant(source, name, shape)
                return QuantTensor.quantize(t, spec, dtype=dtype).to(dev)
        return plain(name, shape)

    return get


LOOKUP_FIELDS = frozenset({"embed"})  # weight fields whose rows are looked up, never multiplied


def prepare_quantized(obj: Any) -> None:
    """Build the kernels of every QuantTensor in the model's weight dataclasses (after q/k/v and
    gate/up are fused, so each fused matrix is converted once, at load rather than on the first token).
    Embedding tables are skipped: their rows are dequantized where they lie, and on a GPU a kernel
    would be a second copy of the table (tinygemm's tiles, or a dense one for q8)."""
    import dataclasses

    if isinstance(obj, QuantTensor):
        obj.prepare()
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            prepare_quantized(v)
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            if f.name not in LOOKUP_FIELDS:
                prepare_quantized(getattr(obj, f.name))


def load_quantized_experts(
    cfg: Any,
    source: Any,
    recipe: Recipe | None,
    dtype: torch.dtype,
    dev: torch.device,
    layer_done: Callable[[int], None] | None = None,
    keep_blobs: bool = False,
    mapped: bool = False,
    layers: list[int] | None = None,
    cls: str = "experts",
) -> Any:
    """QuantizedExperts from a quantized directory's blobs, from a GGUF's Q8_0 expert blocks as they
    are (with no recipe, or one giving experts 8 bits), or by quantizing a float source per expert
    with `recipe`. Returns None when the experts are not to be quantized (use the float path).

    `mapped` (a quantized directory on the CPU only): each expert stays a read-only view of its
    mapped shard, nothing is copied, and the OS page cache decides which experts sit in RAM.
    `layers` (default: the MoE layers) and their recipe class `cls`: an MTP block's are ([N], "mtp")."""
    from .layers.experts import QuantizedExperts
    h, inter, n = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    layers = list(range(cfg.first_k_dense_replace, cfg.num_hidden_layers)) if layers is None else layers
    from_blobs = isinstance(source, QuantizedSource) and bool(source.layouts)
    packed = {i: lay for i in layers if (lay := _packed_layout(source, recipe, i, h, inter, cls)) is not None}
    requant: dict[int, ExpertBlobLayout] = {}  # layers re-quantized beside layers taken as stored
    if from_blobs:
        missing = [i for i in layers if i not in source.layouts]
        if len(missing) == len(layers):  # these layers kept float (an MTP block's blob beside float main experts, or the reverse)
            return None
        if missing:
            raise NotImplementedError(f"{source.root}: MoE layers {missing} keep float experts; mixing float and quantized expert layers is not supported yet")
    elif recipe is None:
        if not layers or not packed:  # float GGUF experts: the float path
            return None
        if len(packed) < len(layers):  # some layers in types not run as stored: those re-quantized
            requant = _requantized_layouts(source, [i for i in layers if i not in packed], h, inter)
    else:
        if all(recipe.bits_for(cls, i) == KEEP for i in layers):
            return None
        if any(recipe.bits_for(cls, i) == KEEP for i in layers):
            raise NotImplementedError("mixing float (16) and quantized expert layers is not supported yet")
    layouts: dict[int, ExpertBlobLayout] = {}
    blobs: dict[int, torch.Tensor] = {}
    shapes = ((inter, h), (inter, h), (h, inter))
    mapped = mapped and from_blobs and dev.type == "cpu"
    for i in layers:
        lay = source.layouts[i] if from_blobs else packed[i] if i in packed else requant.get(i) or _expert_layout(recipe, i, h, inter, cls)
        if (lay.hidden, lay.inter) != (h, inter):
            raise LocalGLMError(f"experts of layer {i}: blob layout is {lay.hidden}x{lay.inter}, config says {h}x{inter}")
        if mapped:
            layouts[i] = lay
            blobs[i] = [source.expert_blob(i, e) for e in range(n)]  # type: ignore[assignment]
            if layer_done:
                layer_done(i)
            continue
        buf = torch.empty((n, lay.nbytes), dtype=torch.uint8)
        for e in range(n):
            if from_blobs:
                buf[e].copy_(source.expert_blob(i, e))
            elif i in packed:
                g, u, d = (source.get_quant(nm, dtype, s, copy=False) for nm, s in zip(expert_tensor_names(i, e), shapes))
                lay.pack([g, u], d, out=buf[e])
            else:
                g, u, d = (_float_for_quant(source, nm, s) for nm, s in zip(expert_tensor_names(i, e), shapes))
                buf[e].copy_(quantize_expert(lay, g, u, d))
        layouts[i] = lay
        blobs[i] = buf.to(dev)
        if layer_done:
            layer_done(i)
    return QuantizedExperts(layouts, blobs, dtype, keep_blobs=keep_blobs)
