"""The built library holds AVX (VEX/EVEX-encoded) instructions only in the code chosen at run time by
CPUID, so that it loads and runs on any x86-64 CPU (csrc/cpu/cpu_variant.h). Read from the library's
disassembly: a function compiled for AVX2 outside the dispatched kernels fails here."""
import collections
import platform
import re
import shutil
import subprocess

import pytest

from alphaquant import _native

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None,
                                reason="x86-64 with objdump only")

# Functions that may use AVX: those the run-time choice calls on CPUs that have it.
DISPATCHED = re.compile(r"alphaquant::avx2::|alphaquant::int8_act::run_tiles_avx"
                        r"|alphaquant::int8_act::\(anonymous namespace\)::\w*tile_rows|alphaquant::int8_act::"
                        r"\(anonymous namespace\)::(load16|dpbusd|widen|unpack|block_words)|quantize_block32_avx2|load8_as_float"
                        r"|alphaquant::bf16_dot::|alphaquant::linear_(split_)?bf16_dot\(")


def test_avx_only_in_dispatched_kernels():
    lib = _native._C.__file__
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", lib], capture_output=True, text=True,
                          check=True).stdout
    func, found = None, collections.Counter()
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            func = m.group(1)
            continue
        parts = line.split("\t")
        if func and len(parts) >= 2 and parts[1].strip().startswith("v") and not DISPATCHED.search(func):
            found[func] += 1
    assert not found, f"AVX instructions outside the dispatched kernels: {found.most_common(5)}"
