"""GLM checkpoints <-> GGUF (llama.cpp's files): tensors, metadata, tokenizer, both directions.

Out: `export_gguf` writes what llama.cpp's `convert_hf_to_gguf.py` writes for the same checkpoint:
the architecture's GGUF tensor names and metadata keys (its schema, localglm/models/<arch>/gguf.py),
routed experts stacked per layer as `[E, out, in]`, the same per-tensor types (norms, biases,
routers and `exp_probs_b.bias` in F32; everything else in the chosen type, F16 where rows do not
fit the quantization blocks) and the tokenizer as `_set_vocab_glm` sets it (gpt2 BPE, pre `glm4`,
bos `[gMASK]`, eot `<|user|>`, unk `<|endoftext|>`, eom `<|observation|>`, eos/pad from
tokenizer_config.json, merges, chat template). Tensors are read through `SafetensorsSource` one at
a time and streamed out in row chunks (gguf_writer.py).

In: `GGUFSource` presents a GGUF (single or split) of any registered architecture under the Hugging
Face hub names the rest of localglm uses, unstacking expert tensors lazily (one expert's bytes per
`get`) and dequantizing any type gguf-py can (or, `get_quant`, handing a Q8_0 tensor over as our q8
without dequantizing: the loader does so for Q8_0 experts and for Q8_0 tensors a recipe holds at 8
bits); `config_from_gguf` and `tokenizer_from_gguf` rebuild the ModelConfig and the tokenizer
(byte-level BPE with GLM's split regex, special tokens, template), so `localglm.load("model.gguf")`
runs the same code as for a safetensors checkpoint; `localglm quantize FILE.gguf` writes the same as
files (`hf_config_from_gguf` -> config.json, `Tokenizer.save`).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch
from gguf import GGMLQuantizationType as QT

from quant.formats import QuantSpec, QuantTensor
from quant.gguf_packed import PACKED_SPECS, gguf_to_quant

from ..config import ModelConfig
from ..errors import CheckpointError, LocalGLMError, TokenizerError
from ..models import arch_of
from ..models.arch import GGUFSchema
from ..models.moe_gguf import GGUFMetadata, JoinedTensor, SplitPart
from ..models.mtp import mtp_blocks_held
from ..chat.tiny_tokenizer import GLM_SPLIT_PATTERN
from ..chat.tokenizer import Tokenizer
from .gguf_file import PLAIN_TYPES, SUPPORTED_TYPES, GGUFModelFiles, type_name
from .gguf_config import arch_of_gguf, config_from_gguf, hf_config_from_gguf  # noqa: F401  (re-exported)
from .gguf_out_types import OUT_TYPES
from .gguf_writer import GGUFStreamWriter, fits_type
from .kinds import is_gguf_path  # noqa: F401  (re-exported: the loader and quantize ask here)
from .source import MappedSource, SafetensorsSource, TensorInfo, check_expected_shape
from .writing import refuse_odd_target, writing

# Pre-tokenizer names llama.cpp maps to GLM's split regex (LLAMA_VOCAB_PRE_TYPE_CHATGLM4).
GLM_PRE_NAMES = ("glm4", "chatglm-bpe", "glm5")
CHUNK_ELEMENTS = 1 << 22  # rows per streamed chunk are chosen so a float32 chunk stays near 16 MB

_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def tensor_type(name: str, shape: tuple[int, ...], want: QT) -> QT:
    """The GGUF type of tensor `name`: what convert_hf_to_gguf.py picks, plus llama-quantize's output rule."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return QT.F32
    if not name.endswith(".weight") or name.endswith(("ffn_gate_inp.weight", "indexer.proj.weight")):  # routers stay F32
        return QT.F32
    if want == QT.Q4_0 and name == "output.weight":
        want = QT.Q8_0  # llama-quantize keeps the output head at higher precision (Q6_K there; gguf-py cannot write Q6_K)
    if want in (QT.F32, QT.F16, QT.BF16) or fits_type(shape, want):
        return want
    return QT.F16  # the converter's fallback when rows do not split into blocks


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


# (done_bytes, total_bytes, tensor_name) -> None
ExportProgress = Callable[[int, int, str], None]


@dataclass
class _Group:
    """One output tensor and the hub tensors that make it (several for stacked experts)."""

    gguf: str
    parts: list[str]
    split: SplitPart | None = None  # the part of its one hub tensor this output is (e.g. MLA's attn_k_b)


