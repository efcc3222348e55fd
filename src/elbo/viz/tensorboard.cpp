// TensorBoard event files: CRC-32C, TFRecord framing, and the Event messages built
// with libprotobuf from viz/tensorboard.proto.
#include "elbo/viz/tensorboard.hpp"

#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "elbo/util/error.hpp"
#include "elbo/util/files.hpp"
#include "elbo/viz/tensorboard.pb.h"

namespace elbo::viz {
namespace fs = std::filesystem;

namespace {

constexpr std::array<uint32_t, 256> make_crc32c_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    t[i] = c;
  }
  return t;
}
constexpr std::array<uint32_t, 256> kCrc32cTable = make_crc32c_table();

void put_u32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xffu));
}
uint32_t get_u32(const char* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}
uint64_t get_u64(const char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

double unix_time() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string host_name() {
  char h[256] = {};
  if (gethostname(h, sizeof(h) - 1) != 0 || h[0] == '\0') return "localhost";
  return h;
}

std::string serialize(const tb::Event& e) {
  std::string out;
  ELBO_ASSERT(e.SerializeToString(&out), "protobuf could not serialize an Event");
  return out;
}

}  // namespace

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  const auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = kCrc32cTable[(crc ^ p[i]) & 0xffu] ^ (crc >> 8);
  return ~crc;
}

uint32_t masked_crc32c(const void* data, size_t n) {
  const uint32_t crc = crc32c(data, n);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

std::string frame_record(std::string_view data) {
  std::string out;
  out.reserve(data.size() + 16);
  const uint64_t len = data.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((len >> (8 * i)) & 0xffu));
  put_u32(out, masked_crc32c(out.data(), 8));
  out.append(data);
  put_u32(out, masked_crc32c(data.data(), data.size()));
  return out;
}

std::vector<std::string> read_records(std::string_view bytes, const std::string& what) {
  std::vector<std::string> records;
  size_t pos = 0;
  while (bytes.size() - pos >= 12) {
    const uint64_t len = get_u64(bytes.data() + pos);
    if (get_u32(bytes.data() + pos + 8) != masked_crc32c(bytes.data() + pos, 8))
      throw data_error(what + ": the length of the record at byte " + std::to_string(pos) + " fails its CRC");
    if (len > bytes.size() - pos - 12 || bytes.size() - pos - 12 - len < 4) break;  // cut short
    const char* data = bytes.data() + pos + 12;
    if (get_u32(data + len) != masked_crc32c(data, len))
      throw data_error(what + ": the record at byte " + std::to_string(pos) + " fails its CRC");
    records.emplace_back(data, len);
    pos += 12 + len + 4;
  }
  return records;
}

int64_t event_step(const std::string& event, const std::string& what) {
  tb::Event e;
  if (!e.ParseFromString(event)) throw data_error(what + ": a record holds no TensorBoard Event");
  return e.step();
}

EventWriter::EventWriter(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw io_error("cannot create " + dir + ": " + ec.message());
  const double now = unix_time();
  const std::string base =
      (fs::path(dir) / ("events.out.tfevents." + std::to_string(static_cast<long long>(now)) + "." + host_name()))
          .string();
  m_path = base;
  // "x": never append to or replace another writer's file.
  for (int k = 1; (m_file = std::fopen(m_path.c_str(), "wbx")) == nullptr && errno == EEXIST && k < 1000; ++k)
    m_path = base + "." + std::to_string(k);
  if (m_file == nullptr) throw io_error("cannot create " + m_path + ": " + std::strerror(errno));
  tb::Event e;
  e.set_wall_time(now);
  e.set_file_version("brain.Event:2");
  write_event(serialize(e));
  flush();
}

EventWriter::~EventWriter() {
  if (m_file != nullptr && std::fclose(m_file) != 0)
    std::fprintf(stderr, "elbo: warning: closing %s: %s\n", m_path.c_str(), std::strerror(errno));
}

void EventWriter::scalars(int64_t step, const std::vector<std::pair<std::string, double>>& values) {
  tb::Event e;
  e.set_wall_time(unix_time());
  e.set_step(step);
  for (const auto& [tag, v] : values) {
    tb::Summary::Value* val = e.mutable_summary()->add_value();
    val->set_tag(tag);
    val->set_simple_value(static_cast<float>(v));  // TensorBoard's scalars are float32
  }
  write_event(serialize(e));
}

