// Link probes: a network link between nodes that degrades (a port renegotiated to 10
// Mbit/s, a failing cable, a switch dropping most packets) fails no TCP or keepalive
// check, so the job would crawl on at a thousandth of its speed for the rest of its
// allocation. When rank 0 has waited a while in a collective, it times a 1 MiB
// transfer each way with the first rank of every other node; a node whose link moves
// it slower than dist.min_link_mbps ends the job with kExitPeerFailure, naming the node,
// so the batch script can requeue the job (on other nodes).
//
// Each leg is timed by its receiver from the moment it posts the receive: the probe is
// larger than any transport's eager limit, so the data only moves once the receive is
// posted, and a receiver that was busy computing does not make a fast link look slow.
// A node that does not take part within kAnswerWait (busy in a long computation) is
// not judged this round; stalled or vanished ranks are dist.timeout_s's business.
#include <algorithm>
#include <chrono>
#include <cstdio>
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

void MpiCommunicator::service(double waited_s) {
  answer_roll_calls();
  if (m_world.rank != 0) {
    answer_link_probe();
    return;
  }
  if (m_min_link_mbps <= 0 || m_world.nodes < 2 || waited_s < kProbeAfter) return;
  if (m_probed && since(m_last_probe) < kProbeEvery) return;
  m_probed = true;
  probe_links();
  m_last_probe = Clock::now();
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
  // The first rank of every node but rank 0's.
  std::vector<int> leaders;
  for (int r = 1; r < m_world.size; ++r) {
    bool first = m_hosts[static_cast<size_t>(r)] != m_world.host;
    for (int q = 0; q < r && first; ++q) first = m_hosts[static_cast<size_t>(q)] != m_hosts[static_cast<size_t>(r)];
    if (first) leaders.push_back(r);
  }
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
    const int round = ++m_probe_round;
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
