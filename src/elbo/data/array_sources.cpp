// NumPy (.npy, .npz through a small zip reader over zlib) and HDF5 arrays as samples,
// read in runs of whole samples and converted to uint8 (C, H, W).
#include "elbo/data/array_sources.hpp"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "elbo/util/error.hpp"
#include "elbo/util/files.hpp"
#include "elbo/util/h5.hpp"

namespace elbo::data {

namespace fs = std::filesystem;

Layout parse_layout(const std::string& s) {
  if (s.empty() || s == "auto") return Layout::Auto;
  if (s == "nhwc" || s == "NHWC") return Layout::NHWC;
  if (s == "nchw" || s == "NCHW") return Layout::NCHW;
  throw usage_error("--layout expects auto, nhwc or nchw, got '" + s + "'");
}

ArrayGeometry array_geometry(const std::vector<int64_t>& shape, Layout layout, const std::string& what) {
  ArrayGeometry g;
  for (int64_t d : shape)
    if (d < 1) throw data_error(what + ": shape " + shape_string(shape) + " has an empty dimension");
  if (shape.size() == 3) {
    if (layout != Layout::Auto)
      throw usage_error(what + ": --layout is for 4-dimensional arrays; shape " + shape_string(shape) + " is (N, H, W)");
    g = {shape[0], 1, uint32_t(shape[1]), uint32_t(shape[2]), false};
  } else if (shape.size() == 4) {
    const auto channels = [](int64_t d) { return d == 1 || d == 3; };
    if (layout == Layout::Auto) {
      if (channels(shape[3]) && !channels(shape[1])) layout = Layout::NHWC;
      else if (channels(shape[1]) && !channels(shape[3])) layout = Layout::NCHW;
      else
        throw data_error(what + ": cannot tell NHWC from NCHW in shape " + shape_string(shape) +
                         "; pass --layout nhwc or --layout nchw");
    }
    g.n = shape[0];
    g.nhwc = layout == Layout::NHWC;
    g.c = uint32_t(g.nhwc ? shape[3] : shape[1]);
    g.h = uint32_t(g.nhwc ? shape[1] : shape[2]);
    g.w = uint32_t(g.nhwc ? shape[2] : shape[3]);
  } else {
    throw data_error(what + ": arrays of rank " + std::to_string(shape.size()) + " " + shape_string(shape) +
                     " are not supported (images are (N, H, W), (N, H, W, C) or (N, C, H, W))");
  }
  if (g.c > 4096 || g.h > 65535 || g.w > 65535)
    throw data_error(what + ": implausible image shape " + shape_string(shape));
  return g;
}

// --- element types ---

enum class Elem { U8, F32, F64 };

size_t elem_size(Elem e) { return e == Elem::U8 ? 1 : e == Elem::F32 ? 4 : 8; }

// Raw elements -> uint8. Floats must be in [0, 1]; the first offending value is named
// with its sample index.
void to_u8(Elem e, const uint8_t* raw, size_t count, size_t per_sample, int64_t first_sample, uint8_t* out,
           const std::string& what) {
  if (e == Elem::U8) {
    std::memcpy(out, raw, count);
    return;
  }
  for (size_t i = 0; i < count; ++i) {
    double v;
    if (e == Elem::F32) {
      float f;
      std::memcpy(&f, raw + 4 * i, 4);
      v = f;
    } else {
      std::memcpy(&v, raw + 8 * i, 8);
    }
    if (!(v >= 0.0 && v <= 1.0))
      throw data_error(what + ": sample " + std::to_string(first_sample + int64_t(i / per_sample)) + " has the value " +
                       std::to_string(v) + "; float pixels must lie in [0, 1]");
    out[i] = static_cast<uint8_t>(std::floor(v * 255.0 + 0.5));
  }
}

// --- readers ---

class ArrayReader {
 public:
  virtual ~ArrayReader() = default;
  // Rows [row0, row0 + k) in stored element order, converted to uint8.
  virtual void read_rows(int64_t row0, int64_t k, uint8_t* out) = 0;
};

namespace {

// Bytes of a file range, or of a buffer (an inflated .npz member).
struct Bytes {
  std::string path;
  int fd = -1;
  int64_t base = 0, size = 0;
  std::vector<uint8_t> mem;
  bool in_memory = false;

