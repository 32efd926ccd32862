#!/usr/bin/env python3
"""Independent numpy reference for tiny Hugging Face BERT, RoBERTa and ViT models.

Builds tiny random-weight models whose parameter names, config fields and forward
semantics follow Hugging Face transformers (4.x/5.x; eager attention, dropout off),
runs one forward pass in float64 numpy and writes, for each model, a folder under
tests/data/models/ holding

    config.json            HF config (model_type, sizes, id2label/label2id, ...)
    model.safetensors      float32 weights with HF parameter names
    reference.safetensors  the inputs (I64 ids/masks, F64 pixels) and the expected
                           outputs (F64), computed from the float32-rounded weights

Models: tiny-bert (BertForSequenceClassification), tiny-bert-bare (BertModel with the
same encoder weights, no "bert." prefix, no classifier), tiny-roberta
(RobertaForSequenceClassification), tiny-vit and tiny-vit-gray
(ViTForImageClassification).

The script checks itself: softmax rows of one head sum to 1 (and masked keys get
exactly 0), and every model's outputs are recomputed by a separate, plainly written
loop implementation (per batch, per head, per query, per key) that must agree to 1e-12.

Needs numpy only. Deterministic. Run from anywhere:

    python3 scripts/model_reference.py
"""
import json
import math
import os
import struct

import numpy as np

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
OUT_DIR = os.path.join(ROOT, "tests", "data", "models")
SEED = 20240611

# ---------------------------------------------------------------------------------------
# safetensors writer
# ---------------------------------------------------------------------------------------

_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float64): "F64",
    np.dtype(np.int64): "I64",
}


def save_safetensors(path, tensors, metadata=None):
    """Write `tensors` (name -> numpy array of f32/f64/i64) in the safetensors format."""
    header, blobs, offset = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name in sorted(tensors):
        arr = tensors[name]
        dtype = _DTYPES[arr.dtype]
        data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def load_safetensors(path):
    """Minimal reader, used only to verify what was written."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0, "header not padded to a multiple of 8"
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    out = {}
    inv = {v: k for k, v in _DTYPES.items()}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        dt = inv[info["dtype"]].newbyteorder("<")
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=dt).reshape(info["shape"])
    return out


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# ---------------------------------------------------------------------------------------
# random weights
# ---------------------------------------------------------------------------------------


class Init:
    """Draws weights in a fixed order; stores them rounded to float32."""

    def __init__(self, rng):
        self.rng = rng
        self.params = {}

    def normal(self, name, shape, std=0.2, mean=0.0):
        self.params[name] = (mean + std * self.rng.standard_normal(shape)).astype(np.float32)

    def linear(self, prefix, n_out, n_in):
        self.normal(prefix + ".weight", (n_out, n_in), 0.2)  # out x in, y = x W^T + b
        self.normal(prefix + ".bias", (n_out,), 0.1)

    def layernorm(self, prefix, n):
        self.normal(prefix + ".weight", (n,), 0.1, mean=1.0)
        self.normal(prefix + ".bias", (n,), 0.1)


def as_f64(params):
    return {k: v.astype(np.float64) for k, v in params.items()}


# ---------------------------------------------------------------------------------------
# vectorised building blocks (float64)
# ---------------------------------------------------------------------------------------

MASK_MIN = np.finfo(np.float64).min  # HF: (1 - mask) * torch.finfo(dtype).min


def linear(x, p, prefix):
    return x @ p[prefix + ".weight"].T + p[prefix + ".bias"]


def layernorm(x, p, prefix, eps):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)  # biased, as torch.nn.LayerNorm
    return (x - mu) / np.sqrt(var + eps) * p[prefix + ".weight"] + p[prefix + ".bias"]


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x):
    """hidden_act "gelu" = exact GELU: 0.5 x (1 + erf(x / sqrt 2))."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def self_attention(x, p, q_name, k_name, v_name, heads, mask=None, probs_out=None):
    """Multi-head scaled dot-product attention. mask: (B, T) of 1/0 over keys, or None."""
    b, t, h = x.shape
    d = h // heads

    def split(y):
        return y.reshape(b, t, heads, d).transpose(0, 2, 1, 3)  # (B, H, T, D)

    q, k, v = split(linear(x, p, q_name)), split(linear(x, p, k_name)), split(linear(x, p, v_name))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
    if mask is not None:
        scores = scores + ((1.0 - mask.astype(np.float64)) * MASK_MIN)[:, None, None, :]
    scores = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(scores)
    probs = e / e.sum(axis=-1, keepdims=True)
    if probs_out is not None:
        probs_out.append(probs)
    ctx = probs @ v  # (B, H, T, D)
    return ctx.transpose(0, 2, 1, 3).reshape(b, t, h)


