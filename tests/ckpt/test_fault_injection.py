#!/usr/bin/env python3
"""Faults at random moments (fixed seeds), then --resume auto until the run ends: the
final parameters and evaluation must equal an uninterrupted run's, bit for bit, and
nothing written before the fault may be lost.

Twenty trials on 2 ranks (CPU) of a 1000-step run with periodic checkpoints and a
final evaluation; each trial draws a fault and a moment:
  fault   SIGKILL of rank 0 (a crash: the launcher takes the job down), or SIGTERM to
          every rank (what SLURM sends on preemption and scancel)
  moment  start-up (0-0.6 s after launch), mid-training (after a random number of
          metrics rows), during a checkpoint write (a .tmp file on disk), or during
          the final evaluation (model.h5 written)
After the fault: every checkpoint published before it is still there unless three
newer ones replaced it (checkpoint.keep: 3), metrics.csv keeps its rows in step
order with no duplicates, and a model.h5 that existed keeps its bytes."""
import glob, hashlib, os, random, re, signal, subprocess, sys, time
import h5py, numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402

a = harness.parse_args(__doc__)
check = harness.Checks()
TRIALS = 20


def cmd(out, *extra, wrap=False):
    launch = ["sh", "-c", f'echo $$ > {out}.pid.$OMPI_COMM_WORLD_RANK; exec "$0" "$@"'] if wrap else []
    return ["mpirun", "-np", "2", *launch, a.elbo, "train", a.spec, "--set", "device=cpu",
            "--set", f"data.train={a.data}/train", "--set", f"data.test={a.data}/test",
            "--set", "data.max_samples=2400", "--set", "train.batch_size=48", "--set", "train.epochs=20",
            "--set", "train.log_every=10", "--set", "checkpoint.every=20", "--set", "checkpoint.keep=3",
            "--set", "eval.iw_samples=40", "--set", "eval.images=false", "--set", f"output.dir={out}", *extra]


def params(out):
    with h5py.File(os.path.join(out, "model.h5"), "r") as f:
        return {k: f["params"][k][...] for k in f["params"]}


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def steps_in_metrics(out):
    path = os.path.join(out, "metrics.csv")
    if not os.path.exists(path):
        return []
    return [int(l.split(",")[0]) for l in open(path).read().splitlines()[1:] if l]


ref = os.path.join(a.work, "ref")
r = subprocess.run(cmd(ref), capture_output=True, text=True, timeout=600)
if r.returncode != 0:
    sys.exit(f"the reference run failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
ref_params, ref_eval = params(ref), open(os.path.join(ref, "eval.yaml")).read()
ref_eval = re.sub(r"(?m)^model: .*\n", "", ref_eval)

for trial in range(TRIALS):
    rng = random.Random(1000 + trial)
    fault = rng.choice(["sigkill_rank0", "sigterm_all"])
    moment = rng.choice(["startup", "mid", "checkpoint", "eval"])
    out = os.path.join(a.work, f"t{trial:02d}")
    tag = f"trial {trial} ({fault} at {moment})"
    p = subprocess.Popen(cmd(out, wrap=True), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids = [f"{out}.pid.{r}" for r in (0, 1)]
    ckdir = os.path.join(out, "checkpoints")
    if moment == "startup":
        ready = lambda: True  # noqa: E731
        time.sleep(rng.uniform(0.0, 0.6))
    elif moment == "mid":
        rows = rng.randint(1, 60)
        ready = lambda: len(steps_in_metrics(out)) >= rows  # noqa: E731
    elif moment == "checkpoint":
        after = rng.randint(1, 30)
        ready = lambda: (len(glob.glob(os.path.join(ckdir, "*.h5"))) >= min(after, 3) and  # noqa: E731
                         any(f.endswith(".tmp") for f in os.listdir(ckdir)) if os.path.isdir(ckdir) else False)
    else:
        ready = lambda: os.path.exists(os.path.join(out, "model.h5"))  # noqa: E731
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not (ready() and all(map(os.path.exists, pids))):
        time.sleep(0.001)
    # What exists just before the fault and must not be lost.
    model_before = digest(os.path.join(out, "model.h5")) if os.path.exists(os.path.join(out, "model.h5")) else None
    published = [f for f in glob.glob(os.path.join(ckdir, "*.h5"))]
    if p.poll() is None:
        if fault == "sigkill_rank0":
            targets = [int(open(pids[0]).read())] if os.path.exists(pids[0]) else []
            sig = signal.SIGKILL
        else:
            targets = [int(open(f).read()) for f in pids if os.path.exists(f)]
            sig = signal.SIGTERM
        if not targets:  # not even started: signal the launcher, as a scheduler would
            targets, sig = [p.pid], signal.SIGTERM
        for pid in targets:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    try:
        first_out, _ = p.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        p.kill()
        first_out, _ = p.communicate()
        check(False, f"{tag}: the job ended after the fault")
        continue
    after_steps = steps_in_metrics(out)
    check(after_steps == sorted(set(after_steps)), f"{tag}: metrics.csv rows in step order, no duplicates")
    if model_before is not None:
        check(digest(os.path.join(out, "model.h5")) == model_before, f"{tag}: model.h5 kept its bytes")
    # Rotation (checkpoint.keep=3) may remove a checkpoint only once three newer ones exist.
    step_of = lambda f: int(re.search(r"(\d+)", os.path.basename(f)).group(1))  # noqa: E731
    kept = [step_of(f) for f in glob.glob(os.path.join(ckdir, "*.h5"))]
    lost = [f for f in published if not os.path.exists(f) and sum(k > step_of(f) for k in kept) < 3]
    check(not lost, f"{tag}: no published checkpoint lost except by rotation", str(lost))
    # Resume until done (a fault at start-up may leave nothing to resume from).
    rc, text = p.returncode, first_out
    for attempt in range(3):
        if rc == 0:
            break
        r = subprocess.run(cmd(out, "--resume", "auto"), capture_output=True, text=True, timeout=600)
        rc, text = r.returncode, r.stdout + r.stderr
    ok = rc == 0 and os.path.exists(os.path.join(out, "eval.yaml"))
    check(ok, f"{tag}: --resume auto completes the run (exit {rc})", text[-1500:])
    if not ok:
        continue
    same = all(np.array_equal(params(out)[k], v) for k, v in ref_params.items())
    ev = re.sub(r"(?m)^model: .*\n", "", open(os.path.join(out, "eval.yaml")).read())
    check(same and ev == ref_eval, f"{tag}: final parameters and evaluation bit-identical to the uninterrupted run")
    steps = steps_in_metrics(out)
    check(steps == steps_in_metrics(ref), f"{tag}: metrics.csv has the uninterrupted run's rows")

check.finish()
