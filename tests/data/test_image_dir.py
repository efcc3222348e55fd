#!/usr/bin/env python3
"""elbo-shard --image-dir against PIL as the independent decoder: class folders and
labels, PNG (gray, RGB, palette, RGBA, gray+alpha, 16-bit) and JPEG, --size (cover then
centre crop), --center-crop + --size (the CelebA recipe), --channels, thread-count
independence, --test-fraction; and every bad folder: corrupt and truncated JPEG,
a non-image with an image name, another size or channel count without --size, an
empty folder, an empty class folder, images beside class folders. Images are
generated here, a few pixels each."""
import math, os, re, sys
import h5py, numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shard_cli import read_split as read_pixels, setup  # noqa: E402

a, W, bad, ENV, shard, expect = setup(__doc__)
rng = np.random.default_rng(5)


def read_split(d):
    """(images, labels or None, manifest text) of the split in d."""
    x, y = read_pixels(d)
    return x, y, open(f"{d}/manifest.yaml").read()


def noise(h, w, c):
    # Smooth-ish images so that JPEG and resizing see structure, not only noise.
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1) + 40 * k) % 256 for k in range(c)], -1)
    img = (base + rng.integers(0, 60, size=(h, w, c))) % 256
    return img.astype(np.uint8)


def save(path, arr, mode, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if mode == "L":
        Image.fromarray(arr[..., 0], "L").save(path, **kw)
    else:
        Image.fromarray(arr, "RGB").convert(mode).save(path, **kw)


def cover_crop(img, h, w):
    """The documented --size policy, written with PIL."""
    s = max(h / img.height, w / img.width)
    rh = max(h, int(math.floor(img.height * s + 0.5)))
    rw = max(w, int(math.floor(img.width * s + 0.5)))
    r = img.resize((rw, rh), Image.BILINEAR)
    top, left = (rh - h) // 2, (rw - w) // 2
    return r.crop((left, top, left + w, top + h))


def chw(img):
    a = np.asarray(img)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


# --- a class tree of mixed formats, resized to 12 x 10, RGB ---
tree = f"{W}/tree"
files = {  # class -> [(name, h, w, channels, mode, save kwargs)]
    "cat": [("a.png", 20, 16, 3, "RGB", {}), ("b.jpg", 15, 25, 3, "RGB", {"quality": 90}),
            ("sub/c.png", 9, 7, 1, "L", {}), ("d.JPEG", 30, 30, 1, "L", {})],
    "dog": [("e.png", 12, 10, 3, "P", {}), ("f.png", 14, 11, 3, "RGBA", {}), ("g.png", 13, 13, 1, "LA", {})],
    "eel": [("h.jpg", 40, 17, 3, "RGB", {"quality": 75, "subsampling": 2})],
}
for cls, items in files.items():
    for name, h, w, c, mode, kw in items:
        save(f"{tree}/{cls}/{name}", noise(h, w, 3 if mode not in ("L",) else 1), mode, **kw)
open(f"{tree}/dog/notes.txt", "w").write("not an image")
os.makedirs(f"{tree}/.hidden")
save(f"{tree}/.hidden/x.png", noise(5, 5, 1), "L")

# A 16-bit gray PNG: elbo keeps the high byte of each sample.
g16 = (rng.integers(0, 65536, size=(6, 9))).astype(np.uint16)
Image.fromarray(g16, "I;16").save(f"{tree}/eel/i16.png")

order = []
for k, cls in enumerate(sorted(files)):
    paths = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(f"{tree}/{cls}") for f in fs
                   if f.lower().endswith((".png", ".jpg", ".jpeg")))
    order += [(p, k) for p in paths]


def reference(path, h, w, channels, crop=0):
    img = Image.open(path)
    if img.mode in ("I;16", "I"):  # PIL reads 16-bit gray as 32-bit "I": take the high byte, as libpng's strip_16
        img = Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8), "L")
    img = img.convert("RGB" if channels == 3 else "L")
    if crop:
        top, left = (img.height - crop) // 2, (img.width - crop) // 2
        img = img.crop((left, top, left + crop, top + crop))
    return chw(cover_crop(img, h, w))


