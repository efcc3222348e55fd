#!/usr/bin/env python3
"""Loss curves of an elbo run: train and test negative ELBO, reconstruction term and
KL term against the step, from RUN_DIR/metrics.csv, drawn to a PNG.

    python3 launch/plot_run.py runs/fmnist_mlp [-o runs/fmnist_mlp/curves.png]

Needs matplotlib (Debian: python3-matplotlib). Test columns are filled at the steps
where training evaluated on data.test (eval.every)."""
import argparse, csv, math, os, sys


def read_metrics(path):
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        sys.exit(f"plot_run: cannot read {path}: {e.strerror}")
    need = {"step", "neg_elbo", "rec", "kl"}
    if not rows or not need <= set(rows[0]):
        sys.exit(f"plot_run: {path} is not an elbo metrics.csv (needs columns {sorted(need)})")

    def col(name):
        pts = [(int(r["step"]), float(r[name])) for r in rows if r.get(name) not in (None, "")]
        return [p for p in pts if math.isfinite(p[1])]
    return {k: col(k) for k in ("neg_elbo", "rec", "kl", "test_neg_elbo", "test_rec", "test_kl")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="an elbo output.dir (holds metrics.csv)")
    ap.add_argument("-o", "--output", help="PNG to write (default RUN_DIR/curves.png)")
    a = ap.parse_args()
    m = read_metrics(os.path.join(a.run_dir, "metrics.csv"))
    out = a.output or os.path.join(a.run_dir, "curves.png")
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display on cluster nodes
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_run: matplotlib is missing (Debian: apt-get install python3-matplotlib)")

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    for ax, (key, title) in zip(axes, (("neg_elbo", "negative ELBO"), ("rec", "reconstruction -log p(x|z)"),
                                       ("kl", "KL(q(z|x) || p(z))"))):
        for name, style, label in ((key, "-", "train"), ("test_" + key, "o-", "test")):
            if m[name]:
                xs, ys = zip(*m[name])
                ax.plot(xs, ys, style, label=label, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("nats per sample")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(os.path.basename(os.path.normpath(a.run_dir)))
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out)  # never a half-written PNG under the final name
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
