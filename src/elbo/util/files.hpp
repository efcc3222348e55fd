// Small shared helpers for writing files safely and for messages about shapes.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace elbo {

// Renames `tmp` over `path` (atomic on one file system); removes `tmp` and throws
// an Io error naming both on failure.
void rename_into_place(const std::string& tmp, const std::string& path);

// Creates (or truncates) `path`, writes `size` bytes and fsyncs them. On any failure
// (a full disk, a quota) the partial file is removed and the Io error names `path`
// with the system's reason ("No space left on device").
void write_file_durably(const std::string& path, const void* data, size_t size);

// Writes `text` to `path` via a temporary file and rename_into_place.
void write_text_file_atomic(const std::string& path, const std::string& text);

// Durability for crash-safe replacement: fsync a file's data, and fsync a directory
// so that a rename inside it survives a power loss. Throw Io errors naming the path.
void fsync_path(const std::string& path);
void fsync_directory(const std::string& dir);

// "(2, 3, 4)" or, with brackets "[]", "[2, 3, 4]".
template <class T>
std::string shape_string(const std::vector<T>& dims, const char* brackets = "()") {
  std::string out(1, brackets[0]);
  for (size_t i = 0; i < dims.size(); ++i) out += (i ? ", " : "") + std::to_string(dims[i]);
  return out + brackets[1];
}

// Whether `dims` is a sample shape [C, H, W] with positive sizes (a manifest's, a
// model's input).
template <class T>
bool is_sample_shape(const std::vector<T>& dims) {
  return dims.size() == 3 && dims[0] >= 1 && dims[1] >= 1 && dims[2] >= 1;
}

}  // namespace elbo
