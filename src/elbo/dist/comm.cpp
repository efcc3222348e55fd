// MPI communicator, failure agreement, and world discovery.
#include "elbo/dist/comm.hpp"

#include <unistd.h>

#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace elbo {

namespace detail {
[[noreturn]] void mpi_failed(const char* call, const char* file, int line, int rc) {
  char buf[MPI_MAX_ERROR_STRING] = {0};
  int len = 0;
  MPI_Error_string(rc, buf, &len);
  ::elbo::detail::throw_call_failed(ErrorKind::Dist, call, file, line, std::string(buf, static_cast<size_t>(len)));
}
}  // namespace detail

int launcher_local_rank() {
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID"}) {
    const char* v = std::getenv(var);
    if (v == nullptr || *v == '\0') continue;
    char* end = nullptr;
    long r = std::strtol(v, &end, 10);
    if (*end == '\0' && r >= 0) return static_cast<int>(r);
  }
  return -1;
}

std::string launcher_description() {
  auto env = [](const char* name) -> std::string {
    const char* v = std::getenv(name);
    return v != nullptr ? v : "";
  };
  const std::string job = env("SLURM_JOB_ID"), restart = env("SLURM_RESTART_COUNT");
  const std::string in_job = job.empty() ? "" : "SLURM job " + job + (restart.empty() ? "" : ", restart " + restart);
  // Open MPI sets OMPI_COMM_WORLD_SIZE in processes that mpirun starts; srun sets
  // SLURM_STEP_ID for the tasks of a step (the batch script itself has none).
  if (!env("OMPI_COMM_WORLD_SIZE").empty()) return in_job.empty() ? "mpirun" : "mpirun inside " + in_job;
  if (!env("SLURM_STEP_ID").empty() && !env("SLURM_PROCID").empty()) return "srun (" + in_job + ")";
  return in_job.empty() ? "direct" : "direct (" + in_job + ")";
}

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    ELBO_CHECK_MPI(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
  }
  // Return errors to the caller instead of aborting inside MPI: our messages name the call.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
}

MpiRuntime::~MpiRuntime() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

MpiCommunicator::MpiCommunicator() {
  ELBO_CHECK_MPI(MPI_Comm_dup(MPI_COMM_WORLD, &m_comm));
  ELBO_CHECK_MPI(MPI_Comm_set_errhandler(m_comm, MPI_ERRORS_RETURN));
  ELBO_CHECK_MPI(MPI_Comm_rank(m_comm, &m_world.rank));
  ELBO_CHECK_MPI(MPI_Comm_size(m_comm, &m_world.size));
  // Ranks sharing a node: the split MPI itself knows, whatever the launcher (mpirun, srun).
  MPI_Comm node = MPI_COMM_NULL;
  ELBO_CHECK_MPI(MPI_Comm_split_type(m_comm, MPI_COMM_TYPE_SHARED, m_world.rank, MPI_INFO_NULL, &node));
  ELBO_CHECK_MPI(MPI_Comm_rank(node, &m_world.local_rank));
  ELBO_CHECK_MPI(MPI_Comm_size(node, &m_world.local_size));
  // Prefer the launcher's numbering when it has one: GPU binding in SLURM and Open MPI
  // scripts (e.g. CUDA_VISIBLE_DEVICES per task) is written against it. Only when it
  // numbers this node's ranks 0..n-1 exactly once: mpirun inside an sbatch script, for
  // one, leaves every rank with the batch step's SLURM_LOCALID=0.
  std::vector<int> ids(static_cast<size_t>(m_world.local_size), -1);
  const int mine = launcher_local_rank();
  ELBO_CHECK_MPI(MPI_Allgather(&mine, 1, MPI_INT, ids.data(), 1, MPI_INT, node));
  std::vector<int> seen(ids.size(), 0);
  bool permutation = true;
  for (int id : ids) {
    if (id < 0 || id >= m_world.local_size || seen[static_cast<size_t>(id)]++) permutation = false;
  }
  if (permutation) m_world.local_rank = mine;
  MPI_Comm_free(&node);
  const int leader = m_world.local_rank == 0 ? 1 : 0;  // one per node
  ELBO_CHECK_MPI(MPI_Allreduce(&leader, &m_world.nodes, 1, MPI_INT, MPI_SUM, m_comm));
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  m_world.host = host;
  // Every rank's host, so a message can say where a silent rank runs.
  constexpr int kHostLen = 64;
  char mine_host[kHostLen] = {0};
  std::snprintf(mine_host, sizeof(mine_host), "%s", host);
  std::vector<char> all(static_cast<size_t>(kHostLen) * static_cast<size_t>(m_world.size));
  ELBO_CHECK_MPI(MPI_Allgather(mine_host, kHostLen, MPI_CHAR, all.data(), kHostLen, MPI_CHAR, m_comm));
  for (int r = 0; r < m_world.size; ++r) m_hosts.emplace_back(all.data() + static_cast<size_t>(r) * kHostLen);
  ELBO_CHECK_MPI(MPI_Comm_dup(m_comm, &m_ctl));
  ELBO_CHECK_MPI(MPI_Comm_set_errhandler(m_ctl, MPI_ERRORS_RETURN));
  setup_link_checks();
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (m_ctl != MPI_COMM_NULL && !finalized) MPI_Comm_free(&m_ctl);
  if (m_comm != MPI_COMM_NULL && !finalized) MPI_Comm_free(&m_comm);
}