def _plan_groups(names: list[str], cfg: ModelConfig, schema: GGUFSchema, n_blocks: int, mtp: bool) -> list[_Group]:
    groups: dict[str, _Group] = {}
    experts: dict[str, dict[int, str]] = {}
    for hub in names:
        m = _LAYER_RE.match(hub)
        if m and int(m[1]) >= cfg.num_hidden_layers and not mtp:
            continue  # an MTP layer, dropped
        if m and int(m[1]) >= n_blocks:
            raise CheckpointError(
                f"tensor {hub}: layer {m[1]} is beyond the {n_blocks} blocks to write ({cfg.num_hidden_layers} layers + "
                f"{n_blocks - cfg.num_hidden_layers} MTP, of the {cfg.num_nextn_predict_layers} config.json declares)"
            )
        split = schema.split(hub, cfg, n_blocks)
        if split is not None:
            for part in split:
                groups[part.gguf] = _Group(part.gguf, [hub], part)
            continue
        new, index = schema.gguf_name(hub, n_blocks)
        if index is None:
            if new in groups:
                raise CheckpointError(f"tensors {groups[new].parts[0]} and {hub} both map to {new}")
            groups[new] = _Group(new, [hub])
        else:
            experts.setdefault(new, {})[index] = hub
            groups.setdefault(new, _Group(new, []))
    for new, members in experts.items():
        if sorted(members) != list(range(cfg.n_routed_experts)):
            missing = sorted(set(range(cfg.n_routed_experts)) - set(members))
            raise CheckpointError(f"{new}: the checkpoint lacks expert(s) {missing[:8]} of {cfg.n_routed_experts}")
        groups[new].parts = [members[e] for e in range(cfg.n_routed_experts)]

    def order(g: _Group) -> tuple[int, int, str]:
        if g.gguf == "token_embd.weight":
            return (0, 0, "")
        m = re.match(r"^blk\.(\d+)\.", g.gguf)
        return (1, int(m[1]), g.gguf) if m else (2, 0, g.gguf)

    return sorted(groups.values(), key=order)


