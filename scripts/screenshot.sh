#!/usr/bin/env bash
# Runs the real peft-studio window under a virtual X server (Xvfb) and writes a PNG of it.
#
#   scripts/screenshot.sh [OUT.png] [SECONDS]
#
# Needs: xvfb, imagemagick (`import`), and a software renderer (mesa-vulkan-drivers +
# libvulkan1, or Mesa's GL through EGL). On Debian:
#   apt-get install -y xvfb imagemagick mesa-vulkan-drivers libvulkan1
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/docs/screenshot.png}"
WAIT="${2:-8}"
cd "$ROOT"
for tool in xvfb-run import; do
    command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y xvfb imagemagick" >&2; exit 1; }
done
cargo build --release --quiet
mkdir -p "$(dirname "$OUT")"
export XDG_RUNTIME_DIR="$(mktemp -d)"
chmod 700 "$XDG_RUNTIME_DIR"
# A scratch config folder, so the screenshot shows the defaults, not this machine's last state.
export XDG_DATA_HOME="$(mktemp -d)" XDG_CONFIG_HOME="$(mktemp -d)"
xvfb-run -a -s "-screen 0 1280x820x24" sh -c "
    ./target/release/peft-studio & P=\$!
    sleep $WAIT
    import -window root '$OUT.tmp.png'
    kill \$P
"
mv "$OUT.tmp.png" "$OUT"
echo "wrote $OUT"
