// TensorBoard event files: scalars and PNG images as Event protocol buffers
// (viz/tensorboard.proto) in TFRecord framing, readable by `tensorboard --logdir`.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "elbo/viz/image.hpp"

namespace elbo::viz {

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), continuing from `crc`
// (0 to start); crc32c("123456789") == 0xE3069283.
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);

// TFRecord stores CRCs rotated and offset, because a CRC of data that itself holds
// CRCs is weak: ((crc >> 15) | (crc << 17)) + 0xa282ead8.
uint32_t masked_crc32c(const void* data, size_t n);

// One TFRecord: uint64 length (little-endian), masked CRC of those 8 bytes, the
// data, masked CRC of the data.
std::string frame_record(std::string_view data);

// Splits a file's bytes into its records' data, checking both CRCs of every record;
// a Data error names `what` (the file) and the record's offset. A record cut short
// at the end (a writer killed mid-record) ends the list without an error.
std::vector<std::string> read_records(std::string_view bytes, const std::string& what);

// The step of a serialized Event (0 when absent); a Data error names `what` when the
// bytes are no Event.
int64_t event_step(const std::string& event, const std::string& what);

// Appends events to a new file DIR/events.out.tfevents.<unix time>.<hostname>
// (".1", ".2", ... appended when that name exists: a run resumed within the second).
// The file opens with the version record TensorBoard expects. Writes are buffered;
// flush() hands them to the OS so that a running `tensorboard` sees them. Io errors
// name the file. Not thread-safe; one writer per process (rank 0).
class EventWriter {
 public:
  explicit EventWriter(const std::string& dir);
  ~EventWriter();
  EventWriter(const EventWriter&) = delete;
  EventWriter& operator=(const EventWriter&) = delete;

  // Several scalars of one step in one event.
  void scalars(int64_t step, const std::vector<std::pair<std::string, double>>& values);
  void scalar(const std::string& tag, int64_t step, double value) { scalars(step, {{tag, value}}); }
  // An encoded PNG of `height` x `width` pixels with 1 (gray) or 3 (RGB) channels.
  void image(const std::string& tag, int64_t step, const std::string& png, int height, int width, int channels);
  void image(const std::string& tag, int64_t step, const Image& img) {
    image(tag, step, encode_png(img), img.height, img.width, img.channels);
  }
  void flush();

  const std::string& path() const { return m_path; }

 private:
  void write_event(const std::string& serialized);

  std::string m_path;
  std::FILE* m_file = nullptr;
};

// A metrics.csv row (and its header) as scalars: every non-empty cell under
// "test/X" for a column "test_X" and "train/<column>" for the others. The "step"
// column becomes the events' step, not a scalar. The values are the CSV's text
// parsed, so TensorBoard shows exactly what metrics.csv holds.
struct MetricsRow {
  int64_t step = 0;
  std::vector<std::pair<std::string, double>> scalars;
};
MetricsRow metrics_row(std::string_view header, std::string_view row);

// For a resumed run: drops, from every event file in `dir`, the events after `step`
// (logged by the interrupted run after its checkpoint), so the resumed run's new file
// repeats no step; the version record stays. Files are rewritten atomically, and only
// when something is dropped; a temporary file a killed rewrite left is removed. A
// missing `dir` is no error.
void truncate_event_files(const std::string& dir, int64_t step);

}  // namespace elbo::viz
