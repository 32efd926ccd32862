#!/usr/bin/env python3
"""A peft-studio run as a transformers + PEFT + accelerate job.

Written by `peft-studio export-job`; everything it needs is in this folder: `job.json` (the
run's settings, exactly as peft-studio resolved them), `data/train.jsonl` and
`data/eval.jsonl` (the run's split), `peft_studio_adapters.py` (SVFit and LoLDU in PyTorch).

    accelerate launch --config_file accelerate/single_gpu.yaml train.py
    accelerate launch --config_file accelerate/cpu_2proc.yaml train.py --cpu --steps 40

`batch_size` in job.json is the global batch of one optimiser step (as in peft-studio): each
of the N processes takes batch_size / N examples. Outputs (in --out, default `output/`):
`metrics.jsonl` (peft-studio's metrics lines), `adapter/` (a PEFT adapter folder; SVFit and
LoLDU in peft-studio's format), `job_summary.json`. Bring them back with
`peft-studio import-run <this folder>`.
"""

import argparse
import json
import math
import os
import resource
import sys
import time
from datetime import datetime, timezone

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import peft_studio_adapters as psa  # noqa: E402

EDGE = ".,!?;:\"'`*()"


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default=os.path.join(HERE, "job.json"))
    ap.add_argument("--out", default=os.path.join(HERE, "output"))
    ap.add_argument("--model", help="model folder or hub id (default: job.json's model.path)")
    ap.add_argument("--steps", type=int, help="optimiser steps (default: job.json's)")
    ap.add_argument("--eval-every", type=int, help="evaluate every N steps (default: job's)")
    ap.add_argument("--max-eval", type=int, help="use at most N held-out examples")
    ap.add_argument("--threads", type=int, help="torch threads per process")
    ap.add_argument("--cpu", action="store_true",
                    help="train on the CPU even where a GPU is present (gloo between processes); "
                         "also the default where torch sees no GPU")
    return ap.parse_args()


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def schedule_factor(kind, step, total, warmup):
    """peft-studio's learning-rate multiplier at optimiser step `step` (1-based)."""
    if warmup > 0 and step <= warmup:
        return step / warmup
    span = max(total - warmup, 1)
    done = max(step - warmup, 0)
    left = min(max((span - done + 1) / span, 0.0), 1.0)
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (1 - left)))
    return left


def normalize(s):
    return " ".join(s.split()).lower().strip(EDGE + " \t\n\r")


# --------------------------------------------------------------------------------------------
# Data


def classification_batches(tok, rows, max_length):
    def collate(items):
        enc = tok([r["text"] for r in items], truncation=True, max_length=max_length,
                  padding=True, return_tensors="pt")
        enc["labels"] = torch.tensor([r["label"] for r in items], dtype=torch.long)
        return dict(enc)
    return rows, collate


def ids_of(out):
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def encode_chat(tok, messages, max_length):
    """Token ids and labels (-100 outside the assistant's turns) of one conversation, rendered
    with the model's chat template; each assistant turn is found by rendering the prefix."""
    full = ids_of(tok.apply_chat_template(messages, tokenize=True))
    labels = [-100] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(ids_of(tok.apply_chat_template(messages[:i], tokenize=True,
                                                   add_generation_prompt=True)))
        end = len(ids_of(tok.apply_chat_template(messages[:i + 1], tokenize=True)))
        # The template's newline after the end-of-turn token is not trained (as peft-studio).
        if end > start and tok.decode(full[end - 1:end]) == "\n":
            end -= 1
        for t in range(start, min(end, len(full))):
            labels[t] = full[t]
    return full[:max_length], labels[:max_length]


def encode_lm(tok, row, max_length):
    if "messages" in row:
        return encode_chat(tok, row["messages"], max_length)
    ids = tok(row["text"], add_special_tokens=True)["input_ids"]
    if tok.eos_token_id is not None:
        ids = ids + [tok.eos_token_id]
    return ids[:max_length], list(ids[:max_length])


def lm_batches(tok, rows, max_length):
    encoded = [encode_lm(tok, r, max_length) for r in rows]
    encoded = [e for e in encoded if any(l != -100 for l in e[1][1:])]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def collate(items):
        n = max(len(ids) for ids, _ in items)
        ids = torch.tensor([x + [pad] * (n - len(x)) for x, _ in items])
        labels = torch.tensor([y + [-100] * (n - len(y)) for _, y in items])
        att = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x, _ in items])
        return {"input_ids": ids, "attention_mask": att, "labels": labels}
    return encoded, collate


# --------------------------------------------------------------------------------------------
# Model and adapter


