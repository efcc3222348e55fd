#!/usr/bin/env python3
"""RGB end to end: a folder of coloured PNGs (class = colour) sharded with
--image-dir, a conv VAE with C = 3 trained on it (the loss falls), and the image
grids written in colour: recon.png's input tiles are the test images exactly,
its reconstructions keep each input's dominant colour, and `elbo sample` writes
an RGB PNG. Then configs/celeba64_conv.yaml takes a few steps on 64 x 64 RGB
shards made from larger JPEGs with --center-crop and --size."""
import csv, os, re, subprocess, sys
import h5py, numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shard_cli import setup  # noqa: E402

a, W, bad, ENV, shard, _ = setup(__doc__, extra=[("--elbo", "the elbo binary"), ("--spec", "configs/smoke.yaml"),
                                                 ("--celeba-spec", "configs/celeba64_conv.yaml")])
rng = np.random.default_rng(2)


def run(*args, timeout=600):
    r = subprocess.run(list(args), capture_output=True, text=True, env=ENV, timeout=timeout)
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def elbo(*args):
    return run("mpirun", "-np", "1", a.elbo, *args)


COLOURS = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 50, 40)}
for name, rgb in COLOURS.items():
    os.makedirs(f"{W}/img/{name}")
    for i in range(100):
        img = np.clip(np.array(rgb)[None, None] + rng.integers(-30, 30, size=(16, 16, 3)), 0, 255).astype(np.uint8)
        y, x = rng.integers(0, 10, size=2)
        img[y:y + 6, x:x + 6] //= 4  # a dark square somewhere
        Image.fromarray(img, "RGB").save(f"{W}/img/{name}/{i:03d}.png")
run(a.elbo_shard, "--image-dir", f"{W}/img", "--test-fraction", "0.2", "--seed", "1", "--out", f"{W}/rgb")

TEST = f"{W}/rgb/test"
test_x, test_y = [], []
for name in re.findall(r"- file: (\S+)", open(f"{TEST}/manifest.yaml").read()):
    with h5py.File(f"{TEST}/{name}", "r") as f:
        test_x.append(f["images"][...])
        test_y.append(f["labels"][...])
test_x, test_y = np.concatenate(test_x), np.concatenate(test_y)

model = ("model={type: conv, latent: 8, likelihood: bernoulli, "
         "encoder: [{type: conv2d, channels: 8, kernel: 4, stride: 2, padding: 1}, relu, flatten], "
         "decoder: [{type: linear, features: 512}, relu, {type: reshape, shape: [8, 8, 8]}, "
         "{type: conv_transpose2d, channels: 3, kernel: 4, stride: 2, padding: 1}]}")
out = f"{W}/run"
elbo("train", a.spec, "--set", "device=cpu", "--set", f"data.train={W}/rgb/train", "--set", f"data.test={TEST}",
     "--set", "data.shape=[3, 16, 16]", "--set", "data.max_samples=0", "--set", model, "--set", "train.epochs=60",
     "--set", "train.batch_size=40", "--set", "train.log_every=30", "--set", "eval.iw_samples=0",
     "--set", f"output.dir={out}")

rows = list(csv.DictReader(open(f"{out}/metrics.csv")))
first, last = float(rows[0]["neg_elbo"]), float(rows[-1]["neg_elbo"])
if not last < 0.9 * first:
    bad.append(f"training on RGB does not learn: -ELBO {first} -> {last}")
with h5py.File(f"{out}/model.h5", "r") as f:
    if int(f.attrs["input_channels"]) != 3:
        bad.append(f"model.h5 input_channels {f.attrs['input_channels']}")

recon = Image.open(f"{out}/recon.png")
if recon.mode != "RGB":
    bad.append(f"recon.png is {recon.mode}, not RGB")
else:
    r = np.asarray(recon)
    pad, h = 2, 16
    cols = (r.shape[1] - pad) // (h + pad)
    for k in range(min(cols, len(test_x))):  # first row: inputs, second row: their reconstructions
        x0 = pad + k * (h + pad)
        inp = r[pad:pad + h, x0:x0 + h]
        rec = r[2 * pad + h:2 * pad + 2 * h, x0:x0 + h].reshape(-1, 3).mean(0)
        if not np.array_equal(inp, test_x[k].transpose(1, 2, 0)):
            bad.append(f"recon.png input tile {k} is not test image {k}")
        colour = sorted(COLOURS)[test_y[k]]
        want = int(np.argmax(COLOURS[colour]))
        if int(np.argmax(rec)) != want:
            bad.append(f"reconstruction {k} of a {colour} image has mean RGB {rec.round()}")
samples = Image.open(f"{out}/samples.png")
if samples.mode != "RGB":
    bad.append(f"samples.png is {samples.mode}, not RGB")
elbo("sample", f"{out}/model.h5", "-n", "9", "-o", f"{W}/s.png")
s = np.asarray(Image.open(f"{W}/s.png"))
if s.ndim != 3 or s.shape[2] != 3 or np.abs(s[..., 0].astype(int) - s[..., 2]).mean() < 10:
    bad.append(f"elbo sample: not a colour image (shape {s.shape})")

# The 64 x 64 RGB example spec takes a few steps on CelebA-like shards.
for i in range(8):
    img = rng.integers(0, 256, size=(90, 74, 3), dtype=np.uint8)
    os.makedirs(f"{W}/celeb", exist_ok=True)
    Image.fromarray(img, "RGB").save(f"{W}/celeb/{i:06d}.jpg", quality=90)
run(a.elbo_shard, "--image-dir", f"{W}/celeb", "--center-crop", "70", "--size", "64", "64",
    "--test-fraction", "0.25", "--out", f"{W}/c64")
elbo("train", a.celeba_spec, "--set", "device=cpu", "--set", f"data.train={W}/c64/train",
     "--set", f"data.test={W}/c64/test", "--set", "train.batch_size=2", "--set", "train.max_steps=2",
     "--set", "train.log_every=1", "--set", "eval.every=0", "--set", "train.threads=1",
     "--set", f"output.dir={W}/c64run")
with h5py.File(f"{W}/c64run/model.h5", "r") as f:
    if (int(f.attrs["input_channels"]), int(f.attrs["input_height"]), int(f.attrs["input_width"])) != (3, 64, 64):
        bad.append("celeba64_conv: model.h5 is not for (3, 64, 64)")
if Image.open(f"{W}/c64run/recon.png").mode != "RGB":
    bad.append("celeba64_conv: recon.png is not RGB")

if bad:
    print("\n".join(bad))
    sys.exit(1)
print(f"RGB: -ELBO {first:.1f} -> {last:.1f}, colour grids, celeba64_conv steps ok")
