// TensorBoard event files: CRC-32C against published vectors, the TFRecord framing,
// and events decoded by a protobuf wire-format reader written here (independent of
// libprotobuf and of viz/tensorboard.proto).
#include "elbo/viz/tensorboard.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "elbo/util/error.hpp"

namespace fs = std::filesystem;
using namespace elbo;
using namespace elbo::viz;

namespace {

// --- a minimal protobuf wire-format reader: field number -> its values in order ---
struct Field {
  int wire = 0;         // 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32
  uint64_t number = 0;  // varint / fixed value
  std::string bytes;    // length-delimited payload
};
using Message = std::multimap<int, Field>;

uint64_t varint(const std::string& s, size_t& pos) {
  uint64_t v = 0;
  for (int shift = 0;; shift += 7) {
    if (pos >= s.size() || shift > 63) throw std::runtime_error("bad varint");
    const uint8_t b = static_cast<uint8_t>(s[pos++]);
    v |= static_cast<uint64_t>(b & 0x7f) << shift;
    if (!(b & 0x80)) return v;
  }
}

Message decode(const std::string& s) {
  Message m;
  size_t pos = 0;
  while (pos < s.size()) {
    const uint64_t key = varint(s, pos);
    Field f;
    f.wire = static_cast<int>(key & 7);
    if (f.wire == 0) {
      f.number = varint(s, pos);
    } else if (f.wire == 1 || f.wire == 5) {
      const size_t n = f.wire == 1 ? 8 : 4;
      if (pos + n > s.size()) throw std::runtime_error("truncated fixed field");
      for (size_t i = 0; i < n; ++i) f.number |= static_cast<uint64_t>(static_cast<uint8_t>(s[pos + i])) << (8 * i);
      pos += n;
    } else if (f.wire == 2) {
      const uint64_t n = varint(s, pos);
      if (pos + n > s.size()) throw std::runtime_error("truncated bytes field");
      f.bytes = s.substr(pos, n);
      pos += n;
    } else {
      throw std::runtime_error("unexpected wire type " + std::to_string(f.wire));
    }
    m.emplace(static_cast<int>(key >> 3), f);
  }
  return m;
}

const Field& one(const Message& m, int field, int wire) {
  auto it = m.find(field);
  if (it == m.end() || m.count(field) != 1) throw std::runtime_error("field " + std::to_string(field) + " not once");
  if (it->second.wire != wire) throw std::runtime_error("field " + std::to_string(field) + " has another wire type");
  return it->second;
}
float as_float(const Field& f) {
  const auto bits = static_cast<uint32_t>(f.number);
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}
double as_double(const Field& f) {
  double v;
  std::memcpy(&v, &f.number, 8);
  return v;
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

uint32_t le32(const std::string& s, size_t at) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(s[at + i]);
  return v;
}

struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("elbo_tb_" + std::to_string(getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(path);
  }
  ~TempDir() { fs::remove_all(path); }
};

std::vector<fs::path> event_files(const fs::path& dir) {
  std::vector<fs::path> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().rfind("events.out.tfevents.", 0) == 0) out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

TEST(Crc32c, PublishedVectors) {
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
  EXPECT_EQ(crc32c("", 0), 0u);
  // RFC 3720 (iSCSI) appendix B.4: 32 zero bytes, 32 0xFF bytes, 0..31 and 31..0.
  std::string zeros(32, '\0'), ones(32, '\xff'), up(32, 0), down(32, 0);
  for (int i = 0; i < 32; ++i) {
    up[i] = static_cast<char>(i);
    down[i] = static_cast<char>(31 - i);
  }
  EXPECT_EQ(crc32c(zeros.data(), 32), 0x8A9136AAu);
  EXPECT_EQ(crc32c(ones.data(), 32), 0x62A8AB43u);
  EXPECT_EQ(crc32c(up.data(), 32), 0x46DD794Eu);
  EXPECT_EQ(crc32c(down.data(), 32), 0x113FDB5Cu);
}

TEST(Crc32c, ContinuesAcrossPieces) {
  const std::string s = "The quick brown fox jumps over the lazy dog";
  EXPECT_EQ(crc32c(s.data() + 10, s.size() - 10, crc32c(s.data(), 10)), crc32c(s.data(), s.size()));
  const uint32_t c = crc32c("123456789", 9);
  EXPECT_EQ(masked_crc32c("123456789", 9), ((c >> 15) | (c << 17)) + 0xa282ead8u);
}

TEST(TfRecord, FramingAndChecks) {
  const std::string data = "hello, records";
  const std::string rec = frame_record(data);
  ASSERT_EQ(rec.size(), 8 + 4 + data.size() + 4);
  for (int i = 0; i < 8; ++i)  // little-endian length
    EXPECT_EQ(static_cast<uint8_t>(rec[i]), i == 0 ? data.size() : 0u) << "length byte " << i;
  const uint32_t len_crc = crc32c(rec.data(), 8), data_crc = crc32c(data.data(), data.size());
  EXPECT_EQ(le32(rec, 8), ((len_crc >> 15) | (len_crc << 17)) + 0xa282ead8u);
  EXPECT_EQ(rec.substr(12, data.size()), data);
  EXPECT_EQ(le32(rec, 12 + data.size()), ((data_crc >> 15) | (data_crc << 17)) + 0xa282ead8u);

  const std::string two = rec + frame_record("") + frame_record("third");
  EXPECT_EQ(read_records(two, "f"), (std::vector<std::string>{data, "", "third"}));
  // A record cut short at the end (a killed writer) ends the list.
  EXPECT_EQ(read_records(two.substr(0, two.size() - 3), "f"), (std::vector<std::string>{data, ""}));
  // A flipped bit in the data or in the length is an error naming the file.
  for (size_t at : {size_t{14}, size_t{0}}) {
    std::string bad = two;
    bad[at] ^= 0x10;
    try {
      read_records(bad, "runs/x/events.out.tfevents.1.h");
      ADD_FAILURE() << "a flipped bit at byte " << at << " was not noticed";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Data);
      EXPECT_NE(std::string(e.what()).find("runs/x/events.out.tfevents.1.h"), std::string::npos) << e.what();
    }
  }
}

