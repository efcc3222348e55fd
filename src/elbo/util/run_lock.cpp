// The run-directory lock (see run_lock.hpp).
#include "elbo/util/run_lock.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <string>

#include "elbo/util/error.hpp"

namespace elbo {

namespace {

std::string holder_of(int fd) {
  char buf[512] = {};
  const ssize_t n = ::pread(fd, buf, sizeof(buf) - 1, 0);
  std::string s = n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s.empty() ? "a process that has not yet written its name" : s;
}

}  // namespace

RunLock::RunLock(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw io_error("cannot create output directory '" + dir + "': " + ec.message());
  const std::string path = (std::filesystem::path(dir) / ".lock").string();
  m_fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (m_fd < 0) throw io_error("cannot open the run lock " + path + ": " + std::strerror(errno));
  if (::flock(m_fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    const std::string who = err == EWOULDBLOCK ? holder_of(m_fd) : std::string();
    ::close(m_fd);
    m_fd = -1;
    if (err == EWOULDBLOCK)
      throw config_error("output.dir: '" + dir + "' is in use by another elbo job (" + who +
                         "); wait for it to end, or give this job another output.dir");
    throw io_error("cannot lock " + path + ": " + std::strerror(err));
  }
  // Who holds it, for the message a second job prints.
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  const std::time_t now = std::time(nullptr);
  char when[64] = {};
  std::strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S UTC", std::gmtime(&now));
  const std::string who = "pid " + std::to_string(::getpid()) + " on " + host + ", since " + when + "\n";
  if (::ftruncate(m_fd, 0) != 0 || ::pwrite(m_fd, who.data(), who.size(), 0) < 0) {
    // The lock holds without the note; only the second job's message gets vaguer.
  }
}

RunLock::~RunLock() {
  if (m_fd >= 0) ::close(m_fd);  // closing releases the flock
}

RunLock::RunLock(RunLock&& other) noexcept : m_fd(other.m_fd) { other.m_fd = -1; }

RunLock& RunLock::operator=(RunLock&& other) noexcept {
  if (this != &other) {
    if (m_fd >= 0) ::close(m_fd);
    m_fd = other.m_fd;
    other.m_fd = -1;
  }
  return *this;
}

}  // namespace elbo
