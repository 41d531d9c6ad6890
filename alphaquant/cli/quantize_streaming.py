"""`alphaquant quantize` on a safetensors folder with a weight-only plan: the streaming path
(alphaquant.streaming), one tensor in memory at a time. The evaluation runs only where the float
model fits in memory, and says so when it does not."""
from __future__ import annotations

import json
import os
import sys
import time
import warnings

import torch

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_safetensors_folder(path: str) -> bool:
    return os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path))


def streamable(model_path: str, plan: dict) -> bool:
    """Whether `quantize` streams: a safetensors folder or GGUF file, and a weight-only plan (one
    tensor at a time) or a calibrated one that runs block by block (a causal LM's)."""
    from ..gguf_source import is_gguf_file
    from ..streaming import needs_activations
    from ..streaming_calibrated import is_calibrated, why_not

    if not (is_safetensors_folder(model_path) or is_gguf_file(model_path)):
        return False
    if needs_activations(plan) is None:
        return True
    return is_calibrated(plan) and why_not(plan) is None and _is_causal_lm(model_path)


def _is_causal_lm(model_path: str) -> bool:
    from ..streaming import StreamingError, meta_model

    try:
        config, _ = meta_model(model_path)
    except StreamingError:
        return True  # the streaming path reports the damaged input
    return any(a.endswith("ForCausalLM") for a in (config.architectures or []))


def _calibration_windows(args, model_path: str) -> list:
    """The calibration token windows the in-memory path takes (same text, same count)."""
    import transformers

    from ..gguf_source import is_gguf_file
    from . import evaluation
    from .main import CALIBRATION_TOKENS_ALGORITHMS, CliError

    try:
        if is_gguf_file(model_path):
            folder, name = os.path.split(os.path.abspath(model_path))
            tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        else:
            tok = transformers.AutoTokenizer.from_pretrained(model_path)
    except Exception as e:  # noqa: BLE001
        raise CliError(f"{model_path}: a calibrated plan needs the model's tokenizer, which does not load "
                       f"({type(e).__name__}: {str(e)[:200]})") from None
    calib_text, _ = evaluation.split_text(evaluation.corpus_text())
    n_tokens = args.calib_tokens or CALIBRATION_TOKENS_ALGORITHMS
    return list(evaluation.token_windows(tok, calib_text, n_tokens, evaluation.CALIBRATION_WINDOW))


def _input_bytes(model_path: str) -> int:
    if os.path.isfile(model_path):
        return os.path.getsize(model_path)
    return sum(os.path.getsize(os.path.join(model_path, f)) for f in os.listdir(model_path)
               if f.endswith(".safetensors"))


