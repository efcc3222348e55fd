#!/usr/bin/env python3
"""The moving average of the parameters (optim.ema), best.h5 and train.patience with
real runs (CPU, 2 ranks, eval every 5 steps on 200 test samples, EMA 0.5 at a
learning rate of 0.03, where the test -ELBO does not improve at every evaluation):
  1. the average follows its recurrence: each checkpoint's /optim/ema is
     d * (the previous one's) + (1 - d) * its /params, bit for bit in float32;
  2. model.h5 holds the average under /params and the parameters under /params_raw,
     equal to the final checkpoint's; the final evaluation (eval.yaml) is the
     average's (elbo eval on model.h5 gives the same bound);
  3. best.h5 is written at each evaluation that improves on the best so far: its step
     is the argmin of metrics.csv's test_neg_elbo, its bound that value, its arrays
     those of the checkpoint at that step (average and parameters);
  4. train.patience P stops at the first evaluation that is the P-th in a row
     without improvement (predicted from run 1's metrics), exits 0 with the final
     checkpoint, model.h5 and evaluation at that step, and its best.h5 is run 1's
     best up to there; --resume auto afterwards trains no further;
  5. the same run resumed from its step-25 checkpoint into a new directory ends
     bit-identical: model.h5, best.h5, the stop step and the test metrics (the best
     so far and the evaluations since travel in the checkpoint);
  6. resuming a checkpoint written without optim.ema with optim.ema set starts the
     average from its parameters and says so."""
import csv, glob, os, re, subprocess, sys
import h5py, numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402

a = harness.parse_args(__doc__)
check = harness.Checks()
D = 0.5


def cmd(out, *extra, np_=2):
    return ["mpirun", "-np", str(np_), a.elbo, "train", a.spec, "--set", "device=cpu",
            "--set", f"data.train={a.data}/train", "--set", f"data.test={a.data}/test",
            "--set", "data.max_samples=960", "--set", "train.batch_size=48", "--set", "train.epochs=6",
            "--set", "train.max_steps=100", "--set", "train.log_every=5", "--set", "optim.lr=0.03",
            "--set", "eval.every=5", "--set", "eval.max_samples=200", "--set", "eval.iw_samples=0",
            "--set", "eval.images=false", "--set", f"optim.ema={D}", "--set", "checkpoint.every=5",
            "--set", "checkpoint.keep=0", "--set", f"output.dir={out}", *extra]


def run(out, *extra, expect=0, np_=2):
    r = subprocess.run(cmd(out, *extra, np_=np_), capture_output=True, text=True, timeout=300)
    if r.returncode != expect:
        sys.exit(f"{out}: exit {r.returncode}, expected {expect}:\n{r.stdout}\n{r.stderr}")
    return r


def arrays(path, group):
    with h5py.File(path, "r") as f:
        return {k: f[group][k][...] for k in f[group]}


def attrs(path):
    with h5py.File(path, "r") as f:
        return dict(f.attrs)


def same(p, q):
    return set(p) == set(q) and all(np.array_equal(p[k], q[k]) for k in q)


def ckpt(out, step):
    return os.path.join(out, "checkpoints", f"ckpt-{step:09d}.h5")


