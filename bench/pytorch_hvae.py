#!/usr/bin/env python3
"""PyTorch reference for the hierarchical VAE (model.type: hierarchical): the model of
tests/model/make_golden_hvae.py, the one whose forward pass, every gradient and three
Adam steps the golden test checks against elbo's to 1e-5, trained here in float32 on
the same elbo shards with the spec's hyperparameters and elbo's initialization scheme
(PyTorch's conv defaults, VDVAE's 1/sqrt(N) scaling of each residual branch's last
conv and of z_proj, every prior starting as N(0, I), a zero decoder.h_top), then
evaluated like `elbo eval`: test -ELBO (one sample) and the IWAE bound with K full
passes per input. Run with Debian's /usr/bin/python3 (python3-torch).

  pytorch_hvae.py SPEC.yaml --train DIR --test DIR [--epochs N] [--threads T]
                  [--max-steps N] [--iw-samples K] [--eval-samples N] [--json OUT]
                  [--ranks R] [--save FILE.pt] [--load FILE.pt]

--ranks R trains data-parallel as elbo does (R processes, DistributedDataParallel over
gloo on localhost, each its slice of the global batch, --threads each): PyTorch's own
answer to elbo's ranks, for the speed comparison.
"""
import argparse, glob, json, math, os, socket, sys, time
import h5py, numpy as np, torch, yaml
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "model"))
from make_golden_hvae import Hvae  # noqa: E402

torch.set_default_dtype(torch.float32)  # the golden script works in float64; training is float32


def load_split(d, limit=0):
    parts = []
    for path in glob.glob(os.path.join(d, "shard-*.h5")):
        with h5py.File(path, "r") as f:
            parts.append((int(f.attrs["global_offset"]), f["images"][...]))
    parts.sort(key=lambda p: p[0])
    imgs = np.concatenate([p[1] for p in parts])
    if limit:
        imgs = imgs[:limit]
    shape = imgs.shape[1:] if imgs.ndim == 4 else (1,) + imgs.shape[1:]
    x = imgs.reshape(len(imgs), -1).astype(np.float32) / 255.0
    return torch.from_numpy(x), tuple(int(s) for s in shape)


def elbo_init(m, stages):
    """elbo's HvaeLayout::init_params scheme on PyTorch's default draws."""
    n_enc = max(sum(s["blocks"] for s in stages), 1)
    n_dec = max(sum(s["groups"] + s.get("dec_blocks", 0) for s in stages), 1)
    with torch.no_grad():
        for st in m.encoder.stages:
            for b in st.blocks:
                b.c3.weight.mul_(1 / math.sqrt(n_enc))
        m.decoder.h_top.zero_()
        for st, spec in zip(m.decoder.stages, stages):
            zc = spec.get("latent", 0)
            for g in st.groups:
                g.prior.c3.weight.zero_()
                g.prior.c3.bias.zero_()
                g.prior.c3.bias[zc:2 * zc] = math.log(math.e - 1)  # softplus^-1(1)
                g.z_proj.weight.mul_(1 / math.sqrt(n_dec))
                g.resnet.c3.weight.mul_(1 / math.sqrt(n_dec))
            for b in getattr(st, "blocks", []):
                b.c3.weight.mul_(1 / math.sqrt(n_dec))


