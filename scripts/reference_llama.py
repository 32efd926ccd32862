#!/usr/bin/env python3
"""Independent reference for the LLaMA-family decoder and PEFT adapter loading: PyTorch's
transformers (LlamaForCausalLM, Qwen2ForCausalLM) and PEFT compute the logits of tiny random
models, with and without a LoRA adapter whose B is non-zero, for fixed token ids.

Writes tests/reference/llama_tiny/<case>/:
  config.json, model.safetensors   the base model, as transformers' save_pretrained writes it
  adapter/                          the PEFT LoRA adapter, as PEFT's save_pretrained writes it
  logits.json                       {"input_ids", "base", "adapted"} (logits as nested lists)

Run with the peer venv (torch, transformers, peft):
  /root/.cache/peft-peer/bin/python scripts/reference_llama.py
tests/llama_reference.rs loads the folders with peft-studio and compares (1e-4).
The script is deterministic (fixed seeds).
"""
import json
import os
import shutil

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference", "llama_tiny")

BASE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=128, rms_norm_eps=1e-5,
            hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=0)

CASES = {
    # grouped-query attention, untied lm_head, LoRA on q,v (PEFT's default)
    "llama_gqa_untied": dict(kind="llama", cfg=dict(tie_word_embeddings=False, rope_theta=10000.0),
                             targets=["q_proj", "v_proj"]),
    # tied embeddings, LLaMA 3 rope scaling, LoRA on every attention projection and down_proj
    "llama3_rope_tied": dict(kind="llama", cfg=dict(
        tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16)),
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
    # Qwen2: biases on q, k, v; untied; LoRA on q,k,v
    "qwen2_biases": dict(kind="qwen2", cfg=dict(tie_word_embeddings=False, rope_theta=1000000.0,
                                                use_sliding_window=False),
                         targets=["q_proj", "k_proj", "v_proj"]),
}

IDS = [[3, 17, 42, 0, 8, 49, 21, 63, 5], [1, 1, 30, 12, 5, 44, 9, 2, 60]]


def randomise(model, seed):
    """Weights large enough that every part changes the logits: matrices N(0, 1/fan_in),
    biases N(0, 0.1²), norms 1 + N(0, 0.1²), embeddings N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def main():
    import peft
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shutil.rmtree(ROOT, ignore_errors=True)
    for i, (case, spec) in enumerate(CASES.items()):
        out = os.path.join(ROOT, case)
        os.makedirs(out)
        if spec["kind"] == "llama":
            config, cls = LlamaConfig(**BASE, **spec["cfg"]), LlamaForCausalLM
        else:
            config, cls = Qwen2Config(**BASE, **spec["cfg"]), Qwen2ForCausalLM
        config._attn_implementation = "eager"
        model = cls(config).eval()
        randomise(model, 100 + i)
        if config.tie_word_embeddings:
            model.tie_weights()
        model.save_pretrained(out)
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=spec["targets"], task_type="CAUSAL_LM")
        pm = peft.get_peft_model(model, lora).eval()
        g = torch.Generator().manual_seed(200 + i)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(os.path.join(out, "adapter"))
        for extra in ["README.md"]:
            path = os.path.join(out, "adapter", extra)
            if os.path.exists(path):
                os.remove(path)
        ids = torch.tensor(IDS)
        with torch.no_grad():
            adapted = pm(input_ids=ids).logits
            with pm.disable_adapter():
                base = pm(input_ids=ids).logits
        assert (adapted - base).abs().max() > 1e-2, "the adapter must change the logits"
        json.dump({
            "generated_by": f"scripts/reference_llama.py (torch {torch.__version__}, transformers "
                            f"{transformers.__version__}, peft {peft.__version__})",
            "input_ids": IDS,
            "base": [[[round(x, 6) for x in row] for row in b] for b in base.tolist()],
            "adapted": [[[round(x, 6) for x in row] for row in b] for b in adapted.tolist()],
        }, open(os.path.join(out, "logits.json"), "w"))
        print(case, "max |logit|", base.abs().max().item(), "adapter changes by",
              (adapted - base).abs().max().item())
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ROOT) for f in fs)
    print(f"wrote {ROOT}: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
