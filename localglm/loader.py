"""`localglm.load`: from a checkpoint path to a ready `Model`.

Resolves the path, parses config.json (the architecture comes from the registry), opens the weights
lazily (memory-mapped), reads the always-used tensors and the routed experts onto the chosen device
in the chosen dtype, builds the expert backend, then the model around it, and loads the tokenizer
and chat template that ship with the checkpoint.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from quant.recipe import KEEP, Recipe

from .checkpoint.gguf import GGUFCheckpoint, is_gguf_path
from .checkpoint.source import SafetensorsSource, check_expected_shape, check_float
from .config import ModelConfig, load_json
from .engine import Model
from .errors import LocalGLMError
from .layers.experts import ExpertBackend
from .layers.kv_cache import HostRows
from .model_info import DEFAULT_CTX, check_ctx, default_ctx, human_bytes
from .models import arch_of
from .models.arch import Arch, WeightReader
from .models.moe_decoder import load_in_memory_experts
from .options import LoadOptions, OffloadOptions
from .sampling import SamplingParams
from .speculative_prices import price_memory, setup_of
from .chat.tokenizer import Tokenizer

__all__ = ["DEFAULT_CTX", "load", "parse_device", "parse_dtype"]
_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}

# (stage, done, total) -> None; stage is "dense" or "experts"
Progress = Callable[[str, int, int], None]


def parse_dtype(value: str | torch.dtype | None, config: ModelConfig) -> torch.dtype:
    """The compute dtype: the given one, else the checkpoint's (fp8 checkpoints compute in bf16)."""
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise LocalGLMError(f"dtype {value} is not supported; use bfloat16, float16 or float32")
        return value
    name = value if value is not None else config.torch_dtype
    dtype = _DTYPES.get(str(name).lower().replace("torch.", ""))
    if dtype is None:
        if value is None:
            return torch.bfloat16  # e.g. an fp8 checkpoint's "float8_e4m3fn"
        raise LocalGLMError(f"dtype {value!r} is not supported; use bfloat16, float16 or float32")
    return dtype


def parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LocalGLMError(f"device {device!r} is not a valid device (use 'cpu' or 'cuda')") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LocalGLMError("device 'cuda' was asked for, but this torch build sees no CUDA GPU")
    if dev.type not in ("cpu", "cuda"):
        raise LocalGLMError(f"device {device!r} is not supported (use 'cpu' or 'cuda')")
    return dev


