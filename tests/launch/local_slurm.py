"""A real SLURM cluster for the tests, started as plain processes under a temporary
directory (no systemd) and stopped by their PIDs: munged, slurmctld and slurmd.

    LocalSlurm(root)               one node: this host, 127.0.0.1
    LocalSlurm(root, nodes=nodes)  one slurmd per node of a netns_nodes.Nodes (its own
                                   hostname and address); slurmctld on the first node;
                                   every client command (sbatch, scontrol, ...) runs
                                   there too, so nothing is sent to the nodes'
                                   addresses from the host's own namespace.

munged's socket is a file, which every network namespace reaches. See
shared/notes/slurm-on-localhost.md for the settings and why."""
import os, shutil, socket, subprocess, time


def tool(name):
    """SLURM's daemons live in /usr/sbin, which a non-login PATH may lack."""
    return shutil.which(name) or (f"/usr/sbin/{name}" if os.access(f"/usr/sbin/{name}", os.X_OK) else None)


MISSING_HINT = "launch/install_deps.sh --with-tests installs slurmctld slurmd slurm-client munge"
TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")


def missing_tools():
    return [t for t in TOOLS if tool(t) is None]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, root, nodes=None, cpus_per_node=None):
        self.root = root
        self.nodes = nodes
        self.procs = []  # (name, Popen), in start order
        self.conf = os.path.join(root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.env["PATH"] = self.env.get("PATH", "") + ":/usr/sbin"
        if nodes is None:
            self.names = [socket.gethostname().split(".")[0]]
            self.addrs = ["127.0.0.1"]
        else:
            self.names = list(nodes.names)
            self.addrs = [f"10.77.0.{i + 1}" for i in range(len(nodes.names))]
        self.cpus = cpus_per_node or (os.cpu_count() if nodes is None else 1)

    def _wrap(self, argv, node=None):
        """argv as run on `node` (default: the first, where slurmctld lives)."""
        if self.nodes is None:
            return argv
        return self.nodes.command(argv, node or self.names[0], host_sys=True)

    def _spawn(self, name, argv, node=None):
        log = open(os.path.join(self.root, f"{name}.stdout"), "w")
        # A session of its own: the daemon outlives nothing of ours, and we stop
        # exactly this PID afterwards (ip netns exec / unshare exec into the daemon).
        p = subprocess.Popen(self._wrap(argv, node), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                             start_new_session=True)
        self.procs.append((name, p))
        return p

    def run(self, argv, **kw):
        """A client command (sbatch, scontrol, ...) against this cluster."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        env = dict(self.env, **kw.pop("env", {}))
        return subprocess.run(self._wrap(argv), env=env, **kw)

    def _wait_for(self, what, cond, timeout, logs):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if cond():
                return
            if any(p.poll() is not None for _, p in self.procs):
                break
            time.sleep(0.1)
        tails = "\n".join(f"--- {l}:\n{self.tail(l)}" for l in logs)
        raise SystemExit(f"local SLURM: {what} did not happen within {timeout} s\n{tails}")

    def tail(self, name, n=30):
        path = os.path.join(self.root, name)
        if not os.path.exists(path):
            return "(missing)"
        return "".join(open(path, errors="replace").readlines()[-n:])

    def spool(self, node):
        return os.path.join(self.root, f"spool-{node}")

    def start(self):
        r = self.root
        os.chmod(r, 0o755)  # munged refuses a socket directory others could write to, and checks its parents
        sock_dir = os.path.join(r, "munge")
        os.makedirs(sock_dir, mode=0o755)
        key = os.path.join(r, "munge.key")
        subprocess.run([tool("mungekey"), "-c", "-k", key], check=True, capture_output=True)
        os.chmod(key, 0o600)
        self.socket = os.path.join(sock_dir, "munge.socket.2")
        log = open(os.path.join(r, "munged.stdout"), "w")
        self.procs.append(("munged", subprocess.Popen(
            [tool("munged"), "-F", f"--socket={self.socket}", f"--key-file={key}", f"--pid-file={r}/munged.pid",
             f"--seed-file={r}/munged.seed", f"--log-file={r}/munged.log"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)))
        self._wait_for("munged socket", lambda: os.path.exists(self.socket), 20, ["munged.log", "munged.stdout"])
        os.makedirs(os.path.join(r, "state"))
        for n in self.names:
            # Per node: nodes on one machine share /tmp, where the PMIx plugin would
            # otherwise make the same step directory on every node.
            os.makedirs(self.spool(n))
            os.makedirs(os.path.join(r, f"tmp-{n}"), mode=0o1777)
        nodes = "".join(f"NodeName={n} NodeAddr={a} CPUs={self.cpus} RealMemory=1000 State=UNKNOWN\n"
                        for n, a in zip(self.names, self.addrs))
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=elbotest
SlurmctldHost={self.names[0]}({self.addrs[0]})
SlurmUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
TmpFS={r}/tmp-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
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
{nodes}PartitionName=elbo Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        self._spawn("slurmctld", [tool("slurmctld"), "-D", "-f", self.conf])
        for n in self.names:
            self._spawn(f"slurmd-{n}", [tool("slurmd"), "-D", "-f", self.conf, "-N", n], node=n)

        def idle():
            q = self.run(["sinfo", "-h", "-N", "-o", "%T"])
            return q.returncode == 0 and q.stdout.split() == ["idle"] * len(self.names)
        self._wait_for(f"{len(self.names)} node(s) idle in sinfo", idle, 60,
                       ["slurmctld.log", "slurmctld.stdout"] + [f"slurmd-{n}.log" for n in self.names])

    def stop(self):
        if os.path.exists(self.conf):
            self.run(["scancel", "--full", "--partition=elbo"])
            deadline = time.time() + 40
            while time.time() < deadline:
                q = self.run(["squeue", "-h", "-o", "%i"])
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
        return self.run(["scontrol", *args], check=check)

    def job(self, jobid):
        """The job's fields from `scontrol show job -o`."""
        out = self.scontrol("show", "job", "-o", str(jobid)).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def sbatch(self, script, args, cwd, env, layout):
        """Submits `script ARGS` with `layout` (sbatch's --nodes/--ntasks... options)."""
        r = self.run(["sbatch", "--parsable", *layout, "--cpus-per-task=1", script, *args], env=env, cwd=cwd)
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
        logs = "".join(f"\n--- slurmd-{n}.log:\n{self.tail(f'slurmd-{n}.log')}" for n in self.names)
        raise SystemExit(f"job {jobid}: not in {states} (restarts {restarts}) within {timeout} s: {self.job(jobid)}\n"
                         f"--- slurmctld.log:\n{self.tail('slurmctld.log')}{logs}")

    def release(self, jobid, timeout=60):
        """A requeued job waits ~120 s (BeginTime); start it now. The update only sticks
        once the job is PENDING, so wait for that (up to `timeout` s) and repeat until it runs."""
        self.wait_state(jobid, {"PENDING"}, timeout, restarts=1)
        # The hold exists for a reason: the previous start's step daemons may still be
        # finalizing (PMIx keeps its socket for a second or two after the tasks end) and
        # a new step with the same id cannot bind it. Their sockets in the spool
        # directories disappear when they are gone.
        deadline = time.time() + 60
        while time.time() < deadline and any(f".{jobid}." in f or f"_{jobid}." in f
                                             for n in self.names for f in os.listdir(self.spool(n))):
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
