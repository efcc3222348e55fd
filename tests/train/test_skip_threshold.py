#!/usr/bin/env python3
"""train.skip_threshold against the logged gradient norms of the same run without it
(smoke spec, 30 steps, a row per step in metrics.csv):
  1. a threshold below every norm skips every step, with a warning naming the norm and
     the key, and ends the run after train.max_consecutive_skips with advice that names
     train.skip_threshold (train.on_nonfinite stays abort: the threshold is its own rule);
  2. a threshold between the norms: the rows before the first step whose norm (in the
     run without threshold) exceeds it are identical to that run, that step is the
     first skipped one (its warning repeats the norm), and thereafter exactly the
     steps whose norm exceeds the threshold are skipped (skipped_steps counts them);
  3. the same on 3 ranks skips the same steps and ends with the same parameters (1e-5);
  4. and so does it with the sharded optimizer (dist.shard_optimizer)."""
import os, re, subprocess, sys
import h5py, numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402

a = harness.parse_args(__doc__)
check = harness.Checks()
STEPS = 30


def run(np_, tag, *extra, expect=0):
    out = os.path.join(a.work, tag)
    cmd = ["mpirun", "-np", str(np_), a.elbo, "train", a.spec, "--set", "device=cpu",
           "--set", f"data.train={a.data}/train", "--set", "data.test=",
           "--set", "data.max_samples=960", "--set", f"train.max_steps={STEPS}",
           "--set", "train.batch_size=48", "--set", "train.log_every=1", "--set", "optim.grad_clip=0",
           "--set", f"output.dir={out}", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != expect:
        sys.exit(f"{tag}: exit {r.returncode}, expected {expect}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return out, r


def rows(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        lines = f.read().splitlines()
    head = lines[0].split(",")
    return [dict(zip(head, line.split(","))) for line in lines[1:]]


def skips(stdout):
    """step -> the norm its warning names, for steps skipped over the threshold."""
    return {int(s): float(n) for s, n in
            re.findall(r"warning: step (\d+): the gradient norm (\S+) exceeds train.skip_threshold \S+; skipping "
                       r"this step \(train.skip_threshold\)", stdout)}


def params(out):
    with h5py.File(os.path.join(out, "model.h5"), "r") as f:
        return {k: f["params"][k][...].astype(np.float64) for k in f["params"]}


base_dir, _ = run(1, "base")
base = rows(base_dir)
norms = [float(r["grad_norm"]) for r in base]
check(len(norms) == STEPS and all(r["skipped_steps"] == "0" for r in base), "the run without threshold logs "
      f"{STEPS} norms and skips nothing")

# 1. Below every norm: every step skipped, the run ends after 4 in a row.
low = min(norms) / 2
_, r = run(1, "low", "--set", f"train.skip_threshold={low}", "--set", "train.max_consecutive_skips=4", expect=1)
sk = skips(r.stdout)
check(sorted(sk) == [1, 2, 3], f"threshold {low:.4g} below every norm: steps 1-3 skipped with a warning "
      f"each ({sorted(sk)})", r.stdout[-2000:])
check(abs(sk.get(1, 0) - norms[0]) <= 1e-5 * norms[0], f"the first warning names step 1's norm ({sk.get(1)} vs "
      f"{norms[0]})")
check(re.search(r"step 4: the gradient norm \S+ exceeds train.skip_threshold \S+; 4 steps in a row skipped "
                r"\(train.max_consecutive_skips: 4\); the run is not learning: raise train.skip_threshold", r.stderr)
      is not None, "the 4th skip ends the run with advice naming train.max_consecutive_skips and "
      "train.skip_threshold", r.stderr[-1500:])

# 2. Between the norms: the middle of the largest gap around the median of steps 3..30.
later = sorted(norms[2:])
m = len(later) // 2
t = (later[m] + later[m + 1]) / 2
first = next(i for i, n in enumerate(norms) if n > t) + 1  # 1-based step
mid_dir, r = run(1, "mid", "--set", f"train.skip_threshold={t}", "--set", "train.max_consecutive_skips=1000",
                 "--set", "train.max_skip_fraction=1")
mid = rows(mid_dir)
sk = skips(r.stdout)
same_before = [(x["grad_norm"], x["neg_elbo"]) for x in mid[:first - 1]] == \
    [(x["grad_norm"], x["neg_elbo"]) for x in base[:first - 1]]
check(same_before, f"threshold {t:.5g}: steps 1-{first - 1} identical to the run without threshold")
check(min(sk, default=0) == first and abs(sk[first] - norms[first - 1]) <= 1e-5 * norms[first - 1],
      f"the first skipped step is step {first}, the first whose norm ({norms[first - 1]:.5g}) exceeds it "
      f"(skipped: {sorted(sk)})")
applied = {int(x["step"]): float(x["grad_norm"]) for x in mid if x["grad_norm"]}
check(len(sk) + len(applied) == STEPS and not set(sk) & set(applied),
      f"every step either applied ({len(applied)}) or skipped ({len(sk)})")
check(all(n > t * (1 - 1e-6) for n in sk.values()) and all(n <= t * (1 + 1e-6) for n in applied.values()),
      "exactly the steps whose norm exceeds the threshold are skipped (to the 6 digits logged)")
check(0 < len(sk) < STEPS and mid[-1]["skipped_steps"] == str(len(sk)),
      f"metrics.csv counts the {len(sk)} skipped steps", str(mid[-1]))
check([int(x["skipped_steps"]) for x in mid] == [sum(1 for s in sk if s <= int(x["step"])) for x in mid],
      "skipped_steps rises at exactly the skipped steps")

# 3. Three ranks: the same decisions, the same parameters.
np3_dir, r3 = run(3, "mid_np3", "--set", f"train.skip_threshold={t}", "--set", "train.max_consecutive_skips=1000",
                  "--set", "train.max_skip_fraction=1")
sk3 = skips(r3.stdout)
check(sorted(sk3) == sorted(sk), f"np=3 skips the same steps as np=1 ({sorted(sk3)} vs {sorted(sk)})")
p1, p3 = params(mid_dir), params(np3_dir)
err = max(np.linalg.norm(p3[k] - p1[k]) / max(np.linalg.norm(p1[k]), 1e-30) for k in p1)
check(err < 1e-5, f"np=3 vs np=1 with the threshold: worst per-tensor relative error {err:.3e}")
# 4. Three ranks with the sharded optimizer (the norm summed from the slices).
zero_dir, rz = run(3, "mid_np3_sharded", "--set", f"train.skip_threshold={t}", "--set", "train.max_consecutive_skips=1000",
                   "--set", "train.max_skip_fraction=1", "--set", "dist.shard_optimizer=true")
skz = skips(rz.stdout)
pz = params(zero_dir)
err = max(np.linalg.norm(pz[k] - p1[k]) / max(np.linalg.norm(p1[k]), 1e-30) for k in p1)
check(sorted(skz) == sorted(sk) and err < 1e-5, f"np=3 with dist.shard_optimizer skips the same steps "
      f"({sorted(skz)}) and ends within 1e-5 ({err:.3e})")
check.finish()
