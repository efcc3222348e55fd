#!/usr/bin/env python3
"""PyTorch reference for the benchmarks: the pytorch/examples VAE (784-400-20, ReLU,
Bernoulli on pixel intensities, Adam), or with --model conv the conv VAE of
configs/fmnist_conv.yaml, trained on the same elbo shards, with the same test
metrics as `elbo eval`. Run with Debian's /usr/bin/python3 (python3-torch).

  pytorch_vae.py --train DIR --test DIR [--model mlp|conv] [--channels-last] [--epochs 10]
                 [--threads N] [--max-steps N] [--iw-samples K] [--device cpu|cuda] [--compile]
                 [--no-eval] [--drop-last] [--json OUT]

On a GPU (--device cuda) it is PyTorch at its best for this model: the data on the
device, fused Adam, no per-step host sync (the loss is accumulated on the device),
optionally torch.compile; TF32 is off for matmuls, as in elbo (cuBLAS FP32 mode).
"""
import argparse, glob, json, math, os, time
import h5py, numpy as np, torch
import torch.nn as nn
import torch.nn.functional as F


def load_split(d):
    parts = []
    for path in glob.glob(os.path.join(d, "shard-*.h5")):
        with h5py.File(path, "r") as f:
            parts.append((int(f.attrs["global_offset"]), f["images"][...]))
    parts.sort(key=lambda p: p[0])
    x = np.concatenate([p[1] for p in parts]).reshape(-1, 784).astype(np.float32) / 255.0
    return torch.from_numpy(x)


class VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
        self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

    def terms(self, x, eps):
        h = F.relu(self.fc1(x))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.exp(0.5 * logvar) * eps
        logits = self.fc4(F.relu(self.fc3(z)))
        rec = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
        return rec, kl, mu, logvar, z


class ConvVAE(nn.Module):
    """configs/fmnist_conv.yaml in PyTorch: conv 32 and 64 (k4 s2 p1) to 64x7x7, a 256-unit
    bottleneck, latent 20, and transposed convolutions back to 1x28x28 Bernoulli logits."""

    def __init__(self, channels_last=False):
        super().__init__()
        self.channels_last = channels_last
        self.enc = nn.Sequential(nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(3136, 256), nn.ReLU())
        self.mu, self.logvar = nn.Linear(256, 20), nn.Linear(256, 20)
        self.dec = nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 3136), nn.ReLU(),
                                 nn.Unflatten(1, (64, 7, 7)), nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(32, 1, 4, 2, 1))

    def terms(self, x, eps):
        img = x.view(-1, 1, 28, 28)
        if self.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        h = self.enc(img)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.exp(0.5 * logvar) * eps
        logits = self.dec(z).reshape(-1, 784)
        rec = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
        return rec, kl, mu, logvar, z


def evaluate(model, x, k, batch=500):
    """Test -ELBO per sample (one eps per x, drawn from seed 12345) and its parts;
    with k > 0 also the IWAE(k) NLL bound. The k-1 extra eps come from their own
    generator, so the one-sample ELBO is the same whatever k is."""
    model.eval()
    torch.manual_seed(12345)
    gen = torch.Generator().manual_seed(54321)
    rec_s = kl_s = iw_s = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            eps = torch.randn(len(xb), 20)
            rec, kl, mu, logvar, z = model.terms(xb, eps)
            rec_s += rec.sum().item()
            kl_s += kl.sum().item()
            if k > 0:
                lw = []
                for j in range(k):
                    e = eps if j == 0 else torch.randn(len(xb), 20, generator=gen)
                    if j == 0:
                        r, zj = rec, z
                    else:  # mu and logvar do not depend on eps
                        r, _, _, _, zj = model.terms(xb, e)
                    # log q(z|x) with z - mu = exp(0.5 logvar) * e; log p(z) standard normal
                    log_q = -0.5 * (e.double().pow(2) + logvar.double() + math.log(2 * math.pi)).sum(1)
                    log_p = -0.5 * (zj.double().pow(2) + math.log(2 * math.pi)).sum(1)
                    lw.append(-r.double() + log_p - log_q)
                lw = torch.stack(lw, 1)
                iw_s += -(torch.logsumexp(lw, 1) - math.log(k)).sum().item()
    n = len(x)
    return rec_s / n, kl_s / n, (iw_s / n if k > 0 else float("nan"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--iw-samples", type=int, default=0)
    ap.add_argument("--warmup-steps", type=int, default=100,
                    help="steps not timed (elbo's speed bench skips its first 100-step log interval too)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward/loss")
    ap.add_argument("--no-eval", action="store_true", help="speed only: skip the test-set evaluation")
    ap.add_argument("--model", default="mlp", choices=["mlp", "conv"],
                    help="mlp: configs/fmnist_mlp.yaml; conv: configs/fmnist_conv.yaml")
    ap.add_argument("--channels-last", action="store_true", help="conv: NHWC memory format (cuDNN's fast path)")
    ap.add_argument("--drop-last", action="store_true",
                    help="skip each epoch's short last batch (elbo's train.drop_last), as the GPU benchmarks do")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    xtr, xte = load_split(a.train).to(dev), load_split(a.test)
    model = (ConvVAE(a.channels_last) if a.model == "conv" else VAE()).to(dev)
    if a.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr, **({"fused": True} if cuda else {}))

    def loss_of(xb, eps):
        rec, kl, *_ = model.terms(xb, eps)
        return (rec + kl).mean()
    step_loss = torch.compile(loss_of) if a.compile else loss_of

    def sync():
        if cuda:
            torch.cuda.synchronize()
    step, warm, t_start, n_timed = 0, a.warmup_steps, None, 0
    for epoch in range(a.epochs):
        model.train()
        perm = torch.randperm(len(xtr), device=dev)
        total, seen = torch.zeros((), device=dev, dtype=torch.float64), 0
        for i in range(0, len(xtr), a.batch):
            if a.max_steps and step >= a.max_steps:
                break
            if a.drop_last and i + a.batch > len(xtr):
                break
            xb = xtr[perm[i:i + a.batch]]
            loss = step_loss(xb, torch.randn(len(xb), 20, device=dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach().double() * len(xb)  # stays on the device: no per-step sync
            seen += len(xb)
            step += 1
            if step == warm:
                sync()
                t_start = time.perf_counter()
            elif step > warm:
                n_timed += len(xb)
        sync()
        print(f"epoch {epoch + 1}: train -ELBO {total.item() / max(seen, 1):.3f} ({seen} samples)", flush=True)
        if a.max_steps and step >= a.max_steps:
            break
    sync()
    rate = n_timed / (time.perf_counter() - t_start) if t_start and n_timed else float("nan")
    rec = kl = iw = float("nan")
    if not a.no_eval:
        rec, kl, iw = evaluate(model.cpu(), xte, a.iw_samples)
    out = dict(test_neg_elbo=rec + kl, test_rec=rec, test_kl=kl, test_iwae=iw, train_samples_per_s=rate,
               threads=a.threads, epochs=a.epochs, steps=step, device=a.device, compiled=a.compile,
               batch=a.batch, tf32=False, model=a.model, channels_last=a.channels_last)
    print(f"pytorch ({a.device}{', compiled' if a.compile else ''}): test -ELBO {rec + kl:.4f} (rec {rec:.4f}, "
          f"KL {kl:.4f}) IWAE(k={a.iw_samples}) {iw:.4f} | {rate:.0f} train samples/s, batch {a.batch}")
    if a.json:
        out = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
        with open(a.json, "w") as f:  # strict JSON: a value not computed (no --iw-samples) is null
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
