#!/usr/bin/env python3
"""Reference chat renderings and assistant-token masks for tests/instruct_data.rs.

Renders a few conversations with SmolLM2-135M-Instruct's own chat template through
transformers' `apply_chat_template` (text and token ids), and computes the assistant-only loss
mask the way TRL does (`return_assistant_tokens_mask=True` on a copy of the template with
`{% generation %}` around each assistant answer and its `<|im_end|>`). Checks that the tagged
template tokenises to the same ids as the model's own. Also stores SmolLM2's template source and
renderings of a few templates in other models' styles (STYLE_TEMPLATES) by transformers' jinja2
environment, so the template engine is checked in CI without the model folder.

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

# Templates in the styles of popular models, using what HF templates use (whitespace control,
# trim/lstrip blocks, set/namespace, slicing, loop variables, raise_exception, tojson, Python
# string methods), rendered by transformers' jinja2 environment for the engine check.
STYLE_TEMPLATES = {
    "llama3_style": (
        "{{- bos_token }}\n"
        "{%- if messages[0]['role'] == 'system' %}\n"
        "    {%- set system_message = messages[0]['content']|trim %}\n"
        "    {%- set messages = messages[1:] %}\n"
        "{%- else %}\n"
        "    {%- set system_message = \"\" %}\n"
        "{%- endif %}\n"
        "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
        "{%- if tools is not none %}\n"
        "    {{- \"Environment: ipython\\n\" }}\n"
        "{%- endif %}\n"
        "{{- system_message }}\n"
        "{{- \"<|eot_id|>\" }}\n"
        "{%- for message in messages %}\n"
        "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n"
        "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
        "{%- endif %}\n"
    ),
    "mistral_style": (
        "{%- if messages[0]['role'] == 'system' %}\n"
        "    {%- set system_message = messages[0]['content'] %}\n"
        "    {%- set loop_messages = messages[1:] %}\n"
        "{%- else %}\n"
        "    {%- set loop_messages = messages %}\n"
        "{%- endif %}\n"
        "\n"
        "{{- bos_token }}\n"
        "{%- for message in loop_messages %}\n"
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
        "        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n"
        "    {%- endif %}\n"
        "    {%- if message['role'] == 'user' %}\n"
        "        {%- if loop.first and system_message is defined %}\n"
        "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
        "        {%- else %}\n"
        "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
        "        {%- endif %}\n"
        "    {%- elif message['role'] == 'assistant' %}\n"
        "        {{- ' ' + message['content'] + eos_token}}\n"
        "    {%- else %}\n"
        "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"
    ),
    "features": (
        "{% set ns = namespace(turns=0, last='') %}\n"
        "{% for m in messages %}\n"
        "  {% if m.role == 'system' %}{% continue %}{% endif %}\n"
        "  {% set ns.turns = ns.turns + 1 %}\n"
        "  {% set ns.last = m.role %}\n"
        "{{ loop.index }}/{{ loop.length }} {{ m.role|upper }}: {{ m.content.strip() }}\n"
        "  {% if m.content.startswith('STOP') %}{% break %}{% endif %}\n"
        "{% endfor %}\n"
        "{{ ns.turns }} turns, last {{ ns.last }}; {{ messages[0] | tojson }}; "
        "{{ {'k': [1, 2.5, none, true, 'é<>'], 'n': {'x': 'y'}} | tojson }}\n"
        "{{ messages | map(attribute='role') | join(',') }}|{{ messages[-1]['content'].split(' ')[0] }}"
        "|{{ 'a,b'.split(',') | length }}|{{ '  x  '.lstrip() }}|{{ 'Hi'.replace('H', 'J') }}"
        "{% if add_generation_prompt %}\n>>>{% endif %}\n"
    ),
}

STYLE_CASES = [
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hello there"},
     {"role": "assistant", "content": "Hi!"}],
    [{"role": "user", "content": "  Café?  "}, {"role": "assistant", "content": "Oui."},
     {"role": "user", "content": "STOP now"}, {"role": "assistant", "content": "ok"}],
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
    styles = []
    for name, template in STYLE_TEMPLATES.items():
        for i, messages in enumerate(STYLE_CASES):
            for gen in (False, True):
                text = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                               add_generation_prompt=gen)
                styles.append({"template": name, "case": i, "add_generation_prompt": gen,
                               "text": text})
    with open(f"{MODEL}/chat_template.jinja", encoding="utf-8") as f:
        smollm2_template = f.read()
    doc = {
        "made_by": "scripts/reference_chat.py",
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "smollm2_chat_template": smollm2_template,
        "style_templates": STYLE_TEMPLATES,
        "style_cases": STYLE_CASES,
        "style_renderings": styles,
        "transformers": transformers.__version__,
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (tokenizer + chat_template.jinja)",
        "cases": cases,
    }
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} cases and {len(styles)} style renderings to {OUT}")


if __name__ == "__main__":
    main()
