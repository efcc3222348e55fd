// Streaming reader: a thread walks this rank's future requests (the epoch order is
// known in advance), reads hyperslabs, and queues ready batches. With the block order
// it reads whole blocks (runs of consecutive samples) into a cache that evicts the
// block used farthest in the future (or never again); other orders read exactly the
// samples of each batch, consecutive ones as one hyperslab.
#include "elbo/data/stream.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>
#include <unordered_map>

#include "elbo/util/error.hpp"
#include "elbo/util/h5.hpp"

namespace elbo::data {

Loader resolve_loader(Loader loader, double cache_mb, int64_t split_bytes) {
  if (loader != Loader::Auto) return loader;
  return split_bytes >= 0 && static_cast<double>(split_bytes) > cache_mb * 1048576.0 ? Loader::Stream : Loader::Memory;
}

StreamReader::StreamReader(const ShardSet& set, const StreamOptions& options)
    : m_set(set), m_opt(options), m_dim(set.sample_dim()) {
  // The reader thread calls HDF5 while the main thread (evaluation) and rank 0's
  // checkpoint writer may too: only a thread-safe build serializes them.
  hbool_t threadsafe = 0;
  if (H5is_library_threadsafe(&threadsafe) < 0 || !threadsafe)
    throw config_error(set.path() + ": data.loader: stream reads on a background thread, and this HDF5 library is "
                       "not built thread-safe; use data.loader: memory (or an HDF5 built with --enable-threadsafe)");
  if (m_opt.order.n > set.size())
    throw internal_error("StreamReader: " + std::to_string(m_opt.order.n) + " samples asked of a split of " +
                         std::to_string(set.size()));
}

StreamReader::~StreamReader() { stop(); }

void StreamReader::stop() {
  {
    std::lock_guard<std::mutex> lock(m_mutex);
    m_stop = true;
  }
  m_cv.notify_all();
  if (m_thread.joinable()) m_thread.join();
  m_ready.clear();
}

void StreamReader::start(int64_t epoch, int64_t b) {
  stop();
  m_stop = m_done = false;
  m_error = nullptr;
  m_opt.end_epoch = std::max(m_opt.end_epoch, epoch + 1);
  m_thread = std::thread([this, epoch, b] {
    try {
      run(epoch, b);
    } catch (...) {
      std::lock_guard<std::mutex> lock(m_mutex);
      m_error = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> lock(m_mutex);
      m_done = true;
    }
    m_cv.notify_all();
  });
}

bool StreamReader::push(Item item) {
  std::unique_lock<std::mutex> lock(m_mutex);
  m_cv.wait(lock, [&] { return m_stop || static_cast<int>(m_ready.size()) < m_opt.depth; });
  if (m_stop) return false;
  m_ready.push_back(std::move(item));
  m_cv.notify_all();
  return true;
}

void StreamReader::run(int64_t epoch, int64_t b) {
  for (; epoch < m_opt.end_epoch; ++epoch, b = 0) {
    run_epoch(epoch, b);
    std::lock_guard<std::mutex> lock(m_mutex);
    if (m_stop) return;
  }
}

void StreamReader::run_epoch(int64_t epoch, int64_t b0) {
  const OrderSpec& o = m_opt.order;
  const int64_t per_epoch = batches_per_epoch(o.n, o.batch_size, m_opt.drop_last);
  const std::vector<int64_t> order = epoch_order(o, epoch);
  const auto dim = static_cast<size_t>(m_dim);
  const auto slice_of = [&](int64_t b) {
    const int64_t g0 = b * o.batch_size, g = std::min(o.batch_size, o.n - g0);
    const Slice sl = rank_slice(g, m_opt.rank, m_opt.world);
    return std::pair<const int64_t*, int64_t>(order.data() + g0 + sl.begin, sl.count);
  };
  const bool blocks = o.shuffle && o.blocks;
  const int64_t K = blocks ? o.block : 1;

  // Blocks mode: for each block this rank touches, the batches that use it, in order.
  struct Entry {
    std::vector<uint8_t> pixels;
  };
  std::unordered_map<int64_t, std::vector<int64_t>> uses;
  std::unordered_map<int64_t, size_t> next_use;  // index into uses[block] of its next use
  std::unordered_map<int64_t, Entry> cache;
  if (blocks)
    for (int64_t b = b0; b < per_epoch; ++b) {
      auto [idx, rows] = slice_of(b);
      for (int64_t r = 0; r < rows; ++r) {
        std::vector<int64_t>& u = uses[idx[r] / K];
        if (u.empty() || u.back() != b) u.push_back(b);
      }
    }
  const auto block_rows = [&](int64_t blk) { return std::min(o.n, (blk + 1) * K) - blk * K; };
  const auto next_of = [&](int64_t blk) {
    const std::vector<int64_t>& u = uses[blk];
    const size_t k = next_use[blk];
    return k < u.size() ? u[k] : std::numeric_limits<int64_t>::max();
  };
  const auto account = [&](int64_t delta) {
    std::lock_guard<std::mutex> lock(m_mutex);
    m_cache_bytes = static_cast<uint64_t>(static_cast<int64_t>(m_cache_bytes) + delta);
    m_cache_peak = std::max(m_cache_peak, m_cache_bytes);
  };

  std::vector<int64_t> direct, sorted;
  std::vector<uint8_t> run_px;
  for (int64_t b = b0; b < per_epoch; ++b) {
    {
      std::lock_guard<std::mutex> lock(m_mutex);
      if (m_stop) return;
    }
    auto [idx, rows] = slice_of(b);
    Item item;
    item.epoch = epoch;
    item.batch = b;
    item.indices.assign(idx, idx + rows);
    item.pixels.resize(static_cast<size_t>(rows) * dim);
    direct.clear();
    if (blocks) {
      // The blocks of this batch, cached if the cache can hold them; evict what is
      // needed farthest ahead (never again first) to make room, never this batch's.
      std::vector<int64_t> mine;
      for (int64_t r = 0; r < rows; ++r)
        if (std::find(mine.begin(), mine.end(), idx[r] / K) == mine.end()) mine.push_back(idx[r] / K);
      for (int64_t blk : mine) {
        if (cache.count(blk)) continue;
        const uint64_t need = static_cast<uint64_t>(block_rows(blk)) * dim;
        while (m_cache_bytes + need > m_opt.cache_bytes) {
          int64_t victim = -1, far = -1;
          for (auto& [c, e] : cache)
            if (std::find(mine.begin(), mine.end(), c) == mine.end() && next_of(c) > far) {
              far = next_of(c);
              victim = c;
            }
          if (victim < 0) break;
          account(-static_cast<int64_t>(cache[victim].pixels.size()));
          cache.erase(victim);
        }
        if (m_cache_bytes + need > m_opt.cache_bytes) continue;  // read this batch's samples of it directly
        Entry e;
        e.pixels.resize(need);
        m_set.read_range(blk * K, block_rows(blk), e.pixels.data());
        account(static_cast<int64_t>(need));
        cache.emplace(blk, std::move(e));
      }
      for (int64_t r = 0; r < rows; ++r) {
        auto it = cache.find(idx[r] / K);
        if (it == cache.end()) {
          direct.push_back(r);
          continue;
        }
        std::memcpy(item.pixels.data() + static_cast<size_t>(r) * dim,
                    it->second.pixels.data() + static_cast<size_t>(idx[r] - it->first * K) * dim, dim);
      }
      for (int64_t blk : mine) {
        ++next_use[blk];
        if (next_of(blk) == std::numeric_limits<int64_t>::max() && cache.count(blk)) {
          account(-static_cast<int64_t>(cache[blk].pixels.size()));
          cache.erase(blk);
        }
      }
    } else {
      for (int64_t r = 0; r < rows; ++r) direct.push_back(r);
    }
    if (!direct.empty()) {
      // Exactly the samples asked for, in index order so that runs become one read each.
      std::sort(direct.begin(), direct.end(), [&](int64_t a, int64_t c) { return idx[a] < idx[c]; });
      sorted.resize(direct.size());
      for (size_t k = 0; k < direct.size(); ++k) sorted[k] = idx[direct[k]];
      sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
      run_px.resize(sorted.size() * dim);
      m_set.gather(sorted, run_px.data());
      for (int64_t r : direct) {
        const size_t k = static_cast<size_t>(std::lower_bound(sorted.begin(), sorted.end(), idx[r]) - sorted.begin());
        std::memcpy(item.pixels.data() + static_cast<size_t>(r) * dim, run_px.data() + k * dim, dim);
      }
    }
    if (!push(std::move(item))) return;
  }
  for (auto& [c, e] : cache) account(-static_cast<int64_t>(e.pixels.size()));
}

int64_t StreamReader::fetch(int64_t epoch, int64_t b, uint8_t* pixels, int64_t* indices) {
  const auto t0 = std::chrono::steady_clock::now();
  bool restart;
  {
    std::lock_guard<std::mutex> lock(m_mutex);
    restart = !m_thread.joinable() || epoch != m_want_epoch || b != m_want_batch ||
              (m_done && m_ready.empty() && !m_error);
  }
  if (restart) start(epoch, b);
  Item item;
  {
    std::unique_lock<std::mutex> lock(m_mutex);
    m_cv.wait(lock, [&] { return !m_ready.empty() || m_done; });
    if (m_ready.empty()) {
      if (m_error) std::rethrow_exception(m_error);
      throw internal_error("the stream reader ended before batch " + std::to_string(b) + " of epoch " +
                           std::to_string(epoch));
    }
    item = std::move(m_ready.front());
    m_ready.pop_front();
    m_cv.notify_all();
    if (item.epoch != epoch || item.batch != b)
      throw internal_error("the stream reader prepared batch " + std::to_string(item.batch) + " of epoch " +
                           std::to_string(item.epoch) + " where batch " + std::to_string(b) + " of epoch " +
                           std::to_string(epoch) + " was asked for");
    const int64_t per_epoch = batches_per_epoch(m_opt.order.n, m_opt.order.batch_size, m_opt.drop_last);
    m_want_epoch = b + 1 == per_epoch ? epoch + 1 : epoch;
    m_want_batch = b + 1 == per_epoch ? 0 : b + 1;
    m_wait += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  std::memcpy(pixels, item.pixels.data(), item.pixels.size());
  std::copy(item.indices.begin(), item.indices.end(), indices);
  return static_cast<int64_t>(item.indices.size());
}

StreamStats StreamReader::stats() const {
  std::lock_guard<std::mutex> lock(m_mutex);
  StreamStats s;
  s.bytes_read = m_set.bytes_read();
  s.reads = m_set.reads();
  s.cache_peak_bytes = m_cache_peak;
  s.wait_seconds = m_wait;
  return s;
}

}  // namespace elbo::data
