// Link checks: a node the network no longer reaches, or whose link degraded (a port
// renegotiated to 10 Mbit/s, a failing cable), fails no MPI call for many minutes: TCP
// retransmits for ~15 minutes, and a slow link fails nothing at all, so the job would
// hang until dist.timeout_s or crawl on at a thousandth of its speed. Two checks run on
// rank 0 while it waits long in a collective (over kProbeAfter), against the first rank
// of every other node:
// - Reachability: that rank listens on a TCP port from the start; rank 0 connects to
//   it. The kernel completes the handshake even while the process computes, so only a
//   node the network cannot reach (timeout) or a process that is gone (refused) fails.
//   Failing for kUnreachableFor seconds ends the job with kExitPeerFailure naming the
//   node: a 5-second flap is survived, a lost node or link ends the job in ~20 s under
//   any launcher (mpirun's own keepalive takes ~30 s, srun none at all).
// - Bandwidth: 1 MiB each way, each leg timed by its receiver from the moment it posts
//   the receive. The probe is larger than any transport's eager limit, so the data only
//   moves once the receive is posted, and a receiver that was busy computing does not
//   make a fast link look slow. Slower than dist.min_link_mbps ends the job, naming the
//   node; else rank 0 prints the rates it measured. A node that does not take part
//   within kAnswerWait (busy in a long computation) is not judged this round.
// Both are best effort: a node whose port could not be opened is only probed by MPI.
#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "elbo/dist/comm.hpp"

namespace elbo {

namespace {
constexpr int kProbeHeaderTag = 19;  // {round, bytes, leg deadline in ms}
constexpr int kProbeTagBase = 1000;  // + 3 * (round % kRounds) + {0 data to the node, 1 result, 2 data back}
constexpr int kRounds = 8192;        // keeps tags under MPI's guaranteed minimum MPI_TAG_UB (32767)
constexpr int kProbeBytes = 1 << 20;
constexpr double kProbeAfter = 2.0;   // a wait longer than this on rank 0 starts a round
constexpr double kProbeEvery = 30.0;  // at most one round per this many seconds
constexpr double kAnswerWait = 5.0;   // a node's first rank must join within this
constexpr double kLegMargin = 0.5;    // latency and scheduling on top of the transfer time
constexpr double kConnectWait = 3.0;  // a TCP handshake slower than this counts as failed
constexpr double kRecheck = 5.0;      // a failing node is checked again after this
constexpr double kUnreachableFor = 15.0;  // failing this long ends the job
constexpr int kMpirunGrace = 45;      // under mpirun, its own keepalive ends the job first
constexpr int kInfoLen = 512;         // "port addr addr ..." of one node, gathered at start

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

int tag_of(int round, int leg) { return kProbeTagBase + 3 * (round % kRounds) + leg; }

// Polls `req` until it completes or `seconds` pass, running `idle` between polls.
// Returns whether it completed; an unfinished receive is cancelled, an unfinished send
// left to finish (or not) on its own, so no later round can match it (tags differ).
template <class Idle>
bool complete_within(MPI_Request* req, double seconds, Idle idle) {
  const auto t0 = Clock::now();
  for (;;) {
    int done = 0;
    if (MPI_Test(req, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) return false;
    if (done) return true;
    if (since(t0) > seconds) return false;
    idle();
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

// The buffers of every probe, for the life of the process: a dropped (timed-out)
// request may still read or write its buffer until MPI ends, so none is ever freed.
struct ProbeBuffers {
  std::vector<char> data = std::vector<char>(kProbeBytes, 1);
  std::vector<char> back = std::vector<char>(kProbeBytes);
  int header[3] = {0, 0, 0};
  double result = 0;
};
ProbeBuffers& buffers() {
  static ProbeBuffers* b = new ProbeBuffers;  // never deleted, see above
  return *b;
}

void drop(MPI_Request* req, bool receive) {
  if (*req == MPI_REQUEST_NULL) return;
  if (receive) MPI_Cancel(req);
  MPI_Request_free(req);
}
}  // namespace

// What rank 0 knows about every other node, and what a node's first rank listens on.
struct MpiCommunicator::LinkWatch {
  struct Node {
    int rank = 0;                        // the node's first rank
    int port = 0;                        // 0: no port (could not listen): MPI probes only
    std::vector<sockaddr_in> addrs;      // the node's IPv4 addresses
    bool failing = false;
    Clock::time_point failing_since{};
    std::string error;                   // the last failure, for the message
  };
  std::vector<Node> nodes;               // rank 0 only
  Clock::time_point next_reach{}, last_probe{};
  bool probed = false;
  int round = 0;
  bool lost = false;                     // a node was found unreachable: the job ends
  Clock::time_point abort_at{};
  int listen_fd = -1;                    // a node's first rank (not on rank 0's node)

  ~LinkWatch() {
    if (listen_fd >= 0) close(listen_fd);
  }
};

namespace {
// The first rank of every node but rank 0's.
std::vector<int> node_leaders(const std::vector<std::string>& hosts) {
  std::vector<int> leaders;
  for (size_t r = 1; r < hosts.size(); ++r) {
    bool first = hosts[r] != hosts[0];
    for (size_t q = 0; q < r && first; ++q) first = hosts[q] != hosts[r];
    if (first) leaders.push_back(static_cast<int>(r));
  }
  return leaders;
}

// A listening socket on every address, on a port the kernel picks; "port addr addr..."
// for rank 0, or "0" where that fails (then this node is only probed over MPI).
std::string open_listener(int* fd_out) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return "0";
  sockaddr_in any{};
  any.sin_family = AF_INET;
  any.sin_addr.s_addr = htonl(INADDR_ANY);
  socklen_t len = sizeof(any);
  if (bind(fd, reinterpret_cast<sockaddr*>(&any), sizeof(any)) != 0 || listen(fd, SOMAXCONN) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&any), &len) != 0) {
    close(fd);
    return "0";
  }
  std::string info = std::to_string(ntohs(any.sin_port));
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) == 0) {
    for (ifaddrs* i = list; i != nullptr; i = i->ifa_next) {
      if (i->ifa_addr == nullptr || i->ifa_addr->sa_family != AF_INET || !(i->ifa_flags & IFF_UP) ||
          (i->ifa_flags & IFF_LOOPBACK))
        continue;
      char text[INET_ADDRSTRLEN] = {0};
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr, text, sizeof(text));
      if (info.size() + 1 + std::strlen(text) < static_cast<size_t>(kInfoLen)) info += std::string(" ") + text;
    }
    freeifaddrs(list);
  }
  *fd_out = fd;
  return info;
}

