#!/usr/bin/env python3
"""TensorBoard event files from a real training run, read back by a reader written
here against the published formats (TFRecord framing with masked CRC-32C, protobuf
wire format, TensorFlow's Event/Summary field numbers), independent of elbo's code
and of libprotobuf:
  1. 2 ranks, 200 steps, eval.every=50: one events file in output.dir/tensorboard,
     every record's two CRCs correct, the first record the file version; every
     metrics.csv cell (but the step) appears as a scalar train/<col> or test/<col>
     at that row's step, equal as float32, and nothing else does; the sample and
     reconstruction grids of each evaluation and of the end are PNG images of the
     size the Image message states, byte-identical to the PNG files on disk;
  2. a run killed after step 200 with its last checkpoint at step 100, resumed with
     --resume auto: the old file loses the steps after 100, a new file holds
     the rest, and together they hold every metrics.csv row exactly once;
  3. output.tensorboard: false writes no tensorboard directory."""
import csv, glob, io, os, shutil, struct, subprocess, sys
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402

a = harness.parse_args(__doc__)
check = harness.Checks()

# --- CRC-32C (Castagnoli), table-driven, and TFRecord framing ---
_TABLE = []
for i in range(256):
    c = i
    for _ in range(8):
        c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    _TABLE.append(c)


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked(data):
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283


def records(path):
    """Every record's data; raises on a bad CRC or trailing bytes."""
    raw = open(path, "rb").read()
    out, pos = [], 0
    while pos < len(raw):
        if len(raw) - pos < 12:
            raise ValueError(f"{path}: {len(raw) - pos} trailing bytes at {pos}")
        (n,) = struct.unpack_from("<Q", raw, pos)
        (len_crc,) = struct.unpack_from("<I", raw, pos + 8)
        if len_crc != masked(raw[pos:pos + 8]):
            raise ValueError(f"{path}: length CRC at {pos}")
        data = raw[pos + 12:pos + 12 + n]
        (data_crc,) = struct.unpack_from("<I", raw, pos + 12 + n)
        if data_crc != masked(data):
            raise ValueError(f"{path}: data CRC at {pos}")
        out.append(data)
        pos += 12 + n + 4
    return out


# --- protobuf wire format: {field: [value, ...]} ---
def varint(b, pos):
    v, shift = 0, 0
    while True:
        x = b[pos]
        pos += 1
        v |= (x & 0x7F) << shift
        shift += 7
        if not x & 0x80:
            return v, pos


