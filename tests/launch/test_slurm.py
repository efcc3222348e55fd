#!/usr/bin/env python3
"""The project's SLURM batch scripts on a real SLURM cluster: munged, slurmctld and
slurmd started on localhost as plain processes under a temporary directory (no
systemd; one node; Debian's Open MPI talks to SLURM through PMIx) and stopped
afterwards by their PIDs.

  ref  launch/slurm-multinode.sbatch (srun --mpi=pmix, 2 tasks), uninterrupted.
  1.   launch/slurm.sbatch, SIGUSR1 to the job's tasks mid-run (what --signal=USR1@T
       does): the ranks checkpoint and exit 75, the script requeues the job, the
       second start resumes with --resume auto;
  2.   launch/slurm-multinode.sbatch with mpirun inside the allocation, SIGUSR1 to
       the batch shell mid-run (what --signal=B:USR1@T does): the shell forwards it
       through mpirun, then the same checkpoint/requeue/resume;
  3.   launch/slurm.sbatch, `scontrol requeue` mid-run (SIGTERM to every process of
       the job): checkpoint, requeue, resume.
Each must end with parameters bit-identical to the uninterrupted run.

Skips (exit 77) with the reason when SLURM or munge is not installed
(launch/install_deps.sh --with-tests installs them) or when not run as root
(slurmd starts jobs as their user)."""
import os, re, shutil, signal, socket, subprocess, sys, tempfile, time
import h5py, numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402

SKIP = 77
LAUNCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "launch")


def tool(name):
    """SLURM's daemons live in /usr/sbin, which a non-login PATH may lack."""
    return shutil.which(name) or (f"/usr/sbin/{name}" if os.access(f"/usr/sbin/{name}", os.X_OK) else None)


def skip(reason):
    print(f"SKIP: {reason}")
    sys.exit(SKIP)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """munged + slurmctld + slurmd for one node, everything under `root`."""

    def __init__(self, root):
        self.root = root
        self.procs = []  # (name, Popen), in start order
        self.conf = os.path.join(root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.host = socket.gethostname().split(".")[0]

    def _spawn(self, name, argv):
        log = open(os.path.join(self.root, f"{name}.stdout"), "w")
        # A session of its own: the daemon outlives nothing of ours, and we stop
        # exactly this PID afterwards.
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append((name, p))
        return p

    def _wait_for(self, what, cond, timeout, logs):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if cond():
                return
            for name, p in self.procs:
                if p.poll() is not None:
                    break
            else:
                time.sleep(0.1)
                continue
            break
        tails = "\n".join(f"--- {l}:\n{self.tail(l)}" for l in logs)
        raise SystemExit(f"local SLURM: {what} did not happen within {timeout} s\n{tails}")

    def tail(self, name, n=30):
        path = os.path.join(self.root, name)
        if not os.path.exists(path):
            return "(missing)"
        return "".join(open(path, errors="replace").readlines()[-n:])

    def start(self):
        r = self.root
        os.chmod(r, 0o755)  # munged refuses a socket directory others could write to, and checks its parents
        sock_dir = os.path.join(r, "munge")
        os.makedirs(sock_dir, mode=0o755)
        key = os.path.join(r, "munge.key")
        subprocess.run([tool("mungekey"), "-c", "-k", key], check=True, capture_output=True)
        os.chmod(key, 0o600)
        self.socket = os.path.join(sock_dir, "munge.socket.2")
        self._spawn("munged", [tool("munged"), "-F", f"--socket={self.socket}", f"--key-file={key}",
                               f"--pid-file={r}/munged.pid", f"--seed-file={r}/munged.seed",
                               f"--log-file={r}/munged.log"])
        self._wait_for("munged socket", lambda: os.path.exists(self.socket), 20, ["munged.log", "munged.stdout"])
        for d in ("state", "spool"):
            os.makedirs(os.path.join(r, d))
        cpus = os.cpu_count()
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=elbotest
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmix
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
ReturnToService=2
KillWait=30
MinJobAge=600
JobCompType=jobcomp/filetxt
JobCompLoc={r}/jobcomp.txt
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=elbo Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        self._spawn("slurmctld", [tool("slurmctld"), "-D", "-f", self.conf])
        self._spawn("slurmd", [tool("slurmd"), "-D", "-f", self.conf, "-N", self.host])

        def idle():
            q = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            return q.returncode == 0 and q.stdout.strip() == "idle"
        self._wait_for("node idle in sinfo", idle, 60,
                       ["slurmctld.log", "slurmd.log", "slurmctld.stdout", "slurmd.stdout"])

    def stop(self):
        if os.path.exists(self.conf):
            subprocess.run(["scancel", "--full", "--partition=elbo"], env=self.env, capture_output=True)
            deadline = time.time() + 40
            while time.time() < deadline:
                q = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.2)
        for name, p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def scontrol(self, *args, check=True):
        return subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True, check=check)

    def job(self, jobid):
        """The job's fields from `scontrol show job -o`."""
        out = self.scontrol("show", "job", "-o", str(jobid)).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def sbatch(self, script, args, cwd, env):
        r = subprocess.run(["sbatch", "--parsable", "--ntasks=2", "--nodes=1", "--ntasks-per-node=2",
                            "--cpus-per-task=1", script, *args],
                           env=dict(self.env, **env), cwd=cwd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"sbatch {script} failed: {r.stderr}")
        return int(r.stdout.strip().split(";")[0])

    def wait_state(self, jobid, states, timeout, restarts=None):
        deadline = time.time() + timeout
        while time.time() < deadline:
            j = self.job(jobid)
            if j.get("JobState") in states and (restarts is None or int(j.get("Restarts", 0)) == restarts):
                return j
            time.sleep(0.1)
        raise SystemExit(f"job {jobid}: not in {states} (restarts {restarts}) within {timeout} s: {self.job(jobid)}\n"
                         f"--- slurmctld.log:\n{self.tail('slurmctld.log')}\n--- slurmd.log:\n{self.tail('slurmd.log')}")

    def release(self, jobid):
        """A requeued job waits ~120 s (BeginTime); start it now. The update only sticks
        once the job is PENDING, so wait for that and repeat until it runs."""
        self.wait_state(jobid, {"PENDING"}, 60, restarts=1)
        # The hold exists for a reason: the previous start's step daemons may still be
        # finalizing (PMIx keeps its socket for a second or two after the tasks end) and
        # a new step with the same id cannot bind it. Their sockets in the spool
        # directory disappear when they are gone.
        spool = os.path.join(self.root, "spool")
        deadline = time.time() + 60
        while time.time() < deadline and [f for f in os.listdir(spool) if f".{jobid}." in f or f"_{jobid}." in f]:
            time.sleep(0.1)
        # slurmd revoked the previous start's credential when it killed it, at a
        # one-second granularity: a credential issued within the same second counts as
        # revoked ("Killing non-startable batch job: Job credential revoked").
        time.sleep(2)
        deadline = time.time() + 60
        while time.time() < deadline:
            self.scontrol("update", f"JobId={jobid}", "StartTime=now", check=False)
            t = time.time() + 3
            while time.time() < t:
                if self.job(jobid).get("JobState") != "PENDING":
                    return
                time.sleep(0.1)
        raise SystemExit(f"job {jobid}: still pending after StartTime=now: {self.job(jobid)}")