// Connects to every address at once; "" when one completes the handshake within
// kConnectWait, else why not ("connection refused", "timed out", ...).
std::string try_connect(const std::vector<sockaddr_in>& addrs, int port) {
  std::vector<pollfd> fds;
  std::string error = "no address";
  for (sockaddr_in a : addrs) {
    a.sin_port = htons(static_cast<uint16_t>(port));
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) continue;
    if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0) {
      close(fd);
      for (pollfd& p : fds) close(p.fd);
      return "";
    }
    if (errno != EINPROGRESS) {
      error = std::strerror(errno);
      close(fd);
      continue;
    }
    fds.push_back({fd, POLLOUT, 0});
  }
  const auto t0 = Clock::now();
  bool ok = false;
  while (!fds.empty() && !ok) {
    const int left_ms = static_cast<int>((kConnectWait - since(t0)) * 1000.0);
    if (left_ms <= 0) {
      error = "no handshake within " + std::to_string(static_cast<int>(kConnectWait)) + " s";
      break;
    }
    if (poll(fds.data(), fds.size(), left_ms) <= 0) continue;
    for (size_t i = 0; i < fds.size();) {
      if (fds[i].revents == 0) {
        ++i;
        continue;
      }
      int err = 0;
      socklen_t len = sizeof(err);
      getsockopt(fds[i].fd, SOL_SOCKET, SO_ERROR, &err, &len);
      if (err == 0) ok = true;
      else error = std::strerror(err);
      close(fds[i].fd);
      fds.erase(fds.begin() + static_cast<long>(i));
    }
  }
  for (pollfd& p : fds) close(p.fd);
  return ok ? "" : error;
}
}  // namespace

