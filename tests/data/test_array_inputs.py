#!/usr/bin/env python3
"""elbo-shard --npy / --hdf5 against NumPy and h5py: uint8 and float arrays in NHWC,
NCHW and (N, H, W), .npy and .npz (stored and compressed), labels, --test-fraction
on an NHWC array; and the bad inputs: unsupported dtype and rank, floats outside
[0, 1], Fortran order, big-endian, an ambiguous layout, a truncated .npy, a missing
.npz key, a missing or non-dataset HDF5 path. Small arrays generated here."""
import os, sys
import h5py, numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shard_cli import read_split, setup  # noqa: E402

a, W, bad, ENV, shard, expect = setup(__doc__)
rng = np.random.default_rng(11)


def check(args, want_x, want_y, label):
    out = f"{W}/out_{label}"
    r = shard(*args, "--num-shards", "3", "--out", out)
    if r.returncode != 0:
        bad.append(f"{label}: exit {r.returncode}: {r.stderr}")
        return
    x, y = read_split(out)
    if x.dtype != np.uint8 or x.shape != want_x.shape or not np.array_equal(x, want_x):
        bad.append(f"{label}: images {x.dtype} {x.shape} differ from the expected {want_x.shape}")
    if (y is None) != (want_y is None) or (y is not None and not np.array_equal(y, want_y)):
        bad.append(f"{label}: labels {None if y is None else y[:8]} differ")
    if shard("--verify", out).returncode != 0:
        bad.append(f"{label}: --verify fails")


def to_u8(f):
    return np.floor(f.astype(np.float64) * 255 + 0.5).astype(np.uint8)


N = 40
nhwc = rng.integers(0, 256, size=(N, 5, 4, 3), dtype=np.uint8)
labels = rng.integers(0, 7, size=N).astype(np.int64)
np.save(f"{W}/nhwc.npy", nhwc)
np.save(f"{W}/labels.npy", labels)
check(["--npy", f"{W}/nhwc.npy", "--npy-labels", f"{W}/labels.npy"], nhwc.transpose(0, 3, 1, 2), labels, "npy_nhwc")
nchw = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
np.save(f"{W}/nchw.npy", nchw)
check(["--npy", f"{W}/nchw.npy"], nchw, None, "npy_nchw")
gray = rng.integers(0, 256, size=(N, 6, 7), dtype=np.uint8)
np.save(f"{W}/gray.npy", gray)
check(["--npy", f"{W}/gray.npy"], gray[:, None], None, "npy_gray")
f32 = rng.random(size=(N, 1, 6, 5), dtype=np.float32)
f32[0, 0, 0, :3] = [0.0, 1.0, 0.5 / 255]  # the ends and a half step
np.save(f"{W}/f32.npy", f32)
check(["--npy", f"{W}/f32.npy"], to_u8(f32), None, "npy_float32")
amb = rng.random(size=(N, 3, 4, 3))  # float64, channels first or last?
np.save(f"{W}/amb.npy", amb)
expect(["--npy", f"{W}/amb.npy", "--out", f"{W}/x1"], 1, "cannot tell NHWC from NCHW in shape (40, 3, 4, 3)")
check(["--npy", f"{W}/amb.npy", "--layout", "nhwc"], to_u8(amb).transpose(0, 3, 1, 2), None, "npy_layout_nhwc")
check(["--npy", f"{W}/amb.npy", "--layout", "nchw"], to_u8(amb), None, "npy_layout_nchw")

# .npz, stored and compressed, with labels in the same archive.
np.savez(f"{W}/a.npz", images=nhwc, labels=labels.astype(np.uint8))
np.savez_compressed(f"{W}/c.npz", images=nhwc, labels=labels.astype(np.int32), extra=np.zeros(3))
for name in ("a", "c"):
    check(["--npy", f"{W}/{name}.npz", "--npz-key", "images", "--npz-labels-key", "labels"],
          nhwc.transpose(0, 3, 1, 2), labels, f"npz_{name}")
expect(["--npy", f"{W}/c.npz", "--npz-key", "pixels", "--out", f"{W}/x2"], 1,
       "c.npz:pixels: no array 'pixels' in the archive (it holds: images, labels, extra)")
expect(["--npy", f"{W}/c.npz", "--out", f"{W}/x3"], 2, "needs --npz-key")

# A split of an NHWC array: non-consecutive samples read correctly.
r = shard("--npy", f"{W}/nhwc.npy", "--npy-labels", f"{W}/labels.npy", "--test-fraction", "0.3", "--out", f"{W}/tf")
if r.returncode != 0:
    bad.append(f"--test-fraction on --npy: {r.stderr}")
