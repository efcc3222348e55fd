// World discovery and the Communicator: how replicas sum gradients, share the
// initial parameters and agree on failures. MPI here; NCCL joins it on the GPU.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "elbo/util/error.hpp"

namespace elbo {

// Throws a Dist error naming the MPI call, the call site and MPI's own message.
namespace detail {
[[noreturn]] void mpi_failed(const char* call, const char* file, int line, int rc);
}
#define ELBO_CHECK_MPI(call)                                                  \
  do {                                                                        \
    int elbo_mpi_rc_ = (call);                                                \
    if (elbo_mpi_rc_ != MPI_SUCCESS) ::elbo::detail::mpi_failed(#call, __FILE__, __LINE__, elbo_mpi_rc_); \
  } while (0)

// MPI_Init/MPI_Finalize for the process; errors are returned to us (not fatal) so
// we can report them with context.
class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;
};

// A rank that ends the job because a peer is stalled or gone (a collective past
// dist.timeout_s, an NCCL error) exits with kExitPeerFailure (util/error.hpp),
// distinct from input errors and runtime errors so that job scripts can tell them apart.

struct WorldInfo {
  int rank = 0;
  int size = 1;
  int local_rank = 0;  // rank among the processes on this node
  int local_size = 1;
  int nodes = 1;       // distinct nodes in the job
  std::string host;
};

// The node-local rank as the launcher states it (OMPI_COMM_WORLD_LOCAL_RANK,
// SLURM_LOCALID, MPI_LOCALRANKID), or -1 when none is set.
int launcher_local_rank();

// Who started this process, from the environment, for the logs: "srun (SLURM job 12,
// restart 1)", "mpirun inside SLURM job 12", "mpirun", or "direct".
std::string launcher_description();

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual const WorldInfo& world() const = 0;
  int rank() const { return world().rank; }
  int size() const { return world().size; }
  bool is_root() const { return world().rank == 0; }

  virtual void allreduce_sum(float* data, size_t n) = 0;
  virtual void allreduce_sum(double* data, size_t n) = 0;
  virtual int allreduce_max(int value) = 0;
  virtual void broadcast(void* data, size_t bytes, int root) = 0;
  // `root` receives every rank's `count` floats back to back, rank by rank, into `recv`
  // (counts[r] from rank r; recv is ignored elsewhere).
  virtual void gather(const float* send, size_t count, float* recv, const std::vector<size_t>& counts, int root) = 0;
  virtual void barrier() = 0;
  // Collectives not finished after `seconds` (0 = never) end the job with a message
  // naming this rank and the operation, instead of hanging on a stalled peer.
  void set_timeout(double seconds) { m_timeout_s = seconds; }
  double timeout() const { return m_timeout_s; }
  // Ends every rank of the job; used when one rank fails where the others may be
  // blocked in a collective and an orderly agreement is impossible.
  [[noreturn]] virtual void abort(int code) = 0;
  // A second deadline that can come up while a collective waits: the grace period of
  // a stop request. `seconds_left` is polled (infinity = none); when it falls under
  // kStopDeadlineMargin the wait gives up, names the ranks that do not answer, and
  // aborts the job with `exit_code` (so a stop stuck behind a stalled rank says who).
  void set_stop_deadline(std::function<double()> seconds_left, int exit_code) {
    m_stop_left = std::move(seconds_left);
    m_stop_exit = exit_code;
  }
  // Every rank's host name, by rank.
  virtual std::vector<std::string> rank_hosts() const { return {world().host}; }
  // Called from every wait loop (MPI and NCCL) while a collective is unfinished after
  // `waited_s`: answers peers' control messages (roll calls, link probes) and, on rank
  // 0, measures the links between the nodes when the wait grows long (see
  // set_min_link_mbps). May end the job.
  virtual void service(double waited_s) { (void)waited_s; }
  // A link between nodes measured slower than this (Mbit/s) ends the job, naming the
  // node (dist.min_link_mbps; 0 = never measure): a link that degraded a thousandfold
  // fails no TCP check, and the job would crawl on instead of being requeued.
  void set_min_link_mbps(double mbps) { m_min_link_mbps = mbps; }
  double min_link_mbps() const { return m_min_link_mbps; }
  // The ranks that do not answer a roll call within `seconds`, as "1 (host), 3 (host)"
  // ("" when all answer); every rank waiting in a collective answers.
  virtual std::string silent_ranks(double seconds) { (void)seconds; return ""; }

