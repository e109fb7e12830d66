// A small persistent thread pool: kernels split their work into tasks and run them on
// `threads` threads (the caller included). We keep our own pool rather than OpenMP so that the
// extension never fights torch's OpenMP runtime for the same cores.
#pragma once
#include <cstdint>
#include <functional>

namespace sparseflow::cpu {

// Runs task(i) for i in [0, n_tasks) on up to `threads` threads and returns when all are done.
// Safe to call from several threads at once: a call that finds the pool busy runs inline.
void parallel_for(int64_t n_tasks, int threads, const std::function<void(int64_t)>& task);

}  // namespace sparseflow::cpu
