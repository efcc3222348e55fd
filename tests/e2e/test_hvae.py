#!/usr/bin/env python3
"""A hierarchical VAE (model.type: hierarchical, harness.SMALL_HVAE_MODEL) end to end:
  1. elbo train on 2 ranks with periodic test evaluations: metrics.csv's kl_groups
     holds 3 groups per row that sum to the kl column, and the test columns are filled;
  2. elbo eval with the IWAE bound: eval.yaml's per-group KL sums to the KL, the group
     sizes to the latent values per sample, the bound lies below the -ELBO; 1 rank and
     2 ranks agree (data-parallel, eps keyed by the sample), and so does a batch size
     that cuts each input's importance samples into several passes;
  3. elbo sample and elbo reconstruct write their grids; elbo interpolate refuses the
     model with a message that says why;
  4. the config refuses loss.type iwae and loss.free_bits_group with a hierarchical model;
  5. free bits per latent group (loss.free_bits x the group's elements) clamp some groups;
  6. with the discretized logistic mixture likelihood: bits/dim in metrics.csv (after
     kl_groups) and in eval.yaml, nats / (784 ln 2)."""
import math
import os, subprocess, sys

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402

a = harness.parse_args(__doc__)
check = harness.Checks()
HV = ("--set", harness.SMALL_HVAE_MODEL)
out = os.path.join(a.work, "run")


def run(np_, *args, expect=0):
    r = subprocess.run(["mpirun", "-np", str(np_), a.elbo, *args], capture_output=True, text=True, timeout=600)
    if expect is not None and r.returncode != expect:
        sys.exit(f"{args[:2]}: exit {r.returncode}, expected {expect}:\n{r.stdout}\n{r.stderr}")
    return r


def train(out_dir, *extra, expect=0):
    return run(2, "train", a.spec, "--set", "device=cpu", "--set", f"data.train={a.data}/train",
               "--set", f"data.test={a.data}/test", "--set", "data.max_samples=960", "--set", "train.max_steps=40",
               "--set", "train.log_every=10", "--set", "eval.every=20", "--set", "eval.max_samples=96",
               "--set", "eval.at_end=false", "--set", f"output.dir={out_dir}", *HV, *extra, expect=expect)


# 1. Training.
train(out)
with open(os.path.join(out, "metrics.csv")) as f:
    lines = f.read().splitlines()
rows = [dict(zip(lines[0].split(","), l.split(","))) for l in lines[1:]]
groups = [[float(v) for v in r["kl_groups"].split(";")] for r in rows]
check(len(rows) == 4 and all(len(g) == 3 for g in groups), "metrics.csv: 4 rows with 3 groups' KL each", lines)
check(all(abs(sum(g) - float(r["kl"])) <= 1e-5 * float(r["kl"]) + 2e-6 for g, r in zip(groups, rows)),
      "metrics.csv: the groups' KL sums to the kl column", str([(sum(g), r["kl"]) for g, r in zip(groups, rows)]))
check(rows[1]["test_neg_elbo"] != "" and rows[0]["test_neg_elbo"] == "",
      "metrics.csv: a test -ELBO at step 20 (eval.every), none at step 10", str([r["test_neg_elbo"] for r in rows]))
model = os.path.join(out, "model.h5")

# 2. Evaluation.
def evaluate(np_, tag, *extra):
    path = os.path.join(a.work, tag + ".yaml")
    r = run(np_, "eval", model, "--data", f"{a.data}/test", "--max-samples", "150", "--iw-samples", "12",
            "--device", "cpu", "--output", path, *extra)
    with open(path) as f:
        return yaml.safe_load(f), r.stdout


e1, out1 = evaluate(1, "np1")
e2, _ = evaluate(2, "np2")
e3, _ = evaluate(1, "chunked", "--batch-size", "5")  # 5 of 12 samples per pass, one input at a time
check(len(e1["kl_groups"]) == 3 and e1["group_sizes"] == [98, 98, 392] and e1["latent"] == 588,
      "eval.yaml: 3 groups of 98, 98 and 392 elements, 588 latent values", str(e1))
check(abs(sum(e1["kl_groups"]) - e1["kl"]) <= 1e-5 * e1["kl"], "eval.yaml: kl_groups sums to kl", str(e1))
check(abs(e1["rec"] + e1["kl"] - e1["neg_elbo"]) <= 1e-5 * e1["neg_elbo"] and e1["kl"] > 0,
      "eval.yaml: neg_elbo = rec + kl, kl > 0", str(e1))
check(e1["iwae_nll"] < e1["neg_elbo"], "the IWAE(k=12) bound is tighter than the ELBO", str(e1))
check(e1["active_units"] == sum(e1["active_groups"]) and
      all(0 <= n <= s for n, s in zip(e1["active_groups"], e1["group_sizes"])),
      "eval.yaml: active units per group within the group's size, summing to active_units", str(e1))
