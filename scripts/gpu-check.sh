#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the device-parametrised tests, then the benchmarks on the GPU
# and on the CPU, and the PyTorch + PEFT peer on the same GPU, into bench-results/gpu.md.
#
#   scripts/gpu-check.sh                      # builds with scripts/build-cuda.sh first
#   PEFT_STUDIO_BIN=path/to/peft-studio scripts/gpu-check.sh   # a CUDA binary built elsewhere
#
# Environment:
#   PEFT_STUDIO_BIN   a binary built with `scripts/build-cuda.sh build` (else it is built here,
#                     which needs Rust; the tests run only where cargo is present)
#   PEER_PYTHON       a python with torch (CUDA), transformers and peft (default: python3)
#   SMOLLM2_F32_DIR   an f32 Hugging Face folder of SmolLM2-135M for the peer (what
#                     ../shared/peer/setup.sh writes); without it the SmolLM2 peer row is skipped
#   STEPS             timed steps per benchmark (default 10)
#   OUT               the report (default bench-results/gpu.md)
set -uo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-bench-results/gpu.md}"
steps="${STEPS:-10}"
peer_python="${PEER_PYTHON:-python3}"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$(dirname "$out")"

command -v nvidia-smi >/dev/null || {
    echo "gpu-check: nvidia-smi is missing: this script needs an NVIDIA GPU and its driver" >&2
    exit 1
}
gpu="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"

bin="${PEFT_STUDIO_BIN:-}"
tests="not run (no cargo on this machine: run \`scripts/build-cuda.sh test\` where there is one)"
if command -v cargo >/dev/null; then
    if [ -z "$bin" ]; then
        scripts/build-cuda.sh build || exit 1
        bin="${CARGO_TARGET_DIR:-target/cuda}/release/peft-studio"
    fi
    if scripts/build-cuda.sh test >"$work/tests.log" 2>&1; then
        tests="passed: $(grep -h '^test result' "$work/tests.log" | awk '{p+=$4; f+=$6; i+=$8} END {print p" passed, "f" failed, "i" ignored"}')"
    else
        tests="FAILED (see the log below)"
    fi
fi
[ -x "$bin" ] || {
    echo "gpu-check: no CUDA binary: set PEFT_STUDIO_BIN or install Rust" >&2
    exit 1
}
# The CUDA libraries the binary links: the build's wheels, else PyTorch's (cu13).
for lib in "${PEFT_CUDA_TOOLKIT:-$HOME/.cache/peft-studio/cuda-13.0}/cuda/lib" \
    "$($peer_python -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null)"; do
    [ -d "$lib" ] && export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done

# Runs a command with nvidia-smi sampling the GPU's memory every 100 ms; sets `peak_mib` (the
# largest reading minus the idle one) and returns the command's status.
peak_mib=0
with_peak_gpu() {
    local idle
    idle="$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$work/mem" &
    local sampler=$!
    "$@"
    local rc=$?
    kill "$sampler" 2>/dev/null
    wait "$sampler" 2>/dev/null
    peak_mib=$(($(sort -n "$work/mem" | tail -1) - idle))
    return $rc
}

# One of our benchmarks on one device; sets `secs` (median s/step from the JSON it writes, or
# "failed") and `peak_mib`.
secs=""
ours() {
    local suite=$1 variant=$2 device=$3
    local table="$work/$suite-$variant-${device//:/}.md"
    secs="failed"
    with_peak_gpu "$bin" bench "$suite" --only "$variant" --device "$device" --no-peer \
        --rounds 1 --steps "$steps" --out "$table" >>"$work/bench.log" 2>&1 || return 0
    secs="$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["results"][0]["ours"]; print("%.3f" % r["secs_per_step"])' \
        "${table%.md}.json" 2>/dev/null || echo "?")"
}

# The peer on the GPU: prints "s/step|peak MiB".
peer() {
    local model=$1 dir=$2
    [ -n "$dir" ] && [ -d "$dir" ] || {
        echo "skipped (no model folder)|"
        return
    }
    "$peer_python" scripts/peer_gpu_step.py --model "$model" --model-dir "$dir" --steps "$steps" \
        2>>"$work/bench.log" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print("%.3f|%.0f" % (r["s_per_step"], r["peak_gpu_mib"]))' ||
        echo "failed|"
}

{
    echo "## GPU check"
    echo
    echo "Measured $(date -u +%Y-%m-%dT%H:%M:%SZ) on GPU $gpu (name, memory, driver) with CPU $cpu; $steps timed steps each."
    echo
    echo "Device-parametrised tests (\`cargo test --features cuda\`): $tests."
    echo
    echo "| workload | peft-studio GPU s/step | GPU peak MiB | peft-studio CPU s/step | peer GPU s/step | peer peak MiB |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: |"
} >"$out"

row() {
    local name=$1 suite=$2 variant=$3 peer_model=$4 peer_dir=$5
    ours "$suite" "$variant" cuda:0
    local g=$secs gm=$peak_mib
    ours "$suite" "$variant" cpu
    local c=$secs p
    p="$(peer "$peer_model" "$peer_dir")"
    echo "| $name | $g | $gm | $c | ${p%%|*} | ${p#*|} |" >>"$out"
}

row "MiniLM LoRA r8, b16 × 64" minilm lora minilm downloads/all-MiniLM-L6-v2
row "MiniLM LoRA r8, frozen base bf16" minilm lora-bf16 minilm downloads/all-MiniLM-L6-v2
row "SmolLM2-135M LoRA r8 q,v, b4 × 256" smollm2 lora smollm2 "${SMOLLM2_F32_DIR:-}"

# The DiffLoRA bench on one device; sets `gallery` (its gallery line, or "failed").
gallery=""
personalise_bench() {
    local device=$1 table="$work/personalize-${1//:/}.md"
    gallery="failed"
    with_peak_gpu "$bin" bench-personalize --device "$device" --out "$table" \
        >>"$work/bench.log" 2>&1 || return 0
    gallery="$(grep -i "gallery" "$table" | head -1)"
}
personalise_bench cuda:0
gpu_gallery=$gallery gpu_gallery_mib=$peak_mib
personalise_bench cpu
{
    echo
    echo "DiffLoRA (\`bench-personalize\`), GPU (peak $gpu_gallery_mib MiB): $gpu_gallery"
    echo
    echo "DiffLoRA, CPU: $gallery"
    echo
    echo "<details><summary>log</summary>"
    echo
    echo '```'
    tail -n 60 "$work/bench.log" 2>/dev/null
    [ -f "$work/tests.log" ] && grep -E "^test .*FAILED|^failures:|panicked" "$work/tests.log" | head -40
    echo '```'
    echo "</details>"
} >>"$out"
cat "$out"
