#!/usr/bin/env python3
"""The GPU replica against the CPU reference and against itself (needs a GPU; exits
with ctest's skip code 77 and the reason otherwise):
  1. 50 steps on the GPU vs 50 on the CPU from the same initial parameters (the
     init is the same Philox draw on both): the logged losses agree within 1e-3
     relative and every parameter tensor within 5e-3 relative (FP32 on both, cuBLAS
     in FP32 mode, TF32 off; the gap is summation order amplified by 50 Adam steps).
  2. NCCL with 1 rank vs the MPI path with 1 rank: bit-identical parameters (a
     one-rank all-reduce is a copy).
  3. 2 ranks sharing one GPU through the MPI communicator (pinned-host staging)
     vs 1 rank at the same global batch: 1e-5 relative per tensor, as on the CPU;
  4. the steady-state step replayed as a CUDA graph vs launched op by op (KL
     warm-up first, so the run switches from eager steps to replays mid-way, and
     a short last batch, which runs eagerly): bit-identical parameters.
  5. dist.shard_optimizer: NCCL with 1 rank sharded vs replicated, bit-identical (the
     one-rank reduce-scatter and all-gather are copies; the step graph is on); 2 ranks
     sharing the GPU (mpi, staged) sharded vs replicated within 1e-5.
  6. train.accumulate: 3 (NCCL 1 rank, staged MPI 2 ranks, sharded on 2 ranks) vs one
     pass of the same global batch: 1e-5 relative per tensor;
  7. optim.ema on the GPU: model.h5's /params (the moving average) and /params_raw
     against the CPU run's (5e-3 relative), and the last update of the average,
     read from the checkpoints at steps 49 and 50, equal to the recurrence computed
     in float32 by numpy, bit for bit (the kernel rounds each product, as the CPU).
  8. loss.type iwae (k = 5) with DReG on the GPU against the CPU: the logged bound within
     1e-3 relative, parameters within 2e-2 (the importance weights amplify rounding
     differences; the CPU's own np 1 vs 3 gap is 2e-5 after 20 steps); the step replayed
     as a CUDA graph vs op by op through a KL warm-up: bit-identical.
  9. a hierarchical model (model.type: hierarchical) on the GPU against the CPU: the
     logged losses within 1e-3 relative, parameters within 5e-3 (as 1.); the step
     replayed as a CUDA graph vs op by op through a KL warm-up: bit-identical.
A reseeded GPU run must differ, so the comparisons can fail."""
import csv, os, re, subprocess, sys
import h5py, numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402

a = harness.parse_args(__doc__)
info = subprocess.run([a.elbo, "info"], capture_output=True, text=True, timeout=120)
m = re.search(r"^cuda: (\d+) device\(s\)", info.stdout, re.M)
if not m or int(m.group(1)) == 0:
    line = next((l for l in info.stdout.splitlines() if l.startswith("cuda:")), "cuda: unknown")
    print(f"no GPU: {line}")
    sys.exit(77)