def _row_chunks(source: SafetensorsSource, names: list[str], split: SplitPart | None = None) -> Callable[[], Iterator[torch.Tensor]]:
    def produce() -> Iterator[torch.Tensor]:
        for name in names:
            source.release_pages()  # pages earlier tensors touched need not stay in this process's RSS
            t = source.get(name) if split is None else split.take(source.get(name))
            if t.dim() <= 1:
                yield t.reshape(1, -1) if t.dim() == 1 else t.reshape(1, 1)
                continue
            flat = t.reshape(-1, t.shape[-1])
            step = max(1, CHUNK_ELEMENTS // max(1, t.shape[-1]))
            for r in range(0, flat.shape[0], step):
                yield flat[r : r + step]

    return produce


def _gguf_vocab(src: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types in id order, as the converter's get_vocab_base builds them."""
    import tokenizers

    path = src / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{path}: missing (a GGUF carries the tokenizer, so export needs it)")
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust loader raises plain Exception
        raise TokenizerError(f"{path}: cannot load ({' '.join(str(exc).split())[:200]})") from None
    vocab = tok.get_vocab(with_added_tokens=True)
    if vocab and max(vocab.values()) >= vocab_size:
        raise TokenizerError(f"{path}: token id {max(vocab.values())} is not below config.json vocab_size {vocab_size}")
    added = tok.get_added_tokens_decoder()
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        text = reverse.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            looks_special = (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if added[i].special or looks_special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
    pre = _pre_tokenizer_name(path)
    if pre is None:
        raise TokenizerError(
            f"{path}: the pre-tokenizer is not GLM's split regex, so llama.cpp's 'glm4' pre-tokenizer would "
            "split text differently; refusing to write a GGUF that tokenizes wrongly"
        )
    return tokens, [int(t) for t in types]


def _pre_tokenizer_name(tokenizer_json: Path) -> str | None:
    """'glm4' when tokenizer.json splits with GLM's regex (what the converter's hash check finds)."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    stack = [data.get("pre_tokenizer") or {}]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        stack.extend(node.get("pretokenizers") or [])
        pattern = node.get("pattern")
        if node.get("type") == "Split" and isinstance(pattern, dict) and pattern.get("Regex") == GLM_SPLIT_PATTERN:
            return "glm4"
    return None


def _add_tokenizer(w: gguf.GGUFWriter, src: Path, vocab_size: int) -> None:
    tokens, types = _gguf_vocab(src, vocab_size)
    ids = {t: i for i, t in enumerate(tokens)}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("glm4")
    w.add_token_list(tokens)
    w.add_token_types(types)
    # gguf.SpecialVocab reads tokenizer_config.json, special_tokens_map.json and chat_template.jinja itself and
    # raises bare decode errors; our loader reads the same files first and names the one that is broken.
    Tokenizer.from_dir(src)
    try:
        special = gguf.SpecialVocab(src, load_merges=True)
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise TokenizerError(f"{src}: llama.cpp's gguf package cannot read the tokenizer files ({exc.__class__.__name__}: {str(exc)[:160]})") from None
    # _set_vocab_glm: the first value set for a kind wins, so these only fill what the configs left unset
    for kind, text in (("bos", "[gMASK]"), ("eot", "<|user|>"), ("unk", "<|endoftext|>"), ("eom", "<|observation|>")):
        if text not in ids:
            raise TokenizerError(f"{src / 'tokenizer.json'}: GLM special token {text} is missing")
        special.special_token_ids.setdefault(kind, ids[text])
    special.add_to_gguf(w, quiet=True)


def export_gguf(
    src: str | Path,
    out: str | Path,
    out_type: str = "f16",
    *,
    mtp: bool = True,
    split_max_size: int = 0,
    overwrite: bool = False,
    progress: ExportProgress | None = None,
) -> list[Path]:
    """Write the checkpoint at `src` (HF layout) as llama.cpp's converter would (its architecture's GGUF
    names and keys); returns the file(s).

    `mtp=False` drops the MTP layer(s) (block_count = layers, no nextn key), like the converter's
    --no-mtp. `split_max_size` > 0 splits into `OUT-0000i-of-0000N.gguf` parts of about that many bytes.
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if out_type not in OUT_TYPES:
        raise LocalGLMError(f"export-gguf: type {out_type!r} is not one of {', '.join(OUT_TYPES)}")
    if not src.is_dir():
        raise CheckpointError(f"{src}: expected a model directory (config.json + *.safetensors)")
    from .quantized_dir import is_quantized_dir, read_manifest

    if is_quantized_dir(src):
        made_from = str((read_manifest(src).get("source") or {}).get("path") or "the original checkpoint")
        raise LocalGLMError(f"{src} is a localglm quantized checkpoint; export from the float checkpoint it was made from ({made_from})")
    if out.suffix != ".gguf":
        raise LocalGLMError(f"{out}: the output name must end in .gguf")
    want, ftype = OUT_TYPES[out_type]
    cfg = ModelConfig.from_file(src)
    schema = arch_of(cfg).gguf
    with SafetensorsSource(src, quantization_config=cfg.quantization_config, dequant_dtype=torch.float32) as source:
        # The MTP blocks written, not the count config.json claims (3 where GLM checkpoints ship one): the
        # ones loading counts too. llama.cpp looks for block_count blocks and takes the last nextn_predict_layers as MTP.
        n_mtp = mtp_blocks_held(cfg, source.__contains__) if mtp else 0
        n_blocks = cfg.num_hidden_layers + n_mtp
        groups = _plan_groups(source.names(), cfg, schema, n_blocks, mtp)
        writer = GGUFStreamWriter(out, schema.arch, split_max_size=split_max_size)
        for g in groups:
            first = source.info(g.parts[0])
            shape = (len(g.parts), *first.shape) if len(g.parts) > 1 or _EXPERT_RE.match(g.parts[0]) else first.shape
            if g.split is not None:
                shape = g.split.shape
            for part in g.parts[1:]:
                if source.info(part).shape != first.shape:
                    raise CheckpointError(f"tensor {part} has shape {source.info(part).shape}, {g.parts[0]} has {first.shape}")
            writer.add_tensor(g.gguf, tuple(shape), tensor_type(g.gguf, tuple(shape), want), _row_chunks(source, g.parts, g.split))
        finals = writer.final_paths()
        for p in finals:  # --overwrite replaces an earlier file, never a directory, a device or a link
            refuse_odd_target(p, "file")
        existing = [p for p in finals if p.exists()]
        if existing and not overwrite:
            raise LocalGLMError(f"{existing[0]}: already exists (pass --overwrite to replace it)")
        w = writer.meta
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(src.name)
        total, shared, expert, n_exp = writer.parameter_counts()
        if total > 0:
            w.add_size_label(gguf.size_label(total, shared, expert, n_exp))
        schema.add_hparams(w, cfg, n_blocks, n_mtp, ftype)
        _add_tokenizer(w, src, cfg.vocab_size)
        _add_sampling(w, src)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        with writing(out):  # a full or read-only disk: one line, the temporary parts removed by write()
            out.parent.mkdir(parents=True, exist_ok=True)
            return writer.write(progress)


# --------------------------------------------------------------------------------------------
# Import: config, tokenizer, tensors
# --------------------------------------------------------------------------------------------


def _list_of(value: Any, kind: type) -> bool:
    """Whether GGUF metadata `value` is a list of `kind` (metadata is typed by the file, not by its key)."""
    return isinstance(value, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)


def tokenizer_from_gguf(files: GGUFModelFiles) -> Tokenizer:
    """The checkpoint's tokenizer rebuilt from GGUF tokens/merges: byte-level BPE, GLM split, specials, template."""
    import tokenizers
    from tokenizers import Regex, decoders, models, pre_tokenizers

    meta, where = files.metadata, files.where
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise TokenizerError(f"{where}: tokenizer.ggml.model {model!r} is not supported (GLM GGUFs use 'gpt2' BPE)")
    pre = meta.get("tokenizer.ggml.pre", "glm4")
    if pre not in GLM_PRE_NAMES:
        raise TokenizerError(f"{where}: tokenizer.ggml.pre {pre!r} is not GLM's ({', '.join(GLM_PRE_NAMES)})")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not _list_of(tokens, str) or not tokens:
        raise TokenizerError(f"{where}: GGUF metadata tokenizer.ggml.tokens is missing or not a list of strings")
    if not _list_of(merges, str):
        raise TokenizerError(f"{where}: GGUF metadata tokenizer.ggml.merges is missing or not a list of strings")
    types = meta.get("tokenizer.ggml.token_type") or [int(gguf.TokenType.NORMAL)] * len(tokens)
    if not _list_of(types, int):
        raise TokenizerError(f"{where}: GGUF metadata tokenizer.ggml.token_type is not a list of integers")
    if len(types) != len(tokens):
        raise TokenizerError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = []
    for m in merges:
        cut = m.find(" ", 1)
        if cut < 0:
            raise TokenizerError(f"{where}: tokenizer.ggml.merges entry {m!r} is not 'A B'")
        pairs.append((m[:cut], m[cut + 1 :]))
    # llama.cpp sets ignore_merges for the glm4 pre-tokenizer: a piece that is itself a token is taken whole.
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre != "chatglm-bpe", fuse_unk=False, byte_fallback=False)
    except Exception as exc:  # the Rust side raises plain Exception, e.g. for a merge of a token not in the vocabulary
        raise TokenizerError(f"{where}: tokenizer.ggml.tokens and merges make no BPE tokenizer ({' '.join(str(exc).split())[:200]})") from None
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)
    control = [tokens[i] for i, ty in enumerate(types) if ty == gguf.TokenType.CONTROL]
    user = [tokens[i] for i, ty in enumerate(types) if ty == gguf.TokenType.USER_DEFINED]
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in control])
    if user:
        backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in user])
    config: dict[str, Any] = {}
    # tokenizer_config.json's named tokens, which chat templates see (GLM's names only eos and pad)
    for kind, key in (("eos", "tokenizer.ggml.eos_token_id"), ("pad", "tokenizer.ggml.padding_token_id")):
        tid = meta.get(key)
        if isinstance(tid, int) and 0 <= tid < len(tokens):
            config[f"{kind}_token"] = tokens[tid]
    templates: dict[str, str] = {}
    if isinstance(meta.get("tokenizer.chat_template"), str):
        templates["default"] = meta["tokenizer.chat_template"]
    names = meta.get("tokenizer.chat_templates")
    for name in names if _list_of(names, str) else []:  # like a non-string template above, a malformed list is ignored
        text = meta.get(f"tokenizer.chat_template.{name}")
        if isinstance(text, str):
            templates[name] = text
    return Tokenizer(backend, config=config, chat_templates=templates, source=str(where))


