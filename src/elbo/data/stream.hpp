// The streaming reader (data.loader: stream): this rank's rows of each global batch,
// read from the shard files on a background thread ahead of the step, with at most
// data.cache_mb of pixels held. It follows the same epoch order as the memory loader.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "elbo/config/choices.hpp"
#include "elbo/data/sampler.hpp"
#include "elbo/data/shards.hpp"

namespace elbo::data {

// data.loader resolved for a split: Memory or Stream. Auto holds the split in memory
// when its pixels fit in cache_mb, else streams it. split_bytes < 0 (unknown) = memory.
Loader resolve_loader(Loader loader, double cache_mb, int64_t split_bytes);

struct StreamOptions {
  OrderSpec order;           // order.n may be below set.size() (data.max_samples)
  int rank = 0, world = 1;
  bool drop_last = false;
  int64_t end_epoch = 1;     // the read-ahead stops at the start of this epoch
  uint64_t cache_bytes = 64 << 20;
  int depth = 2;             // batches prepared ahead
};

struct StreamStats {
  uint64_t bytes_read = 0;         // pixel bytes read from the files
  uint64_t reads = 0;              // hyperslab reads
  uint64_t cache_peak_bytes = 0;   // most pixel bytes the block cache held at once
  double wait_seconds = 0;         // time fetch() waited for the reader
};

class StreamReader {
 public:
  StreamReader(const ShardSet& set, const StreamOptions& options);
  ~StreamReader();
  StreamReader(const StreamReader&) = delete;
  StreamReader& operator=(const StreamReader&) = delete;

  // This rank's rows of batch b of `epoch`: pixels (rows x sample_dim) and their
  // dataset indices. Calls normally come in training order; any other call restarts
  // the read-ahead there (a resume, a jump). Returns the number of rows.
  int64_t fetch(int64_t epoch, int64_t b, uint8_t* pixels, int64_t* indices);

  StreamStats stats() const;

 private:
  struct Item {
    int64_t epoch = -1, batch = -1;
    std::vector<uint8_t> pixels;
    std::vector<int64_t> indices;
  };
  void start(int64_t epoch, int64_t b);
  void stop();
  void run(int64_t epoch, int64_t b);
  void run_epoch(int64_t epoch, int64_t b0);
  bool push(Item item);  // false when asked to stop

  const ShardSet& m_set;
  StreamOptions m_opt;
  int64_t m_dim;
  std::thread m_thread;
  mutable std::mutex m_mutex;
  std::condition_variable m_cv;
  std::deque<Item> m_ready;
  bool m_stop = false, m_done = false;
  int64_t m_want_epoch = -1, m_want_batch = -1;  // the call fetch() expects next
  std::exception_ptr m_error;
  uint64_t m_cache_bytes = 0, m_cache_peak = 0;
  double m_wait = 0;
};

}  // namespace elbo::data
