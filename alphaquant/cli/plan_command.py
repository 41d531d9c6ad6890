"""`alphaquant plan`: a per-layer mixed-precision plan for a size budget, and the measured
perplexity-vs-bits curve of such plans (alphaquant.algorithms.mixed_precision does the math)."""
from __future__ import annotations

import copy
import json
import os
import sys
import time
import warnings

DEFAULT_CURVE = (3.0, 3.5, 4.0, 4.5, 5.0)


def _loss_fn(is_lm: bool):
    import torch

    if is_lm:
        return lambda m, b: m(b, labels=b).loss
    gen = torch.Generator().manual_seed(0)

    def encoder_loss(m, b):
        # an encoder has no loss: the Fisher of its output along random directions stands in
        h = m(**b).last_hidden_state
        return (h * torch.randn(h.shape, generator=gen)).sum() / h.shape[0]
    return encoder_loss


def save_curve_chart(points: list, path: str, title: str) -> None:
    """Perplexity (or cosine) against bits per weight, each point labelled; PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker, color in (("mixed", "o-", "tab:blue"), ("uniform", "s", "tab:gray")):
        pts = sorted((p for p in points if p["kind"] == kind), key=lambda p: p["bits"])
        if pts:
            ax.plot([p["bits"] for p in pts], [p["value"] for p in pts], marker, color=color,
                    label="mixed precision (planned)" if kind == "mixed" else "one format everywhere")
            for p in pts:
                ax.annotate(p["label"], (p["bits"], p["value"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    metric = points[0]["metric"] if points else ""
    ax.set_xlabel("bits per weight (codes + scales)")
    ax.set_ylabel(metric)
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_plan(args) -> int:
    from ..algorithms import mixed_precision as mp
    from ..plans import apply_plan, load_plan
    from . import evaluation
    from .main import CliError, WriteError, _load_model, _progress, evaluate
    from .models import ModelLoadError, default_model_path

    if not 1.0 <= args.budget <= 16.0:
        raise CliError(f"--budget is average bits per weight, between 1 and 16; got {args.budget}")
    try:
        curve = sorted({float(b) for b in args.curve.split(",") if b.strip()}) if args.curve else []
    except ValueError:
        raise CliError(f"--curve takes budgets separated by commas (e.g. 3,3.5,4); got {args.curve!r}") from None
    out = args.out
    if os.path.isdir(out) or (os.path.exists(out) and not args.force):
        raise CliError(f"--out {out} exists" + ("" if os.path.isdir(out) else " (--force replaces it)"))
    try:
        model_path = args.model or default_model_path()
    except ModelLoadError as e:
        raise CliError(str(e)) from None
    t0 = time.time()
    loaded = _load_model(model_path)
    progress = _progress()
    calib_text, eval_text = evaluation.split_text(evaluation.corpus_text())
    tok = loaded.tokenizer
    if loaded.is_causal_lm:
        calib = list(evaluation.token_windows(tok, calib_text, args.calib_tokens, evaluation.CALIBRATION_WINDOW))
    else:
        sents = evaluation.eval_sentences(calib_text, 64)
        calib = [tok(sents[i:i + 16], padding=True, return_tensors="pt") for i in range(0, len(sents), 16)]
    import torch

    if args.rotation != "none":
        from ..algorithms.rotation import RotationError, rotate_model

        try:  # sensitivities of the weights as the plan will quantize them (its plans rotate too)
            rotate_model(loaded.model)
        except RotationError as e:
            raise CliError(str(e)) from None
    names = [n for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear)]
    sens = mp.measure_sensitivity(loaded.model, names, calib, _loss_fn(loaded.is_causal_lm), progress=progress)
    extra = {"algorithm": "gptq", "act_order": True, "refit": True} if args.algorithm == "gptq" else {}

    def plan_for(budget: float) -> dict:
        try:
            assignment = mp.solve_budget(sens, budget)
        except ValueError as e:
            raise CliError(str(e)) from None
        plan = mp.assignment_plan(assignment, sens.candidates, f"mixed precision, {budget} bits per weight", extra)
        if args.rotation != "none":
            plan["rotation"] = args.rotation
        if args.finetune:
            plan["finetune"] = {}
        plan["description"] = (f"{sens.bits(assignment):.4f} bits per weight (scales included) over "
                               f"{len(assignment)} linear layers; predicted loss increase "
                               f"{sens.predicted_loss(assignment):.4g}")
        return plan, assignment

    plan, assignment = plan_for(args.budget)
    load_plan(plan)  # what we write must be a valid plan
    counts = {}
    for c in assignment.values():
        counts[c] = counts.get(c, 0) + 1
    print(f"budget {args.budget} bits per weight: {sens.bits(assignment):.4f} used; "
          + ", ".join(f"{c} x{k}" for c, k in sorted(counts.items())))
    try:
        tmp = f"{out}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(plan, f, indent=1)
        os.replace(tmp, out)
    except OSError as e:
        raise WriteError(f"could not write {out}: {e.strerror or e}") from None
    print(f"wrote {out}")
    if not curve:
        return 0

    # The curve: apply the plan of each budget (and each candidate alone) and measure.
    points = []
    metric = "perplexity" if loaded.is_causal_lm else "cosine"
    forward = None if loaded.is_causal_lm else (lambda m, b: m(**b))
    reference = None if loaded.is_causal_lm else evaluate(loaded.model, tok, False, eval_text, args.eval_tokens)
    float_value = evaluate(loaded.model, tok, loaded.is_causal_lm, eval_text, args.eval_tokens, reference)
    jobs = [("mixed", f"{b:g}", plan_for(b)[0]) for b in curve]
    if args.uniform:
        jobs += [("uniform", c, {"default": {**s, **extra}, **({"finetune": {}} if args.finetune else {})})
                 for c, s in sens.candidates.items()]
    # GPTQ plans are calibrated as `alphaquant quantize` calibrates them (up to 128 windows), not
    # on the few windows the sensitivities need
    from .main import CALIBRATION_TOKENS_ALGORITHMS

    calib_gptq = calib
    if (args.algorithm == "gptq" or args.finetune) and loaded.is_causal_lm:
        calib_gptq = list(evaluation.token_windows(tok, calib_text, CALIBRATION_TOKENS_ALGORITHMS,
                                                   evaluation.CALIBRATION_WINDOW))
    for kind, label, p in jobs:
        model = copy.deepcopy(loaded.model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = apply_plan(model, p, calibration_batches=calib_gptq, forward_fn=forward)
        bits = 8.0 * report.bytes_after / sens.total_weights
        v = evaluate(model, tok, loaded.is_causal_lm, eval_text, args.eval_tokens, reference)
        value = v.get("perplexity", v.get("cosine"))
        points.append({"kind": kind, "label": label, "bits": round(bits, 4), "value": value, "metric": metric})
        print(f"{kind:8} {label:>9}: {bits:.3f} bits per weight, {metric} {value:.4f}", flush=True)
        del model
    stem = os.path.splitext(out)[0]
    summary = {"float": float_value.get("perplexity", float_value.get("cosine")), "metric": metric,
               "points": points, "eval_tokens": args.eval_tokens, "algorithm": args.algorithm}
    with open(f"{stem}_curve.json", "w") as f:
        json.dump(summary, f, indent=1)
    save_curve_chart(points, f"{stem}_curve.png",
                     f"{loaded.source.split(os.sep)[-1]}: {metric} vs bits per weight "
                     f"(float {summary['float']:.3f}; {args.algorithm}"
                     f"{'' if args.rotation == 'none' else ', rotation ' + args.rotation}"
                     f"{', fine-tuned scales' if args.finetune else ''})")
    print(f"wrote {stem}_curve.png and {stem}_curve.json ({time.time() - t0:.0f} s)", file=sys.stderr)
    return 0


def add_parser(sub, eval_tokens_type, int_at_least) -> None:
    p = sub.add_parser("plan", help="a mixed-precision plan for a size budget (bits per weight)")
    p.add_argument("model", nargs="?", help="model folder, .gguf or .safetensors (default: SmolLM2-135M)")
    p.add_argument("--budget", type=float, required=True, help="average bits per weight, scales included")
    p.add_argument("--out", required=True, help="plan file to write (JSON)")
    p.add_argument("--force", action="store_true", help="replace an existing plan file")
    p.add_argument("--algorithm", choices=("rtn", "gptq"), default="rtn",
                   help="how the planned layers are quantized (gptq: with act-order and refitted scales)")
    p.add_argument("--rotation", choices=("none", "hadamard"), default="none",
                   help="hadamard: rotate the model first (Llama family) and plan for the rotated weights")
    p.add_argument("--finetune", action="store_true",
                   help="the plans also fine-tune their scales end to end on calibration data (plan key finetune)")
    p.add_argument("--curve", default=",".join(f"{b:g}" for b in DEFAULT_CURVE),
                   help="budgets whose plans are applied and measured for the curve ('' skips it)")
    p.add_argument("--uniform", action="store_true", help="also measure every candidate format applied everywhere")
    p.add_argument("--calib-tokens", type=int_at_least(256, " (one calibration window)"), default=4096)
    p.add_argument("--eval-tokens", type=eval_tokens_type, default=4096)
    p.set_defaults(func=cmd_plan)
