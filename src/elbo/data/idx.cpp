// IDX parsing through zlib's gz* API, which reads plain and gzip files alike.
#include "elbo/data/idx.hpp"

#include <zlib.h>

#include <filesystem>
#include <memory>

#include "elbo/util/error.hpp"

namespace elbo::data {

IdxArray read_idx(const std::string& path) {
  if (!std::filesystem::exists(path)) throw data_error(path + ": file does not exist");
  std::unique_ptr<gzFile_s, int (*)(gzFile)> f(gzopen(path.c_str(), "rb"), gzclose);
  if (!f) throw data_error(path + ": cannot open");
  // zlib reports a damaged stream (bad CRC or length in the trailer, corrupt deflate
  // data) as gzread() < 0 with the reason in gzerror(); it is never a short read.
  auto gz_failure = [&](const char* what) {
    int code = Z_OK;
    const char* msg = gzerror(f.get(), &code);
    return data_error(path + ": corrupt gzip data while reading " + what + " (zlib: " +
                      (msg != nullptr && *msg ? msg : "error " + std::to_string(code)) + ")");
  };
  auto read_exact = [&](void* buf, size_t n, const char* what) {
    int got = gzread(f.get(), buf, static_cast<unsigned>(n));
    if (got < 0) throw gz_failure(what);
    if (static_cast<size_t>(got) != n) throw data_error(path + ": truncated IDX file (while reading " + what + ")");
  };
  unsigned char magic[4];
  read_exact(magic, 4, "the magic number");
  if (magic[0] != 0 || magic[1] != 0)
    throw data_error(path + ": not an IDX file (bad magic bytes)");
  if (magic[2] != 0x08)
    throw data_error(path + ": IDX element type 0x" + std::to_string(magic[2]) +
                     " is not supported (only unsigned bytes, 0x08)");
  int ndim = magic[3];
  if (ndim < 1 || ndim > 4) throw data_error(path + ": IDX file has " + std::to_string(ndim) + " dimensions");
  IdxArray out;
  size_t total = 1;
  for (int i = 0; i < ndim; ++i) {
    unsigned char b[4];
    read_exact(b, 4, "the dimensions");
    uint32_t d = (uint32_t(b[0]) << 24) | (uint32_t(b[1]) << 16) | (uint32_t(b[2]) << 8) | b[3];
    out.dims.push_back(d);
    total *= d;
  }
  if (total > (size_t(1) << 34)) throw data_error(path + ": IDX dimensions are implausibly large");
  out.data.resize(total);
  size_t off = 0;
  while (off < total) {  // gzread takes unsigned counts: read in chunks
    size_t n = std::min<size_t>(total - off, size_t(1) << 30);
    read_exact(out.data.data() + off, n, "the data");
    off += n;
  }
  // Reading past the data makes zlib check the gzip trailer (CRC-32 and length).
  unsigned char extra;
  const int more = gzread(f.get(), &extra, 1);
  if (more < 0) throw gz_failure("the gzip trailer");
  if (more > 0) throw data_error(path + ": IDX file is longer than its dimensions say (corrupt header?)");
  // gzclose reports a stream that ended inside a gzip member (Z_BUF_ERROR).
  if (const int rc = gzclose(f.release()); rc != Z_OK)
    throw data_error(path + ": gzip stream ends early or cannot be closed (zlib error " + std::to_string(rc) + ")");
  return out;
}

}  // namespace elbo::data
