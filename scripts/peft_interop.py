#!/usr/bin/env python3
"""PEFT interop check: load a peft-studio export with transformers (+ PEFT) and compare the
logits PyTorch computes with the ones peft-studio wrote beside the export
(`check_logits.json`). Prints max |logit diff| and exits 1 above --tol × max(1, max |logit|).

Needs torch, transformers and peft (the peer venv: /root/.cache/peft-peer/bin/python).

  # an encoder run (adapter folder, or a merged model folder):
  peft-studio export RUN --format peft --out /tmp/x --write-check-logits
  python scripts/peft_interop.py --export /tmp/x
  peft-studio export RUN --format merged --out /tmp/m --write-check-logits
  python scripts/peft_interop.py --export /tmp/m

  # a LLaMA-family model (SmolLM2 …) with a random non-zero LoRA on q,v, exported by the
  # ignored test `interop_export` (PEFT_INTEROP_MODEL / PEFT_INTEROP_OUT):
  PEFT_INTEROP_MODEL=/path/to/smollm2 PEFT_INTEROP_OUT=/tmp/smol-peft \
    cargo test --release --test llama_export -- --ignored interop_export
  python scripts/peft_interop.py --export /tmp/smol-peft --base /path/to/smollm2
"""
import argparse
import json
import os
import sys

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--export", required=True, help="a peft-studio export folder")
    ap.add_argument("--base", help="base model folder (default: the adapter's base_model_name_or_path)")
    ap.add_argument("--tol", type=float, default=1e-5, help="relative to max(1, max |logit|)")
    args = ap.parse_args()
    import transformers
    from transformers import (AutoModelForCausalLM, AutoModelForImageClassification,
                              AutoModelForSequenceClassification)

    check = json.load(open(os.path.join(args.export, "check_logits.json")))
    kind = check["kind"]
    expected = torch.tensor(check["logits"], dtype=torch.float32).reshape(check["logits_shape"])
    auto = {"causal_lm": AutoModelForCausalLM, "text": AutoModelForSequenceClassification,
            "image": AutoModelForImageClassification}[kind]
    adapter_cfg = os.path.join(args.export, "adapter_config.json")
    if os.path.exists(adapter_cfg):
        import peft
        cfg = json.load(open(adapter_cfg))
        base = args.base or cfg["base_model_name_or_path"]
        kw = {}
        if kind != "causal_lm":
            kw = dict(num_labels=expected.shape[-1], ignore_mismatched_sizes=True)
        model = auto.from_pretrained(base, torch_dtype=torch.float32, **kw)
        model = peft.PeftModel.from_pretrained(model, args.export)
        what = f"PEFT {peft.__version__} adapter on {base}"
    else:
        model = auto.from_pretrained(args.export, torch_dtype=torch.float32)
        what = "merged model folder"
    model.eval()
    inp = check["input"]
    with torch.no_grad():
        if kind == "image":
            px = torch.tensor(inp["pixel_values"], dtype=torch.float32).reshape(inp["shape"])
            got = model(pixel_values=px).logits
        else:
            ids = torch.tensor(inp["input_ids"], dtype=torch.long)
            got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    diff = (got.float() - expected).abs().max().item()
    scale = expected.abs().max().item()
    print(f"{what} (transformers {transformers.__version__}): logits {tuple(got.shape)}, "
          f"max |logit| {scale:.4f}, max |logit diff| vs peft-studio {diff:.3e}")
    sys.exit(0 if diff <= args.tol * max(1.0, scale) else 1)


if __name__ == "__main__":
    main()
