#!/usr/bin/env python3
"""The PyTorch + PEFT peer on a GPU, for scripts/gpu-check.sh: the same workloads as
`peft-studio bench minilm|smollm2` (MiniLM sequence classification, batch 16 x 64; SmolLM2-135M
causal LM, batch 4 x 256; LoRA r8 on the query/value projections; AdamW), on `cuda`.

    python3 scripts/peer_gpu_step.py --model minilm  --model-dir downloads/all-MiniLM-L6-v2
    python3 scripts/peer_gpu_step.py --model smollm2 --model-dir ~/.cache/peft-peer/smollm2-135m-instruct-f32

Prints one JSON line: median s/step after the first, peak GPU memory (torch's allocator).
Needs torch with CUDA, transformers and peft; no network (the hub is switched off).
"""
import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["minilm", "smollm2"], required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                    help="the frozen base's dtype (bf16: mixed precision, adapters stay f32)")
    a = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    if not torch.cuda.is_available():
        sys.exit("peer_gpu_step: torch sees no CUDA device")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    base_dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    if a.model == "minilm":
        from transformers import AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained(
            a.model_dir, num_labels=2, torch_dtype=base_dtype)
        batch, seq, targets, task = 16, 64, ["query", "value"], "SEQ_CLS"
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(a.model_dir, torch_dtype=base_dtype)
        batch, seq, targets, task = 4, 256, ["q_proj", "v_proj"], "CAUSAL_LM"
    if a.mode == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                 task_type=task))
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), device=dev)
    labels = torch.randint(0, 2, (batch,), device=dev) if a.model == "minilm" else ids
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    print(json.dumps({
        "peer": f"torch {torch.__version__} + peft, {a.model} {a.mode} {a.dtype}",
        "device": torch.cuda.get_device_name(0),
        "s_per_step": statistics.median(times[1:]),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20,
        "trainable": sum(p.numel() for p in params),
    }))


if __name__ == "__main__":
    main()
