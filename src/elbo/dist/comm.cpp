// MPI communicator, failure agreement, and world discovery.
#include "elbo/dist/comm.hpp"

#include <unistd.h>

#include <climits>
#include <cstring>
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
  MPI_Comm_free(&node);
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  m_world.host = host;
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (m_comm != MPI_COMM_NULL && !finalized) MPI_Comm_free(&m_comm);
}

void MpiCommunicator::allreduce_sum(float* data, size_t n) {
  // MPI counts are int: reduce in chunks so buffers past 2^31 elements still work.
  for (size_t off = 0; off < n; off += INT_MAX) {
    int cnt = static_cast<int>(std::min<size_t>(INT_MAX, n - off));
    ELBO_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, data + off, cnt, MPI_FLOAT, MPI_SUM, m_comm));
  }
}

void MpiCommunicator::allreduce_sum(double* data, size_t n) {
  for (size_t off = 0; off < n; off += INT_MAX) {
    int cnt = static_cast<int>(std::min<size_t>(INT_MAX, n - off));
    ELBO_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, data + off, cnt, MPI_DOUBLE, MPI_SUM, m_comm));
  }
}

int MpiCommunicator::allreduce_max(int value) {
  int out = 0;
  ELBO_CHECK_MPI(MPI_Allreduce(&value, &out, 1, MPI_INT, MPI_MAX, m_comm));
  return out;
}

void MpiCommunicator::broadcast(void* data, size_t bytes, int root) {
  auto* p = static_cast<char*>(data);
  for (size_t off = 0; off < bytes; off += INT_MAX) {
    int cnt = static_cast<int>(std::min<size_t>(INT_MAX, bytes - off));
    ELBO_CHECK_MPI(MPI_Bcast(p + off, cnt, MPI_BYTE, root, m_comm));
  }
}

void MpiCommunicator::barrier() { ELBO_CHECK_MPI(MPI_Barrier(m_comm)); }

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
