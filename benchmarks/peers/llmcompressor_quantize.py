"""Quantize a Hugging Face model with llm-compressor (the peer), on the CPU, and save it compressed.

Runs inside its own virtual environment that has llmcompressor (see README.md beside this file);
it never imports alphaquant, whose native extension is built for another torch. The parent
(`llmcompressor_rows.py`, in our venv) loads the saved folder with transformers +
compressed-tensors and evaluates it with our own evaluation code.

Usage:
  python llmcompressor_quantize.py --model DIR --calib calib.pt --scheme gptq_w4_asym_g64 --out DIR

--calib is a torch file holding a list of [1, T] int64 token-id tensors (the calibration windows;
T is 256 in bench_accuracy). Every window is used, unshuffled, one per batch.

Schemes are named ALGO_wBITS_(asym|sym)_gGROUP, e.g. gptq_w4_asym_g64, gptq_w4_sym_g64,
gptq_w3_asym_g64, awq_w4_asym_g64, awq_w4_sym_g64, rtn_w4_asym_g64, rtn_w8_sym_g64:
  gptq: GPTQModifier (llm-compressor's defaults: block 128, dampening 0.01, static act-order)
  awq:  AWQModifier (default mappings and grid) followed by QuantizationModifier
  rtn:  QuantizationModifier alone (min-max round-to-nearest, no calibration data)
Integer weights, BITS in 2..8, groups of GROUP input columns, activations left in float.

Every nn.Linear is quantized, lm_head included (targets=["Linear"], ignore=[]), as our rows do.
llm-compressor allows that: when the targets cover the output embedding it unties it from the
input embedding (a cloned, separate lm_head weight; config.tie_word_embeddings becomes False), so
the saved folder holds a float embed_tokens.weight and a quantized lm_head. Under GPTQ the lm_head
gets a real Hessian: during calibration llm-compressor swaps lm_head's forward for a meta-device
stand-in (no logits are computed), but the module's forward hooks still see its input.

The output folder is written to OUT.tmp and renamed to OUT when complete, with
alphaquant_peer.json (scheme, versions, seconds, windows, lm_head handling) beside the weights.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time

import torch

SCHEME_RE = re.compile(r"^(gptq|awq|rtn)_w([2-8])_(asym|sym)_g(\d+)$")
DOCUMENTED = ["gptq_w4_asym_g64", "gptq_w4_sym_g64", "gptq_w3_asym_g64", "awq_w4_asym_g64",
              "awq_w4_sym_g64", "rtn_w4_asym_g64", "rtn_w4_sym_g64"]


def parse_scheme(name: str) -> tuple[str, int, bool, int]:
    """'gptq_w4_asym_g64' -> ('gptq', 4, False, 64): algorithm, bits, symmetric, group size."""
    m = SCHEME_RE.match(name)
    if not m:
        raise SystemExit(f"--scheme {name!r}: expected ALGO_wBITS_(asym|sym)_gGROUP with ALGO in "
                         f"gptq/awq/rtn and BITS in 2..8, e.g. {', '.join(DOCUMENTED)}")
    algo, bits, sym, group = m.group(1), int(m.group(2)), m.group(3) == "sym", int(m.group(4))
    if group <= 0:
        raise SystemExit(f"--scheme {name!r}: group size must be positive")
    return algo, bits, sym, group


def patch_pin_memory_for_cpu() -> bool:
    """llm-compressor's AWQ pins its cached activations before its grid search
    (`IntermediatesCache.pin_memory`, called from `AWQModifier._apply_smoothing`) so that later
    host-to-device copies can be non-blocking. Pinning needs a CUDA driver: on a machine without a
    GPU `Tensor.pin_memory()` raises. On the CPU nothing is ever copied to a device, so pinning
    buys nothing: make it a no-op there. Returns whether the patch was applied."""
    if torch.cuda.is_available():
        return False
    from llmcompressor.pipelines.cache import IntermediatesCache

    def pin_memory(self, batch_index, input_names=None):  # noqa: ARG001  CPU: nothing to pin
        return None

    IntermediatesCache.pin_memory = pin_memory
    return True


def build_recipe(algo: str, bits: int, sym: bool, group: int):
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationScheme,
                                                 QuantizationStrategy, QuantizationType)
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    weights = QuantizationArgs(num_bits=bits, type=QuantizationType.INT, symmetric=sym,
                               strategy=QuantizationStrategy.GROUP, group_size=group, dynamic=False)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    common = dict(config_groups=groups, targets=["Linear"], ignore=[])  # lm_head included
    if algo == "gptq":
        return [GPTQModifier(**common)]
    if algo == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [AWQModifier(), QuantizationModifier(**common)]
    return [QuantizationModifier(**common)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face float model folder")
    parser.add_argument("--calib", required=True, help="torch file: list of [1, T] int64 token ids")
    parser.add_argument("--scheme", required=True, help="e.g. " + ", ".join(DOCUMENTED))
    parser.add_argument("--out", required=True, help="output folder (compressed-tensors format)")
    args = parser.parse_args()
    algo, bits, sym, group = parse_scheme(args.scheme)

    import compressed_tensors
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot

    patched = patch_pin_memory_for_cpu()
    torch.manual_seed(0)
    windows = torch.load(args.calib)
    if not isinstance(windows, (list, tuple)) or not windows or any(
            not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[0] != 1 for w in windows):
        raise SystemExit(f"--calib {args.calib}: expected a non-empty list of [1, T] token-id tensors")
    ids = [w[0].to(torch.int64).tolist() for w in windows]
    seq_len = max(len(x) for x in ids)
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})

    t0 = time.time()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    tied_before = bool(getattr(model.config, "tie_word_embeddings", False))
    recipe = build_recipe(algo, bits, sym, group)
    t1 = time.time()
    kwargs = {}
    if algo != "rtn":  # RTN is data-free: min-max of the weights
        kwargs = dict(dataset=dataset, num_calibration_samples=len(ids), shuffle_calibration_samples=False,
                      max_seq_length=seq_len, batch_size=1)
    model = oneshot(model=model, tokenizer=tokenizer, recipe=recipe, **kwargs)
    t2 = time.time()

    tmp = args.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, save_compressed=True)
    tokenizer.save_pretrained(tmp)
    t3 = time.time()
    rtn_fallback = [n for m in recipe for n in getattr(m, "_rtn_fallback_module_names", [])]
    meta = {
        "scheme": args.scheme, "algorithm": algo, "bits": bits, "symmetric": sym, "group_size": group,
        "calibration_windows": len(ids) if algo != "rtn" else 0, "window_tokens": seq_len,
        "calib_file": os.path.abspath(args.calib),
        "targets": ["Linear"], "ignore": [], "lm_head_quantized": True,
        "tie_word_embeddings_before": tied_before,
        "tie_word_embeddings_after": bool(getattr(model.config, "tie_word_embeddings", False)),
        "gptq_rtn_fallback_modules": rtn_fallback,
        "pin_memory_patched": patched,
        "seconds": {"load": round(t1 - t0, 1), "oneshot": round(t2 - t1, 1), "save": round(t3 - t2, 1)},
        "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__,
                     "python": sys.version.split()[0]},
    }
    with open(os.path.join(tmp, "alphaquant_peer.json"), "w") as f:
        json.dump(meta, f, indent=1)
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    print(json.dumps(meta), flush=True)


if __name__ == "__main__":
    main()