void MpiCommunicator::setup_link_checks() {
  m_links = std::make_shared<LinkWatch>();
  const std::vector<int> leaders = node_leaders(m_hosts);
  if (leaders.empty()) return;  // one node: nothing crosses a network
  // Rank 0 and the first rank of every other node listen; rank 0 checks those, and they
  // check rank 0 (a node cut off from the job ends its own ranks, rather than leaving
  // them spinning in a collective until dist.timeout_s and the scheduler waiting on them).
  const bool leader = m_world.rank == 0 || std::find(leaders.begin(), leaders.end(), m_world.rank) != leaders.end();
  std::vector<char> mine(kInfoLen, 0);
  if (leader) {
    const std::string info = open_listener(&m_links->listen_fd);
    std::snprintf(mine.data(), mine.size(), "%s", info.c_str());
  }
  std::vector<char> all(static_cast<size_t>(kInfoLen) * static_cast<size_t>(m_world.size));
  ELBO_CHECK_MPI(MPI_Allgather(mine.data(), kInfoLen, MPI_CHAR, all.data(), kInfoLen, MPI_CHAR, m_comm));
  if (!leader) return;
  const auto node_of = [&](int r) {
    LinkWatch::Node node;
    node.rank = r;
    std::istringstream in(std::string(all.data() + static_cast<size_t>(r) * kInfoLen));
    in >> node.port;
    for (std::string text; in >> text;) {
      sockaddr_in a{};
      a.sin_family = AF_INET;
      if (inet_pton(AF_INET, text.c_str(), &a.sin_addr) == 1) node.addrs.push_back(a);
    }
    return node;
  };
  if (m_world.rank == 0)
    for (int r : leaders) m_links->nodes.push_back(node_of(r));
  else
    m_links->nodes.push_back(node_of(0));
  // A port that cannot be reached now (a host firewall that only lets MPI's ports
  // through) would later look like a lost node: check once, and drop what fails.
  for (LinkWatch::Node& n : m_links->nodes) {
    if (n.port <= 0) continue;
    const std::string error = try_connect(n.addrs, n.port);
    if (error.empty()) continue;
    std::fprintf(stderr,
                 "elbo: rank %d (%s): warning: cannot reach the link-check port %d of rank %d on node %s (%s): a "
                 "loss of that node is left to dist.timeout_s and the launcher\n",
                 m_world.rank, m_world.host.c_str(), n.port, n.rank, m_hosts[static_cast<size_t>(n.rank)].c_str(),
                 error.c_str());
    n.port = 0;
  }
}

void MpiCommunicator::service(double waited_s) {
  answer_roll_calls();
  if (!m_links) return;
  LinkWatch& w = *m_links;
  // Peers' handshakes wait in the listen queue; take them off so it never fills.
  if (w.listen_fd >= 0)
    for (int fd; (fd = accept4(w.listen_fd, nullptr, nullptr, SOCK_CLOEXEC)) >= 0;) close(fd);
  if (m_world.rank != 0) {
    answer_link_probe();
    // A node's first rank checks that rank 0 is still reachable.
    if (!w.nodes.empty() && !w.lost && waited_s >= kProbeAfter && Clock::now() >= w.next_reach) check_reachable();
    return;
  }
  if (w.nodes.empty()) return;
  if (w.lost && Clock::now() >= w.abort_at) abort(kExitPeerFailure);
  if (w.lost || waited_s < kProbeAfter) return;
  if (Clock::now() >= w.next_reach) check_reachable();
  if (m_min_link_mbps <= 0 || (w.probed && since(w.last_probe) < kProbeEvery)) return;
  w.probed = true;
  probe_links();
  w.last_probe = Clock::now();
}

