// Kernels split their work into tasks (parallel_for). Where the build shares torch's libgomp they
// run on torch's OpenMP workers, which are awake between torch ops; otherwise on a small
// persistent pool of our own. The pool: kernels split their work into tasks and run them on
// `threads` threads (the caller included). A second OpenMP runtime would fight torch's for the
// cores, so a build (or process) that cannot share torch's uses the pool.
#pragma once
#include <cstdint>
#include <functional>

namespace sparseflow::cpu {

// Runs task(i) for i in [0, n_tasks) on up to `threads` threads and returns when all are done.
// Safe to call from several threads at once: a call that finds the pool busy runs inline.
void parallel_for(int64_t n_tasks, int threads, const std::function<void(int64_t)>& task);

// The same on torch's OpenMP threads when the build shares torch's libgomp (see CMakeLists.txt),
// else on the pool above. For work that alternates with torch ops: torch's workers are awake and
// take it at once, where the pool's threads would compete with them for the cores.
void parallel_for_torch_threads(int64_t n_tasks, int threads, const std::function<void(int64_t)>& task);
bool shares_torch_threads();  // whether parallel_for_torch_threads uses OpenMP
// Turns the OpenMP path off (or back on, where built): for a process whose torch brought a libgomp
// of another name, where ours would be a second runtime with workers of its own.
void set_shares_torch_threads(bool on);

}  // namespace sparseflow::cpu
