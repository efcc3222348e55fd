// Atomic file replacement: readers see the old file or the new one, never a torn one.
#include "elbo/util/files.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "elbo/util/error.hpp"

namespace elbo {

void rename_into_place(const std::string& tmp, const std::string& path) {
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::error_code cleanup;  // its result must not replace the reason the rename failed
    std::filesystem::remove(tmp, cleanup);
    throw io_error("cannot move '" + tmp + "' to '" + path + "': " + ec.message());
  }
}

void write_file_durably(const std::string& path, const void* data, size_t size) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) throw io_error("cannot create '" + path + "': " + std::strerror(errno));
  const auto* p = static_cast<const unsigned char*>(data);
  int err = 0;
  for (size_t done = 0; done < size && err == 0;) {
    const ssize_t n = ::write(fd, p + done, size - done);
    if (n > 0) done += static_cast<size_t>(n);
    else if (n < 0 && errno != EINTR) err = errno;
    else if (n == 0) err = EIO;
  }
  if (err == 0 && ::fsync(fd) != 0) err = errno;
  if (::close(fd) != 0 && err == 0) err = errno;  // NFS may report a failed write only here
  if (err != 0) {
    ::unlink(path.c_str());  // a partial file must not look like a finished one
    throw io_error("cannot write '" + path + "': " + std::strerror(err));
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

void fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw io_error("cannot open '" + path + "' to sync it: " + std::strerror(errno));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) throw io_error("fsync of '" + path + "' failed: " + std::strerror(err));
}

void fsync_directory(const std::string& dir) {
  int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw io_error("cannot open directory '" + dir + "' to sync it: " + std::strerror(errno));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  // Some file systems (e.g. certain network mounts) refuse fsync on directories.
  if (rc != 0 && err != EINVAL && err != EROFS)
    throw io_error("fsync of directory '" + dir + "' failed: " + std::strerror(err));
}

}  // namespace elbo
