// Shared helpers for the pycompress C++/CUDA kernels.
#pragma once
#include <cstdint>

namespace pycompress {

// Bytes of the packed clamp/keep mask for n elements: whole 32-bit words, so a CUDA warp ballot can
// store a word per 32 elements. Bit (i % 8) of byte (i / 8) belongs to element i (little endian).
inline int64_t packed_mask_bytes(int64_t n) { return ((n + 31) / 32) * 4; }

}  // namespace pycompress
