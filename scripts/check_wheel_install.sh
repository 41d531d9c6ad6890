#!/usr/bin/env bash
# Proves that a wheel of AlphaQuant works when installed (not editable): builds a wheel (CPU kernels
# only, for speed), installs it into a fresh venv, and from a folder outside the source tree runs
# `alphaquant quantize` on a tiny random Llama with a preset plan, then `alphaquant inspect`.
#
# The fresh venv sees the current venv's packages (torch, transformers, ...) through a .pth file,
# so nothing is downloaded; alphaquant itself comes only from the wheel.
# Usage: bash scripts/check_wheel_install.sh   (with the project's venv active, or PYTHON=...)
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/alphaquant-wheel-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)

# Build from a copy of the files git knows (a build never touches the working tree's build/).
mkdir "$WORK/src"
git -C "$SRC" ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do if [ -e "$SRC/$f" ] || [ -L "$SRC/$f" ]; then printf '%s\0' "$f"; fi; done |
    tar -C "$SRC" --null -T - -cf - | tar -C "$WORK/src" -xf -
echo "building the wheel..."
ALPHAQUANT_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip wheel -q --no-build-isolation --no-deps \
    -w "$WORK/wheel" "$WORK/src" > "$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/wheel/alphaquant-*.whl)
"$PY" - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
presets = [n for n in names if n.startswith("alphaquant/presets/") and n.endswith(".json")]
assert "alphaquant/presets/w4a16_g64.json" in presets, "the wheel lacks the presets"
assert any(n.startswith("alphaquant/cli/") for n in names), "the wheel lacks alphaquant.cli"
print(f"wheel {sys.argv[1].rsplit('/', 1)[-1]}: {len(names)} files, {len(presets)} presets")
EOF

echo "installing it into a fresh venv..."
"$PY" -m venv "$WORK/venv"
"$PY" -c "import site; print(site.getsitepackages()[0])" > "$("$WORK/venv/bin/python" -c \
    "import site; print(site.getsitepackages()[0])")/current-venv.pth"
"$WORK/venv/bin/python" -m pip install -q --no-deps --no-index "$WHEEL"

mkdir "$WORK/run" && cd "$WORK/run"
"$WORK/venv/bin/python" - "$SRC" <<'EOF'
import os, sys
import alphaquant, alphaquant.cli
src = os.path.realpath(sys.argv[1])
where = os.path.realpath(alphaquant.__file__)
assert not where.startswith(src + os.sep), f"alphaquant was imported from the source tree: {where}"
print(f"installed package: {os.path.dirname(where)}")

import torch, transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from alphaquant.cli.evaluation import corpus_text
tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tok.train_from_iterator([corpus_text()[:100_000]], trainers.WordLevelTrainer(vocab_size=300, special_tokens=["[UNK]"]))
fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")
fast.save_pretrained("tiny")
cfg = transformers.LlamaConfig(vocab_size=fast.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
torch.manual_seed(0)
transformers.LlamaForCausalLM(cfg).save_pretrained("tiny")
EOF
"$WORK/venv/bin/alphaquant" quantize tiny --plan w4a16_g128 --out out --no-eval > quantize.log 2>&1 ||
    { tail -n 20 quantize.log; exit 1; }
test -f out/model.safetensors -a -f out/report.json
"$WORK/venv/bin/alphaquant" inspect out | tail -n 1
"$WORK/venv/bin/python" -m alphaquant.cli inspect out > /dev/null
echo "wheel install OK ($(( $(date +%s) - start )) s)"