check("KL per latent group" in out1, "elbo eval prints the per-group KL", out1)
for k in ("neg_elbo", "rec", "kl", "iwae_nll"):
    for other, what in ((e2, "2 ranks"), (e3, "batch size 5 (chunked importance samples)")):
        check(abs(other[k] - e1[k]) <= 1e-6 * abs(e1[k]), f"eval {k}: {what} == 1 rank", f"{other[k]} vs {e1[k]}")
check(all(abs(x - y) <= 1e-6 * max(abs(y), 1e-3) for x, y in zip(e2["kl_groups"], e1["kl_groups"])) and
      e2["active_groups"] == e1["active_groups"], "eval per-group KL and active units: 2 ranks == 1 rank")

# 3. Images.
png = b"\x89PNG\r\n\x1a\n"
for cmd, name in ((["sample", model, "-n", "16"], "samples.png"),
                  (["reconstruct", model, "--data", f"{a.data}/test", "-n", "8"], "recon.png")):
    path = os.path.join(a.work, name)
    run(1, *cmd, "--device", "cpu", "-o", path)
    with open(path, "rb") as f:
        check(f.read(8) == png, f"elbo {cmd[0]} writes a PNG")
r = run(1, "interpolate", model, "--data", f"{a.data}/test", "--device", "cpu", "-o",
        os.path.join(a.work, "interp.png"), expect=None)
check(r.returncode != 0 and "no single latent vector to interpolate" in r.stderr,
      "elbo interpolate refuses a hierarchical model, saying why", r.stderr)

# 4. What the config refuses.
r = train(os.path.join(a.work, "iw"), "--set", "loss.type=iwae", "--set", "loss.samples=3", expect=None)
check(r.returncode != 0 and "iwae training is built for mlp and conv models" in r.stderr,
      "loss.type iwae with a hierarchical model is refused", r.stderr)
r = train(os.path.join(a.work, "fbg"), "--set", "loss.free_bits=0.05", "--set", "loss.free_bits_group=2", expect=None)
check(r.returncode != 0 and "loss.free_bits_group" in r.stderr and "hierarchical" in r.stderr,
      "loss.free_bits_group with a hierarchical model is refused", r.stderr)

# 5. Free bits per latent group: floor = free_bits x the group's elements (98, 98, 392).
fb_dir = os.path.join(a.work, "fb")
r = train(fb_dir, "--set", "loss.free_bits=0.03")
with open(os.path.join(fb_dir, "metrics.csv")) as f:
    lines = f.read().splitlines()
fb_rows = [dict(zip(lines[0].split(","), l.split(","))) for l in lines[1:]]
clamped = [float(r_["kl_clamped_dims"]) for r_ in fb_rows]
check(all(0 <= c <= 588 for c in clamped) and any(c > 0 for c in clamped),
      "free bits: some groups clamped (kl_clamped_dims counts latent elements, at most 588)", str(clamped))
check("clamped" in r.stdout and "/588" in r.stdout, "the progress line shows clamped X/588", r.stdout)

# 6. The discretized logistic mixture (8-bit pixels): bits/dim beside the per-group KL.
dlm_dir = os.path.join(a.work, "dlm")
train(dlm_dir, "--set", "model.likelihood={type: discretized_logistic_mixture, components: 2}",
      "--set", "train.max_steps=20")
with open(os.path.join(dlm_dir, "metrics.csv")) as f:
    lines = f.read().splitlines()
check(lines[0].endswith(",neg_iwae,kl_groups,neg_elbo_bpd,test_neg_elbo_bpd"),
      "dlm: metrics.csv ends with kl_groups and the bits/dim columns", lines[0])
dlm_rows = [dict(zip(lines[0].split(","), l.split(","))) for l in lines[1:]]
check(all(len(r_["kl_groups"].split(";")) == 3 and
          abs(float(r_["neg_elbo_bpd"]) - float(r_["neg_elbo"]) / (784 * math.log(2))) < 2e-6 for r_ in dlm_rows),
      "dlm: each row has 3 groups' KL and neg_elbo_bpd = neg_elbo / (784 ln 2)", str(lines))
path = os.path.join(a.work, "dlm.yaml")
run(1, "eval", os.path.join(dlm_dir, "model.h5"), "--data", f"{a.data}/test", "--max-samples", "40",
    "--iw-samples", "3", "--device", "cpu", "--output", path)
with open(path) as f:
    ed = yaml.safe_load(f)
check(ed.get("dim") == 784 and abs(ed["neg_elbo_bpd"] - ed["neg_elbo"] / (784 * math.log(2))) < 1e-5 and
      abs(ed["iwae_bpd"] - ed["iwae_nll"] / (784 * math.log(2))) < 1e-5 and len(ed["kl_groups"]) == 3,
      "dlm: eval.yaml reports bits/dim and the per-group KL", str(ed))
check.finish()
