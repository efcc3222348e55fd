#!/usr/bin/env python3
"""Multi-node over TCP on one machine (network namespaces as nodes, see
netns_nodes.py), started with the project's launch/mpirun.sh as a user would
(HOSTFILE, RSH_AGENT, IFACE=eth0):
  1. 2 nodes x 2 ranks train to parameters bitwise equal to `mpirun -np 4` on one
     host, and the log says 4 ranks on 2 nodes;
  2. `elbo info` across the nodes: 2 nodes, 2 local ranks on rank 0's node n1;
  3. 3 nodes x 1 rank equal `mpirun -np 3` on one host, bit for bit;
  4. a checkpoint written by 2 nodes x 2 ranks resumes on 1 node x 4 ranks and on 4
     nodes x 1 rank: the same sample sequence, parameters within float tolerance of
     the uninterrupted run;
  5. node loss never hangs (launch/mpirun.sh's keepalive settings): n2's link going
     down, or its orted killed, ends the whole job within 60 s naming node n2;
  6. a 5-second link flap is survived;
  7. a link throttled to 1 Mbit/s ends the job within 60 s (elbo's link probe,
     dist.min_link_mbps), naming node n2, with status 3; one throttled to 100 Mbit/s
     trains on, also when n2's rank is stopped for 4 s (rank 0's long wait starts a
     probe, which measures the link at about 100 Mbit/s and lets the job go on).
Skips (77) with the reason where network namespaces cannot be made (not root)."""
import os, re, signal, sys, time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402
from netns_nodes import Nodes, NodesUnavailable  # noqa: E402
from node_jobs import Jobs, finish, params, pids_named, rows, same, wait_rows, worst_rel  # noqa: E402

a = harness.parse_args(__doc__)
check = harness.Checks()
jobs = Jobs(a)

