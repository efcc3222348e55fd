"""What the elbo-shard end-to-end tests share: their command line (--elbo-shard,
--work, and any extras), an emptied work directory, running elbo-shard with progress
lines off, expected failures collected in `bad`, and reading a split back with h5py.

    a, W, bad, ENV, shard, expect = setup(__doc__)
"""
import argparse, os, re, shutil, subprocess

import h5py, numpy as np


def setup(description, extra=()):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--elbo-shard", required=True)
    ap.add_argument("--work", required=True)
    for name, help_text in extra:
        ap.add_argument(name, required=True, help=help_text)
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    bad = []
    env = dict(os.environ, ELBO_PROGRESS="off")

    def shard(*args):
        return subprocess.run([a.elbo_shard, *args], capture_output=True, text=True, env=env)

    def expect(args, code, text):
        """elbo-shard ARGS must exit CODE with TEXT on stderr; a mismatch goes into `bad`."""
        r = shard(*args)
        if r.returncode != code or text not in r.stderr:
            bad.append(f"elbo-shard {' '.join(args)}: exit {r.returncode}, stderr {r.stderr!r}; wanted {code} and "
                       f"{text!r}")
        return r

    return a, a.work, bad, env, shard, expect


def read_split(d):
    """(images, labels or None) of the split in directory d, in manifest order."""
    text = open(f"{d}/manifest.yaml").read()
    xs, ys = [], []
    for name in re.findall(r"- file: (\S+)", text):
        with h5py.File(f"{d}/{name}", "r") as f:
            xs.append(f["images"][...])
            ys.append(f["labels"][...] if "labels" in f else None)
    return np.concatenate(xs), (np.concatenate(ys) if ys[0] is not None else None)
