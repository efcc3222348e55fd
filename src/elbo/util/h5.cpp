// HDF5 helpers: checked calls, RAII ids, typed dataset and attribute I/O.
#include "elbo/util/h5.hpp"

#include <cstring>

#include "elbo/util/files.hpp"

namespace elbo::h5 {

namespace {

herr_t collect_innermost(unsigned n, const H5E_error2_t* err, void* client) {
  auto* out = static_cast<std::string*>(client);
  // The walk goes from the innermost (n == 0) outwards: the first entry is the cause.
  if (n == 0 && err->desc != nullptr) *out = std::string(err->func_name) + ": " + err->desc;
  return 0;
}

template <class T>
hid_t native_type() {
  if constexpr (std::is_same_v<T, float>) return H5T_NATIVE_FLOAT;
  else if constexpr (std::is_same_v<T, double>) return H5T_NATIVE_DOUBLE;
  else if constexpr (std::is_same_v<T, uint8_t>) return H5T_NATIVE_UINT8;
  else if constexpr (std::is_same_v<T, int32_t>) return H5T_NATIVE_INT32;
  else if constexpr (std::is_same_v<T, int64_t>) return H5T_NATIVE_INT64;
  else if constexpr (std::is_same_v<T, uint32_t>) return H5T_NATIVE_UINT32;
  else static_assert(sizeof(T) == 0, "unsupported HDF5 element type");
}

}  // namespace

std::string last_error_message() {
  std::string msg;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, collect_innermost, &msg);
  H5Eclear2(H5E_DEFAULT);
  return msg;
}

void silence_default_errors() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }

namespace detail {
[[noreturn]] void h5_failed(const char* call, const char* file, int line) {
  ::elbo::detail::throw_call_failed(ErrorKind::Io, call, file, line, last_error_message());
}
}  // namespace detail

Id& Id::operator=(Id&& o) noexcept {
  if (this != &o) {
    this->~Id();
    m_id = o.m_id;
    m_close = o.m_close;
    o.m_id = H5I_INVALID_HID;
  }
  return *this;
}

Id::~Id() {
  if (m_id >= 0 && m_close != nullptr) m_close(m_id);  // destructors only release, never throw
  m_id = H5I_INVALID_HID;
}

Id open_file(const std::string& path, bool writable) {
  silence_default_errors();
  hid_t f = H5Fopen(path.c_str(), writable ? H5F_ACC_RDWR : H5F_ACC_RDONLY, H5P_DEFAULT);
  if (f < 0) {
    std::string why = last_error_message();
    throw io_error("cannot open HDF5 file '" + path + "'" + (why.empty() ? "" : " (" + why + ")"));
  }
  return Id(f, H5Fclose);
}

Id create_file(const std::string& path) {
  silence_default_errors();
  hid_t f = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  if (f < 0) {
    std::string why = last_error_message();
    throw io_error("cannot create HDF5 file '" + path + "'" + (why.empty() ? "" : " (" + why + ")"));
  }
  return Id(f, H5Fclose);
}

