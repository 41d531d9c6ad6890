"""End-to-end CPU decode and prompt speed of a quantized SmolLM2 in AlphaQuant beside llama.cpp on
the same bits, in one run.

Ours: the model with the plan's QuantLinear layers, run by transformers, greedy decode with its KV
cache: eager (the time inside the quantized linear layers is measured too, by forward hooks, so the
rest of a token's time, attention, norms, Python and framework overhead, shows), and through
alphaquant.decode.CompiledDecoder (a static cache, the one-token step compiled by torch.compile,
grouped-query attention without copies of the key/value heads). llama.cpp:
llama-cpp-python on our GGUF export of the same weights (gguf_q4_0 -> Q4_0, gguf_q8_0 -> Q8_0),
same thread count. The compiled decoder and llama.cpp take turns for --repeat rounds (this
machine's speed drifts by tens of percent within minutes); the table gives the median and each
round.
Usage: python benchmarks/bench_decode.py [--presets cpu_q4_0,gguf_q4_0,cpu_q8_0] [--prompt 128]
       [--new 64] [--threads 2] [--model smollm2|random-1b] [--no-compile] [--repeat 3] [--cpp-wrapper]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

warnings.simplefilter("ignore")
sys.path.insert(0, os.path.dirname(__file__))
from _timing import machine, print_table  # noqa: E402

from alphaquant import ops  # noqa: E402
from alphaquant.cli import evaluation  # noqa: E402
from alphaquant.cli.models import load_model  # noqa: E402
from alphaquant.cli.presets import resolve_plan  # noqa: E402
from alphaquant.export import to_gguf  # noqa: E402
from alphaquant.nn import QuantLinear  # noqa: E402
from alphaquant.plans import apply_plan  # noqa: E402

# the GGUF block type each preset's bits export to (cpu_* presets hold the gguf_* bits)
GGUF_OF = {"cpu_q4_0": "gguf_q4_0", "gguf_q4_0": "gguf_q4_0", "cpu_q8_0": "gguf_q8_0", "gguf_q8_0": "gguf_q8_0"}


class LinearTimer:
    """Seconds spent inside QuantLinear forwards (pre/post hooks)."""

    def __init__(self, model):
        self.total, self._t = 0.0, 0.0
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.register_forward_pre_hook(self._start)
                m.register_forward_hook(self._stop)

    def _start(self, *_):
        self._t = time.perf_counter()

    def _stop(self, *_):
        self.total += time.perf_counter() - self._t


@torch.inference_mode()
def ours(model, ids: torch.Tensor, new: int) -> dict:
    timer = LinearTimer(model)
    model(ids[:, :8])  # warm up (layouts built, allocator primed)
    t = time.perf_counter()
    timer.total = 0.0
    out = model(ids, use_cache=True)
    prompt_s, prompt_lin = time.perf_counter() - t, timer.total
    past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    timer.total = 0.0
    t = time.perf_counter()
    for _ in range(new):
        out = model(tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    decode_s = time.perf_counter() - t
    return {"prompt": ids.shape[1] / prompt_s, "decode": new / decode_s, "prompt_lin": prompt_lin / prompt_s,
            "decode_lin": timer.total / decode_s}


class CompiledRunner:
    """Greedy decode through alphaquant.decode.CompiledDecoder: a static KV cache, the one-token
    step compiled by torch.compile, grouped-query attention without repeat_kv. The prompt runs
    eagerly through the same cache (it builds the layers' CPU layouts first)."""

    def __init__(self, model, ids: torch.Tensor, new: int, cpp_wrapper: bool):
        from alphaquant.decode import CompiledDecoder

        torch._dynamo.reset()  # module guards are skipped: no graph compiled for another model may be reused
        self.dec = CompiledDecoder(model, max_cache_len=ids.shape[1] + new + 16, cpp_wrapper=cpp_wrapper)
        self.ids, self.new = ids, new
        t = time.perf_counter()
        self.dec.generate(ids, 9)  # compile and warm up
        self.compile_s = time.perf_counter() - t

    def run(self) -> dict:
        self.dec.generate(self.ids, self.new + 1)
        s = self.dec.timings
        return {"prompt": self.ids.shape[1] / s["prompt_s"], "decode": s["decoded"] / s["decode_s"]}


class LlamaCppRunner:
    """llama.cpp (llama-cpp-python) on a GGUF file: the prompt in one call, then greedy tokens."""

    def __init__(self, path: str, ids: list[int], new: int, threads: int):
        import llama_cpp

        n = len(ids) + new + 8  # scores keep n_batch rows without logits_all: room for every position
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=n, n_batch=n, verbose=False,
                                   n_threads=threads, n_threads_batch=threads)
        self.ids, self.new = ids, new
        self.llm.eval(ids[:8])

    def run(self) -> dict:
        llm = self.llm
        llm.reset()
        t = time.perf_counter()
        llm.eval(self.ids)
        prompt_s = time.perf_counter() - t
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t = time.perf_counter()
        for _ in range(self.new):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return {"prompt": len(self.ids) / prompt_s, "decode": self.new / (time.perf_counter() - t)}


