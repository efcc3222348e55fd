#!/usr/bin/env python3
"""What the image commands and model loading do to files that already exist:
  1. sample / reconstruct / interpolate -o FILE refuse to replace an existing file
     (exit 2, naming it) unless given --force, and refuse always, --force or not,
     when FILE is the model or a file of the data split they read: compared by file
     identity, so another spelling, a hard link and a symbolic link are caught, and
     the temporary FILE.tmp too; nothing they read is changed;
  2. a model.h5 with a flipped byte in one parameter array is refused by eval and
     sample (exit 1, naming the file and the array); a model file written before
     checksums (attributes removed) still loads, with a note that it is unverified."""
import hashlib, os, shutil, subprocess, sys
import h5py

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402

a = harness.parse_args(__doc__)
check = harness.Checks()


def elbo(*args):
    return subprocess.run(["mpirun", "-np", "1", a.elbo, *args], capture_output=True, text=True, timeout=300)


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


run_dir = os.path.join(a.work, "run")
r = elbo("train", a.spec, "--set", "device=cpu", "--set", f"data.train={a.data}/train", "--set", "data.test=",
         "--set", "data.max_samples=480", "--set", "train.epochs=1", "--set", "dist.self_test=false",
         "--set", f"output.dir={run_dir}")
if r.returncode != 0:
    sys.exit(f"training failed:\n{r.stdout}\n{r.stderr}")
model = os.path.join(run_dir, "model.h5")
model_sum = digest(model)
split = os.path.join(a.work, "test")  # a copy: a failure here must not damage the shared test data
shutil.copytree(os.path.join(a.data, "test"), split)
split_sums = {f: digest(os.path.join(split, f)) for f in os.listdir(split)}
shard = sorted(f for f in split_sums if f.endswith(".h5"))[0]

# 1. Existing outputs.
png = os.path.join(a.work, "s.png")
r = elbo("sample", model, "-n", "4", "--seed", "1", "-o", png)
check(r.returncode == 0 and os.path.exists(png), "sample writes a new file", r.stderr[-1000:])
first = digest(png) if os.path.exists(png) else ""
r = elbo("sample", model, "-n", "4", "--seed", "2", "-o", png)
check(r.returncode == 2 and png in r.stderr and "--force" in r.stderr,
      f"an existing -o file is refused naming it and --force (exit {r.returncode})", r.stderr[-1000:])
check(os.path.exists(png) and digest(png) == first, "and left as it was")
r = elbo("sample", model, "-n", "4", "--seed", "2", "-o", png, "--force")
check(r.returncode == 0 and digest(png) != first, "--force replaces it", r.stderr[-1000:])

hard = os.path.join(a.work, "hardlink.png")
os.link(model, hard)
soft = os.path.join(a.work, "symlink.png")
os.symlink(model, soft)
respelled = os.path.join(run_dir, ".", "..", "run", "model.h5")
for out, what in ((model, "the model itself"), (respelled, "the model spelled differently"),
                  (hard, "a hard link to the model"), (soft, "a symbolic link to the model")):
    for extra in ([], ["--force"]):
        r = elbo("sample", model, "-n", "4", "-o", out, *extra)
        check(r.returncode == 2 and out in r.stderr and "model file" in r.stderr,
              f"-o {what} {' '.join(extra)}: refused naming it (exit {r.returncode})", r.stderr[-1000:])
os.symlink(model, os.path.join(a.work, "t.png.tmp"))
r = elbo("sample", model, "-n", "4", "-o", os.path.join(a.work, "t.png"), "--force")
check(r.returncode == 2 and "t.png.tmp" in r.stderr,
      f"a temporary file FILE.tmp that links to the model is refused (exit {r.returncode})", r.stderr[-1000:])
check(digest(model) == model_sum, "the model is unchanged")

for cmd in (["reconstruct", "-n", "4"], ["interpolate", "--steps", "3"]):
    for f in ("manifest.yaml", shard):
        out = os.path.join(split, f)
        r = elbo(cmd[0], model, "--data", split, *cmd[1:], "-o", out, "--force")
        check(r.returncode == 2 and out in r.stderr and "data split" in r.stderr,
              f"{cmd[0]} -o <split>/{f} --force: refused naming it (exit {r.returncode})", r.stderr[-1000:])
check(all(digest(os.path.join(split, f)) == s for f, s in split_sums.items()), "the data split is unchanged")

# 2. Checksums.
flipped = os.path.join(a.work, "flipped.h5")
shutil.copy(model, flipped)
array = "encoder.mu.weight"
with h5py.File(flipped, "r") as f:
    offset = f["params"][array].id.get_offset()
with open(flipped, "r+b") as f:
    f.seek(offset + 6)
    b = f.read(1)
    f.seek(offset + 6)
    f.write(bytes([b[0] ^ 0x08]))
r = elbo("eval", flipped, "--data", split, "--max-samples", "100")
check(r.returncode == 1 and flipped in r.stderr and f"params/{array}" in r.stderr and "checksum" in r.stderr,
      f"eval refuses a flipped byte naming the file and the array (exit {r.returncode})",
      r.stdout[-1000:] + r.stderr[-1000:])
out = os.path.join(a.work, "from_flipped.png")
r = elbo("sample", flipped, "-o", out)
check(r.returncode == 1 and not os.path.exists(out), f"sample refuses it too and writes nothing (exit {r.returncode})",
      r.stderr[-1000:])

legacy = os.path.join(a.work, "legacy.h5")
shutil.copy(model, legacy)
with h5py.File(legacy, "r+") as f:
    for obj in [f] + [f["params"][k] for k in f["params"]]:
        if "checksum_fnv1a64" in obj.attrs:
            del obj.attrs["checksum_fnv1a64"]
out = os.path.join(a.work, "from_legacy.png")
r = elbo("sample", legacy, "-o", out)
check(r.returncode == 0 and os.path.exists(out), "a model file without checksums (older elbo) still loads",
      r.stderr[-1000:])
check("note:" in r.stderr and legacy in r.stderr and "not verified" in r.stderr,
      "with a note that it is unverified", r.stderr[-1000:])
r = elbo("sample", model, "-o", os.path.join(a.work, "from_model.png"))
check(r.returncode == 0 and "not verified" not in r.stderr, "a model file with checksums loads without the note",
      r.stderr[-1000:])
check.finish()
