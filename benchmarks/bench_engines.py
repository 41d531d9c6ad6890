"""Each exportable preset on SmolLM2: perplexity in AlphaQuant, in llama.cpp after GGUF export, and
after compressed-tensors export as transformers + compressed-tensors load it, on the same tokens.

Usage: python benchmarks/bench_engines.py [--tokens 4096] [--presets a,b,...] [--threads 2]
llama.cpp rows need llama-cpp-python (pip install llama-cpp-python: builds llama.cpp, ~9 min).
"""
import argparse
import copy
import math
import os
import tempfile
import time
import warnings

import numpy as np
import torch

warnings.simplefilter("ignore")
from alphaquant.cli import evaluation  # noqa: E402
from alphaquant.cli.main import CALIBRATION_TOKENS_ALGORITHMS, calibration_need  # noqa: E402
from alphaquant.cli.models import load_model  # noqa: E402
from alphaquant.cli.presets import resolve_plan  # noqa: E402
from alphaquant.export import to_compressed_tensors, to_gguf  # noqa: E402
from alphaquant.plans import apply_plan  # noqa: E402

GGUF_PRESETS = ("gguf_q8_0", "gguf_q4_0", "gptq_q4_0", "w4a16_g32")
CT_PRESETS = ("gptq_w4_g64_export", "w8a16", "fp8", "w8a8")


def llama_cpp_perplexity(path: str, windows, threads: int) -> float:
    import llama_cpp

    n = windows[0].shape[1]
    llm = llama_cpp.Llama(model_path=path, n_ctx=n, n_batch=n, logits_all=True, verbose=False, n_threads=threads)
    total, count = 0.0, 0
    for ids in windows:
        ids = ids[0].tolist()
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        total -= logp[np.arange(len(ids) - 1), ids[1:]].sum()
        count += len(ids) - 1
    return math.exp(total / count)


def ct_perplexity(folder: str, symmetric: bool, ppl) -> float:
    import transformers
    from transformers import CompressedTensorsConfig

    # transformers 5.24 reads asymmetric pack-quantized folders only by decompressing them
    kwargs = {} if symmetric else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    return ppl(model)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--presets", default=",".join(GGUF_PRESETS + CT_PRESETS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(None)
    tok = loaded.tokenizer
    calib_text, eval_text = evaluation.split_text(evaluation.corpus_text())
    windows = list(evaluation.token_windows(tok, eval_text, args.tokens, evaluation.PERPLEXITY_WINDOW))
    ppl = lambda m: evaluation.perplexity(m, tok, eval_text, args.tokens)  # noqa: E731
    print(f"float: {ppl(loaded.model):.4f} ({args.tokens} held-out tokens)", flush=True)
    rows = []
    work = tempfile.mkdtemp(prefix="bench_engines-")
    for name in args.presets.split(","):
        _, plan = resolve_plan(name)
        t0 = time.time()
        model = copy.deepcopy(loaded.model)
        need = calibration_need(plan)
        calib = None
        if need:
            n = CALIBRATION_TOKENS_ALGORITHMS if need == "algorithm" else 2048
            calib = list(evaluation.token_windows(tok, calib_text, n, evaluation.CALIBRATION_WINDOW))
        apply_plan(model, plan, calibration_batches=calib)
        ours = ppl(model)
        row = {"preset": name, "ours": ours, "gguf": None, "llama.cpp": None, "ct": None, "ct_ppl": None}
        if name in GGUF_PRESETS:
            path = os.path.join(work, f"{name}.gguf")
            report = to_gguf(model, tok, path)
            kinds = sorted(set(v for k, v in report["tensors"].items() if k != "token_embd.weight"))
            row["gguf"] = f"{'/'.join(kinds)}, {os.path.getsize(path) / 1e6:.1f} MB"
            try:
                row["llama.cpp"] = llama_cpp_perplexity(path, windows, args.threads)
            except ImportError:
                row["llama.cpp"] = "llama-cpp-python not installed"
            os.remove(path)
        if name in CT_PRESETS:
            folder = os.path.join(work, name)
            to_compressed_tensors(model, folder, tok)
            import json

            with open(os.path.join(folder, "config.json")) as f:
                groups = json.load(f)["quantization_config"]["config_groups"]
            row["ct"] = "/".join(sorted({g["format"] for g in groups.values()}))
            symmetric = all(g["weights"]["symmetric"] for g in groups.values())
            row["ct_ppl"] = ct_perplexity(folder, symmetric, ppl)
        rows.append(row)
        print(row, f"({time.time() - t0:.0f} s)", flush=True)
        del model

    def cell(v):
        return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    print(f"\n| preset | AlphaQuant | GGUF file | llama.cpp | compressed-tensors | transformers + compressed-tensors |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {cell(r['ours'])} | {cell(r['gguf'])} | {cell(r['llama.cpp'])} | {cell(r['ct'])} "
              f"| {cell(r['ct_ppl'])} |")


if __name__ == "__main__":
    main()