# ---------------------------------------------------------------------------------------
# BERT / RoBERTa
# ---------------------------------------------------------------------------------------


def bert_like_params(init, cfg, prefix, pooler):
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    e = prefix + "embeddings."
    init.normal(e + "word_embeddings.weight", (cfg["vocab_size"], h))
    init.normal(e + "position_embeddings.weight", (cfg["max_position_embeddings"], h))
    init.normal(e + "token_type_embeddings.weight", (cfg["type_vocab_size"], h))
    init.layernorm(e + "LayerNorm", h)
    for i in range(cfg["num_hidden_layers"]):
        l = f"{prefix}encoder.layer.{i}."
        for n in ("query", "key", "value"):
            init.linear(l + "attention.self." + n, h, h)
        init.linear(l + "attention.output.dense", h, h)
        init.layernorm(l + "attention.output.LayerNorm", h)
        init.linear(l + "intermediate.dense", inter, h)
        init.linear(l + "output.dense", h, inter)
        init.layernorm(l + "output.LayerNorm", h)
    if pooler:
        init.linear(prefix + "pooler.dense", h, h)


def bert_like_encoder(p, cfg, prefix, input_ids, attention_mask, token_type_ids, position_ids, probs_out=None):
    eps = cfg["layer_norm_eps"]
    e = prefix + "embeddings."
    x = (p[e + "word_embeddings.weight"][input_ids]
         + p[e + "position_embeddings.weight"][position_ids]
         + p[e + "token_type_embeddings.weight"][token_type_ids])
    x = layernorm(x, p, e + "LayerNorm", eps)
    for i in range(cfg["num_hidden_layers"]):
        l = f"{prefix}encoder.layer.{i}."
        a = self_attention(x, p, l + "attention.self.query", l + "attention.self.key", l + "attention.self.value",
                           cfg["num_attention_heads"], attention_mask, probs_out if i == 0 else None)
        x = layernorm(linear(a, p, l + "attention.output.dense") + x, p, l + "attention.output.LayerNorm", eps)
        f = linear(gelu(linear(x, p, l + "intermediate.dense")), p, l + "output.dense")
        x = layernorm(f + x, p, l + "output.LayerNorm", eps)
    return x


def bert_pooler(p, prefix, hidden):
    return np.tanh(linear(hidden[:, 0], p, prefix + "pooler.dense"))


def roberta_position_ids(input_ids, pad):
    """transformers' create_position_ids_from_input_ids (past_key_values_length = 0)."""
    m = (input_ids != pad).astype(np.int64)
    return np.cumsum(m, axis=1) * m + pad


# ---------------------------------------------------------------------------------------
# ViT
# ---------------------------------------------------------------------------------------


