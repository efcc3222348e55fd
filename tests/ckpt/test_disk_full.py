#!/usr/bin/env python3
"""A full disk while writing, on a small tmpfs that this test mounts (and unmounts):
  1. a periodic checkpoint does not fit: the run ends with a clear error naming the
     file and the reason, a non-zero exit and no crash at exit (HDF5 used to segfault
     in H5F__close_cb), no temporary file is left, and the checkpoint written before
     still verifies: --resume auto on a roomier disk continues from it;
  2. model.h5 does not fit: the same, and the final checkpoint survives, so
     --resume auto elsewhere writes the model.
Needs root to mount a tmpfs; exits 77 (skipped) saying why otherwise."""
import glob, os, re, shutil, subprocess, sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402

a = harness.parse_args(__doc__)
check = harness.Checks()
SIZE = 2 << 20
mnt = os.path.join(a.work, "tmpfs")
os.makedirs(mnt)


def skip(why):
    print(f"skipped: {why}")
    sys.exit(77)


if os.geteuid() != 0:
    skip("mounting a tmpfs needs root")


def mount():
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", mnt], capture_output=True, text=True)
    if r.returncode != 0:
        skip(f"cannot mount a tmpfs on {mnt}: {r.stderr.strip()}")


def umount():
    subprocess.run(["umount", mnt], check=False)


def cmd(np_, out, *extra):
    return ["mpirun", "-np", str(np_), a.elbo, "train", a.spec, "--set", "device=cpu",
            "--set", f"data.train={a.data}/train", "--set", "data.test=", "--set", "data.max_samples=480",
            "--set", "train.batch_size=48", "--set", "train.epochs=1", "--set", "dist.self_test=false",
            "--set", "checkpoint.keep=0", "--set", f"output.dir={out}", *extra]


def run(out, *extra, np_=2):
    return subprocess.run(cmd(np_, out, *extra), capture_output=True, text=True, timeout=300)


def crashed(text):
    return re.search(r"Segmentation fault|Signal: |signal \d+|core dumped", text) is not None


mount()
try:
    # 1. The smoke model's checkpoint (~1.2 MiB) fits once in 2 MiB, the second does not.
    # One rank: the error ends the process normally (with 2 ranks MPI_Abort ends it
    # before HDF5's exit handler could crash).
    run1 = os.path.join(mnt, "run")
    r = run(run1, "--set", "checkpoint.every=1", np_=1)
    text = r.stdout + r.stderr
    ck = os.path.join(run1, "checkpoints")
    first = os.path.join(ck, "ckpt-000000001.h5")
    check(r.returncode == 1, f"checkpoint on a full disk: exit code 1 (got {r.returncode})", text[-3000:])
    check(not crashed(text), "no crash at exit", text[-3000:])
    check(re.search(r"cannot write '[^']*ckpt-000000002\.h5\.tmp': No space left on device", r.stderr) is not None,
          "the error names the checkpoint file and the reason", r.stderr[-2000:])
    check(not glob.glob(os.path.join(ck, "*.tmp")), f"no temporary file left: {os.listdir(ck)}")
    check(os.path.exists(first) and open(os.path.join(ck, "latest")).read().strip() == "ckpt-000000001.h5",
          f"the earlier checkpoint and 'latest' survive: {os.listdir(ck)}")
    ckpt_bytes = os.path.getsize(first) if os.path.exists(first) else 1300000
    moved = os.path.join(a.work, "run1")
    shutil.copytree(run1, moved)
    r = run(moved, "--resume", "auto")
    check(r.returncode == 0 and "continuing from" in r.stdout and "ckpt-000000001.h5" in r.stdout,
          "the surviving checkpoint verifies: --resume auto on a roomier disk continues from it",
          r.stdout[-2000:] + r.stderr[-2000:])
    umount()

    # 2. A filler leaves room for the final checkpoint but not for model.h5 (a third
    # of a checkpoint: parameters without Adam's two moments).
    mount()
    model_bytes = ckpt_bytes // 3
    with open(os.path.join(mnt, "filler"), "wb") as f:
        f.write(b"\0" * (SIZE - ckpt_bytes - (16 << 10) - model_bytes // 2))
    run2 = os.path.join(mnt, "run")
    r = run(run2, "--set", "checkpoint.every=0")
    text = r.stdout + r.stderr
    check(r.returncode == 1, f"model.h5 on a full disk: exit code 1 (got {r.returncode})", text[-3000:])
    check(not crashed(text), "no crash at exit", text[-3000:])
    check(re.search(r"cannot write '[^']*model\.h5\.tmp': No space left on device", r.stderr) is not None,
          "the error names model.h5 and the reason", r.stderr[-2000:])
    check(not os.path.exists(os.path.join(run2, "model.h5")) and not glob.glob(os.path.join(run2, "*.tmp")),
          f"neither model.h5 nor a temporary file is left: {os.listdir(run2)}")
    final = os.path.join(run2, "checkpoints", "ckpt-000000010.h5")
    check(os.path.exists(final), f"the final checkpoint survives: {os.listdir(os.path.join(run2, 'checkpoints'))}")
    moved = os.path.join(a.work, "run2")
    shutil.copytree(run2, moved)
    r = run(moved, "--resume", "auto")
    check(r.returncode == 0 and os.path.exists(os.path.join(moved, "model.h5")),
          "--resume auto on a roomier disk writes model.h5 from it", r.stdout[-2000:] + r.stderr[-2000:])
finally:
    umount()
check.finish()
