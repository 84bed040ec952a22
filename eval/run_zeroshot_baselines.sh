#!/usr/bin/env bash
# The pruned rows of eval/results/zeroshot.md: SmolLM2-135M pruned at 20 / 30 / 50 % (exact widths, --multiple 1,
# 128 C4 windows of 512 tokens) by the project's default (sequential wanda-sp + lstsq), FLAP and Wanda-sp (both
# one-shot, as their papers), then each checkpoint through the eight zero-shot tasks on the first 500 documents of
# each (float32, CPU), one command after another. METHODS and SPARSITIES pick a subset (two queues can share the
# CPU: SPARSITIES="0.2 0.3" in one, SPARSITIES=0.5 in the other).
#
#   nohup nice -n 10 bash eval/run_zeroshot_baselines.sh > runs/zeroshot_baselines.log 2>&1 &
#
# Checkpoints go to runs/{default,flap,wanda-sp}-S (git-ignored), results to eval/results/zeroshot_{...}-S.json.
# A step whose output exists is skipped, so a re-run continues where a stopped one ended. Cost on the 2-core
# CPU: a few minutes per prune, 21–23 min per eval alone on one core (11,495 loglikelihood requests). Needs `neuroproj-prune`
# on PATH and `neuroproj-prune tasks fetch` done. DATA overrides the calibration text.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
DATA=${DATA:-$(cd .. && pwd)/shared/data/c4-train-sample-1000.jsonl}
METHODS=${METHODS:-default flap wanda-sp}
SPARSITIES=${SPARSITIES:-0.2 0.3 0.5}
mkdir -p runs

step() { echo "[$(date -u +%FT%TZ)] $*"; }

for s in $SPARSITIES; do
  for m in $METHODS; do
    case $m in
      default) method=() ;;
      flap) method=(--select flap --fold bias --calibration oneshot) ;;
      wanda-sp) method=(--select wanda-sp --fold none --calibration oneshot) ;;
      *) echo "unknown method $m (default, flap, wanda-sp)" >&2; exit 2 ;;
    esac
    if [ -f "runs/$m-$s/prune_summary.json" ]; then
      step "prune $m $s: runs/$m-$s exists, skipped"
    else
      step "prune $m $s"
      neuroproj-prune prune --model smollm2-135m --data "$DATA" --sparsity "$s" --multiple 1 "${method[@]}" \
        --device cpu --out "runs/$m-$s"
    fi
  done
  for m in $METHODS; do
    json="eval/results/zeroshot_$m-$s.json"
    if [ -f "$json" ]; then
      step "eval $m $s: $json exists, skipped"
      continue
    fi
    step "eval $m $s"
    neuroproj-prune eval --model "runs/$m-$s" --tasks zeroshot --limit 500 --json "$json" --quiet --device cpu
  done
done
step "done"