@dataclass(frozen=True)
class GGUFTensorInfo(TensorInfo):
    """TensorInfo of a GGUF-backed tensor; `gguf_name`/`index` locate it (index: expert slice of a stacked tensor)."""

    ggml_type: str = "F32"
    gguf_name: str = ""
    index: int | None = None
    joined: JoinedTensor | None = None  # a hub tensor the file holds as several tensors (e.g. MLA's kv_b)


class GGUFSource(MappedSource):
    """A glm4moe GGUF (single file or split set) as a TensorSource under hub tensor names.

    Stacked expert tensors `blk.N.ffn_{gate,up,down}_exps` appear as
    `model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`; each `get` reads and dequantizes one
    expert's slice. F32/F16/BF16 tensors come back as read-only views of the mapped file when no
    dtype change is asked (clone before writing); quantized ones are dequantized to `dequant_dtype`
    (or the dtype asked). `raw(name)` gives the stored bytes and `info(name).ggml_type` their type;
    `get_quant` takes a Q8_0 tensor as a q8 QuantTensor, a K-quant / Q4_0 / Q5_0 / IQ4_XS tensor as its
    blocks (quant.kquants), without dequantizing (`packed_spec` says which).
    """

    def __init__(
        self, path: str | Path | GGUFModelFiles, *, dequant_dtype: torch.dtype = torch.bfloat16
    ) -> None:
        self.files = self._mapped = path if isinstance(path, GGUFModelFiles) else GGUFModelFiles(path)
        self._where = self.files.where
        self.arch = arch_of_gguf(self.files)
        schema = self.arch.gguf
        self.dequant_dtype = dequant_dtype
        meta = GGUFMetadata(self.files, schema.arch)
        n_blocks = meta.block_count(self.files)
        n_layers = n_blocks - int(meta.opt("nextn_predict_layers", 0) or 0)
        n_experts = int(meta.opt("expert_count", 0) or 0)
        self._infos: dict[str, GGUFTensorInfo] = {}
        for hub in self.arch.schema.hub_names(n_blocks, n_layers, n_experts):
            joined = schema.joined(hub, self.files, n_blocks)
            if joined is not None:
                parts = [self._readable(p) for p in joined.parts]
                self._infos[hub] = GGUFTensorInfo(
                    name=hub, shape=joined.shape, dtype=dequant_dtype, file=parts[0].file, offsets=(parts[0].offset, parts[0].offset),
                    stored_dtype=torch.uint8, ggml_type=parts[0].type_name, gguf_name=joined.parts[0], joined=joined,
                )  # fmt: skip
                continue
            new, index = schema.gguf_name(hub, n_blocks)
            if new not in self.files.tensors:
                continue
            t = self._readable(new)
            shape = t.shape
            begin, nbytes = t.offset, t.nbytes
            if index is not None:
                if len(shape) != 3 or shape[0] != n_experts:
                    raise CheckpointError(f"{t.file}: tensor {new} has shape {list(shape)}, expected [{n_experts}, out, in]")
                shape = shape[1:]
                nbytes //= n_experts
                begin += index * nbytes
            plain = PLAIN_TYPES.get(t.ggml_type)
            self._infos[hub] = GGUFTensorInfo(
                name=hub,
                shape=tuple(shape),
                dtype=plain or dequant_dtype,
                file=t.file,
                offsets=(begin, begin + nbytes),
                stored_dtype=plain or torch.uint8,
                ggml_type=t.type_name,
                gguf_name=new,
                index=index,
            )
        self._infos = dict(sorted(self._infos.items()))

    def unmapped(self) -> list[str]:
        """The file's tensors that no hub name maps to: its metadata does not describe them (loading checks)."""
        used = {i.gguf_name for i in self._infos.values()} | {p for i in self._infos.values() if i.joined is not None for p in i.joined.parts}
        return sorted(set(self.files.tensors) - used)

    def _readable(self, gguf_name: str) -> Any:
        """The file's tensor `gguf_name`, refused in one line when its type is one we cannot read."""
        t = self.files.tensors[gguf_name]
        if t.ggml_type not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"{t.file}: tensor {gguf_name} is stored as {t.type_name}, which localglm cannot read "
                f"(supported: {', '.join(sorted(type_name(x) for x in SUPPORTED_TYPES))})"
            )
        return t

    def get(
        self, name: str, dtype: torch.dtype | None = None, expected_shape: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        info = self.info(name)
        check_expected_shape(info, expected_shape)
        if info.joined is not None:
            parts = [self.files.tensor(p, dtype=torch.float32) for p in info.joined.parts]
            return info.joined.join(parts).to(dtype or info.dtype)
        return self.files.tensor(info.gguf_name, dtype=dtype or info.dtype, index=info.index)

    def raw(self, name: str) -> torch.Tensor:
        """The stored bytes of `name` (one expert's slice for experts), as a read-only uint8 tensor."""
        info = self.info(name)
        if info.joined is not None:
            raise CheckpointError(f"tensor {name} is {len(info.joined.parts)} tensors in {info.file} ({', '.join(info.joined.parts)}); read it with get()")
        arr = self.files.raw(info.gguf_name, info.index)
        with warnings.catch_warnings():
            # a read-only view of the mapped file, by design (see the class docstring)
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            return torch.from_numpy(arr) if arr.size else torch.empty(0, dtype=torch.uint8)

    def packed_spec(self, name: str) -> QuantSpec | None:
        """The QuantSpec `name` is stored in already (a 2-D Q8_0 is q8; Q2_K..Q6_K, Q4_0, Q5_0, IQ4_XS
        are held as their blocks: quant.kquants), or None where it must be dequantized."""
        info = self.info(name)
        return PACKED_SPECS.get(info.ggml_type) if len(info.shape) == 2 and info.joined is None else None

    def get_quant(self, name: str, dtype: torch.dtype | None = None, expected_shape: tuple[int, ...] | None = None,
                  copy: bool = True) -> QuantTensor:
        """A tensor of a type `packed_spec` knows as a QuantTensor, its blocks copied as they are (exact:
        quant.gguf_packed); copy=False leaves block types a read-only view of the mapped file."""
        info = self.info(name)
        check_expected_shape(info, expected_shape)
        if self.packed_spec(name) is None:
            raise CheckpointError(
                f"{info.file}: tensor {info.gguf_name} is {info.ggml_type} {list(info.shape)}; only 2-D tensors of "
                f"{', '.join(PACKED_SPECS)} are taken as stored"
            )
        return gguf_to_quant(self.raw(name), info.ggml_type, (info.shape[0], info.shape[1]), dtype or info.dtype, copy=copy)

    def __repr__(self) -> str:
        return f"GGUFSource({str(self.files.where)!r}, {len(self._infos)} tensors, {len(self.files.files)} files)"


# generation_config.json's sampling fields and the GGUF keys llama.cpp's converter writes them to (and
# llama.cpp applies as its defaults): the checkpoint's recommended sampling travels with the file.
SAMPLING_KEYS = {
    "temperature": "general.sampling.temp",
    "top_k": "general.sampling.top_k",
    "top_p": "general.sampling.top_p",
    "min_p": "general.sampling.min_p",
    "repetition_penalty": "general.sampling.penalty_repeat",
}


def _add_sampling(w: Any, src: Path) -> None:
    """The source's generation_config.json sampling defaults as general.sampling.*, as the converter writes them
    (do_sample false: temperature 0, greedy, as localglm reads the file)."""
    path = src / "generation_config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return  # a broken optional file: loading the checkpoint says so; the GGUF carries no defaults
    if not isinstance(raw, dict):
        return
    values = {k: raw[k] for k in SAMPLING_KEYS if isinstance(raw.get(k), (int, float)) and not isinstance(raw.get(k), bool)}
    if raw.get("do_sample") is False:
        values["temperature"] = 0.0
    for name, value in values.items():
        if name != "top_k":
            w.add_float32(SAMPLING_KEYS[name], float(value))
        elif 0 <= value < 2**32:  # a uint32 in the file; anything else has no value llama.cpp could read
            w.add_uint32(SAMPLING_KEYS[name], int(value))


class GGUFCheckpoint:
    """Everything `localglm.load` needs from one GGUF (single or split): config, tensors, tokenizer."""

    def __init__(self, path: str | Path) -> None:
        self.files = GGUFModelFiles(path)
        try:
            self.config = config_from_gguf(self.files)
        except BaseException:
            self.files.close()
            raise

    def source(self) -> GGUFSource:
        return GGUFSource(self.files)

    def generation_config(self) -> dict[str, Any]:
        """The file's general.sampling.* defaults in generation_config.json's field names (a float32 read back at
        the 7 digits it holds: temp 0.6, not 0.6000000238)."""
        meta = self.files.metadata
        return {name: float(f"{v:.7g}") if isinstance(v, float) else v for name, key in SAMPLING_KEYS.items() if (v := meta.get(key)) is not None}

    def tokenizer(self) -> Tokenizer:
        return tokenizer_from_gguf(self.files)
