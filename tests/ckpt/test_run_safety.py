#!/usr/bin/env python3
"""A run directory holds one run, and signals at any moment leave it resumable
(real processes, CPU):
  1. output.overwrite=true over an earlier run leaves none of its checkpoints: the
     new run's rotation keeps the new run's files, `latest` names an existing file,
     and --resume auto continues the new run, not the old one;
  2. --resume PATH into a directory holding another run is refused and leaves that
     run's files untouched; overwrite together with --resume is refused;
  3. --resume auto on a finished run whose checkpoints are gone, or all damaged, is
     refused and leaves model.h5 untouched;
  5. a second job on a running job's directory is refused, naming the holder (pid
     and host), and the first job ends normally;
  8. train.on_nonfinite: skip with an absurd learning rate ends with an error after
     train.max_consecutive_skips skipped steps, and metrics.csv counts them;
 11. SIGTERM during start-up (before the first step) exits 75 without a checkpoint;
 12. SIGINT mid-training exits 75 with a checkpoint (not 130), and the resumed run
     ends bit-identical to an uninterrupted one;
 13. SIGTERM to mpirun: whatever mpirun's exit status, rank 0 leaves the
     ELBO_STOP_FILE marker the job scripts requeue on, and the run resumes;
 14. SIGTERM during the final evaluation exits 75 at once (not 76 after grace_s,
     no "without a checkpoint"), and --resume auto then runs the evaluation."""
import glob, hashlib, os, re, signal, subprocess, sys, time
import h5py, numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402

a = harness.parse_args(__doc__)
check = harness.Checks()


def base(out, *extra, test=False):
    return [a.elbo, "train", a.spec, "--set", "device=cpu", "--set", f"data.train={a.data}/train",
            "--set", f"data.test={a.data}/test" if test else "data.test=", "--set", "data.max_samples=2400",
            "--set", "train.batch_size=48", "--set", "train.epochs=2", "--set", "train.log_every=10",
            "--set", "checkpoint.every=10", "--set", "checkpoint.keep=3", "--set", f"output.dir={out}", *extra]


def run(out, *extra, test=False, np_=1, timeout=300):
    cmd = (["mpirun", "-np", str(np_)] if np_ > 1 else []) + base(out, *extra, test=test)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.exists(path) else None


def files_of(out):
    return {p: digest(p) for p in glob.glob(os.path.join(out, "**"), recursive=True) if os.path.isfile(p)}


def params(out):
    with h5py.File(os.path.join(out, "model.h5"), "r") as f:
        return {k: f["params"][k][...] for k in f["params"]}


def ckpt_steps(out):
    return sorted(int(re.search(r"(\d+)", os.path.basename(p)).group(1))
                  for p in glob.glob(os.path.join(out, "checkpoints", "*.h5")))


