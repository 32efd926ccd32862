#!/usr/bin/env bash
# The distributed hand-off, checked on this machine without a GPU (issue 15):
# for MiniLM-spam LoRA and LoLDU and SmolLM2 LoRA, `peft-studio export-job` writes the job,
# the job runs with two CPU processes (gloo, `accelerate launch --multi_gpu --num_processes 2
# train.py --cpu`) and, for the MiniLM presets, with one process, `peft-studio import-run`
# brings it back (MiniLM: `--verify` re-evaluates the imported adapter in peft-studio;
# SmolLM2: `generate --adapter` loads it), and the same preset trains in peft-studio.
# Wall times, accuracies and the SVFit/LoLDU module equality go to bench-results/export-job.md.
#
# Needs the PyTorch peer venv (../shared/peer/setup.sh; PEER_VENV, default ~/.cache/peft-peer,
# with its SmolLM2 f32 folder) and scripts/fetch-models.sh's downloads/. Skips without them.
#   scripts/check-job.sh [--steps N] [--lm-steps N] [--only minilm-lora,minilm-loldu,smollm2-lora]
set -euo pipefail
cd "$(dirname "$0")/.."
PEER_VENV=${PEER_VENV:-$HOME/.cache/peft-peer}
STEPS=100 LM_STEPS=20 ONLY=minilm-lora,minilm-loldu,smollm2-lora
while [ $# -gt 0 ]; do
  case $1 in
    --steps) STEPS=$2; shift 2 ;;
    --lm-steps) LM_STEPS=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ ! -x "$PEER_VENV/bin/accelerate" ]; then
  echo "skipped: no PyTorch peer venv at $PEER_VENV (../shared/peer/setup.sh)"; exit 0
fi
if [ ! -d downloads/all-MiniLM-L6-v2 ] || [ ! -f downloads/spam-chat-train.jsonl ]; then
  echo "skipped: no downloads/ (scripts/fetch-models.sh)"; exit 0
fi
export PATH="$PEER_VENV/bin:$PATH"
BIN=target/release/peft-studio
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --quiet
WORK=${CHECK_JOB_WORK:-$(mktemp -d /tmp/check-job.XXXXXX)}
mkdir -p "$WORK"
RUNS=$WORK/runs
RESULTS=$WORK/results.jsonl
: > "$RESULTS"
echo "work folder: $WORK"

now() { date +%s.%N; }
record() { echo "$1" >> "$RESULTS"; }

minilm() { # name preset
  local name=$1 preset=$2
  local sets=(--set optim.steps=$STEPS --set optim.eval_every=$STEPS --set optim.warmup_steps=$((STEPS / 10)))
  local job=$WORK/$name-job
  $BIN export-job "$preset" --out "$job" --force "${sets[@]}"
  local t0 t1
  t0=$(now)
  (cd "$job" && accelerate launch --multi_gpu --num_processes 2 --main_process_port 29517 \
      train.py --cpu --threads 1 --out output) 2>&1 | grep -E "^(  step|  eval|done|MiniLM)" || true
  t1=$(now)
  local wall2; wall2=$(echo "$t1 - $t0" | bc)
  local imported; imported=$($BIN import-run "$job" --runs "$RUNS" --verify)
  echo "$imported"
  local one_wall=null one_acc=null
  if [ "${SKIP_ONE_PROCESS:-0}" != 1 ]; then
    t0=$(now)
    (cd "$job" && accelerate launch --num_processes 1 train.py --cpu --threads 2 --out output-1proc) \
      2>&1 | grep -E "^(  eval|done)" || true
    t1=$(now)
    one_wall=$(echo "$t1 - $t0" | bc)
    one_acc=$(python3 -c "import json,sys; e=[json.loads(l) for l in open('$job/output-1proc/metrics.jsonl') if '\"eval\"' in l]; print(e[-1]['accuracy'])")
  fi
  t0=$(now)
  local local_out; local_out=$($BIN train --preset "$preset" --out "$RUNS" "${sets[@]}" 2>&1 | tail -3)
  t1=$(now)
  local wall_local; wall_local=$(echo "$t1 - $t0" | bc)
  echo "$local_out"
  python3 - "$RESULTS" "$name" "$job" "$RUNS" "$wall2" "$one_wall" "$one_acc" "$wall_local" "$imported" <<'PY'
import json, os, re, sys, glob
res, name, job, runs, wall2, one_wall, one_acc, wall_local, imported = sys.argv[1:]
summ = json.load(open(os.path.join(job, "output", "job_summary.json")))
evals = [json.loads(l) for l in open(os.path.join(job, "output", "metrics.jsonl")) if '"eval"' in l]
verify = re.search(r"peft-studio's evaluation of the imported run: accuracy ([0-9.]+)", imported)
local = sorted((json.load(open(p)) for p in glob.glob(os.path.join(runs, "*", "summary.json"))
                if "accelerate job" not in json.load(open(p))["name"]),
               key=lambda s: s["started_at"])[-1]
json.dump({"name": name, "steps": summ["total_steps"], "job2_wall": float(wall2),
           "job2_secs_per_step": summ["secs_per_step"], "job2_acc": evals[-1]["accuracy"],
           "imported_verify_acc": float(verify.group(1)) if verify else None,
           "job1_wall": None if one_wall == "null" else float(one_wall),
           "job1_acc": None if one_acc == "null" else float(one_acc),
           "local_wall": float(wall_local), "local_secs_per_step": local["secs_per_step"],
           "local_acc": local["final_eval"]["accuracy"], "trainable_job": summ["trainable"],
           "trainable_local": local["trainable"]}, open(res, "a"))
open(res, "a").write("\n")
PY
}

