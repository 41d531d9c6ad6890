// Included first by the AVX2 variants (cpu_variant.h): every library header the variant files
// use, compiled before `#pragma GCC target` so that their inline functions stay baseline code.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "alphaquant/arg_checks.h"
#include "alphaquant/bitstream.h"
#include "alphaquant/quant_math.h"
#include "cpu/decode_table.h"
#include "cpu/segments.h"
#include "cpu/tiled_gemm.h"