  Bytes() = default;
  Bytes(const Bytes&) = delete;
  Bytes& operator=(const Bytes&) = delete;
  ~Bytes() {
    if (fd >= 0) ::close(fd);
  }
  void read(int64_t off, size_t n, void* out) const {
    if (off < 0 || off + int64_t(n) > size) throw data_error(path + ": file is shorter than its header says (truncated?)");
    if (in_memory) {
      std::memcpy(out, mem.data() + off, n);
      return;
    }
    auto* p = static_cast<uint8_t*>(out);
    for (size_t done = 0; done < n;) {
      const ssize_t r = ::pread(fd, p + done, n - done, base + off + int64_t(done));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) throw io_error(path + ": read failed: " + std::strerror(errno));
      if (r == 0) throw data_error(path + ": unexpected end of file (truncated?)");
      done += size_t(r);
    }
  }
};

void open_bytes(Bytes* b, const std::string& path) {
  b->path = path;
  b->fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (b->fd < 0) throw data_error(path + ": cannot open: " + std::strerror(errno));
  const off_t end = ::lseek(b->fd, 0, SEEK_END);
  if (end < 0) throw io_error(path + ": cannot seek: " + std::strerror(errno));
  b->size = end;
}

uint64_t le(const uint8_t* p, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// Narrows `b` (a whole .npz file) to the member `name`: stored members stay on disk,
// deflated ones are inflated into memory and their CRC-32 checked.
void select_zip_member(Bytes* b, const std::string& name, const std::string& what) {
  const std::string& path = b->path;
  // End of central directory: the last 0x06054b50 in the final 64 KiB + 22 bytes.
  const int64_t tail = std::min<int64_t>(b->size, 65536 + 22);
  std::vector<uint8_t> t(static_cast<size_t>(tail));
  b->read(b->size - tail, t.size(), t.data());
  int64_t eocd = -1;
  for (int64_t i = tail - 22; i >= 0; --i)
    if (le(&t[size_t(i)], 4) == 0x06054b50) {
      eocd = i;
      break;
    }
  if (eocd < 0) throw data_error(path + ": not a .npz (zip) file: no end of central directory");
  uint64_t entries = le(&t[size_t(eocd) + 10], 2), cd_offset = le(&t[size_t(eocd) + 16], 4);
  if (entries == 0xFFFF || cd_offset == 0xFFFFFFFF) {  // zip64: the locator sits right before the record
    if (eocd < 20 || le(&t[size_t(eocd) - 20], 4) != 0x07064b50) throw data_error(path + ": malformed zip64 archive");
    const int64_t z64 = int64_t(le(&t[size_t(eocd) - 12], 8));
    uint8_t r[56];
    b->read(z64, sizeof(r), r);
    if (le(r, 4) != 0x06064b50) throw data_error(path + ": malformed zip64 end of central directory");
    entries = le(r + 32, 8);
    cd_offset = le(r + 48, 8);
  }
  std::vector<std::string> names;
  int64_t pos = int64_t(cd_offset);
  for (uint64_t e = 0; e < entries; ++e) {
    uint8_t h[46];
    b->read(pos, sizeof(h), h);
    if (le(h, 4) != 0x02014b50) throw data_error(path + ": malformed zip central directory");
    const unsigned method = unsigned(le(h + 10, 2));
    const uint32_t crc = uint32_t(le(h + 16, 4));
    uint64_t csize = le(h + 20, 4), usize = le(h + 24, 4), local = le(h + 42, 4);
    const size_t nlen = size_t(le(h + 28, 2)), xlen = size_t(le(h + 30, 2)), clen = size_t(le(h + 32, 2));
    std::vector<uint8_t> nx(nlen + xlen);
    b->read(pos + 46, nx.size(), nx.data());
    const std::string member(nx.begin(), nx.begin() + int64_t(nlen));
    pos += 46 + int64_t(nlen + xlen + clen);
    names.push_back(member);
    if (member != name) continue;
    for (size_t x = nlen; x + 4 <= nx.size();) {  // zip64 extra field: the sizes and offset that overflowed
      const unsigned id = unsigned(le(&nx[x], 2)), len = unsigned(le(&nx[x + 2], 2));
      if (id == 0x0001) {
        size_t q = x + 4;
        if (usize == 0xFFFFFFFF && q + 8 <= nx.size()) usize = le(&nx[q], 8), q += 8;
        if (csize == 0xFFFFFFFF && q + 8 <= nx.size()) csize = le(&nx[q], 8), q += 8;
        if (local == 0xFFFFFFFF && q + 8 <= nx.size()) local = le(&nx[q], 8);
      }
      x += 4 + len;
    }
    uint8_t lh[30];
    b->read(int64_t(local), sizeof(lh), lh);
    if (le(lh, 4) != 0x04034b50) throw data_error(path + ": malformed zip local header of " + member);
    const int64_t data = int64_t(local) + 30 + int64_t(le(lh + 26, 2) + le(lh + 28, 2));
    if (method == 0) {
      if (csize != usize) throw data_error(path + ": malformed zip entry " + member);
      b->base += data;
      b->size = int64_t(usize);
      return;
    }
    if (method != 8) throw data_error(path + ": " + member + " uses zip compression method " + std::to_string(method) +
                                      " (only stored and deflate are read)");
    std::vector<uint8_t> comp(static_cast<size_t>(csize));
    b->read(data, comp.size(), comp.data());
    std::vector<uint8_t> out(static_cast<size_t>(usize));
    z_stream z{};
    if (inflateInit2(&z, -MAX_WBITS) != Z_OK) throw internal_error("inflateInit2 failed");
    int rc = Z_OK;
    size_t in_done = 0, out_done = 0;
    while (rc == Z_OK) {  // zlib counts in 32 bits: feed at most 1 GiB at a time
      z.next_in = comp.data() + in_done;
      z.avail_in = unsigned(std::min<size_t>(comp.size() - in_done, size_t{1} << 30));
      z.next_out = out.data() + out_done;
      z.avail_out = unsigned(std::min<size_t>(out.size() - out_done, size_t{1} << 30));
      const unsigned in0 = z.avail_in, out0 = z.avail_out;
      rc = inflate(&z, Z_NO_FLUSH);
      in_done += in0 - z.avail_in;
      out_done += out0 - z.avail_out;
      if (rc == Z_BUF_ERROR && in0 == z.avail_in && out0 == z.avail_out) break;
      if (rc == Z_BUF_ERROR) rc = Z_OK;
    }
    inflateEnd(&z);
    if (rc != Z_STREAM_END || out_done != out.size())
      throw data_error(path + ": corrupt compressed member " + member + " (zlib " + std::to_string(rc) + ")");
    uLong c = crc32(0L, Z_NULL, 0);
    for (size_t o = 0; o < out.size(); o += size_t{1} << 30)
      c = crc32(c, out.data() + o, uInt(std::min<size_t>(out.size() - o, size_t{1} << 30)));
    if (uint32_t(c) != crc) throw data_error(path + ": CRC mismatch in member " + member + " (corrupt .npz)");
    ::close(b->fd);
    b->fd = -1;
    b->mem = std::move(out);
    b->in_memory = true;
    b->base = 0;
    b->size = int64_t(b->mem.size());
    return;
  }
  std::string keys;
  for (const std::string& n : names)
    keys += (keys.empty() ? "" : ", ") + (n.ends_with(".npy") ? n.substr(0, n.size() - 4) : n);
  throw data_error(what + ": no array '" + name.substr(0, name.size() - 4) + "' in the archive (it holds: " + keys + ")");
}

struct NpyHeader {
  std::string descr;
  bool fortran = false;
  std::vector<int64_t> shape;
  int64_t data_offset = 0;
};

NpyHeader parse_npy_header(const Bytes& b, const std::string& what) {
  uint8_t pre[12];
  if (b.size < 10) throw data_error(what + ": not a .npy file (too short)");
  b.read(0, std::min<int64_t>(12, b.size), pre);
  if (std::memcmp(pre, "\x93NUMPY", 6) != 0) throw data_error(what + ": not a .npy file (bad magic)");
  const int major = pre[6];
  size_t hlen, hstart;
  if (major == 1) {
    hlen = size_t(le(pre + 8, 2));
    hstart = 10;
  } else if (major == 2 || major == 3) {
    hlen = size_t(le(pre + 8, 4));
    hstart = 12;
  } else {
    throw data_error(what + ": unsupported .npy format version " + std::to_string(major));
  }
  std::string h(hlen, '\0');
  b.read(int64_t(hstart), hlen, h.data());
  NpyHeader out;
  out.data_offset = int64_t(hstart + hlen);
  auto value_after = [&](const std::string& key) -> size_t {
    const size_t k = h.find("'" + key + "'");
    if (k == std::string::npos) throw data_error(what + ": .npy header lacks '" + key + "': " + h);
    const size_t colon = h.find(':', k);
    return h.find_first_not_of(' ', colon + 1);
  };
  size_t v = value_after("descr");
  if (h[v] != '\'') throw data_error(what + ": structured dtypes are not supported (descr " + h.substr(v, 40) + ")");
  out.descr = h.substr(v + 1, h.find('\'', v + 1) - v - 1);
  v = value_after("fortran_order");
  out.fortran = h.compare(v, 4, "True") == 0;
  v = value_after("shape");
  const size_t close = h.find(')', v);
  if (h[v] != '(' || close == std::string::npos) throw data_error(what + ": malformed shape in .npy header: " + h);
  const std::string dims = h.substr(v + 1, close - v - 1);
  for (size_t p = 0; p < dims.size();) {
    const size_t q = dims.find(',', p);
    const std::string tok = dims.substr(p, q == std::string::npos ? std::string::npos : q - p);
    if (tok.find_first_not_of(" ") != std::string::npos) out.shape.push_back(std::stoll(tok));
    if (q == std::string::npos) break;
    p = q + 1;
  }
  return out;
}

// A NumPy dtype string -> the element type read, or a Data error listing the supported ones.
Elem npy_elem(const std::string& descr, const std::string& what) {
  if (descr == "|u1" || descr == "u1" || descr == "<u1") return Elem::U8;
  if (descr == "<f4" || descr == "=f4") return Elem::F32;
  if (descr == "<f8" || descr == "=f8") return Elem::F64;
  throw data_error(what + ": dtype '" + descr +
                   "' is not supported (pixels: uint8 0..255, or little-endian float32 / float64 in [0, 1])");
}

class NpyReader : public ArrayReader {
 public:
  NpyReader(std::unique_ptr<Bytes> b, NpyHeader h, Elem e, size_t row_elems, std::string what)
      : m_b(std::move(b)), m_h(std::move(h)), m_e(e), m_row(row_elems), m_what(std::move(what)) {
    int64_t total = 1;
    for (int64_t d : m_h.shape) total *= d;
    if (m_h.data_offset + total * int64_t(elem_size(e)) > m_b->size)
      throw data_error(m_what + ": holds fewer bytes than its shape " + shape_string(m_h.shape) + " needs (truncated?)");
  }
  void read_rows(int64_t row0, int64_t k, uint8_t* out) override {
    const size_t es = elem_size(m_e), count = size_t(k) * m_row;
    if (m_e == Elem::U8) {
      m_b->read(m_h.data_offset + row0 * int64_t(m_row), count, out);
      return;
    }
    m_raw.resize(count * es);
    m_b->read(m_h.data_offset + row0 * int64_t(m_row * es), m_raw.size(), m_raw.data());
    to_u8(m_e, m_raw.data(), count, m_row, row0, out, m_what);
  }

 private:
  std::unique_ptr<Bytes> m_b;
  NpyHeader m_h;
  Elem m_e;
  size_t m_row;
  std::string m_what;
  std::vector<uint8_t> m_raw;
};

// Opens FILE (.npy) or the member KEY of FILE (.npz).
std::unique_ptr<Bytes> open_npy(const std::string& path, const std::string& key, std::string* what) {
  auto b = std::make_unique<Bytes>();
  if (!fs::exists(path)) throw data_error(path + ": file does not exist");
  open_bytes(b.get(), path);
  uint8_t magic[4] = {};
  if (b->size >= 4) b->read(0, 4, magic);
  const bool zip = le(magic, 4) == 0x04034b50;
  *what = path;
  if (zip) {
    if (key.empty()) throw usage_error(path + ": a .npz archive needs --npz-key NAME (the array to read)");
    *what = path + ":" + key;
    select_zip_member(b.get(), key + ".npy", *what);
  } else if (!key.empty()) {
    throw usage_error(path + ": --npz-key is for .npz archives, and this is not a zip file");
  }
  return b;
}

// Labels: a 1-D integer array of n values in 0..255.
std::vector<uint8_t> npy_labels(const std::string& path, const std::string& key, int64_t n) {
  std::string what;
  auto b = open_npy(path, key, &what);
  NpyHeader h = parse_npy_header(*b, what);
  if (h.shape.size() != 1 || h.shape[0] != n)
    throw data_error(what + ": labels must have shape (" + std::to_string(n) + ",), got " + shape_string(h.shape));
  const std::string& d = h.descr;
  const bool little = d[0] == '<' || d[0] == '|' || d[0] == '=';
  const char kind = d.size() >= 3 ? d[1] : '?';
  const int size = d.size() >= 3 ? std::atoi(d.c_str() + 2) : 0;
  if (!little || (kind != 'u' && kind != 'i') || (size != 1 && size != 2 && size != 4 && size != 8))
    throw data_error(what + ": labels dtype '" + d + "' is not supported (an integer type, values 0..255)");
  std::vector<uint8_t> raw(size_t(n) * size_t(size));
  b->read(h.data_offset, raw.size(), raw.data());
  std::vector<uint8_t> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    uint64_t u = le(&raw[size_t(i) * size_t(size)], size);
    int64_t v = int64_t(u);
    if (kind == 'i' && size < 8 && (u >> (8 * size - 1)) != 0) v = int64_t(u) - (int64_t{1} << (8 * size));
    if (v < 0 || v > 255)
      throw data_error(what + ": label " + std::to_string(v) + " of sample " + std::to_string(i) + " is outside 0..255");
    out[size_t(i)] = uint8_t(v);
  }
  return out;
}

class Hdf5Reader : public ArrayReader {
 public:
  Hdf5Reader(h5::Id file, h5::Id ds, Elem e, std::vector<hsize_t> shape, size_t row_elems, std::string what)
      : m_file(std::move(file)), m_ds(std::move(ds)), m_e(e), m_shape(std::move(shape)), m_row(row_elems),
        m_what(std::move(what)) {}
  void read_rows(int64_t row0, int64_t k, uint8_t* out) override {
    try {
      h5::Id fspace(ELBO_CHECK_H5(H5Dget_space(m_ds)), H5Sclose);
      std::vector<hsize_t> start(m_shape.size(), 0), count = m_shape;
      start[0] = hsize_t(row0);
      count[0] = hsize_t(k);
      ELBO_CHECK_H5(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr));
      h5::Id mspace(ELBO_CHECK_H5(H5Screate_simple(int(count.size()), count.data(), nullptr)), H5Sclose);
      if (m_e == Elem::U8) {
        ELBO_CHECK_H5(H5Dread(m_ds, H5T_NATIVE_UINT8, mspace, fspace, H5P_DEFAULT, out));
        return;
      }
      m_raw.resize(size_t(k) * m_row);
      ELBO_CHECK_H5(H5Dread(m_ds, H5T_NATIVE_DOUBLE, mspace, fspace, H5P_DEFAULT, m_raw.data()));
    } catch (const Error& e) {
      throw data_error(m_what + ": cannot read samples " + std::to_string(row0) + ".." + std::to_string(row0 + k - 1) +
                       ": " + e.what());
    }
    to_u8(Elem::F64, reinterpret_cast<const uint8_t*>(m_raw.data()), m_raw.size(), m_row, row0, out, m_what);
  }