else:
    tr, trl = read_split(f"{W}/tf/train")
    te, tel = read_split(f"{W}/tf/test")
    src = {x.tobytes(): i for i, x in enumerate(nhwc.transpose(0, 3, 1, 2))}
    idx = [src.get(x.tobytes(), -1) for x in np.concatenate([tr, te])]
    if sorted(idx) != list(range(N)) or not np.array_equal(np.concatenate([trl, tel]), labels[idx]):
        bad.append("--test-fraction on --npy: the parts are not the input")

# Bad NumPy inputs.
np.save(f"{W}/i16.npy", np.zeros((4, 3, 3), np.int16))
expect(["--npy", f"{W}/i16.npy", "--out", f"{W}/x4"], 1, "i16.npy: dtype '<i2' is not supported")
np.save(f"{W}/rank2.npy", np.zeros((4, 9), np.uint8))
expect(["--npy", f"{W}/rank2.npy", "--out", f"{W}/x5"], 1, "rank2.npy: arrays of rank 2 (4, 9) are not supported")
big = f32.copy()
big[17, 0, 2, 3] = 1.5
np.save(f"{W}/big.npy", big)
expect(["--npy", f"{W}/big.npy", "--out", f"{W}/x6"], 1, "big.npy: sample 17 has the value 1.5")
nan = f32.copy()
nan[3, 0, 0, 0] = np.nan
np.save(f"{W}/nan.npy", nan)
expect(["--npy", f"{W}/nan.npy", "--out", f"{W}/x7"], 1, "nan.npy: sample 3 has the value nan")
np.save(f"{W}/fortran.npy", np.asfortranarray(gray))
expect(["--npy", f"{W}/fortran.npy", "--out", f"{W}/x8"], 1, "Fortran-order arrays are not supported")
np.save(f"{W}/be.npy", f32.astype(">f4"))
expect(["--npy", f"{W}/be.npy", "--out", f"{W}/x9"], 1, "dtype '>f4' is not supported")
blob = open(f"{W}/gray.npy", "rb").read()
open(f"{W}/cut.npy", "wb").write(blob[: len(blob) - 100])
expect(["--npy", f"{W}/cut.npy", "--out", f"{W}/x10"], 1, "cut.npy: holds fewer bytes than its shape")
open(f"{W}/junk.npy", "wb").write(b"not numpy at all")
expect(["--npy", f"{W}/junk.npy", "--out", f"{W}/x11"], 1, "junk.npy: not a .npy file")
np.save(f"{W}/badlab.npy", np.full(N, 300))
expect(["--npy", f"{W}/gray.npy", "--npy-labels", f"{W}/badlab.npy", "--out", f"{W}/x12"], 1,
       "badlab.npy: label 300 of sample 0 is outside 0..255")
expect(["--npy", f"{W}/gray.npy", "--layout", "hwc", "--out", f"{W}/x13"], 2, "--layout expects")

# HDF5 datasets: uint8 NHWC chunked in a group, float32 NCHW, labels.
with h5py.File(f"{W}/d.h5", "w") as f:
    f.create_dataset("grp/x", data=nhwc, chunks=(7, 5, 4, 3))
    f.create_dataset("grp/f", data=f32)
    f.create_dataset("grp/y", data=labels.astype(np.int16))
    f.create_dataset("i16", data=np.zeros((4, 3, 3), np.int16))
check(["--hdf5", f"{W}/d.h5:/grp/x", "--hdf5-labels", "/grp/y"], nhwc.transpose(0, 3, 1, 2), labels, "hdf5_u8")
check(["--hdf5", f"{W}/d.h5:/grp/f"], to_u8(f32), None, "hdf5_float")
expect(["--hdf5", f"{W}/d.h5:/grp/nope", "--out", f"{W}/x14"], 1, "d.h5: no dataset /grp/nope in the file")
expect(["--hdf5", f"{W}/d.h5:/grp", "--out", f"{W}/x15"], 1, "d.h5: /grp is a group, not a dataset")
expect(["--hdf5", f"{W}/d.h5:/i16", "--out", f"{W}/x16"], 1, "d.h5:/i16: element type")
expect(["--hdf5", f"{W}/none.h5:/x", "--out", f"{W}/x17"], 1, "none.h5: file does not exist")
expect(["--hdf5", f"{W}/d.h5", "--out", f"{W}/x18"], 2, "--hdf5 expects FILE:/path/to/dataset")

if bad:
    print("\n".join(bad))
    sys.exit(1)
print("--npy / --hdf5: every layout, dtype and bad input ok")
