"""SVFit and LoLDU for PyTorch, as peft-studio computes them (METHODS.md of the project).

One template serves both: a linear layer keeps a frozen residual ``W_res``, a frozen left
factor ``L`` (m x r), a frozen right factor ``R`` (r x n) and a trainable diagonal ``z``
(plus, optionally, a trainable scalar ``s`` and ReLU on ``z``):

    y = x W_res^T + b + s * ((dropout(x) R^T) * act(z)) L^T

- SVFit: thin SVD ``W = U S V^T``; ``L = U_r``, ``R = V_r^T``, ``z0 = S_r / s0``.
- LoLDU: LU with partial row pivoting stopped after r steps; ``L = P L_r`` (original row
  order), ``R = U_1[:r]`` (rows divided by their pivots), ``z0`` from the pivots ``D_r``
  (init ``lu``, ``uniform``, ``normal``, ``constant``, ``ones``, ``zeros``).
- Always ``W_res = W - s0 * L diag(act(z0)) R``, so the model is unchanged at step 0.

``attach(model, cfg)`` replaces every targeted ``nn.Linear`` (PEFT's matching rules) by a
``DiagonalLinear``; ``save(model, dir, cfg, head)`` writes an adapter folder in peft-studio's
own format (``base_model.model.<module>.<method>.{z,z0,scale,scale0[,perm]}`` + the head as
``modules_to_save``), which ``peft-studio import-run`` and ``peft-studio`` load natively: the
frozen factors are rebuilt from the base weights (LoLDU replays the stored pivot order).

Decompositions run once, on the CPU, in float64; the factors are then stored in float32.
"""

import json
import math
import os
import re

import torch
from torch import nn

HEAD_NAMES = ("classifier", "score", "lm_head")


# ---------------------------------------------------------------------------------------------
# Target matching (PEFT's rules)


