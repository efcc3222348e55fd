#!/usr/bin/env python3
"""N ranks against 1 rank: train the smoke spec for 20 steps with np = 1, 2, 3 at
the same global batch (48, with a short last batch of 20 rows split unevenly) and
require every parameter tensor to agree within 1e-5 relative, with the default
gradient buckets, with many tiny buckets (hundreds of overlapped all-reduces per
step) and with one all-reduce after backward; and a small convolutional VAE (conv,
GroupNorm, transposed conv) on 1 and 3 ranks. train.cuda_graph=on on the CPU (the
recorded step is replayed as plain calls) must give the same bits as off, through
the KL warm-up and the short last batch that run outside the recording, and through
the cyclical KL schedule (only its steps at beta replay the recording). Free bits with
the cyclical schedule (the per-dimension KL floor on the GLOBAL batch mean, its sums
all-reduced between forward and backward) on 1, 2 and 3 ranks: the same parameters,
with groups clamped in some steps and not others. With optim.ema the moving average
(model.h5's /params) and the parameters (/params_raw) agree on 1, 2 and 3 ranks within
the same 1e-5. loss.type iwae (k = 4 samples per input, eps keyed by the input's global
position) and its DReG variant on 1, 2 and 3 ranks: the same logged bound within 1e-5 and
the same parameters within 1e-4 (the normalized weights are exponentials of differences
of log w of hundreds of nats, so rounding differences between ranks' row blocks that
the ELBO's gradient feels at 1e-7 reach the IWAE gradient at about 1e-5 after 20 Adam
steps; a wrong eps key or weight would differ by 1e-1), a recorded step bit-identical to
op-by-op steps. A hierarchical model (model.type: hierarchical) on 1 and 3 ranks: the
same parameters within 1e-5 and the same logged per-group KL within 1e-5, and with free
bits per latent group the same parameters and clamped groups; with per-stage widths and
decoder-only blocks the same parameters within 1e-5. A run with
another seed must differ, so the comparison itself is known to bite."""
import os, shutil, subprocess, sys
import h5py, numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402

a = harness.parse_args(__doc__)

def metrics(tag):
    with open(os.path.join(a.work, tag, "metrics.csv")) as f:
        rows = [l.split(",") for l in f.read().splitlines()]
    return [dict(zip(rows[0], r)) for r in rows[1:]]

