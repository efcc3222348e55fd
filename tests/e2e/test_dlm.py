#!/usr/bin/env python3
"""The discretized logistic mixture end to end: an MLP VAE with this likelihood trained
by `elbo train` on Fashion-MNIST (the loss falls, the bound beats the uniform 8
bits/dim), then `elbo eval` with the IWAE bound: the printed bits/dim and eval.yaml's
neg_elbo_bpd / iwae_bpd are nats / (D ln 2) with D = 784; the training run's eval.yaml
and log say the same. Then configs/rgb64_dlm.yaml takes a few steps on a tiny folder of
64 x 64 RGB images sharded by elbo-shard, and is evaluated the same way (D = 12288); so is
every other --rgb-spec given (configs/rgb64_hvae.yaml, the hierarchical one)."""
import csv, math, os, re, subprocess, sys

import h5py, numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402

a = harness.parse_args(__doc__, lambda ap: (ap.add_argument("--elbo-shard", required=True),
                                            ap.add_argument("--rgb-spec", required=True, nargs="+",
                                                            help="configs/rgb64_dlm.yaml, rgb64_hvae.yaml")))
TRAIN, TEST = f"{a.data}/train", f"{a.data}/test"
ENV = dict(os.environ, ELBO_PROGRESS="off")
checks = harness.Checks()


def run(*args, timeout=600):
    r = subprocess.run(list(args), capture_output=True, text=True, env=ENV, timeout=timeout)
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def elbo(*args):
    return run("mpirun", "-np", "1", a.elbo, *args)


def read_yaml(path):
    """eval.yaml is flat `key: value` lines."""
    out = {}
    for line in open(path):
        k, _, v = line.partition(":")
        out[k.strip()] = v.strip()
    return out


def check_bits_per_dim(text, yaml_path, D, k, tag):
    """The printed line and eval.yaml give bits/dim = nats / (D ln 2) for both bounds."""
    m = re.search(r"test -ELBO ([\d.]+) nats = ([\d.]+) bits/dim .*IWAE\(k=(\d+)\) NLL ([\d.]+) nats = ([\d.]+) "
                  r"bits/dim", text)
    checks(m is not None, f"{tag}: the eval line gives both bounds in nats and bits/dim", text[-2000:])
    if m is None:
        return None
    nats, bpd, kk, iw_nats, iw_bpd = float(m[1]), float(m[2]), int(m[3]), float(m[4]), float(m[5])
    checks(kk == k, f"{tag}: IWAE with k={k} (got {kk})")
    checks(abs(bpd - nats / (D * math.log(2))) < 1e-4, f"{tag}: printed -ELBO {nats} nats = {bpd} bits/dim (D={D})")
    checks(abs(iw_bpd - iw_nats / (D * math.log(2))) < 1e-4,
           f"{tag}: printed IWAE {iw_nats} nats = {iw_bpd} bits/dim (D={D})")
    y = read_yaml(yaml_path)
    checks(int(y.get("dim", -1)) == D, f"{tag}: eval.yaml dim {y.get('dim')} == {D}")
    for nats_key, bpd_key in (("neg_elbo", "neg_elbo_bpd"), ("iwae_nll", "iwae_bpd")):
        n, b = float(y[nats_key]), float(y.get(bpd_key, "nan"))
        checks(abs(b - n / (D * math.log(2))) < 1e-6 * max(1.0, b),
               f"{tag}: eval.yaml {bpd_key} {b} == {nats_key} {n} / ({D} ln 2)")
    checks(abs(float(y["neg_elbo"]) - nats) < 1e-3, f"{tag}: eval.yaml and the printed line agree")
    return nats, bpd, iw_nats, iw_bpd


# --- 1. Fashion-MNIST, an MLP with a 3-component mixture -------------------------------
out = f"{a.work}/fmnist"
tr = elbo("train", a.spec, "--set", "device=cpu", "--set", f"data.train={TRAIN}", "--set", f"data.test={TEST}",
          "--set", "model.likelihood={type: discretized_logistic_mixture, components: 3}",
          "--set", "train.epochs=3", "--set", "train.log_every=10", "--set", "eval.iw_samples=5",
          "--set", "eval.max_samples=300", "--set", "eval.every=50", "--set", f"output.dir={out}")