def vit_params(init, cfg):
    h, inter, c, ps = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_channels"], cfg["patch_size"]
    n_patches = (cfg["image_size"] // ps) ** 2
    init.normal("vit.embeddings.cls_token", (1, 1, h))
    init.normal("vit.embeddings.position_embeddings", (1, n_patches + 1, h))
    init.normal("vit.embeddings.patch_embeddings.projection.weight", (h, c, ps, ps))
    init.normal("vit.embeddings.patch_embeddings.projection.bias", (h,), 0.1)
    for i in range(cfg["num_hidden_layers"]):
        l = f"vit.encoder.layer.{i}."
        init.layernorm(l + "layernorm_before", h)
        for n in ("query", "key", "value"):
            init.linear(l + "attention.attention." + n, h, h)
        init.linear(l + "attention.output.dense", h, h)
        init.layernorm(l + "layernorm_after", h)
        init.linear(l + "intermediate.dense", inter, h)
        init.linear(l + "output.dense", h, inter)
    init.layernorm("vit.layernorm", h)
    init.linear("classifier", num_labels(cfg), h)


def vit_patchify(pixel_values, ps):
    """(B, C, H, W) -> (B, gh*gw, C*ps*ps), patches in row-major grid order, each in (C, ps, ps) order."""
    b, c, hh, ww = pixel_values.shape
    gh, gw = hh // ps, ww // ps
    x = pixel_values[:, :, :gh * ps, :gw * ps].reshape(b, c, gh, ps, gw, ps)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ps * ps)


def vit_forward(p, cfg, pixel_values, probs_out=None):
    eps, hsz, ps = cfg["layer_norm_eps"], cfg["hidden_size"], cfg["patch_size"]
    w = p["vit.embeddings.patch_embeddings.projection.weight"].reshape(hsz, -1)
    patches = vit_patchify(pixel_values, ps) @ w.T + p["vit.embeddings.patch_embeddings.projection.bias"]
    b = pixel_values.shape[0]
    cls = np.broadcast_to(p["vit.embeddings.cls_token"], (b, 1, hsz))
    x = np.concatenate([cls, patches], axis=1) + p["vit.embeddings.position_embeddings"]
    for i in range(cfg["num_hidden_layers"]):
        l = f"vit.encoder.layer.{i}."
        y = layernorm(x, p, l + "layernorm_before", eps)
        a = self_attention(y, p, l + "attention.attention.query", l + "attention.attention.key",
                           l + "attention.attention.value", cfg["num_attention_heads"], None,
                           probs_out if i == 0 else None)
        x = linear(a, p, l + "attention.output.dense") + x
        y = layernorm(x, p, l + "layernorm_after", eps)
        x = linear(gelu(linear(y, p, l + "intermediate.dense")), p, l + "output.dense") + x
    x = layernorm(x, p, "vit.layernorm", eps)
    return linear(x[:, 0], p, "classifier"), x


# ---------------------------------------------------------------------------------------
# plain loop implementation (self-check; deliberately shares no code with the above)
# ---------------------------------------------------------------------------------------


def loop_linear(vec, weight, bias):
    out = []
    for o in range(weight.shape[0]):
        s = float(bias[o])
        for i in range(weight.shape[1]):
            s += float(weight[o, i]) * float(vec[i])
        out.append(s)
    return out


def loop_layernorm(vec, weight, bias, eps):
    n = len(vec)
    mean = sum(vec) / n
    var = sum((v - mean) ** 2 for v in vec) / n
    return [(vec[i] - mean) / math.sqrt(var + eps) * float(weight[i]) + float(bias[i]) for i in range(n)]


def loop_gelu(v):
    return 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))


def loop_attention(seq, p, q_name, k_name, v_name, heads, key_mask):
    """seq: list (T) of lists (h) for one batch element; key_mask: list of 0/1 or None."""
    t, h = len(seq), len(seq[0])
    d = h // heads
    q = [loop_linear(s, p[q_name + ".weight"], p[q_name + ".bias"]) for s in seq]
    k = [loop_linear(s, p[k_name + ".weight"], p[k_name + ".bias"]) for s in seq]
    v = [loop_linear(s, p[v_name + ".weight"], p[v_name + ".bias"]) for s in seq]
    out = [[0.0] * h for _ in range(t)]
    for hd in range(heads):
        lo = hd * d
        for i in range(t):
            keys = [j for j in range(t) if key_mask is None or key_mask[j] == 1]
            scores = {}
            for j in keys:
                s = 0.0
                for c in range(d):
                    s += q[i][lo + c] * k[j][lo + c]
                scores[j] = s / math.sqrt(d)
            m = max(scores.values())
            z = sum(math.exp(scores[j] - m) for j in keys)
            for c in range(d):
                acc = 0.0
                for j in keys:
                    acc += math.exp(scores[j] - m) / z * v[j][lo + c]
                out[i][lo + c] = acc
    return out


