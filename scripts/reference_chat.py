#!/usr/bin/env python3
"""Reference chat renderings and assistant-token masks for tests/instruct_data.rs.

Renders a few conversations with SmolLM2-135M-Instruct's own chat template through
transformers' `apply_chat_template` (text and token ids), and computes the assistant-only loss
mask the way TRL does (`return_assistant_tokens_mask=True` on a copy of the template with
`{% generation %}` around each assistant answer and its `<|im_end|>`). Checks that the tagged
template tokenises to the same ids as the model's own.

Usage (with the peer venv): /root/.cache/peft-peer/bin/python scripts/reference_chat.py \
    [MODEL_DIR] [OUT_JSON]
defaults: /root/.cache/peft-peer/smollm2-135m-instruct-f32, tests/reference/chat_smollm2.json
"""

import json
import sys

import transformers
from transformers import AutoTokenizer

MODEL = sys.argv[1] if len(sys.argv) > 1 else "/root/.cache/peft-peer/smollm2-135m-instruct-f32"
OUT = sys.argv[2] if len(sys.argv) > 2 else "tests/reference/chat_smollm2.json"

# SmolLM2's template with TRL-style generation tags: answer + <|im_end|> trained, "\n" not.
TAGGED = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CASES = [
    ("single_turn", [
        {"role": "user", "content": "Is this e-mail spam or ham? Answer with one word.\n\nWin a FREE cruise now!!!"},
        {"role": "assistant", "content": "spam"},
    ]),
    ("with_system", [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "Blue."},
    ]),
    ("multi_turn", [
        {"role": "user", "content": "Hi! How do you say 'hello' in French?"},
        {"role": "assistant", "content": "Bonjour."},
        {"role": "user", "content": "And 'thank you'?"},
        {"role": "assistant", "content": "Merci — or « merci beaucoup » for \"thank you very much\"."},
    ]),
    ("alpaca_like", [
        {"role": "user", "content": "Give the ARPAbet pronunciation of the word.\nhello"},
        {"role": "assistant", "content": "HH AH0 L OW1"},
    ]),
]


def ids_of(out):
    if isinstance(out, dict) or hasattr(out, "keys"):
        return list(out["input_ids"])
    return list(out)


def main():
    tok = AutoTokenizer.from_pretrained(MODEL)
    cases = []
    for name, messages in CASES:
        text = tok.apply_chat_template(messages, tokenize=False)
        prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        ids = ids_of(tok.apply_chat_template(messages, tokenize=True))
        tagged = tok.apply_chat_template(
            messages, chat_template=TAGGED, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True)
        if list(tagged["input_ids"]) != ids:
            sys.exit(f"{name}: the tagged template tokenises differently")
        if tok.apply_chat_template(messages, chat_template=TAGGED, tokenize=False) != text:
            sys.exit(f"{name}: the tagged template renders differently")
        mask = [int(m) for m in tagged["assistant_masks"]]
        cases.append({"name": name, "messages": messages, "text": text,
                      "prompt_text": prompt, "ids": ids, "assistant_mask": mask})
    doc = {
        "made_by": "scripts/reference_chat.py",
        "transformers": transformers.__version__,
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (tokenizer + chat_template.jinja)",
        "cases": cases,
    }
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