smollm2() {
  local name=smollm2-lora preset=presets/smollm2-spam-lora.toml
  local sets=(--set optim.steps=$LM_STEPS --set optim.eval_every=$LM_STEPS --set data.max_eval=32 --set generation.questions=32)
  local job=$WORK/$name-job
  $BIN export-job "$preset" --out "$job" --force --model "$PEER_VENV/smollm2-135m-instruct-f32" "${sets[@]}"
  local t0 t1
  t0=$(now)
  (cd "$job" && accelerate launch --multi_gpu --num_processes 2 --main_process_port 29518 \
      train.py --cpu --threads 1 --out output) 2>&1 | grep -E "^(  step|  eval|done|SmolLM2)" || true
  t1=$(now)
  local wall2; wall2=$(echo "$t1 - $t0" | bc)
  local imported; imported=$($BIN import-run "$job" --runs "$RUNS")
  echo "$imported"
  local run; run=$(echo "$imported" | sed -n 's/.* as run \(.*\) (.*/\1/p')
  local answer; answer=$($BIN generate --model smollm2-135m-instruct --adapter "$run" --max-new-tokens 4 \
      --prompt "Is this e-mail spam or ham? Answer with one word.

Subject: WIN A FREE CRUISE now!!! Click here to claim your prize" 2>/dev/null | tr -d '\n')
  echo "imported SmolLM2 adapter answers: $answer"
  t0=$(now)
  $BIN train --preset "$preset" --out "$RUNS" "${sets[@]}" 2>&1 | tail -3
  t1=$(now)
  local wall_local; wall_local=$(echo "$t1 - $t0" | bc)
  python3 - "$RESULTS" "$name" "$job" "$RUNS" "$wall2" "$wall_local" "$answer" <<'PY'
import json, os, sys, glob
res, name, job, runs, wall2, wall_local, answer = sys.argv[1:]
summ = json.load(open(os.path.join(job, "output", "job_summary.json")))
evals = [json.loads(l) for l in open(os.path.join(job, "output", "metrics.jsonl")) if '"eval"' in l]
local = sorted((json.load(open(p)) for p in glob.glob(os.path.join(runs, "*", "summary.json"))
                if "accelerate job" not in json.load(open(p))["name"] and p.find("smollm2") >= 0),
               key=lambda s: s["started_at"])[-1]
json.dump({"name": name, "steps": summ["total_steps"], "job2_wall": float(wall2),
           "job2_secs_per_step": summ["secs_per_step"], "job2_acc": evals[-1]["accuracy"],
           "job2_acc_step0": evals[0]["accuracy"], "imported_answer": answer,
           "local_wall": float(wall_local), "local_secs_per_step": local["secs_per_step"],
           "local_acc": local["final_eval"]["accuracy"], "trainable_job": summ["trainable"],
           "trainable_local": local["trainable"]}, open(res, "a"))
open(res, "a").write("\n")
PY
}

case ",$ONLY," in *,minilm-lora,*) minilm minilm-lora presets/minilm-spam-lora.toml ;; esac
case ",$ONLY," in *,minilm-loldu,*) minilm minilm-loldu presets/minilm-spam-loldu.toml ;; esac
case ",$ONLY," in *,smollm2-lora,*) smollm2 ;; esac
modules=$(cargo test --release --quiet --offline --test job_modules -- --nocapture --test-threads 1 2>&1 | grep -o "[a-z_]*: max |y.*" | sort -u)
echo "$modules"
python3 scripts/check_job_report.py "$RESULTS" "$modules" > bench-results/export-job.md.new
mv bench-results/export-job.md.new bench-results/export-job.md
echo "wrote bench-results/export-job.md"
