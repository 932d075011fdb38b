// How hra spreads its large matrix products over threads: coarse tasks, same bits for any
// thread count.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "detail/checks.hpp"
#include "detail/platform.hpp"

#if HRA_POSIX
#include <unistd.h>
#endif

namespace hra {

namespace detail {

/// \brief A small pool of worker threads for hra's large products (internal).
///
/// run(count, task) calls task(0) ... task(count - 1), each exactly once, on the calling thread
/// and the workers, which take the next index from a shared counter (a slow or descheduled
/// thread only delays the tasks it took). Workers sleep between runs, so an idle pool costs
/// nothing and never spins against a process that shares the cores. Nested runs, runs in a
/// child process after fork() (which inherits no worker threads), and runs while Eigen has
/// OpenMP threads of its own (Eigen::nbThreads() > 1, an HRA_USE_OPENMP build) execute
/// serially: there every product inside a task is already split by Eigen, and a pool thread
/// would start a second OpenMP team beside it (merge of a 4096^2 float W at r = 8 took 817 ms
/// that way on 2 cores, 129x a copy of W).
class ThreadPool {
 public:
  static ThreadPool& instance() {
    static ThreadPool pool;
    return pool;
  }

  /// Threads a run uses, the caller included (>= 1).
  int threads() const { return threads_.load(std::memory_order_relaxed); }

  void set_threads(int n) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    stop_workers();
    threads_.store(std::max(1, n), std::memory_order_relaxed);
  }

  void run(std::int64_t count, const std::function<void(std::int64_t)>& task) {
    if (count <= 0) return;
    if (count == 1 || threads() == 1 || in_run_ || forked() || Eigen::nbThreads() > 1) {
      for (std::int64_t i = 0; i < count; ++i) task(i);
      return;
    }
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    start_workers();
    auto job = std::make_shared<Job>(task, count);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = job;
      ++generation_;
    }
    wake_.notify_all();
    in_run_ = true;
    work(*job);
    in_run_ = false;
    std::unique_lock<std::mutex> lock(mutex_);
    finished_.wait(lock, [&] { return job->done.load() == count; });
    job_.reset();
  }

  ~ThreadPool() {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    stop_workers();
  }

 private:
  ThreadPool() : threads_(default_threads()) {}

  static int default_threads() {
    if (const char* env = std::getenv("HRA_NUM_THREADS")) {
      const int n = std::atoi(env);
      if (n >= 1) return n;
    }
    const unsigned hw = std::thread::hardware_concurrency();
    return hw == 0 ? 1 : static_cast<int>(hw);
  }

  bool forked() const {
#if HRA_POSIX
    return !workers_.empty() && ::getpid() != owner_pid_;
#else
    return false;
#endif
  }

  // One run: its tasks, the next index to take and how many have finished. A worker that
  // wakes late holds the job it woke for, whose counter is exhausted by then.
  struct Job {
    Job(const std::function<void(std::int64_t)>& t, std::int64_t c) : task(t), count(c) {}
    const std::function<void(std::int64_t)>& task;
    const std::int64_t count;
    std::atomic<std::int64_t> next{0}, done{0};
  };

  // Runs tasks of `job` until none is left.
  void work(Job& job) {
    for (std::int64_t i = job.next.fetch_add(1); i < job.count; i = job.next.fetch_add(1)) {
      job.task(i);
      if (job.done.fetch_add(1) + 1 == job.count) {
        std::lock_guard<std::mutex> lock(mutex_);
        finished_.notify_all();
      }
    }
  }

  void start_workers() {
    const int wanted = threads() - 1;
    if (static_cast<int>(workers_.size()) == wanted) return;
    stop_workers();
    stopping_ = false;
#if HRA_POSIX
    owner_pid_ = ::getpid();
#endif
    for (int t = 0; t < wanted; ++t) workers_.emplace_back([this] { worker_loop(); });
  }

  void stop_workers() {
    if (workers_.empty()) return;
    if (forked()) {  // the threads do not exist in this process: forget them
      for (auto& w : workers_) w.detach();
      workers_.clear();
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
  }

  void worker_loop() {
    in_run_ = true;  // tasks a worker runs never start nested runs
    std::uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
        if (stopping_) return;
        seen = generation_;
        job = job_;
      }
      if (job) work(*job);
    }
  }

  std::atomic<int> threads_;
  std::mutex run_mutex_;  // one run at a time
  std::mutex mutex_;
  std::condition_variable wake_, finished_;
  std::vector<std::thread> workers_;
  std::shared_ptr<Job> job_;  // the run in progress, if any
  std::uint64_t generation_ = 0;
  bool stopping_ = false;
#if HRA_POSIX
  pid_t owner_pid_ = 0;
#endif
  static thread_local bool in_run_;
};

inline thread_local bool ThreadPool::in_run_ = false;

/// Products of at least this many multiply-adds are split over threads; smaller ones run on
/// the calling thread (a split costs a few microseconds and, on a shared machine, a wait for the
/// slowest thread: only long tasks make that negligible).
inline constexpr double parallel_product_min_madds = 64.0 * 1024 * 1024;
/// Rows or columns per task (at least): narrow slices would change Eigen's kernels.
inline constexpr Eigen::Index parallel_product_min_cols = 64;
/// The threshold of thin_product(): products with one dimension of r (the chain's U, d x r, with a
/// d x n batch; HraLinear's low-rank form's W V, V and K with a batch) stream the large operand
/// with few flops per byte and gain from a second thread at a lower size (at 4096 x 512, r = 8,
/// 16 Mi multiply-adds each, the headline layer's HRA overhead over the frozen layer went from
/// 8 ms, 1.069x, to 6 ms, 1.044x, with them split). Below it, as above, no task is ever waited
/// for.
inline constexpr double parallel_thin_min_madds = 8.0 * 1024 * 1024;

}  // namespace detail

/// Threads hra's large products use, the calling thread included. The default is the number of
/// hardware threads, or HRA_NUM_THREADS from the environment. Results do not depend on it.
inline int num_threads() {
  return detail::ThreadPool::instance().threads();
}

/// Sets the number of threads for hra's large products (n <= 1: single-threaded).
inline void set_num_threads(int n) {
  detail::ThreadPool::instance().set_threads(n);
}

}  // namespace hra
