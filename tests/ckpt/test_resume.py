#!/usr/bin/env python3
"""Checkpoint and resume, with real processes:
  1. stopped by SIGUSR1 (sent to mpirun, which forwards it) at whatever step the
     signal lands on, exit code 75, then --resume auto: final parameters
     bit-identical to an uninterrupted run (CPU, 2 ranks, cosine LR + warm-up, KL
     warm-up, dynamic binarization: every piece of state that must carry over);
  2. --resume PATH from a periodic checkpoint that falls mid-epoch: bit-identical;
  3. world size 3 -> 2 at the same global batch: same sample order, parameters
     close (1e-5 relative per tensor);
  4. a corrupted (bit-flipped) and a truncated newest checkpoint: auto-resume says
     so, falls back to the previous valid one, and still ends bit-identical;
  5. an incompatible spec change (model.latent) is refused naming the key; a
     compatible one (optim.lr) is accepted and logged;
  6. the checkpoint reads in h5py with the model file's parameter names;
  7. a convolutional VAE resumed from a mid-epoch checkpoint: bit-identical;
  8. the cyclical KL schedule with free bits (per-dimension KL floors all-reduced
     between forward and backward), resumed mid-cycle from a mid-epoch checkpoint:
     bit-identical, metrics.csv continuing the same beta and clamped columns;
  9. optim.ema: resumed from a mid-epoch checkpoint, the moving average (model.h5's
     /params) and the parameters (/params_raw) bit-identical to an uninterrupted
     run, and the parameters bit-identical to the run without EMA (the average
     never feeds back into training);
 10. loss.type iwae with DReG (k = 3) through the KL warm-up, resumed from a mid-epoch
     checkpoint: bit-identical, and the logged bound continues the same;
 11. a hierarchical model (model.type: hierarchical) resumed from a mid-epoch
     checkpoint: bit-identical, and the per-group KL column continues the same;
 12. the same with per-stage widths and decoder-only blocks: bit-identical."""
import glob, os, re, shutil, signal, subprocess, sys, time
import h5py, numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402

a = harness.parse_args(__doc__)
check = harness.Checks()


def cmd(np_, out, *extra):
    return ["mpirun", "-np", str(np_), a.elbo, "train", a.spec, "--set", "device=cpu",
            "--set", f"data.train={a.data}/train", "--set", "data.test=", "--set", "data.max_samples=960",
            "--set", "data.binarize=true", "--set", "train.batch_size=48", "--set", "train.epochs=6",
            "--set", "optim.schedule=cosine", "--set", "optim.warmup_steps=10", "--set", "loss.kl_warmup_steps=30",
            "--set", "train.log_every=5", "--set", "checkpoint.every=25", "--set", "checkpoint.keep=0",
            "--set", f"output.dir={out}", *extra]


def run(np_, out, *extra, expect=0):
    r = subprocess.run(cmd(np_, out, *extra), capture_output=True, text=True, timeout=300)
    if expect is not None and r.returncode != expect:
        sys.exit(f"{out}: exit {r.returncode}, expected {expect}:\n{r.stdout}\n{r.stderr}")
    return r


def params(out):
    with h5py.File(os.path.join(out, "model.h5"), "r") as f:
        assert f.attrs["step"] == 120, f.attrs["step"]
        return {k: f["params"][k][...] for k in f["params"]}


def identical(p, q):
    return all(np.array_equal(p[k], q[k]) for k in q)


def worst(p, q):
    return max(np.linalg.norm(p[k].astype(np.float64) - q[k]) / max(np.linalg.norm(q[k].astype(np.float64)), 1e-30)
               for k in q)


ref_dir = os.path.join(a.work, "ref")
run(2, ref_dir)
ref = params(ref_dir)
ckpts = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ref_dir, "checkpoints", "ckpt-*.h5")))
check(ckpts == [f"ckpt-{s:09d}.h5" for s in (25, 50, 75, 100, 120)], f"periodic + final checkpoints written: {ckpts}")

