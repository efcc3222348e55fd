#!/usr/bin/env python3
"""Writes the golden reference for tests/model/test_golden.cpp: the same VAE in
PyTorch (float64), its inputs, weights, eps, forward values, every parameter
gradient, and three torch.optim steps. Usage: make_golden.py OUT.h5"""
import json, math, sys
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

    def encode(self, x):
        h = x
        for l in self.encoder.layers:
            h = self.act(l(h))
        return self.encoder.mu(h), self.encoder.logvar(h)

    def decode(self, z, x, sigma):
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
        return rec, out

    def forward(self, x, eps, sigma):
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * eps
        rec, out = self.decode(z, x, sigma)
        kl = -0.5 * (1 + logvar - mu**2 - torch.exp(logvar)).sum(1)
        return rec, kl, mu, logvar, z, out


class ConvVae(nn.Module):
    """The same spec list as elbo's model.type conv, as nn.Sequential (so parameter names
    match: encoder.layers.<index in the list>.weight)."""

    def __init__(self, shape, enc, L, dec, lik):
        super().__init__()
        self.lik, self.shape = lik, shape
        self.encoder = nn.Module()
        self.encoder.layers, feat = self.sequential(enc, shape)
        n = feat[0] * feat[1] * feat[2]
        self.encoder.mu, self.encoder.logvar = nn.Linear(n, L), nn.Linear(n, L)
        self.decoder = nn.Module()
        self.decoder.layers, _ = self.sequential(dec, (L, 1, 1))

    @staticmethod
    def sequential(spec, shape):
        mods = []
        c, h, w = shape
        for e in spec:
            t = e if isinstance(e, str) else e["type"]
            if t in ("relu", "tanh", "softplus"):
                mods.append({"relu": nn.ReLU(), "tanh": nn.Tanh(), "softplus": nn.Softplus()}[t])
            elif t == "flatten":
                mods.append(nn.Flatten()); c, h, w = c * h * w, 1, 1
            elif t == "reshape":
                mods.append(nn.Unflatten(1, tuple(e["shape"]))); c, h, w = e["shape"]
            elif t == "linear":
                mods.append(nn.Linear(c * h * w, e["features"])); c, h, w = e["features"], 1, 1
            elif t == "group_norm":
                mods.append(nn.GroupNorm(e["groups"], c))
            elif t == "conv2d":
                k, s_, p = e["kernel"], e.get("stride", 1), e.get("padding", 0)
                mods.append(nn.Conv2d(c, e["channels"], k, s_, p))
                c, h, w = e["channels"], (h + 2 * p - k) // s_ + 1, (w + 2 * p - k) // s_ + 1
            elif t == "conv_transpose2d":
                k, s_, p, op = e["kernel"], e.get("stride", 1), e.get("padding", 0), e.get("output_padding", 0)
                mods.append(nn.ConvTranspose2d(c, e["channels"], k, s_, p, op))
                c, h, w = e["channels"], (h - 1) * s_ - 2 * p + k + op, (w - 1) * s_ - 2 * p + k + op
        return nn.Sequential(*mods), (c, h, w)

    def encode(self, x):
        h = self.encoder.layers(x.view(x.shape[0], *self.shape)).flatten(1)
        return self.encoder.mu(h), self.encoder.logvar(h)

    def forward(self, x, eps, sigma):
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * eps
        rec, out = self.decode(z, x, sigma)
        kl = -0.5 * (1 + logvar - mu**2 - torch.exp(logvar)).sum(1)
        return rec, kl, mu, logvar, z, out

    def decode(self, z, x, sigma):
        out = self.decoder.layers(z)
        C = self.shape[0]
        if self.lik == "gaussian_learned":
            mean, lv = out[:, :C].flatten(1), out[:, C:].flatten(1)
            rec = 0.5 * ((x - mean) ** 2 * torch.exp(-lv) + lv + math.log(2 * math.pi)).sum(1)
        elif self.lik == "bernoulli":
            rec = F.binary_cross_entropy_with_logits(out.flatten(1), x, reduction="none").sum(1)
        else:
            rec = 0.5 * ((x - out.flatten(1)) ** 2 / sigma**2 + math.log(2 * math.pi * sigma**2)).sum(1)
        return rec, out.flatten(1)


IW_SAMPLES = 3


