"""`localglm eval MODEL --ref REF --text FILE`: how much quantization changed a model.

Prints per-class relative weight error (||W_ref - W_q|| / ||W_ref||, from the tensors themselves),
perplexity of MODEL and REF on the text, and the mean KL(REF || MODEL) of next-token distributions
over every position. MODEL may be a quantized directory, or a float checkpoint quantized on the fly
with the recipe flags (--experts 4 ...; the weight error is then not reported: it reads a quantized
directory's tensors). Without a tokenizer (or with --random-tokens N) fixed
pseudo-random token ids are used: perplexity then means little, KL still does.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from ..errors import LocalGLMError


def register(sub: Any) -> None:
    from .flags import add_recipe_options

    p = sub.add_parser("eval", help="quality report: weight error, perplexity, KL vs a reference", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("model", help="quantized directory (or float checkpoint + recipe flags)")
    p.add_argument("--ref", required=True, help="reference (unquantized) checkpoint directory")
    p.add_argument("--text", default=None, help="text file to score")
    p.add_argument("--random-tokens", type=int, default=None, help="score N pseudo-random token ids instead of text")
    p.add_argument("--ctx", type=int, default=256, help="window length in tokens (default 256)")
    p.add_argument("--max-tokens", type=int, default=2048, help="score at most this many tokens (default 2048)")
    p.add_argument("--no-weights", action="store_true", help="skip the per-class weight error")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (at most the cores)")
    add_recipe_options(p)
    p.set_defaults(func=cmd_eval)


def weight_errors(model_dir: Path, ref_dir: Path) -> dict[str, float]:
    """Per-class relative Frobenius error of a quantized directory's tensors against the reference's."""
    import torch

    from ..checkpoint.quantized_dir import QuantizedSource
    from ..checkpoint.source import SafetensorsSource
    from ..config import ModelConfig
    from ..models import arch_of

    classify = arch_of(ModelConfig.from_file(ref_dir)).schema.classify

    err2: dict[str, float] = {}
    ref2: dict[str, float] = {}
    with QuantizedSource(model_dir) as q, SafetensorsSource(ref_dir) as r:
        for i, name in enumerate(q.names()):
            cls, _ = classify(name)
            if cls is None or name not in r:
                continue
            w = r.get(name, dtype=torch.float32)
            d = q.get(name, dtype=torch.float32)
            err2[cls] = err2.get(cls, 0.0) + float((d - w).pow(2).sum())
            ref2[cls] = ref2.get(cls, 0.0) + float(w.pow(2).sum())
            if i % 64 == 0:
                q.release_pages()
                r.release_pages()
    return {c: math.sqrt(err2[c] / ref2[c]) for c in err2 if ref2[c] > 0}


def token_ids(args: argparse.Namespace, model: Any) -> list[int]:
    if args.random_tokens or args.text is None or model.tokenizer is None:
        import random

        n = args.random_tokens or args.max_tokens
        rng = random.Random(1234)
        vocab = model.config.vocab_size
        return [rng.randrange(0, max(1, vocab - 64)) for _ in range(n)]
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalGLMError(f"--text {args.text}: cannot read it as UTF-8 text ({getattr(exc, 'strerror', None) or exc})") from None
    ids = model.tokenizer.encode(text)
    return list(ids)[: args.max_tokens]


def score(model: Any, ref: Any, ids: list[int], ctx: int) -> dict[str, float]:
    """Perplexity of both models and mean KL(ref || model) over windows of `ctx` tokens."""
    import torch

    with torch.inference_mode():
        return _score(model, ref, ids, ctx)


def _score(model: Any, ref: Any, ids: list[int], ctx: int) -> dict[str, float]:
    import torch

    nll_m = nll_r = kl = 0.0
    count = 0
    for start in range(0, len(ids) - 1, ctx):
        window = ids[start : start + ctx + 1]
        if len(window) < 2:
            break
        x = torch.tensor([window[:-1]])
        tgt = torch.tensor(window[1:])
        lm = model.logits(x)[0].float().log_softmax(-1)
        lr = ref.logits(x)[0].float().log_softmax(-1)
        nll_m += float(-lm.gather(1, tgt[:, None]).sum())
        nll_r += float(-lr.gather(1, tgt[:, None]).sum())
        kl += float((lr.exp() * (lr - lm)).sum())
        count += len(tgt)
    if count == 0:
        raise LocalGLMError("eval: need at least 2 tokens to score")
    return {"tokens": count, "ppl": math.exp(nll_m / count), "ref_ppl": math.exp(nll_r / count), "kl": kl / count}


def cmd_eval(args: argparse.Namespace) -> int:
    from ..loader import load
    from ..checkpoint.quantized_dir import is_quantized_dir
    from ..model_info import check_ctx
    from .flags import quant_load_options as load_options
    from .flags import set_threads

    set_threads(args.threads)
    if args.ctx < 2:
        raise LocalGLMError(f"--ctx must be at least 2, got {args.ctx}")
    if args.max_tokens < 2:  # a negative count sliced tokens off the end of --text instead
        raise LocalGLMError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    if args.text is not None and not args.random_tokens and not Path(args.text).is_file():
        raise LocalGLMError(f"--text {args.text}: no such file")  # before loading two models
    opts = load_options(args)
    opts.pop("save_quantized", None)
    model = load(args.model, **opts)
    ref = load(args.ref, dtype=model.dtype)
    if model.config.vocab_size != ref.config.vocab_size:
        raise LocalGLMError(
            f"--ref {args.ref}: its vocabulary has {ref.config.vocab_size} tokens, {args.model}'s has {model.config.vocab_size}; "
            "KL and perplexity compare models over one vocabulary"
        )
    for cfg, where in ((model.config, args.model), (ref.config, args.ref)):
        check_ctx(cfg, args.ctx, str(where))  # windows past max_position_embeddings would score untrained positions
    ids = token_ids(args, ref)
    res: dict[str, Any] = score(model, ref, ids, args.ctx)
    if not args.no_weights and is_quantized_dir(args.model):
        res["weight_error"] = weight_errors(Path(args.model), Path(args.ref))
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"model {args.model}  vs  ref {args.ref}  ({res['tokens']} tokens, windows of {args.ctx})")
    print(f"  perplexity        {res['ppl']:.4f}   (ref {res['ref_ppl']:.4f})")
    print(f"  mean KL(ref||q)   {res['kl']:.6f} nats/token")
    for cls, e in sorted(res.get("weight_error", {}).items()):
        print(f"  weight error {cls:<8} {e:.4f}")
    if not args.no_weights and "weight_error" not in res:  # said, not silently left out
        print("  weight error      read from a quantized directory's tensors: `localglm quantize` MODEL first to see it")
    return 0