# 1. SIGUSR1 mid-run, then --resume auto.
sig_dir = os.path.join(a.work, "signal")
p = subprocess.Popen(cmd(2, sig_dir, "--set", "checkpoint.every=0"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True)
metrics = os.path.join(sig_dir, "metrics.csv")
deadline = time.time() + 120
while time.time() < deadline and p.poll() is None:
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3:
        break
    time.sleep(0.05)
p.send_signal(signal.SIGUSR1)
out, err = p.communicate(timeout=120)
check(p.returncode == 75, f"SIGUSR1: exit code 75 (got {p.returncode})", out + err)
m = re.search(r"stop requested .* at step (\d+): wrote (\S+)", out)
check(m is not None, "SIGUSR1: the log names the step and the checkpoint", out)
k = int(m.group(1)) if m else -1
print(f"     stopped at step {k} (mid-epoch: {k % 20 != 0})")
check(0 < k < 120, "SIGUSR1 landed mid-run")
r = run(2, sig_dir, "--set", "checkpoint.every=0", "--resume", "auto")
check(f"continuing from" in r.stdout and f"at step {k}" in r.stdout, "resume auto names the checkpoint and step", r.stdout)
check(identical(params(sig_dir), ref), f"stopped at step {k} + resumed == uninterrupted, bit for bit")
rows = [int(l.split(",")[0]) for l in open(metrics).read().splitlines()[1:]]
check(rows == sorted(set(rows)), "metrics.csv of the resumed run has each step once, in order", str(rows))

# 2. --resume PATH from step 25 (epoch 2, batch 5) into a new directory.
mid_dir = os.path.join(a.work, "mid")
run(2, mid_dir, "--resume", os.path.join(ref_dir, "checkpoints", "ckpt-000000025.h5"))
check(identical(params(mid_dir), ref), "resumed from the mid-epoch checkpoint at step 25 == uninterrupted, bit for bit")

# 3. World size 3 -> 2.
w3_dir, w32_dir = os.path.join(a.work, "w3"), os.path.join(a.work, "w3to2")
run(3, w3_dir)
run(2, w32_dir, "--resume", os.path.join(w3_dir, "checkpoints", "ckpt-000000050.h5"))
err = worst(params(w32_dir), params(w3_dir))
check(err < 1e-5, f"3 ranks to step 50, then 2 ranks vs 3 ranks throughout: {err:.2e} relative (< 1e-5)")
check(worst(params(w3_dir), ref) < 1e-5, "3-rank and 2-rank runs agree (same sample order)")

# 4. Corrupted and truncated newest checkpoints: fall back.
bad_dir = os.path.join(a.work, "bad")
shutil.copytree(ref_dir, bad_dir)
os.remove(os.path.join(bad_dir, "model.h5"))
newest = os.path.join(bad_dir, "checkpoints", "ckpt-000000120.h5")
with open(newest, "r+b") as f:  # flip bytes in the middle: HDF5 still opens, the checksum must not match
    f.seek(os.path.getsize(newest) // 2)
    chunk = f.read(64)
    f.seek(os.path.getsize(newest) // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))
second = os.path.join(bad_dir, "checkpoints", "ckpt-000000100.h5")
with open(second, "r+b") as f:
    f.truncate(os.path.getsize(second) // 3)
r = run(2, bad_dir, "--resume", "auto")
check(r.stdout.count("skipping an unusable checkpoint") == 2, "auto-resume reports both damaged checkpoints", r.stdout)
check("checksum mismatch" in r.stdout, "the bit flip is caught by the checksum", r.stdout)
check("at step 75" in r.stdout, "auto-resume falls back to step 75", r.stdout)
check(identical(params(bad_dir), ref), "fallback resume still ends bit-identical")

# 5. Spec changes on resume.
r = run(2, ref_dir, "--resume", "auto", "--set", "model.latent=4", expect=2)
check(re.search(r"model\.latent: cannot change on resume .*has 8, the spec says 4", r.stderr) is not None,
      "incompatible change refused naming the key and both values", r.stderr)
r = run(2, ref_dir, "--resume", "auto", "--set", "optim.lr=1e-3", "--set", "train.epochs=7")
check("spec change accepted: optim.lr" in r.stdout and "train.epochs: 6 -> 7" in r.stdout,
      "compatible changes accepted and logged", r.stdout)

# 6. h5py view.
with h5py.File(os.path.join(ref_dir, "checkpoints", "ckpt-000000050.h5"), "r") as f:
    names = set(f["params"])
    check(names == set(ref) and set(f["optim/exp_avg"]) == names and set(f["optim/exp_avg_sq"]) == names,
          "checkpoint: /params, /optim/exp_avg, /optim/exp_avg_sq with the model file's names")
    check(f.attrs["step"] == 50 and f.attrs["world_size"] == 2 and f.attrs["epoch"] == 2 and f.attrs["batch_in_epoch"] == 10,
          "checkpoint attributes: step, world size, epoch and batch position")

# 7. A conv VAE: uninterrupted against resumed from its step-25 checkpoint.
conv_ref, conv_mid = os.path.join(a.work, "conv_ref"), os.path.join(a.work, "conv_mid")
run(2, conv_ref, "--set", harness.SMALL_CONV_MODEL, "--set", "train.epochs=2", "--set", "checkpoint.every=25")
run(2, conv_mid, "--set", harness.SMALL_CONV_MODEL, "--set", "train.epochs=2",
    "--resume", os.path.join(conv_ref, "checkpoints", "ckpt-000000025.h5"))
with h5py.File(os.path.join(conv_ref, "model.h5"), "r") as f, h5py.File(os.path.join(conv_mid, "model.h5"), "r") as g:
    check(f.attrs["step"] == 40 and all(np.array_equal(f["params"][k][...], g["params"][k][...]) for k in f["params"]),
          "conv VAE resumed from the mid-epoch checkpoint at step 25 == uninterrupted, bit for bit")

# 8. Cyclical KL annealing + free bits: 120 steps in 4 cycles of 30 (ramp 15); the
# step-50 checkpoint sits mid-epoch in the ramp of the second cycle.
kl_extra = ("--set", "loss.kl_warmup_steps=0", "--set", "loss.kl_schedule=cyclical", "--set", "loss.kl_cycles=4",
            "--set", "loss.free_bits=1.0", "--set", "loss.free_bits_group=2")
kl_ref, kl_mid = os.path.join(a.work, "kl_ref"), os.path.join(a.work, "kl_mid")
run(2, kl_ref, *kl_extra)
run(2, kl_mid, *kl_extra, "--resume", os.path.join(kl_ref, "checkpoints", "ckpt-000000050.h5"))
kl_params = params(kl_ref)
check(identical(params(kl_mid), kl_params), "cyclical schedule + free bits resumed at step 50 == uninterrupted, "
      "bit for bit")
check(worst(kl_params, ref) > 1e-3, "the cyclical schedule with free bits trains differently from the linear warm-up")


def csv_rows(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        rows = [l.split(",") for l in f.read().splitlines()]
    return [dict(zip(rows[0], r)) for r in rows[1:]]


ref_rows = {r["step"]: r for r in csv_rows(kl_ref)}
mid_rows = [r for r in csv_rows(kl_mid) if int(r["step"]) > 50]
check(len(mid_rows) > 0 and all(r["beta"] == ref_rows[r["step"]]["beta"] and
                                r["kl_clamped_dims"] == ref_rows[r["step"]]["kl_clamped_dims"] for r in mid_rows),
      "the resumed run logs the same beta and clamped dimensions as the uninterrupted one",
      str([(r["step"], r["beta"], r["kl_clamped_dims"]) for r in mid_rows]))
betas = [float(r["beta"]) for r in ref_rows.values()]
check(min(betas) < 0.5 and max(betas) == 1.0, f"beta cycles between its ramp and 1: {betas}")

# 9. optim.ema across a resume.
ema_ref, ema_mid = os.path.join(a.work, "ema_ref"), os.path.join(a.work, "ema_mid")
run(2, ema_ref, "--set", "optim.ema=0.95")
run(2, ema_mid, "--set", "optim.ema=0.95", "--resume", os.path.join(ema_ref, "checkpoints", "ckpt-000000025.h5"))


def group(out, name):
    with h5py.File(os.path.join(out, "model.h5"), "r") as f:
        return {k: f[name][k][...] for k in f[name]}


check(identical(group(ema_mid, "params"), group(ema_ref, "params")) and
      identical(group(ema_mid, "params_raw"), group(ema_ref, "params_raw")),
      "optim.ema: resumed from step 25 == uninterrupted, average and parameters bit for bit")
check(identical(group(ema_ref, "params_raw"), ref) and not identical(group(ema_ref, "params"), ref),
      "optim.ema: the parameters are the run without EMA's, bit for bit; the average is not")

# 10. The importance-weighted bound with DReG, resumed at step 25 (inside the KL warm-up).
iw_extra = ("--set", "loss.type=iwae", "--set", "loss.samples=3", "--set", "loss.dreg=true")
iw_ref, iw_mid = os.path.join(a.work, "iw_ref"), os.path.join(a.work, "iw_mid")
run(2, iw_ref, *iw_extra)
run(2, iw_mid, *iw_extra, "--resume", os.path.join(iw_ref, "checkpoints", "ckpt-000000025.h5"))
check(identical(params(iw_mid), params(iw_ref)), "loss.type iwae + dreg resumed at step 25 == uninterrupted, bit for bit")
check(worst(params(iw_ref), ref) > 1e-3, "the IWAE run trains differently from the ELBO run")
iw_rows = {r["step"]: r["neg_iwae"] for r in csv_rows(iw_ref)}
later = [r for r in csv_rows(iw_mid) if int(r["step"]) > 25]
check(len(later) > 0 and all(r["neg_iwae"] == iw_rows[r["step"]] and r["neg_iwae"] != "" for r in later),
      "the resumed IWAE run logs the same bound as the uninterrupted one")

# 11. A hierarchical model, resumed at step 25 (mid-epoch, inside the KL warm-up).
hv_extra = ("--set", harness.SMALL_HVAE_MODEL)
hv_ref, hv_mid = os.path.join(a.work, "hv_ref"), os.path.join(a.work, "hv_mid")
run(2, hv_ref, *hv_extra)
run(2, hv_mid, *hv_extra, "--resume", os.path.join(hv_ref, "checkpoints", "ckpt-000000025.h5"))
hv = params(hv_ref)
check(any(k.startswith("decoder.") for k in hv) and identical(params(hv_mid), hv),
      "hierarchical model resumed at step 25 == uninterrupted, bit for bit")
hv_rows = {r["step"]: r["kl_groups"] for r in csv_rows(hv_ref)}
later = [r for r in csv_rows(hv_mid) if int(r["step"]) > 25]
check(len(later) > 0 and all(r["kl_groups"] == hv_rows[r["step"]] and len(r["kl_groups"].split(";")) == 3
                             for r in later),
      "the resumed hierarchical run logs the same per-group KL (3 groups) as the uninterrupted one")

# 12. The same with per-stage widths (grown and shrunk between stages) and decoder-only blocks.
hw_extra = ("--set", "model={type: hierarchical, width: 8, bottleneck: 4, likelihood: bernoulli, stages: ["
            "{down: 2, blocks: 1, groups: 0, dec_blocks: 1, width: 4, bottleneck: 2}, "
            "{down: 2, blocks: 1, groups: 2, latent: 2, dec_blocks: 1, width: 12}, "
            "{down: 7, blocks: 1, groups: 1, latent: 2, width: 6}]}")
hw_ref, hw_mid = os.path.join(a.work, "hw_ref"), os.path.join(a.work, "hw_mid")
run(2, hw_ref, *hw_extra)
run(2, hw_mid, *hw_extra, "--resume", os.path.join(hw_ref, "checkpoints", "ckpt-000000025.h5"))
hw = params(hw_ref)
check("decoder.stages.0.blocks.0.c1.weight" in hw and identical(params(hw_mid), hw),
      "hierarchical model with per-stage widths and decoder blocks resumed at step 25 == uninterrupted, bit for bit")
check.finish()
