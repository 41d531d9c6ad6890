"""Export round trips on SmolLM2: perplexity of our model, of the export as another library loads it,
and of the export imported back from its codes (compressed-tensors and GGUF).
Usage: python benchmarks/bench_export_roundtrip.py"""
import copy, os, sys, time, warnings, tempfile, torch
warnings.simplefilter("ignore")
from alphaquant.cli import evaluation
from alphaquant.cli.models import load_model
from alphaquant.plans import apply_plan
from alphaquant.export import to_compressed_tensors, to_gguf
from alphaquant.export.from_gguf import load_gguf
from alphaquant.export.from_compressed_tensors import load_compressed_tensors
import transformers
from transformers import CompressedTensorsConfig
torch.set_num_threads(1)
loaded = load_model(None)
tok = loaded.tokenizer
_, eval_text = evaluation.split_text(evaluation.corpus_text())
ppl = lambda m: round(evaluation.perplexity(m, tok, eval_text, 2048), 4)
d = tempfile.mkdtemp()
# compressed-tensors: int4 asym integer zero points g64 fp16 (RTN)
m = copy.deepcopy(loaded.model)
apply_plan(m, {"default": {"wq": "int4", "symmetric": False, "zero_point": "integer", "group_size": 64,
                           "scale_dtype": "float16", "dtype": "float32"}, "overrides": [{"pattern": "lm_head", "skip": True}]})
ours = ppl(m)
to_compressed_tensors(m, d + "/ct", tok)
theirs = transformers.AutoModelForCausalLM.from_pretrained(d + "/ct", dtype=torch.float32,
    quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
back, _ = load_compressed_tensors(d + "/ct")
print("ct int4 asym int-zp g64: ours", ours, "transformers", ppl(theirs), "re-imported", ppl(back), flush=True)
del theirs, back, m
# GGUF: int4 sym g32 fp16 (RTN) -> Q4_0, int4 asym g32 -> Q4_1
for name, sym in (("Q4_0", True), ("Q4_1", False)):
    m = copy.deepcopy(loaded.model)
    apply_plan(m, {"default": {"wq": "int4", "symmetric": sym, "group_size": 32, "scale_dtype": "float16",
                               "dtype": "float32"}, "overrides": [{"pattern": "lm_head", "skip": True}]})
    ours = ppl(m)
    rep = to_gguf(m, tok, f"{d}/{name}.gguf")
    back, _ = load_gguf(f"{d}/{name}.gguf")
    print(f"gguf {name}: ours", ours, "re-imported", ppl(back), "size MB", round(os.path.getsize(f'{d}/{name}.gguf') / 1e6, 1),
          "m change", rep["q4_1_min_change"], flush=True)
    del m, back
print(d)