def evaluate(m, x, k, E, batch=250, rank=0, world=1):
    """-ELBO and its parts (one eps per input) and, with k > 0, the IWAE(k) bound from k
    full passes: log w = -(rec + log q(z|x) - log p(z)). With world > 1 each rank takes
    every world-th batch and the sums are all-reduced (the bound is per input, so the
    split changes only which draws an input gets)."""
    m.eval()
    gen = torch.Generator().manual_seed(12345 + rank)
    rec_s = kl_s = iw_s = 0.0
    with torch.no_grad():
        for i in range(rank * batch, len(x), batch * world):
            xb = x[i:i + batch]
            eps = torch.randn(len(xb), E, generator=gen)
            rec, klg, ratio, _, _ = m(xb, eps)
            rec_s += rec.sum().item()
            kl_s += klg.sum().item()
            if k > 0:
                lw = [-(rec + ratio).double()]
                for _ in range(k - 1):
                    r, _, lr, _, _ = m(xb, torch.randn(len(xb), E, generator=gen))
                    lw.append(-(r + lr).double())
                iw_s += -(torch.logsumexp(torch.stack(lw, 1), 1) - math.log(k)).sum().item()
    if world > 1:
        sums = torch.tensor([rec_s, kl_s, iw_s], dtype=torch.float64)
        torch.distributed.all_reduce(sums)
        rec_s, kl_s, iw_s = sums.tolist()
    n = len(x)
    return rec_s / n, kl_s / n, (iw_s / n if k > 0 else float("nan"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--epochs", type=int, default=0, help="0: the spec's train.epochs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--iw-samples", type=int, default=0)
    ap.add_argument("--eval-samples", type=int, default=0, help="the test split's first N (0 = all)")
    ap.add_argument("--warmup-steps", type=int, default=20, help="steps not timed")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--ranks", type=int, default=1, help="data-parallel processes (DistributedDataParallel, gloo)")
    ap.add_argument("--save", help="write the evaluated (EMA) parameters here (torch.save of the state dict)")
    ap.add_argument("--load", help="evaluate these parameters (a --save file) instead of training")
    a = ap.parse_args()
    if a.ranks > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:  # a free one: another run (a paused reference) may hold any fixed port
            with socket.socket() as sk:
                sk.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(sk.getsockname()[1])
        torch.multiprocessing.spawn(train, args=(a,), nprocs=a.ranks)
    else:
        train(0, a)


def train(rank, a):
    world = a.ranks
    if world > 1:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    spec = yaml.safe_load(open(a.spec))
    mod, opt_s, tr = spec["model"], spec.get("optim", {}), spec.get("train", {})
    lik = mod.get("likelihood", "bernoulli")
    lik = lik if isinstance(lik, str) else lik.get("type", "bernoulli")
    if lik != "bernoulli":
        sys.exit(f"{a.spec}: this reference trains the Bernoulli likelihood only (got {lik})")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    xtr, shape = load_split(a.train, int(spec.get("data", {}).get("max_samples", 0) or 0))
    xte, _ = load_split(a.test, a.eval_samples)
    stages = mod["stages"]
    m = Hvae(shape, mod["width"], mod["bottleneck"], stages, mod.get("activation", "relu"), "bernoulli")
    elbo_init(m, stages)
    with torch.no_grad():
        E = m(xtr[:1], torch.zeros(1, 10 ** 7))[4]
    # Every rank builds the same model from the same seed; DDP averages the gradients of
    # the ranks' row means, which is the global batch's mean.
    net = torch.nn.parallel.DistributedDataParallel(m) if world > 1 else m
    lr, clip = float(opt_s.get("lr", 1e-3)), float(opt_s.get("grad_clip", 0) or 0)
    ema_d = float(opt_s.get("ema", 0) or 0)
    opt = torch.optim.Adam(m.parameters(), lr=lr, betas=(opt_s.get("beta1", 0.9), opt_s.get("beta2", 0.999)),
                           eps=float(opt_s.get("eps", 1e-8)))
    ema = [p.detach().clone() for p in m.parameters()] if ema_d > 0 else None
    batch, epochs = int(tr.get("batch_size", 128)), a.epochs or int(tr.get("epochs", 10))
    total_steps = epochs * math.ceil(len(xtr) / batch)
    if a.max_steps:
        total_steps = min(total_steps, a.max_steps)
    warm_lr, min_lr = int(opt_s.get("warmup_steps", 0) or 0), float(opt_s.get("min_lr", 0) or 0)
    cosine = opt_s.get("schedule", "constant") == "cosine"

    def lr_at(step):
        """elbo's learning_rate() (src/elbo/optim/adam.cpp): linear warm-up, then cosine to min_lr."""
        if warm_lr > 0 and step < warm_lr:
            return lr * (step + 1) / warm_lr
        if cosine:
            t = min(1.0, (step - warm_lr) / max(1, total_steps - warm_lr - 1))
            return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))
        return lr
    warm_kl = int(spec.get("loss", {}).get("kl_warmup_steps", 0) or 0)
    step, t_start, n_timed = 0, None, 0
    if a.load:
        epochs = 0
        m.load_state_dict(torch.load(a.load))
        ema = None
    for epoch in range(epochs):
        m.train()
        perm = torch.randperm(len(xtr))
        total, seen = 0.0, 0
        for i in range(0, len(xtr), batch):
            if a.max_steps and step >= a.max_steps:
                break
            xb = xtr[perm[i:i + batch]]
            if world > 1:  # the same draws on every rank keep perm identical; each takes its rows
                xb = xb[rank::world]
            beta = min(1.0, step / warm_kl) if warm_kl else 1.0
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            rec, klg, *_ = net(xb, torch.randn(len(xb), E))
            loss = (rec + beta * klg.sum(1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    for e, p in zip(ema, m.parameters()):
                        e.mul_(ema_d).add_(p.detach(), alpha=1 - ema_d)
            total += (rec + klg.sum(1)).sum().item()
            seen += len(xb)
            step += 1
            if step == a.warmup_steps:
                t_start = time.perf_counter()
            elif step > a.warmup_steps:
                n_timed += len(xb) * world
        if rank == 0:
            print(f"epoch {epoch + 1}: train -ELBO {total / max(seen, 1):.3f} ({seen} samples)", flush=True)
        if a.max_steps and step >= a.max_steps:
            break
    rate = n_timed / (time.perf_counter() - t_start) if t_start and n_timed else float("nan")
    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema, m.parameters()):
                p.copy_(e)
    if a.save and rank == 0:
        torch.save(m.state_dict(), a.save)
    rec, kl, iw = evaluate(m, xte, a.iw_samples, E, rank=rank, world=world)
    if world > 1:
        torch.distributed.destroy_process_group()
        if rank > 0:
            return
    out = dict(test_neg_elbo=rec + kl, test_rec=rec, test_kl=kl, test_iwae=iw, iw_samples=a.iw_samples,
               eval_samples=len(xte), train_samples_per_s=rate, threads=a.threads, ranks=world, epochs=epochs, steps=step,
               params=sum(p.numel() for p in m.parameters()))
    print(f"pytorch hvae: test -ELBO {rec + kl:.4f} (rec {rec:.4f}, KL {kl:.4f}) IWAE(k={a.iw_samples}) {iw:.4f} on "
          f"{len(xte)} test samples | {rate:.0f} train samples/s, {world} rank(s) x {a.threads} thread(s), batch {batch}")
    if a.json:
        out = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
