#!/usr/bin/env python3
"""Reference outputs of the job's SVFit and LoLDU PyTorch modules (assets/job/peft_studio_adapters.py),
which `tests/job_modules.rs` checks peft-studio against: the same base weights and adapter values
must give the same outputs.

For each case: a random linear layer (W, b) at path `layer`, the PyTorch module attached with
the case's config, z (and the scale, when it trains) moved away from their starting values, the
output y for a fixed input x. Writes, per case, an adapter folder in peft-studio's format
(`adapter_config.json`, `adapter_model.safetensors`, written by the module's `save`) and
`io.safetensors` (w, b, x, y). Prints, per case, max |y(step 0) - base output| (the init
preserves the layer) as JSON.

  ~/.cache/peft-peer/bin/python scripts/job_modules_reference.py [--out tests/reference/job_modules]
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "assets", "job"))
import peft_studio_adapters as psa  # noqa: E402

# (name, method, m, n, rank, alpha, init, trainable_scale, relu)
CASES = [
    ("svfit", "svfit", 24, 16, 6, 12.0, None, True, False),
    ("svfit_relu", "svfit", 20, 30, 5, None, None, False, True),
    ("loldu", "loldu", 20, 28, 7, None, None, True, False),
    ("loldu_constant", "loldu", 32, 12, 12, 6.0, "constant", False, False),
]


class Holder(torch.nn.Module):
    def __init__(self, m, n):
        super().__init__()
        self.layer = torch.nn.Linear(n, m)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "..", "tests", "reference", "job_modules"))
    args = ap.parse_args()
    torch.manual_seed(0)
    report = {}
    for name, method, m, n, r, alpha, init, ts, relu in CASES:
        cfg = {"method": method, "rank": r, "alpha": alpha, "targets": ["layer"], "init": init,
               "dropout": 0.0, "use_rslora": False, "trainable_scale": ts, "relu": relu,
               "energy_threshold": None, "pivot_epsilon": 1e-7, "seed": 0}
        h = Holder(m, n)
        with torch.no_grad():
            h.layer.weight.copy_(torch.randn(m, n) * 0.5)
            h.layer.bias.copy_(torch.randn(m) * 0.1)
        w, b = h.layer.weight.detach().clone(), h.layer.bias.detach().clone()
        x = torch.randn(5, n)
        base = x @ w.t() + b
        psa.attach(h, cfg)
        with torch.no_grad():
            at_init = (h.layer(x) - base).abs().max().item()
            h.layer.z.mul_(1 + 0.3 * torch.randn(r))
            if ts:
                h.layer.scale.mul_(1.25)
            y = h.layer(x)
        d = os.path.join(args.out, name)
        psa.save(h, d, cfg)
        save_file({"w": w.contiguous(), "b": b.contiguous(), "x": x.contiguous(),
                   "y": y.contiguous()}, os.path.join(d, "io.safetensors"))
        report[name] = {"max_abs_diff_at_init": at_init, "max_abs_y": y.abs().max().item()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