 private:
  h5::Id m_file, m_ds;
  Elem m_e;
  std::vector<hsize_t> m_shape;
  size_t m_row;
  std::string m_what;
  std::vector<double> m_raw;
};

}  // namespace

ArraySampleSource::~ArraySampleSource() = default;

std::unique_ptr<ArraySampleSource> ArraySampleSource::numpy(const std::string& path, const std::string& npz_key,
                                                            const std::string& labels_path,
                                                            const std::string& labels_key, Layout layout) {
  std::string what;
  auto bytes = open_npy(path, npz_key, &what);
  NpyHeader h = parse_npy_header(*bytes, what);
  const Elem e = npy_elem(h.descr, what);
  if (h.fortran)
    throw data_error(what + ": Fortran-order arrays are not supported (save np.ascontiguousarray(x) instead)");
  std::unique_ptr<ArraySampleSource> s(new ArraySampleSource());
  s->m_geo = array_geometry(h.shape, layout, what);
  const size_t row = size_t(s->m_geo.c) * s->m_geo.h * s->m_geo.w;
  s->m_reader = std::make_unique<NpyReader>(std::move(bytes), h, e, row, what);
  s->m_description = what;
  if (!labels_key.empty() || !labels_path.empty()) {
    const std::string lpath = labels_path.empty() ? path : labels_path;
    s->m_labels = npy_labels(lpath, labels_key, s->m_geo.n);
    s->m_description += ", labels " + lpath + (labels_key.empty() ? "" : ":" + labels_key);
  }
  return s;
}

