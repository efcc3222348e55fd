#!/usr/bin/env python3
"""What users look at, checked against an independent NumPy forward pass of the
trained model (parameters read from model.h5 with h5py, inputs from the shards):
  1. elbo sample: tile k is E[x|z_k] with z_k drawn by Philox (re-implemented here)
     for (seed, stream Sample, item k); same seed -> same PNG, other seed -> other;
  2. elbo reconstruct: input tiles are the shard's pixels exactly, reconstruction
     tiles are sigmoid(decoder(mu(x))) to within one grey level;
  3. elbo interpolate: the ends are the two inputs, the points between are decoded
     from the straight line between mu(A) and mu(B);
  4. elbo eval: active units (Var_x mu_j(x) > 0.01) match NumPy's count; kl_per_dim
     (eval.yaml and the printed line) matches NumPy's per-dimension KL and sums to kl; the
     chunked IWAE bound does not depend on the batch size or the number of ranks;
     progress lines appear on stderr when it is not a terminal;
  5. bad input: a missing model, an index past the split, an unwritable path;
  6. evaluation during training (eval.every): test columns in metrics.csv exactly at
     those steps, sample and reconstruction grids per evaluation and at the end,
     training itself unperturbed (bit-identical parameters with and without), the
     loss-curve plot (launch/plot_run.py), and eval.every without data.test refused."""
import csv, os, re, subprocess, sys
import h5py, numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402

a = harness.parse_args(__doc__)
check = harness.Checks()
out = os.path.join(a.work, "run")
TEST = f"{a.data}/test"


def elbo(*args, np_=1, expect=0):
    r = subprocess.run(["mpirun", "-np", str(np_), a.elbo, *args], capture_output=True, text=True, timeout=300)
    if expect is not None and r.returncode != expect:
        sys.exit(f"elbo {' '.join(args)}: exit {r.returncode}, expected {expect}:\n{r.stdout}\n{r.stderr}")
    return r


elbo("train", a.spec, "--set", "device=cpu", "--set", f"data.train={a.data}/train", "--set", "data.test=",
     "--set", "train.epochs=8", "--set", "model.latent=32", "--set", "loss.beta=6", "--set", f"output.dir={out}",
     np_=2)  # a wide latent under a heavy KL: most units stay active, some collapse
model = os.path.join(out, "model.h5")
with h5py.File(model, "r") as f:
    P = {k: f["params"][k][...].astype(np.float64) for k in f["params"]}
n_enc = len([k for k in P if k.startswith("encoder.layers.") and k.endswith(".weight")])
n_dec = len([k for k in P if k.startswith("decoder.layers.") and k.endswith(".weight")])


def lin(h, name):
    return h @ P[name + ".weight"].T + P[name + ".bias"]


def encode(x, head="encoder.mu"):
    h = x
    for i in range(n_enc):
        h = np.maximum(lin(h, f"encoder.layers.{i}"), 0)
    return lin(h, head)


def decode(z):
    h = z
    for i in range(n_dec):
        h = np.maximum(lin(h, f"decoder.layers.{i}"), 0)
    return 1 / (1 + np.exp(-lin(h, "decoder.out")))


def test_pixels(items):
    rows = []
    for name in sorted(os.listdir(TEST)):
        if name.endswith(".h5"):
            with h5py.File(os.path.join(TEST, name), "r") as f:
                rows.append(f["images"][...])
    return np.concatenate(rows)[items].reshape(len(items), -1)