namespace {
constexpr int kRollCallTag = 17, kRollAnswerTag = 18;
}  // namespace

void MpiCommunicator::answer_roll_calls() {
  for (;;) {
    int flag = 0;
    MPI_Status status;
    if (MPI_Iprobe(MPI_ANY_SOURCE, kRollCallTag, m_ctl, &flag, &status) != MPI_SUCCESS || !flag) return;
    int ping = 0;
    MPI_Recv(&ping, 1, MPI_INT, status.MPI_SOURCE, kRollCallTag, m_ctl, MPI_STATUS_IGNORE);
    MPI_Send(&ping, 1, MPI_INT, status.MPI_SOURCE, kRollAnswerTag, m_ctl);  // one int: sent eagerly
  }
}

std::string MpiCommunicator::silent_ranks(double seconds) {
  using Clock = std::chrono::steady_clock;
  const int n = m_world.size;
  std::vector<int> ping(static_cast<size_t>(n), 1), answer(static_cast<size_t>(n), 0);
  std::vector<MPI_Request> sends(static_cast<size_t>(n), MPI_REQUEST_NULL), recvs(sends);
  for (int r = 0; r < n; ++r) {
    if (r == m_world.rank) continue;
    MPI_Isend(&ping[static_cast<size_t>(r)], 1, MPI_INT, r, kRollCallTag, m_ctl, &sends[static_cast<size_t>(r)]);
    MPI_Irecv(&answer[static_cast<size_t>(r)], 1, MPI_INT, r, kRollAnswerTag, m_ctl, &recvs[static_cast<size_t>(r)]);
  }
  const auto until = Clock::now() + std::chrono::duration<double>(seconds);
  std::vector<int> done(static_cast<size_t>(n), 0);
  done[static_cast<size_t>(m_world.rank)] = 1;
  while (Clock::now() < until) {
    answer_roll_calls();  // a peer may be taking the same roll call
    bool all = true;
    for (int r = 0; r < n; ++r) {
      if (done[static_cast<size_t>(r)]) continue;
      MPI_Test(&recvs[static_cast<size_t>(r)], &done[static_cast<size_t>(r)], MPI_STATUS_IGNORE);
      all = all && done[static_cast<size_t>(r)];
    }
    if (all) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  std::string silent;
  for (int r = 0; r < n; ++r)
    if (!done[static_cast<size_t>(r)])
      silent += (silent.empty() ? "" : ", ") + std::to_string(r) + " (" + m_hosts[static_cast<size_t>(r)] + ")";
  // The job ends right after this; the requests still pending die with it.
  return silent;
}

void MpiCommunicator::give_up(const std::string& operation, bool stop_deadline) {
  const std::string silent = m_world.size > 1 ? silent_ranks(1.0) : "";
  const std::string who = silent.empty() ? "every rank answered a roll call, so one is slow rather than stalled"
                                         : "rank(s) " + silent + " did not answer: stopped, stalled or gone";
  if (stop_deadline)
    std::fprintf(stderr,
                 "elbo: rank %d (%s): a stop was requested, but %s did not finish before checkpoint.grace_s ran "
                 "out (%s); exiting without a checkpoint\n",
                 m_world.rank, m_world.host.c_str(), operation.c_str(), who.c_str());
  else
    std::fprintf(stderr, "elbo: rank %d (%s): %s did not finish within %.0f s (dist.timeout_s): %s; aborting the job\n",
                 m_world.rank, m_world.host.c_str(), operation.c_str(), m_timeout_s, who.c_str());
  std::fflush(stderr);
  abort(stop_deadline ? m_stop_exit : kExitPeerFailure);
}

void MpiCommunicator::wait(MPI_Request* requests, int n, const char* operation) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  // Poll rather than block in MPI_Waitall: that keeps the deadline in our hands.
  // Spin first (a gradient all-reduce takes well under a millisecond on one node),
  // then back off so a rank waiting for a slow peer (rank 0 writing files) idles.
  for (long polls = 0;; ++polls) {
    int done = 0;
    ELBO_CHECK_MPI(MPI_Testall(n, requests, &done, MPI_STATUSES_IGNORE));
    if (done) return;
    if (polls == 0) service(0.0);  // a peer's roll call or link probe waits for no spin
    if ((polls & 255) == 255) {
      const double waited = std::chrono::duration<double>(Clock::now() - start).count();
      service(waited);
      if (m_timeout_s > 0 && waited > m_timeout_s) give_up(operation, false);
      if (m_stop_left && m_stop_left() < kStopDeadlineMargin) give_up(operation, true);
      if (waited > 1e-3) std::this_thread::sleep_for(std::chrono::microseconds(waited > 0.1 ? 2000 : 50));
    }
  }
}