def memory_available() -> int:
    """Bytes the kernel says a new allocation can get without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _start_reading(model_path: str) -> None:
    """The first shards into the page cache while the model's structure is built (seconds of
    imports and planning in which the disk would otherwise be idle): at most a quarter of the
    available memory and 4 GB (about what a disk reads in the 2-3 s of start-up; page cache,
    not this process's memory)."""
    from ..sharded_safetensors import INDEX, prefetch_files

    try:
        if os.path.isfile(model_path):
            paths = [model_path]
        elif os.path.isfile(os.path.join(model_path, INDEX)):
            with open(os.path.join(model_path, INDEX)) as f:
                paths = [os.path.join(model_path, s) for s in dict.fromkeys(json.load(f)["weight_map"].values())]
        else:
            paths = sorted(os.path.join(model_path, f) for f in os.listdir(model_path) if f.endswith(".safetensors"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # a damaged index: the real read says what is wrong
    prefetch_files(paths, min(memory_available() // 4, 4 << 30))


def _byte_bar():
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return lambda total: tqdm(total=total, unit="B", unit_scale=True, desc="quantizing", leave=False, file=sys.stderr)


def _write_json_atomically(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def quantize_streaming(args, plan_name: str, plan: dict, model_path: str, out: str, model_name: str) -> int:
    from ..streaming import StreamingError, stream_quantize
    from . import evaluation
    from .main import CliError, WriteError, _load_checkpoint, _load_model, _metric_line, _warn, evaluate

    t0 = time.time()
    _start_reading(model_path)
    float_dtype = FLOAT_DTYPES[args.float_dtype] if args.float_dtype else None
    try:  # the plan against the model's structure (on the meta device: no memory), before any work
        from ..plans import unmatched_patterns
        from ..streaming import meta_model

        config, structure = meta_model(model_path)
    except StreamingError as e:
        raise CliError(str(e)) from None
    unmatched = unmatched_patterns(structure, plan)
    for i, pattern in unmatched:
        _warn(f"plan pattern {pattern!r} (overrides[{i}] of {plan_name}) matches no layer of {model_path}; "
              f"it changes nothing" + ("" if args.strict else " (--strict makes this an error)"))
    if unmatched and args.strict:
        example = next((n for n, m in structure.named_modules() if type(m).__name__ == "Linear"), None)
        raise CliError(f"--strict: {len(unmatched)} plan pattern(s) match no layer"
                       + (f" (layer names look like {example!r})" if example else ""))
    def extra_files(tmp: str) -> None:
        import transformers

        from ..gguf_source import is_gguf_file

        try:
            if is_gguf_file(model_path):  # the tokenizer the GGUF metadata holds
                folder, name = os.path.split(os.path.abspath(model_path))
                tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
            else:
                tok = transformers.AutoTokenizer.from_pretrained(model_path)
            tok.save_pretrained(tmp)
        except Exception as e:  # noqa: BLE001  a model without a tokenizer still quantizes
            _warn(f"{model_path} has no usable tokenizer ({type(e).__name__}); the checkpoint has none")

    from ..streaming_calibrated import is_calibrated

    calibrated = is_calibrated(plan)
    from .report_chart import import_in_background

    import_in_background()  # while the kernels and the disk work, not after them
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*matches no linear layer")  # said above, once
            if calibrated:
                from ..streaming_calibrated import stream_quantize_calibrated
                from .main import _progress

                del structure
                calib = _calibration_windows(args, model_path)
                report = stream_quantize_calibrated(model_path, plan, out, calib, float_dtype=float_dtype,
                                                    force=args.force, progress=_progress(), extra_files=extra_files)
            else:
                report = stream_quantize(model_path, plan, out, float_dtype=float_dtype, force=args.force,
                                         progress=_byte_bar(), extra_files=extra_files,
                                         meta=(config, structure))
                del structure
    except StreamingError as e:
        raise CliError(f"plan {plan_name} does not stream over {model_path}: {e}") from None
    except FileExistsError as e:
        raise CliError(f"output {e}") from None
    except ValueError as e:  # damaged shards or index
        raise CliError(str(e)) from None
    except OSError as e:
        raise WriteError(f"could not write {out}: {e.strerror or e} (the old output, if any, is unchanged)") from None
    from ..plans import LayerReport, PlanReport

    print(PlanReport(layers=[LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in report["layers"]]).format_table())
    report["title"] = f"{model_name} quantized with {plan_name}"
    report["model"], report["plan_name"] = model_path, plan_name
    report["unmatched_patterns"] = [{"index": i, "pattern": p} for i, p in unmatched]
    if not args.no_eval:
        source_bytes = report.get("bytes_read") or _input_bytes(model_path)
        need = 4 * source_bytes // 2 + source_bytes  # the float32 model (from 16-bit files) and the checkpoint
        if need > memory_available():
            print(f"evaluation skipped: the float model needs about {need / 1e9:.1f} GB and "
                  f"{memory_available() / 1e9:.1f} GB are available; run `alphaquant eval {out}` where it fits "
                  f"(--no-eval skips this message)", file=sys.stderr)
        else:
            _, eval_text = evaluation.split_text(evaluation.corpus_text())
            loaded = _load_model(model_path)
            before = evaluate(loaded.model, loaded.tokenizer, loaded.is_causal_lm, eval_text, args.eval_tokens)
            del loaded
            model, tok = _load_checkpoint(out)
            is_lm = any(a.endswith("ForCausalLM") for a in (model.config.architectures or []))
            after = evaluate(model, tok, is_lm, eval_text, args.eval_tokens, before)
            report["eval"] = {"before": {k: v for k, v in before.items() if k != "embeddings"},
                              "after": {k: v for k, v in after.items() if k != "embeddings"},
                              "eval_tokens": args.eval_tokens}
            print(f"float:     {_metric_line(before)}")
            print(f"quantized: {_metric_line(after)}")
    _write_json_atomically(os.path.join(out, "report.json"), report)
    try:
        from .report_chart import save_chart

        save_chart(report, os.path.join(out, "report.png"))
    except ImportError:  # matplotlib is optional
        pass
    total = report["total"]
    how = ("calibrated one block in memory at a time" if calibrated else
           f"streamed {report['bytes_read'] / 1e9:.2f} GB of input at {report['read_gb_per_s']:.2f} GB/s")
    print(f"wrote {out} ({how}; {total['bytes_after'] / 2**20:.1f} MiB of packed weights, {total['compression']:.2f}x "
          f"smaller than float; {time.time() - t0:.0f} s)")
    return 0