def loop_bert_like(p, cfg, prefix, ids, mask, types, positions):
    """Returns last_hidden_state as nested lists [B][T][h]."""
    eps = cfg["layer_norm_eps"]
    e = prefix + "embeddings."
    result = []
    for b in range(len(ids)):
        seq = []
        for t in range(len(ids[b])):
            vec = [float(p[e + "word_embeddings.weight"][ids[b][t], c])
                   + float(p[e + "position_embeddings.weight"][positions[b][t], c])
                   + float(p[e + "token_type_embeddings.weight"][types[b][t], c])
                   for c in range(cfg["hidden_size"])]
            seq.append(loop_layernorm(vec, p[e + "LayerNorm.weight"], p[e + "LayerNorm.bias"], eps))
        for i in range(cfg["num_hidden_layers"]):
            l = f"{prefix}encoder.layer.{i}."
            att = loop_attention(seq, p, l + "attention.self.query", l + "attention.self.key",
                                 l + "attention.self.value", cfg["num_attention_heads"], list(mask[b]))
            new = []
            for t in range(len(seq)):
                o = loop_linear(att[t], p[l + "attention.output.dense.weight"], p[l + "attention.output.dense.bias"])
                x1 = loop_layernorm([o[c] + seq[t][c] for c in range(len(o))],
                                    p[l + "attention.output.LayerNorm.weight"], p[l + "attention.output.LayerNorm.bias"], eps)
                mid = [loop_gelu(u) for u in loop_linear(x1, p[l + "intermediate.dense.weight"], p[l + "intermediate.dense.bias"])]
                f = loop_linear(mid, p[l + "output.dense.weight"], p[l + "output.dense.bias"])
                new.append(loop_layernorm([f[c] + x1[c] for c in range(len(f))],
                                          p[l + "output.LayerNorm.weight"], p[l + "output.LayerNorm.bias"], eps))
            seq = new
        result.append(seq)
    return result


def loop_vit(p, cfg, pixels):
    eps, hsz, ps, c_in = cfg["layer_norm_eps"], cfg["hidden_size"], cfg["patch_size"], cfg["num_channels"]
    conv_w, conv_b = p["vit.embeddings.patch_embeddings.projection.weight"], p["vit.embeddings.patch_embeddings.projection.bias"]
    g = cfg["image_size"] // ps
    pos = p["vit.embeddings.position_embeddings"][0]
    logits, hidden = [], []
    for b in range(pixels.shape[0]):
        seq = [[float(p["vit.embeddings.cls_token"][0, 0, c]) + float(pos[0, c]) for c in range(hsz)]]
        for gy in range(g):
            for gx in range(g):
                vec = []
                for o in range(hsz):
                    s = float(conv_b[o])
                    for ch in range(c_in):
                        for dy in range(ps):
                            for dx in range(ps):
                                s += float(conv_w[o, ch, dy, dx]) * float(pixels[b, ch, gy * ps + dy, gx * ps + dx])
                    vec.append(s + float(pos[1 + gy * g + gx, o]))
                seq.append(vec)
        for i in range(cfg["num_hidden_layers"]):
            l = f"vit.encoder.layer.{i}."
            normed = [loop_layernorm(s, p[l + "layernorm_before.weight"], p[l + "layernorm_before.bias"], eps) for s in seq]
            att = loop_attention(normed, p, l + "attention.attention.query", l + "attention.attention.key",
                                 l + "attention.attention.value", cfg["num_attention_heads"], None)
            new = []
            for t in range(len(seq)):
                o = loop_linear(att[t], p[l + "attention.output.dense.weight"], p[l + "attention.output.dense.bias"])
                x1 = [o[c] + seq[t][c] for c in range(hsz)]
                y = loop_layernorm(x1, p[l + "layernorm_after.weight"], p[l + "layernorm_after.bias"], eps)
                mid = [loop_gelu(u) for u in loop_linear(y, p[l + "intermediate.dense.weight"], p[l + "intermediate.dense.bias"])]
                f = loop_linear(mid, p[l + "output.dense.weight"], p[l + "output.dense.bias"])
                new.append([f[c] + x1[c] for c in range(hsz)])
            seq = new
        seq = [loop_layernorm(s, p["vit.layernorm.weight"], p["vit.layernorm.bias"], eps) for s in seq]
        hidden.append(seq)
        logits.append(loop_linear(seq[0], p["classifier.weight"], p["classifier.bias"]))
    return np.array(logits), np.array(hidden)


