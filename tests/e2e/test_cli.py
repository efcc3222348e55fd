#!/usr/bin/env python3
"""End-to-end checks of the `elbo` command under mpirun: a short training run from
spec to model file to evaluation, evaluation invariance to the world size, and one
clear error (on rank 0, non-zero exit on every rank, no hang, nothing overwritten)
for each kind of bad input; and the command line itself: every command's --help,
values refused naming their option, and what no option or argument takes."""
import hashlib, os, re, shutil, subprocess, sys
import h5py, numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402

a = harness.parse_args(__doc__)
TRAIN, TEST = f"{a.data}/train", f"{a.data}/test"
checks = harness.Checks()


def run(np_, *args, timeout=300):
    cmd = ["mpirun", "-np", str(np_), a.elbo, *args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        checks(False, f"HANG: {' '.join(cmd)}")
        return None
    return r


def check(cond, what, r=None):
    checks(cond, what, f"--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}" if r is not None else "")


def base_sets(out):
    return ["--set", "device=cpu", "--set", f"data.train={TRAIN}", "--set", f"data.test={TEST}",
            "--set", f"output.dir={out}"]


# --- 1. train on 2 ranks: outputs, progress lines, model layout, evaluation ---
run_dir = os.path.join(a.work, "run")
r = run(2, "train", a.spec, *base_sets(run_dir), "--set", "data.max_samples=960", "--set", "train.epochs=2")
check(r is not None and r.returncode == 0, "train smoke spec on 2 ranks exits 0", r)
if r is not None and r.returncode == 0:
    for f in ("spec.yaml", "metrics.csv", "model.h5", "eval.yaml"):
        check(os.path.exists(os.path.join(run_dir, f)), f"train wrote {f}")
    lines = [l for l in r.stdout.splitlines() if l.startswith("epoch ")]
    check(len(lines) >= 2, "progress lines printed (once, by rank 0)", r)
    check(all(re.search(r"-elbo [\d.]+ \(rec [\d.]+, kl [\d.]+\).*lr .*samples/s.*eta", l) for l in lines),
          "progress line has ELBO, rec, KL, lr, samples/s, ETA", r)
    check(r.stdout.count("resolved spec:") == 1, "resolved spec printed once", r)
    rows = open(os.path.join(run_dir, "metrics.csv")).read().splitlines()
    check(rows[0].startswith("step,epoch,samples,neg_elbo,rec,kl"), "metrics.csv header")
    vals = [float(x.split(",")[3]) for x in rows[1:]]
    check(len(vals) >= 2 and vals[-1] < vals[0], f"training lowers -ELBO ({vals[0]:.1f} -> {vals[-1]:.1f})")
    with h5py.File(os.path.join(run_dir, "model.h5"), "r") as f:
        p = f["params"]
        check(p["encoder.layers.0.weight"].shape == (64, 784), "encoder.layers.0.weight is (out, in) = (64, 784)")
        check(p["encoder.mu.weight"].shape == (8, 64) and p["encoder.logvar.bias"].shape == (8,), "mu/logvar heads")
        check(p["decoder.out.weight"].shape == (784, 64) and p["decoder.out.bias"].shape == (784,), "decoder.out")
        check(f.attrs["step"] == 40 and b"smoke" in f.attrs["spec"].encode(), "model attrs: step 40 and spec")
    ev = dict(l.split(": ", 1) for l in open(os.path.join(run_dir, "eval.yaml")).read().splitlines())
    check(int(ev["samples"]) == 10000 and 50 < float(ev["neg_elbo"]) < 600, f"eval.yaml: {ev.get('neg_elbo')}")
    check(float(ev["iwae_nll"]) <= float(ev["neg_elbo"]) + 1e-3, "IWAE bound is at least as tight as the ELBO")

    # --- 2. elbo eval: same numbers on 1 and 3 ranks; IWAE tighter with more samples ---
    model = os.path.join(run_dir, "model.h5")
    def evaluate(np_, k):
        r = run(np_, "eval", model, "--data", TEST, "--iw-samples", str(k), "--batch-size", "333")
        check(r is not None and r.returncode == 0, f"eval np={np_} k={k} exits 0", r)
        m = re.search(r"test -ELBO ([\d.]+) nats.*IWAE\(k=\d+\) NLL ([\d.]+) nats \| active units \d+/8 \| 10000 samples", r.stdout)
        check(m is not None, f"eval np={np_} prints the bounds", r)
        return (float(m.group(1)), float(m.group(2))) if m else (np.nan, np.nan)
    e1, i1 = evaluate(1, 5)
    e3, i3 = evaluate(3, 5)
    check(abs(e1 - e3) < 1e-4 * e1 and abs(i1 - i3) < 1e-4 * i1, f"eval independent of ranks ({e1} vs {e3})")
    _, i20 = evaluate(2, 20)
    check(i20 <= i1 + 0.05, f"IWAE NLL with k=20 ({i20:.3f}) <= k=5 ({i1:.3f})")
    check(i1 <= e1, "IWAE(k=5) NLL <= -ELBO")

# --- 2b. the other model/optimizer options train end to end (1 rank) ---
opt_dir = os.path.join(a.work, "options")
r = run(1, "train", a.spec, *base_sets(opt_dir), "--set", "data.max_samples=960", "--set", "train.epochs=3",
        "--set", "model.activation=tanh", "--set", "model.likelihood={type: gaussian, variance: learned}",
        "--set", "data.binarize=true", "--set", "optim.type=adamw", "--set", "optim.schedule=cosine",
        "--set", "optim.warmup_steps=5", "--set", "loss.kl_warmup_steps=50", "--set", "model.encoder=[32, 16]",
        "--set", "eval.iw_samples=0", "--set", "train.log_every=20")
check(r is not None and r.returncode == 0, "gaussian-learned/tanh/binarized/AdamW/cosine run exits 0", r)
if r is not None and r.returncode == 0:
    rows = open(os.path.join(opt_dir, "metrics.csv")).read().splitlines()[1:]
    betas = [float(x.split(",")[6]) for x in rows]
    lrs = [float(x.split(",")[7]) for x in rows]
    vals = [float(x.split(",")[3]) for x in rows]
    check(betas[0] < 1.0 and betas[-1] == 1.0, f"KL warm-up ramps beta to 1 ({betas[0]} -> {betas[-1]})")
    check(lrs[-1] < lrs[1], f"cosine schedule decays the learning rate ({lrs[1]:.2e} -> {lrs[-1]:.2e})")
    check(vals[-1] < vals[0], f"Gaussian VAE lowers -ELBO ({vals[0]:.1f} -> {vals[-1]:.1f})")
    with h5py.File(os.path.join(opt_dir, "model.h5"), "r") as f:
        check(f["params"]["decoder.logvar.weight"].shape == (784, 64), "learned variance head exported")
        check(f["params"]["encoder.layers.1.weight"].shape == (16, 32), "two encoder layers exported")
    ev = dict(l.split(": ", 1) for l in open(os.path.join(opt_dir, "eval.yaml")).read().splitlines())
    check("iwae_nll" not in ev, "no IWAE bound when eval.iw_samples=0")

# --- 3. bad input: one clear message, non-zero exit, no hang, nothing overwritten ---
def expect_error(what, args, pattern, np_=2, code=None):
    r = run(np_, *args, timeout=120)
    if r is None:
        return
    ok = r.returncode != 0 and re.search(pattern, r.stderr) is not None
    if code is not None:
        ok = ok and r.returncode == code
    # Printed once for the job, not once per rank.
    ok = ok and r.stderr.count("elbo: ") == 1
    check(ok, f"bad input: {what} -> exit {r.returncode}, message /{pattern}/", r)

bad = os.path.join(a.work, "bad")
os.makedirs(bad)
def write(name, text):
    p = os.path.join(bad, name)
    open(p, "w").write(text)
    return p

expect_error("missing spec", ["train", os.path.join(bad, "nope.yaml")], r"nope\.yaml: cannot open", code=2)
expect_error("malformed YAML", ["train", write("broken.yaml", "data:\n  train: [x\n")],
             r"broken\.yaml:\d+: invalid YAML", code=2)
expect_error("unknown key", ["train", write("typo.yaml", f"data:\n  train: {TRAIN}\nmodel:\n  latnet: 4\n")],
             r"typo\.yaml:4: model\.latnet: unknown key", code=2)
expect_error("latent size 0", ["train", a.spec, "--set", "model.latent=0"], r"model\.latent: must be >= 1", code=2)
expect_error("batch not divisible by world size",
             ["train", a.spec, *base_sets(os.path.join(bad, "o1")), "--set", "train.batch_size=49"],
             r"train\.batch_size: 49 is not divisible by the number of ranks \(2\)", code=2)
expect_error("missing data directory",
             ["train", a.spec, *base_sets(os.path.join(bad, "o2")), "--set", f"data.train={bad}/nodata"],
             r"nodata")
expect_error("shard shape does not match the spec",
             ["train", a.spec, *base_sets(os.path.join(bad, "o3")), "--set", "data.shape=[1, 32, 32]"],
             r"shape \[1, 28, 28\].*data\.shape.*\[1, 32, 32\]")
expect_error("unknown option", ["train", a.spec, "--sett", "x=1"], r"unknown option '--sett'", code=2)
expect_error("unknown command", ["trian"], r"unknown command 'trian'", code=2)
expect_error("eval: missing model", ["eval", os.path.join(bad, "none.h5"), "--data", TEST], r"none\.h5")
expect_error("eval: corrupt model", ["eval", write("junk.h5", "this is not HDF5"), "--data", TEST], r"junk\.h5")
expect_error("eval: missing --data", ["eval", write("x.h5", "")], r"--data is required", code=2)
expect_error("eval: bad --iw-samples", ["eval", "m.h5", "--data", TEST, "--iw-samples", "ten"],
             r"--iw-samples expects an integer", code=2)

# --- 4. the command line itself (CLI11): help, validated values, what nothing takes ---
# Each command's --help: exit 0, printed once (rank 0), naming the command and its options.
options = {"train": ["SPEC", "--set", "--resume"],
           "eval": ["MODEL", "--data", "--iw-samples", "--batch-size", "--max-samples", "--seed", "--threads",
                    "--device", "--output", "--loader", "--cache-mb", "--max-hours"],
           "sample": ["MODEL", "-o", "--force", "--cols", "--device", "--threads", "-n", "--seed"],
           "reconstruct": ["MODEL", "--data", "-o", "--force", "-n", "--first"],
           "interpolate": ["MODEL", "--data", "-o", "--from", "--to", "--steps"],
           "info": []}
for cmd, names in options.items():
    r = run(2, cmd, "--help", timeout=120)
    if r is None:
        continue
    listed = [n for n in names if re.search(rf"^\s+{re.escape(n)}\b", r.stdout, re.M)]
    check(r.returncode == 0 and r.stdout.count(f"Usage: elbo {cmd} ") == 1 and listed == names and "elbo: " not in r.stderr,
          f"elbo {cmd} --help: exit 0, once, lists {' '.join(names) or 'no options'} (exit {r.returncode})", r)
r = run(1, "--help")
check(r is not None and r.returncode == 0 and all(c in r.stdout for c in options), "elbo --help lists every command", r)
r = run(1, "--version")
check(r is not None and r.returncode == 0 and r.stdout.strip() == "elbo 0.1.0", "elbo --version", r)
r = run(1)
check(r is not None and r.returncode == 2 and "Usage: elbo" in r.stderr, "a bare `elbo` shows the usage, exit 2", r)

# Unknown options, missing and extra arguments, and refused values: exit 2, named, once.
expect_error("eval: unknown option with a value", ["eval", "m.h5", "--data", TEST, "--bogus=3"],
             r"elbo eval: unknown option '--bogus' \(see --help\)", code=2)
expect_error("sample: unknown short option", ["sample", "m.h5", "-x"], r"elbo sample: unknown option '-x'", code=2)
expect_error("unknown option before the command", ["--sett", "info"], r"unknown option '--sett'", code=2)
expect_error("train: missing spec", ["train"], r"elbo train: missing SPEC", code=2)
expect_error("train: an extra argument", ["train", a.spec, "other.yaml"],
             r"elbo train: unexpected argument 'other\.yaml'", code=2)
expect_error("info: an extra argument", ["info", "now"], r"elbo info: unexpected argument 'now'", code=2)
expect_error("eval: --data without its value", ["eval", "m.h5", "--data"], r"elbo eval: --data.*missing", code=2)
expect_error("eval: --device not a choice", ["eval", "m.h5", "--data", TEST, "--device", "gpu"],
             r"elbo eval: option --device must be one of auto, cpu, cuda \(got 'gpu'\)", code=2)
expect_error("eval: --loader not a choice", ["eval", "m.h5", "--data", TEST, "--loader", "disk"],
             r"option --loader must be one of auto, memory, stream \(got 'disk'\)", code=2)
expect_error("eval: --iw-samples beyond an int", ["eval", "m.h5", "--data", TEST, "--iw-samples", "3000000000"],
             r"option --iw-samples must be <= 2147483647 \(got 3000000000\)", code=2)
expect_error("eval: --cache-mb not a number", ["eval", "m.h5", "--data", TEST, "--cache-mb", "nan"],
             r"option --cache-mb expects a number, got 'nan'", code=2)
expect_error("eval: --max-hours negative", ["eval", "m.h5", "--data", TEST, "--max-hours", "-1"],
             r"option --max-hours must be >= 0 \(got -1\)", code=2)
expect_error("sample: -n 0", ["sample", "m.h5", "-n", "0"], r"elbo sample: option -n must be >= 1 \(got 0\)", code=2)
expect_error("sample: --device not a choice", ["sample", "m.h5", "--device", "tpu"],
             r"elbo sample: option --device must be one of auto, cpu, cuda \(got 'tpu'\)", code=2)
expect_error("interpolate: --steps 1", ["interpolate", "m.h5", "--data", TEST, "--steps", "1"],
             r"elbo interpolate: option --steps must be >= 2 \(got 1\)", code=2)
expect_error("reconstruct: --first not an integer", ["reconstruct", "m.h5", "--data", TEST, "--first", "1.5"],
             r"elbo reconstruct: option --first expects an integer, got '1\.5'", code=2)

if os.path.exists(os.path.join(run_dir, "model.h5")):
    model = os.path.join(run_dir, "model.h5")
    # Integers are decimal ("-n 010" is ten, not octal eight), and a repeated option
    # keeps its last value, as job scripts that append to a command line expect.
    grid = os.path.join(a.work, "ten.png")
    r = run(1, "sample", model, "-n", "3", "-n", "010", "--seed", "4", "-o", grid)
    check(r is not None and r.returncode == 0 and f"wrote {grid}: 10 samples" in r.stdout,
          "sample -n 3 -n 010: ten samples (decimal, the last value)", r)
    digest = hashlib.sha256(open(model, "rb").read()).hexdigest()
    expect_error("existing run in output.dir", ["train", a.spec, *base_sets(run_dir)], r"already holds a run", code=2)
    check(hashlib.sha256(open(model, "rb").read()).hexdigest() == digest, "earlier model.h5 left untouched")
    # A shard corrupted on disk: copy the split, truncate one shard file.
    broken = os.path.join(bad, "broken_train")
    shutil.copytree(TRAIN, broken)
    shard = sorted(f for f in os.listdir(broken) if f.endswith(".h5"))[1]
    with open(os.path.join(broken, shard), "r+b") as f:
        f.truncate(1000)
    expect_error("truncated shard", ["train", a.spec, *base_sets(os.path.join(bad, "o4")),
                                     "--set", f"data.train={broken}"], re.escape(shard))

checks.finish()
