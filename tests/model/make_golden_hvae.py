#!/usr/bin/env python3
"""Writes the golden reference for tests/model/test_golden_hvae.cpp: the hierarchical
VAE (model.type: hierarchical, src/elbo/model/hvae.hpp) written independently in
PyTorch (float64), its inputs, weights, eps, forward values (rec, per-group KL from
torch.distributions, the log-ratio), every parameter gradient, and three torch.optim
steps. Usage: make_golden_hvae.py OUT.h5"""
import json, math, sys
import h5py, numpy as np, torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

torch.set_default_dtype(torch.float64)
ACT = {"relu": F.relu, "tanh": torch.tanh, "softplus": F.softplus}


def branch(cin, bottleneck, cout):
    """act -> 1x1 -> act -> 3x3 -> act -> 1x1; the activations are applied in forward."""
    b = nn.Module()
    b.c1 = nn.Conv2d(cin, bottleneck, 1)
    b.c2 = nn.Conv2d(bottleneck, bottleneck, 3, padding=1)
    b.c3 = nn.Conv2d(bottleneck, cout, 1)
    return b


def resize_channels(h, c):
    """The stream between stages of different widths (VDVAE's per-resolution widths):
    the first c channels, or zero channels appended."""
    if h.shape[1] >= c:
        return h[:, :c]
    return torch.cat([h, h.new_zeros(h.shape[0], c - h.shape[1], h.shape[2], h.shape[3])], 1)


class Hvae(nn.Module):
    def __init__(self, shape, width, bottleneck, stages, act, lik):
        super().__init__()
        C, H, W_ = shape
        self.shape, self.stages, self.act, self.lik = shape, stages, ACT[act], lik
        self.widths = [st.get("width", width) for st in stages]
        bns = [st.get("bottleneck", bottleneck) for st in stages]
        self.encoder = nn.Module()
        self.encoder.__setattr__("in", nn.Conv2d(C, self.widths[0], 3, padding=1))
        self.encoder.stages = nn.ModuleList()
        self.res = []
        h, w = H, W_
        prev = self.widths[0]
        for st, wd, bn in zip(stages, self.widths, bns):
            h, w = h // st["down"], w // st["down"]
            self.res.append((h, w))
            m = nn.Module()
            if st.get("resample", "pool") == "conv" and (st["down"] > 1 or prev != wd):
                m.down = nn.Conv2d(prev, wd, st["down"], stride=st["down"])
            m.blocks = nn.ModuleList([branch(wd, bn, wd) for _ in range(st["blocks"])])
            self.encoder.stages.append(m)
            prev = wd
        self.decoder = nn.Module()
        th, tw = self.res[-1]
        self.decoder.h_top = nn.Parameter(0.1 * torch.randn(self.widths[-1], th, tw))
        self.decoder.stages = nn.ModuleList()
        prev = self.widths[0]
        for st, wd, bn in zip(stages, self.widths, bns):
            m = nn.Module()
            m.groups = nn.ModuleList()
            for _ in range(st["groups"]):
                g = nn.Module()
                zc = st["latent"]
                g.q = branch(2 * wd, bn, 2 * zc)
                g.prior = branch(wd, bn, 2 * zc + wd)
                g.z_proj = nn.Conv2d(zc, wd, 1)
                g.resnet = branch(wd, bn, wd)
                m.groups.append(g)
            if st.get("dec_blocks", 0):
                m.blocks = nn.ModuleList([branch(wd, bn, wd) for _ in range(st["dec_blocks"])])
            if st.get("resample", "pool") == "conv" and (st["down"] > 1 or prev != wd):
                m.up = nn.ConvTranspose2d(wd, prev, st["down"], stride=st["down"])
            self.decoder.stages.append(m)
            prev = wd
        self.decoder.out = nn.Conv2d(self.widths[0], 2 * C if lik == "gaussian_learned" else C, 1)

    def run(self, b, x):
        a = self.act
        return b.c3(a(b.c2(a(b.c1(a(x))))))

    def forward(self, x, eps):
        B = x.shape[0]
        C, H, W_ = self.shape
        h = getattr(self.encoder, "in")(x.view(B, C, H, W_))
        es = []
        for st, m, wd in zip(self.stages, self.encoder.stages, self.widths):
            if hasattr(m, "down"):
                h = m.down(h)  # resample: conv, a learned stride-`down` patch embedding
            else:
                if st["down"] > 1:
                    h = F.avg_pool2d(h, st["down"])
                h = resize_channels(h, wd)
            for b in m.blocks:
                h = h + self.run(b, h)
            es.append(h)
        h = self.decoder.h_top.unsqueeze(0).expand(B, -1, -1, -1)
        kls, ratios, off = [], [], 0
        for s in reversed(range(len(self.stages))):
            st, m = self.stages[s], self.decoder.stages[s]
            zc = st.get("latent", 0)
            rh, rw = self.res[s]
            for g in m.groups:
                qo = self.run(g.q, torch.cat([h, es[s]], 1))
                po = self.run(g.prior, h)
                q = Normal(qo[:, :zc], F.softplus(qo[:, zc:]))
                p = Normal(po[:, :zc], F.softplus(po[:, zc:2 * zc]))
                e = eps[:, off:off + zc * rh * rw].reshape(B, zc, rh, rw)
                off += zc * rh * rw
                z = q.loc + q.scale * e
                kls.append(kl_divergence(q, p).sum((1, 2, 3)))
                ratios.append((q.log_prob(z) - p.log_prob(z)).sum((1, 2, 3)))
                h = h + po[:, 2 * zc:] + g.z_proj(z)
                h = h + self.run(g.resnet, h)
            for b in getattr(m, "blocks", []):
                h = h + self.run(b, h)
            if hasattr(m, "up"):
                h = m.up(h)  # its transpose: each position to its own down x down patch
            else:
                if st["down"] > 1:
                    h = F.interpolate(h, scale_factor=st["down"], mode="nearest")
                h = resize_channels(h, self.widths[max(s - 1, 0)])
        out = self.decoder.out(h)
        if self.lik == "bernoulli":
            rec = F.binary_cross_entropy_with_logits(out.flatten(1), x, reduction="none").sum(1)
        else:
            mean, lv = out[:, :C].flatten(1), out[:, C:].flatten(1)
            rec = 0.5 * ((x - mean) ** 2 * torch.exp(-lv) + lv + math.log(2 * math.pi)).sum(1)
        kl_groups = torch.stack(kls, 1)
        return rec, kl_groups, sum(ratios), out.flatten(1), off


