// Atomic file replacement: readers see the old file or the new one, never a torn one.
#include "elbo/util/files.hpp"

#include <filesystem>
#include <fstream>

#include "elbo/util/error.hpp"

namespace elbo {

void rename_into_place(const std::string& tmp, const std::string& path) {
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    throw io_error("cannot move '" + tmp + "' to '" + path + "': " + ec.message());
  }
}

void write_text_file_atomic(const std::string& path, const std::string& text) {
  std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw io_error("cannot write '" + tmp + "'");
    out << text;
    out.flush();
    if (!out) throw io_error("writing '" + tmp + "' failed (disk full?)");
  }
  rename_into_place(tmp, path);
}

}  // namespace elbo
