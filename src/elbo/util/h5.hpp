// Thin RAII layer over the HDF5 C API: every id is closed by its owner, every call
// is checked, and failures carry the call site plus HDF5's own innermost message.
#pragma once

#include <hdf5.h>

#include <cstdint>
#include <string>
#include <vector>

#include "elbo/util/error.hpp"

namespace elbo::h5 {

// Reads HDF5's error stack (the innermost description) and clears it.
std::string last_error_message();

// Silences HDF5's default stderr dump; our exceptions carry the message instead.
void silence_default_errors();

namespace detail {
[[noreturn]] void h5_failed(const char* call, const char* file, int line);
}

// Evaluates an HDF5 call; throws Io error naming the call site when it returns < 0.
#define ELBO_CHECK_H5(call)                                                        \
  ([&]() {                                                                         \
    auto elbo_h5_rc_ = (call);                                                     \
    if (elbo_h5_rc_ < 0) ::elbo::h5::detail::h5_failed(#call, __FILE__, __LINE__); \
    return elbo_h5_rc_;                                                            \
  }())

// A move-only owner of one hid_t; the close function matches the id's type.
class Id {
 public:
  using Closer = herr_t (*)(hid_t);
  Id() = default;
  Id(hid_t id, Closer closer) : m_id(id), m_close(closer) {}
  Id(Id&& o) noexcept : m_id(o.m_id), m_close(o.m_close) { o.m_id = H5I_INVALID_HID; }
  Id& operator=(Id&& o) noexcept;
  Id(const Id&) = delete;
  Id& operator=(const Id&) = delete;
  ~Id();
  hid_t get() const { return m_id; }
  operator hid_t() const { return m_id; }
  bool valid() const { return m_id >= 0; }

 private:
  hid_t m_id = H5I_INVALID_HID;
  Closer m_close = nullptr;
};

// Files. `create_file` writes to `path` directly (callers write to a temporary
// name and rename for atomicity).
Id open_file(const std::string& path, bool writable = false);
Id create_file(const std::string& path);

// A file built in memory (HDF5's core driver, no backing store), for files that must
// never be left half written: HDF5 touches no disk, so a full disk fails our own
// write(2) in save_memory_file, never an HDF5 flush or close. (In HDF5 1.10 a close
// whose flush fails leaves a half-closed file behind that crashes the library at exit.)
Id create_memory_file();
// Closes `file` (every id opened inside it must be closed already) and writes its
// bytes to `path` with write_file_durably: on failure `path` is removed and the Io
// error names it. `file` is closed whatever happens.
void save_memory_file(Id file, const std::string& path);

// Groups: `ensure_group` creates intermediate groups of "a/b/c" as needed.
Id ensure_group(hid_t loc, const std::string& path);
bool exists(hid_t loc, const std::string& path);

// Datasets of a plain numeric type, row-major, with the given shape.
template <class T>
void write_dataset(hid_t loc, const std::string& name, const std::vector<hsize_t>& shape,
                   const T* data, bool chunk_rows = false);
std::vector<hsize_t> dataset_shape(hid_t loc, const std::string& name);
// Reads the whole dataset, converting to T; throws naming `what` if the shape differs.
template <class T>
std::vector<T> read_dataset(hid_t loc, const std::string& name,
                            std::vector<hsize_t>* shape_out = nullptr);
// Reads rows [row0, row0+nrows) of a dataset whose first dimension is rows.
template <class T>
void read_rows(hid_t loc, const std::string& name, hsize_t row0, hsize_t nrows, T* out);

// Attributes (scalars and strings) on any object.
void write_attr_string(hid_t obj, const std::string& name, const std::string& value);
void write_attr_int(hid_t obj, const std::string& name, int64_t value);
void write_attr_double(hid_t obj, const std::string& name, double value);
bool has_attr(hid_t obj, const std::string& name);
std::string read_attr_string(hid_t obj, const std::string& name);
int64_t read_attr_int(hid_t obj, const std::string& name);
double read_attr_double(hid_t obj, const std::string& name);

}  // namespace elbo::h5