rows = list(csv.DictReader(open(f"{out}/metrics.csv")))
first, last = float(rows[0]["neg_elbo"]), float(rows[-1]["neg_elbo"])
checks(last < 0.8 * first, f"training with the mixture learns: -ELBO {first:.1f} -> {last:.1f} nats")
header = open(f"{out}/metrics.csv").readline().strip()
checks(",skipped_steps,kl_clamped_dims," in header and header.endswith(",neg_elbo_bpd,test_neg_elbo_bpd"),
       f"metrics.csv keeps its columns and adds the bits/dim ones: {header}")
for row in rows:
    if row["neg_elbo"]:
        want = float(row["neg_elbo"]) / (784 * math.log(2))
        checks(abs(float(row["neg_elbo_bpd"]) - want) < 2e-6, f"step {row['step']}: neg_elbo_bpd = neg_elbo / (784 ln 2)")
    checks(bool(row["test_neg_elbo"]) == bool(row["test_neg_elbo_bpd"]), f"step {row['step']}: test bits/dim with a test -ELBO")
    if row["test_neg_elbo"]:
        want = float(row["test_neg_elbo"]) / (784 * math.log(2))
        checks(abs(float(row["test_neg_elbo_bpd"]) - want) < 2e-6,
               f"step {row['step']}: test_neg_elbo_bpd {row['test_neg_elbo_bpd']} = test_neg_elbo / (784 ln 2)")
checks(sum(1 for row in rows if row["test_neg_elbo"]) >= 2, "eval.every gave test rows")
log_line = [ln for ln in (tr.stdout + tr.stderr).splitlines() if ln.startswith("epoch ") and "bits/dim" in ln]
checks(len(log_line) > 0, "progress lines give the -elbo in bits/dim too")
spec_text = open(f"{out}/spec.yaml").read()
checks("type: discretized_logistic_mixture\n    components: 3" in spec_text, "spec.yaml records the likelihood's K")
with h5py.File(f"{out}/model.h5", "r") as f:
    lik = f.attrs["likelihood"]
    lik = lik.decode() if isinstance(lik, bytes) else lik
    checks(lik == "discretized_logistic_mixture", f"model.h5 likelihood attribute: {lik}")
    w = f["params/decoder.out.weight"]
    checks(w.shape == (3 * 3 * 784, 64), f"decoder.out is K*3*784 = 7056 wide: {w.shape}")
train_res = check_bits_per_dim(tr.stdout + tr.stderr, f"{out}/eval.yaml", 784, 5, "train's final eval")

ev = elbo("eval", f"{out}/model.h5", "--data", TEST, "--iw-samples", "20", "--max-samples", "400",
          "--output", f"{a.work}/eval.yaml")
res = check_bits_per_dim(ev.stdout, f"{a.work}/eval.yaml", 784, 20, "elbo eval")
if res is not None:
    nats, bpd, iw_nats, iw_bpd = res
    checks(bpd < 8.0, f"the bound beats the uniform distribution over 256 values: {bpd:.3f} < 8 bits/dim")
    checks(iw_nats <= nats + 1.0, f"IWAE(k=20) {iw_nats:.2f} is no worse than the ELBO {nats:.2f} (+1 nat of noise)")
    print(f"fmnist MLP, K=3: test -ELBO {nats:.1f} nats = {bpd:.4f} bits/dim, IWAE(k=20) {iw_bpd:.4f} bits/dim")
recon = Image.open(f"{out}/recon.png")
checks(recon.mode == "L", f"recon.png of grayscale data is grayscale ({recon.mode})")
checks(np.asarray(recon).std() > 5, "recon.png is not blank")

# A run stopped at a checkpoint and resumed gives the same rows (bits/dim columns
# included) and the same final bound as one that ran through.
common = ["--set", "device=cpu", "--set", f"data.train={TRAIN}", "--set", f"data.test={TEST}",
          "--set", "model.likelihood={type: discretized_logistic_mixture, components: 2}", "--set", "train.epochs=1",
          "--set", "data.max_samples=960", "--set", "train.log_every=5", "--set", "eval.iw_samples=0",
          "--set", "eval.max_samples=100", "--set", "eval.every=10", "--set", "checkpoint.every=10"]
elbo("train", a.spec, *common, "--set", f"output.dir={a.work}/through")
elbo("train", a.spec, *common, "--set", "train.max_steps=10", "--set", f"output.dir={a.work}/resumed")
elbo("train", a.spec, *common, "--set", f"output.dir={a.work}/resumed", "--resume", "auto")


def losses(d):
    """metrics.csv's training losses (the stopped run ends at step 10 with its final
    evaluation instead of the periodic one, so the test columns differ there)."""
    keep = ("step", "neg_elbo", "rec", "kl", "neg_elbo_bpd")
    return [[row[k] for k in keep] for row in csv.DictReader(open(f"{d}/metrics.csv"))]


