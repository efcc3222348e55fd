#!/usr/bin/env python3
"""Writes the golden reference for tests/model/test_golden.cpp: the same VAE in
PyTorch (float64), its inputs, weights, eps, forward values, every parameter
gradient, and three torch.optim steps. Usage: make_golden.py OUT.h5"""
import math, sys
import h5py, numpy as np, torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)
ACT = {"relu": F.relu, "tanh": torch.tanh, "softplus": F.softplus}


class Vae(nn.Module):
    def __init__(self, D, enc, L, dec, act, lik):
        super().__init__()
        self.act, self.lik = ACT[act], lik
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList()
        h = D
        for w in enc:
            self.encoder.layers.append(nn.Linear(h, w)); h = w
        self.encoder.mu, self.encoder.logvar = nn.Linear(h, L), nn.Linear(h, L)
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList()
        h = L
        for w in dec:
            self.decoder.layers.append(nn.Linear(h, w)); h = w
        self.decoder.out = nn.Linear(h, D)
        if lik == "gaussian_learned":
            self.decoder.logvar = nn.Linear(h, D)

    def forward(self, x, eps, sigma):
        h = x
        for l in self.encoder.layers:
            h = self.act(l(h))
        mu, logvar = self.encoder.mu(h), self.encoder.logvar(h)
        z = mu + torch.exp(0.5 * logvar) * eps
        g = z
        for l in self.decoder.layers:
            g = self.act(l(g))
        out = self.decoder.out(g)
        if self.lik == "bernoulli":
            rec = F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1)
        elif self.lik == "gaussian_fixed":
            rec = 0.5 * ((x - out) ** 2 / sigma**2 + math.log(2 * math.pi * sigma**2)).sum(1)
        else:
            lv = self.decoder.logvar(g)
            rec = 0.5 * ((x - out) ** 2 * torch.exp(-lv) + lv + math.log(2 * math.pi)).sum(1)
            out = torch.cat([out, lv], 1)  # the C++ decoder output is [mean | logvar]
        kl = -0.5 * (1 + logvar - mu**2 - torch.exp(logvar)).sum(1)
        return rec, kl, mu, logvar, z, out


CASES = [
    dict(name="bern_relu", D=12, enc=[10, 8], L=3, dec=[8, 10], act="relu", lik="bernoulli", beta=1.0, B=5,
         sigma=1.0, opt="adam", wd=0.0),
    dict(name="gauss_learned_tanh", D=7, enc=[6], L=2, dec=[5], act="tanh", lik="gaussian_learned", beta=0.5, B=4,
         sigma=1.0, opt="adam", wd=0.0),
    dict(name="gauss_fixed_softplus", D=6, enc=[5, 4], L=3, dec=[4], act="softplus", lik="gaussian_fixed", beta=2.0,
         B=3, sigma=0.3, opt="adamw", wd=0.1),
]


def main(path):
    torch.manual_seed(1234)
    with h5py.File(path, "w") as f:
        f.attrs["version"] = 1
        for c in CASES:
            m = Vae(c["D"], c["enc"], c["L"], c["dec"], c["act"], c["lik"])
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if n.endswith("bias"):
                        p.add_(0.1 * torch.randn_like(p))  # nonzero biases exercise their gradients
            x = torch.rand(c["B"], c["D"])
            eps = torch.randn(c["B"], c["L"])
            init = {n: p.detach().clone() for n, p in m.named_parameters()}
            rec, kl, mu, logvar, z, out = m(x, eps, c["sigma"])
            loss = (rec + c["beta"] * kl).mean()
            m.zero_grad()
            loss.backward()
            g = f.create_group(c["name"])
            for k in ("D", "L", "B"):
                g.attrs[k] = c[k]
            g.attrs["beta"], g.attrs["sigma"] = c["beta"], c["sigma"]
            g.attrs["activation"], g.attrs["likelihood"] = c["act"], c["lik"]
            g.attrs["encoder"] = np.array(c["enc"], dtype=np.int32)
            g.attrs["decoder"] = np.array(c["dec"], dtype=np.int32)
            for k, v in dict(x=x, eps=eps, rec=rec, kl=kl, mu=mu, logvar=logvar, z=z, out=out).items():
                g[k] = v.detach().numpy()
            g["loss"] = np.array([loss.item()])
            for n, p in m.named_parameters():
                g[f"params/{n}"] = init[n].numpy()
                g[f"grads/{n}"] = p.grad.numpy()

            # Three optimizer steps on the same batch and eps, from the same start.
            with torch.no_grad():
                for n, p in m.named_parameters():
                    p.copy_(init[n])
            kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=c["wd"])
            opt = torch.optim.AdamW(m.parameters(), **kw) if c["opt"] == "adamw" else torch.optim.Adam(m.parameters(), **kw)
            losses = []
            for _ in range(3):
                rec, kl, *_ = m(x, eps, c["sigma"])
                loss = (rec + c["beta"] * kl).mean()
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
            print(f"{c['name']}: loss {losses[0]:.6f} -> {losses[-1]:.6f} after 3 {c['opt']} steps")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_golden.py OUT.h5")
    main(sys.argv[1])