void MpiCommunicator::check_reachable() {
  LinkWatch& w = *m_links;
  bool any_failing = false;
  std::string lost;
  for (LinkWatch::Node& n : w.nodes) {
    if (n.port <= 0) continue;
    const auto attempt = Clock::now();
    const std::string error = try_connect(n.addrs, n.port);
    if (error.empty()) {
      n.failing = false;
      continue;
    }
    if (!n.failing) {
      n.failing = true;
      n.failing_since = attempt;
    }
    n.error = error;
    any_failing = true;
    if (since(n.failing_since) >= kUnreachableFor)
      lost += (lost.empty() ? "" : "; ") + std::string("rank ") + std::to_string(n.rank) + " on node " +
              m_hosts[static_cast<size_t>(n.rank)] + " (TCP to port " + std::to_string(n.port) + ": " + n.error +
              ", failing for " + std::to_string(static_cast<int>(since(n.failing_since))) + " s)";
  }
  w.next_reach = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                    std::chrono::duration<double>(any_failing ? kRecheck : kProbeEvery));
  if (lost.empty()) return;
  // Under mpirun, leave the ending to it: an abort (or, on a cut-off node, an exit)
  // makes a daemon send to the unreachable side, and a message that sits
  // unacknowledged in TCP turns keepalive off for that link (~15 minutes of
  // retransmissions instead). mpirun's and the daemons' keepalive on their idle links
  // (launch/mpirun.sh, ~30 s) end the job on both sides, naming the node; rank 0 aborts
  // itself only if that does not happen. srun has no such check: act at once.
  const bool mpirun = launcher_description().rfind("mpirun", 0) == 0;
  if (m_world.rank != 0) {
    w.lost = true;  // checks no more
    w.abort_at = Clock::time_point::max();
    // Under mpirun, not a word: this rank's output travels through its daemon to mpirun,
    // and would be the unacknowledged message that keeps the daemon from noticing.
    if (mpirun) return;
    // Cut off from rank 0: end this node's ranks, so that its scheduler daemon sees the
    // step end. Not MPI_Abort, which would try to reach the far side.
    std::fprintf(stderr, "elbo: rank %d (%s): the network no longer reaches %s: this node is cut off from the job; "
                 "exiting\n", m_world.rank, m_world.host.c_str(), lost.c_str());
    std::fflush(stderr);
    std::_Exit(kExitPeerFailure);
  }
  w.lost = true;
  w.abort_at = Clock::now() + std::chrono::seconds(mpirun ? kMpirunGrace : 0);
  std::fprintf(stderr,
               "elbo: rank 0 (%s): the network no longer reaches %s: the node, its link or its ranks are gone. %s\n",
               m_world.host.c_str(), lost.c_str(),
               mpirun ? "Leaving it to mpirun to end the job (its keepalive on the daemon's link), or aborting in "
                        "45 s"
                      : "Aborting the job so that it can be requeued");
  std::fflush(stderr);
  if (!mpirun) abort(kExitPeerFailure);
}

