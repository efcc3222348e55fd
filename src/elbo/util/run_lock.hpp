// One job per run directory: an exclusive flock(2) on OUTPUT_DIR/.lock, held by rank 0
// for as long as the job lives. The kernel drops it when the process dies however it
// dies, so a killed job never leaves a stale lock; a second job on the same directory
// (a double-submitted array task, two requeues racing) is refused with the holder named.
#pragma once

#include <string>

namespace elbo {

class RunLock {
 public:
  RunLock() = default;
  // Creates `dir` if needed and locks it; throws a Config error naming the holder (host,
  // pid, start time, as it wrote them into the lock file) when another process holds it.
  explicit RunLock(const std::string& dir);
  ~RunLock();
  RunLock(RunLock&& other) noexcept;
  RunLock& operator=(RunLock&& other) noexcept;
  RunLock(const RunLock&) = delete;
  RunLock& operator=(const RunLock&) = delete;

  bool held() const { return m_fd >= 0; }

 private:
  int m_fd = -1;
};

}  // namespace elbo