TEST(EventWriter, ScalarsAndImagesDecodeAsEvents) {
  TempDir tmp;
  const double before = static_cast<double>(time(nullptr));
  std::string path;
  Image img;
  img.width = 5;
  img.height = 3;
  img.channels = 3;
  for (int i = 0; i < 45; ++i) img.pixels.push_back(static_cast<uint8_t>(i * 5));
  {
    EventWriter w((tmp.path / "tb").string());
    path = w.path();
    w.scalar("train/neg_elbo", 25, 123.456);
    w.scalars(50, {{"train/lr", 2e-3}, {"test/kl", -0.25}});
    w.image("images/samples", 50, img);
    w.flush();
  }
  EXPECT_EQ(fs::path(path).parent_path(), tmp.path / "tb");
  const std::string name = fs::path(path).filename().string();
  ASSERT_EQ(name.rfind("events.out.tfevents.", 0), 0u) << name;
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  const long long stamp = std::stoll(name.substr(20));
  EXPECT_GE(stamp, static_cast<long long>(before));
  EXPECT_EQ(name.substr(name.size() - std::strlen(host)), host);

  const std::vector<std::string> recs = read_records(read_file(path), path);
  ASSERT_EQ(recs.size(), 4u);
  const Message version = decode(recs[0]);
  EXPECT_EQ(one(version, 3, 2).bytes, "brain.Event:2");
  EXPECT_GE(as_double(one(version, 1, 1)), before);

  const Message e1 = decode(recs[1]);
  EXPECT_EQ(one(e1, 2, 0).number, 25u);
  EXPECT_GE(as_double(one(e1, 1, 1)), before);
  const Message v1 = decode(one(decode(one(e1, 5, 2).bytes), 1, 2).bytes);
  EXPECT_EQ(one(v1, 1, 2).bytes, "train/neg_elbo");
  EXPECT_EQ(as_float(one(v1, 2, 5)), 123.456f);

  const Message s2 = decode(one(decode(recs[2]), 5, 2).bytes);
  ASSERT_EQ(s2.count(1), 2u);
  auto it = s2.find(1);
  const Message a = decode(it->second.bytes), b = decode(std::next(it)->second.bytes);
  EXPECT_EQ(one(a, 1, 2).bytes, "train/lr");
  EXPECT_EQ(as_float(one(a, 2, 5)), 2e-3f);
  EXPECT_EQ(one(b, 1, 2).bytes, "test/kl");
  EXPECT_EQ(as_float(one(b, 2, 5)), -0.25f);

  const Message e3 = decode(recs[3]);
  EXPECT_EQ(one(e3, 2, 0).number, 50u);
  const Message v3 = decode(one(decode(one(e3, 5, 2).bytes), 1, 2).bytes);
  EXPECT_EQ(one(v3, 1, 2).bytes, "images/samples");
  const Message im = decode(one(v3, 4, 2).bytes);
  EXPECT_EQ(one(im, 1, 0).number, 3u);  // height
  EXPECT_EQ(one(im, 2, 0).number, 5u);  // width
  EXPECT_EQ(one(im, 3, 0).number, 3u);  // colorspace: RGB
  EXPECT_EQ(one(im, 4, 2).bytes, encode_png(img));
  EXPECT_EQ(one(im, 4, 2).bytes.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
}

TEST(EventWriter, FlushMakesEventsVisibleWhileOpen) {
  TempDir tmp;
  EventWriter w(tmp.path.string());
  w.scalar("train/kl", 7, 1.5);
  w.flush();
  const std::vector<std::string> recs = read_records(read_file(w.path()), w.path());
  ASSERT_EQ(recs.size(), 2u);
  EXPECT_EQ(one(decode(recs[1]), 2, 0).number, 7u);
}

TEST(EventWriter, NeverReusesAFile) {
  TempDir tmp;
  EventWriter a(tmp.path.string()), b(tmp.path.string()), c(tmp.path.string());
  EXPECT_NE(a.path(), b.path());
  EXPECT_NE(b.path(), c.path());
  EXPECT_NE(a.path(), c.path());
  EXPECT_EQ(event_files(tmp.path).size(), 3u);
}

TEST(EventWriter, ErrorsNameTheFile) {
  TempDir tmp;
  fs::create_directories(tmp.path);
  std::ofstream(tmp.path / "plain") << "not a directory";
  try {
    EventWriter w((tmp.path / "plain" / "tb").string());
    ADD_FAILURE() << "wrote events under a regular file";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Io);
    EXPECT_NE(std::string(e.what()).find((tmp.path / "plain" / "tb").string()), std::string::npos) << e.what();
  }
}