def build_model(job, model_path, num_labels):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    kw = {"dtype": torch.float32}
    if job["model"].get("gguf_file"):
        kw["gguf_file"] = job["model"]["gguf_file"]
    if job["task"] == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=num_labels, ignore_mismatched_sizes=True, **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kw)
    # peft-studio's models have no dropout of their own (only the adapter's, `dropout` of
    # the adapter config): switch the checkpoint's off so the job trains the same function.
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def head_modules(model, job):
    if job["task"] != "classification":
        return []
    names = [n for n, _ in model.named_children()]
    return [n for n in ("classifier", "score") if n in names]


def param_groups(model, job, head):
    """(params, weight decay, lr) groups as peft-studio builds them."""
    o, mode = job["optim"], job["mode"]
    lr, head_lr = o["lr"], o.get("head_lr") or o["lr"]
    wd = o["weight_decay"]
    def is_head(name):
        parts = name.split(".")
        return any(h in parts for h in head)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if mode == "full":
        decay = [p for n, p in trainable
                 if not (n.endswith(".bias") or "norm" in n.lower() or p.ndim == 1)]
        no_decay = [p for n, p in trainable
                    if n.endswith(".bias") or "norm" in n.lower() or p.ndim == 1]
        return [(decay, wd, lr), (no_decay, 0.0, lr)]
    heads = [p for n, p in trainable if is_head(n)]
    rest = [p for n, p in trainable if not is_head(n)]
    method = job["adapter"]["method"]
    adapter_wd = wd if method == "lora" else o["diagonal_weight_decay"]
    groups = []
    if rest:
        groups.append((rest, adapter_wd, lr))
    if heads:
        groups.append((heads, wd, head_lr))
    return groups


def attach(model, job, head):
    """Makes the configured parts trainable; returns (model, adapter-only trainable count)."""
    mode, cfg = job["mode"], job["adapter"]
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, 0
    if mode == "head":
        for n, p in model.named_parameters():
            p.requires_grad_(any(n == h or n.startswith(h + ".") for h in head))
        return model, 0
    if cfg["method"] == "lora":
        from peft import LoraConfig, get_peft_model
        init = cfg.get("init") or "kaiming"
        lcfg = LoraConfig(
            r=cfg["rank"], lora_alpha=cfg.get("alpha") or cfg["rank"],
            target_modules=cfg["targets"], lora_dropout=cfg.get("dropout", 0.0),
            use_rslora=bool(cfg.get("use_rslora")),
            init_lora_weights={"kaiming": True, "gaussian": "gaussian", "pissa": "pissa"}[init],
            modules_to_save=list(head) or None,
            task_type="SEQ_CLS" if job["task"] == "classification" else "CAUSAL_LM")
        model = get_peft_model(model, lcfg)
        n = sum(p.numel() for name, p in model.named_parameters()
                if p.requires_grad and "lora_" in name)
        return model, n
    psa.attach(model, cfg, seed=job["optim"]["seed"])
    for h in head:
        for p in model.get_submodule(h).parameters():
            p.requires_grad_(True)
    n = sum(p.numel() for _, m in psa.adapted(model) for p in m.parameters() if p.requires_grad)
    return model, n


def save_trained(model, job, head, out, accelerator):
    mode, cfg = job["mode"], job["adapter"]
    model = accelerator.unwrap_model(model)
    if mode == "full":
        model.save_pretrained(os.path.join(out, "model"), safe_serialization=True)
        return "model"
    if mode == "head":
        from safetensors.torch import save_file
        os.makedirs(os.path.join(out, "head"), exist_ok=True)
        t = {f"{h}.{n}": p.detach().float().cpu().contiguous()
             for h in head for n, p in model.get_submodule(h).named_parameters()}
        save_file(t, os.path.join(out, "head", "head.safetensors"))
        return "head"
    adapter = os.path.join(out, "adapter")
    if cfg["method"] == "lora":
        model.save_pretrained(adapter, safe_serialization=True)
        path = os.path.join(adapter, "adapter_config.json")
        with open(path, encoding="utf-8") as f:
            c = json.load(f)
        c["peft_studio"] = cfg
        if head:
            c["modules_to_save"] = list(head)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(c, f, indent=2)
    else:
        task = "SEQ_CLS" if job["task"] == "classification" else "CAUSAL_LM"
        psa.save(model, adapter, cfg, head=head, task_type=task, base=job["model"]["path"])
    return "adapter"


