#!/usr/bin/env python3
"""elbo-shard output read with h5py (a user's view): shapes, dtypes, attributes,
exact bytes against the IDX source, and the tool's error messages."""
import argparse, gzip, os, shutil, struct, subprocess, sys
import h5py, numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("--elbo-shard", required=True)
ap.add_argument("--work", required=True)
a = ap.parse_args()
shutil.rmtree(a.work, ignore_errors=True)
os.makedirs(a.work)
SRC = "/usr/share/datasets/fashion-mnist"
bad = []


def idx(path):
    with gzip.open(path) as f:
        raw = f.read()
    nd = raw[3]
    dims = struct.unpack(">" + "I" * nd, raw[4:4 + 4 * nd])
    return np.frombuffer(raw[4 + 4 * nd:], dtype=np.uint8).reshape(dims)


r = subprocess.run([a.elbo_shard, "--dataset-dir", SRC, "--out", f"{a.work}/fm", "--num-shards", "4"],
                   capture_output=True, text=True)
if r.returncode != 0:
    sys.exit(f"elbo-shard failed: {r.stderr}")
for split, prefix, n, shards in (("train", "train", 60000, 4), ("test", "t10k", 10000, 1)):
    images, labels = idx(f"{SRC}/{prefix}-images-idx3-ubyte.gz"), idx(f"{SRC}/{prefix}-labels-idx1-ubyte.gz")
    files = sorted(f for f in os.listdir(f"{a.work}/fm/{split}") if f.endswith(".h5"))
    if len(files) != shards:
        bad.append(f"{split}: {len(files)} shard files, expected {shards}")
    total = 0
    for name in files:
        with h5py.File(f"{a.work}/fm/{split}/{name}", "r") as f:
            x, y, off = f["images"], f["labels"], int(f.attrs["global_offset"])
            if x.dtype != np.uint8 or x.shape[1:] != (1, 28, 28) or y.shape != (x.shape[0],):
                bad.append(f"{name}: images {x.dtype} {x.shape}, labels {y.shape}")
            if f.attrs["split"] != split or int(f.attrs["num_samples_total"]) != n or off != total:
                bad.append(f"{name}: attributes {dict(f.attrs)}")
            if not np.array_equal(x[...][:, 0], images[off:off + x.shape[0]]) or \
               not np.array_equal(y[...], labels[off:off + x.shape[0]]):
                bad.append(f"{name}: bytes differ from the IDX source")
            total += x.shape[0]
    if total != n:
        bad.append(f"{split}: {total} samples, expected {n}")
    print(f"{split}: {total} samples in {len(files)} shard(s) match the IDX bytes")


def expect(args, code, text):
    r = subprocess.run([a.elbo_shard, *args], capture_output=True, text=True)
    if r.returncode != code or text not in r.stderr:
        bad.append(f"elbo-shard {' '.join(args)}: exit {r.returncode}, stderr {r.stderr!r}; wanted {code} and {text!r}")


expect(["--dataset-dir", SRC, "--out", f"{a.work}/fm", "--num-shards", "4"], 1, "already holds a split")
expect(["--dataset-dir", SRC, "--out", f"{a.work}/x", "--num-shards", "four"], 2, "--num-shards expects an integer")
expect(["--dataset-dir", SRC], 2, "option --out is required")
expect(["--bogus"], 2, "unknown option '--bogus'")
expect(["--images", f"{a.work}/none.gz", "--out", f"{a.work}/y"], 1, "none.gz: file does not exist")
expect(["--dataset-dir", a.work, "--out", f"{a.work}/z"], 1, "train-images-idx3-ubyte")
if bad:
    print("\n".join(bad))
    sys.exit(1)