def assert_close(name, a, b, tol=1e-12):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"{name}: shape {a.shape} != {b.shape}"
    err = float(np.max(np.abs(a - b)))
    assert err <= tol, f"{name}: vectorised and loop implementations differ by {err:g}"
    print(f"  self-check {name}: max |vectorised - loop| = {err:.2e}")


def check_softmax(name, probs, mask):
    """probs: (B, H, T, T) of layer 0; checks head 0 (and the others, it costs nothing)."""
    head0 = probs[:, 0]
    rows = head0.sum(axis=-1)
    assert np.max(np.abs(rows - 1.0)) < 1e-12, f"{name}: softmax rows do not sum to 1"
    if mask is not None:
        keep = mask.astype(bool)[:, None, :]
        assert np.all(np.where(keep, True, head0 == 0.0)), f"{name}: masked keys get nonzero probability"
        real = np.where(keep, head0, 0.0).sum(axis=-1)
        assert np.max(np.abs(real - 1.0)) < 1e-12, f"{name}: non-masked keys do not sum to 1"
    assert np.max(np.abs(probs.sum(axis=-1) - 1.0)) < 1e-12
    print(f"  self-check {name}: layer-0 softmax rows sum to 1 (max err {np.max(np.abs(rows - 1.0)):.1e})"
          + ("; masked keys get exactly 0" if mask is not None else ""))


# ---------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------


def labels(n):
    return {str(i): f"LABEL_{i}" for i in range(n)}, {f"LABEL_{i}": i for i in range(n)}