checks(losses(f"{a.work}/through") == losses(f"{a.work}/resumed"), "resumed: the same metrics rows, bits/dim included")
checks(read_yaml(f"{a.work}/through/eval.yaml")["neg_elbo_bpd"] == read_yaml(f"{a.work}/resumed/eval.yaml")["neg_elbo_bpd"],
       "resumed: the same final bound in bits/dim")

# The importance-weighted training bound (loss.type: iwae) with the mixture: a few steps.
iw = f"{a.work}/iwae"
tr = elbo("train", a.spec, "--set", "device=cpu", "--set", f"data.train={TRAIN}", "--set", f"data.test={TEST}",
          "--set", "model.likelihood={type: discretized_logistic_mixture, components: 2}", "--set", "loss.type=iwae",
          "--set", "loss.samples=3", "--set", "train.max_steps=6", "--set", "train.log_every=3",
          "--set", "eval.iw_samples=0", "--set", "eval.max_samples=100", "--set", f"output.dir={iw}")
rows = list(csv.DictReader(open(f"{iw}/metrics.csv")))
checks(all(r["neg_iwae"] and r["neg_elbo_bpd"] for r in rows) and float(rows[-1]["neg_iwae"]) < float(rows[0]["neg_iwae"]),
       f"loss.type iwae with the mixture trains: -iwae {rows[0]['neg_iwae']} -> {rows[-1]['neg_iwae']}")

# --- 2. configs/rgb64_dlm.yaml: a few steps on a tiny 64 x 64 RGB image folder ----------
rng = np.random.default_rng(4)
os.makedirs(f"{a.work}/img/a")
for i in range(10):
    yy, xx = np.mgrid[0:64, 0:64]
    base = np.stack([xx * 4, yy * 4, (xx + yy) * 2], axis=-1) + rng.integers(-20, 20, size=(64, 64, 3))
    img = np.clip(base, 0, 255).astype(np.uint8)
    img[rng.integers(0, 48):, :8] = 255  # saturated and black regions: both edge bins
    img[:, rng.integers(56, 64):] = 0
    Image.fromarray(img, "RGB").save(f"{a.work}/img/a/{i:02d}.png")
run(a.elbo_shard, "--image-dir", f"{a.work}/img", "--test-fraction", "0.2", "--seed", "1", "--out", f"{a.work}/rgb")
for spec in a.rgb_spec:
    name = os.path.splitext(os.path.basename(spec))[0]
    rgb = f"{a.work}/{name}_run"
    tr = elbo("train", spec, "--set", "device=cpu", "--set", f"data.train={a.work}/rgb/train",
              "--set", f"data.test={a.work}/rgb/test", "--set", "train.batch_size=4", "--set", "train.max_steps=3",
              "--set", "train.log_every=1", "--set", "eval.every=0", "--set", "eval.iw_samples=2",
              "--set", "train.threads=1", "--set", f"output.dir={rgb}")
    with h5py.File(f"{rgb}/model.h5", "r") as f:
        shape = (int(f.attrs["input_channels"]), int(f.attrs["input_height"]), int(f.attrs["input_width"]))
        checks(shape == (3, 64, 64), f"{name}: model.h5 is for (3, 64, 64): {shape}")
        last = "decoder.out.weight" if "decoder.out.weight" in f["params"] else "decoder.layers.13.weight"
        checks(f[f"params/{last}"].shape[0] == 100, f"{name}: the last conv ({last}) gives 100 channels")
    losses = [float(r["neg_elbo"]) for r in csv.DictReader(open(f"{rgb}/metrics.csv"))]
    checks(len(losses) == 3 and all(math.isfinite(v) for v in losses), f"{name}: 3 finite training losses {losses}")
    check_bits_per_dim(tr.stdout + tr.stderr, f"{rgb}/eval.yaml", 3 * 64 * 64, 2, f"{name} train")
    ev = elbo("eval", f"{rgb}/model.h5", "--data", f"{a.work}/rgb/test", "--iw-samples", "3",
              "--output", f"{a.work}/{name}_eval.yaml")
    check_bits_per_dim(ev.stdout, f"{a.work}/{name}_eval.yaml", 3 * 64 * 64, 3, f"{name} eval")
    checks(Image.open(f"{rgb}/recon.png").mode == "RGB", f"{name}: recon.png is RGB")
    checks(Image.open(f"{rgb}/samples.png").mode == "RGB", f"{name}: samples.png is RGB")
checks.finish()
