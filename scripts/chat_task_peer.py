#!/usr/bin/env python3
"""The built-in instruction task (downloads/spam-chat-*.jsonl) scored in PyTorch, as a peer.

Scores a Hugging Face causal LM by greedy generation on the held-out file with the same exact
match as peft-studio (`data::exact_match`: whitespace collapsed, lower-cased, quotes and
punctuation stripped from both ends), optionally after a short LoRA fine-tune (PEFT, r 8 on
q_proj/v_proj, AdamW, the loss on the assistant's tokens only). Shows the base model is weak on
the task and that a few fine-tuning steps help.

Usage (peer venv): /root/.cache/peft-peer/bin/python scripts/chat_task_peer.py \
    [--model DIR] [--eval N] [--steps N] [--batch B] [--lr LR] [--threads T]
"""

import argparse
import json
import random
import re
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

EDGE = ".,!?;:\"'`*()"


def normalize(s):
    s = " ".join(s.split()).lower()
    return s.strip(EDGE + " \t\n")


def load(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(l)["messages"] for l in f if l.strip()]


def ids_of(out):
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


@torch.no_grad()
def score(model, tok, rows, batch=16):
    tok.padding_side = "left"
    hits, answers = 0, {}
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        prompts = [tok.apply_chat_template(m[:-1], tokenize=False, add_generation_prompt=True)
                   for m in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=4, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        for m, seq in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            pred = tok.decode(seq, skip_special_tokens=True)
            key = normalize(pred)
            answers[key] = answers.get(key, 0) + 1
            hits += key == normalize(m[-1]["content"])
    return hits / len(rows), answers


def encode_train(tok, messages, max_len=256):
    """ids and labels with -100 outside the assistant's answer + <|im_end|>."""
    prompt = ids_of(tok.apply_chat_template(messages[:-1], tokenize=True,
                                            add_generation_prompt=True))
    full = ids_of(tok.apply_chat_template(messages, tokenize=True))
    full = full[:-1] if tok.decode(full[-1:]) == "\n" else full  # drop the newline after eos
    assert full[:len(prompt)] == prompt
    labels = [-100] * len(prompt) + full[len(prompt):]
    return full[:max_len], labels[:max_len]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/root/.cache/peft-peer/smollm2-135m-instruct-f32")
    ap.add_argument("--train", default="downloads/spam-chat-train.jsonl")
    ap.add_argument("--eval-file", default="downloads/spam-chat-eval.jsonl")
    ap.add_argument("--eval", type=int, default=400)
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    rows = load(args.eval_file)[: args.eval]
    t = time.time()
    acc, answers = score(model, tok, rows)
    top = sorted(answers.items(), key=lambda kv: -kv[1])[:5]
    print(f"base: exact match {acc:.3f} on {len(rows)} held-out ({time.time() - t:.0f} s); "
          f"commonest answers {top}")
    if args.steps == 0:
        return
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    train = load(args.train)
    random.Random(0).shuffle(train)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    t = time.time()
    for step in range(args.steps):
        batch = [encode_train(tok, m) for m in train[step * args.batch:(step + 1) * args.batch]]
        n = max(len(ids) for ids, _ in batch)
        pad = tok.pad_token_id
        ids = torch.tensor([x + [pad] * (n - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (n - len(y)) for _, y in batch])
        att = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x, _ in batch])
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"  step {step + 1}/{args.steps}: loss {loss.item():.4f} "
                  f"({(time.time() - t) / (step + 1):.2f} s/step)")
    model.eval()
    t = time.time()
    acc, answers = score(model, tok, rows)
    top = sorted(answers.items(), key=lambda kv: -kv[1])[:5]
    print(f"LoRA r8 q,v after {args.steps} steps x {args.batch}: exact match {acc:.3f} "
          f"({time.time() - t:.0f} s); commonest answers {top}")


if __name__ == "__main__":
    main()