try:
    with Nodes(4, os.path.join(a.work, "nodes"), slots=2) as nodes:
        # 1. 2 nodes x 2 ranks against 4 ranks on one host.
        jobs.on_host(4, os.path.join(a.work, "host4"))
        with open(nodes.hostfile, "w") as f:
            f.write("n1 slots=2\nn2 slots=2\n")
        rc, text = jobs.on_nodes(nodes, 4, os.path.join(a.work, "nodes2x2"))
        check(rc == 0, f"2 nodes x 2 ranks: mpirun.sh exits 0 ({rc})", text[-3000:])
        check("4 rank(s) on 2 node(s) via mpirun" in text, "the log says 4 ranks on 2 nodes", text[:2000])
        if rc == 0:
            check(same(params(os.path.join(a.work, "nodes2x2")), params(os.path.join(a.work, "host4"))),
                  "2 nodes x 2 ranks over TCP: parameters bitwise equal to 4 ranks on one host")

        # 2. elbo info across the nodes.
        r = nodes.run(["mpirun", "--hostfile", nodes.hostfile, "--mca", "plm_rsh_agent", nodes.agent,
                       "--mca", "btl_tcp_if_include", "eth0", "--mca", "oob_tcp_if_include", "eth0",
                       "-np", "4", a.elbo, "info"], capture_output=True, text=True, timeout=120)
        check(r.returncode == 0 and "4 rank(s) on 2 node(s)" in r.stdout and "rank 0 on n1 with 2 local rank(s)"
              in r.stdout, "elbo info: 4 ranks on 2 nodes, rank 0 on n1 with 2 local ranks", r.stdout + r.stderr)
        check("  n1: rank 0 (local 0, CPU), rank 1 (local 1, CPU)\n" in r.stdout and
              "  n2: rank 2 (local 0, CPU), rank 3 (local 1, CPU)\n" in r.stdout,
              "elbo info: each node numbers its own ranks 0, 1 (the local rank a GPU is chosen by)", r.stdout)

        # 3. 3 nodes x 1 rank against 3 ranks on one host.
        jobs.on_host(3, os.path.join(a.work, "host3"))
        with open(nodes.hostfile, "w") as f:
            f.write("n1 slots=1\nn2 slots=1\nn3 slots=1\n")
        rc, text = jobs.on_nodes(nodes, 3, os.path.join(a.work, "nodes3x1"))
        check(rc == 0 and "3 rank(s) on 3 node(s)" in text, f"3 nodes x 1 rank: runs on 3 nodes ({rc})",
              text[-3000:])
        if rc == 0:
            check(same(params(os.path.join(a.work, "nodes3x1")), params(os.path.join(a.work, "host3"))),
                  "3 nodes x 1 rank: parameters bitwise equal to 3 ranks on one host")

        # 4. Checkpoint on 2 x 2, resume on 1 x 4 and on 4 x 1.
        full = os.path.join(a.work, "full")
        jobs.on_host(4, full, "--set", "train.epochs=2")
        with open(nodes.hostfile, "w") as f:
            f.write("n1 slots=2\nn2 slots=2\n")
        for name, np_, hosts in (("on_1x4", 4, None), ("on_4x1", 4, "n1 slots=1\nn2 slots=1\nn3 slots=1\nn4 slots=1\n")):
            out = os.path.join(a.work, "resume_" + name)
            with open(nodes.hostfile, "w") as f:
                f.write("n1 slots=2\nn2 slots=2\n")
            rc, text = jobs.on_nodes(nodes, 4, out)  # epoch 1 of 2 on 2 nodes x 2 ranks
            check(rc == 0, f"{name}: the first half ran on 2 nodes x 2 ranks ({rc})", text[-2000:])
            if hosts is None:
                text = jobs.on_host(4, out, "--set", "train.epochs=2", "--resume", "auto")
                rc = 0
            else:
                with open(nodes.hostfile, "w") as f:
                    f.write(hosts)
                rc, text = jobs.on_nodes(nodes, 4, out, "--set", "train.epochs=2", "--resume", "auto")
            m = re.search(r"continuing from \S+ at step (\d+)", text)
            check(rc == 0 and m is not None and int(m.group(1)) == 50,
                  f"{name}: resumed from the step-50 checkpoint written on 2 nodes", text[-2000:])
            if rc == 0:
                err = worst_rel(params(out), params(full))
                check(err < 1e-5, f"{name}: parameters within float tolerance of the uninterrupted run ({err:.2e})")
        # 5. Node loss never hangs: the link of n2 going down, and n2's orted killed,
        #    each end the whole job well within 60 s, naming the lost node.
        with open(nodes.hostfile, "w") as f:
            f.write("n1 slots=1\nn2 slots=1\n")
        for how in ("link_down", "orted_killed"):
            out = os.path.join(a.work, "loss_" + how)
            p = jobs.start_long_job(nodes, out)
            wait_rows(p, out, 3, 60)
            t0 = time.time()
            if how == "link_down":
                nodes.link("n2", False)
            else:
                for pid in pids_named(nodes, "n2", "orted"):
                    os.kill(pid, signal.SIGKILL)
            text = finish(p, nodes)
            took = time.time() - t0
            check(p.returncode not in (0, 75) and took < 60 and "on node n2" in text,
                  f"{how}: the job ends in {took:.0f} s (exit {p.returncode}), naming node n2", text[-2000:])
            if how == "link_down":
                nodes.link("n2", True)
        # 6. A 5-second link flap is survived: training goes on after it, and the job
        #    still stops cleanly on request.
        out = os.path.join(a.work, "flap")
        p = jobs.start_long_job(nodes, out)
        wait_rows(p, out, 3, 60)
        nodes.link("n2", False)
        time.sleep(5)
        nodes.link("n2", True)
        before = rows(out)
        wait_rows(p, out, before + 5, 45, poll=0.1)
        alive = p.poll() is None and rows(out) >= before + 5
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGUSR1)  # mpirun forwards it: checkpoint and stop
        text = finish(p, nodes)
        check(alive and "stop requested" in text, f"a 5 s link flap: training went on after it (exit {p.returncode})",
              text[-2000:])
        # 7. A degraded link: 1 Mbit/s fails no TCP check, so only elbo's own link probe
        #    can end the job; 100 Mbit/s is slow but healthy, and the job trains on.
        for rate in ("1mbit", "100mbit"):
            out = os.path.join(a.work, "throttle_" + rate)
            p = jobs.start_long_job(nodes, out)
            wait_rows(p, out, 3, 60)
            nodes.throttle("n2", rate)
            t0 = time.time()
            if rate == "1mbit":
                text = finish(p, nodes)
                took = time.time() - t0
                check(p.returncode == 3 and took < 60 and "node n2" in text and "dist.min_link_mbps" in text,
                      f"a link throttled to 1 Mbit/s: the job ends in {took:.0f} s (exit {p.returncode}), naming "
                      "node n2", text[-2000:])
            else:
                # A long wait on rank 0 (n2's rank stopped for 4 s) makes it probe the links.
                elbo_pids = pids_named(nodes, "n2", "elbo")
                for pid in elbo_pids:
                    os.kill(pid, signal.SIGSTOP)
                time.sleep(4)
                for pid in elbo_pids:
                    os.kill(pid, signal.SIGCONT)
                before = rows(out)
                wait_rows(p, out, before + 5, t0 + 30 - time.time(), poll=0.1)
                alive = p.poll() is None and rows(out) >= before + 5
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGUSR1)
                text = finish(p, nodes)
                check(alive and "stop requested" in text and "dist.min_link_mbps" not in text,
                      f"a link throttled to 100 Mbit/s, n2's rank stopped for 4 s: training goes on "
                      f"(exit {p.returncode})", text[-2000:])
                m = re.search(r"links measured from here, Mbit/s to/from: n2 (\d+)/(\d+)", text)
                check(len(elbo_pids) == 1 and m is not None and all(20 <= float(v) <= 110 for v in m.groups()),
                      "... and rank 0's probe measured the link near 100 Mbit/s both ways "
                      f"({m.groups() if m else 'no probe line'})", text[-2000:])
            nodes.throttle("n2", None)
except NodesUnavailable as e:
    print(f"skipped: cannot make network namespaces as nodes: {e}")
    sys.exit(77)

check.finish()