void MpiCommunicator::allreduce_sum(float* data, size_t n) {
  // MPI counts are int: reduce in chunks so buffers past 2^31 elements still work.
  for (size_t off = 0; off < n; off += INT_MAX) {
    int cnt = static_cast<int>(std::min<size_t>(INT_MAX, n - off));
    MPI_Request req = MPI_REQUEST_NULL;
    ELBO_CHECK_MPI(MPI_Iallreduce(MPI_IN_PLACE, data + off, cnt, MPI_FLOAT, MPI_SUM, m_comm, &req));
    wait(&req, 1, "all-reduce (float)");
  }
}

void MpiCommunicator::allreduce_sum(double* data, size_t n) {
  for (size_t off = 0; off < n; off += INT_MAX) {
    int cnt = static_cast<int>(std::min<size_t>(INT_MAX, n - off));
    MPI_Request req = MPI_REQUEST_NULL;
    ELBO_CHECK_MPI(MPI_Iallreduce(MPI_IN_PLACE, data + off, cnt, MPI_DOUBLE, MPI_SUM, m_comm, &req));
    wait(&req, 1, "all-reduce (double)");
  }
}

int MpiCommunicator::allreduce_max(int value) {
  int out = 0;
  MPI_Request req = MPI_REQUEST_NULL;
  ELBO_CHECK_MPI(MPI_Iallreduce(&value, &out, 1, MPI_INT, MPI_MAX, m_comm, &req));
  wait(&req, 1, "all-reduce (max)");
  return out;
}

void MpiCommunicator::broadcast(void* data, size_t bytes, int root) {
  auto* p = static_cast<char*>(data);
  for (size_t off = 0; off < bytes; off += INT_MAX) {
    int cnt = static_cast<int>(std::min<size_t>(INT_MAX, bytes - off));
    MPI_Request req = MPI_REQUEST_NULL;
    ELBO_CHECK_MPI(MPI_Ibcast(p + off, cnt, MPI_BYTE, root, m_comm, &req));
    wait(&req, 1, "broadcast");
  }
}