Id create_memory_file() {
  silence_default_errors();
  Id fapl(ELBO_CHECK_H5(H5Pcreate(H5P_FILE_ACCESS)), H5Pclose);
  ELBO_CHECK_H5(H5Pset_fapl_core(fapl, size_t{4} << 20, /*backing_store=*/false));  // grows 4 MiB at a time
  hid_t f = H5Fcreate("elbo-in-memory.h5", H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
  if (f < 0) throw io_error("cannot create an in-memory HDF5 file (" + last_error_message() + ")");
  return Id(f, H5Fclose);
}

void save_memory_file(Id file, const std::string& path) {
  std::vector<unsigned char> image;
  {
    const Id owned = std::move(file);  // closed at the end of this scope, also on errors
    ELBO_CHECK_H5(H5Fflush(owned, H5F_SCOPE_GLOBAL));
    const ssize_t n = ELBO_CHECK_H5(H5Fget_file_image(owned, nullptr, 0));
    image.resize(static_cast<size_t>(n));
    ELBO_CHECK_H5(H5Fget_file_image(owned, image.data(), image.size()));
    if (ELBO_CHECK_H5(H5Fget_obj_count(owned, H5F_OBJ_ALL | H5F_OBJ_LOCAL)) != 1)
      throw internal_error("save_memory_file: objects of '" + path + "' are still open");
  }
  write_file_durably(path, image.data(), image.size());
}

bool exists(hid_t loc, const std::string& path) {
  // H5Lexists needs every intermediate link to exist, so walk the path.
  size_t pos = 0;
  while (true) {
    size_t next = path.find('/', pos);
    std::string prefix = path.substr(0, next);
    if (!prefix.empty() && H5Lexists(loc, prefix.c_str(), H5P_DEFAULT) <= 0) return false;
    if (next == std::string::npos) return true;
    pos = next + 1;
  }
}

Id ensure_group(hid_t loc, const std::string& path) {
  size_t pos = 0;
  while (true) {
    size_t next = path.find('/', pos);
    std::string prefix = path.substr(0, next);
    if (!prefix.empty() && H5Lexists(loc, prefix.c_str(), H5P_DEFAULT) <= 0) {
      Id g(ELBO_CHECK_H5(H5Gcreate2(loc, prefix.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT)),
           H5Gclose);
    }
    if (next == std::string::npos) break;
    pos = next + 1;
  }
  return Id(ELBO_CHECK_H5(H5Gopen2(loc, path.c_str(), H5P_DEFAULT)), H5Gclose);
}

template <class T>
void write_dataset(hid_t loc, const std::string& name, const std::vector<hsize_t>& shape,
                   const T* data, bool chunk_rows) {
  Id space(ELBO_CHECK_H5(H5Screate_simple(static_cast<int>(shape.size()), shape.data(), nullptr)),
           H5Sclose);
  Id dcpl(ELBO_CHECK_H5(H5Pcreate(H5P_DATASET_CREATE)), H5Pclose);
  if (chunk_rows && !shape.empty() && shape[0] > 0) {
    // Chunks of whole rows, ~1 MiB, so a reader taking a batch of rows touches few chunks.
    std::vector<hsize_t> chunk = shape;
    hsize_t row_bytes = sizeof(T);
    for (size_t i = 1; i < shape.size(); ++i) row_bytes *= shape[i];
    chunk[0] = std::max<hsize_t>(1, std::min<hsize_t>(shape[0], (1u << 20) / row_bytes));
    ELBO_CHECK_H5(H5Pset_chunk(dcpl, static_cast<int>(chunk.size()), chunk.data()));
  }
  Id ds(ELBO_CHECK_H5(H5Dcreate2(loc, name.c_str(), native_type<T>(), space, H5P_DEFAULT, dcpl,
                                 H5P_DEFAULT)),
        H5Dclose);
  ELBO_CHECK_H5(H5Dwrite(ds, native_type<T>(), H5S_ALL, H5S_ALL, H5P_DEFAULT, data));
}

std::vector<hsize_t> dataset_shape(hid_t loc, const std::string& name) {
  if (!exists(loc, name)) throw io_error("dataset '" + name + "' is missing");
  Id ds(ELBO_CHECK_H5(H5Dopen2(loc, name.c_str(), H5P_DEFAULT)), H5Dclose);
  Id space(ELBO_CHECK_H5(H5Dget_space(ds)), H5Sclose);
  int rank = ELBO_CHECK_H5(H5Sget_simple_extent_ndims(space));
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  ELBO_CHECK_H5(H5Sget_simple_extent_dims(space, dims.data(), nullptr));
  return dims;
}

template <class T>
std::vector<T> read_dataset(hid_t loc, const std::string& name, std::vector<hsize_t>* shape_out) {
  std::vector<hsize_t> shape = dataset_shape(loc, name);
  hsize_t n = 1;
  for (hsize_t d : shape) n *= d;
  std::vector<T> out(n);
  Id ds(ELBO_CHECK_H5(H5Dopen2(loc, name.c_str(), H5P_DEFAULT)), H5Dclose);
  if (n > 0) ELBO_CHECK_H5(H5Dread(ds, native_type<T>(), H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()));
  if (shape_out != nullptr) *shape_out = shape;
  return out;
}

template <class T>
void read_rows(hid_t loc, const std::string& name, hsize_t row0, hsize_t nrows, T* out) {
  std::vector<hsize_t> shape = dataset_shape(loc, name);
  if (shape.empty() || row0 + nrows > shape[0])
    throw io_error("dataset '" + name + "': rows [" + std::to_string(row0) + ", " +
                   std::to_string(row0 + nrows) + ") out of range");
  Id ds(ELBO_CHECK_H5(H5Dopen2(loc, name.c_str(), H5P_DEFAULT)), H5Dclose);
  Id fspace(ELBO_CHECK_H5(H5Dget_space(ds)), H5Sclose);
  std::vector<hsize_t> start(shape.size(), 0), count = shape;
  start[0] = row0;
  count[0] = nrows;
  ELBO_CHECK_H5(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr));
  Id mspace(ELBO_CHECK_H5(H5Screate_simple(static_cast<int>(count.size()), count.data(), nullptr)),
            H5Sclose);
  ELBO_CHECK_H5(H5Dread(ds, native_type<T>(), mspace, fspace, H5P_DEFAULT, out));
}

#define ELBO_H5_INSTANTIATE(T)                                                                   \
  template void write_dataset<T>(hid_t, const std::string&, const std::vector<hsize_t>&, const T*, \
                                 bool);                                                          \
  template std::vector<T> read_dataset<T>(hid_t, const std::string&, std::vector<hsize_t>*);     \
  template void read_rows<T>(hid_t, const std::string&, hsize_t, hsize_t, T*);
