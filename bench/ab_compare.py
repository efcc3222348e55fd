#!/usr/bin/python3
"""A/B of two run trees written by bench/ab_runs.sh at the same path (spec.yaml and the
checkpoints name output.dir): every HDF5 dataset and attribute bit for bit, metrics.csv
with its two timing columns blanked, eval.yaml/spec.yaml/PNGs byte for byte, stdout logs
with timings masked. Exits 1 listing every difference.
usage: bench/ab_compare.py BEFORE_TREE AFTER_TREE"""
import os, re, sys, h5py, numpy as np
A, B = sys.argv[1], sys.argv[2]
bad = []; counts = {"h5": 0, "datasets": 0, "csv": 0, "text": 0, "png": 0, "log": 0}
def h5cmp(pa, pb):
    fa, fb = h5py.File(pa, "r"), h5py.File(pb, "r")
    na, nb = [], []
    fa.visit(na.append); fb.visit(nb.append)
    if na != nb: bad.append(f"{pa}: object lists differ"); return
    for n in ["/"] + na:
        oa, ob = fa[n], fb[n]
        if dict(oa.attrs).keys() != dict(ob.attrs).keys(): bad.append(f"{pa}:{n} attr keys differ"); continue
        for k in oa.attrs:
            va, vb = oa.attrs[k], ob.attrs[k]
            if not np.array_equal(np.asarray(va), np.asarray(vb)): bad.append(f"{pa}:{n} attr {k}: {va!r} != {vb!r}")
        if isinstance(oa, h5py.Dataset):
            da, db = oa[...], ob[...]
            counts["datasets"] += 1
            if da.dtype != db.dtype or da.shape != db.shape or da.tobytes() != db.tobytes():
                bad.append(f"{pa}:{n} data differ")
    counts["h5"] += 1
def mask_csv(t):
    out = []
    for line in t.splitlines():
        c = line.split(",")
        if c[0] != "step" and len(c) > 10: c[9] = c[10] = "T"
        out.append(",".join(c))
    return out
def mask_log(t):
    t = re.sub(r"\| [0-9.]+ samples/s \| eta \S+ \| data wait \d+%", "| T", t)
    t = re.sub(r"self-test: .*", "self-test: T", t)
    t = re.sub(r"\[[^\]\n]*/s[^\]\n]*\]", "[T]", t)
    return [l for l in t.splitlines()]
for root, dirs, files in os.walk(A):
    for f in sorted(files):
        pa = os.path.join(root, f); rel = os.path.relpath(pa, A); pb = os.path.join(B, rel)
        if not os.path.exists(pb): bad.append(f"missing in B: {rel}"); continue
        if f.endswith(".h5"): h5cmp(pa, pb)
        elif f == "metrics.csv":
            counts["csv"] += 1
            if mask_csv(open(pa).read()) != mask_csv(open(pb).read()): bad.append(f"{rel} differs")
        elif f.endswith(".log"):
            counts["log"] += 1
            la, lb = mask_log(open(pa).read()), mask_log(open(pb).read())
            if la != lb:
                import difflib
                bad.append(f"{rel} differs:\n" + "\n".join(list(difflib.unified_diff(la, lb, lineterm=""))[:20]))
        elif f.endswith(".png"):
            counts["png"] += 1
            if open(pa, "rb").read() != open(pb, "rb").read(): bad.append(f"{rel} differs")
        elif f in ("latest", ".lock") or f.endswith(".err"): pass
        else:
            counts["text"] += 1
            if open(pa, "rb").read() != open(pb, "rb").read(): bad.append(f"{rel} differs")
for root, dirs, files in os.walk(B):
    for f in files:
        rel = os.path.relpath(os.path.join(root, f), B)
        if not os.path.exists(os.path.join(A, rel)): bad.append(f"extra in B: {rel}")
print("compared:", counts)
print("\n".join(bad) if bad else "A/B: identical (timings masked)")
sys.exit(1 if bad else 0)
