#!/usr/bin/env python3
"""Failures with real processes (2 ranks under mpirun, CPU):
  1. rank 1 killed with SIGKILL mid-training: the job ends within 60 s, the
     launcher's message names the failed rank, and the checkpoints already written
     stay valid (auto-resume continues from the newest);
  2. rank 0 killed with SIGKILL while its writer thread has a checkpoint half
     written (a *.tmp file is on disk): the previous checkpoint stays valid, the
     torn file is never picked, and --resume auto ends bit-identical to an
     uninterrupted run;
  3. train.on_nonfinite: a diverging run (absurd learning rate) aborts naming the
     step, or with `skip` drops the bad steps with a warning naming each and ends;
  4. the forced exits: a stop that cannot complete (rank 1 stalled by SIGSTOP, so
     the agreement never finishes) ends rank 0 with exit 76 when checkpoint.grace_s
     runs out, naming rank 1 as the one that did not answer, and at once on a
     second signal."""
import glob, os, re, signal, subprocess, sys, time
import h5py, numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402

a = harness.parse_args(__doc__)
check = harness.Checks()


def cmd(out, *extra, wrap=False):
    launch = ["sh", "-c", f'echo $$ > {out}.pid.$OMPI_COMM_WORLD_RANK; exec "$0" "$@"'] if wrap else []
    return ["mpirun", "-np", "2", *launch, a.elbo, "train", a.spec, "--set", "device=cpu",
            "--set", f"data.train={a.data}/train", "--set", "data.test=", "--set", "data.max_samples=2400",
            "--set", "train.batch_size=48", "--set", "train.epochs=3", "--set", "train.log_every=5",
            "--set", "checkpoint.every=1", "--set", "checkpoint.keep=3", "--set", f"output.dir={out}", *extra]


def params(out):
    with h5py.File(os.path.join(out, "model.h5"), "r") as f:
        return {k: f["params"][k][...] for k in f["params"]}