CASES = [
    dict(name="hvae_bern_relu", shape=(1, 8, 8), width=4, bottleneck=3, act="relu", lik="bernoulli",
         stages=[dict(down=1, blocks=1, groups=1, latent=1), dict(down=2, blocks=2, groups=2, latent=2),
                 dict(down=4, blocks=1, groups=1, latent=3)], beta=1.0, B=3, opt="adam", wd=0.0),
    dict(name="hvae_gauss_learned_softplus", shape=(2, 4, 6), width=3, bottleneck=2, act="softplus",
         lik="gaussian_learned", stages=[dict(down=2, blocks=1, groups=2, latent=2),
                                         dict(down=1, blocks=0, groups=1, latent=1)],
         beta=0.7, B=2, opt="adamw", wd=0.05),
    # resample: conv (a learned down/up convolution) on the first stage (reading the stem,
    # feeding decoder.out) and the top one, average pooling between them.
    dict(name="hvae_resample_conv", shape=(1, 8, 8), width=4, bottleneck=3, act="relu", lik="bernoulli",
         stages=[dict(down=2, blocks=1, groups=1, latent=1, resample="conv"), dict(down=2, blocks=1, groups=1, latent=2),
                 dict(down=2, blocks=0, groups=2, latent=2, resample="conv")], beta=1.0, B=3, opt="adam", wd=0.0),
    # Per-stage widths that grow and shrink (the stream is padded and truncated on the
    # way down and, in reverse, on the way up), per-stage bottlenecks, and decoder-only
    # blocks on a stage without latents (no `latent` key) and on one with groups.
    dict(name="hvae_widths_dec_blocks_tanh", shape=(1, 8, 8), width=4, bottleneck=3, act="tanh", lik="bernoulli",
         stages=[dict(down=1, blocks=1, groups=0, dec_blocks=2, width=3, bottleneck=2),
                 dict(down=2, blocks=1, groups=2, latent=2, dec_blocks=1, width=5),
                 dict(down=2, blocks=1, groups=1, latent=1, width=2, bottleneck=4),
                 dict(down=2, blocks=0, groups=1, latent=3)], beta=0.9, B=2, opt="adam", wd=0.0),
    # resample: conv with per-stage widths: a 1x1 conv where only the width changes
    # (down 1), a 2x2 one that changes both, none on stage 0 (nothing to learn), and
    # the parameter-free pad/truncate on the pooled top stage; decoder blocks.
    dict(name="hvae_resample_conv_widths", shape=(1, 8, 8), width=4, bottleneck=3, act="softplus", lik="bernoulli",
         stages=[dict(down=1, blocks=1, groups=0, dec_blocks=1, width=3, resample="conv"),
                 dict(down=1, blocks=1, groups=1, latent=2, width=5, resample="conv"),
                 dict(down=2, blocks=1, groups=1, latent=1, dec_blocks=1, width=2, bottleneck=2, resample="conv"),
                 dict(down=4, blocks=0, groups=1, latent=2)], beta=1.0, B=2, opt="adamw", wd=0.01),
]


