"""`localglm quantize` on several threads writes the bytes one thread writes, and a run whose stderr
is not a terminal (nohup, CI) says how far it got and about how long is left."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from localglm.commands import progress as progress_mod
from localglm.commands.progress import LineProgress
from localglm.quantize import quantize_checkpoint
from quant.blob import ExpertBlobLayout, quantize_expert
from quant.formats import QuantSpec, QuantTensor
from quant.recipe import Recipe


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(300, 512), (100, 96), (3, 64)])
def test_quantizing_on_a_pool_gives_the_same_bytes(bits: int, shape: tuple[int, int]) -> None:
    """Rows are quantized independently: any split into chunks, on any thread, gives the same buffer."""
    torch.manual_seed(bits)
    w = (torch.randn(*shape) * 0.02).bfloat16()
    one = QuantTensor.quantize(w, QuantSpec.for_bits(bits)).buf
    with ThreadPoolExecutor(3) as pool:
        assert torch.equal(QuantTensor.quantize(w, QuantSpec.for_bits(bits), pool=pool).buf, one)
    assert torch.equal(QuantTensor.quantize(w, QuantSpec.for_bits(bits), chunk_rows=7).buf, one)
    lay = ExpertBlobLayout(64, 32, QuantSpec.for_bits(bits), QuantSpec.for_bits(bits))
    g, u, d = torch.randn(32, 64), torch.randn(32, 64), torch.randn(64, 32)
    with ThreadPoolExecutor(2) as pool:
        assert torch.equal(quantize_expert(lay, g, u, d, pool), quantize_expert(lay, g, u, d))


def test_quantize_writes_the_same_tensors_on_any_thread_count(tiny_dir: Path, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(quantize_checkpoint(tiny_dir, tmp_path / f"q{n}", Recipe.from_options({"experts": 2, "attn": 4}, [])).out)
            assert torch.get_num_threads() == n  # the pool hands torch's threads back
    finally:
        torch.set_num_threads(before)

    def tensors(d: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}

    a, b = tensors(outs[0]), tensors(outs[1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_progress_lines_off_a_terminal_say_how_long_is_left(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([110.0, 111.0, 130.0])  # the time of each update; the run started at 100
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    p = LineProgress("quantizing", out, in_bytes=False, every_s=5.0, start=100.0)
    p(25, 100)  # 10 s for a quarter: about 30 s left
    p(26, 100)  # 1 s later: too soon for another line
    p(100, 100)  # the last line always comes, with no estimate
    assert out.getvalue().splitlines() == ["quantizing:  25% (25 of 100, 10.0 s, about 30 s left)", "quantizing: 100% (100 of 100, 30.0 s)"]
