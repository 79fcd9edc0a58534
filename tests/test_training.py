"""The default-model training pipeline on a tiny corpus: loss falls, experts are balanced, checkpoints load."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import localglm
from localglm.training.corpus import Corpus, chat_text, functions_in, request_for, source_files, stdlib_dir
from localglm.training.train import TrainConfig, train

transformers = pytest.importorskip("transformers")

FILES = ("textwrap.py", "bisect.py", "heapq.py", "shlex.py")


def _tiny_corpus() -> Corpus:
    chat, code = [], []
    for name in FILES:
        text = (stdlib_dir() / name).read_text(encoding="utf-8")
        chat.extend(chat_text(e) for e in functions_in(name, text))
        code.append(f"# {name}\n{text}")
    return Corpus(chat[4:], code[1:], chat[:4], code[:1], [])


TINY = TrainConfig(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
    num_key_value_heads=1, head_dim=32, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
    seq_len=32, batch_size=4, steps=16, warmup=2, lr=1e-2, bias_rate=1e-2, max_position_embeddings=256,
)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    root = tmp_path_factory.mktemp("train")
    summary = train(TINY, root / "model", root / "work", corpus=_tiny_corpus(), save_every=1000, eval_windows=2, log=lambda _m: None)
    return summary, root / "model", root / "work"


def test_loss_falls(run) -> None:
    summary, _, _ = run
    hist = summary["loss_history"]
    assert len(hist) == TINY.steps
    assert hist[0] > math.log(TINY.vocab_size) - 1.0
    assert sum(hist[-4:]) / 4 < hist[0] - 1.0, hist


def test_checkpoint_is_hub_layout_and_loads(run) -> None:
    _, model_dir, work = run
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "glm4_moe" and cfg["quantization_config"]["quant_method"] == "fp8"
    index = json.loads((model_dir / "model.safetensors.index.json").read_text()) if (model_dir / "model.safetensors.index.json").exists() else None
    from safetensors import safe_open

    names, bias = set(), None
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            names.update(st.keys())
            if "model.layers.1.mlp.gate.e_score_correction_bias" in st.keys():
                bias = st.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
    assert index is None or set(index["weight_map"]) == names
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in names
    assert "model.layers.1.mlp.experts.7.gate_proj.weight_scale_inv" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names  # first_k_dense_replace = 1
    assert bias is not None and bias.dtype == torch.float32 and bias.abs().max() > 0  # the balancing moved it
    m = localglm.load(model_dir)
    assert m.tokenizer is not None and m.tokenizer.vocab_size == TINY.vocab_size
    assert "<|assistant|>" in m.render_chat([{"role": "user", "content": "hi"}])


def test_float32_checkpoint_matches_transformers(run) -> None:
    _, _, work = run
    ref = work / "checkpoint-float32"
    ids = torch.randint(0, TINY.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    ours = localglm.load(ref, dtype="float32").logits(ids)
    hf = transformers.Glm4MoeForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(ids).logits.float()
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def _training_model(path: Path) -> torch.nn.Module:
    """The training module (transformers + our MTP block) holding the checkpoint at `path`."""
    from localglm.training.train import build_model
    from localglm.training.warm_start import load_into, special_ids

    model = build_model(TINY, special_ids(path / "tokenizer.json"))
    assert load_into(model, path) == []  # every tensor, the MTP block's included, came from the checkpoint
    return model.eval()


def test_mtp_block_is_saved_in_the_hub_layout(run) -> None:
    _, model_dir, _ = run
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1
    from safetensors import safe_open

    names = set()
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            names.update(st.keys())
    n = TINY.num_hidden_layers
    for t in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight", "self_attn.q_proj.weight",
              "mlp.gate.e_score_correction_bias", "mlp.experts.7.down_proj.weight_scale_inv", "mlp.shared_experts.up_proj.weight"):  # fmt: skip
        assert f"model.layers.{n}.{t}" in names, t
    assert not any(name.startswith(f"model.layers.{n + 1}.") for name in names)


@pytest.mark.parametrize("kind", ["float32", "fp8"])
def test_runtime_mtp_logits_equal_the_training_modules(run, kind: str) -> None:
    """What localglm's draft head computes is what the training loss trained (the concat order, the
    pre-norm hidden state, positions, the shared lm_head), on the float32 and the packaged FP8 files."""
    from localglm.training.mtp import PreNormHidden, mtp_logits

    _, model_dir, work = run
    path = work / "checkpoint-float32" if kind == "float32" else model_dir
    trained = _training_model(path)
    ids = torch.randint(0, TINY.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    capture = PreNormHidden(trained)
    with torch.no_grad():
        trained(ids[:, :-1])
        ref = mtp_logits(trained, capture.value, ids[:, 1:])[0].float()
    capture.close()
    ours_model = localglm.load(path, dtype="float32", mtp=True)
    head = ours_model.speculation.head
    with torch.inference_mode():
        h = ours_model.net.residual(ids[:, :-1])
        ours = head.logits(head.forward(h, ids[:, 1:], None, 0))[0]
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_init_from_continues_a_checkpoint_and_adds_the_mtp_block(tmp_path: Path) -> None:
    from localglm.training.warm_start import read_hub_weights

    kw = dict(corpus=_tiny_corpus(), save_every=1000, eval_windows=1, log=lambda _m: None)
    base = TrainConfig(**{**TINY.__dict__, "steps": 3, "mtp_layers": 0})
    train(base, tmp_path / "base", tmp_path / "wbase", **kw)
    assert json.loads((tmp_path / "base" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    cont = TrainConfig(**{**TINY.__dict__, "steps": 1, "lr": 0.0, "warmup": 1})  # lr 0: the weights stay as loaded
    summary = train(cont, tmp_path / "cont", tmp_path / "wcont", init_from=tmp_path / "base", **kw)
    assert (tmp_path / "cont" / "tokenizer.json").read_bytes() == (tmp_path / "base" / "tokenizer.json").read_bytes()
    # the packaged (fp8 / bf16) files it started from, dequantized, against what it saved after a step at lr 0
    before, after = read_hub_weights(tmp_path / "base"), read_hub_weights(tmp_path / "wcont" / "checkpoint-float32")
    n = TINY.num_hidden_layers
    for name, t in before.items():  # the main model continues from the checkpoint (the router biases keep balancing)
        if "e_score_correction_bias" not in name:
            assert torch.equal(after[name], t), name
    # the new block starts as a copy of the last main layer
    assert torch.equal(after[f"model.layers.{n}.self_attn.q_proj.weight"], before[f"model.layers.{n - 1}.self_attn.q_proj.weight"])
    assert torch.equal(after[f"model.layers.{n}.mlp.experts.3.up_proj.weight"], before[f"model.layers.{n - 1}.mlp.experts.3.up_proj.weight"])
    assert torch.equal(after[f"model.layers.{n}.shared_head.norm.weight"], before["model.norm.weight"])
    # ... whose residual branches start at zero and eh_proj = [0 | I]: its first draft is the main model's next-token guess
    assert not after[f"model.layers.{n}.self_attn.o_proj.weight"].any() and not after[f"model.layers.{n}.mlp.experts.3.down_proj.weight"].any()
    h = TINY.hidden_size
    assert torch.equal(after[f"model.layers.{n}.eh_proj.weight"], torch.cat([torch.zeros(h, h), torch.eye(h)], 1))
    assert summary["mtp_loss_history"] and summary["loss_history"][0] < math.log(TINY.vocab_size)


def test_training_is_seeded(tmp_path: Path) -> None:
    cfg = TrainConfig(**{**TINY.__dict__, "steps": 2})
    kw = dict(corpus=_tiny_corpus(), save_every=1000, eval_windows=1, log=lambda _m: None)
    a = train(cfg, tmp_path / "a", tmp_path / "wa", **kw)
    b = train(cfg, tmp_path / "b", tmp_path / "wb", **kw)
    assert a["loss_history"] == b["loss_history"]


def test_requests_read_naturally() -> None:
    forms = {request_for("f", "Return the sum of a and b.", f"k{i}") for i in range(40)}
    assert "Write a function that returns the sum of a and b." in forms
    assert request_for("f", "Apply x.", "k0").count("applies") + request_for("f", "Apply x.", "k0").count("Apply") == 1
    assert all(not rel.startswith(("test/", "site-packages/")) for rel, _ in source_files()[:200])


def test_compute_dtype_sets_the_precision_of_the_forward() -> None:
    from localglm.training.precision import computing_in

    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with computing_in("bfloat16"):
        assert lin(x).dtype == torch.bfloat16
    with computing_in("float32"):
        assert lin(x).dtype == torch.float32
    with pytest.raises(ValueError, match="compute_dtype 'fp16': expected one of float32, bfloat16"):
        computing_in("fp16")


def test_training_in_bfloat16_differs_from_float32_and_still_learns(tmp_path: Path) -> None:
    kw = dict(corpus=_tiny_corpus(), save_every=1000, eval_windows=1, log=lambda _m: None)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = TrainConfig(**{**TINY.__dict__, "steps": 3, "compute_dtype": dtype})
        runs[dtype] = train(cfg, tmp_path / dtype, tmp_path / f"w{dtype}", **kw)["loss_history"]
    f32, b16 = runs["float32"], runs["bfloat16"]
    assert f32 != b16  # the setting reaches the forward
    assert all(math.isfinite(v) for v in b16) and abs(b16[0] - f32[0]) < 0.05 * f32[0]


def test_cli_refuses_an_unknown_compute_dtype(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from localglm.training.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "m"), "--compute-dtype", "fp16"])
    assert exc.value.code == 2
    assert "compute_dtype 'fp16'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("rows", [7, 2500])  # one chunk, and three with a ragged last one
def test_linear_cross_entropy_equals_autograds(rows: int) -> None:
    from localglm.training.losses import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 64, generator=g, requires_grad=True)
    w = (0.3 * torch.randn(300, 64, generator=g)).requires_grad_()
    t = torch.randint(0, 300, (rows,), generator=g)
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, w), t)
    gx, gw = torch.autograd.grad(3 * ref, (x, w))
    out = linear_cross_entropy(x, w, t)
    fx, fw = torch.autograd.grad(3 * out, (x, w))
    assert abs(out.item() - ref.item()) < 1e-6 * ref.item()
    torch.testing.assert_close(fx, gx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fw, gw, rtol=1e-5, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loss of autocast's bf16 logits
        ref16 = torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, w).float(), t)
        out16 = linear_cross_entropy(x, w, t)
    assert abs(out16.item() - ref16.item()) < 1e-6 * ref16.item() and out16.item() != out.item()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "--steps 0: must be a number of at least 1"),
        (["--lr", "nan"], "--lr nan: must be a number of at least 0"),
        (["--batch-size", "0"], "--batch-size 0: must be a number of at least 1"),
        (["--seq-len", "1"], "--seq-len 1: must be a number of at least 2"),
        (["--agent-share", "2"], "--agent-share 2.0: must be between 0 and 1"),
        (["--weights", "fp4"], "--weights 'fp4': expected one of fp8, bfloat16"),
        (["--num-experts-per-tok", "40"], "--num-experts-per-tok 40: more than --n-routed-experts 16"),
        (["--mtp-layers", "3"], "--mtp-layers 3: GLM checkpoints have 0 or 1 MTP block"),
        (["--save-every", "0"], "--save-every 0: must be at least 1"),
        (["--threads", "-1"], "--threads -1: must be at least 1"),
        (["--max-minutes", "nan"], "--max-minutes nan: must be above 0"),
    ],
)  # fmt: skip
def test_train_cli_refuses_settings_that_cannot_train(flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from localglm.training.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "m"), "--work", str(tmp_path / "w"), *flags])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
    assert not (tmp_path / "m").exists() and not (tmp_path / "w").exists()


def test_a_diverging_run_stops_with_a_one_line_error(tmp_path: Path) -> None:
    cfg = TrainConfig(**{**TINY.__dict__, "steps": 6, "lr": 1e30, "warmup": 1})
    with pytest.raises(ValueError, match=r"training: the loss is (nan|inf) at step \d \(diverged\); try a lower --lr"):
        train(cfg, tmp_path / "m", tmp_path / "w", corpus=_tiny_corpus(), save_every=1000, eval_windows=1, log=lambda _m: None)
    assert not (tmp_path / "m").exists()
