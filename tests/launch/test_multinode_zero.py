#!/usr/bin/env python3
"""dist.shard_optimizer across nodes over TCP (network namespaces as nodes, see
netns_nodes.py; started with launch/mpirun.sh as test_multinode.py does):
  1. 2 nodes x 2 ranks, optimizer sharded, train to parameters within 1e-5 relative
     per tensor of the replicated `mpirun -np 4` on one host, with the default and with
     4 KB buckets (the reduce-scatter and all-gather cross the link in many pieces);
     the log says 4 ranks on 2 nodes and names the sharded sync;
  2. the checkpoint written by the sharded 2 x 2 run holds the whole moments: resumed
     replicated on one host with 4 ranks, it ends within 1e-5 of the uninterrupted run.
Skips (77) with the reason where network namespaces cannot be made (not root)."""
import os, re, sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402
from netns_nodes import Nodes, NodesUnavailable  # noqa: E402
from node_jobs import Jobs, params, worst_rel  # noqa: E402

a = harness.parse_args(__doc__)
check = harness.Checks()
jobs = Jobs(a, "--set", "optim.grad_clip=30")
SHARD = ("--set", "dist.shard_optimizer=true")

try:
    with Nodes(2, os.path.join(a.work, "nodes"), slots=2) as nodes:
        with open(nodes.hostfile, "w") as f:
            f.write("n1 slots=2\nn2 slots=2\n")
        host4 = os.path.join(a.work, "host4")
        jobs.on_host(4, host4)
        # 1. Sharded on 2 nodes x 2 ranks against replicated on one host.
        for label, extra in (("default buckets", ()), ("4 KB buckets", ("--set", "dist.bucket_mb=0.004"))):
            out = os.path.join(a.work, "nodes2x2_" + label.split()[0])
            rc, text = jobs.on_nodes(nodes, 4, out, *SHARD, *extra)
            check(rc == 0 and "4 rank(s) on 2 node(s)" in text and
                  "mpi reduce-scatter + all-gather (optimizer sharded over 4 ranks)" in text,
                  f"2 nodes x 2 ranks, sharded ({label}): runs on 2 nodes with the sharded sync ({rc})", text[-3000:])
            if rc == 0:
                err = worst_rel(params(out), params(host4))
                check(err < 1e-5, f"2 nodes x 2 ranks, sharded ({label}) vs 4 replicated ranks on one host: "
                                  f"worst per-tensor relative error {err:.2e}")
        # 2. A sharded checkpoint from 2 x 2 continues replicated on one host.
        full = os.path.join(a.work, "full")
        jobs.on_host(4, full, "--set", "train.epochs=2")
        out = os.path.join(a.work, "resume")
        rc, text = jobs.on_nodes(nodes, 4, out, *SHARD)
        check(rc == 0, f"resume: the first epoch ran sharded on 2 nodes x 2 ranks ({rc})", text[-2000:])
        text = jobs.on_host(4, out, "--set", "train.epochs=2", "--resume", "auto")
        m = re.search(r"continuing from \S+ at step (\d+)", text)
        err = worst_rel(params(out), params(full))
        check(m is not None and int(m.group(1)) == 50 and "dist.shard_optimizer: true -> false" in text and err < 1e-5,
              f"resume: the sharded 2 x 2 checkpoint continues replicated on one host, within {err:.2e} of the "
              "uninterrupted run", text[-2000:])
except NodesUnavailable as e:
    print(f"skipped: cannot make network namespaces as nodes: {e}")
    sys.exit(77)

check.finish()