void MpiCommunicator::gather(const float* send, size_t count, float* recv, const std::vector<size_t>& counts,
                             int root) {
  const int n = m_world.size;
  if (counts.size() != static_cast<size_t>(n) || counts[static_cast<size_t>(m_world.rank)] != count)
    throw internal_error("gather: counts do not match the world or this rank's count");
  std::vector<int> cnt(static_cast<size_t>(n)), displ(static_cast<size_t>(n));
  size_t total = 0;
  for (int r = 0; r < n; ++r) {
    // MPI_Igatherv takes int counts and displacements; past that, say so rather than wrap.
    if (counts[static_cast<size_t>(r)] > static_cast<size_t>(INT_MAX) || total > static_cast<size_t>(INT_MAX))
      throw internal_error("gather: " + std::to_string(total + counts[static_cast<size_t>(r)]) +
                           " floats exceed MPI's int counts");
    cnt[static_cast<size_t>(r)] = static_cast<int>(counts[static_cast<size_t>(r)]);
    displ[static_cast<size_t>(r)] = static_cast<int>(total);
    total += counts[static_cast<size_t>(r)];
  }
  MPI_Request req = MPI_REQUEST_NULL;
  ELBO_CHECK_MPI(MPI_Igatherv(send, static_cast<int>(count), MPI_FLOAT, recv, cnt.data(), displ.data(), MPI_FLOAT, root,
                              m_comm, &req));
  wait(&req, 1, "gather (float)");
}

void MpiCommunicator::barrier() {
  MPI_Request req = MPI_REQUEST_NULL;
  ELBO_CHECK_MPI(MPI_Ibarrier(m_comm, &req));
  wait(&req, 1, "barrier");
}

void abort_on_timeout(Communicator& comm, const std::string& operation) {
  const WorldInfo& w = comm.world();
  std::fprintf(stderr,
               "elbo: rank %d (%s): %s did not finish within %.0f s (dist.timeout_s): another rank is stalled or "
               "gone; aborting the job\n",
               w.rank, w.host.c_str(), operation.c_str(), comm.timeout());
  std::fflush(stderr);
  comm.abort(kExitPeerFailure);
  std::_Exit(kExitPeerFailure);  // abort() does not return; this tells the compiler so
}

void MpiCommunicator::abort(int code) {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);  // MPI_Abort should not return; make sure the rank is gone if it does
}

void SingleCommunicator::abort(int code) { std::_Exit(code); }

void collectively(Communicator& comm, const std::function<void()>& fn) {
  int failed = 0;
  ErrorKind kind = ErrorKind::Internal;
  std::string message;
  try {
    fn();
  } catch (const Error& e) {
    failed = 1;
    kind = e.kind();
    message = e.what();
  } catch (const std::exception& e) {
    failed = 1;
    message = e.what();
  }
  if (comm.size() == 1) {
    if (failed) throw AgreedError(kind, message);
    return;
  }
  // The lowest failing rank speaks for the job: the max of -rank over failing ranks
  // is minus the lowest of them; INT_MIN from everyone means nobody failed.
  int top = comm.allreduce_max(failed ? -comm.rank() : INT_MIN);
  if (top == INT_MIN) return;
  int lowest = -top;
  int header[2] = {static_cast<int>(kind), static_cast<int>(message.size())};
  comm.broadcast(header, sizeof(header), lowest);
  std::vector<char> text(static_cast<size_t>(header[1]));
  if (comm.rank() == lowest) std::memcpy(text.data(), message.data(), text.size());
  comm.broadcast(text.data(), text.size(), lowest);
  throw AgreedError(static_cast<ErrorKind>(header[0]),
              "rank " + std::to_string(lowest) + ": " + std::string(text.begin(), text.end()));
}

}  // namespace elbo