void MpiCommunicator::answer_link_probe() {
  int flag = 0;
  if (MPI_Iprobe(0, kProbeHeaderTag, m_ctl, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS || !flag) return;
  ProbeBuffers& b = buffers();
  int header[3] = {0, 0, 0};
  if (MPI_Recv(header, 3, MPI_INT, 0, kProbeHeaderTag, m_ctl, MPI_STATUS_IGNORE) != MPI_SUCCESS) return;
  const int round = header[0], bytes = std::min(header[1], kProbeBytes);
  const double leg = header[2] / 1000.0;
  const auto idle = [this] { answer_roll_calls(); };
  // Leg 1, rank 0 to this node: timed here, from the posted receive.
  MPI_Request recv = MPI_REQUEST_NULL;
  const auto t0 = Clock::now();
  MPI_Irecv(b.back.data(), bytes, MPI_BYTE, 0, tag_of(round, 0), m_ctl, &recv);
  const bool arrived = complete_within(&recv, leg, idle);
  b.result = arrived ? since(t0) : -1.0;  // -1: not there within the leg's deadline
  if (!arrived) drop(&recv, true);
  MPI_Request sends[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
  MPI_Isend(&b.result, 1, MPI_DOUBLE, 0, tag_of(round, 1), m_ctl, &sends[0]);
  // Leg 2, back to rank 0 (timed there), only when leg 1 passed: else rank 0 has its verdict.
  if (arrived) MPI_Isend(b.data.data(), bytes, MPI_BYTE, 0, tag_of(round, 2), m_ctl, &sends[1]);
  for (MPI_Request& s : sends)
    if (!complete_within(&s, leg + kAnswerWait, idle)) drop(&s, false);
}

void MpiCommunicator::probe_links() {
  std::vector<int> leaders;
  for (const LinkWatch::Node& n : m_links->nodes)
    if (!n.failing) leaders.push_back(n.rank);  // an unreachable node is check_reachable's
  if (leaders.empty()) return;
  const double bits = 8.0 * kProbeBytes;
  const double leg = kLegMargin + bits / (m_min_link_mbps * 1e6);
  ProbeBuffers& b = buffers();
  const auto idle = [this] { answer_roll_calls(); };
  struct Verdict {
    int rank;
    std::string direction;
    double seconds;
    bool finished;
  };
  std::vector<Verdict> slow;
  std::string measured;  // "n2 812/790" (Mbit/s to/from), for the note on a healthy round
  size_t judged = 0;
  for (int node_rank : leaders) {
    const int round = ++m_links->round;
    b.header[0] = round;
    b.header[1] = kProbeBytes;
    b.header[2] = static_cast<int>(leg * 1000.0);
    MPI_Request hdr = MPI_REQUEST_NULL, data = MPI_REQUEST_NULL, res = MPI_REQUEST_NULL;
    b.result = 0;
    MPI_Isend(b.header, 3, MPI_INT, node_rank, kProbeHeaderTag, m_ctl, &hdr);
    MPI_Isend(b.data.data(), kProbeBytes, MPI_BYTE, node_rank, tag_of(round, 0), m_ctl, &data);
    MPI_Irecv(&b.result, 1, MPI_DOUBLE, node_rank, tag_of(round, 1), m_ctl, &res);
    const bool answered = complete_within(&res, kAnswerWait + leg, idle);
    if (!answered) {  // busy or gone: no verdict this round
      drop(&res, true);
      drop(&data, false);
      drop(&hdr, false);
      continue;
    }
    ++judged;
    const double result = b.result;
    complete_within(&hdr, 0.0, idle);
    if (result < 0) {
      slow.push_back({node_rank, "to", leg, false});
      drop(&data, false);
      drop(&hdr, false);
      continue;
    }
    complete_within(&data, leg, idle);
    drop(&data, false);
    drop(&hdr, false);
    // Leg 2: the node sends right after its result; time it from the posted receive.
    const auto wait_t0 = Clock::now();
    int flag = 0;
    while (!flag && since(wait_t0) < kAnswerWait) {
      if (MPI_Iprobe(node_rank, tag_of(round, 2), m_ctl, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS) break;
      if (!flag) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    if (!flag) {
      --judged;
      continue;
    }
    MPI_Request recv = MPI_REQUEST_NULL;
    const auto t0 = Clock::now();
    MPI_Irecv(b.back.data(), kProbeBytes, MPI_BYTE, node_rank, tag_of(round, 2), m_ctl, &recv);
    const bool arrived = complete_within(&recv, leg, idle);
    if (!arrived) {
      drop(&recv, true);
      slow.push_back({node_rank, "from", leg, false});
    } else {
      const double up = since(t0);
      if (result > leg - kLegMargin || up > leg - kLegMargin) {
        // Finished, but slower than the floor itself (the margin only covers latency).
        const bool down = result > leg - kLegMargin;
        slow.push_back({node_rank, down ? "to" : "from", down ? result : up, true});
      }
      char rates[128];
      std::snprintf(rates, sizeof(rates), "%s%s %.0f/%.0f", measured.empty() ? "" : ", ",
                    m_hosts[static_cast<size_t>(node_rank)].c_str(), bits / std::max(result, 1e-9) / 1e6,
                    bits / std::max(up, 1e-9) / 1e6);
      measured += rates;
    }
  }
  if (slow.empty()) {
    // Say so: a user wondering why steps were slow learns that the network is not why.
    if (!measured.empty())
      std::fprintf(stderr, "elbo: rank 0 (%s): a collective waited over %.0f s; links measured from here, Mbit/s "
                           "to/from: %s\n", m_world.host.c_str(), kProbeAfter, measured.c_str());
    return;
  }

  const std::string me = m_hosts[0];
  std::string what;
  for (const Verdict& v : slow) {
    const std::string& host = m_hosts[static_cast<size_t>(v.rank)];
    char took[96];
    std::snprintf(took, sizeof(took), v.finished ? " %.1f s (%.2f Mbit/s)" : " over %.1f s (under %.2f Mbit/s)",
                  v.seconds, bits / v.seconds / 1e6);
    what += (what.empty() ? "" : "; ") + std::string("1 MiB ") + v.direction + " node " + host + " (rank " +
            std::to_string(v.rank) + ") took" + took;
  }
  std::string verdict;
  if (slow.size() == judged && judged > 1)
    verdict = "every other node is slow from node " + me + ": node " + me + "'s own link is the likely cause";
  else if (slow.size() == 1 && judged == 1 && leaders.size() == 1)
    verdict = "the link between node " + me + " and node " + m_hosts[static_cast<size_t>(slow[0].rank)] +
              " is failing";
  else
    verdict = "the named node's link is failing";
  std::fprintf(stderr,
               "elbo: rank 0 (%s): the network between the nodes is too slow to train: %s, under "
               "dist.min_link_mbps (%g); %s. Aborting the job so that it can be requeued (set dist.min_link_mbps: 0 "
               "to never measure)\n",
               me.c_str(), what.c_str(), m_min_link_mbps, verdict.c_str());
  std::fflush(stderr);
  abort(kExitPeerFailure);
}

}  // namespace elbo