def target_matcher(targets):
    """A predicate on module paths: a list matches a path equal to an entry or ending with
    ``.entry``; ``all-linear`` matches every linear layer outside the head; any other string is
    a full regular-expression match."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return lambda path: not any(p in HEAD_NAMES for p in path.split("."))
        rx = re.compile(r"(?:%s)\Z" % targets)
        return lambda path: rx.match(path) is not None
    entries = list(targets)
    return lambda path: any(path == e or path.endswith("." + e) for e in entries)


# ---------------------------------------------------------------------------------------------
# Decompositions


def lu_truncated(w, rank, pivot_epsilon=1e-7, forced_pivots=None):
    """LU with partial row pivoting of ``w`` (m x n, float64), stopped after ``rank`` steps.

    Returns ``(left, diag, right, perm)``: ``left = P L_r`` (m x r), the first r pivots,
    ``right = U_1[:r]`` (unit upper-trapezoidal, r x n) and the row order after r steps
    (position i holds original row ``perm[i]``), exactly as peft-studio's ``lu_truncated``.
    """
    a = w.detach().to(torch.float64).clone()
    m, n = a.shape
    if rank < 1 or rank > min(m, n):
        raise ValueError(f"rank {rank} is impossible for a {m}x{n} weight")
    threshold = pivot_epsilon * a.abs().max().item()
    perm = list(range(m))
    for j in range(rank):
        if forced_pivots is not None:
            p = perm.index(int(forced_pivots[j]), j)
        else:
            p = j + int(torch.argmax(a[j:, j].abs()).item())
            # peft-studio keeps the first of equal maxima, as argmax does.
        if p != j:
            a[[j, p]] = a[[p, j]]
            perm[j], perm[p] = perm[p], perm[j]
        pivot = a[j, j].item()
        if not (abs(pivot) >= threshold and pivot != 0.0 and math.isfinite(pivot)):
            raise ValueError(
                f"pivot {j} is {pivot:.3e}, below pivot_epsilon * max|W| = {threshold:.3e}"
            )
        if j + 1 < m:
            l = a[j + 1:, j] / pivot
            a[j + 1:, j] = l
            a[j + 1:, j + 1:] -= torch.outer(l, a[j, j + 1:])
    left = torch.zeros(m, rank, dtype=torch.float64)
    for pos, orig in enumerate(perm):
        c = min(rank, pos + 1)
        left[orig, :c] = a[pos, :c]
        if pos < rank:
            left[orig, pos] = 1.0
    diag = a.diagonal()[:rank].clone()
    right = torch.triu(a[:rank, :]) / diag[:, None]
    right[torch.arange(rank), torch.arange(rank)] = 1.0
    return left, diag, right, perm


def top_svd(w, rank):
    """The leading ``rank`` singular triplets of ``w`` (float64): ``(U_r, S_r, V_r^T)``."""
    u, s, vh = torch.linalg.svd(w.detach().to(torch.float64), full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank, :]


def rank_for_energy(s, threshold):
    """The smallest r with sum_{i<=r} s_i^2 >= threshold * sum s_i^2."""
    e = (s.to(torch.float64) ** 2).cumsum(0)
    return int(torch.searchsorted(e, threshold * e[-1] * (1 - 1e-12)).item()) + 1


def scale_for_rank(cfg, r):
    """``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); alpha defaults to the rank."""
    alpha = cfg.get("alpha")
    alpha = float(r) if alpha is None else float(alpha)
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def initial_z(init, values, s0, generator):
    """z0 from the decomposition's values (S_r or D_r), by the initialiser's name."""
    r = values.numel()
    mean = values.mean()
    std = values.std(unbiased=False)
    if init == "svd":
        return values / s0
    if init == "lu":
        return values.clone()
    if init == "uniform":
        h = abs(mean.item()) / 2
        return (torch.rand(r, dtype=torch.float64, generator=generator) * 2 - 1) * h
    if init == "normal":
        return mean + std * torch.randn(r, dtype=torch.float64, generator=generator)
    if init == "constant":
        return torch.full((r,), mean.item(), dtype=torch.float64)
    if init == "ones":
        return torch.ones(r, dtype=torch.float64)
    if init == "zeros":
        return torch.zeros(r, dtype=torch.float64)
    raise ValueError(f"init `{init}` is not an SVFit or LoLDU initialiser")


# ---------------------------------------------------------------------------------------------
# The layer


class DiagonalLinear(nn.Module):
    """A linear layer with SVFit's or LoLDU's adapter (frozen factors + trainable diagonal)."""

    def __init__(self, base, method, cfg, path="", forced_perm=None, generator=None):
        super().__init__()
        if method not in ("svfit", "loldu"):
            raise ValueError(f"method `{method}` is not svfit or loldu")
        w = base.weight.detach()
        m, n = w.shape
        k = min(m, n)
        self.method = method
        self.path = path
        self.relu = bool(cfg.get("relu", False))
        self.dropout = nn.Dropout(float(cfg.get("dropout", 0.0) or 0.0))
        init = cfg.get("init") or ("svd" if method == "svfit" else "lu")
        w64 = w.to(torch.float64).cpu()
        perm = None
        if method == "svfit":
            u, s, vh = top_svd(w64, k)
            r = int(cfg["rank"])
            if cfg.get("energy_threshold") is not None:
                r = rank_for_energy(s, float(cfg["energy_threshold"]))
            r = min(r, k)
            left, values, right = u[:, :r], s[:r], vh[:r, :]
        else:
            r = min(int(cfg["rank"]), k)
            try:
                left, values, right, perm = lu_truncated(
                    w64, r, float(cfg.get("pivot_epsilon", 1e-7)), forced_perm
                )
            except ValueError as e:
                raise ValueError(f"{path}: LoLDU: {e}") from None
        s0 = scale_for_rank(cfg, r)
        z0 = initial_z(init, values, s0, generator)
        act = z0.clamp_min(0) if self.relu else z0
        residual = w64 - (left * (s0 * act)[None, :]) @ right
        dev = w.device
        self.register_buffer("weight", residual.to(w.dtype).to(dev))
        self.register_buffer("bias", None if base.bias is None else base.bias.detach().clone())
        self.register_buffer("left", left.to(torch.float32).to(dev))
        self.register_buffer("right", right.to(torch.float32).to(dev))
        self.register_buffer("z0", z0.to(torch.float32).to(dev))
        self.z = nn.Parameter(z0.to(torch.float32).to(dev).clone())
        self.s0 = float(s0)
        if cfg.get("trainable_scale"):
            self.scale = nn.Parameter(torch.tensor([s0], dtype=torch.float32, device=dev))
        else:
            self.register_buffer("scale", torch.tensor([s0], dtype=torch.float32, device=dev))
        self.perm = perm
        self.in_features, self.out_features = n, m

    @property
    def rank(self):
        return self.z.numel()

    def coefficients(self):
        """``s * act(z)``: the diagonal the branch applies."""
        z = torch.relu(self.z) if self.relu else self.z
        return self.scale * z

    def forward(self, x):
        y = nn.functional.linear(x, self.weight, self.bias)
        xf = self.dropout(x.to(torch.float32))
        h = (xf @ self.right.t()) * self.coefficients()
        return y + (h @ self.left.t()).to(y.dtype)

    def delta_weight(self):
        """The learned change relative to the pre-trained weight (m x n)."""
        z0 = torch.relu(self.z0) if self.relu else self.z0
        diff = self.coefficients() - self.s0 * z0
        return (self.left * diff[None, :]) @ self.right


def attach(model, cfg, seed=0):
    """Replaces every ``nn.Linear`` of ``model`` that ``cfg["targets"]`` matches (never the
    head) by a ``DiagonalLinear``; freezes everything else. Returns the adapted paths."""
    method = cfg["method"]
    match = target_matcher(cfg["targets"])
    gen = torch.Generator().manual_seed(int(cfg.get("seed", seed)) ^ 0x5EED2A11)
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear)
        and match(name)
        and not any(part in HEAD_NAMES for part in name.split("."))
    ]
    if not chosen:
        some = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:6]
        raise ValueError(f"targets {cfg['targets']!r} match no linear layer (some: {some})")
    for name, mod in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, DiagonalLinear(mod, method, cfg, name, generator=gen))
    return [n for n, _ in chosen]


def adapted(model):
    """``(path, DiagonalLinear)`` for every adapted layer."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DiagonalLinear)]


