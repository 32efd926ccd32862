#!/usr/bin/env bash
# Does the window cost training time? Trains the window's default form (the built-in LoRA
# preset: tiny ViT on MNIST 5k, LoRA r8; STEPS steps) in the real window under a virtual X server, then the
# same config (the run folder's config.toml) from the CLI, alternating for ROUNDS rounds; then
# measures the CPU use of an idle window over IDLE_SECS seconds. Writes bench-results/window.md.
#
#   scripts/bench-window.sh            # ROUNDS=2 STEPS=300 IDLE_SECS=30
#
# Needs: xvfb (xvfb-run), xdotool, and a software renderer (Mesa). On Debian:
#   apt-get install -y xvfb xdotool
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROUNDS="${ROUNDS:-2}"
IDLE_SECS="${IDLE_SECS:-30}"
STEPS="${STEPS:-300}"
OUT="${OUT:-$ROOT/bench-results/window.md}"
BIN="$ROOT/target/release/peft-studio"
for tool in xvfb-run xdotool; do
    command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y xvfb xdotool" >&2; exit 1; }
done
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
CLK="$(getconf CLK_TCK)"

# CPU ticks (user + system) of a process.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# One window session under Xvfb: $1 = mode (train | idle), $2 = folder it runs in.
window_session() {
    local mode="$1" dir="$2"
    mkdir -p "$dir/xdg-data" "$dir/xdg-config" "$dir/xdg-runtime"
    chmod 700 "$dir/xdg-runtime"
    if [ -f "$WORK/app.ron" ]; then
        mkdir -p "$dir/xdg-data/peft-studio"
        cp "$WORK/app.ron" "$dir/xdg-data/peft-studio/app.ron"
    fi
    cat > "$dir/session.sh" <<EOF
set -eu
cd "$dir"
export XDG_DATA_HOME="$dir/xdg-data" XDG_CONFIG_HOME="$dir/xdg-config" XDG_RUNTIME_DIR="$dir/xdg-runtime"
"$BIN" > "$dir/window.log" 2>&1 & P=\$!
XVFB=\$(pgrep -n Xvfb || true)
for i in \$(seq 100); do
    W=\$(xdotool search --name '^peft-studio\$' 2>/dev/null | head -1 || true)
    [ -n "\$W" ] && break
    sleep 0.2
done
[ -n "\$W" ] || { echo "the window did not appear" >&2; kill \$P; exit 1; }
sleep 5
if [ "$mode" = seed ]; then
    # eframe saves the settings every 30 s, at a frame: wait, then move the pointer.
    sleep 28
    xdotool mousemove --window \$W 700 400; sleep 1; xdotool mousemove --window \$W 710 410; sleep 2
elif [ "$mode" = idle ]; then
    a=\$(awk '{print \$14 + \$15}' /proc/\$P/stat); x=\$(awk '{print \$14 + \$15}' /proc/\$XVFB/stat)
    sleep $IDLE_SECS
    b=\$(awk '{print \$14 + \$15}' /proc/\$P/stat); y=\$(awk '{print \$14 + \$15}' /proc/\$XVFB/stat)
    echo "\$((b - a)) \$((y - x))" > "$dir/idle-ticks"
else
    # Start training (its position in a 1280 x 820 window with the default layout).
    xdotool mousemove --window \$W $START_X $START_Y click 1
    for i in \$(seq 3000); do
        s=\$(ls "$dir"/runs/*/summary.json 2>/dev/null | head -1 || true)
        if [ -n "\$s" ] && ! grep -q '"status": "running"' "\$s"; then break; fi
        sleep 0.5
    done
fi
kill \$P
wait \$P 2>/dev/null || true
EOF
    xvfb-run -a -s "-screen 0 1280x820x24" sh "$dir/session.sh"
}

# Where the Start button is in the default layout (see tests/snapshots/train_tab_mid_run.png).
START_X="${START_X:-525}" START_Y="${START_Y:-45}"

# The window's default settings, saved once, with the form's step count set to STEPS.
window_session seed "$WORK/seed"
ron="$(find "$WORK/seed/xdg-data" -name app.ron | head -1)"
[ -n "$ron" ] || { echo "the window saved no settings" >&2; exit 1; }
sed 's/steps:Some(1000)/steps:Some('"$STEPS"')/' "$ron" > "$WORK/app.ron"
grep -q "steps:Some($STEPS)" "$WORK/app.ron" || { echo "could not set the step count" >&2; exit 1; }

field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

rows=""
for r in $(seq "$ROUNDS"); do
    wdir="$WORK/window-$r"
    window_session train "$wdir"
    run="$(ls -d "$wdir"/runs/*/ | head -1)"
    w_sps="$(field "$run/summary.json" secs_per_step)"
    w_steps="$(field "$run/summary.json" steps_done)"
    w_status="$(field "$run/summary.json" status)"
    cdir="$WORK/cli-$r"
    mkdir -p "$cdir"
    (cd "$cdir" && "$BIN" train --preset "$run/config.toml" --out "$cdir/runs" > "$cdir/log" 2>&1)
    crun="$(ls -d "$cdir"/runs/*/ | head -1)"
    c_sps="$(field "$crun/summary.json" secs_per_step)"
    c_steps="$(field "$crun/summary.json" steps_done)"
    ratio="$(python3 -c "print(f'{$c_sps / $w_sps:.2f}')")"
    rows+="| $r | $w_steps ($w_status) | $(printf %.4f "$w_sps") | $(python3 -c "print(f'{1/$w_sps:.1f}')") | $c_steps | $(printf %.4f "$c_sps") | $(python3 -c "print(f'{1/$c_sps:.1f}')") | **$ratio** |"$'\n'
    echo "round $r: window $w_sps s/step, CLI $c_sps s/step, ratio $ratio"
done

idle_rows=""
for r in $(seq "$ROUNDS"); do
    idir="$WORK/idle-$r"
    window_session idle "$idir"
    read -r app xvfb < "$idir/idle-ticks"
    app_pct="$(python3 -c "print(f'{100 * $app / $CLK / $IDLE_SECS:.2f}')")"
    x_pct="$(python3 -c "print(f'{100 * $xvfb / $CLK / $IDLE_SECS:.2f}')")"
    idle_rows+="| $r | $IDLE_SECS | $app_pct% | $x_pct% |"$'\n'
    echo "idle round $r: window $app_pct% of a core, Xvfb $x_pct%"
done

CPU="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
FLAGS="$(grep -m1 '^flags' /proc/cpuinfo)"
has() { case "$FLAGS" in *" $1 "*|*" $1") echo yes;; *) echo no;; esac; }
mkdir -p "$(dirname "$OUT")"
cat > "$OUT" <<EOF
# The window's cost to training

