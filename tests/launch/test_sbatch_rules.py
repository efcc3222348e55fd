#!/usr/bin/env python3
"""The SLURM batch scripts' requeue rule, run as bash scripts with stand-ins for
srun, mpirun and scontrol on PATH (no SLURM needed): a job is requeued, and exits 75,
when the launcher returns 75 or when rank 0 left the ELBO_STOP_FILE marker (a
launcher that was signalled itself may report 1 although the ranks checkpointed);
any other failure is not requeued and keeps its status; a clean run exits 0. The
marker of an earlier start is removed before the launcher runs, so it cannot
requeue a job that failed. The multi-node script also requeues on node loss (status
3 from elbo, 205 from mpirun) at most ELBO_NODE_RETRIES times, keeping the status."""
import os, stat, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
failures = []


def check(cond, what, detail=""):
    print(("ok   " if cond else "FAIL ") + what + (f"\n{detail}" if detail and not cond else ""))
    if not cond:
        failures.append(what)


def fake(bindir, name, body):
    path = os.path.join(bindir, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def job(script, launcher_rc, write_marker, stale_marker=False, launcher="srun", d=None, retries=None):
    """One start of the batch script in `d` (a new temporary submit directory when
    None; pass one to run several starts of the same job)."""
    if d is None:
        with tempfile.TemporaryDirectory() as new_dir:
            return job(script, launcher_rc, write_marker, stale_marker, launcher, new_dir, retries)
    bindir = os.path.join(d, "bin")
    os.makedirs(bindir, exist_ok=True)
    log = os.path.join(d, "scontrol.log")
    marker = os.path.join(d, ".elbo-stopped-42")
    # The launcher stand-in plays the ranks: rank 0 may leave the marker, then the
    # launcher reports launcher_rc.
    body = (f'[ "{int(write_marker)}" = 1 ] && echo stopped > "$ELBO_STOP_FILE"\n' f"exit {launcher_rc}\n")
    fake(bindir, launcher, body)
    fake(bindir, "scontrol", f'echo "$@" >> "{log}"\n')
    if stale_marker:
        open(marker, "w").write("from an earlier start\n")
    env = dict(os.environ, PATH=bindir + ":" + os.environ["PATH"], SLURM_JOB_ID="42", SLURM_SUBMIT_DIR=d,
               SLURM_NTASKS="2", SLURM_JOB_NODELIST="n1", ELBO="/bin/true")
    env.pop("ELBO_STOP_FILE", None)
    if launcher == "mpirun":
        env["ELBO_LAUNCHER"] = "mpirun"
    if retries is not None:
        env["ELBO_NODE_RETRIES"] = str(retries)
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", script), "spec.yaml"], env=env, cwd=d,
                       capture_output=True, text=True, timeout=60)
    requeued = os.path.exists(log) and "requeue 42" in open(log).read()
    if os.path.exists(log):
        os.remove(log)
    return r.returncode, requeued, os.path.exists(marker), r.stdout + r.stderr


for script, launcher in (("slurm.sbatch", "srun"), ("slurm-multinode.sbatch", "srun"),
                         ("slurm-multinode.sbatch", "mpirun")):
    tag = f"{script} ({launcher})"
    rc, requeued, left, out = job(script, 0, False, launcher=launcher)
    check(rc == 0 and not requeued, f"{tag}: a finished run exits 0 and is not requeued", out)
    rc, requeued, left, out = job(script, 75, True, launcher=launcher)
    check(rc == 75 and requeued and not left, f"{tag}: exit 75 requeues the job, the marker is cleared", out)
    rc, requeued, left, out = job(script, 1, True, launcher=launcher)
    check(rc == 75 and requeued, f"{tag}: launcher status 1 with rank 0's marker requeues the job (exit 75)", out)
    rc, requeued, left, out = job(script, 1, False, launcher=launcher)
    check(rc == 1 and not requeued, f"{tag}: a failure without the marker is not requeued and keeps status 1", out)
    rc, requeued, left, out = job(script, 2, False, stale_marker=True, launcher=launcher)
    check(rc == 2 and not requeued, f"{tag}: an earlier start's marker is removed first: a bad-input failure "
          "is not requeued", out)

# Node loss (multi-node script): requeued up to ELBO_NODE_RETRIES times, counted apart
# from preemptions; then the status is kept and the job is not requeued.
for launcher, status in (("srun", 3), ("mpirun", 205)):
    tag = f"slurm-multinode.sbatch ({launcher})"
    with tempfile.TemporaryDirectory() as d:
        seen = [job("slurm-multinode.sbatch", status, False, launcher=launcher, d=d, retries=2) for _ in range(2)]
        check(all(rc == status and requeued for rc, requeued, _, _ in seen),
              f"{tag}: status {status} (node loss) requeues the job twice with ELBO_NODE_RETRIES=2", seen[-1][3])
        rc, requeued, _, _ = job("slurm-multinode.sbatch", 75, True, launcher=launcher, d=d, retries=2)
        check(rc == 75 and requeued, f"{tag}: preemptions in between are requeued whatever the node-failure count")
        rc, requeued, _, out = job("slurm-multinode.sbatch", status, False, launcher=launcher, d=d, retries=2)
        check(rc == status and not requeued and "not requeueing" in out,
              f"{tag}: the third node loss is not requeued and keeps status {status}", out)
    rc, requeued, _, out = job("slurm-multinode.sbatch", 1, False, launcher=launcher)
    check(rc == 1 and not requeued, f"{tag}: status 1 (a run-time error, not node loss) is not requeued", out)

if failures:
    sys.exit(f"{len(failures)} check(s) failed: {failures}")
