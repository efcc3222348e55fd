// Async-signal-safe stop handling: the handlers touch only lock-free atomics,
// write(2), alarm(2) and _exit(2).
#include "elbo/train/stop_signal.hpp"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cmath>

namespace elbo {

namespace {

std::atomic<int> g_signal{0};
unsigned g_grace_s = 120;
struct sigaction g_old_term, g_old_usr1, g_old_alrm;

void say(const char* msg) {
  size_t n = 0;
  while (msg[n] != '\0') ++n;
  ssize_t rc = ::write(STDERR_FILENO, msg, n);
  (void)rc;
}

extern "C" void on_stop_signal(int sig) {
  int expected = 0;
  if (g_signal.compare_exchange_strong(expected, sig)) {
    alarm(g_grace_s);  // the deadline for the orderly stop
    return;
  }
  say("elbo: second stop signal: exiting now without a checkpoint\n");
  _exit(kExitForced);
}

extern "C" void on_grace_over(int) {
  say("elbo: checkpoint.grace_s ran out after the stop signal: exiting now without a checkpoint\n");
  _exit(kExitForced);
}

}  // namespace

StopSignals::StopSignals(double grace_s) {
  g_signal.store(0);
  g_grace_s = static_cast<unsigned>(std::max(1.0, std::ceil(grace_s)));
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // system calls in flight (file writes, MPI polling) go on
  sigaction(SIGTERM, &sa, &g_old_term);
  sigaction(SIGUSR1, &sa, &g_old_usr1);
  struct sigaction al {};
  al.sa_handler = on_grace_over;
  sigemptyset(&al.sa_mask);
  sigaction(SIGALRM, &al, &g_old_alrm);
}

StopSignals::~StopSignals() {
  alarm(0);
  sigaction(SIGTERM, &g_old_term, nullptr);
  sigaction(SIGUSR1, &g_old_usr1, nullptr);
  sigaction(SIGALRM, &g_old_alrm, nullptr);
}

bool StopSignals::requested() const { return g_signal.load() != 0; }
int StopSignals::signal_number() const { return g_signal.load(); }

}  // namespace elbo
