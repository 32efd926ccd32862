#!/usr/bin/env python3
"""Independent reference for peft-studio's adapters (numpy + scipy only).

Computes, on fixed random data, the LoLDU factors (scipy.linalg.lu), the SVFit factors
(numpy SVD), the PiSSA init, and one forward and backward pass (hand-derived gradients) of
LoRA, SVFit and LoLDU layers, exactly as ../shared/spec/METHODS.md specifies. Writes them to
tests/data/reference.safetensors (f64), which tests/reference.rs compares against.

Run:  python3 -m pip install numpy scipy && python3 scripts/reference.py
"""
import json
import os
import struct

import numpy as np
import scipy.linalg

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "reference.safetensors")
RANK = 4
ALPHA = 8.0  # s = alpha / r = 2
SHAPES = {"tall": (12, 8), "wide": (8, 12), "square": (10, 10)}
BATCH = 5


def save_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype == np.int64:
            dtype = "I64"
        else:
            arr = arr.astype(np.float64)
            dtype = "F64"
        data = arr.tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(path + ".tmp", path)


def canonical_svd(w, r):
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    u, s, v = u[:, :r], s[:r], vt[:r].T
    for c in range(r):
        if u[np.argmax(np.abs(u[:, c])), c] < 0:
            u[:, c] *= -1
            v[:, c] *= -1
    return u, s, v


def loldu_factors(w, r):
    p, l, u = scipy.linalg.lu(w)  # W = P·L·U
    left = (p @ l)[:, :r]
    d = np.diag(u)[:r].copy()
    right = u[:r] / d[:, None]
    return left, d, right


def diagonal_layer(x, g, w_res, bias, left, right, z, s):
    """y = x·W_resᵀ + b + s·((x·Rᵀ)⊙z)·Lᵀ and the gradients of L = Σ y⊙g."""
    h = x @ right.T
    y = x @ w_res.T + bias + s * (h * z) @ left.T
    gl = g @ left
    dz = s * np.sum(h * gl, axis=0)
    ds = np.sum(h * z * gl)
    dx = g @ w_res + s * (gl * z) @ right
    return y, dz, ds, dx


def main():
    rng = np.random.default_rng(20261129)
    t = {}
    s = ALPHA / RANK
    for name, (m, n) in SHAPES.items():
        w = rng.standard_normal((m, n))
        bias = rng.standard_normal(m)
        x = rng.standard_normal((BATCH, n))
        g = rng.standard_normal((BATCH, m))
        k = min(m, n)
        t.update({f"{name}.w": w, f"{name}.bias": bias, f"{name}.x": x, f"{name}.g": g})

        # LoLDU factors at rank r and full rank (the truncated factors must equal the full ones').
        for r in (RANK, k):
            left, d, right = loldu_factors(w, r)
            t.update({f"{name}.lu{r}.left": left, f"{name}.lu{r}.diag": d, f"{name}.lu{r}.right": right})

        # SVFit factors.
        u, sv, v = canonical_svd(w, k)
        t.update({f"{name}.svd.u": u, f"{name}.svd.s": sv, f"{name}.svd.v": v})

        # PiSSA at rank r, s = alpha / r.
        ur, sr, vr = canonical_svd(w, RANK)
        root = np.sqrt(sr / s)
        a = root[:, None] * vr.T
        b = ur * root[None, :]
        t.update({f"{name}.pissa.a": a, f"{name}.pissa.b": b, f"{name}.pissa.base": w - s * b @ a})

        # LoRA forward/backward with given A, B.
        a = rng.standard_normal((RANK, n)) * 0.3
        b = rng.standard_normal((m, RANK)) * 0.3
        ha = x @ a.T
        y = x @ w.T + bias + s * ha @ b.T
        gb = g @ b
        t.update({
            f"{name}.lora.a": a, f"{name}.lora.b": b, f"{name}.lora.y": y,
            f"{name}.lora.da": s * gb.T @ x, f"{name}.lora.db": s * g.T @ ha,
            f"{name}.lora.dx": g @ w + s * gb @ a,
        })

        # SVFit forward/backward, z moved away from z0 = Σ_r / s.
        ur, sr, vr = u[:, :RANK], sv[:RANK], v[:, :RANK]
        z0 = sr / s
        w_res = w - ur @ np.diag(s * z0) @ vr.T
        z = z0 + 0.1 * rng.standard_normal(RANK)
        y, dz, ds, dx = diagonal_layer(x, g, w_res, bias, ur, vr.T, z, s)
        t.update({f"{name}.svfit.z": z, f"{name}.svfit.y": y, f"{name}.svfit.dz": dz,
                  f"{name}.svfit.ds": np.array([ds]), f"{name}.svfit.dx": dx})

        # LoLDU forward/backward (init lu), z moved away from z0 = D_r.
        left, d, right = loldu_factors(w, RANK)
        w_res = w - left @ np.diag(s * d) @ right
        z = d + 0.1 * rng.standard_normal(RANK)
        y, dz, ds, dx = diagonal_layer(x, g, w_res, bias, left, right, z, s)
        t.update({f"{name}.loldu.z": z, f"{name}.loldu.y": y, f"{name}.loldu.dz": dz,
                  f"{name}.loldu.ds": np.array([ds]), f"{name}.loldu.dx": dx})
    save_safetensors(OUT, t)
    print(f"wrote {len(t)} tensors to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
