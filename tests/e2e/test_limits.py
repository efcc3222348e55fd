#!/usr/bin/env python3
"""Inputs that used to lose time or a run, through the real binary under mpirun: each
must be refused up front with a message naming the key, option or file (exit 2), and
long evaluations must show progress from their first pass.
  - train.epochs past int64 steps (trained 0 steps, exit 0), a batch or model too big for
    memory (std::bad_alloc), duplicate YAML keys (first silently won), an error inside a
    --set mapping (blamed on the file's line 1);
  - elbo eval --output into a missing directory (failed after the whole evaluation),
    --iw-samples 1e9 (silent for hours), IWAE progress within one input's k samples."""
import os, re, subprocess, sys, time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402

a = harness.parse_args(__doc__)
TRAIN, TEST = f"{a.data}/train", f"{a.data}/test"
checks = harness.Checks()


def run(np_, *args, timeout=120, env=None):
    cmd = ["mpirun", "-np", str(np_), a.elbo, *args]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        checks(False, f"HANG (> {timeout} s): {' '.join(cmd)}")
        return None
    r.seconds = time.time() - t0
    return r


def sets(out):
    return ["--set", "device=cpu", "--set", f"data.train={TRAIN}", "--set", f"data.test={TEST}",
            "--set", f"output.dir={out}", "--set", "data.max_samples=480"]


def expect_error(what, np_, args, pattern, absent=None, timeout=120, env=None):
    r = run(np_, *args, timeout=timeout, env=env)
    if r is None:
        return None
    ok = r.returncode == 2 and re.search(pattern, r.stderr) is not None and r.stderr.count("elbo: ") == 1
    if absent is not None:
        ok = ok and re.search(absent, r.stdout + r.stderr) is None
    checks(ok, f"{what} -> exit {r.returncode} in {r.seconds:.1f} s, message /{pattern}/",
           f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}")
    return r


# --- train: counts and sizes that cannot run ---
out = os.path.join(a.work, "o")
expect_error("train.epochs=2e17 overflows the step count", 2,
             ["train", a.spec, *sets(out + "1"), "--set", "train.epochs=200000000000000000"],
             r"--set train\.epochs=200000000000000000: train\.epochs: .*64-bit.*train\.max_steps")
checks(not os.path.exists(os.path.join(out + "1", "model.h5")), "no untrained model.h5 written")
expect_error("train.batch_size=1e9 does not fit in memory", 2,
             ["train", a.spec, *sets(out + "2"), "--set", "train.batch_size=1000000000"],
             r"needs about [\d.]+ TB of memory per rank but has .*activations for 500000000 rows per rank.*"
             r"train\.batch_size", absent="bad_alloc")
expect_error("model.encoder=[1e8] does not fit in memory", 1,
             ["train", a.spec, *sets(out + "3"), "--set", "model.encoder=[100000000]"],
             r"needs about .* of memory.*model\.encoder", absent="bad_alloc")

# --- the spec file and --set ---
os.makedirs(os.path.join(a.work, "specs"))
dup = os.path.join(a.work, "specs", "dup.yaml")
open(dup, "w").write(f"data:\n  train: {TRAIN}\ntrain:\n  epochs: 1\n  batch_size: 48\n  epochs: 30\n")
expect_error("duplicate key in the spec file", 2, ["train", dup], r"dup\.yaml:6: train\.epochs: duplicate key \(also on line 4\)")
expect_error("error inside a --set mapping names the --set", 2,
             ["train", a.spec, "--set", "train={batch_size: abc}"],
             r"--set train=\{batch_size: abc\}: train\.batch_size: must be an integer", absent=r"smoke\.yaml:1")

# --- eval ---
run_dir = os.path.join(a.work, "run")
r = run(2, "train", a.spec, *sets(run_dir), "--set", "train.epochs=1", "--set", "eval.at_end=false")
checks(r is not None and r.returncode == 0, "a small model trains", r.stderr if r is not None else "")
model = os.path.join(run_dir, "model.h5")
lines = {"ELBO_PROGRESS": "lines"}
expect_error("eval --output into a missing directory is refused before evaluating", 2,
             ["eval", model, "--data", TEST, "--iw-samples", "20", "--output", os.path.join(a.work, "nodir", "e.yaml")],
             r"--output .*nodir.*does not exist", absent=r"eval.*%", env=lines)
expect_error("eval --iw-samples 1e9 is refused with its estimated time", 2,
             ["eval", model, "--data", TEST, "--iw-samples", "1000000000"],
             r"--iw-samples: the IWAE bound with k = 1000000000 on 10000 samples .*estimated at [\d.]+ (years|days)"
             r".*--max-hours", timeout=60)
expect_error("eval refuses a bound over --max-hours", 1,
             ["eval", model, "--data", TEST, "--iw-samples", "50", "--max-hours", "1e-9"],
             r"estimated at .* over the limit .*raise --max-hours")
r = run(1, "eval", model, "--data", TEST, "--iw-samples", "2000", "--batch-size", "100", "--max-samples", "1",
        env=lines)
prog = [l for l in (r.stderr.splitlines() if r else []) if re.match(r"eval: +\d+% \d+/2000 ", l)]
checks(r is not None and r.returncode == 0 and len(prog) >= 9,
       f"IWAE progress moves within one input's 2000 samples ({len(prog)} lines)", r.stderr if r else "")
out_yaml = os.path.join(a.work, "e.yaml")
r = run(2, "eval", model, "--data", TEST, "--iw-samples", "5", "--output", out_yaml)
checks(r is not None and r.returncode == 0 and "iwae_nll" in open(out_yaml).read(), "eval --output writes its YAML")

checks.finish()