  static constexpr double kStopDeadlineMargin = 1.5;

 protected:
  double m_timeout_s = 300.0;
  double m_min_link_mbps = 10.0;
  std::function<double()> m_stop_left;
  int m_stop_exit = 1;
};

// Prints "rank R (host): OPERATION did not finish within T s ..." to stderr and
// aborts the whole job with kExitPeerFailure. Never returns.
[[noreturn]] void abort_on_timeout(Communicator& comm, const std::string& operation);

// A communicator over MPI_COMM_WORLD (duplicated, so library traffic never mixes
// with a caller's).
class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator();
  ~MpiCommunicator() override;
  const WorldInfo& world() const override { return m_world; }
  void allreduce_sum(float* data, size_t n) override;
  void allreduce_sum(double* data, size_t n) override;
  int allreduce_max(int value) override;
  void broadcast(void* data, size_t bytes, int root) override;
  void gather(const float* send, size_t count, float* recv, const std::vector<size_t>& counts, int root) override;
  void barrier() override;
  [[noreturn]] void abort(int code) override;

  std::string silent_ranks(double seconds) override;
  std::vector<std::string> rank_hosts() const override { return m_hosts; }
  void service(double waited_s) override;

  MPI_Comm handle() const { return m_comm; }
  // Completes `n` requests, driving MPI progress; past the timeout, aborts the job
  // naming `operation` (abort_on_timeout). Used for every collective, so no rank
  // blocks forever in MPI when a peer is stopped or dead.
  void wait(MPI_Request* requests, int n, const char* operation);

 private:
  void answer_roll_calls();  // replies to peers asking who is alive (from wait())
  [[noreturn]] void give_up(const std::string& operation, bool stop_deadline);
  // Link checks (dist/link_check.cpp): the first rank of every other node listens on a
  // TCP port, which rank 0 connects to while it waits long (a node the network no longer
  // reaches ends the job in ~20 s), and times a transfer each way with (a degraded link
  // ends it too); those ranks answer from their wait loops.
  struct LinkWatch;
  void setup_link_checks();  // collective, from the constructor
  void answer_link_probe();
  void check_reachable();
  void probe_links();
  std::shared_ptr<LinkWatch> m_links;
  MPI_Comm m_comm = MPI_COMM_NULL;
  MPI_Comm m_ctl = MPI_COMM_NULL;  // roll calls, apart from the collectives' traffic
  WorldInfo m_world;
  std::vector<std::string> m_hosts;  // every rank's host name, for messages
};

// One process, no MPI: for unit tests and tools.
class SingleCommunicator final : public Communicator {
 public:
  const WorldInfo& world() const override { return m_world; }
  void allreduce_sum(float*, size_t) override {}
  void allreduce_sum(double*, size_t) override {}
  int allreduce_max(int value) override { return value; }
  void broadcast(void*, size_t, int) override {}
  void gather(const float* send, size_t count, float* recv, const std::vector<size_t>&, int) override {
    std::copy(send, send + count, recv);
  }
  void barrier() override {}
  [[noreturn]] void abort(int code) override;

 private:
  WorldInfo m_world;
};

// An error every rank of the job raised together (after an agreement or from
// all-reduced values): the CLI prints it once, on rank 0, and exits cleanly everywhere.
class AgreedError : public Error {
 public:
  using Error::Error;
};

// Runs `fn` on every rank and makes the outcome collective: if any rank threw an
// elbo::Error, every rank throws an AgreedError with the lowest failing rank's message (prefixed with its
// rank when the job has several), so the job stops everywhere with one message
// and no rank is left waiting in a collective. Use around setup and I/O phases.
void collectively(Communicator& comm, const std::function<void()>& fn);

}  // namespace elbo
