"""llama.cpp (llama-cpp-python) as the oracle for our GGUF export: it loads our files and its logits match ours.

Skipped when llama_cpp is not installed (`pip install -e .[bench]`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import localglm
from localglm.checkpoint.gguf import export_gguf

llama_cpp = pytest.importorskip("llama_cpp")

TOKENS = [5, 17, 200, 3, 99, 42, 7, 478, 480, 300, 11, 250, 64]
GGML_TYPE_F32 = 0


def _llama_logits(path: Path, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position; KV cache in f32 so only the weights' type differs from ours."""
    llm = llama_cpp.Llama(
        model_path=str(path), logits_all=True, n_ctx=64, n_batch=64, n_threads=2, verbose=False,
        type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
    )  # fmt: skip
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


@pytest.fixture(scope="module")
def ours(tiny_fp32_dir: Path) -> np.ndarray:
    return localglm.load(tiny_fp32_dir, dtype="float32").logits(torch.tensor([TOKENS]))[0].numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_llama_cpp_logits_match_ours_on_f32_export(tiny_fp32_dir: Path, ours: np.ndarray, tmp_path: Path) -> None:
    out = export_gguf(tiny_fp32_dir, tmp_path / "tiny-f32.gguf", "f32")[0]
    theirs = _llama_logits(out, TOKENS)
    assert _rel(theirs[-1], ours[-1]) < 1e-5  # measured ~5e-7: float rounding only
    assert _rel(theirs, ours) < 1e-5


def test_llama_cpp_tokenizes_like_ours(tiny_fp32_dir: Path, tmp_path: Path) -> None:
    out = export_gguf(tiny_fp32_dir, tmp_path / "tok.gguf", "f32", mtp=False)[0]
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False, vocab_only=True)
    tok = localglm.load(out).tokenizer
    text = "def main(argv):\n    return [x ** 2 for x in range(10)]  # héllo 中文\n<|user|>hi"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_llama_cpp_agrees_with_our_gguf_loader_on_quantized_export(kind: str, tiny_fp32_dir: Path, tmp_path: Path) -> None:
    """Both run the same quantized weights, but llama.cpp also quantizes the activations (to Q8) for its
    matmuls: logits agree to ~2% where both pick the same experts, and a near-tie in the tiny random
    model's router can flip an expert at the odd position (measured: 1 of 13 positions for each type)."""
    out = export_gguf(tiny_fp32_dir, tmp_path / f"tiny-{kind}.gguf", kind)[0]
    mine = localglm.load(out, dtype="float32").logits(torch.tensor([TOKENS]))[0].numpy()
    theirs = _llama_logits(out, TOKENS)
    cos = (theirs * mine).sum(-1) / np.linalg.norm(theirs, axis=-1) / np.linalg.norm(mine, axis=-1)
    assert np.median(cos) > 0.999 and (cos > 0.99).mean() >= 0.75, cos
    close = cos > 0.999
    assert np.abs(theirs - mine)[close].max() / np.abs(mine).max() < 0.05  # measured ~0.025
    assert (theirs.argmax(-1) == mine.argmax(-1)).mean() >= 0.75


def test_llama_cpp_loads_split_and_mtp_less_exports(tiny_fp32_dir: Path, ours: np.ndarray, tmp_path: Path) -> None:
    parts = export_gguf(tiny_fp32_dir, tmp_path / "split.gguf", "f32", split_max_size=300_000)
    assert len(parts) > 1
    assert _rel(_llama_logits(parts[0], TOKENS)[-1], ours[-1]) < 1e-5
    no_mtp = export_gguf(tiny_fp32_dir, tmp_path / "nomtp.gguf", "f32", mtp=False)[0]
    assert _rel(_llama_logits(no_mtp, TOKENS)[-1], ours[-1]) < 1e-5


@pytest.mark.parametrize("ftype", [("Q4_K_M", 15), ("Q2_K", 10)], ids=lambda f: f[0])
def test_we_load_what_llama_quantize_writes(ftype: tuple[str, int], tmp_path: Path) -> None:
    """K-quants from llama.cpp's own quantizer: our dequantized model agrees with llama.cpp on the same file."""
    import ctypes

    from localglm.models.glm4_moe.tiny import TinySpec
    from localglm.tiny import make_tiny

    src = make_tiny(tmp_path / "src", TinySpec(dtype="float32", hidden_size=256, head_dim=64, moe_intermediate_size=256,
                                               intermediate_size=512))  # fmt: skip  (rows of 256 = one K-quant block)
    f32 = export_gguf(src, tmp_path / "f32.gguf", "f32")[0]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype[1], 2
    out = tmp_path / f"{ftype[0]}.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) == 0
    import gguf

    kinds = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert any(k.endswith("_K") for k in kinds), kinds
    mine = localglm.load(out, dtype="float32").logits(torch.tensor([TOKENS]))[0].numpy()
    theirs = _llama_logits(out, TOKENS)
    cos = (theirs * mine).sum(-1) / np.linalg.norm(theirs, axis=-1) / np.linalg.norm(mine, axis=-1)
    assert np.median(cos) > 0.999 and (cos > 0.99).mean() >= 0.75, cos