def importance_weighted(m, x, eps_k, beta, sigma):
    """loss.type iwae written with torch.distributions: per-input bounds, the mean bound's
    gradient (reparameterized), and DReG's (Tucker et al. 2018): the decoder's from the
    bound, the encoder's from the surrogate -sum_i w_i^2 log w_i with q's parameters
    detached inside log q and the normalized weights w_i held constant."""
    B, k, L = eps_k.shape
    mu, logvar = m.encode(x)
    std = torch.exp(0.5 * logvar)
    z = mu[:, None] + std[:, None] * eps_k
    rec, _ = m.decode(z.reshape(B * k, L), x.repeat_interleave(k, 0), sigma)
    rec = rec.view(B, k)
    prior = torch.distributions.Normal(torch.zeros_like(z), torch.ones_like(z))
    log_p = prior.log_prob(z).sum(-1)
    log_q = torch.distributions.Normal(mu[:, None], std[:, None]).log_prob(z).sum(-1)
    log_w = -rec + beta * (log_p - log_q)
    bound = -(torch.logsumexp(log_w, 1) - math.log(k))
    params = dict(m.named_parameters())
    enc = [p for n, p in params.items() if n.startswith("encoder.")]
    dec = [p for n, p in params.items() if n.startswith("decoder.")]
    iwae = torch.autograd.grad(bound.mean(), enc + dec, retain_graph=True)
    log_q_held = torch.distributions.Normal(mu.detach()[:, None], std.detach()[:, None]).log_prob(z).sum(-1)
    log_w_held = -rec + beta * (log_p - log_q_held)
    w = torch.softmax(log_w_held, 1).detach()
    surrogate = -(w**2 * log_w_held).sum(1).mean()
    dreg_enc = torch.autograd.grad(surrogate, enc)
    names = [n for n in params if n.startswith("encoder.")] + [n for n in params if n.startswith("decoder.")]
    grads = dict(zip(names, iwae))
    dreg = dict(zip(names, list(dreg_enc) + list(iwae[len(enc):])))
    return bound, rec, grads, dreg


CONV_ENC = [{"type": "conv2d", "channels": 4, "kernel": 4, "stride": 2, "padding": 1}, {"type": "group_norm", "groups": 2},
            "relu", {"type": "conv2d", "channels": 6, "kernel": 3, "stride": 1, "padding": 1}, "softplus", "flatten",
            {"type": "linear", "features": 10}, "tanh"]


def conv_dec(out_channels):
    return [{"type": "linear", "features": 24}, "relu", {"type": "reshape", "shape": [6, 2, 2]},
            {"type": "conv_transpose2d", "channels": 4, "kernel": 4, "stride": 2, "padding": 1},
            {"type": "group_norm", "groups": 4}, "relu",
            {"type": "conv_transpose2d", "channels": out_channels, "kernel": 3, "stride": 2, "padding": 1,
             "output_padding": 1}]


CONV_CASES = [
    dict(name="conv_bern", shape=(2, 8, 8), enc=CONV_ENC, L=3, dec=conv_dec(2), lik="bernoulli", beta=1.0, B=3,
         sigma=1.0, opt="adam", wd=0.0),
    dict(name="conv_gauss_learned", shape=(1, 8, 8), enc=CONV_ENC, L=2, dec=conv_dec(2), lik="gaussian_learned",
         beta=0.7, B=2, sigma=1.0, opt="adamw", wd=0.05),
]

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
        for c in CASES + CONV_CASES:
            conv = "shape" in c
            if conv:
                c["D"] = int(np.prod(c["shape"]))
                m = ConvVae(c["shape"], c["enc"], c["L"], c["dec"], c["lik"])
            else:
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
            g.attrs["likelihood"] = c["lik"]
            if conv:
                # elbo reads the model from this spec text (JSON is YAML).
                lik = {"bernoulli": "bernoulli", "gaussian_learned": {"type": "gaussian", "variance": "learned"}}
                g.attrs["spec"] = json.dumps({"data": {"train": "unused"}, "model": {
                    "type": "conv", "latent": c["L"], "encoder": c["enc"], "decoder": c["dec"],
                    "likelihood": lik[c["lik"]]}})
                g.attrs["shape"] = np.array(c["shape"], dtype=np.int32)
            else:
                g.attrs["activation"] = c["act"]
                g.attrs["encoder"] = np.array(c["enc"], dtype=np.int32)
                g.attrs["decoder"] = np.array(c["dec"], dtype=np.int32)
            for k, v in dict(x=x, eps=eps, rec=rec, kl=kl, mu=mu, logvar=logvar, z=z, out=out).items():
                g[k] = v.detach().numpy()
            g["loss"] = np.array([loss.item()])
            for n, p in m.named_parameters():
                g[f"params/{n}"] = init[n].numpy()
                g[f"grads/{n}"] = p.grad.numpy()

            # loss.type iwae at the same parameters: k samples per input, beta as above.
            eps_k = torch.randn(c["B"], IW_SAMPLES, c["L"])
            bound, rec_k, iw_grads, dreg_grads = importance_weighted(m, x, eps_k, c["beta"], c["sigma"])
            iw = g.create_group("iwae")
            iw.attrs["k"] = IW_SAMPLES
            iw["eps"] = eps_k.numpy().reshape(c["B"] * IW_SAMPLES, c["L"])  # sample i of input r: row r*k + i
            iw["bound"] = bound.detach().numpy()
            iw["rec"] = rec_k.detach().numpy().reshape(-1)
            for n in iw_grads:
                iw[f"grads/{n}"] = iw_grads[n].numpy()
                iw[f"dreg_grads/{n}"] = dreg_grads[n].numpy()

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
