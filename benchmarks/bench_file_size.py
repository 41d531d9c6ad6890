"""Size on disk and perplexity of `alphaquant quantize` outputs, with and without quantized
embeddings, in one run: what quantizing the embedding table (and the head tied to it) costs.

For each plan the checkpoint folder is written exactly as the command line writes it, its size
measured on disk, and the perplexity taken on the first 4096 tokens of the calibration part of
the text ("calib": what choices between variants are made on) and on the held-out part.
Usage: python benchmarks/bench_file_size.py [--model PATH] [--plans w4a16_g64,FILE.json,...]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _timing import print_table  # noqa: E402

from alphaquant.cli import evaluation  # noqa: E402
from alphaquant.cli.checkpoint_folder import WEIGHTS, write_checkpoint  # noqa: E402
from alphaquant.cli.models import load_model  # noqa: E402
from alphaquant.cli.presets import resolve_plan  # noqa: E402
from alphaquant.plans import apply_plan  # noqa: E402


EMBEDDING_SCHEMES = [{"group_size": 64}, {"group_size": 128}, {"granularity": "per_channel"},
                     {"group_size": 64, "symmetric": True, "zero_opt": False}, {"wq": "nf4", "group_size": 64},
                     {"wq": "lut4", "group_size": 64, "zero_opt": False, "symmetric": True}]


def with_embedding(plan: dict, **scheme) -> dict:
    """``plan`` with an override that quantizes the input embedding (and so the tied head)."""
    return {**plan, "overrides": list(plan.get("overrides", [])) + [{"pattern": "model.embed_tokens", **scheme}]}


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M)")
    parser.add_argument("--plan", default="w4a16_g64", help="the base plan (preset name or file)")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--embedding-schemes", default=json.dumps(EMBEDDING_SCHEMES),
                        help="JSON list of scheme overrides for the embedding (one row each)")
    parser.add_argument("--no-float-row", action="store_true", help="skip the plan without embedding quantization")
    args = parser.parse_args()
    loaded = load_model(args.model)
    calib_text, eval_text = evaluation.split_text(evaluation.corpus_text())
    name, base = resolve_plan(args.plan)
    base = {k: v for k, v in base.items() if k != "overrides" or v}
    variants = [] if args.no_float_row else [("embedding float (head: its own codes)",
                                              {**base, "overrides": base.get("overrides", [])})]
    for scheme in json.loads(args.embedding_schemes):
        label = ", ".join(f"{k} {v}" for k, v in scheme.items()) or "as default"
        variants.append((f"embedding + tied head: {label}", with_embedding(base, **scheme)))
    rows = []
    t0 = time.time()
    rows.append(["float32 (source)", "-", "-", f"{evaluation.perplexity(loaded.model, loaded.tokenizer, calib_text, args.eval_tokens):.3f}",
                 f"{evaluation.perplexity(loaded.model, loaded.tokenizer, eval_text, args.eval_tokens):.3f}",
                 f"{time.time() - t0:.0f}"])
    print(rows[-1], flush=True)
    for label, plan in variants:
        t0 = time.time()
        model = copy.deepcopy(loaded.model)
        apply_plan(model, plan)
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "ckpt")
            write_checkpoint(out, model, loaded.tokenizer, plan, {"layers": []})
            size, weights = folder_bytes(out), os.path.getsize(os.path.join(out, WEIGHTS))
        calib = evaluation.perplexity(model, loaded.tokenizer, calib_text, args.eval_tokens)
        held = evaluation.perplexity(model, loaded.tokenizer, eval_text, args.eval_tokens)
        rows.append([f"{name}, {label}", f"{weights / 1e6:.2f} MB", f"{size / 1e6:.2f} MB", f"{calib:.3f}",
                     f"{held:.3f}", f"{time.time() - t0:.0f}"])
        print(rows[-1], flush=True)
    print_table(["plan", f"{WEIGHTS}", "checkpoint folder", "ppl calib", "ppl held out", "s"], rows)


if __name__ == "__main__":
    main()