def main(path):
    torch.manual_seed(4321)
    with h5py.File(path, "w") as f:
        f.attrs["version"] = 1
        for c in CASES:
            m = Hvae(c["shape"], c["width"], c["bottleneck"], c["stages"], c["act"], c["lik"])
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if n.endswith("bias"):
                        p.add_(0.1 * torch.randn_like(p))  # nonzero biases exercise their gradients
            D = int(np.prod(c["shape"]))
            x = torch.rand(c["B"], D)
            with torch.no_grad():
                _, _, _, _, E = m(x, torch.zeros(c["B"], 100000))
            eps = torch.randn(c["B"], E)
            init = {n: p.detach().clone() for n, p in m.named_parameters()}
            rec, kl_groups, ratio, out, _ = m(x, eps)
            kl = kl_groups.sum(1)
            loss = (rec + c["beta"] * kl).mean()
            m.zero_grad()
            loss.backward()
            g = f.create_group(c["name"])
            g.attrs["B"], g.attrs["beta"] = c["B"], c["beta"]
            lik = {"bernoulli": "bernoulli", "gaussian_learned": {"type": "gaussian", "variance": "learned"}}
            g.attrs["spec"] = json.dumps({"data": {"train": "unused"}, "model": {
                "type": "hierarchical", "width": c["width"], "bottleneck": c["bottleneck"], "activation": c["act"],
                "stages": c["stages"], "likelihood": lik[c["lik"]]}})
            g.attrs["shape"] = np.array(c["shape"], dtype=np.int32)
            for k, v in dict(x=x, eps=eps, rec=rec, kl=kl, kl_groups=kl_groups, log_ratio=ratio, out=out).items():
                g[k] = v.detach().numpy()
            g["loss"] = np.array([loss.item()])
            for n, p in m.named_parameters():
                g[f"params/{n}"] = init[n].numpy()
                g[f"grads/{n}"] = p.grad.numpy()

            with torch.no_grad():
                for n, p in m.named_parameters():
                    p.copy_(init[n])
            kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=c["wd"])
            opt = torch.optim.AdamW(m.parameters(), **kw) if c["opt"] == "adamw" else torch.optim.Adam(m.parameters(), **kw)
            losses = []
            for _ in range(3):
                rec, kl_groups, *_ = m(x, eps)
                loss = (rec + c["beta"] * kl_groups.sum(1)).mean()
                losses.append(loss.item())
                opt.zero_grad()
                loss.backward()
                opt.step()
            a = g.create_group("adam")
            a.attrs["optimizer"], a.attrs["lr"], a.attrs["beta1"], a.attrs["beta2"] = c["opt"], 1e-2, 0.9, 0.999
            a.attrs["eps"], a.attrs["weight_decay"] = 1e-8, c["wd"]
            a["losses"] = np.array(losses)
            for n, p in m.named_parameters():
                a[f"params_after/{n}"] = p.detach().numpy()
            print(f"{c['name']}: {sum(1 for _ in m.parameters())} tensors, loss {losses[0]:.6f} -> {losses[-1]:.6f} "
                  f"after 3 {c['opt']} steps")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_golden_hvae.py OUT.h5")
    main(sys.argv[1])