def tiles(path, n, cols, pad=2, size=28):
    img = np.asarray(Image.open(path))
    rows = (n + cols - 1) // cols
    assert img.shape == (rows * size + (rows + 1) * pad, cols * size + (cols + 1) * pad), img.shape
    return [img[pad + (k // cols) * (size + pad):][:size, pad + (k % cols) * (size + pad):][:, :size].reshape(-1)
            for k in range(n)]


def grey(v):
    return np.round(np.clip(v, 0, 1) * 255)


# Philox4x32-10 and Box-Muller as in src/elbo/util/philox.hpp, for z ~ N(0, I).
M32 = 0xFFFFFFFF


def philox(c, key):
    c0, c1, c2, c3 = c
    k0, k1 = key & M32, key >> 32
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def prior_z(seed, item, L, stream=6):
    z = []
    for j in range(L):
        v = philox((j // 4, item, 0, stream), seed)
        pair = (j % 4) // 2
        u1, u2 = (v[2 * pair] + 1.0) / 2**32, (v[2 * pair + 1] + 1.0) / 2**32
        rad, ang = np.sqrt(-2 * np.log(u1)), 2 * np.pi * u2
        z.append(rad * np.cos(ang) if j % 2 == 0 else rad * np.sin(ang))
    return np.array(z)


L = P["encoder.mu.bias"].shape[0]

# 1. Samples.
s1, s2, s3 = (os.path.join(a.work, f) for f in ("s1.png", "s2.png", "s3.png"))
r = elbo("sample", model, "-n", "12", "--cols", "4", "--seed", "9", "-o", s1)
check(f"wrote {s1}: 12 samples" in r.stdout, "sample reports what it wrote", r.stdout)
elbo("sample", model, "-n", "12", "--cols", "4", "--seed", "9", "-o", s2)
elbo("sample", model, "-n", "12", "--cols", "4", "--seed", "10", "-o", s3)
t1 = tiles(s1, 12, 4)
ref = [grey(decode(prior_z(9, k, L))) for k in range(12)]
err = max(np.abs(t.astype(float) - q).max() for t, q in zip(t1, ref))
check(err <= 1, f"samples: each tile is E[x|z] for Philox z (seed 9, item k), within {err:.0f} grey level(s) (<= 1)")
check(np.array_equal(np.asarray(Image.open(s1)), np.asarray(Image.open(s2))), "same seed, same PNG")
check(not np.array_equal(np.asarray(Image.open(s1)), np.asarray(Image.open(s3))), "another seed, other samples")

# 2. Reconstructions: rows of 5 inputs, each followed by a row of their reconstructions.
rp = os.path.join(a.work, "recon.png")
elbo("reconstruct", model, "--data", TEST, "-n", "10", "--first", "5", "--cols", "5", "-o", rp)
t = tiles(rp, 20, 5)
x = test_pixels(list(range(5, 15)))
inputs = t[0:5] + t[10:15]
recons = t[5:10] + t[15:20]
check(all(np.array_equal(i, xi) for i, xi in zip(inputs, x)), "reconstruct: input tiles are the shard's pixels exactly")
rec_ref = grey(decode(encode(x / 255.0)))
err = max(np.abs(rt.astype(float) - q).max() for rt, q in zip(recons, rec_ref))
check(err <= 1, f"reconstruct: tiles are sigmoid(decoder(mu(x))) within {err:.0f} grey level(s) (<= 1)")

# 3. Interpolation from item 3 to item 7 in 6 points.
ip = os.path.join(a.work, "interp.png")
elbo("interpolate", model, "--data", TEST, "--from", "3", "--to", "7", "--steps", "6", "-o", ip)
t = tiles(ip, 8, 8)
x = test_pixels([3, 7])
mu = encode(x / 255.0)
line = [grey(decode(mu[0] + s / 5 * (mu[1] - mu[0]))) for s in range(6)]
check(np.array_equal(t[0], x[0]) and np.array_equal(t[7], x[1]), "interpolate: the ends are the two inputs")
err = max(np.abs(t[1 + s].astype(float) - line[s]).max() for s in range(6))
check(err <= 1, f"interpolate: decoded points on the line mu(A) -> mu(B) within {err:.0f} grey level(s)")

# 4. eval: active units, and the chunked IWAE bound at other batch sizes and world sizes.
r1 = elbo("eval", model, "--data", TEST, "--iw-samples", "20", "--batch-size", "500")
r2 = elbo("eval", model, "--data", TEST, "--iw-samples", "20", "--batch-size", "7", np_=2)
mus = encode(test_pixels(list(range(10000))) / 255.0)
var = mus.var(axis=0)
active = int((var > 0.01).sum())
# float32 (elbo) and float64 (here) may disagree only on a unit within 1% of the threshold.
sure_on, sure_off = int((var > 0.0101).sum()), int((var < 0.0099).sum())
check(0 < active < L, f"the model has active and inactive units ({active}/{L}), so the count can be wrong")
m1 = re.search(r"IWAE\(k=20\) NLL ([\d.]+) nats \| active units (\d+)/(\d+)", r1.stdout)
m2 = re.search(r"IWAE\(k=20\) NLL ([\d.]+) nats \| active units (\d+)/(\d+)", r2.stdout)
check(m1 is not None and m2 is not None, "eval prints the IWAE bound and the active units", r1.stdout + r2.stdout)
if m1 and m2:
    got = int(m1.group(2))
    check(sure_on <= got <= L - sure_off and int(m1.group(3)) == L,
          f"active units {got}/{m1.group(3)} == NumPy's count {active}/{L} "
          f"(variances {np.round(np.sort(var), 4).tolist()})")
    a1, a2 = float(m1.group(1)), float(m2.group(1))
    check(abs(a1 - a2) <= 1e-3, f"IWAE k=20: 1 rank, 25 chunks of 20 per pass ({a1}) == 2 ranks, 1 input per pass "
                                f"({a2})")
check("eval: 100%" in r1.stderr and "eval:  50%" in r1.stderr, "progress lines on stderr (not a terminal)",
      r1.stderr[-800:])
# kl_per_dim: the closed-form KL of each latent dimension, mean over the samples (2 ranks).
kl_yaml = os.path.join(a.work, "eval_kl.yaml")
rk = elbo("eval", model, "--data", TEST, "--max-samples", "2000", "--output", kl_yaml, np_=2)
with open(kl_yaml) as f:
    ev = {k.strip(): v.strip() for k, v in (l.split(":", 1) for l in f if ":" in l)}
kl_dims = [float(v) for v in ev.get("kl_per_dim", "[]").strip("[]").split(",") if v.strip()]
x2k = test_pixels(list(range(2000))) / 255.0
mu2k, lv2k = encode(x2k), encode(x2k, "encoder.logvar")
want = (-0.5 * (1 + lv2k - mu2k ** 2 - np.exp(lv2k))).mean(axis=0)
check(len(kl_dims) == L and np.allclose(kl_dims, want, rtol=1e-4, atol=1e-5),
      f"eval.yaml kl_per_dim {np.round(kl_dims, 4).tolist()} == NumPy's per-dimension KL {np.round(want, 4).tolist()}")
check(abs(sum(kl_dims) - float(ev["kl"])) <= 1e-4 * abs(float(ev["kl"])) + 1e-5,
      f"kl_per_dim sums to kl ({sum(kl_dims):.6f} vs {ev['kl']})")
check(max(kl_dims) > 10 * min(kl_dims), "some dimensions carry much more KL than others (collapsed units show)")
m = re.search(r"KL per latent dimension \(nats\):((?: [\d.]+)+)", rk.stdout)
check(m is not None and len(m.group(1).split()) == L, "elbo eval prints the KL per latent dimension", rk.stdout)
r3 = elbo("eval", model, "--data", TEST, "--iw-samples", "5", "--max-samples", "300")
check(re.search(r"\| active units \d+/\d+ \| 300 samples", r3.stdout) is not None,
      "eval --max-samples 300 evaluates the first 300 test samples", r3.stdout)

# 5. Bad input.
r = elbo("sample", os.path.join(a.work, "missing.h5"), expect=None)
check(r.returncode != 0 and "missing.h5" in r.stderr, "a missing model file is named", r.stderr[-500:])
r = elbo("reconstruct", model, "--data", TEST, "--first", "9999", "-n", "2", expect=None)
check(r.returncode == 2 and "there is no sample 10000" in r.stderr, "an index past the split is a usage error naming "
      "it", r.stderr[-500:])
r = elbo("sample", model, "-o", os.path.join(a.work, "no", "such", "dir.png"), expect=None)
check(r.returncode != 0 and "dir.png" in r.stderr, "an unwritable output path is named", r.stderr[-500:])

# 6. Evaluation during training.
def train(name, *extra, expect=0):
    d = os.path.join(a.work, name)
    r = elbo("train", a.spec, "--set", "device=cpu", "--set", f"data.train={a.data}/train", "--set", f"data.test={TEST}",
             "--set", "eval.iw_samples=0", "--set", "train.epochs=3", "--set", f"output.dir={d}", *extra, np_=2,
             expect=expect)
    return d, r


plain, _ = train("plain", "--set", "eval.images=false")
ev, r = train("every", "--set", "eval.every=40", "--set", "eval.max_samples=500")
with h5py.File(os.path.join(plain, "model.h5")) as f, h5py.File(os.path.join(ev, "model.h5")) as g:
    same = all(np.array_equal(f["params"][k][...], g["params"][k][...]) for k in f["params"])
check(same, "evaluating every 40 steps leaves training bit-identical")
rows = list(csv.DictReader(open(os.path.join(ev, "metrics.csv"))))
tested = [int(x["step"]) for x in rows if x["test_neg_elbo"]]
check(tested == [40, 80, 120], f"metrics.csv has test metrics at steps 40, 80, 120 of 150 ({tested})")
check(all(abs(float(x["test_neg_elbo"]) - float(x["test_rec"]) - float(x["test_kl"])) < 1e-3 for x in rows
          if x["test_neg_elbo"]), "test -ELBO = test rec + test KL in every evaluated row")
check(re.search(r"eval at step 40: test -ELBO [\d.]+ .*\| 500 samples", r.stdout) is not None,
      "the log reports each evaluation on eval.max_samples test samples", r.stdout[-2000:])
pngs = sorted(os.listdir(os.path.join(ev, "images")))
want = [f"{k}-{s:09d}.png" for s in (40, 80, 120) for k in ("recon", "samples")]
check(pngs == sorted(want), f"a sample grid and a reconstruction grid per evaluation ({pngs})")
check(np.asarray(Image.open(os.path.join(ev, "samples.png"))).shape == (8 * 30 + 2, 8 * 30 + 2) and
      np.asarray(Image.open(os.path.join(ev, "recon.png"))).shape == (8 * 30 + 2, 8 * 30 + 2),
      "final samples.png (8 x 8) and recon.png (4 input rows + 4 reconstruction rows) in the run directory")
check(not os.path.exists(os.path.join(plain, "samples.png")), "eval.images=false writes no pictures")
pr = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "launch",
                                                  "plot_run.py"), ev], capture_output=True, text=True)
curves = os.path.join(ev, "curves.png")
check(pr.returncode == 0 and os.path.exists(curves) and Image.open(curves).size[0] > 500,
      "launch/plot_run.py draws the loss curves", pr.stdout + pr.stderr)
_, r = train("no_test", "--set", "data.test=", "--set", "eval.every=10", expect=2)
check("eval.every" in r.stderr and "data.test" in r.stderr, "eval.every without data.test: a config error naming both",
      r.stderr[-500:])

check.finish()