def start(out, *extra, test=False):
    return subprocess.Popen(base(out, *extra, test=test), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(cond, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and not cond():
        time.sleep(0.005)
    return cond()


# --- 1. overwrite means a clean directory ---
d1 = os.path.join(a.work, "overwrite")
rc, _ = run(d1, "--set", "train.epochs=4")  # 200 steps: checkpoints 180, 190, 200
rc2, out2 = run(d1, "--set", "output.overwrite=true", "--set", "seed=11", "--set", "train.max_steps=30")
steps = ckpt_steps(d1)
latest = open(os.path.join(d1, "checkpoints", "latest")).read().strip() if os.path.exists(
    os.path.join(d1, "checkpoints", "latest")) else ""
check(rc == 0 and rc2 == 0, "overwrite: both runs succeed", out2)
check(steps == [10, 20, 30], f"overwrite: only the new run's checkpoints remain (steps {steps})")
check(latest != "" and os.path.exists(os.path.join(d1, "checkpoints", latest)),
      f"overwrite: latest names an existing checkpoint ({latest!r})")
rc3, out3 = run(d1, "--set", "seed=11", "--set", "train.max_steps=40", "--resume", "auto")
check(rc3 == 0 and "at step 30" in out3, "overwrite: --resume auto continues the new run from step 30", out3)

# --- 2. --resume PATH never replaces another run ---
d2a, d2b = os.path.join(a.work, "run_a"), os.path.join(a.work, "run_b")
run(d2a, "--set", "train.max_steps=20")
run(d2b, "--set", "train.max_steps=20", "--set", "seed=5")
before = files_of(d2b)
rc, out = run(d2b, "--set", "train.max_steps=30", "--resume", os.path.join(d2a, "checkpoints",
                                                                           sorted(os.listdir(os.path.join(d2a, "checkpoints")))[0]))
check(rc == 2 and "holds another run" in out, "resume PATH into another run's directory is refused", out)
check(files_of(d2b) == before, "resume PATH: the other run's files are untouched")
rc, out = run(d2b, "--set", "output.overwrite=true", "--resume", "auto")
check(rc == 2 and "output.overwrite" in out and files_of(d2b) == before,
      "overwrite with --resume is refused, nothing changed", out)

# output.dir naming a file: refused, the file untouched
not_dir = os.path.join(a.work, "a_file")
open(not_dir, "w").write("keep me")
rc, out = run(not_dir)
check(rc == 2 and "is not a directory" in out and open(not_dir).read() == "keep me",
      "output.dir that is a file is refused and left alone", out)

# --- 3. a finished model is never trained over silently ---
model_digest = digest(os.path.join(d2b, "model.h5"))
for f in glob.glob(os.path.join(d2b, "checkpoints", "*.h5")):
    with open(f, "r+b") as fh:  # damage every checkpoint
        fh.truncate(1000)
rc, out = run(d2b, "--set", "train.max_steps=20", "--set", "seed=5", "--resume", "auto")
check(rc == 2 and "finished model" in out and digest(os.path.join(d2b, "model.h5")) == model_digest,
      "resume auto over a finished run with damaged checkpoints is refused; model.h5 untouched", out)
for f in glob.glob(os.path.join(d2b, "checkpoints", "*")):
    os.remove(f)
rc, out = run(d2b, "--set", "train.max_steps=20", "--set", "seed=5", "--resume", "auto")
check(rc == 2 and "finished model" in out and digest(os.path.join(d2b, "model.h5")) == model_digest,
      "resume auto over a finished run without checkpoints is refused; model.h5 untouched", out)

# --- 5. one job per directory ---
d5 = os.path.join(a.work, "locked")
p = start(d5, "--set", "train.epochs=400")
wait_for(lambda: os.path.exists(os.path.join(d5, "metrics.csv")))
rc, out = run(d5, "--resume", "auto", "--set", "train.epochs=400")
check(rc == 2 and re.search(r"in use by another elbo job \(pid %d on " % p.pid, out) is not None,
      "a second job on a running job's directory is refused, naming the holder's pid", out)
p.send_signal(signal.SIGUSR1)
o, _ = p.communicate(timeout=120)
check(p.returncode == 75, f"the first job is unaffected and stops cleanly on request (exit {p.returncode})", o)

# --- 8. skipping has a limit ---
d8 = os.path.join(a.work, "skips")
rc, out = run(d8, "--set", "optim.lr=1e3", "--set", "optim.grad_clip=0", "--set", "train.on_nonfinite=skip",
              "--set", "train.log_every=1")
check(rc != 0 and "max_consecutive_skips" in out, f"skip: a run that keeps diverging ends with an error (exit {rc})",
      out[-2000:])
check(not os.path.exists(os.path.join(d8, "model.h5")), "skip: no model is written for it")
rows = open(os.path.join(d8, "metrics.csv")).read().splitlines()
header = rows[0].split(",")
check("skipped_steps" in header and len(rows) > 1 and int(rows[-1].split(",")[header.index("skipped_steps")]) >= 1,
      "skip: metrics.csv counts the skipped steps", "\n".join(rows[:3] + rows[-3:]))

# --- 11. a stop during start-up ---
d11 = os.path.join(a.work, "startup")
p = start(d11)
time.sleep(0.3)  # loading libraries, MPI, the shards: long before the first step
p.send_signal(signal.SIGTERM)
o, _ = p.communicate(timeout=120)
check(p.returncode == 75 and "before the first step" in o and not ckpt_steps(d11),
      f"SIGTERM during start-up exits 75 without a checkpoint (exit {p.returncode})", o)

# --- 12. Ctrl-C is a stop request ---
ref = os.path.join(a.work, "ref")
run(ref, "--set", "train.epochs=100")
d12 = os.path.join(a.work, "sigint")
p = start(d12, "--set", "train.epochs=100")
wait_for(lambda: ckpt_steps(d12) and ckpt_steps(d12)[-1] >= 20)
p.send_signal(signal.SIGINT)
o, _ = p.communicate(timeout=120)
check(p.returncode == 75 and "stop requested" in o, f"SIGINT exits 75 after a checkpoint (exit {p.returncode})", o)
rc, out = run(d12, "--resume", "auto", "--set", "train.epochs=100")
same = rc == 0 and all(np.array_equal(params(d12)[k], v) for k, v in params(ref).items())
check(same, "SIGINT: the resumed run ends bit-identical to an uninterrupted one", out)

# --- 13. SIGTERM to mpirun: the exit status may say 1, the marker says resumable ---
d13 = os.path.join(a.work, "mpirun_term")
marker = os.path.join(a.work, "stopped.marker")
env = dict(os.environ, ELBO_STOP_FILE=marker)
ref2 = os.path.join(a.work, "ref_np2")
run(ref2, "--set", "train.epochs=40", np_=2)
p = subprocess.Popen(["mpirun", "-np", "2", "-x", "ELBO_STOP_FILE"] + base(d13, "--set", "train.epochs=40"),
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
wait_for(lambda: ckpt_steps(d13) and ckpt_steps(d13)[-1] >= 20)
p.send_signal(signal.SIGTERM)
o, _ = p.communicate(timeout=120)
check(os.path.exists(marker) and "stop requested" in o,
      f"SIGTERM to mpirun: rank 0 leaves the resumable marker (mpirun exit {p.returncode})", o[-1500:])
rc, out = run(d13, "--resume", "auto", "--set", "train.epochs=40", np_=2)
same = rc == 0 and all(np.array_equal(params(d13)[k], v) for k, v in params(ref2).items())
check(same, "SIGTERM to mpirun: the resumed run ends bit-identical to an uninterrupted one", out[-1500:])

# --- 14. a stop during the final evaluation ---
d14 = os.path.join(a.work, "final_eval")
p = start(d14, "--set", "eval.iw_samples=2000", "--set", "eval.images=false", test=True)
wait_for(lambda: os.path.exists(os.path.join(d14, "model.h5")), timeout=240)
time.sleep(0.3)
t0 = time.time()
p.send_signal(signal.SIGTERM)
o, _ = p.communicate(timeout=300)
took = time.time() - t0
check(p.returncode == 75 and took < 10 and "without a checkpoint" not in o,
      f"SIGTERM during the final evaluation exits 75 at once (exit {p.returncode} after {took:.1f} s)", o[-1500:])
rc, out = run(d14, "--set", "eval.iw_samples=5", "--set", "eval.images=false", "--resume", "auto", test=True)
check(rc == 0 and os.path.exists(os.path.join(d14, "eval.yaml")),
      "after it, --resume auto runs the final evaluation", out[-1500:])

check.finish()