# --------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, loader, job, accelerator, questions, tok):
    """Held-out loss and accuracy over the exact held-out split: per-example sums gathered with
    `gather_for_metrics`, which drops the examples the sharded loader repeats."""
    model.eval()
    loss_sum, count, correct = [], [], []
    for batch in loader:
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        logits = out.logits.float()
        labels = batch["labels"]
        if job["task"] == "classification":
            ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
            ok = (logits.argmax(-1) == labels).double()
            n = torch.ones_like(ok)
        else:
            lg, lb = logits[:, :-1], labels[:, 1:]
            keep = lb != -100
            tok_ce = torch.nn.functional.cross_entropy(
                lg.transpose(1, 2), lb.clamp_min(0), reduction="none") * keep
            ce = tok_ce.sum(1)
            ok = ((lg.argmax(-1) == lb) & keep).sum(1).double()
            n = keep.sum(1).double()
        ce, ok, n = accelerator.gather_for_metrics((ce.double(), ok, n))
        loss_sum.append(ce.sum())
        correct.append(ok.sum())
        count.append(n.sum())
    total = torch.stack(count).sum().clamp_min(1)
    loss = (torch.stack(loss_sum).sum() / total).item()
    acc = (torch.stack(correct).sum() / total).item()
    point = {"kind": "eval", "loss": loss, "accuracy": acc}
    if job["task"] == "causal_lm":
        point["perplexity"] = math.exp(min(loss, 700))
        if questions:
            point["accuracy"] = exact_match(model, tok, questions, job, accelerator)
    model.train()
    return point


@torch.no_grad()
def exact_match(model, tok, questions, job, accelerator):
    """Greedy answers to the held-out questions, split over the processes; the share that
    matches the reference (peft-studio's normalisation)."""
    gen_model = accelerator.unwrap_model(model)
    mine = questions[accelerator.process_index::accelerator.num_processes]
    hits = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    side = tok.padding_side
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for i in range(0, len(mine), 16):
        chunk = mine[i:i + 16]
        prompts = [tok.apply_chat_template(q["messages"], tokenize=False,
                                           add_generation_prompt=True) for q in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(accelerator.device) for k, v in enc.items()}
        out = gen_model.generate(**enc, max_new_tokens=job["generation"]["max_new_tokens"],
                                 do_sample=False, pad_token_id=pad)
        for q, seq in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            pred = tok.decode(seq, skip_special_tokens=True)
            hits += float(normalize(pred) == normalize(q["reference"]))
    tok.padding_side = side
    return (accelerator.reduce(hits, "sum") / len(questions)).item()


