// Preemption: SIGTERM and SIGUSR1 (SLURM's --signal, forwarded by mpirun) ask the
// run to stop. The handler only sets a flag; the loop reads it at the next step
// boundary, all ranks agree on it inside the step's metrics all-reduce, write a
// checkpoint and exit with kExitStopped. A second signal, or the grace period
// (checkpoint.grace_s, armed with alarm()) running out, ends the process at once
// with kExitForced.
#pragma once

namespace elbo {

constexpr int kExitStopped = 75;  // stopped on request, checkpoint written: requeue and --resume auto
constexpr int kExitForced = 76;   // stopped without a checkpoint (second signal or grace period over)

class StopSignals {
 public:
  explicit StopSignals(double grace_s);  // installs the handlers
  ~StopSignals();                        // restores the previous ones, disarms the alarm
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  bool requested() const;
  int signal_number() const;  // the first signal received, 0 if none
};

}  // namespace elbo