def bert_config(architectures, num_labels):
    cfg = {
        "architectures": architectures,
        "model_type": "bert",
        "vocab_size": 50,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 24,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if num_labels is not None:
        cfg["id2label"], cfg["label2id"] = labels(num_labels)
    return cfg


def roberta_config():
    cfg = {
        "architectures": ["RobertaForSequenceClassification"],
        "model_type": "roberta",
        "vocab_size": 50,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 26,
        "type_vocab_size": 1,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-05,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "position_embedding_type": "absolute",
        "use_cache": True,
        "torch_dtype": "float32",
    }
    cfg["id2label"], cfg["label2id"] = labels(2)
    return cfg


def vit_config(num_channels, image_size, patch_size, num_labels):
    cfg = {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "image_size": image_size,
        "patch_size": patch_size,
        "num_channels": num_channels,
        "qkv_bias": True,
        "encoder_stride": patch_size,
        "torch_dtype": "float32",
    }
    cfg["id2label"], cfg["label2id"] = labels(num_labels)
    return cfg


def num_labels(cfg):
    return len(cfg["id2label"])


# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------


def write_model(name, cfg, params, reference):
    d = os.path.join(OUT_DIR, name)
    os.makedirs(d, exist_ok=True)
    for k, v in params.items():
        assert v.dtype == np.float32, k
    for k, v in reference.items():
        assert v.dtype in (np.float64, np.int64), k
    write_json(os.path.join(d, "config.json"), cfg)
    save_safetensors(os.path.join(d, "model.safetensors"), params, {"format": "pt"})
    save_safetensors(os.path.join(d, "reference.safetensors"), reference)
    # Read back what was written.
    back = load_safetensors(os.path.join(d, "model.safetensors"))
    assert set(back) == set(params) and all(np.array_equal(back[k], params[k]) for k in params)
    back = load_safetensors(os.path.join(d, "reference.safetensors"))
    assert set(back) == set(reference) and all(np.array_equal(back[k], reference[k]) for k in reference)

    print(f"wrote {os.path.relpath(d, ROOT)}/")
    for f in ("config.json", "model.safetensors", "reference.safetensors"):
        print(f"    {f:24s} {os.path.getsize(os.path.join(d, f)):7d} bytes")
    n = sum(v.size for v in params.values())
    print(f"    {len(params)} weight tensors, {n} parameters")
    for k in sorted(reference):
        v = reference[k]
        print(f"    reference {k:18s} {'I64' if v.dtype == np.int64 else 'F64'} {list(v.shape)}")


def main():
    os.makedirs(OUT_DIR, exist_ok=True)

    # ---------------- BERT (classification) and the same encoder bare ----------------
    cfg = bert_config(["BertForSequenceClassification"], 3)
    init = Init(np.random.default_rng([SEED, 1]))
    bert_like_params(init, cfg, "bert.", pooler=True)
    init.linear("classifier", num_labels(cfg), cfg["hidden_size"])
    params = init.params
    p = as_f64(params)

    ids_rng = np.random.default_rng([SEED, 100])
    lengths = [7, 5, 3]
    input_ids = np.zeros((3, 7), dtype=np.int64)  # pad_token_id 0 at the end
    attention_mask = np.zeros((3, 7), dtype=np.int64)
    for b, n in enumerate(lengths):
        input_ids[b, :n] = ids_rng.integers(1, cfg["vocab_size"], size=n)
        attention_mask[b, :n] = 1
    token_type_ids = np.zeros((3, 7), dtype=np.int64)
    token_type_ids[0, 4:] = 1  # second segment in row 0
    token_type_ids[1, 3:5] = 1  # and in row 1 (its padding stays type 0)
    position_ids = np.broadcast_to(np.arange(7, dtype=np.int64), (3, 7))

    probs = []
    hidden = bert_like_encoder(p, cfg, "bert.", input_ids, attention_mask, token_type_ids, position_ids, probs)
    pooled = bert_pooler(p, "bert.", hidden)
    logits = linear(pooled, p, "classifier")
    check_softmax("tiny-bert", probs[0], attention_mask)
    loop_hidden = np.array(loop_bert_like(p, cfg, "bert.", input_ids.tolist(), attention_mask.tolist(),
                                          token_type_ids.tolist(), position_ids.tolist()))
    loop_pooled = np.array([[math.tanh(v) for v in loop_linear(loop_hidden[b][0], p["bert.pooler.dense.weight"],
                                                                p["bert.pooler.dense.bias"])] for b in range(3)])
    loop_logits = np.array([loop_linear(loop_pooled[b], p["classifier.weight"], p["classifier.bias"]) for b in range(3)])
    assert_close("tiny-bert last_hidden_state", hidden, loop_hidden)
    assert_close("tiny-bert logits", logits, loop_logits)
    # Masking must matter only through the keys: truncating row 2 to its real tokens
    # must give the same hidden states there.
    n = lengths[2]
    short = bert_like_encoder(p, cfg, "bert.", input_ids[2:, :n], attention_mask[2:, :n], token_type_ids[2:, :n],
                              position_ids[2:, :n])
    assert_close("tiny-bert padded vs unpadded row", hidden[2:, :n], short)

    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
    write_model("tiny-bert", cfg, params, {**inputs, "logits": logits, "last_hidden_state": hidden, "pooled": pooled})

    bare_cfg = bert_config(["BertModel"], None)
    bare_params = {k[len("bert."):]: v for k, v in params.items() if k.startswith("bert.")}
    bare_hidden = bert_like_encoder(as_f64(bare_params), bare_cfg, "", input_ids, attention_mask, token_type_ids,
                                    position_ids)
    bare_pooled = bert_pooler(as_f64(bare_params), "", bare_hidden)
    assert np.array_equal(bare_hidden, hidden) and np.array_equal(bare_pooled, pooled)
    write_model("tiny-bert-bare", bare_cfg, bare_params,
                {**inputs, "last_hidden_state": bare_hidden, "pooled": bare_pooled})

    # ---------------- RoBERTa ----------------
    cfg = roberta_config()
    pad = cfg["pad_token_id"]
    init = Init(np.random.default_rng([SEED, 2]))
    bert_like_params(init, cfg, "roberta.", pooler=False)
    init.linear("classifier.dense", cfg["hidden_size"], cfg["hidden_size"])
    init.linear("classifier.out_proj", num_labels(cfg), cfg["hidden_size"])
    params = init.params
    p = as_f64(params)

    ids_rng = np.random.default_rng([SEED, 200])
    lengths = [7, 4, 6]
    input_ids = np.full((3, 7), pad, dtype=np.int64)
    attention_mask = np.zeros((3, 7), dtype=np.int64)
    non_pad = np.array([i for i in range(cfg["vocab_size"]) if i != pad])
    for b, n in enumerate(lengths):
        input_ids[b, :n] = ids_rng.choice(non_pad, size=n)
        input_ids[b, 0] = cfg["bos_token_id"]  # <s>, as a tokenizer would
        input_ids[b, n - 1] = cfg["eos_token_id"]  # </s>
        attention_mask[b, :n] = 1
    position_ids = roberta_position_ids(input_ids, pad)
    assert position_ids.max() < cfg["max_position_embeddings"]
    token_type_ids = np.zeros_like(input_ids)  # RoBERTa's default (type_vocab_size 1)

    probs = []
    hidden = bert_like_encoder(p, cfg, "roberta.", input_ids, attention_mask, token_type_ids, position_ids, probs)
    logits = linear(np.tanh(linear(hidden[:, 0], p, "classifier.dense")), p, "classifier.out_proj")
    check_softmax("tiny-roberta", probs[0], attention_mask)
    loop_pos = []
    for row in input_ids.tolist():
        count, pr = 0, []
        for tok in row:
            if tok != pad:
                count += 1
                pr.append(pad + count)
            else:
                pr.append(pad)
        loop_pos.append(pr)
    assert np.array_equal(np.array(loop_pos), position_ids)
    loop_hidden = np.array(loop_bert_like(p, cfg, "roberta.", input_ids.tolist(), attention_mask.tolist(),
                                          token_type_ids.tolist(), loop_pos))
    loop_logits = []
    for b in range(3):
        d = [math.tanh(v) for v in loop_linear(loop_hidden[b][0], p["classifier.dense.weight"], p["classifier.dense.bias"])]
        loop_logits.append(loop_linear(d, p["classifier.out_proj.weight"], p["classifier.out_proj.bias"]))
    assert_close("tiny-roberta last_hidden_state", hidden, loop_hidden)
    assert_close("tiny-roberta logits", logits, loop_logits)
    write_model("tiny-roberta", cfg, params, {
        "input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
        "logits": logits, "last_hidden_state": hidden,
    })

    # ---------------- ViT ----------------
    for name, (channels, image, patch, n_labels, seed) in {
        "tiny-vit": (3, 8, 4, 4, 3),
        "tiny-vit-gray": (1, 12, 4, 10, 4),
    }.items():
        cfg = vit_config(channels, image, patch, n_labels)
        init = Init(np.random.default_rng([SEED, seed]))
        vit_params(init, cfg)
        params = init.params
        p = as_f64(params)
        pixel_values = (np.random.default_rng([SEED, 100 * seed])
                        .standard_normal((2, channels, image, image)).astype(np.float32).astype(np.float64))
        probs = []
        logits, hidden = vit_forward(p, cfg, pixel_values, probs)
        check_softmax(name, probs[0], None)
        loop_logits, loop_hidden = loop_vit(p, cfg, pixel_values)
        assert_close(f"{name} last_hidden_state", hidden, loop_hidden)
        assert_close(f"{name} logits", logits, loop_logits)
        assert hidden.shape == (2, (image // patch) ** 2 + 1, cfg["hidden_size"])
        write_model(name, cfg, params, {"pixel_values": pixel_values, "logits": logits, "last_hidden_state": hidden})


if __name__ == "__main__":
    main()
