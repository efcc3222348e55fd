#!/usr/bin/env python3
"""The project's SLURM batch scripts on a real SLURM cluster: munged, slurmctld and
slurmd started as plain processes under a temporary directory (no systemd; Debian's
Open MPI talks to SLURM through PMIx) and stopped afterwards by their PIDs
(local_slurm.py). --nodes 1: one node, this host, 2 tasks on it. --nodes 2: one
slurmd per network-namespace node (netns_nodes.py), one task on each, and the
scripts below with the multi-node script in place of the one-node one; the
uninterrupted 2-node run must also equal `mpirun -np 2` on one host bit for bit.

  ref  launch/slurm-multinode.sbatch (srun --mpi=pmix, 2 tasks), uninterrupted.
  1.   launch/slurm.sbatch, SIGUSR1 to the job's tasks mid-run (what --signal=USR1@T
       does): the ranks checkpoint and exit 75, the script requeues the job, the
       second start resumes with --resume auto;
  2.   launch/slurm-multinode.sbatch with mpirun inside the allocation, SIGUSR1 to
       the batch shell mid-run (what --signal=B:USR1@T does): the shell forwards it
       through mpirun, then the same checkpoint/requeue/resume;
  3.   launch/slurm.sbatch, `scontrol requeue` mid-run (SIGTERM to every process of
       the job): checkpoint, requeue, resume;
  4.   (2 nodes) n2's link goes down mid-run: elbo's reachability check ends the
       job within 60 s (status 3, naming n2), the script requeues it as a node
       failure, the link comes back, and the job resumes from its last periodic
       checkpoint.
Each must end with parameters bit-identical to the uninterrupted run.

Skips (exit 77) with the reason when SLURM or munge is not installed
(launch/install_deps.sh --with-tests installs them) or when not run as root
(slurmd starts jobs as their user)."""
import os, re, shutil, subprocess, sys, tempfile, time
import h5py, numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402
from local_slurm import LocalSlurm, MISSING_HINT, missing_tools  # noqa: E402
from netns_nodes import Nodes, NodesUnavailable  # noqa: E402

SKIP = 77
LAUNCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "launch")


def skip(reason):
    print(f"SKIP: {reason}")
    sys.exit(SKIP)


def main():
    a = harness.parse_args(__doc__, lambda ap: ap.add_argument(
        "--nodes", type=int, default=1, help="1: this host; 2: one slurmd per network-namespace node"))
    missing = missing_tools()
    if missing:
        skip(f"SLURM/munge not installed (missing {', '.join(missing)}; {MISSING_HINT})")
    if os.geteuid() != 0:
        skip("the local SLURM cluster needs root (slurmd starts each job as its user)")
    if (os.cpu_count() or 1) < 2:
        skip("the local SLURM cluster needs 2 CPUs for 2 tasks")
    os.environ["PATH"] += ":/usr/sbin"
    check = harness.Checks()

    # Short path: the munge socket's path must fit a sockaddr_un.
    root = tempfile.mkdtemp(prefix="elbo-slurm-")
    try:
        if a.nodes == 1:
            run_cluster(a, root, None, check)
        else:
            with Nodes(a.nodes, os.path.join(a.work, "nodes"), slots=1) as nodes:
                run_cluster(a, root, nodes, check)
    except NodesUnavailable as e:
        skip(f"cannot make network namespaces as nodes: {e}")
    finally:
        if not check.failures:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"     cluster logs kept in {root}")
    check.finish()


def run_cluster(a, root, nodes, check):
    cluster = LocalSlurm(root, nodes=nodes)
    try:
        cluster.start()
        print(f"ok   local SLURM cluster up under {root}: node(s) {', '.join(cluster.names)}")
        run_jobs(a, cluster, check)
    finally:
        cluster.stop()
        still = [name for name, p in cluster.procs if p.poll() is None]
        check(not still, "SLURM daemons stopped by PID", str(still))