r = shard("--image-dir", tree, "--size", "12", "10", "--channels", "3", "--num-shards", "2", "--out", f"{W}/t3")
if r.returncode != 0:
    sys.exit(f"--image-dir failed: {r.stderr}")
x, y, text = read_split(f"{W}/t3")
if x.shape != (len(order), 3, 12, 10):
    bad.append(f"class tree: images {x.shape}, expected {(len(order), 3, 12, 10)}")
if "classes: [cat, dog, eel]" not in text:
    bad.append(f"manifest classes: {text}")
if list(y) != [k for _, k in order]:
    bad.append(f"labels {list(y)} != {[k for _, k in order]}")
for i, (p, _) in enumerate(order):
    want = reference(p, 12, 10, 3)
    if not np.array_equal(x[i], want):
        d = np.abs(x[i].astype(int) - want.astype(int))
        bad.append(f"{os.path.relpath(p, tree)} (sample {i}): differs from PIL, max {d.max()}, {np.count_nonzero(d)} px")

# The same tree in gray, 1 thread against 3: the same bytes.
for t in ("1", "3"):
    r = shard("--image-dir", tree, "--size", "7", "9", "--channels", "1", "--threads", t,
              "--out", f"{W}/g{t}")
    if r.returncode != 0:
        bad.append(f"gray --threads {t}: {r.stderr}")
g1, _, m1 = read_split(f"{W}/g1")
g3, _, m3 = read_split(f"{W}/g3")
if not np.array_equal(g1, g3) or re.findall("checksum: \\S+", m1) != re.findall("checksum: \\S+", m3):
    bad.append("--threads 1 and --threads 3 give different shards")
for i, (p, _) in enumerate(order):
    if not np.array_equal(g1[i], reference(p, 7, 9, 1)):
        bad.append(f"gray {os.path.relpath(p, tree)}: differs from PIL")

# CelebA's recipe on a smaller scale: centre crop 14 then 8 x 8, from 22 x 18 JPEGs.
celeb = f"{W}/celeb"
for i in range(5):
    save(f"{celeb}/{i:06d}.jpg", noise(22, 18, 3), "RGB", quality=95)
r = shard("--image-dir", celeb, "--center-crop", "14", "--size", "8", "8", "--out", f"{W}/c")
if r.returncode != 0:
    bad.append(f"--center-crop: {r.stderr}")
else:
    x, y, _ = read_split(f"{W}/c")
    if y is not None or x.shape != (5, 3, 8, 8):
        bad.append(f"flat folder: labels {y}, shape {x.shape}")
    for i in range(5):
        if not np.array_equal(x[i], reference(f"{celeb}/{i:06d}.jpg", 8, 8, 3, crop=14)):
            bad.append(f"--center-crop 14 --size 8 8: sample {i} differs from PIL")
expect(["--image-dir", celeb, "--center-crop", "30", "--out", f"{W}/c30"], 1, "smaller than --center-crop 30")

# A flat folder of same-size images without --size: the exact pixels, no labels.
flat = f"{W}/flat"
arrs = [noise(6, 5, 1) for _ in range(4)]
for i, arr in enumerate(arrs):
    save(f"{flat}/{i}.png", arr, "L")
r = shard("--image-dir", flat, "--test-fraction", "0.5", "--seed", "3", "--out", f"{W}/f")
if r.returncode != 0:
    bad.append(f"flat --test-fraction: {r.stderr}")
else:
    tr, _, _ = read_split(f"{W}/f/train")
    te, _, _ = read_split(f"{W}/f/test")
    got = sorted(v.tobytes() for v in np.concatenate([tr, te])[:, 0])
    if tr.shape[1:] != (1, 6, 5) or got != sorted(v[..., 0].tobytes() for v in arrs):
        bad.append("flat folder: the train and test parts do not hold exactly the input images")