\`scripts/bench-window.sh\` (ROUNDS=$ROUNDS, STEPS=$STEPS, IDLE_SECS=$IDLE_SECS), $(date -u +%Y-%m-%d).
CPU: $CPU (\`/proc/cpuinfo\` model name), $(nproc) cores (AVX2: $(has avx2), AVX-512: $(has avx512f), AVX512-BF16: $(has avx512_bf16), AMX: $(has amx_tile)); the real binary in a
1280 x 820 window under Xvfb with Mesa's software renderer. Each round trains the window's
default form (the built-in LoRA preset, $STEPS steps) in the window, then the same
\`config.toml\` from the CLI. s/step is the trainer's mean optimiser-step time (evaluation
excluded), from each run's \`summary.json\`, on a machine with nothing else running; the rounds
alternate window and CLI so a load change hits both.

| round | window steps | window s/step | window steps/s | CLI steps | CLI s/step | CLI steps/s | window / CLI steps/s |
| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
$rows
Target: window ≥ 0.9× the CLI's steps/s.

No PyTorch + PEFT figure: the peer (\`../shared/peer\`) has no window, and it times MiniLM and
SmolLM2 steps, not this preset; the ratio here is the window against our own command line, same
binary, same machine, same invocation. Ratios to the peer: \`bench-results/minilm.md\` and
\`bench-results/smollm2.md\`.

## An idle window

CPU time over $IDLE_SECS s of a window showing the Fine-tune tab with nothing to do (5 s after
it opened), from \`/proc/<pid>/stat\` (user + system), in % of one core.

| round | seconds | window process | Xvfb |
| ---: | ---: | ---: | ---: |
$idle_rows
Target: an idle window below 2% of a core.
EOF
echo "wrote $OUT"
