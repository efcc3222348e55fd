"""Training jobs for the multi-node tests (test_multinode.py, test_multinode_zero.py):
the same small smoke run on one host under plain mpirun, or across namespace nodes
(netns_nodes.py) through launch/mpirun.sh as a user starts it, and what the tests read
back from them."""
import os, signal, subprocess, sys, time
import h5py, numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MPIRUN_SH = os.path.join(ROOT, "launch", "mpirun.sh")


class Jobs:
    """Runs of `a.spec` (harness arguments `a`) with the tests' settings plus `base`
    (--set pairs every run of the calling test shares)."""

    def __init__(self, a, *base):
        self.a, self.base = a, base

    def sets(self, out, *extra):
        return ["--set", "device=cpu", "--set", f"data.train={self.a.data}/train", "--set", "data.test=",
                "--set", "data.max_samples=2400", "--set", "train.batch_size=48", "--set", "train.epochs=1",
                "--set", "train.threads=1", "--set", "train.log_every=10", *self.base,
                "--set", f"output.dir={out}", *extra]

    def on_host(self, np_, out, *extra):
        """`np_` ranks on this host; a failure ends the test with the run's output."""
        r = subprocess.run(["mpirun", "-np", str(np_), "--oversubscribe", self.a.elbo, "train", self.a.spec,
                            *self.sets(out, *extra)], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            sys.exit(f"host run {out} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        return r.stdout

    def _env(self, nodes, np_):
        return dict(os.environ, NP=str(np_), HOSTFILE=nodes.hostfile, RSH_AGENT=nodes.agent, IFACE="eth0",
                    ELBO=self.a.elbo)

    def on_nodes(self, nodes, np_, out, *extra):
        """`np_` ranks over the hostfile's nodes, started inside node n1: (exit code, output)."""
        r = nodes.run(["bash", MPIRUN_SH, self.a.spec, *self.sets(out, *extra)], capture_output=True, text=True,
                      timeout=600, env=self._env(nodes, np_))
        return r.returncode, r.stdout + r.stderr

    def start_long_job(self, nodes, out):
        """A 2-rank job on n1 and n2 (the hostfile's) that trains until stopped."""
        return subprocess.Popen(nodes.command(["bash", MPIRUN_SH, self.a.spec,
                                               *self.sets(out, "--set", "train.epochs=100000")]),
                                env=self._env(nodes, 2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)


def params(out):
    with h5py.File(os.path.join(out, "model.h5"), "r") as f:
        return {k: f["params"][k][...] for k in f["params"]}


def same(p, q):
    return all(np.array_equal(p[k], q[k]) for k in q)


def worst_rel(p, q):
    """The largest per-tensor relative difference (in double)."""
    assert set(p) == set(q)

    def rel(k):
        return np.linalg.norm(p[k].astype(np.float64) - q[k]) / max(np.linalg.norm(q[k].astype(np.float64)), 1e-30)
    return max(float(rel(k)) for k in q)


def rows(out):
    metrics = os.path.join(out, "metrics.csv")
    return len(open(metrics).read().splitlines()) if os.path.exists(metrics) else 0


def wait_rows(p, out, count, seconds, poll=0.05):
    """Until metrics.csv has `count` lines, the job ends or `seconds` pass."""
    deadline = time.time() + seconds
    while time.time() < deadline and p.poll() is None and rows(out) < count:
        time.sleep(poll)


def finish(p, nodes, timeout=90):
    """The job's output once it ends; past `timeout` it is killed, with whatever still
    runs on the nodes (a cut-off daemon would hold the pipe)."""
    try:
        return p.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        nodes.kill_all()
        return p.communicate()[0]


def pids_named(nodes, node, name):
    """The processes called `name` on `node`."""
    found = []
    for pid in subprocess.run(["ip", "netns", "pids", f"{nodes.prefix}-{node}"], capture_output=True,
                              text=True).stdout.split():
        try:
            if open(f"/proc/{pid}/comm").read().strip() == name:
                found.append(int(pid))
        except OSError:
            pass
    return found