def save(model, out_dir, cfg, head=(), task_type=None, base=None):
    """Writes the adapters of ``model`` (and the fully trained ``head`` modules, by path) as an
    adapter folder in peft-studio's format."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    method = cfg["method"]
    tensors, ranks = {}, {}
    for path, layer in adapted(model):
        k = f"base_model.model.{path}.{method}"
        tensors[f"{k}.z"] = layer.z.detach().float().cpu().contiguous()
        tensors[f"{k}.z0"] = layer.z0.detach().float().cpu().contiguous()
        tensors[f"{k}.scale"] = layer.scale.detach().float().reshape(1).cpu().contiguous()
        tensors[f"{k}.scale0"] = torch.tensor([layer.s0], dtype=torch.float32)
        if layer.perm is not None:
            tensors[f"{k}.perm"] = torch.tensor(layer.perm, dtype=torch.int64)
        ranks[path] = layer.rank
    if not tensors:
        raise ValueError("the model carries no SVFit/LoLDU adapter to save")
    for module in head:
        for pname, p in model.get_submodule(module).named_parameters():
            tensors[f"base_model.model.{module}.{pname}"] = p.detach().float().cpu().contiguous()
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    r = int(cfg["rank"])
    config = {
        "peft_type": method.upper(),
        "r": r,
        "lora_alpha": cfg.get("alpha") if cfg.get("alpha") is not None else r,
        "target_modules": cfg["targets"],
        "lora_dropout": cfg.get("dropout", 0.0),
        "bias": "none",
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "init_lora_weights": cfg.get("init") or ("svd" if method == "svfit" else "lu"),
        "fan_in_fan_out": False,
        "inference_mode": True,
        "task_type": task_type,
        "base_model_name_or_path": base,
        "modules_to_save": list(head) or None,
        "rank_pattern": {p: rr for p, rr in ranks.items() if rr != r},
        "alpha_pattern": {},
        "peft_studio": cfg,
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def load(model, adapter_dir):
    """Attaches the adapters saved in ``adapter_dir`` to ``model`` (rebuilding the frozen
    factors from its weights, replaying LoLDU's pivots) and loads z, the scale and the head."""
    from safetensors.torch import load_file

    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    cfg = config["peft_studio"]
    method = cfg["method"]
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    prefix = "base_model.model."
    for p in model.parameters():
        p.requires_grad_(False)
    done = set()
    for key in tensors:
        if not key.endswith(f".{method}.z"):
            continue
        path = key[len(prefix):-len(f".{method}.z")]
        k = f"{prefix}{path}.{method}"
        base = model.get_submodule(path)
        local = dict(cfg)
        local["rank"] = tensors[f"{k}.z"].numel()
        local.pop("energy_threshold", None)
        perm = tensors.get(f"{k}.perm")
        layer = DiagonalLinear(base, method, local, path,
                               forced_perm=None if perm is None else perm.tolist())
        with torch.no_grad():
            layer.z.copy_(tensors[f"{k}.z"])
            layer.z0.copy_(tensors[f"{k}.z0"])
            layer.scale.copy_(tensors[f"{k}.scale"].reshape(1))
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
        done.add(path)
    for module in config.get("modules_to_save") or []:
        for pname, p in model.get_submodule(module).named_parameters():
            key = f"{prefix}{module}.{pname}"
            if key in tensors:
                with torch.no_grad():
                    p.copy_(tensors[key])
    return sorted(done)