def interleaved(runners: dict, repeat: int) -> dict:
    """Each runner's results over ``repeat`` rounds, the runners taking turns within a round (so
    that a machine's slower minutes fall on all of them alike)."""
    out = {name: [] for name in runners}
    for _ in range(repeat):
        for name, runner in runners.items():
            out[name].append(runner.run())
    return out


def cell(runs: list, key: str, digits: int) -> str:
    """The median, then every run's value."""
    values = [r[key] for r in runs]
    each = ", ".join(f"{v:.{digits}f}" for v in values)
    return f"{float(np.median(values)):.{digits}f}" + (f" ({each})" if len(values) > 1 else "")


def random_llama_1b(tokenizer):
    """A Llama with TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632)
    and random weights, over the given tokenizer's vocabulary (so that it exports to GGUF)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632,
                                   num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                                   max_position_embeddings=2048, tie_word_embeddings=False,
                                   architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if t.dim() == 1:
                t.fill_(1.0)  # norms
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)  # its buffers were on meta
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="cpu_q4_0,gguf_q4_0,cpu_q8_0")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled decode rows")
    ap.add_argument("--cpp-wrapper", action="store_true", help="CompiledDecoder(cpp_wrapper=True): the graph's "
                    "calls from C++ (faster per token, slower to compile)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of the compiled decoder and llama.cpp, taking "
                    "turns (the table gives the median, then each round's value)")
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "random-1b"],
                    help="SmolLM2-135M, or a 1.1B Llama-shaped model with random weights")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_model()
    if args.model == "random-1b":
        base.model = random_llama_1b(base.tokenizer)
    ids = base.tokenizer(evaluation.corpus_text()[:20000], return_tensors="pt").input_ids[:, : args.prompt]
    size = sum(p.numel() for p in base.model.parameters()) / 1e9
    print(f"# bench_decode on {machine('cpu')}, torch {torch.__version__}, int8 activations on {ops.cpu_isa()}, "
          f"{args.model} ({size:.2f} B parameters), prompt {ids.shape[1]} tokens, {args.new} new tokens")
    rows, exported = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            model = copy.deepcopy(base.model)
            apply_plan(model, resolve_plan(preset)[1])
            r = ours(copy.deepcopy(model), ids, args.new)  # a copy: the timing hooks stay off the compiled one
            rows.append([f"alphaquant {preset} (eager)", f"{r['prompt']:.0f}", f"{r['decode']:.1f}",
                         f"{100 * r['prompt_lin']:.0f}% / {100 * r['decode_lin']:.0f}%"])
            print(rows[-1], flush=True)
            runners, names = {}, {}
            gguf = GGUF_OF.get(preset)
            if gguf and gguf not in exported:
                path = os.path.join(tmp, f"{gguf}.gguf")
                to_gguf(model, base.tokenizer, path)
                exported.add(gguf)
                runners["llama"] = LlamaCppRunner(path, ids[0].tolist(), args.new, args.threads)
                names["llama"] = f"llama.cpp {gguf} (our export)"
            if not args.no_compile:
                runners["compiled"] = CompiledRunner(model, ids, args.new, args.cpp_wrapper)
                names["compiled"] = (f"alphaquant {preset} (CompiledDecoder{', cpp_wrapper' if args.cpp_wrapper else ''}, "
                                     f"{runners['compiled'].compile_s:.0f} s to compile)")
            for name, runs in interleaved(runners, args.repeat).items():
                rows.append([names[name], cell(runs, "prompt", 0), cell(runs, "decode", 1), "-"])
                print(rows[-1], flush=True)
    print()
    print_table(["engine / preset", "prompt tokens/s", "decode tokens/s", "time in quantized linears (prompt / decode)"],
                rows)


if __name__ == "__main__":
    main()