def decode(b):
    m, pos = {}, 0
    while pos < len(b):
        key, pos = varint(b, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, pos = varint(b, pos)
        elif wire == 1:
            v, pos = b[pos:pos + 8], pos + 8
        elif wire == 5:
            v, pos = b[pos:pos + 4], pos + 4
        elif wire == 2:
            n, pos = varint(b, pos)
            v, pos = b[pos:pos + n], pos + n
        else:
            raise ValueError(f"wire type {wire}")
        m.setdefault(field, []).append((wire, v))
    return m


def events(path):
    """(version, [(step, [("scalar", tag, float) | ("image", tag, h, w, colorspace, png)])])"""
    recs = records(path)
    first = decode(recs[0])
    version = first[3][0][1].decode() if 3 in first else None
    out = []
    for r in recs[1:]:
        e = decode(r)
        step = e.get(2, [(0, 0)])[0][1]
        assert 1 in e and e[1][0][0] == 1, "every event has a wall_time (double)"
        values = []
        for _, summary in e.get(5, []):
            for _, val in decode(summary).get(1, []):
                v = decode(val)
                tag = v[1][0][1].decode()
                if 2 in v:
                    assert v[2][0][0] == 5, "simple_value is a fixed32 float"
                    values.append(("scalar", tag, struct.unpack("<f", v[2][0][1])[0]))
                elif 4 in v:
                    im = decode(v[4][0][1])
                    values.append(("image", tag, im[1][0][1], im[2][0][1], im[3][0][1], im[4][0][1]))
        out.append((step, values))
    return version, out


def f32(x):
    return struct.unpack("<f", struct.pack("<f", float(x)))[0]


def elbo(out, *extra, expect=0):
    r = subprocess.run(["mpirun", "-np", "2", a.elbo, "train", a.spec, "--set", "device=cpu",
                        "--set", f"data.train={a.data}/train", "--set", f"data.test={a.data}/test",
                        "--set", "train.epochs=4", "--set", "eval.every=50", "--set", "eval.max_samples=480",
                        "--set", "eval.iw_samples=0", "--set", "checkpoint.every=100", "--set", "checkpoint.keep=0",
                        "--set", "dist.self_test=false", "--set", f"output.dir={out}", *extra],
                       capture_output=True, text=True, timeout=400)
    if r.returncode != expect:
        sys.exit(f"elbo train {out}: exit {r.returncode}, expected {expect}:\n{r.stdout}\n{r.stderr}")
    return r


def csv_rows(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def expected_scalars(rows):
    """{(tag, step): float32} from metrics.csv: every non-empty cell but the step."""
    exp = {}
    for row in rows:
        step = int(row["step"])
        for col, cell in row.items():
            if col == "step" or cell == "":
                continue
            tag = "test/" + col[5:] if col.startswith("test_") else "train/" + col
            exp[(tag, step)] = f32(cell)
    return exp


def scalars_of(files):
    got, dupes = {}, []
    for path in files:
        for step, values in events(path)[1]:
            for v in values:
                if v[0] == "scalar":
                    if (v[1], step) in got:
                        dupes.append((v[1], step))
                    got[(v[1], step)] = v[2]
    return got, dupes


# 1. A fresh run.
out = os.path.join(a.work, "run")
elbo(out)
files = sorted(glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*")))
check(len(files) == 1, f"one events file in output.dir/tensorboard: {files}")
version, evs = events(files[0])
check(version == "brain.Event:2", f"the first record is the file version (got {version!r})")
rows = csv_rows(out)
exp = expected_scalars(rows)
got, dupes = scalars_of(files)
check(not dupes, "each (tag, step) is written once", str(dupes[:5]))
missing = [k for k in exp if k not in got]
wrong = [(k, exp[k], got[k]) for k in exp if k in got and got[k] != exp[k]]
extra = [k for k in got if k not in exp]
check(len(exp) == 11 * len(rows) + 3 * 3 and not missing, f"all {len(exp)} metrics.csv cells are scalars", str(missing[:10]))
check(not wrong, "scalar values equal the CSV's as float32", str(wrong[:10]))
check(not extra, "no scalar that metrics.csv lacks", str(extra[:10]))
test_steps = sorted(s for (t, s) in exp if t == "test/neg_elbo")
check(test_steps == [50, 100, 150], f"test scalars at the evaluations: {test_steps}")
steps = [s for s, _ in evs]
check(steps == sorted(steps), "events in step order")

images = [(s, v) for s, vals in evs for v in vals if v[0] == "image"]
want = {(t, s) for t in ("images/samples", "images/recon") for s in (50, 100, 150, 200)}
check({(v[1], s) for s, v in images} == want and len(images) == len(want),
      f"sample and reconstruction images at each evaluation and at the end: {sorted((v[1], s) for s, v in images)}")
for s, (_, tag, h, w, colorspace, png) in images:
    name = ("samples" if tag.endswith("samples") else "recon") + (f"-{s:09d}" if s < 200 else "") + ".png"
    disk = os.path.join(out, "images" if s < 200 else "", name)
    img = Image.open(io.BytesIO(png))
    check(img.format == "PNG" and img.size == (w, h) and colorspace == 1 and img.mode == "L",
          f"{tag}@{s}: a {w}x{h} grayscale PNG (decoded {img.format} {img.size} {img.mode})")
    check(os.path.exists(disk) and open(disk, "rb").read() == png, f"{tag}@{s}: the same bytes as {disk}")

# 2. Killed after step 200 with its last checkpoint at step 100: resume.
killed = os.path.join(a.work, "killed")
shutil.copytree(out, killed)
for p in ["model.h5", "eval.yaml", "samples.png", "recon.png", ".lock"] + \
         [os.path.relpath(c, killed) for c in glob.glob(os.path.join(killed, "checkpoints", "*.h5"))
          if not c.endswith("ckpt-000000100.h5")]:
    if os.path.exists(os.path.join(killed, p)):
        os.remove(os.path.join(killed, p))
old = sorted(glob.glob(os.path.join(killed, "tensorboard", "events.out.tfevents.*")))
r = elbo(killed, "--resume", "auto")
check("at step 100" in r.stdout, "resumed from the step-100 checkpoint", r.stdout[-2000:])
files = sorted(glob.glob(os.path.join(killed, "tensorboard", "events.out.tfevents.*")))
check(len(files) == 2 and old[0] in files, f"the resumed run adds a second events file: {files}")
old_steps = {s for s, _ in events(old[0])[1]}
check(max(old_steps) == 100, f"the first file keeps steps up to the checkpoint's (has {sorted(old_steps)})")
new_steps = {s for s, _ in events([f for f in files if f != old[0]][0])[1]}
check(min(new_steps) > 100, f"the new file starts after the checkpoint (has {sorted(new_steps)})")
rows = csv_rows(killed)
exp = expected_scalars(rows)
got, dupes = scalars_of(files)
check(not dupes, "across both files each (tag, step) is written once", str(dupes[:5]))
check(set(got) == set(exp) and all(got[k] == exp[k] for k in exp),
      "both files together hold exactly metrics.csv's cells",
      str(sorted(set(got) ^ set(exp))[:10]))

# 3. Turned off.
off = os.path.join(a.work, "off")
elbo(off, "--set", "output.tensorboard=false", "--set", "train.epochs=1", "--set", "eval.every=0")
check(not os.path.exists(os.path.join(off, "tensorboard")), "output.tensorboard: false writes no event files")
check("tensorboard: false" in open(os.path.join(off, "spec.yaml")).read(), "spec.yaml records output.tensorboard")

check.finish()