def train(np_, tag, *extra):
    out = os.path.join(a.work, tag)
    cmd = ["mpirun", "-np", str(np_), a.elbo, "train", a.spec,
           "--set", f"data.train={a.data}/train", "--set", "data.test=",
           "--set", "data.max_samples=2400", "--set", "train.max_steps=50",
           "--set", "train.batch_size=48", "--set", "train.log_every=5",
           "--set", f"output.dir={out}", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        sys.exit(f"{tag} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    print(f"--- {tag}: " + " | ".join(l for l in r.stdout.splitlines() if l.startswith(("elbo train", "gradients"))))
    with h5py.File(os.path.join(out, "model.h5"), "r") as f:
        params = {k: f["params"][k][...].astype(np.float64) for k in f["params"]}
    with open(os.path.join(out, "metrics.csv")) as f:
        iwae = "loss.type=iwae" in extra
        losses = np.array([float(row["neg_iwae" if iwae else "neg_elbo"]) for row in csv.DictReader(f)])
    return params, losses


def worst(p, q):
    errs = {k: np.linalg.norm(p[k] - q[k]) / max(np.linalg.norm(q[k]), 1e-30) for k in q}
    k = max(errs, key=errs.get)
    return errs[k], k


failures = []


def gpu_against_cpu(tag, label, extra, param_tol):
    """One rank on each device from the same init: the logged losses within 1e-3
    relative, every parameter tensor within param_tol."""
    cpu_p, cpu_loss = train(1, f"cpu_{tag}", "--set", "device=cpu", *extra)
    gpu_p, gpu_loss = train(1, f"gpu_{tag}", "--set", "device=cuda", *extra)
    loss_err = float(np.max(np.abs(gpu_loss - cpu_loss) / np.abs(cpu_loss)))
    err, name = worst(gpu_p, cpu_p)
    print(f"{label}, GPU vs CPU, 50 steps: losses within {loss_err:.2e} relative; parameters {err:.2e} ({name})")
    if loss_err > 1e-3 or err > param_tol:
        failures.append(f"{label} on the GPU differs from the CPU beyond tolerance")


def graph_against_eager(tag, label, extra):
    """The steady-state step replayed as a CUDA graph vs launched op by op: bit-identical."""
    graphed, _ = train(1, f"gpu_{tag}graph_on", *extra, "--set", "train.cuda_graph=on")
    eager, _ = train(1, f"gpu_{tag}graph_off", *extra, "--set", "train.cuda_graph=off")
    same = all(np.array_equal(graphed[k], eager[k]) for k in eager)
    print(f"{label}: CUDA graph replay vs eager launches: bit-identical = {same}")
    if not same:
        failures.append(f"the graph-replayed steps ({label}) differ from eagerly launched ones")

cpu, cpu_loss = train(1, "cpu", "--set", "device=cpu")
gpu, gpu_loss = train(1, "gpu_mpi", "--set", "device=cuda", "--set", "dist.communicator=mpi")
loss_err = float(np.max(np.abs(gpu_loss - cpu_loss) / np.abs(cpu_loss)))
err, name = worst(gpu, cpu)
print(f"GPU vs CPU, 50 steps: losses within {loss_err:.2e} relative; parameters {err:.2e} ({name})")
if loss_err > 1e-3 or err > 5e-3:
    failures.append("GPU vs CPU beyond tolerance")

nccl, _ = train(1, "gpu_nccl", "--set", "device=cuda", "--set", "dist.communicator=nccl")
same = all(np.array_equal(nccl[k], gpu[k]) for k in gpu)
print(f"NCCL 1 rank vs MPI path 1 rank: bit-identical = {same}")
if not same:
    failures.append("NCCL with 1 rank differs from the one-rank MPI path")

shared, _ = train(2, "gpu_shared_np2", "--set", "device=cuda", "--set", "dist.communicator=mpi")
err, name = worst(shared, gpu)
print(f"2 ranks sharing the GPU (mpi, staged) vs 1 rank: {err:.2e} ({name})")
if err > 1e-5:
    failures.append("2 ranks on one GPU differ from 1 rank")

mixed = ("--set", "device=cuda", "--set", "loss.kl_warmup_steps=10", "--set", "data.max_samples=2390")
graph_against_eager("", "MLP, 50 steps", mixed)

shard = ("--set", "dist.shard_optimizer=true")
nccl_sharded, _ = train(1, "gpu_nccl_sharded", "--set", "device=cuda", "--set", "dist.communicator=nccl", *shard)
same = all(np.array_equal(nccl_sharded[k], nccl[k]) for k in nccl)
print(f"NCCL 1 rank, sharded optimizer vs replicated: bit-identical = {same}")
if not same:
    failures.append("the sharded optimizer on 1 NCCL rank differs from the replicated one")
shared_sharded, _ = train(2, "gpu_shared_np2_sharded", "--set", "device=cuda", "--set", "dist.communicator=mpi",
                          *shard)
err, name = worst(shared_sharded, shared)
print(f"2 ranks sharing the GPU (mpi, staged), sharded optimizer vs replicated: {err:.2e} ({name})")
if err > 1e-5:
    failures.append("the sharded optimizer on 2 ranks sharing a GPU differs from the replicated one")

# Gradient accumulation on the GPU: 3 micro-batches per update (a short last batch
# too), through NCCL on one rank and through the staged MPI path on two ranks sharing
# the GPU (replicated and sharded), against the one-pass run of the same global batch.
one, _ = train(1, "gpu_accum1", "--set", "device=cuda", "--set", "data.max_samples=2390")
for np_, comm, more in ((1, "nccl", ()), (2, "mpi", ()), (2, "mpi", shard)):
    label = f"{np_} rank(s) ({comm}{', sharded' if more else ''})"
    accum, _ = train(np_, f"gpu_accum3_np{np_}{'_sharded' if more else ''}", "--set", "device=cuda",
                     "--set", f"dist.communicator={comm}", "--set", "train.accumulate=3",
                     "--set", "data.max_samples=2390", *more)
    err, name = worst(accum, one)
    print(f"accumulate=3 on {label} vs one pass: {err:.2e} ({name})")
    if err > 1e-5:
        failures.append(f"accumulation on the GPU ({label}) differs from one pass")

EMA = ("--set", "optim.ema=0.9", "--set", "checkpoint.every=1", "--set", "checkpoint.keep=2")
cpu_avg, _ = train(1, "cpu_ema", "--set", "device=cpu", *EMA)
gpu_avg, _ = train(1, "gpu_ema", "--set", "device=cuda", *EMA)
err, name = worst(gpu_avg, cpu_avg)
print(f"optim.ema: GPU vs CPU moving average after 50 steps: {err:.2e} ({name})")
if err > 5e-3:
    failures.append("the GPU's moving average differs from the CPU's beyond tolerance")


def arrays(path, group):
    with h5py.File(path, "r") as f:
        return {k: f[group][k][...] for k in f[group]}


ck = os.path.join(a.work, "gpu_ema", "checkpoints")
before, after = os.path.join(ck, "ckpt-000000049.h5"), os.path.join(ck, "ckpt-000000050.h5")
d = np.float32(0.9)
one_minus_d = np.float32(1.0 - 0.9)
ema49, ema50, p50 = arrays(before, "optim/ema"), arrays(after, "optim/ema"), arrays(after, "params")
exact = all(np.array_equal(ema50[k], (d * ema49[k]) + (one_minus_d * p50[k])) for k in p50)
model = os.path.join(a.work, "gpu_ema", "model.h5")
in_model = all(np.array_equal(arrays(model, "params")[k], ema50[k]) and
               np.array_equal(arrays(model, "params_raw")[k], p50[k]) for k in p50)
print(f"optim.ema on the GPU: step 50's update == numpy's float32 recurrence: {exact}; "
      f"model.h5 /params, /params_raw == the checkpoint's average and parameters: {in_model}")
if not exact or not in_model:
    failures.append("the GPU's moving average is not the recurrence, or model.h5 does not hold it")

IW = ("--set", "loss.type=iwae", "--set", "loss.samples=5", "--set", "loss.dreg=true")
gpu_against_cpu("iwae", "iwae k=5 + DReG", IW, 2e-2)  # the losses: the logged bound
graph_against_eager("iwae_", "iwae k=5 + DReG", (*mixed, *IW))

HV = ("--set", harness.SMALL_HVAE_MODEL)
gpu_against_cpu("hvae", "hierarchical", HV, 5e-3)
graph_against_eager("hvae_", "hierarchical", (*mixed, *HV))

reseeded, _ = train(1, "gpu_seed9", "--set", "device=cuda", "--set", "seed=9")
err, _ = worst(reseeded, gpu)
if err < 1e-2:
    failures.append(f"a reseeded GPU run matches ({err:.2e}): the comparisons cannot fail")
if failures:
    sys.exit("FAIL: " + "; ".join(failures))