if shard("--verify", f"{W}/f/test").returncode != 0:
    bad.append("--verify fails on an image split")

# --- bad folders ---
def case(name):
    d = f"{W}/bad/{name}"
    os.makedirs(d)
    return d


d = case("corrupt_jpeg")
save(f"{d}/0.jpg", noise(16, 16, 3), "RGB")
blob = bytearray(open(f"{d}/0.jpg", "rb").read())
open(f"{d}/1.jpg", "wb").write(blob[: len(blob) // 2])  # truncated: libjpeg only warns
blob2 = bytearray(blob)
for i in range(len(blob2) // 2, len(blob2) // 2 + 40):
    blob2[i] = 0xFF if i % 2 else 0x00  # garbage in the entropy-coded data
open(f"{d}/2.jpg", "wb").write(blob2)
expect(["--image-dir", d, "--out", f"{d}_out"], 1, "1.jpg (sample 1): corrupt JPEG image")
os.remove(f"{d}/1.jpg")
expect(["--image-dir", d, "--out", f"{d}_out"], 1, "2.jpg (sample 1): corrupt JPEG image")
if os.path.exists(f"{d}_out/manifest.yaml") or any(f.endswith(".tmp") for f in os.listdir(f"{d}_out")):
    bad.append("a corrupt image left a manifest or temporaries behind")

d = case("not_png")
save(f"{d}/0.png", noise(4, 4, 1), "L")
open(f"{d}/1.png", "wb").write(b"hello, not an image")
expect(["--image-dir", d, "--out", f"{d}_out"], 1, "1.png (sample 1): neither a PNG nor a JPEG")
d = case("cut_png")
save(f"{d}/0.png", noise(8, 8, 3), "RGB")
open(f"{d}/1.png", "wb").write(open(f"{d}/0.png", "rb").read()[:60])
expect(["--image-dir", d, "--out", f"{d}_out"], 1, "1.png (sample 1): corrupt PNG image")

d = case("sizes")
save(f"{d}/0.png", noise(4, 4, 1), "L")
save(f"{d}/1.png", noise(4, 5, 1), "L")
expect(["--image-dir", d, "--out", f"{d}_out"], 1, "1.png (sample 1): 4 x 5 pixels, the first image")
if shard("--image-dir", d, "--size", "4", "4", "--out", f"{d}_ok").returncode != 0:
    bad.append("--size does not accept images of several sizes")
d = case("channels")
save(f"{d}/0.png", noise(4, 4, 1), "L")
save(f"{d}/1.png", noise(4, 4, 3), "RGB")
expect(["--image-dir", d, "--out", f"{d}_out"], 1, "1.png (sample 1): 3 channel(s)")

d = case("empty")
expect(["--image-dir", d, "--out", f"{W}/bad/o1"], 1, "empty: no PNG or JPEG images")
d = case("empty_class")
save(f"{d}/a/0.png", noise(4, 4, 1), "L")
os.makedirs(f"{d}/b")
expect(["--image-dir", d, "--out", f"{W}/bad/o2"], 1, "empty_class/b: class folder holds no PNG or JPEG image")
d = case("mixed")
save(f"{d}/a/0.png", noise(4, 4, 1), "L")
save(f"{d}/top.png", noise(4, 4, 1), "L")
expect(["--image-dir", d, "--out", f"{W}/bad/o3"], 1, "top.png: images at the top of")
expect(["--image-dir", f"{W}/nowhere", "--out", f"{W}/bad/o4"], 1, "nowhere: image folder does not exist")
expect(["--image-dir", flat, "--size", "0", "4", "--out", f"{W}/bad/o5"], 2, "--size expects")
expect(["--images", "x.gz", "--size", "4", "4", "--out", f"{W}/bad/o6"], 2, "apply to --image-dir only")

if bad:
    print("\n".join(bad))
    sys.exit(1)
print(f"--image-dir: {len(order)} tree images, gray, centre crop, flat, bad folders ok")
