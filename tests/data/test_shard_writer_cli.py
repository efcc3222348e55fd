#!/usr/bin/env python3
"""elbo-shard's writer seen from outside: the manifest checksums recomputed here with
h5py and a Python FNV-1a, --verify on a good split and on one with a flipped byte,
--overwrite with fewer shards, a gzip file with a bad CRC, --test-fraction, --shard-mb,
--compress, and the command line itself (--help, decimal integers, refused values).
Small synthetic IDX files, generated here."""
import gzip, os, re, shutil, struct, sys
import h5py, numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shard_cli import setup  # noqa: E402

a, W, bad, ENV, shard, expect = setup(__doc__)

FNV_BASIS = 1469598103934665603  # util/checksum.hpp's offset basis (see test_shards.cpp)
FNV_PRIME = 1099511628211


def fnv1a64(*chunks):
    h = FNV_BASIS
    for c in chunks:
        for b in bytes(c):
            h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return f"fnv1a64:{h:016x}"


def write_idx(path, arr, gz=True):
    raw = bytes([0, 0, 8, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.astype(np.uint8).tobytes()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(raw)


def manifest(d):
    """The shard entries of a manifest: (file, offset, num_samples, checksum)."""
    text = open(f"{d}/manifest.yaml").read()
    return re.findall(r"- file: (\S+)\n\s+offset: (\d+)\n\s+num_samples: (\d+)\n\s+checksum: (\S+)", text)


def read_split(d):
    xs, ys = [], []
    for name, off, n, _ in manifest(d):
        with h5py.File(f"{d}/{name}", "r") as f:
            xs.append(f["images"][...])
            ys.append(f["labels"][...] if "labels" in f else None)
    return np.concatenate(xs), (np.concatenate(ys) if ys[0] is not None else None)


rng = np.random.default_rng(0)
N = 300
images = rng.integers(0, 256, size=(N, 6, 5), dtype=np.uint8)
labels = rng.integers(0, 10, size=(N,), dtype=np.uint8)
write_idx(f"{W}/img.gz", images)
write_idx(f"{W}/lab.gz", labels)

# Checksums: recomputed independently from what h5py reads.
r = shard("--images", f"{W}/img.gz", "--labels", f"{W}/lab.gz", "--num-shards", "3", "--out", f"{W}/s")
if r.returncode != 0:
    sys.exit(f"elbo-shard failed: {r.stderr}")
entries = manifest(f"{W}/s")
if len(entries) != 3:
    bad.append(f"manifest lists {len(entries)} shards with checksums, expected 3")
for name, off, n, checksum in entries:
    with h5py.File(f"{W}/s/{name}", "r") as f:
        x, y = f["images"][...], f["labels"][...]
        if x.shape != (int(n), 1, 6, 5) or f["images"].chunks[0] > 256:
            bad.append(f"{name}: images {x.shape}, chunks {f['images'].chunks}")
    want = fnv1a64(x.tobytes(order="C"), y.tobytes())
    if checksum != want:
        bad.append(f"{name}: manifest checksum {checksum}, h5py data gives {want}")
    if not np.array_equal(x[:, 0], images[int(off):int(off) + int(n)]):
        bad.append(f"{name}: bytes differ from the IDX source")

# --verify: a good split, then one flipped byte inside a shard's images.
r = shard("--verify", f"{W}/s")
if r.returncode != 0 or "3 shard(s), 300 samples verified" not in r.stdout:
    bad.append(f"--verify on a good split: exit {r.returncode}, {r.stdout!r} {r.stderr!r}")
shutil.copytree(f"{W}/s", f"{W}/flip")
target = f"{W}/flip/shard-00002-of-00003.h5"
blob = bytearray(open(target, "rb").read())
pos = blob.find(images[250].tobytes())  # sample 250 lives in the last shard
if pos < 0:
    bad.append("could not find sample 250's bytes in the last shard")
else:
    blob[pos + 3] ^= 0x40
    open(target, "wb").write(blob)
    expect(["--verify", f"{W}/flip"], 1, "shard-00002-of-00003.h5: checksum mismatch")
    r = shard("--verify", f"{W}/flip")
    if "shard-00000" in r.stderr or "shard-00001" in r.stderr:
        bad.append(f"--verify blames intact shards: {r.stderr!r}")
expect(["--verify", f"{W}/nowhere"], 1, "nowhere: data directory does not exist")
os.makedirs(f"{W}/empty")
expect(["--verify", f"{W}/empty"], 1, "empty/manifest.yaml: missing manifest")

# --overwrite with fewer shards leaves no stale shard files; other files stay.
open(f"{W}/s/README.txt", "w").write("mine")
r = shard("--images", f"{W}/img.gz", "--num-shards", "2", "--out", f"{W}/s", "--overwrite")
left = sorted(os.listdir(f"{W}/s"))
if r.returncode != 0 or left != ["README.txt", "manifest.yaml", "shard-00000-of-00002.h5", "shard-00001-of-00002.h5"]:
    bad.append(f"--overwrite with fewer shards: exit {r.returncode}, files {left}")
x, y = read_split(f"{W}/s")
if y is not None or not np.array_equal(x[:, 0], images):
    bad.append("--overwrite: the new split does not hold the new input")

# A gzip file with a damaged CRC is refused, naming the file; nothing is written.
blob = bytearray(open(f"{W}/img.gz", "rb").read())
blob[-6] ^= 0xFF
open(f"{W}/badcrc.gz", "wb").write(blob)
expect(["--images", f"{W}/badcrc.gz", "--out", f"{W}/crc"], 1, "badcrc.gz: corrupt gzip data")
if os.path.exists(f"{W}/crc/manifest.yaml"):
    bad.append("a split was written from a file with a bad CRC")

# --test-fraction: disjoint, complete, seeded, in the original order within each part.
for seed in ("1", "1", "2"):
    r = shard("--images", f"{W}/img.gz", "--labels", f"{W}/lab.gz", "--test-fraction", "0.25", "--seed", seed,
              "--out", f"{W}/tf{seed}", "--overwrite")
    if r.returncode != 0:
        bad.append(f"--test-fraction: {r.stderr}")
tr, trl = read_split(f"{W}/tf1/train")
te, tel = read_split(f"{W}/tf1/test")
if len(te) != 75 or len(tr) != 225:
    bad.append(f"--test-fraction 0.25: {len(tr)} train, {len(te)} test")
rows = {r.tobytes(): i for i, r in enumerate(images)}
idx_tr = [rows[x.tobytes()] for x in tr[:, 0]]
idx_te = [rows[x.tobytes()] for x in te[:, 0]]
if sorted(idx_tr + idx_te) != list(range(N)) or idx_tr != sorted(idx_tr) or idx_te != sorted(idx_te):
    bad.append("--test-fraction: parts are not a sorted partition of the input")
if not np.array_equal(trl, labels[idx_tr]) or not np.array_equal(tel, labels[idx_te]):
    bad.append("--test-fraction: labels do not follow their images")
te2, _ = read_split(f"{W}/tf2/test")
if np.array_equal(te, te2):
    bad.append("--test-fraction: seeds 1 and 2 give the same test part")
expect(["--images", f"{W}/img.gz", "--test-fraction", "1.5", "--out", f"{W}/tfx"], 2, "--test-fraction")
# An existing test part refuses the pair before the train part is written.
shutil.rmtree(f"{W}/tf2/train")
expect(["--images", f"{W}/img.gz", "--test-fraction", "0.25", "--out", f"{W}/tf2"], 1, "tf2/test: already holds a split")
if os.path.exists(f"{W}/tf2/train"):
    bad.append("--test-fraction wrote the train part although the test part was refused")

# --shard-mb (N * 30 bytes = 9000 bytes; 0.002 MB per shard -> 5 shards) and --compress.
r = shard("--images", f"{W}/img.gz", "--shard-mb", "0.002", "--compress", "deflate=6", "--out", f"{W}/mb")
files = sorted(f for f in os.listdir(f"{W}/mb") if f.endswith(".h5"))
if r.returncode != 0 or len(files) != 5:
    bad.append(f"--shard-mb 0.002: exit {r.returncode}, {files} {r.stderr!r}")
else:
    with h5py.File(f"{W}/mb/{files[0]}", "r") as f:
        if f["images"].compression != "gzip" or f["images"].compression_opts != 6:
            bad.append(f"--compress deflate=6: {f['images'].compression} {f['images'].compression_opts}")
    x, _ = read_split(f"{W}/mb")
    if not np.array_equal(x[:, 0], images):
        bad.append("--compress: data differ")
    if shard("--verify", f"{W}/mb").returncode != 0:
        bad.append("--verify fails on a compressed split")
expect(["--images", f"{W}/img.gz", "--compress", "zstd", "--out", f"{W}/z"], 2, "--compress expects")

# The command line (CLI11): --help lists the options and exits 0; integers are decimal
# ("--num-shards 010" is ten shards, not octal eight); a refused value, a missing value
# and a stray argument exit 2 naming them, with the program named once.
r = shard("--help")
if r.returncode != 0 or not all(re.search(rf"^\s+{o}\b", r.stdout, re.M) for o in
                                ("--images", "--dataset-dir", "--image-dir", "--npy", "--hdf5", "--size",
                                 "--num-shards", "--test-fraction", "--out", "--overwrite", "--verify")):
    bad.append(f"--help: exit {r.returncode}, {r.stdout!r}")
r = shard("--images", f"{W}/img.gz", "--num-shards", "010", "--out", f"{W}/ten")
files = sorted(f for f in os.listdir(f"{W}/ten") if f.endswith(".h5")) if r.returncode == 0 else []
if len(files) != 10:
    bad.append(f"--num-shards 010: exit {r.returncode}, {len(files)} shards (wanted ten) {r.stderr!r}")
r = expect(["--images", f"{W}/img.gz", "--num-shards", "0", "--out", f"{W}/n0"], 2,
           "elbo-shard: option --num-shards must be >= 1 (got 0)")
if "elbo-shard: elbo-shard" in r.stderr:
    bad.append(f"the program is named twice: {r.stderr!r}")
expect(["--images", f"{W}/img.gz", "--shard-mb", "lots", "--out", f"{W}/n1"], 2,
       "option --shard-mb expects a number, got 'lots'")
expect(["--images", f"{W}/img.gz", "--out"], 2, "--out: 1 required DIR missing")
expect(["--images", f"{W}/img.gz", "--out", f"{W}/n2", "stray"], 2, "unexpected argument 'stray'")

if bad:
    print("\n".join(bad))
    sys.exit(1)
print("writer CLI: checksums, --verify, --overwrite, bad CRC, --test-fraction, --shard-mb, --compress ok")