def test_column(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return [(int(r["step"]), float(r["test_neg_elbo"])) for r in csv.DictReader(f) if r["test_neg_elbo"]]


# 1-3: the uninterrupted run without patience.
full = os.path.join(a.work, "full")
r = run(full)
evals = test_column(full)
check([s for s, _ in evals] == list(range(5, 100, 5)), "evaluations at steps 5, 10, ..., 95",
      str([s for s, _ in evals]))
print("     test -ELBO of the average:", " ".join(f"{s}:{v:.2f}" for s, v in evals))
ck_steps = sorted(int(re.search(r"(\d+)\.h5$", p).group(1)) for p in glob.glob(os.path.join(full, "checkpoints", "ckpt-*.h5")))
check(ck_steps == list(range(5, 101, 5)), "a checkpoint every 5 steps and the final one", str(ck_steps))

# The recurrence, from a run that checkpoints every step (6 steps), at a decay whose
# products round.
rec = os.path.join(a.work, "recurrence")
run(rec, "--set", "train.max_steps=6", "--set", "checkpoint.every=1", "--set", "eval.every=0",
    "--set", "eval.at_end=false", "--set", "optim.ema=0.9")
d, one_minus_d = np.float32(0.9), np.float32(1.0 - 0.9)
exact = True
for step in range(2, 7):
    e0, e1, p1 = arrays(ckpt(rec, step - 1), "optim/ema"), arrays(ckpt(rec, step), "optim/ema"), \
        arrays(ckpt(rec, step), "params")
    exact &= all(np.array_equal(e1[k], d * e0[k] + one_minus_d * p1[k]) for k in p1)
    exact &= not same(e1, p1)
check(exact, "steps 2-6: /optim/ema == 0.9 * previous + 0.1 * /params, bit for bit (and not the parameters)")

final = ckpt(full, 100)
model = os.path.join(full, "model.h5")
check(same(arrays(model, "params"), arrays(final, "optim/ema")) and
      same(arrays(model, "params_raw"), arrays(final, "params")),
      "model.h5: /params is the final average, /params_raw the final parameters")
check(abs(attrs(model)["ema"] - D) < 1e-15, "model.h5 says optim.ema in its attribute 'ema'")
ev = subprocess.run(["mpirun", "-np", "1", a.elbo, "eval", model, "--data", f"{a.data}/test"],
                    capture_output=True, text=True, timeout=300)
with open(os.path.join(full, "eval.yaml")) as f:
    at_end = float(re.search(r"neg_elbo: ([0-9.]+)", f.read()).group(1))
m = re.search(r"test -ELBO ([0-9.]+)", ev.stdout)
check(ev.returncode == 0 and m is not None and abs(float(m.group(1)) - at_end) < 1e-4 * at_end,
      f"elbo eval model.h5 (its /params) gives the final evaluation's bound {at_end:.3f}", ev.stdout + ev.stderr)

best_step, best_bound = min(evals, key=lambda sv: (sv[1], sv[0]))
best = os.path.join(full, "best.h5")
ba = attrs(best)
check(ba["step"] == best_step, f"best.h5 is the step of the lowest test -ELBO in metrics.csv ({best_step})",
      f"best.h5 step {ba['step']}")
check(abs(ba["test_neg_elbo"] - best_bound) < 1e-5 and ba["eval_samples"] == 200,
      "best.h5's bound attribute is that value, on 200 samples")
check(same(arrays(best, "params"), arrays(ckpt(full, best_step), "optim/ema")) and
      same(arrays(best, "params_raw"), arrays(ckpt(full, best_step), "params")),
      "best.h5 holds the average (and parameters) of that step's checkpoint")
improvements, lowest = [], float("inf")
for s, v in evals:
    if v < lowest:
        improvements.append(s)
        lowest = v
logged = [int(x) for x in re.findall(r"best: test -ELBO [0-9.]+ at step (\d+)", r.stdout)]
check(logged == improvements, f"best.h5 written at each improvement: {improvements}", str(logged))
check(len(improvements) < len(evals), "some evaluations did not improve (so the check above can fail)")


# 4. Patience: the first evaluation that is the P-th in a row without improvement.
def predicted_stop(p):
    lowest, since = float("inf"), 0
    for s, v in evals:
        if v < lowest:
            lowest, since = v, 0
        else:
            since += 1
            if since >= p:
                return s
    return None


P = next((p for p in (3, 2, 1) if predicted_stop(p) is not None and predicted_stop(p) > 25), None)
check(P is not None, "the evaluations of run 1 give patience something to stop (after step 25)", str(evals))
stop = predicted_stop(P)
pat = os.path.join(a.work, "patience")
r = run(pat, "--set", f"train.patience={P}")
m = re.search(r"early stop at step (\d+)", r.stdout)
check(m is not None and int(m.group(1)) == stop, f"train.patience={P} stops at step {stop}, as predicted", r.stdout)
check(attrs(os.path.join(pat, "model.h5"))["step"] == stop and os.path.exists(ckpt(pat, stop)) and
      os.path.exists(os.path.join(pat, "eval.yaml")),
      "the stopped run wrote the final checkpoint, model.h5 and eval.yaml at that step")
upto = [sv for sv in evals if sv[0] <= stop]
want_best = min(upto, key=lambda sv: (sv[1], sv[0]))[0]
check(attrs(os.path.join(pat, "best.h5"))["step"] == want_best and
      same(arrays(os.path.join(pat, "best.h5"), "params"), arrays(ckpt(full, want_best), "optim/ema")),
      f"its best.h5 is the uninterrupted run's best up to there (step {want_best})")
check(test_column(pat) == upto, "its test metrics are the uninterrupted run's up to the stop")
r2 = run(pat, "--set", f"train.patience={P}", "--resume", "auto")
check("no further training" in r2.stdout and attrs(os.path.join(pat, "model.h5"))["step"] == stop,
      "--resume auto after an early stop trains no further", r2.stdout)

# 5. Resumed from step 25 into a new directory: bit-identical outcome.
mid = os.path.join(a.work, "patience_resumed")
r = run(mid, "--set", f"train.patience={P}", "--resume", ckpt(pat, 25))
m = re.search(r"early stop at step (\d+)", r.stdout)
check(m is not None and int(m.group(1)) == stop, "resumed from step 25: stops at the same step", r.stdout)
check(re.search(r"resume: the best test -ELBO so far is [0-9.]+ at step 25, but \S+best\.h5 does not exist", r.stdout)
      is not None, "resumed into a new directory: the log says where the best model so far is", r.stdout)
for name in ("model.h5", "best.h5"):
    x, y = os.path.join(mid, name), os.path.join(pat, name)
    check(os.path.exists(x) and same(arrays(x, "params"), arrays(y, "params")) and
          same(arrays(x, "params_raw"), arrays(y, "params_raw")) and attrs(x)["step"] == attrs(y)["step"],
          f"resumed from step 25: {name} bit-identical (step {attrs(y)['step']})")
check([sv for sv in test_column(mid) if sv[0] > 25] == [sv for sv in upto if sv[0] > 25],
      "resumed from step 25: the same test metrics after the resume")

# 6. A checkpoint without the average, resumed with optim.ema set.
plain = os.path.join(a.work, "plain")
run(plain, "--set", "optim.ema=0", "--set", "train.max_steps=10", "--set", "eval.every=0")
with h5py.File(ckpt(plain, 10), "r") as f:
    check("ema" not in f["optim"], "optim.ema=0: the checkpoint holds no /optim/ema")
later = os.path.join(a.work, "plain_then_ema")
r = run(later, "--set", "train.max_steps=15", "--set", "eval.every=0", "--resume", ckpt(plain, 10))
check(f"holds no moving average of the parameters; optim.ema ({D}) starts from its parameters at step 10" in r.stdout,
      "resume without an average under optim.ema says where it starts", r.stdout)
check(f"optim.ema: 0 -> {D}" in r.stdout, "the change of optim.ema is logged as an accepted spec change", r.stdout)
check.finish()