def train(np_, tag, *extra):
    out = os.path.join(a.work, tag)
    cmd = ["mpirun", "-np", str(np_), a.elbo, "train", a.spec, "--set", "device=cpu",
           "--set", f"data.train={a.data}/train", "--set", "data.test=",
           "--set", "data.max_samples=500", "--set", "train.max_steps=20",
           "--set", "train.batch_size=48", "--set", "train.log_every=5",
           "--set", f"output.dir={out}", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        sys.exit(f"np={np_} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    with h5py.File(os.path.join(out, "model.h5"), "r") as f:
        assert f.attrs["step"] == 20, f.attrs["step"]
        return {k: f["params"][k][...].astype(np.float64) for k in f["params"]}

def worst(a_, b_):
    errs = {k: np.linalg.norm(a_[k] - b_[k]) / max(np.linalg.norm(b_[k]), 1e-30) for k in b_}
    k = max(errs, key=errs.get)
    return errs[k], k

ref = train(1, "np1")
failed = False
variants = [(2, "default buckets", []), (3, "default buckets", []),
            (3, "4 KB buckets", ["--set", "dist.bucket_mb=0.004"]),
            (2, "one all-reduce", ["--set", "dist.bucket_mb=0"])]
for i, (n, label, extra) in enumerate(variants):
    other = train(n, f"np{n}_{i}", *extra)
    assert set(other) == set(ref)
    err, name = worst(other, ref)
    maxabs = max(float(np.max(np.abs(other[k] - ref[k]))) for k in ref)
    print(f"np={n} ({label}) vs np=1: worst per-tensor relative error {err:.3e} ({name}), max abs diff {maxabs:.3e}")
    if err > 1e-5:
        failed = True
CONV = harness.SMALL_CONV_MODEL
conv1 = train(1, "conv_np1", "--set", CONV)
conv3 = train(3, "conv_np3", "--set", CONV, "--set", "dist.bucket_mb=0.004")
err, name = worst(conv3, conv1)
print(f"conv VAE np=3 (4 KB buckets) vs np=1: worst per-tensor relative error {err:.3e} ({name})")
if err > 1e-5:
    failed = True
def raw(tag):
    with h5py.File(os.path.join(a.work, tag, "model.h5"), "r") as f:
        return {k: f["params_raw"][k][...].astype(np.float64) for k in f["params_raw"]}

EMA = ("--set", "optim.ema=0.9")
ema1 = train(1, "ema_np1", *EMA)
for n in (2, 3):
    avg = train(n, f"ema_np{n}", *EMA)
    err, name = worst(avg, ema1)
    err_raw, name_raw = worst(raw(f"ema_np{n}"), raw("ema_np1"))
    print(f"optim.ema np={n} vs np=1: moving average {err:.3e} ({name}), parameters {err_raw:.3e} ({name_raw})")
    if err > 1e-5 or err_raw > 1e-5:
        failed = True
err, _ = worst(ema1, raw("ema_np1"))
print(f"optim.ema np=1: the average differs from the parameters by {err:.3e} (must be large)")
if err < 1e-3:
    sys.exit("model.h5's /params is not the moving average: the EMA comparison cannot fail")
warm = ("--set", "loss.kl_warmup_steps=6")
replayed = train(2, "np2_graph_on", *warm, "--set", "train.cuda_graph=on")
eager = train(2, "np2_graph_off", *warm, "--set", "train.cuda_graph=off")
same = all(np.array_equal(replayed[k], eager[k]) for k in eager)
print(f"recorded-step replay vs op-by-op steps (np=2): bit-identical = {same}")
if not same:
    failed = True
cyc = ("--set", "loss.kl_schedule=cyclical", "--set", "loss.kl_cycles=3", "--set", "loss.kl_ramp=0.5")
replayed = train(2, "np2_cyc_graph_on", *cyc, "--set", "train.cuda_graph=on")
eager = train(2, "np2_cyc_graph_off", *cyc, "--set", "train.cuda_graph=off")
same = all(np.array_equal(replayed[k], eager[k]) for k in eager)
print(f"cyclical KL schedule: recorded-step replay vs op-by-op steps (np=2): bit-identical = {same}")
if not same:
    failed = True
# Free bits: 1.5 nats per dimension in groups of 2 (floor 3 nats per group) on the
# cyclical schedule. The 20 steps run 3 batch sizes (48, 48, ..., 20 uneven rows).
fb = (*cyc, "--set", "loss.free_bits=1.5", "--set", "loss.free_bits_group=2")
fb1 = train(1, "fb_np1", *fb)
clamped = [float(r["kl_clamped_dims"]) for r in metrics("fb_np1")]
print(f"free bits np=1: mean clamped dimensions per logged interval {clamped}")
if not (any(c > 0 for c in clamped) and any(c < 8 for c in clamped)):
    sys.exit("free bits: the test run must clamp some groups and not all, or it checks nothing")
if worst(fb1, eager)[0] < 1e-3:
    sys.exit("free bits changed nothing against the same run without them: the floor is not applied")
for n, label, extra in ((2, "", ()), (3, "", ()), (3, ", sharded optimizer", ("--set", "dist.shard_optimizer=true"))):
    tag = f"fb_np{n}" + ("_zero" if extra else "")
    other = train(n, tag, *fb, *extra)
    err, name = worst(other, fb1)
    print(f"free bits np={n}{label} vs np=1: worst per-tensor relative error {err:.3e} ({name})")
    if err > 1e-5:
        failed = True
    if [float(r["kl_clamped_dims"]) for r in metrics(tag)] != clamped:
        print(f"free bits np={n}: the clamped dimensions differ from np=1 (the floor must see the global batch)")
        failed = True
IW = ("--set", "loss.type=iwae", "--set", "loss.samples=4")
for label, extra in (("iwae", ()), ("iwae+dreg", ("--set", "loss.dreg=true"))):
    tag = label.replace("+", "_")
    one = train(1, f"{tag}_np1", *IW, *extra)
    bound1 = [float(r["neg_iwae"]) for r in metrics(f"{tag}_np1")]
    for n, more in ((2, ()), (3, ("--set", "dist.bucket_mb=0.004"))):
        other = train(n, f"{tag}_np{n}", *IW, *extra, *more)
        err, name = worst(other, one)
        bounds = [float(r["neg_iwae"]) for r in metrics(f"{tag}_np{n}")]
        berr = max(abs(x - y) / abs(y) for x, y in zip(bounds, bound1))
        print(f"{label} np={n} vs np=1: worst per-tensor relative error {err:.3e} ({name}), logged bound {berr:.2e}")
        if err > 1e-4 or berr > 1e-5 or len(bounds) != len(bound1):
            failed = True
    if label == "iwae":
        iw1 = one
        if worst(iw1, ref)[0] < 1e-3:
            sys.exit("loss.type iwae trained the same parameters as the ELBO: the bound is not used")
    elif worst(one, iw1)[0] < 1e-3:
        sys.exit("loss.dreg changed nothing against plain IWAE: the estimator is not used")
replayed = train(2, "iwae_graph_on", *IW, *warm, "--set", "train.cuda_graph=on")
eager = train(2, "iwae_graph_off", *IW, *warm, "--set", "train.cuda_graph=off")
same = all(np.array_equal(replayed[k], eager[k]) for k in eager)
print(f"iwae: recorded-step replay vs op-by-op steps (np=2): bit-identical = {same}")
if not same:
    failed = True
HV = ("--set", harness.SMALL_HVAE_MODEL)
hv1 = train(1, "hvae_np1", *HV)
hv3 = train(3, "hvae_np3", *HV, "--set", "dist.bucket_mb=0.004")
err, name = worst(hv3, hv1)
g1 = [[float(v) for v in r["kl_groups"].split(";")] for r in metrics("hvae_np1")]
g3 = [[float(v) for v in r["kl_groups"].split(";")] for r in metrics("hvae_np3")]
gerr = max(abs(x - y) / max(abs(y), 1e-12) for r3, r1 in zip(g3, g1) for x, y in zip(r3, r1))
print(f"hierarchical np=3 (4 KB buckets) vs np=1: worst per-tensor relative error {err:.3e} ({name}), "
      f"per-group KL {gerr:.2e} over {len(g1)} rows of {len(g1[0])} groups")
if err > 1e-5 or gerr > 1e-5 or len(g3) != len(g1) or len(g1[0]) != 3:
    failed = True
# Free bits per latent group (floor 0.03 nats x 98, 98, 392 elements) on the cyclical
# schedule: the floors see the global batch's per-group KL on any number of ranks.
HFB = (*HV, *cyc, "--set", "loss.free_bits=0.03")
hfb1 = train(1, "hvae_fb_np1", *HFB)
hclamped = [float(r["kl_clamped_dims"]) for r in metrics("hvae_fb_np1")]
hfb3 = train(3, "hvae_fb_np3", *HFB)
err, name = worst(hfb3, hfb1)
print(f"hierarchical free bits np=3 vs np=1: worst per-tensor relative error {err:.3e} ({name}); "
      f"clamped elements per interval {hclamped}")
if not any(c > 0 for c in hclamped) or worst(hfb1, hv1)[0] < 1e-3:
    sys.exit("hierarchical free bits: no group clamped, or nothing changed: the comparison checks nothing")
if err > 1e-5 or [float(r["kl_clamped_dims"]) for r in metrics("hvae_fb_np3")] != hclamped:
    failed = True
# Per-stage widths that grow and shrink (4 -> 12 -> 6: the stream padded and truncated
# both ways) and decoder-only blocks, at 14x14 without latents and at 7x7 with groups:
# their gradients join the buckets in the order backward finishes them.
HW = ("--set", "model={type: hierarchical, width: 8, bottleneck: 4, likelihood: bernoulli, stages: ["
      "{down: 2, blocks: 1, groups: 0, dec_blocks: 1, width: 4, bottleneck: 2}, "
      "{down: 2, blocks: 1, groups: 2, latent: 2, dec_blocks: 1, width: 12}, "
      "{down: 7, blocks: 1, groups: 1, latent: 2, width: 6}]}")
hw1 = train(1, "hvae_widths_np1", *HW)
hw3 = train(3, "hvae_widths_np3", *HW, "--set", "dist.bucket_mb=0.004")
err, name = worst(hw3, hw1)
print(f"hierarchical, per-stage widths and decoder blocks, np=3 (4 KB buckets) vs np=1: worst per-tensor relative "
      f"error {err:.3e} ({name}) over {len(hw1)} tensors")
if not any(".blocks." in k and k.startswith("decoder") for k in hw1) or hw1["encoder.in.weight"].shape[0] != 4:
    sys.exit("hierarchical widths: model.h5 lacks the decoder blocks or stage 0's width: the case checks nothing")
if err > 1e-5:
    failed = True
reseeded = train(2, "np2_seed9", "--set", "seed=9")
err, _ = worst(reseeded, ref)
print(f"seed 9 vs seed 3: per-tensor relative difference {err:.3e} (must be large)")
if err < 1e-2:
    sys.exit("a differently seeded run matches: the parity comparison cannot fail")
if failed:
    sys.exit("data-parallel parity FAILED")
