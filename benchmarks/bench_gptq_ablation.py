"""Which GPTQ options matter: SmolLM2-135M, int4 asymmetric group 64, fp16 scales (4.5 bits per
weight), calibrated on the CLI's windows (the first fifth of the text), perplexity on the
held-out 4096 tokens. Each variant is a JSON object of plan keys added to that scheme.
Usage: python benchmarks/bench_gptq_ablation.py '{"plain": {"algorithm": "gptq"}, ...}' [windows]
"""
from __future__ import annotations

import copy
import json
import sys
import time
import warnings

import torch

from alphaquant.cli import evaluation
from alphaquant.cli.models import load_model
from alphaquant.plans import apply_plan

BASE = {"wq": "int4", "aq": "none", "group_size": 64, "symmetric": False, "scale_dtype": "float16", "dtype": "float32"}


def main() -> None:
    variants = json.loads(sys.argv[1])
    windows = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    loaded = load_model(None)
    tok = loaded.tokenizer
    calib_text, eval_text = evaluation.split_text(evaluation.corpus_text())
    calib = list(evaluation.token_windows(tok, calib_text, windows * 256, 256))
    print(f"{len(calib)} calibration windows, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for name, extra in variants.items():
        t = time.time()
        model = copy.deepcopy(loaded.model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_plan(model, {"default": {**BASE, **extra}}, calibration_batches=calib)
        quantize_s = time.time() - t
        ppl = evaluation.perplexity(model, tok, eval_text, 4096)
        print(f"{name}: perplexity {ppl:.3f}, quantized in {quantize_s:.0f} s", flush=True)


if __name__ == "__main__":
    main()
