"""Shared by the Python test drivers that run `elbo` under mpirun: the common
arguments (--elbo --data --spec --work) and a fresh work directory."""
import argparse, os, shutil


def parse_args(description, more=None):
    """The common arguments; `more(parser)` may add a script's own."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--elbo", required=True, help="the elbo binary")
    ap.add_argument("--data", required=True, help="directory with train/ and test/ splits from elbo-shard")
    ap.add_argument("--spec", required=True, help="the spec to start from (configs/smoke.yaml)")
    ap.add_argument("--work", required=True, help="scratch directory, emptied first")
    if more is not None:
        more(ap)
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    return a


class Checks:
    """Named assertions that all run and are reported ("ok"/"FAIL" lines); finish()
    exits non-zero when any failed."""
    def __init__(self):
        self.failures = []

    def __call__(self, cond, what, detail=""):
        print(("ok   " if cond else "FAIL ") + what + (f"\n{detail}" if detail and not cond else ""))
        if not cond:
            self.failures.append(what)

    def finish(self):
        if self.failures:
            raise SystemExit(f"{len(self.failures)} check(s) failed: {self.failures}")


# A small convolutional VAE for 28x28 data (conv, GroupNorm, transposed conv), as one
# --set value: `--set`, harness.SMALL_CONV_MODEL.
SMALL_CONV_MODEL = (
    "model={type: conv, latent: 8, likelihood: bernoulli, "
    "encoder: [{type: conv2d, channels: 8, kernel: 4, stride: 2, padding: 1}, relu, {type: group_norm, groups: 4}, "
    "flatten], decoder: [{type: linear, features: 392}, relu, {type: reshape, shape: [8, 7, 7]}, "
    "{type: conv_transpose2d, channels: 4, kernel: 4, stride: 2, padding: 1}, relu, "
    "{type: conv_transpose2d, channels: 1, kernel: 4, stride: 2, padding: 1}]}")

# A tiny hierarchical VAE for 28x28 data (model.type: hierarchical): stages at 14x14
# and 7x7, three latent groups (98 + 98 + 392 elements per sample). A --set value.
SMALL_HVAE_MODEL = (
    "model={type: hierarchical, width: 8, bottleneck: 4, likelihood: bernoulli, "
    "stages: [{down: 2, blocks: 1, groups: 1, latent: 2}, {down: 2, blocks: 1, groups: 2, latent: 2}]}")