def main():
    a = harness.parse_args(__doc__)
    missing = [t for t in ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel",
                           "sinfo", "srun") if tool(t) is None]
    if missing:
        skip(f"SLURM/munge not installed (missing {', '.join(missing)}; launch/install_deps.sh --with-tests "
             f"installs slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        skip("the local SLURM cluster needs root (slurmd starts each job as its user)")
    if (os.cpu_count() or 1) < 2:
        skip("the local SLURM cluster needs 2 CPUs for 2 tasks")
    os.environ["PATH"] += ":/usr/sbin"
    check = harness.Checks()

    # Short path: the munge socket's path must fit a sockaddr_un.
    root = tempfile.mkdtemp(prefix="elbo-slurm-")
    cluster = LocalSlurm(root)
    try:
        cluster.start()
        print(f"ok   local SLURM cluster up under {root}")
        run_jobs(a, cluster, check)
    finally:
        cluster.stop()
        still = [name for name, p in cluster.procs if p.poll() is None]
        check(not still, "SLURM daemons stopped by PID", str(still))
        if not check.failures:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"     cluster logs kept in {root}")
    check.finish()


def run_jobs(a, cluster, check):
    # 1200 steps of the smoke MLP: a few seconds, long enough to be interrupted.
    def sets(out):
        s = {"device": "cpu", "data.train": f"{a.data}/train", "data.test": "", "data.max_samples": "960",
             "data.binarize": "true", "train.batch_size": "48", "train.epochs": "60", "optim.schedule": "cosine",
             "optim.warmup_steps": "10", "loss.kl_warmup_steps": "30", "train.log_every": "5",
             "checkpoint.every": "0", "output.dir": out}
        return [x for k, v in s.items() for x in ("--set", f"{k}={v}")]

    env = {"ELBO": a.elbo}

    def submit(name, script, extra_env=None):
        out = os.path.join(a.work, name)
        jobid = cluster.sbatch(os.path.join(LAUNCH, script), [a.spec, *sets(out)], cwd=a.work,
                               env=dict(env, **(extra_env or {})))
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
    check(f"2 rank(s) on 1 node(s) via srun (SLURM job {ref_id}, restart 0)" in log(ref_id) or
          f"2 rank(s) on 1 node(s) via srun (SLURM job {ref_id})" in log(ref_id),
          "elbo discovers its world from SLURM: 2 ranks, 1 node, srun, the job id", log(ref_id)[:1500])

    def preempted(name, script, how, extra_env=None):
        jobid, out = submit(name, script, extra_env)
        mid_run(jobid, out)
        if how == "steps":
            subprocess.run(["scancel", "-s", "USR1", str(jobid)], env=cluster.env, check=True)
        elif how == "batch":
            subprocess.run(["scancel", "-b", "-s", "USR1", str(jobid)], env=cluster.env, check=True)
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

    t = preempted("usr1_tasks", "slurm.sbatch", "steps")
    check("requeueing job" in t, "usr1_tasks: slurm.sbatch requeued its own job after exit 75", t)
    t = preempted("usr1_batch_mpirun", "slurm-multinode.sbatch", "batch", {"ELBO_LAUNCHER": "mpirun"})
    check("2 ranks via mpirun" in t and "SIGUSR1 from SLURM" in t and "requeueing job" in t,
          "usr1_batch_mpirun: the shell forwarded SIGUSR1 through mpirun and requeued the job", t)
    check("via mpirun inside SLURM job" in t and re.search(r"via mpirun inside SLURM job \d+, restart 1", t) is not None,
          "usr1_batch_mpirun: elbo sees mpirun inside the SLURM job, and the restart count after the requeue", t[:3000])
    preempted("scontrol_requeue", "slurm.sbatch", "requeue")


if __name__ == "__main__":
    main()