std::unique_ptr<ArraySampleSource> ArraySampleSource::hdf5(const std::string& spec, const std::string& labels_path,
                                                           Layout layout) {
  const size_t colon = spec.rfind(':');
  if (colon == std::string::npos || colon + 1 >= spec.size() || spec[colon + 1] != '/')
    throw usage_error("--hdf5 expects FILE:/path/to/dataset, got '" + spec + "'");
  const std::string path = spec.substr(0, colon), dpath = spec.substr(colon + 1);
  if (!fs::exists(path)) throw data_error(path + ": file does not exist");
  h5::Id f = h5::open_file(path);
  auto dataset = [&](const std::string& name, Elem* elem, std::vector<hsize_t>* shape) {
    if (!h5::exists(f, name.substr(1)))
      throw data_error(path + ": no dataset " + name + " in the file");
    H5O_info_t info;
    ELBO_CHECK_H5(H5Oget_info_by_name(f, name.c_str(), &info, H5P_DEFAULT));
    if (info.type != H5O_TYPE_DATASET) throw data_error(path + ": " + name + " is a group, not a dataset");
    h5::Id ds(ELBO_CHECK_H5(H5Dopen2(f, name.c_str(), H5P_DEFAULT)), H5Dclose);
    h5::Id type(ELBO_CHECK_H5(H5Dget_type(ds)), H5Tclose);
    const H5T_class_t cls = H5Tget_class(type);
    const size_t size = H5Tget_size(type);
    if (elem != nullptr) {
      if (cls == H5T_INTEGER && size == 1 && H5Tget_sign(type) == H5T_SGN_NONE) *elem = Elem::U8;
      else if (cls == H5T_FLOAT) *elem = Elem::F64;
      else
        throw data_error(path + ":" + name + ": element type (class " + std::to_string(int(cls)) + ", " +
                         std::to_string(size) + " bytes) is not supported (pixels: uint8 0..255, or floats in [0, 1])");
    } else if (cls != H5T_INTEGER) {
      throw data_error(path + ":" + name + ": labels must be integers");
    }
    *shape = h5::dataset_shape(f, name.substr(1));
    return ds;
  };
  Elem e = Elem::U8;
  std::vector<hsize_t> shape;
  h5::Id ds = dataset(dpath, &e, &shape);
  const std::string what = path + ":" + dpath;
  std::unique_ptr<ArraySampleSource> s(new ArraySampleSource());
  s->m_geo = array_geometry(std::vector<int64_t>(shape.begin(), shape.end()), layout, what);
  s->m_description = what;
  if (!labels_path.empty()) {
    if (labels_path[0] != '/') throw usage_error("--hdf5-labels expects /path/to/labels inside the --hdf5 file");
    std::vector<hsize_t> lshape;
    h5::Id lds = dataset(labels_path, nullptr, &lshape);
    if (lshape != std::vector<hsize_t>{hsize_t(s->m_geo.n)})
      throw data_error(path + ":" + labels_path + ": labels must have shape (" + std::to_string(s->m_geo.n) +
                       "), got " + shape_string(lshape));
    std::vector<int64_t> v(static_cast<size_t>(s->m_geo.n));
    ELBO_CHECK_H5(H5Dread(lds, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()));
    s->m_labels.resize(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      if (v[i] < 0 || v[i] > 255)
        throw data_error(path + ":" + labels_path + ": label " + std::to_string(v[i]) + " of sample " +
                         std::to_string(i) + " is outside 0..255");
      s->m_labels[i] = uint8_t(v[i]);
    }
    s->m_description += ", labels " + labels_path;
  }
  const size_t row = size_t(s->m_geo.c) * s->m_geo.h * s->m_geo.w;
  s->m_reader = std::make_unique<Hdf5Reader>(std::move(f), std::move(ds), e, shape, row, what);
  return s;
}