def kill_when(out, rank, ready, timeout=120):
    """Starts the job, waits until ready(out) holds, SIGKILLs `rank`; returns (proc, seconds to exit, stdout+stderr)."""
    p = subprocess.Popen(cmd(out, wrap=True), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    pidfile = f"{out}.pid.{rank}"
    while time.time() < deadline and p.poll() is None:
        if os.path.exists(pidfile) and ready(out):
            break
        time.sleep(0.002)
    if p.poll() is not None:
        sys.exit(f"the job ended before the kill:\n{p.communicate()}")
    os.kill(int(open(pidfile).read()), signal.SIGKILL)
    t0 = time.time()
    try:
        so, se = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        so, se = p.communicate()
        return p, 999.0, so + se
    return p, time.time() - t0, so + se


ref_dir = os.path.join(a.work, "ref")
r = subprocess.run(cmd(ref_dir), capture_output=True, text=True, timeout=300)
if r.returncode != 0:
    sys.exit(f"reference run failed:\n{r.stdout}\n{r.stderr}")
ref = params(ref_dir)

# 1. SIGKILL of rank 1 once a few checkpoints exist.
k1 = os.path.join(a.work, "kill_rank1")
p, took, text = kill_when(k1, 1, lambda o: len(glob.glob(os.path.join(o, "checkpoints", "ckpt-*.h5"))) >= 2)
check(took < 60, f"rank 1 SIGKILLed: the job ended {took:.1f} s later (< 60 s)", text)
check(p.returncode != 0, f"non-zero exit ({p.returncode})")
check(re.search(r"rank 1\b", text) is not None, "the failure message names rank 1", text[-2000:])
r = subprocess.run(cmd(k1, "--resume", "auto"), capture_output=True, text=True, timeout=300)
check(r.returncode == 0 and "continuing from" in r.stdout, "auto-resume after the kill continues", r.stdout + r.stderr)
check(r.returncode == 0 and all(np.array_equal(params(k1)[k], ref[k]) for k in ref),
      "and ends bit-identical to the uninterrupted run")

# 2. SIGKILL of rank 0 while a checkpoint is half written.
k0 = os.path.join(a.work, "kill_rank0")
torn = []
def writing(o):
    t = glob.glob(os.path.join(o, "checkpoints", "*.tmp"))
    if t and len(glob.glob(os.path.join(o, "checkpoints", "ckpt-*.h5"))) >= 1:
        torn[:] = t
        return True
    return False
p, took, text = kill_when(k0, 0, writing)
check(took < 60 and p.returncode != 0, f"rank 0 SIGKILLed mid-write: the job ended {took:.1f} s later", text)
left = glob.glob(os.path.join(k0, "checkpoints", "*.tmp"))
print(f"     torn file(s) at the kill: {[os.path.basename(t) for t in torn]}; left on disk: "
      f"{[os.path.basename(t) for t in left]}")
r = subprocess.run(cmd(k0, "--resume", "auto"), capture_output=True, text=True, timeout=300)
m = re.search(r"continuing from (\S+) at step (\d+)", r.stdout)
check(r.returncode == 0 and m is not None, "auto-resume after the torn write picks a valid checkpoint", r.stdout + r.stderr)
check(r.returncode == 0 and all(np.array_equal(params(k0)[k], ref[k]) for k in ref),
      "and ends bit-identical to the uninterrupted run")
check(not glob.glob(os.path.join(k0, "checkpoints", "*.tmp")), "the torn temporary file is cleaned up on resume")

# 3. Non-finite losses.
nan_dir = os.path.join(a.work, "nan")
r = subprocess.run(cmd(nan_dir, "--set", "optim.lr=1e8", "--set", "model.likelihood={type: gaussian}",
                       "--set", "checkpoint.every=0"), capture_output=True, text=True, timeout=300)
check(r.returncode == 1 and re.search(r"step \d+: the (loss is not finite on rank \d|gradient is not finite)", r.stderr)
      is not None, f"on_nonfinite: abort ends the run naming the step ({r.returncode})", r.stdout[-1500:] + r.stderr)
skip_dir = os.path.join(a.work, "skip")
r = subprocess.run(cmd(skip_dir, "--set", "optim.lr=1e8", "--set", "model.likelihood={type: gaussian}",
                       "--set", "checkpoint.every=0", "--set", "train.on_nonfinite=skip", "--set", "train.epochs=1",
                       # limits lifted: this checks skipping itself (test_run_safety.py checks the limits)
                       "--set", "train.max_consecutive_skips=1000", "--set", "train.max_skip_fraction=1"),
                   capture_output=True, text=True, timeout=300)
warnings = re.findall(r"warning: step (\d+): .*not finite.*skipping this step", r.stdout)
check(r.returncode == 0 and len(warnings) > 0, f"on_nonfinite: skip drops {len(warnings)} step(s) with a warning each "
      "and finishes", r.stdout[-1500:] + r.stderr)

# 4. Forced exits while the orderly stop is stuck (rank 1 stopped, rank 0 signalled).
def forced(name, grace_s, second_signal):
    out = os.path.join(a.work, name)
    p = subprocess.Popen(cmd(out, "--set", "checkpoint.every=0", "--set", "train.epochs=100000",
                             "--set", f"checkpoint.grace_s={grace_s}", "--set", "dist.timeout_s=120", wrap=True),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = [f"{out}.pid.{r}" for r in (0, 1)]
    metrics = os.path.join(out, "metrics.csv")
    stalled = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            if all(map(os.path.exists, pids)) and os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3:
                break
            time.sleep(0.02)
        if p.poll() is not None:
            sys.exit(f"{name}: the job ended before the signal:\n{p.communicate()}")
        stalled = int(open(pids[1]).read())
        os.kill(stalled, signal.SIGSTOP)
        rank0 = int(open(pids[0]).read())
        os.kill(rank0, signal.SIGUSR1)
        t0 = time.time()
        if second_signal:
            time.sleep(0.5)
            os.kill(rank0, signal.SIGTERM)
        try:
            so, se = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
        return p.returncode, time.time() - t0, so + se, out
    finally:
        if stalled is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(stalled, sig)
                except ProcessLookupError:
                    pass
        if p.poll() is None:
            p.kill()

rc, took, text, out = forced("grace", 2, False)
check(rc == 76 and "checkpoint.grace_s ran out" in text and re.search(r"rank\(s\) 1 \([^)]*\) did not answer", text),
      f"stop stuck behind a stalled rank: exit 76 when checkpoint.grace_s=2 runs out, naming rank 1 ({rc}, "
      f"{took:.1f} s)", text[-2000:])
check(0.4 < took < 30, f"the grace deadline held until shortly before the 2 s ran out ({took:.1f} s)")
check(not glob.glob(os.path.join(out, "checkpoints", "*")), "no checkpoint, not even a temporary file, was left")
rc, took, text, out = forced("second_signal", 100, True)
check(rc == 76 and "another stop signal arrived before the checkpoint" in text,
      f"a second signal while the stop is stuck: exit 76 at once ({rc}, {took:.1f} s)", text[-2000:])
check(took < 30, f"long before checkpoint.grace_s=100 ({took:.1f} s)")

check.finish()