void EventWriter::image(const std::string& tag, int64_t step, const std::string& png, int height, int width,
                        int channels) {
  ELBO_ASSERT(channels == 1 || channels == 3, "EventWriter::image: 1 or 3 channels");
  tb::Event e;
  e.set_wall_time(unix_time());
  e.set_step(step);
  tb::Summary::Value* val = e.mutable_summary()->add_value();
  val->set_tag(tag);
  tb::Summary::Image* img = val->mutable_image();
  img->set_height(height);
  img->set_width(width);
  img->set_colorspace(channels);
  img->set_encoded_image_string(png);
  write_event(serialize(e));
}

void EventWriter::write_event(const std::string& serialized) {
  const std::string rec = frame_record(serialized);
  if (std::fwrite(rec.data(), 1, rec.size(), m_file) != rec.size())
    throw io_error("cannot write " + m_path + ": " + std::strerror(errno));
}

void EventWriter::flush() {
  if (std::fflush(m_file) != 0) throw io_error("cannot write " + m_path + ": " + std::strerror(errno));
}

MetricsRow metrics_row(std::string_view header, std::string_view row) {
  auto split = [](std::string_view line) {
    std::vector<std::string> cells;
    while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.remove_suffix(1);
    size_t start = 0;
    for (size_t comma; (comma = line.find(',', start)) != std::string_view::npos; start = comma + 1)
      cells.emplace_back(line.substr(start, comma - start));
    cells.emplace_back(line.substr(start));
    return cells;
  };
  const std::vector<std::string> cols = split(header), cells = split(row);
  ELBO_ASSERT(cols.size() == cells.size(), "metrics_row: the row has " + std::to_string(cells.size()) +
                                               " cells, the header " + std::to_string(cols.size()));
  MetricsRow out;
  for (size_t i = 0; i < cols.size(); ++i) {
    if (cells[i].empty()) continue;
    if (cols[i] == "kl_groups") {  // one value per latent group, ';'-separated
      std::string_view rest = cells[i];
      for (int l = 0;; ++l) {
        const size_t semi = rest.find(';');
        const std::string v(rest.substr(0, semi));
        char* end = nullptr;
        const double x = std::strtod(v.c_str(), &end);
        ELBO_ASSERT(!v.empty() && end == v.c_str() + v.size(),
                    "metrics_row: '" + std::string(cells[i]) + "' in column kl_groups is no list of numbers");
        out.scalars.emplace_back("train/kl_group_" + std::to_string(l), x);
        if (semi == std::string_view::npos) break;
        rest.remove_prefix(semi + 1);
      }
      continue;
    }
    char* end = nullptr;
    const double v = std::strtod(cells[i].c_str(), &end);  // not stod: it throws on subnormals
    ELBO_ASSERT(end == cells[i].c_str() + cells[i].size(),
                "metrics_row: '" + cells[i] + "' in column " + cols[i] + " is no number");
    if (cols[i] == "step")
      out.step = static_cast<int64_t>(v);
    else if (cols[i].rfind("test_", 0) == 0)
      out.scalars.emplace_back("test/" + cols[i].substr(5), v);
    else
      out.scalars.emplace_back("train/" + cols[i], v);
  }
  return out;
}

void truncate_event_files(const std::string& dir, int64_t step) {
  // The names first: the rewrites below add and rename files in `dir`.
  std::vector<fs::path> files;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec))
    if (entry.path().filename().string().rfind("events.out.tfevents.", 0) == 0 && entry.is_regular_file())
      files.push_back(entry.path());
  if (ec && ec != std::errc::no_such_file_or_directory) throw io_error("cannot list " + dir + ": " + ec.message());
  for (const fs::path& file : files) {
    const std::string path = file.string();
    if (file.extension() == ".tmp") {  // left by a rewrite that was killed; TensorBoard would read it
      if (!fs::remove(file, ec) && ec) throw io_error("cannot remove " + path + ": " + ec.message());
      continue;
    }
    std::ifstream in(path, std::ios::binary);
    if (!in) throw io_error("cannot read " + path);
    const std::string bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    if (in.bad()) throw io_error("cannot read " + path);
    std::string kept;
    size_t dropped = 0;
    for (const std::string& rec : read_records(bytes, path)) {
      if (event_step(rec, path) > step) {
        ++dropped;
        continue;
      }
      kept += frame_record(rec);
    }
    // A record cut short by a killed writer is dropped too.
    if (dropped > 0 || kept.size() != bytes.size()) {
      write_file_durably(path + ".tmp", kept.data(), kept.size());
      rename_into_place(path + ".tmp", path);
    }
  }
}

}  // namespace elbo::viz