void ArraySampleSource::read(std::span<const int64_t> indices, uint8_t* pixels, uint8_t* labels) {
  const size_t dim = size_t(m_geo.c) * m_geo.h * m_geo.w, plane = size_t(m_geo.h) * m_geo.w;
  std::vector<uint8_t> tmp;
  // Runs of consecutive indices are read with one call each (a shard is one run).
  for (size_t k = 0; k < indices.size();) {
    size_t e = k + 1;
    while (e < indices.size() && indices[e] == indices[e - 1] + 1) ++e;
    const int64_t run = int64_t(e - k);
    uint8_t* dst = pixels + k * dim;
    if (!m_geo.nhwc) {
      m_reader->read_rows(indices[k], run, dst);
    } else {
      tmp.resize(size_t(run) * dim);
      m_reader->read_rows(indices[k], run, tmp.data());
      for (int64_t r = 0; r < run; ++r)
        for (size_t i = 0; i < plane; ++i)
          for (uint32_t c = 0; c < m_geo.c; ++c) dst[size_t(r) * dim + c * plane + i] = tmp[size_t(r) * dim + i * m_geo.c + c];
    }
    k = e;
  }
  if (labels != nullptr && has_labels())
    for (size_t k = 0; k < indices.size(); ++k) labels[k] = m_labels[size_t(indices[k])];
}

}  // namespace elbo::data
