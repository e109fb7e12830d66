// Plain-data views of the tensors a kernel reads and writes. The binding layer fills them from
// raw pointers; the kernels never allocate tensors. Indices were validated before a kernel runs
// (see validate.cpp): kernels trust them.
#pragma once
#include <cstdint>

namespace sparseflow::cpu {

enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

struct LinearIO {
  DType dtype;
  const void* x;         // [M, K], row stride ldx elements, unit element stride
  int64_t M, K, ldx;
  void* y;               // [M, N], row stride ldy elements
  int64_t N, ldy;
  const void* bias;      // [N] or nullptr
  uint8_t* nonfinite;    // [M] out: 1 where the row of x holds a NaN or inf (the caller fixes it up)
  int threads;
};

struct BitmaskView {      // unstructured: values in row-major order + 1 bit per element
  const void* values;     // [nnz]
  const uint8_t* mask;    // [rows, mask_stride], bit j of byte b is element 8b+j (little bit order)
  const int64_t* row_offsets;  // [rows + 1]
  int64_t rows, cols, mask_stride, nnz;
};

struct CsrView {
  const void* values;     // [nnz]
  const void* col;        // [nnz] int16 or int32
  const int64_t* row_ptr; // [rows + 1]
  int64_t rows, cols, nnz;
  int index_bits;         // 16 or 32
};

struct BsrView {
  const void* values;     // [nblocks, bm, bk]; edge blocks are zero-padded
  const int32_t* col;     // [nblocks] block-column index
  const int64_t* row_ptr; // [ceil(rows / bm) + 1]
  int64_t rows, cols, bm, bk, nblocks;
};

struct NMView {
  const void* values;     // [rows, groups * n]; groups = ceil(cols / m)
  const uint8_t* index;   // [rows, index_stride]: position in its group of each kept value,
                          // 2 bits each when m == 4 (4 per byte), else 4 bits (2 per byte), low bits first
  int64_t rows, cols, n, m, index_stride;
};

struct DenseView {        // a dense matrix [rows, cols] with row stride ld
  const void* values;
  int64_t rows, cols, ld;
};

// Rows [row0, row1) and columns [col0, col1) of a compressed weight written out dense:
// out[r - row0, c - col0] (row stride ld elements of the weight's dtype). Bits are copied, never
// converted: the result equals to_dense. Column ranges other than all columns are for the bitmask
// only, with col0 and col1 multiples of 8 (or col1 == cols); the binding checks both. A bitmask
// walked in consecutive column ranges may pass `cursor` ([row1 - row0]): the index of each row's
// first value at col0 on entry (row_offsets before the first range), updated to col1's on exit.
// out = x with every element whose magnitude is at most the threshold set to +0 ([M, K], row
// strides ldx and ldo; the threshold as the bits of a non-negative value of x's dtype).
struct ThresholdIO {
  DType dtype;
  const void* x;
  void* out;
  int64_t M, K, ldx, ldo;
  uint32_t threshold_bits;
  int threads;
};

struct DecompressIO {
  DType dtype;
  int64_t row0, row1, col0, col1;
  int64_t* cursor;
  void* out;
  int64_t ld;
  int threads;
};

}  // namespace sparseflow::cpu
