"""`localglm.load`: from a checkpoint path to a ready `Model`.

Resolves the path, parses config.json, opens the weights lazily (memory-mapped), reads the
always-used tensors and the routed experts onto the chosen device in the chosen dtype, and loads
the tokenizer and chat template that ship with the checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .engine import Model
from .errors import LocalGLMError
from .checkpoint.gguf import GGUFCheckpoint, is_gguf_path
from .models import arch_of
from .models.arch import WeightReader
from .models.moe_decoder import load_in_memory_experts
from .sampling import SamplingParams
from .checkpoint.source import SafetensorsSource
from .tokenizer import Tokenizer

DEFAULT_CTX = 4096
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
    **options: Any,
) -> Model:
    """Load a GLM checkpoint directory (Hugging Face layout) and return a `Model`.

    `ctx` is the KV-cache size in tokens (default min(4096, the model's maximum)). `mmap` (a
    localglm quantized directory): True leaves the routed experts in their mapped files (nothing
    copied; the OS pages them in as used, so a model bigger than RAM runs), False copies them into
    RAM, None (default) maps them when offloading or when they exceed the available RAM.
    """
    # Expert offloading / routing traces (offload/): gpu_mem, cpu_mem, offload="sim"|"cuda", trace=PATH, ...
    from offload.backend import OFFLOAD_OPTIONS

    offload_opts = {k: options.pop(k) for k in list(options) if k in OFFLOAD_OPTIONS}
    # Quantization (quant/, localglm/quantize.py): experts_bits=4, attn_bits=8, ..., save_quantized=DIR
    from quant.recipe import Recipe

    from .quantize import QUANT_OPTIONS, gguf_expert_recipe, load_quantized_experts, prepare_quantized, quant_getter, quantize_checkpoint, recipe_from_options
    from .quantize import matches as quant_matches
    from .checkpoint.quantized_dir import QuantizedSource, is_quantized_dir

    quant_opts = {k: options.pop(k) for k in list(options) if k in QUANT_OPTIONS}
    recipe = recipe_from_options(quant_opts)
    mmap = options.pop("mmap", None)  # a quantized directory's experts: True mapped, False copied, None auto
    if mmap not in (None, True, False):
        raise LocalGLMError(f"mmap={mmap!r}: use True, False or None (auto)")
    if options:
        raise LocalGLMError(f"load: unknown option(s) {', '.join(sorted(options))}")
    root = Path(path).expanduser()
    if not root.exists():
        raise LocalGLMError(f"{root}: no such file or directory")
    if quant_opts.get("save_quantized"):  # quantize to a directory once, then load that (next start is fast)
        saved = Path(quant_opts["save_quantized"]).expanduser()
        if not quant_matches(saved, root, recipe or Recipe()):
            quantize_checkpoint(root, saved, recipe, overwrite=True)
        root = saved
        recipe = None
    # A .gguf file (or the first part of a split set) brings config, weights and tokenizer in itself.
    ckpt = GGUFCheckpoint(root) if is_gguf_path(root) else None
    if ckpt is None and not root.is_dir():
        raise LocalGLMError(f"{root}: expected a model directory (config.json + *.safetensors) or a .gguf file")
    config = ckpt.config if ckpt else ModelConfig.from_file(root)
    dev = parse_device(device)
    dt = parse_dtype(dtype, config)
    ctx = ctx or min(DEFAULT_CTX, config.max_position_embeddings)
    if ctx < 2:
        raise LocalGLMError(f"ctx must be at least 2 tokens, got {ctx}")

    quantized_dir = ckpt is None and is_quantized_dir(root)
    if mmap and not (quantized_dir and recipe is None):
        raise LocalGLMError(
            f"{root}: mmap keeps routed experts in their files as stored, which needs a localglm quantized directory "
            f"loaded as it is (make one with `localglm quantize {root} OUT`)"
        )
    # Offloaded experts live in host RAM (the backend moves them to the device itself).
    expert_dev = torch.device("cpu") if offload_opts.get("offload") else dev
    if quantized_dir:
        source = QuantizedSource(root)
        if mmap is None and expert_dev.type == "cpu":
            mmap = bool(offload_opts.get("offload")) or source.expert_bytes() > _available_ram()
    else:
        source = ckpt.source() if ckpt else SafetensorsSource(root, quantization_config=config.quantization_config)
    if ckpt is not None and recipe is None:  # K-quant experts that RAM cannot hold as floats: re-quantize them
        auto = gguf_expert_recipe(source, config, dt, _available_ram())
        if auto is not None:
            recipe, why = auto
            warnings.warn(why, stacklevel=2)
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

    if quantized_dir or recipe is not None:
        get = quant_getter(source, recipe, get, dev, dt, arch_of(config).schema.classify)  # noqa: F811 -- QuantTensors for quantized classes

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
        arch = arch_of(config)
        weights = arch.model.load_weights(config, WeightReader(tick_dense, get_fp32, source.__contains__))
        if quantized_dir or recipe is not None:
            prepare_quantized(weights)
        source.release_pages()
        moe_total = config.num_moe_layers

        def layer_done(i: int) -> None:
            source.release_pages()
            if progress:
                progress("experts", i - config.first_k_dense_replace + 1, moe_total)

        # Offloaded experts are read into host RAM; the backend moves them to the device itself.
        get_experts = (lambda n, s: source.get(n, dtype=dt, expected_shape=s)) if offload_opts.get("offload") else get
        experts = None
        if quantized_dir or recipe is not None or ckpt is not None:  # a GGUF's Q8_0 experts stay packed
            experts = load_quantized_experts(config, source, recipe, dt, expert_dev, layer_done, keep_blobs=bool(offload_opts), mapped=bool(mmap))
        if experts is None:
            experts = load_in_memory_experts(config, get_experts, layer_done)
    net = arch.model.build(config, weights, experts, dev)
    if ckpt:
        tokenizer = ckpt.tokenizer()
    else:
        tokenizer = Tokenizer.from_dir(root) if (root / "tokenizer.json").is_file() else None
    model = Model(root, config, net, tokenizer, ctx=ctx, sampling=SamplingParams.from_generation_config(root))
    if offload_opts:
        from offload.backend import apply_offload

        apply_offload(model, root, ctx, **offload_opts)
    return model
