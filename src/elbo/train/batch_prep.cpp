// The training data of a run and the preparation of each step's batch (see batch_prep.hpp).
#include "elbo/train/batch_prep.hpp"

#include <algorithm>
#include <chrono>
#include <span>

#include "elbo/util/error.hpp"
#include "elbo/util/files.hpp"

namespace elbo {

namespace {

// The samples a run trains on: the split, or its first data.max_samples.
int64_t training_samples(const ExperimentSpec& spec, const data::ShardSet& set) {
  return spec.data.max_samples > 0 ? std::min(spec.data.max_samples, set.size()) : set.size();
}

}  // namespace

void open_training_data(const ExperimentSpec& spec, Communicator& comm, TrainingData& d) {
  const int rank = comm.rank(), world = comm.size();
  // data.loader per split: memory (every rank loads and verifies all of it) or stream
  // (metadata only; the ranks share the checksum verification, each reads its part).
  d.train_loader = data::resolve_loader(spec.data.loader, spec.data.cache_mb, data::split_bytes(spec.data.train));
  const Loader test_loader = spec.data.test.empty() ? Loader::Memory
      : data::resolve_loader(spec.data.loader, spec.data.cache_mb, data::split_bytes(spec.data.test));
  const auto open_options = [&](Loader loader) {
    return data::OpenOptions{loader == Loader::Memory, rank, world};
  };
  collectively(comm, [&] {
    d.train.emplace(data::ShardSet::open(spec.data.train, open_options(d.train_loader)));
    std::vector<int> shape = {d.train->channels(), d.train->height(), d.train->width()};
    if (!spec.data.shape.empty() && spec.data.shape != shape)
      throw data_error(spec.data.train + ": shards hold samples of shape " + shape_string(shape, "[]") +
                       " but the spec (" + spec.source + ", data.shape) says " + shape_string(spec.data.shape, "[]"));
    if (!spec.data.test.empty() && (spec.eval.at_end || spec.eval.every > 0)) {
      d.test.emplace(data::ShardSet::open(spec.data.test, open_options(test_loader)));
      std::vector<int> tshape = {d.test->channels(), d.test->height(), d.test->width()};
      if (tshape != shape)
        throw data_error(spec.data.test + ": test shards hold samples of shape " + shape_string(tshape, "[]") +
                         " but the training shards (" + spec.data.train + ") hold " + shape_string(shape, "[]"));
    }
    const int64_t n = training_samples(spec, *d.train);
    if (n == 0) throw data_error(spec.data.train + ": the training split is empty");
    if (spec.train.drop_last && n < spec.train.batch_size)
      throw config_error(spec.source + ": train.batch_size " + std::to_string(spec.train.batch_size) +
                         " exceeds the " + std::to_string(n) + " training samples with train.drop_last: true");
  });
  d.input_shape = {d.train->channels(), d.train->height(), d.train->width()};
  d.n = training_samples(spec, *d.train);
  d.dim = static_cast<int>(d.train->sample_dim());
}

data::OrderSpec training_order(const ExperimentSpec& spec, int64_t n, int dim) {
  data::OrderSpec o;
  o.n = n;
  o.batch_size = spec.train.batch_size;
  o.seed = spec.seed;
  o.shuffle = spec.data.shuffle != Shuffle::Off;
  o.blocks = spec.data.shuffle == Shuffle::Blocks;
  o.block = data::shuffle_block_samples(dim);
  return o;
}

BatchPrep::BatchPrep(Backend<float>& be, const TrainingData& data, const ExperimentSpec& spec, int rank, int world,
                     int local_rows)
    : m_set(*data.train), m_spec(spec), m_order(training_order(spec, data.n, data.dim)), m_n(data.n), m_rank(rank),
      m_world(world), m_dim(data.dim), m_pixels(static_cast<size_t>(local_rows) * data.dim),
      m_idx(static_cast<size_t>(local_rows)) {
  if (data.train_loader == Loader::Stream) {
    data::StreamOptions so;
    so.order = m_order;
    so.rank = rank;
    so.world = world;
    so.drop_last = spec.train.drop_last;
    so.end_epoch = spec.train.epochs;
    so.cache_bytes = static_cast<uint64_t>(spec.data.cache_mb * 1048576.0);
    m_stream = std::make_unique<data::StreamReader>(*data.train, so);
  }
  // In pinned memory on a GPU so that the upload need not wait: every step that
  // uploads also downloads its losses (a synchronization) before the next step
  // writes here again.
  for (auto& b : m_bufs)
    b.host = std::make_unique<HostBuffer<float, float>>(be, static_cast<size_t>(local_rows) * data.dim);
}

BatchPrep::Batch BatchPrep::get(int64_t epoch, int64_t b) {
  const auto t0 = std::chrono::steady_clock::now();
  Buf* ready = nullptr;
  for (auto& buf : m_bufs)
    if (buf.epoch == epoch && buf.batch == b) ready = &buf;
  if (ready == nullptr) ready = &fill(m_bufs[m_last == &m_bufs[0] ? 1 : 0], epoch, b);
  m_last = ready;
  m_busy_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return ready->batch_info;
}

void BatchPrep::prefetch(int64_t epoch, int64_t b) {
  const auto t0 = std::chrono::steady_clock::now();
  fill(m_bufs[m_last == &m_bufs[0] ? 1 : 0], epoch, b);
  m_busy_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double BatchPrep::take_busy_seconds() {
  const double s = m_busy_s;
  m_busy_s = 0;
  return s;
}

const std::vector<int64_t>& BatchPrep::epoch_order(int64_t epoch) {
  for (auto& [e, o] : m_orders)
    if (e == epoch) return o;
  // Two epochs at most are in play: the current one and the next.
  auto& slot = m_orders[m_orders[0].first <= m_orders[1].first ? 0 : 1];
  slot = {epoch, data::epoch_order(m_order, epoch)};
  return slot.second;
}

BatchPrep::Buf& BatchPrep::fill(Buf& buf, int64_t epoch, int64_t b) {
  const int64_t B = m_spec.train.batch_size, g_begin = b * B, g_rows = std::min(B, m_n - g_begin);
  const data::Slice sl = data::rank_slice(g_rows, m_rank, m_world);
  buf.epoch = epoch;
  buf.batch = b;
  buf.batch_info = Batch{buf.host->data(), static_cast<int>(sl.count), g_rows, sl.begin};
  const int64_t* idx = m_idx.data();
  if (m_stream != nullptr) {
    m_stream->fetch(epoch, b, m_pixels.data(), m_idx.data());  // also for no rows: it keeps the reader in step
  } else if (sl.count > 0) {
    idx = epoch_order(epoch).data() + g_begin + sl.begin;
    m_set.gather(std::span<const int64_t>(idx, sl.count), m_pixels.data());
  }
  if (sl.count > 0) {
    data::pixels_to_input<float>(m_pixels.data(), idx, sl.count, m_dim, m_spec.data.binarize, m_spec.seed,
                                 static_cast<uint32_t>(epoch), buf.host->data());
  }
  return buf;
}

}  // namespace elbo
