// Async-signal-safe stop handling: the handlers touch only lock-free atomics,
// clock_gettime(2), write(2), alarm(2) and _exit(2), and messages formatted beforehand.
#include "elbo/train/stop_signal.hpp"

#include <fcntl.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>

namespace elbo {

namespace {

std::atomic<int> g_signal{0};
std::atomic<long long> g_signal_ns{0};  // CLOCK_MONOTONIC time of the first request
std::atomic<unsigned> g_grace_s{120};
std::atomic<bool> g_exit_at_once{false};
std::atomic<bool> g_installed{false};
// Messages, formatted outside the handlers (they must not allocate or format).
char g_second_msg[256] = "elbo: a second stop signal arrived before the checkpoint: exiting now without one\n";
char g_grace_msg[256] = "elbo: checkpoint.grace_s ran out after the stop signal: exiting now without a checkpoint\n";
char g_at_once_msg[512] = "";
char g_marker_path[1024] = "";  // ELBO_STOP_FILE on rank 0, empty elsewhere
constexpr const char kMarkerText[] = "stopped on request; resumable with --resume auto\n";

// open/write/close only: callable from a handler.
void write_marker_file() {
  if (g_marker_path[0] == '\0') return;
  const int fd = ::open(g_marker_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return;
  const ssize_t rc = ::write(fd, kMarkerText, sizeof(kMarkerText) - 1);
  (void)rc;
  ::close(fd);
}

long long monotonic_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<long long>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

void say(const char* msg) {
  const ssize_t rc = ::write(STDERR_FILENO, msg, std::strlen(msg));
  (void)rc;
}

extern "C" void on_stop_signal(int sig) {
  int expected = 0;
  if (g_signal.compare_exchange_strong(expected, sig)) {
    g_signal_ns.store(monotonic_ns());
    if (g_exit_at_once.load()) {
      say(g_at_once_msg);
      write_marker_file();
      _exit(kExitStopped);
    }
    alarm(g_grace_s.load());  // the deadline for the orderly stop
    return;
  }
  say(g_second_msg);
  _exit(kExitForced);
}

extern "C" void on_grace_over(int) {
  say(g_grace_msg);
  _exit(kExitForced);
}

void set_handler(int sig, void (*fn)(int)) {
  struct sigaction sa {};
  sa.sa_handler = fn;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // system calls in flight (file writes, MPI polling) go on
  sigaction(sig, &sa, nullptr);
}

}  // namespace

void install_stop_handlers() {
  if (g_installed.exchange(true)) return;
  set_handler(SIGTERM, on_stop_signal);
  set_handler(SIGUSR1, on_stop_signal);
  set_handler(SIGINT, on_stop_signal);
  set_handler(SIGALRM, on_grace_over);
}

StopSignals::StopSignals(double grace_s, const std::string& who) {
  install_stop_handlers();
  g_grace_s.store(static_cast<unsigned>(std::max(1.0, std::ceil(grace_s))));
  std::snprintf(g_second_msg, sizeof(g_second_msg),
                "elbo: %s: another stop signal arrived before the checkpoint was written (a second Ctrl-C or "
                "signal, or the launcher ending the job): exiting now without a checkpoint\n",
                who.c_str());
  std::snprintf(g_grace_msg, sizeof(g_grace_msg),
                "elbo: %s: checkpoint.grace_s (%u s) ran out after the stop signal: exiting now without a "
                "checkpoint\n",
                who.c_str(), g_grace_s.load());
}

StopSignals::~StopSignals() {
  g_exit_at_once.store(false);
  g_signal.store(0);
  g_signal_ns.store(0);
  g_marker_path[0] = '\0';
  alarm(0);
  for (int sig : {SIGTERM, SIGUSR1, SIGINT, SIGALRM}) signal(sig, SIG_DFL);
  g_installed.store(false);
}

bool StopSignals::requested() const { return g_signal.load() != 0; }
int StopSignals::signal_number() const { return g_signal.load(); }

double StopSignals::grace_left() const {
  const long long at = g_signal_ns.load();
  if (at == 0) return std::numeric_limits<double>::infinity();
  return static_cast<double>(g_grace_s.load()) - static_cast<double>(monotonic_ns() - at) * 1e-9;
}

void StopSignals::exit_at_once(const std::string& message) {
  std::snprintf(g_at_once_msg, sizeof(g_at_once_msg), "%s\n", message.c_str());
  g_exit_at_once.store(true);
}

void StopSignals::set_marker(const std::string& path) {
  std::snprintf(g_marker_path, sizeof(g_marker_path), "%s", path.c_str());
}

void StopSignals::write_marker() const { write_marker_file(); }

}  // namespace elbo
