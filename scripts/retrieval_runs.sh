#!/usr/bin/env bash
# The retrieval runs of docs/evaluation.md#retrieval-runs, one after another: each kind of
# configs/mqar.py trained (DSA and its local baseline from the dense MLA run), then evaluated by
# distance; scripts/retrieval_report.py then tabulates and plots them side by side.
#   bash scripts/retrieval_runs.sh [RUNS_DIR] [KIND ...]     (default: runs/mqar, every kind)
# A finished stage (its metrics.jsonl has the last step) is not run again.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/mqar}; shift || true
kinds=${*:-dense nsa win dsa local}   # dsa and local include the mla run

finished() {   # finished WORKDIR STEPS
  [[ -f $1/metrics.jsonl ]] && grep -q "\"step\": $2[,}]" "$1/metrics.jsonl"
}
stage() {      # stage CONFIG_ARG WORKDIR [INIT_FROM]
  local steps
  steps=$(python -c "from configs import mqar; print(mqar.get_config('$1').steps)")
  if finished "$2" "$steps"; then echo "$2: done"; return; fi
  echo "== $2 ($1, $steps steps)"
  python train.py --config "configs/mqar.py:$1" --workdir "$2" ${3:+--config.init_from=$3}
}
for kind in $kinds; do
  case $kind in
    dsa)   stage mla "$out/mla"
           stage dsa_warmup "$out/dsa_warmup" "$out/mla"
           stage dsa "$out/dsa" "$out/dsa_warmup" ;;
    local) stage mla "$out/mla"
           stage local "$out/local" "$out/mla" ;;
    *)     stage "$kind" "$out/$kind" ;;
  esac
  python scripts/evaluate.py --workdir "$out/$kind" --eval-batches 16
done
python scripts/retrieval_report.py --runs-dir "$out"