# --------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    with open(args.job, encoding="utf-8") as f:
        job = json.load(f)
    o = job["optim"]
    steps = args.steps or o["steps"]
    eval_every = args.eval_every or o["eval_every"]
    # Without a GPU, several processes started by `accelerate launch --multi_gpu` (torchrun)
    # join one gloo group on the CPU; `accelerate launch --cpu` alone starts one process.
    cpu = args.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(gradient_accumulation_steps=o["grad_accum"], cpu=cpu)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(o["seed"])
    started, started_at = time.time(), datetime.now(timezone.utc).isoformat()
    nproc = accelerator.num_processes
    per_process = max(1, o["batch_size"] // nproc)
    if per_process * nproc != o["batch_size"] and accelerator.is_main_process:
        print(f"note: batch_size {o['batch_size']} is not a multiple of {nproc} processes; "
              f"each takes {per_process}", flush=True)

    from transformers import AutoTokenizer
    model_path = args.model or job["model"]["path"]
    tok_kw = {"gguf_file": job["model"]["gguf_file"]} if job["model"].get("gguf_file") else {}
    tok = AutoTokenizer.from_pretrained(model_path, **tok_kw)
    data_dir = os.path.join(os.path.dirname(os.path.abspath(args.job)), "data")
    train_rows = read_jsonl(os.path.join(data_dir, "train.jsonl"))
    eval_rows = read_jsonl(os.path.join(data_dir, "eval.jsonl"))
    if args.max_eval:
        eval_rows = eval_rows[:args.max_eval]
    max_length = job["model"]["max_length"]
    questions = []
    if job["task"] == "classification":
        train_set, collate = classification_batches(tok, train_rows, max_length)
        eval_set, _ = classification_batches(tok, eval_rows, max_length)
    else:
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        train_set, collate = lm_batches(tok, train_rows, max_length)
        eval_set, _ = lm_batches(tok, eval_rows, max_length)
        if tok.chat_template:
            for r in eval_rows[:job["generation"]["questions"]]:
                msgs = r.get("messages")
                if msgs and msgs[-1]["role"] == "assistant":
                    questions.append({"messages": msgs[:-1], "reference": msgs[-1]["content"]})

    model = build_model(job, model_path, len(job.get("classes") or []))
    base_total = sum(p.numel() for p in model.parameters())
    head = head_modules(model, job)
    model, adapter_trainable = attach(model, job, head)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    groups = param_groups(model, job, head)
    opt = torch.optim.AdamW([{"params": p, "weight_decay": wd, "lr": lr} for p, wd, lr in groups],
                            betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: schedule_factor(o["schedule"], i + 1, steps, o["warmup_steps"]))
    gen = torch.Generator().manual_seed(o["seed"])
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=per_process, shuffle=True, generator=gen, collate_fn=collate,
        drop_last=True)
    eval_loader = torch.utils.data.DataLoader(
        eval_set, batch_size=max(1, o["eval_batch_size"] // nproc), collate_fn=collate)
    # The scheduler is stepped by hand once per optimiser step (accelerate's wrapper would
    # step it once per process).
    model, opt, train_loader, eval_loader = accelerator.prepare(
        model, opt, train_loader, eval_loader)

    out = args.out
    if accelerator.is_main_process:
        os.makedirs(out, exist_ok=True)
        metrics = open(os.path.join(out, "metrics.jsonl"), "w", encoding="utf-8")
        print(f"{job['name']}: {trainable:,} trainable of {base_total + adapter_trainable:,}; "
              f"{steps} steps, global batch {per_process * nproc} on {nproc} process(es)",
              flush=True)

    def log(line):
        if accelerator.is_main_process:
            metrics.write(json.dumps(line) + "\n")
            metrics.flush()

    def run_eval(step):
        point = evaluate(model, eval_loader, job, accelerator, questions, tok)
        point = {"kind": "eval", "step": step, **{k: v for k, v in point.items() if k != "kind"}}
        log(point)
        if accelerator.is_main_process:
            print(f"  eval @ {step}: loss {point['loss']:.4f}, accuracy {point['accuracy']:.4f}",
                  flush=True)
        return point

    evals = []
    if job["task"] == "causal_lm":
        evals.append(run_eval(0))
    model.train()
    train_secs, losses, step, epoch = 0.0, [], 0, 0
    it = iter(train_loader)
    while step < steps:
        t0 = time.time()
        loss_sum = torch.zeros((), device=accelerator.device)
        for _ in range(o["grad_accum"]):
            try:
                batch = next(it)
            except StopIteration:
                epoch += 1
                if hasattr(train_loader, "set_epoch"):
                    train_loader.set_epoch(epoch)
                it = iter(train_loader)
                batch = next(it)
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                loss_sum += loss.detach()
                if accelerator.sync_gradients and o.get("max_grad_norm"):
                    accelerator.clip_grad_norm_(model.parameters(), o["max_grad_norm"])
                opt.step()
                if accelerator.sync_gradients:
                    sched.step()
                opt.zero_grad()
        step += 1
        loss = accelerator.reduce(loss_sum / o["grad_accum"], "mean").item()
        if not math.isfinite(loss):
            raise SystemExit(f"the loss became {loss} at step {step}: training diverged")
        secs = time.time() - t0
        train_secs += secs
        losses.append(loss)
        lr = o["lr"] * schedule_factor(o["schedule"], step, steps, o["warmup_steps"])
        log({"kind": "step", "step": step, "loss": loss, "lr": lr, "secs": secs})
        if accelerator.is_main_process and (step % 10 == 0 or step == 1):
            print(f"  step {step}/{steps}: loss {loss:.4f} ({train_secs / step:.2f} s/step)",
                  flush=True)
        if step % eval_every == 0 or step == steps:
            evals.append(run_eval(step))

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        saved = save_trained(model, job, head, out, accelerator)
        metrics.close()
        import accelerate
        import peft
        import transformers
        summary = {
            "name": job["name"], "method": job["method"], "rank": job.get("rank"),
            "trainable": trainable, "total": base_total + adapter_trainable,
            "steps_done": step, "total_steps": steps,
            "final_train_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
            "wall_secs": time.time() - started, "secs_per_step": train_secs / max(1, step),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "num_processes": nproc, "distributed_type": str(accelerator.distributed_type),
            "saved": saved, "model": model_path, "started_at": started_at,
            "status": "finished",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__, "accelerate": accelerate.__version__},
        }
        with open(os.path.join(out, "job_summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        print(f"done in {summary['wall_secs']:.1f} s; wrote {out}", flush=True)
    accelerator.end_training()


if __name__ == "__main__":
    main()