def _available_ram() -> int:
    """RAM the experts may take before it is better to leave them mapped (available minus the planner's margin)."""
    from offload.planner import default_cpu_mem

    return default_cpu_mem()


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    *,
    ctx: int | None = None,
    progress: Progress | None = None,
    options: LoadOptions | None = None,
    **kwargs: Any,
) -> Model:
    """Load a GLM checkpoint (Hugging Face directory, localglm quantized directory or GGUF file) and
    return a `Model`.

    `ctx` is the KV-cache size in tokens (default min(4096, the model's maximum); more than the
    model's max_position_embeddings, or more than the memory available for the cache, is refused
    before anything is allocated). The other
    options come as a `LoadOptions` or as keywords (localglm/options.py): quantize while loading
    (`experts_bits=4`, `attn_bits=8`, ..., `save_quantized=DIR`), offloading (`offload="cuda"|"sim"`,
    `gpu_mem`, `cpu_mem`, `cache_policy`, `prefetch`, `trace`, ...), and `mmap` (a localglm quantized
    directory: True leaves the routed experts in their mapped files (nothing copied; the OS pages them
    in as used, so a model bigger than RAM runs), False copies them into RAM, None (default) maps
    them when offloading or when they exceed the available RAM).

    This is the composition root: it reads the config, the always-used weights and the routed
    experts, builds the expert backend the options ask for (in RAM, quantized, offloaded behind a
    device cache, traced), and only then the architecture's model around it.
    """
    from .checkpoint.quantized_dir import QuantizedSource, is_quantized_dir
    from .quantize import gguf_expert_recipe, load_quantized_experts, prepare_quantized, quant_getter, quantize_checkpoint
    from .quantize import matches as quant_matches

    if options is not None and kwargs:
        raise LocalGLMError(f"load: give options= or keyword options ({', '.join(sorted(kwargs))}), not both")
    opts = options or LoadOptions.from_kwargs(**kwargs)
    recipe, offload, mmap = opts.quant.recipe, opts.offload, opts.mmap
    if offload.trace is not None:
        from offload.trace import check_trace_target

        check_trace_target(offload.trace)  # before anything loads
    root = Path(path).expanduser()
    if not root.exists():
        raise LocalGLMError(f"{root}: no such file or directory")
    if opts.quant.save_to is not None:  # quantize to a directory once, then load that (next start is fast)
        saved = opts.quant.save_to
        if not quant_matches(saved, root, recipe or Recipe()):
            quantize_checkpoint(root, saved, recipe, overwrite=True)
        root = saved
        recipe = None
    # A .gguf file (or the first part of a split set) brings config, weights and tokenizer in itself.
    ckpt = GGUFCheckpoint(root) if is_gguf_path(root) else None
    if ckpt is None and not root.is_dir():
        raise LocalGLMError(f"{root}: expected a model directory (config.json + *.safetensors) or a .gguf file")
    config = ckpt.config if ckpt else ModelConfig.from_file(root)
    try:  # before any weight is read: broken tokenizer metadata is refused at once, not after the whole model
        tokenizer = ckpt.tokenizer() if ckpt else (Tokenizer.from_dir(root) if (root / "tokenizer.json").is_file() else None)
    except BaseException:
        if ckpt:
            ckpt.files.close()
        raise
    arch = arch_of(config)
    dev = parse_device(device)
    dt = parse_dtype(dtype, config)
    ctx = ctx if ctx is not None else default_ctx(config)  # 0 is refused below, as everywhere, not read as 'default'
    check_ctx(config, ctx, str(root))
    if not offload.offloaded:  # offloading plans the KV cache with everything else (and may keep it in RAM)
        _check_kv_budget(config, ctx, dev, dt)

    quantized_dir = ckpt is None and is_quantized_dir(root)
    if mmap and not (quantized_dir and recipe is None):
        raise LocalGLMError(
            f"{root}: mmap keeps routed experts in their files as stored, which needs a localglm quantized directory "
            f"loaded as it is (make one with `localglm quantize {root} OUT`)"
        )
    # Offloaded experts live in host RAM (the backend moves them to the device itself).
    expert_dev = torch.device("cpu") if offload.offloaded else dev
    if quantized_dir:
        source = QuantizedSource(root, verify=opts.verify)
        if mmap is None and expert_dev.type == "cpu":
            mmap = offload.offloaded or source.expert_bytes() > _available_ram()
    else:
        source = ckpt.source() if ckpt else SafetensorsSource(root, quantization_config=config.quantization_config)
        if ckpt is not None:
            check_gguf_tensors_used(config, source)
    if recipe is not None and not quantized_dir:  # a choice this checkpoint has nothing for: said, not refused
        for why in recipe.unmatched(source.names(), arch.schema.classifier(config.num_hidden_layers)):
            warnings.warn(f"{root}: {why}", stacklevel=2)
    if ckpt is not None and recipe is None:  # K-quant experts that RAM cannot hold as floats: re-quantize them
        auto = gguf_expert_recipe(source, config, dt, _available_ram())
        if auto is not None:
            recipe, why = auto
            warnings.warn(why, stacklevel=2)
    dense_bits: dict[str, int] | None = None
    mtp_on = _wants_mtp(config, source, opts, root)
    config = _held_mtp_count(config, source)
    if offload.offloaded:  # the plan sizes the device: it may choose the always-used weights' precision (and leave MTP out)
        recipe, dense_bits, mtp_on = _planned_recipe(config, source, recipe, opts.quant.given, quantized_dir, dt, ctx, offload, mtp_on, opts.mtp is None)
    n_dense = config.num_hidden_layers
    loaded = 0

    def read(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = source.get(name, dtype=dtype, expected_shape=shape)
        info = source.info(name)
        # An unconverted tensor is a read-only view of the mapped file, gone when the source closes.
        aliased = info.scale is None and info.stored_dtype == t.dtype
        return t.to(dev, copy=aliased)

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return read(name, shape, dt)

    # QuantTensors for quantized classes, and a GGUF's K-quant (etc.) tensors as stored (quantize.quant_getter)
    takes_quant = quantized_dir or recipe is not None or ckpt is not None
    if takes_quant:
        get = quant_getter(source, recipe, get, dev, dt, arch.schema.classifier(config.num_hidden_layers))  # noqa: F811

    def get_fp32(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return read(name, shape, torch.float32)

    def tick_dense(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        nonlocal loaded
        t = get(name, shape)
        if progress and name.endswith("input_layernorm.weight"):
            loaded += 1
            progress("dense", loaded, n_dense)
        return t

    with source:
        weights = arch.model.load_weights(config, WeightReader(tick_dense, get_fp32, source.__contains__))
        if takes_quant:
            prepare_quantized(weights)
        source.release_pages()
        moe_total = config.num_moe_layers

        def layer_done(i: int) -> None:
            source.release_pages()
            if progress:
                progress("experts", i - config.first_k_dense_replace + 1, moe_total)

        # Offloaded experts are read into host RAM; the backend moves them to the device itself.
        get_experts = (lambda n, s: source.get(n, dtype=dt, expected_shape=s)) if offload.offloaded else get
        experts = None
        if quantized_dir or recipe is not None or ckpt is not None:  # a GGUF's Q8_0 experts stay packed
            experts = load_quantized_experts(config, source, recipe, dt, expert_dev, layer_done, keep_blobs=offload.offloaded, mapped=bool(mmap))
        if experts is None:
            experts = load_in_memory_experts(config, get_experts, layer_done)
        mtp = _load_mtp(arch, config, weights, source, WeightReader(get, get_fp32, source.__contains__), recipe, dt, dev, bool(takes_quant), opts, root, bool(mmap)) if mtp_on else None
        mtp_place = _mtp_placement(config, source, recipe, quantized_dir, dt) if mtp is not None and offload.offloaded else None
    experts = _expert_backend(config, arch, weights, experts, dev, dt, root, ctx, offload, dense_bits, mtp, mtp_place)
    net = arch.model.build(config, weights, experts, dev, _kv_host(experts))
    prices = price_memory(root, repr(config), dt, dev, _speed_options(opts)) if mtp is not None else None
    setup = f"{setup_of(root, repr(config), dt, dev, _numerics_options(opts))} | files {_files_digest(root)}"
    return Model(
        root, config, net, tokenizer, ctx=ctx, sampling=_sampling_defaults(root, ckpt), mtp=mtp, draft=opts.draft, draft_fixed=opts.draft_fixed, prices=prices, setup=setup,
    )  # fmt: skip


def check_tensors(cfg: ModelConfig, source: Any) -> set[str]:
    """Raise the loader's one-line error for a tensor `load` would find missing, of the wrong shape or not float in
    `source`, reading nothing: a dry run of its reads (main weights, routed experts, and the MTP block
    where the checkpoint holds one, as load reads it by default) onto the meta device. `quantize` streams
    whatever tensors SRC holds, so without this a checkpoint lacking an expert or lm_head became an
    output that failed only when loaded. Returns the names it would read."""
    from .models.mtp import has_mtp_weights, load_mtp_head

    arch = arch_of(cfg)
    read: set[str] = set()

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        check_expected_shape(source.info(name), shape)
        check_float(source.info(name))
        read.add(name)
        return torch.empty(shape, device="meta")

    reader = WeightReader(get, get, source.__contains__)
    weights = arch.model.load_weights(cfg, reader)
    load_in_memory_experts(cfg, get)
    if has_mtp_weights(cfg, source.__contains__):
        load_mtp_head(arch, cfg, reader, weights, lambda block_cfg, block, r: load_in_memory_experts(block_cfg, r.get), torch.device("meta"))
    return read


def check_gguf_tensors_used(cfg: ModelConfig, source: Any) -> None:
    """Refuse a GGUF holding tensors the model its metadata describes never reads, as llama.cpp does ("wrong
    number of tensors"): without `expert_shared_count` the shared experts' weights were ignored, without
    `nextn_predict_layers` the MTP block ran as one more decoder layer, each a different model without a word."""
    names = source.unmapped() + [source.info(n).gguf_name for n in sorted(set(source.names()) - check_tensors(cfg, source))]
    # Left alone by design: MTP blocks past the first (one drafts; GLM checkpoints ship one), and an indexer a file
    # keeps in a layer that reuses the previous layer's selection (GLM-5.2's IndexShare: transformers builds none there)
    spare = tuple(f"blk.{b}." for b in range(cfg.num_hidden_layers + 1, cfg.num_hidden_layers + cfg.num_nextn_predict_layers))
    spare += tuple(f"blk.{i}.indexer." for i, kind in enumerate(getattr(cfg, "indexer_types", ())) if kind == "shared")
    names = [n for n in names if not n.startswith(spare)] if spare else names
    block = cfg.num_hidden_layers
    if names and cfg.num_nextn_predict_layers and all(n.startswith(f"blk.{block}.") for n in names):
        from .models.mtp import REQUIRED

        lacking = [t for t in REQUIRED if f"model.layers.{block}.{t}.weight" not in source]
        raise LocalGLMError(f"{source.files.where}: its MTP block (blk.{block}) is incomplete: no {', '.join(lacking)} (convert it again, or with --no-mtp)")
    if names:
        first, n = ", ".join(list(dict.fromkeys(names))[:3]), len(set(names))
        raise LocalGLMError(
            f"{source.files.where}: {n} of its tensors {'is' if n == 1 else 'are'} not part of the model its metadata describes ({first}{', ...' if n > 3 else ''}); "
            "a key such as expert_shared_count or nextn_predict_layers is missing or wrong (llama.cpp refuses it too)"
        )


def _load_mtp(
    arch: Arch, cfg: ModelConfig, weights: Any, source: Any, reader: WeightReader, recipe: Recipe | None, dt: torch.dtype,
    dev: torch.device, quantized: bool, opts: LoadOptions, root: Path, mapped: bool = False,
) -> Any:
    """The MTP draft head (models/mtp.py). Its routed experts are quantized blobs or GGUF blocks as
    stored where the main ones are (the recipe's "mtp" class, 8 bits by default), else floats: on the
    compute device, or when offloading in host RAM as layer N (mapped where the main ones are), for
    `_expert_backend` to put behind the offload cache with the main experts."""
    from . import draft_vocab
    from .checkpoint.quantized_dir import QuantizedSource
    from .layers.experts import InMemoryExperts, LayerOffset
    from .models.mtp import block_reader, load_mtp_head
    from .quantize import load_quantized_experts, prepare_quantized

    offloaded = opts.offload.offloaded

    def experts(block_cfg: ModelConfig, block: int, r: WeightReader) -> Any:
        float_in_dir = isinstance(source, QuantizedSource) and bool(source.layouts) and block not in source.layouts
        if quantized and not float_in_dir:
            edev = torch.device("cpu") if offloaded else dev
            q = load_quantized_experts(cfg, source, recipe, dt, edev, layers=[block], cls="mtp", keep_blobs=offloaded, mapped=mapped)
            if q is not None:
                return LayerOffset(q, block)
        if not offloaded:
            return load_in_memory_experts(block_cfg, r.get)
        host = (lambda n, s: source.get(n, dtype=dt, expected_shape=s))  # noqa: E731
        got = load_in_memory_experts(block_cfg, block_reader(WeightReader(host, host, source.__contains__), block, weights).get)
        return LayerOffset(InMemoryExperts({block: got.gate_up[0]}, {block: got.down[0]}), block)

    head = load_mtp_head(arch, cfg, reader, weights, experts, dev)
    if quantized:
        prepare_quantized(head.w)
    vocab = draft_vocab.choose(root, cfg.vocab_size, opts.draft_vocab)
    head.set_vocab(vocab if head.rows_separable or opts.draft_vocab is not None else None)  # by default a quantized head drafts whole
    return head


def _numerics_options(opts: LoadOptions) -> LoadOptions:
    """The load options the model's numbers depend on (the setup saved prompts are kept for): without how
    much is drafted, which does not change a cache row."""
    return replace(_speed_options(opts), mtp=None, draft=0, draft_vocab=None, draft_fixed=False)


def _files_digest(root: Path) -> str:
    """The weight files by name, size and modification time: a changed or re-quantized model is another setup."""
    root = Path(root).expanduser().resolve()
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.suffix in _WEIGHT_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )  # fmt: skip
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root) if f != root else f.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


_WEIGHT_SUFFIXES = frozenset({".safetensors", ".gguf", ".bin", ".pt"})  # the config is in the setup by value


def _speed_options(opts: LoadOptions) -> LoadOptions:
    """The load options a decoding step's speed depends on (the speculative prices' setup): without
    where files are written or whether shards were checked."""
    return replace(opts, verify=True, draft_fixed=False, quant=replace(opts.quant, save_to=None), offload=replace(opts.offload, stats_path=None, trace=None))


def _wants_mtp(cfg: ModelConfig, source: Any, opts: LoadOptions, root: Path) -> bool:
    """Whether to load the MTP draft head: asked for (`mtp=True`: a checkpoint without one is an error),
    or by default where the checkpoint has one (an offload plan may still leave it out: `_planned_recipe`)."""
    from .models.mtp import has_mtp_weights

    if opts.mtp is False:
        return False
    if not has_mtp_weights(cfg, source.__contains__):
        if opts.mtp:
            raise LocalGLMError(
                f"{root}: no MTP block to draft with (num_nextn_predict_layers is {cfg.num_nextn_predict_layers}"
                + (", and its tensors are missing: converted with --no-mtp?)" if cfg.num_nextn_predict_layers else ")")
            )
        return False
    return True


def _held_mtp_count(cfg: ModelConfig, source: Any) -> ModelConfig:
    """`cfg` with num_nextn_predict_layers the number of MTP blocks `source` holds: a config.json claiming
    more (GLM checkpoints ship one block) still loads, and the model reports the count it has."""
    from .models.mtp import mtp_blocks_held

    held = mtp_blocks_held(cfg, source.__contains__)
    return cfg if held == cfg.num_nextn_predict_layers else replace(cfg, num_nextn_predict_layers=held)


def _mtp_placement(cfg: ModelConfig, source: Any, recipe: Recipe | None, quantized_dir: bool, dt: torch.dtype) -> Any:
    """What the offload plan places for the MTP block (planner.MtpPlacement): its always-used weights'
    bits and its routed experts' (the recipe's or the directory's "mtp" class; floats without either),
    and whether it holds its own embedding and head."""
    from offload.planner import MtpPlacement

    block = cfg.num_hidden_layers
    float_bits = torch.tensor([], dtype=dt).element_size() * 8
    held = source.recipe if quantized_dir and recipe is None else recipe
    bits = held.bits["mtp"] if held is not None and held.bits["mtp"] != KEEP else 16
    if quantized_dir and recipe is None and block in source.layouts:
        expert_bits = source.layouts[block].nbytes * 8 / (3 * cfg.hidden_size * cfg.moe_intermediate_size)
    else:
        expert_bits = float(bits if bits != 16 else float_bits)
    p = f"model.layers.{block}"
    return MtpPlacement(bits, expert_bits, source.__contains__(f"{p}.embed_tokens.weight"), source.__contains__(f"{p}.shared_head.head.weight"))


def _kv_host(experts: ExpertBackend) -> HostRows | None:
    """Where the plan put the KV cache: its latent rows in host RAM, brought over through the offload
    device (pinned on CUDA), when the plan chose so (GLM-5's DSA at long context); else None."""
    plan = getattr(experts, "plan", None)
    if plan is None or not plan.kv_in_ram:
        return None
    device = experts.device  # type: ignore[attr-defined]
    return HostRows(fetch=device.fetch, host_buffer=device.host_buffer)


def _check_kv_budget(cfg: ModelConfig, ctx: int, dev: torch.device, dt: torch.dtype) -> None:
    """Refuse a context whose KV cache alone is more than the memory available for it, before the first
    generation tries to allocate it (`--ctx 1000000000` asks a GLM-4.5-Air for 192 GB)."""
    per_token = arch_of(cfg).sizes.kv_bytes_per_token(cfg, torch.tensor([], dtype=dt).element_size())
    need = per_token * ctx
    if dev.type == "cuda":
        free, where = torch.cuda.mem_get_info(dev)[0], "free GPU memory"
    else:
        from offload.planner import available_ram

        free, where = available_ram(), "available RAM"
    if need > free:
        fit = free // max(1, per_token)
        raise LocalGLMError(
            f"--ctx {ctx} needs {human_bytes(need)} of KV cache, more than the {human_bytes(free)} of {where}; "
            + (f"lower --ctx (about {fit} tokens fit)" if fit >= 2 else "there is no memory for any context")
        )


def _sampling_defaults(root: Path, ckpt: GGUFCheckpoint | None = None) -> SamplingParams:
    """The checkpoint's sampling defaults: its generation_config.json, or a GGUF's general.sampling.* (as llama.cpp
    applies them); the built-in ones, with a one-line warning, when they are garbage (a broken optional file
    should not stop a model from loading)."""
    path = root / "generation_config.json"
    if ckpt is not None:
        raw: Any = ckpt.generation_config()
        problem = _generation_config_problem(raw)
    elif not path.is_file():
        return SamplingParams()
    else:
        try:
            raw = load_json(path)
        except LocalGLMError as exc:
            raw, problem = None, str(exc).removeprefix(f"{path}: ")
        else:
            problem = _generation_config_problem(raw)
    if problem:
        where = path if ckpt is None else f"{root}: general.sampling"
        warnings.warn(f"{where}: {problem}; using the default sampling settings", stacklevel=3)
        return SamplingParams()
    return SamplingParams.from_generation_dict(raw)


def _generation_config_problem(raw: Any) -> str:
    """What is wrong with a parsed generation_config.json for sampling ('' when nothing)."""
    if not isinstance(raw, dict):
        return "not a JSON object"
    if "do_sample" in raw and not isinstance(raw["do_sample"], bool):
        return f"field 'do_sample' must be true or false, got {raw['do_sample']!r}"
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
        value = raw.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"field {name!r} must be a number, got {value!r}"
        try:
            SamplingParams().updated(**{name: value})
        except LocalGLMError:
            return f"field {name!r} is out of range, got {value!r}"
    return ""


def _planned_recipe(
    cfg: ModelConfig, source: Any, recipe: Recipe | None, given: frozenset[str], quantized_dir: bool, dt: torch.dtype, ctx: int, opts: OffloadOptions,
    mtp: bool = False, mtp_optional: bool = True,
) -> tuple[Recipe | None, dict[str, int], bool]:
    """The recipe to load an offloaded model with, the always-used weights' bits (class -> bits,
    16 = the compute dtype) and whether the MTP block is loaded: what the user gave or the checkpoint
    stores is kept; the other classes get the planner's choice (the most precise that fits the device
    budget next to the KV cache, the MTP block where `mtp`, and a minimal expert cache), on the
    simulated device only when no recipe was given at all. A budget nothing fits is the planner's
    one-line error; one that fits only without the MTP block leaves it out with a warning where it
    was not asked for (`mtp_optional`)."""
    from offload.planner import DENSE_CLASSES, default_gpu_mem, plan_with_mtp, precision_note

    if quantized_dir and recipe is None:  # a quantized directory's classes are as its manifest says
        fixed = {c: source.recipe.bits[c] for c in DENSE_CLASSES}
        main = [lay for layer, lay in source.layouts.items() if layer < cfg.num_hidden_layers]  # not the MTP block's (8 bits)
        formats = {(lay.gate_up, lay.down) for lay in main}
        one = next(iter(formats)) if len(formats) == 1 else None
        if one is not None and one[0] == one[1] and not one[0].raw_blocks:  # one of localglm's formats: the planner knows its GPU kernel
            expert_bits: float = one[0].bits
        else:  # GGUF blocks or a mix: their stored bits per weight
            expert_bits = max(lay.nbytes for lay in main) * 8 / (3 * cfg.hidden_size * cfg.moe_intermediate_size) if main else 16
    else:
        # On a real GPU the classes the user left unset are the planner's; the simulated device keeps the
        # recipe's defaults (its budgets are toy numbers for exercising the cache, not a card to fit).
        keep = given if opts.kind == "cuda" else set(DENSE_CLASSES)
        fixed = {c: recipe.bits[c] for c in DENSE_CLASSES if c in keep} if recipe is not None else {}
        expert_bits = recipe.bits["experts"] if recipe is not None else KEEP
    float_bits = torch.tensor([], dtype=dt).element_size() * 8
    gpu = opts.gpu_mem if opts.gpu_mem is not None or opts.kind == "sim" else default_gpu_mem()
    if gpu is None:  # sim without a budget: the backend's error names it
        return recipe, {c: 16 for c in DENSE_CLASSES}, mtp
    bits = expert_bits if expert_bits != KEEP else float(float_bits)
    place = _mtp_placement(cfg, source, recipe, quantized_dir, dt) if mtp else None
    plan = plan_with_mtp(cfg, gpu, opts.cpu_mem, ctx, bits, opts.bandwidths, fixed=fixed, float_bits=float_bits, mtp=place, required=not mtp_optional)
    if plan.mtp_left_out:
        warnings.warn(f"offloading: speculative drafts (MTP) off: {plan.mtp_left_out}", stacklevel=3)
    mtp = plan.mtp_layer is not None
    if recipe is None and all(plan.dense_bits[c] == KEEP for c in DENSE_CLASSES):
        return None, plan.dense_bits, mtp
    if plan.chosen:
        lowered = f"; the MTP block takes the room: --no-mtp gives {plan.mtp_lowered}" if plan.mtp_lowered else ""
        warnings.warn(f"offloading: always-used weights at {precision_note(plan.dense_bits, plan.chosen)}{lowered}", stacklevel=3)
    base = recipe.bits if recipe is not None else {"experts": KEEP}
    return Recipe(dict(base) | plan.dense_bits, list(recipe.overrides) if recipe is not None else []), plan.dense_bits, mtp


def _expert_backend(
    cfg: ModelConfig, arch: Arch, weights: Any, experts: ExpertBackend, dev: torch.device, dt: torch.dtype, root: Path, ctx: int,
    opts: OffloadOptions, dense_bits: dict[str, int] | None, mtp: Any = None, mtp_place: Any = None,
) -> ExpertBackend:
    """The backend the model is built with: the loaded experts as they are, behind the offloading
    cache (the placement plan sizes it), and/or behind a routing tracer. Offloaded, an MTP head's
    experts (loaded in host RAM as layer N) join the backend as one more MoE layer, and the head then
    runs them through it (`mtp_place`: its planner.MtpPlacement)."""
    if opts.offloaded:
        from offload.backend import MtpExperts, build_offloaded_experts

        extra = None
        if mtp is not None:
            p = mtp_place
            extra = MtpExperts(mtp.layer, mtp.block.experts.inner, mtp.block, p.bits, p.own_embed, p.own_head)
        backend = build_offloaded_experts(cfg, experts, arch.model.routing(cfg, weights), dev, dt, root, ctx, opts, dense_bits, extra)
        if mtp is not None:
            mtp.block.experts.inner = backend  # the LayerOffset _load_mtp made: the block's layer 0 is the backend's layer N
        return backend
    if opts.trace is not None:
        from offload.trace import tracing_experts

        return tracing_experts(experts, cfg, arch.model.routing(cfg, weights), dt, str(root), opts.trace)
    return experts
