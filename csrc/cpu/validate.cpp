#include "cpu/validate.h"

#include <stdexcept>
#include <string>

namespace sparseflow::cpu {
namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }
std::string s(int64_t v) { return std::to_string(v); }

void check_row_pointers(const int64_t* ptr, int64_t rows, int64_t total, const char* fmt, const char* name) {
  if (ptr[0] != 0) fail(std::string(fmt) + ": " + name + "[0] is " + s(ptr[0]) + ", expected 0");
  for (int64_t r = 0; r < rows; ++r)
    if (ptr[r + 1] < ptr[r])
      fail(std::string(fmt) + ": " + name + " decreases at row " + s(r) + " (" + s(ptr[r]) + " -> " + s(ptr[r + 1]) + ")");
  if (ptr[rows] != total)
    fail(std::string(fmt) + ": " + name + "[-1] is " + s(ptr[rows]) + " but there are " + s(total) + " stored entries");
}

}  // namespace

void validate_bitmask(const BitmaskView& w) {
  if (w.rows < 0 || w.cols < 0 || w.nnz < 0) fail("bitmask: negative size");
  if (w.mask_stride != (w.cols + 7) / 8)
    fail("bitmask: mask has " + s(w.mask_stride) + " bytes per row, expected " + s((w.cols + 7) / 8));
  if (w.row_offsets[0] != 0) fail("bitmask: row_offsets[0] is " + s(w.row_offsets[0]) + ", expected 0");
  const int tail_bits = static_cast<int>(w.cols % 8);
  for (int64_t r = 0; r < w.rows; ++r) {
    const uint8_t* row = w.mask + r * w.mask_stride;
    int64_t count = 0;
    for (int64_t b = 0; b < w.mask_stride; ++b) count += __builtin_popcount(row[b]);
    if (tail_bits && (row[w.mask_stride - 1] >> tail_bits))
      fail("bitmask: row " + s(r) + " sets mask bits past column " + s(w.cols));
    if (w.row_offsets[r + 1] - w.row_offsets[r] != count)
      fail("bitmask: row " + s(r) + " has " + s(count) + " mask bits set but row_offsets gives " +
           s(w.row_offsets[r + 1] - w.row_offsets[r]) + " values");
  }
  if (w.row_offsets[w.rows] != w.nnz)
    fail("bitmask: row_offsets[-1] is " + s(w.row_offsets[w.rows]) + " but there are " + s(w.nnz) + " values");
}

void validate_csr(const CsrView& w) {
  if (w.rows < 0 || w.cols < 0 || w.nnz < 0) fail("csr: negative size");
  if (w.index_bits != 16 && w.index_bits != 32) fail("csr: column indices must be int16 or int32");
  if (w.index_bits == 16 && w.cols > 65536) fail("csr: int16 column indices need K <= 65536, K is " + s(w.cols));
  check_row_pointers(w.row_ptr, w.rows, w.nnz, "csr", "row_ptr");
  for (int64_t r = 0; r < w.rows; ++r) {
    int64_t prev = -1;
    for (int64_t i = w.row_ptr[r]; i < w.row_ptr[r + 1]; ++i) {
      const int64_t c = w.index_bits == 16 ? static_cast<int64_t>(static_cast<const uint16_t*>(w.col)[i])
                                           : static_cast<int64_t>(static_cast<const int32_t*>(w.col)[i]);
      if (c < 0 || c >= w.cols) fail("csr: column index " + s(c) + " in row " + s(r) + " is outside [0, " + s(w.cols) + ")");
      if (c <= prev) fail("csr: column indices of row " + s(r) + " are not strictly increasing");
      prev = c;
    }
  }
}

void validate_bsr(const BsrView& w) {
  if (w.rows < 0 || w.cols < 0 || w.nblocks < 0) fail("bsr: negative size");
  if (w.bm < 1 || w.bm > 128 || w.bk < 1 || w.bk > 128) fail("bsr: block sides must be in [1, 128]");
  const int64_t block_rows = (w.rows + w.bm - 1) / w.bm, block_cols = (w.cols + w.bk - 1) / w.bk;
  check_row_pointers(w.row_ptr, block_rows, w.nblocks, "bsr", "row_ptr");
  for (int64_t r = 0; r < block_rows; ++r) {
    int64_t prev = -1;
    for (int64_t b = w.row_ptr[r]; b < w.row_ptr[r + 1]; ++b) {
      const int64_t c = w.col[b];
      if (c < 0 || c >= block_cols)
        fail("bsr: block column " + s(c) + " in block row " + s(r) + " is outside [0, " + s(block_cols) + ")");
      if (c <= prev) fail("bsr: block columns of block row " + s(r) + " are not strictly increasing");
      prev = c;
    }
  }
}

void validate_nm(const NMView& w) {
  if (w.rows < 0 || w.cols < 0) fail("n:m: negative size");
  if (!(w.m == 4 || w.m == 8 || w.m == 16) || w.n < 1 || w.n >= w.m) fail("n:m: need 0 < n < m and m in {4, 8, 16}");
  const int bits = w.m == 4 ? 2 : 4;
  const int64_t groups = (w.cols + w.m - 1) / w.m, per_row = groups * w.n;
  if (w.index_stride != (per_row * bits + 7) / 8)
    fail("n:m: index has " + s(w.index_stride) + " bytes per row, expected " + s((per_row * bits + 7) / 8));
  for (int64_t r = 0; r < w.rows; ++r) {
    const uint8_t* row = w.index + r * w.index_stride;
    for (int64_t g = 0; g < groups; ++g) {
      int64_t prev = -1;
      for (int64_t j = 0; j < w.n; ++j) {
        const int64_t bit = (g * w.n + j) * bits;
        const int64_t pos = (row[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
        // A 4-bit field can say up to 15 when m = 8. A position past the last column of a partial
        // last group is fine: it reads the zero padding of x, which stays in bounds.
        if (pos >= w.m)
          fail("n:m: row " + s(r) + " group " + s(g) + " holds position " + s(pos) + ", which is not below m=" + s(w.m));
        if (pos <= prev) fail("n:m: positions in row " + s(r) + " group " + s(g) + " are not strictly increasing");
        prev = pos;
      }
    }
  }
}

}  // namespace sparseflow::cpu
