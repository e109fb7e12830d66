#include "cpu/thread_pool.h"

#include <cstdlib>

#include <immintrin.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(SPARSEFLOW_SHARED_OPENMP) && defined(_OPENMP)
#include <omp.h>
#endif

namespace sparseflow::cpu {
namespace {

class ThreadPool {
 public:
  void run(int64_t n_tasks, int threads, const std::function<void(int64_t)>& task) {
    std::unique_lock<std::mutex> job(job_mutex_, std::try_to_lock);
    if (!job.owns_lock() || threads <= 1 || n_tasks <= 1) {
      for (int64_t i = 0; i < n_tasks; ++i) task(i);
      return;
    }
    const int helpers = static_cast<int>(std::min<int64_t>(threads, n_tasks)) - 1;
    while (static_cast<int>(workers_.size()) < helpers) {
      const int id = static_cast<int>(workers_.size());
      // The worker starts from the job number before this one, so it cannot miss this job.
      const uint64_t before = job_.load(std::memory_order_relaxed);
      workers_.emplace_back([this, id, before] { worker_loop(id, before); });
      workers_.back().detach();  // the pool lives for the whole process
    }
    task_ = &task;
    n_tasks_ = n_tasks;
    next_.store(0, std::memory_order_relaxed);
    finished_.store(false, std::memory_order_seq_cst);
    {
      // One word holds the job number and its helper count, so a worker never pairs one job's
      // number with another job's count.
      std::lock_guard<std::mutex> lock(wake_mutex_);
      const uint64_t next_job = (job_.load(std::memory_order_relaxed) >> 16) + 1;
      job_.store((next_job << 16) | static_cast<uint64_t>(helpers), std::memory_order_release);
    }
    wake_.notify_all();
    drain();
    // Wait only for workers that are inside this job, not for ones the OS has not scheduled yet
    // (on a busy machine that can take milliseconds): a late worker sees `finished_` and backs off.
    finished_.store(true, std::memory_order_seq_cst);
    while (running_.load(std::memory_order_seq_cst) != 0) _mm_pause();
  }

 private:
  void drain() {
    for (int64_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < n_tasks_;) (*task_)(i);
  }

  void worker_loop(int id, uint64_t seen) {
    for (;;) {
      // Spin briefly (a decode step calls us again within microseconds), then sleep. Short, so that
      // a spinning worker does not steal the core from the next op (torch's own threads included).
      for (int spin = 0; spin < 1000 && job_.load(std::memory_order_acquire) == seen; ++spin) _mm_pause();
      if (job_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(wake_mutex_);
        wake_.wait(lock, [&] { return job_.load(std::memory_order_acquire) != seen; });
      }
      seen = job_.load(std::memory_order_acquire);
      if (id < static_cast<int>(seen & 0xffff)) {
        running_.fetch_add(1, std::memory_order_seq_cst);
        if (!finished_.load(std::memory_order_seq_cst) && job_.load(std::memory_order_seq_cst) == seen) drain();
        running_.fetch_sub(1, std::memory_order_seq_cst);
      }
    }
  }

  std::mutex job_mutex_;
  std::mutex wake_mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> job_{0};  // (job number << 16) | helpers
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t n_tasks_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int> running_{0};     // workers inside the current job
  std::atomic<bool> finished_{true};  // the caller has drained every task of the current job
};

ThreadPool& pool() {
  static ThreadPool* instance = new ThreadPool();  // never destroyed: workers may still be asleep at exit
  return *instance;
}

}  // namespace

// Kernels run between torch ops, whose OpenMP workers keep spinning for a while after each op: on
// a machine with as many cores as threads, our own pool's worker then waits for a core. Where the
// build shares torch's libgomp, the kernels run on those same workers instead (SPARSEFLOW_OWN_POOL=1
// keeps the pool, for comparison).
static bool use_own_pool() {
  static const bool own = [] {
    const char* v = std::getenv("SPARSEFLOW_OWN_POOL");
    return v != nullptr && v[0] == '1';
  }();
  return own;
}

void parallel_for_torch_threads(int64_t n_tasks, int threads, const std::function<void(int64_t)>& task);

void parallel_for(int64_t n_tasks, int threads, const std::function<void(int64_t)>& task) {
  if (use_own_pool()) {
    pool().run(n_tasks, threads, task);
    return;
  }
  parallel_for_torch_threads(n_tasks, threads, task);
}

#if defined(SPARSEFLOW_SHARED_OPENMP) && defined(_OPENMP)
std::atomic<bool> g_openmp_on{true};
#else
std::atomic<bool> g_openmp_on{false};
#endif

void parallel_for_torch_threads(int64_t n_tasks, int threads, const std::function<void(int64_t)>& task) {
#if defined(SPARSEFLOW_SHARED_OPENMP) && defined(_OPENMP)
  if (threads > 1 && n_tasks > 1 && g_openmp_on.load(std::memory_order_relaxed) && !omp_in_parallel()) {
    std::atomic<int64_t> next{0};
    // Only GOMP_parallel and omp_get_* are used: symbols every libgomp since GCC 4.9 exports.
#pragma omp parallel num_threads(static_cast<int>(std::min<int64_t>(threads, n_tasks)))
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n_tasks;) task(i);
    return;
  }
#endif
  pool().run(n_tasks, threads, task);
}

bool shares_torch_threads() { return g_openmp_on.load(); }

void set_shares_torch_threads(bool on) {
#if defined(SPARSEFLOW_SHARED_OPENMP) && defined(_OPENMP)
  g_openmp_on.store(on);
#else
  (void)on;
#endif
}

}  // namespace sparseflow::cpu
