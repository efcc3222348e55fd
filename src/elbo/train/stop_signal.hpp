// Preemption: SIGTERM, SIGUSR1 (SLURM's --signal, forwarded by mpirun) and SIGINT
// (Ctrl-C) ask the run to stop. The handler only records the request; the loop reads
// it at the next step boundary, all ranks agree on it inside the step's metrics
// all-reduce, write a checkpoint and exit with kExitStopped. A second signal, or the
// grace period (checkpoint.grace_s, armed with alarm()) running out, ends the process
// at once with kExitForced.
//
// The handlers go in first thing (install_stop_handlers, before MPI starts), so a
// signal during start-up is a stop request too, never the default death.
#pragma once

#include <string>

#include "elbo/util/error.hpp"

namespace elbo {

// kExitStopped and kExitForced: util/error.hpp.

// Installs the handlers (idempotent). Requests are recorded from then on.
void install_stop_handlers();

class StopSignals {
 public:
  // Installs the handlers if needed and sets the grace period; a request that came
  // before (during start-up) stays pending. `who` ("rank 3 on node7") goes into the
  // messages the handlers print.
  StopSignals(double grace_s, const std::string& who);
  ~StopSignals();  // restores the default handlers, disarms the alarm
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  bool requested() const;
  int signal_number() const;  // the first signal received, 0 if none
  // Seconds until the grace period of a pending request runs out (infinity without
  // one): collectives give up a little before, naming the ranks that do not answer.
  double grace_left() const;
  // From now on everything the run must keep is on disk (final checkpoint, model.h5):
  // a request exits at once with kExitStopped and `message` instead of waiting for a
  // step boundary that will not come (the final evaluation, the image grids).
  void exit_at_once(const std::string& message);

  // The marker file for job scripts (ELBO_STOP_FILE, rank 0 only): written when the run
  // stops resumably, also from the handler in exit_at_once mode, so a script can
  // requeue the job whatever exit status its launcher reports (mpirun turns a rank's
  // 75 into 1 when it was signalled itself). Empty path: no marker.
  void set_marker(const std::string& path);
  void write_marker() const;
};

}  // namespace elbo