def run_jobs(a, cluster, check):
    # 1200 steps of the smoke MLP: a few seconds, long enough to be interrupted.
    def sets(out):
        s = {"device": "cpu", "data.train": f"{a.data}/train", "data.test": "", "data.max_samples": "960",
             "data.binarize": "true", "train.batch_size": "48", "train.epochs": "60", "optim.schedule": "cosine",
             "optim.warmup_steps": "10", "loss.kl_warmup_steps": "30", "train.log_every": "5",
             "checkpoint.every": "100", "output.dir": out}
        return [x for k, v in s.items() for x in ("--set", f"{k}={v}")]

    env = {"ELBO": a.elbo}
    nodes = len(cluster.names)
    # Two ranks either way: both on this host, or one on each namespace node.
    layout = ["--ntasks=2", "--nodes=1", "--ntasks-per-node=2"] if nodes == 1 else ["--nodes=2", "--ntasks-per-node=1"]

    def submit(name, script, extra_env=None):
        out = os.path.join(a.work, name)
        jobid = cluster.sbatch(os.path.join(LAUNCH, script), [a.spec, *sets(out)], cwd=a.work,
                               env=dict(env, **(extra_env or {})), layout=layout)
        return jobid, out

    def params(out):
        with h5py.File(os.path.join(out, "model.h5"), "r") as f:
            return int(f.attrs["step"]), {k: f["params"][k][...] for k in f["params"]}

    def log(jobid):
        p = os.path.join(a.work, f"elbo-{jobid}.out")
        return open(p, errors="replace").read() if os.path.exists(p) else ""

    def finished(jobid, what, timeout=300):
        j = cluster.wait_state(jobid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"},
                               timeout)
        check(j["JobState"] == "COMPLETED" and j["ExitCode"] == "0:0",
              f"{what}: job {jobid} completed with exit 0:0 (state {j['JobState']}, exit {j['ExitCode']})", log(jobid))
        return j

    def mid_run(jobid, out, min_step=100):
        """Wait until the job is RUNNING and training is past min_step."""
        metrics = os.path.join(out, "metrics.csv")
        deadline = time.time() + 120
        while time.time() < deadline:
            if os.path.exists(metrics):
                rows = open(metrics).read().splitlines()[1:]
                if rows and rows[-1].count(",") > 0 and int(rows[-1].split(",")[0]) >= min_step:
                    return
            if cluster.job(jobid).get("JobState") not in ("PENDING", "RUNNING"):
                break
            time.sleep(0.05)
        raise SystemExit(f"job {jobid}: training did not get past step {min_step}: {cluster.job(jobid)}\n{log(jobid)}")

    ref_id, ref_dir = submit("ref", "slurm-multinode.sbatch")
    finished(ref_id, "uninterrupted (multi-node script, srun)")
    ref_step, ref = params(ref_dir)
    check(ref_step == 1200, f"uninterrupted run reached step 1200 (got {ref_step})")
    check("2 ranks via srun" in log(ref_id), "the multi-node script started 2 ranks with srun", log(ref_id))
    check(f"2 rank(s) on {nodes} node(s) via srun (SLURM job {ref_id}, restart 0)" in log(ref_id) or
          f"2 rank(s) on {nodes} node(s) via srun (SLURM job {ref_id})" in log(ref_id),
          f"elbo discovers its world from SLURM: 2 ranks, {nodes} node(s), srun, the job id", log(ref_id)[:1500])
    if nodes > 1:
        # The same two ranks on one host, started by mpirun: the same parameters, bit for bit.
        host_out = os.path.join(a.work, "host_np2")
        r = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", "-x", "OPENBLAS_NUM_THREADS=1", a.elbo, "train",
                            a.spec, *sets(host_out), "--set", "train.threads=1"], capture_output=True, text=True)
        check(r.returncode == 0 and all(np.array_equal(params(host_out)[1][k], ref[k]) for k in ref),
              "2 nodes under SLURM (srun) train to parameters bitwise equal to mpirun -np 2 on one host",
              r.stdout[-1500:] + r.stderr[-1500:])

    def preempted(name, script, how, extra_env=None):
        jobid, out = submit(name, script, extra_env)
        mid_run(jobid, out)
        if how == "link_down":
            # n2's link goes down: elbo's reachability check ends the job (status 3), the
            # script requeues it as a node failure; the link comes back, the job resumes.
            t0 = time.time()
            cluster.nodes.link("n2", False)
            while time.time() < t0 + 120 and "requeueing job" not in log(jobid):
                time.sleep(0.2)
            took = time.time() - t0
            cluster.nodes.link("n2", True)
            time.sleep(1)
            text = log(jobid)
            check(took < 60 and "launcher status 3" in text and "node failure 1 of" in text and "on node n2" in text,
                  f"{name}: n2's link down ends the job in {took:.0f} s with status 3 naming node n2; the script "
                  "requeues it as a node failure", text[-3000:])
            # SLURM completes the first start once n2's slurmd answers again.
            cluster.release(jobid, timeout=150)
            finished(jobid, f"{name}: requeued and resumed")
            text = log(jobid)
            m = re.search(r"continuing from \S+ at step (\d+)", text)
            step, p = params(out)
            check("(restart 1)" in text and m is not None and step == 1200 and
                  all(np.array_equal(p[key], ref[key]) for key in ref),
                  f"{name}: the requeued start resumed from its last checkpoint "
                  f"(step {m.group(1) if m else '?'}) and ended bit-identical to the uninterrupted run", text[-3000:])
            return text
        if how == "steps":
            cluster.run(["scancel", "-s", "USR1", str(jobid)], check=True)
        elif how == "batch":
            cluster.run(["scancel", "-b", "-s", "USR1", str(jobid)], check=True)
        else:
            cluster.scontrol("requeue", str(jobid))
        cluster.release(jobid)
        finished(jobid, f"{name}: requeued and resumed")
        text = log(jobid)
        m = re.search(r"stop requested .* at step (\d+): wrote (\S+)", text)
        check(m is not None, f"{name}: the first start checkpointed on the signal", text)
        k = int(m.group(1)) if m else -1
        check(0 < k < 1200, f"{name}: stopped mid-run, at step {k}")
        check("(restart 1)" in text and f"at step {k}" in text and "continuing from" in text,
              f"{name}: the requeued start (restart 1) resumed from step {k}", text)
        check("second stop signal" not in text and "exiting now without a checkpoint" not in text,
              f"{name}: no forced exit", text)
        step, p = params(out)
        check(step == 1200 and all(np.array_equal(p[key], ref[key]) for key in ref),
              f"{name}: preempted at step {k}, requeued, resumed: parameters bit-identical to the uninterrupted run")
        return text

    # The one-node script on one node; on two, the multi-node script with srun.
    script = "slurm.sbatch" if nodes == 1 else "slurm-multinode.sbatch"
    t = preempted("usr1_tasks", script, "steps")
    check("requeueing job" in t, f"usr1_tasks: {script} requeued its own job after exit 75", t)
    t = preempted("usr1_batch_mpirun", "slurm-multinode.sbatch", "batch", {"ELBO_LAUNCHER": "mpirun"})
    check("2 ranks via mpirun" in t and "SIGUSR1 from SLURM" in t and "requeueing job" in t,
          "usr1_batch_mpirun: the shell forwarded SIGUSR1 through mpirun and requeued the job", t)
    check("via mpirun inside SLURM job" in t and re.search(r"via mpirun inside SLURM job \d+, restart 1", t) is not None,
          "usr1_batch_mpirun: elbo sees mpirun inside the SLURM job, and the restart count after the requeue", t[:3000])
    check(f"2 rank(s) on {nodes} node(s) via mpirun" in t, f"usr1_batch_mpirun: mpirun placed the ranks on {nodes} "
          "node(s)", t[:3000])
    preempted("scontrol_requeue", script, "requeue")
    if nodes > 1:
        preempted("link_down_srun", script, "link_down")


if __name__ == "__main__":
    main()