ELBO_H5_INSTANTIATE(float)
ELBO_H5_INSTANTIATE(double)
ELBO_H5_INSTANTIATE(uint8_t)
ELBO_H5_INSTANTIATE(int32_t)
ELBO_H5_INSTANTIATE(int64_t)
ELBO_H5_INSTANTIATE(uint32_t)
#undef ELBO_H5_INSTANTIATE

namespace {
Id scalar_space() { return Id(ELBO_CHECK_H5(H5Screate(H5S_SCALAR)), H5Sclose); }
void drop_attr(hid_t obj, const std::string& name) {
  if (H5Aexists(obj, name.c_str()) > 0) ELBO_CHECK_H5(H5Adelete(obj, name.c_str()));
}
}  // namespace

void write_attr_string(hid_t obj, const std::string& name, const std::string& value) {
  drop_attr(obj, name);
  Id type(ELBO_CHECK_H5(H5Tcopy(H5T_C_S1)), H5Tclose);
  ELBO_CHECK_H5(H5Tset_size(type, H5T_VARIABLE));
  ELBO_CHECK_H5(H5Tset_cset(type, H5T_CSET_UTF8));
  Id space = scalar_space();
  Id attr(ELBO_CHECK_H5(H5Acreate2(obj, name.c_str(), type, space, H5P_DEFAULT, H5P_DEFAULT)), H5Aclose);
  const char* p = value.c_str();
  ELBO_CHECK_H5(H5Awrite(attr, type, &p));
}

void write_attr_int(hid_t obj, const std::string& name, int64_t value) {
  drop_attr(obj, name);
  Id space = scalar_space();
  Id attr(ELBO_CHECK_H5(H5Acreate2(obj, name.c_str(), H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT)),
          H5Aclose);
  ELBO_CHECK_H5(H5Awrite(attr, H5T_NATIVE_INT64, &value));
}

void write_attr_double(hid_t obj, const std::string& name, double value) {
  drop_attr(obj, name);
  Id space = scalar_space();
  Id attr(ELBO_CHECK_H5(H5Acreate2(obj, name.c_str(), H5T_IEEE_F64LE, space, H5P_DEFAULT, H5P_DEFAULT)),
          H5Aclose);
  ELBO_CHECK_H5(H5Awrite(attr, H5T_NATIVE_DOUBLE, &value));
}

bool has_attr(hid_t obj, const std::string& name) { return H5Aexists(obj, name.c_str()) > 0; }

std::string read_attr_string(hid_t obj, const std::string& name) {
  if (!has_attr(obj, name)) throw io_error("attribute '" + name + "' is missing");
  Id attr(ELBO_CHECK_H5(H5Aopen(obj, name.c_str(), H5P_DEFAULT)), H5Aclose);
  Id ftype(ELBO_CHECK_H5(H5Aget_type(attr)), H5Tclose);
  if (H5Tget_class(ftype) != H5T_STRING) throw io_error("attribute '" + name + "' is not a string");
  if (H5Tis_variable_str(ftype) > 0) {
    Id mtype(ELBO_CHECK_H5(H5Tcopy(H5T_C_S1)), H5Tclose);
    ELBO_CHECK_H5(H5Tset_size(mtype, H5T_VARIABLE));
    // HDF5 converts no vlen strings between character sets: read in the file's own.
    ELBO_CHECK_H5(H5Tset_cset(mtype, H5Tget_cset(ftype)));
    char* p = nullptr;
    ELBO_CHECK_H5(H5Aread(attr, mtype, &p));
    std::string out = p != nullptr ? p : "";
    Id space(ELBO_CHECK_H5(H5Aget_space(attr)), H5Sclose);
    H5Dvlen_reclaim(mtype, space, H5P_DEFAULT, &p);
    return out;
  }
  size_t n = H5Tget_size(ftype);
  std::string out(n, '\0');
  ELBO_CHECK_H5(H5Aread(attr, ftype, out.data()));
  out.resize(std::strlen(out.c_str()));
  return out;
}

int64_t read_attr_int(hid_t obj, const std::string& name) {
  if (!has_attr(obj, name)) throw io_error("attribute '" + name + "' is missing");
  Id attr(ELBO_CHECK_H5(H5Aopen(obj, name.c_str(), H5P_DEFAULT)), H5Aclose);
  int64_t v = 0;
  ELBO_CHECK_H5(H5Aread(attr, H5T_NATIVE_INT64, &v));
  return v;
}

double read_attr_double(hid_t obj, const std::string& name) {
  if (!has_attr(obj, name)) throw io_error("attribute '" + name + "' is missing");
  Id attr(ELBO_CHECK_H5(H5Aopen(obj, name.c_str(), H5P_DEFAULT)), H5Aclose);
  double v = 0;
  ELBO_CHECK_H5(H5Aread(attr, H5T_NATIVE_DOUBLE, &v));
  return v;
}

}  // namespace elbo::h5