TEST(EventWriter, TruncateDropsStepsAfterTheCheckpoint) {
  TempDir tmp;
  std::string first;
  {
    EventWriter w(tmp.path.string());
    first = w.path();
    for (int64_t s : {10, 20, 30, 40}) w.scalar("train/rec", s, static_cast<double>(s));
    w.image("images/recon", 30, "png bytes", 2, 2, 1);
  }
  const std::string before = read_file(first);
  truncate_event_files(tmp.path.string(), 40);  // nothing after step 40: the file stays as it was
  EXPECT_EQ(read_file(first), before);
  truncate_event_files(tmp.path.string(), 20);
  std::vector<int64_t> steps;
  for (const std::string& r : read_records(read_file(first), first)) steps.push_back(event_step(r, first));
  EXPECT_EQ(steps, (std::vector<int64_t>{0, 10, 20}));
  EXPECT_EQ(one(decode(read_records(read_file(first), first)[0]), 3, 2).bytes, "brain.Event:2");
  EXPECT_EQ(event_files(tmp.path).size(), 1u);  // no temporary file left behind
  // A record cut short at the end (the interrupted writer was killed mid-write) goes too.
  const std::string whole = read_file(first);
  std::ofstream(first, std::ios::binary | std::ios::app) << frame_record("a record cut short").substr(0, 20);
  truncate_event_files(tmp.path.string(), 20);
  EXPECT_EQ(read_file(first), whole);
  std::ofstream(first + ".tmp") << "a rewrite killed half-way";
  truncate_event_files(tmp.path.string(), 20);
  EXPECT_EQ(event_files(tmp.path), std::vector<fs::path>{first});
  // A file with a damaged record is refused, naming it, not silently rewritten.
  std::string bad = read_file(first);
  bad[bad.size() - 6] ^= 1;
  std::ofstream(first, std::ios::binary | std::ios::trunc) << bad;
  EXPECT_THROW(truncate_event_files(tmp.path.string(), 10), Error);
  truncate_event_files((tmp.path / "missing").string(), 10);  // no directory: nothing to do
}

TEST(MetricsRow, EveryNonEmptyCellUnderItsTag) {
  const MetricsRow r =
      metrics_row("step,epoch,neg_elbo,lr,test_neg_elbo,test_kl,skipped_steps", "125,3,201.123456,0.002,,1.5e-3,0\n");
  EXPECT_EQ(r.step, 125);
  const std::vector<std::pair<std::string, double>> want = {{"train/epoch", 3},
                                                            {"train/neg_elbo", 201.123456},
                                                            {"train/lr", 0.002},
                                                            {"test/kl", 1.5e-3},
                                                            {"train/skipped_steps", 0}};
  EXPECT_EQ(r.scalars, want);
  EXPECT_THROW(metrics_row("step,a", "1,2,3"), Error);
}
