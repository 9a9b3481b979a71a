#!/usr/bin/env bash
# Stage one keeping the known facts (issue 25): the SVF expert trained with the known facts of the
# injected relations beside the skill (train_svf.py --mix-known), then it and the shipped expert
# scored on the SELECTION items (test.jsonl[:100], test_ood.jsonl[:100], known_eval.jsonl).
#   nohup bash experiments/svf_known.sh > runs/svf_known.log 2>&1 &
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$(dirname "$0")/.."
OLD=${SVF:-runs/svf-smollm2_135m-reasoning/svf.safetensors}
mkdir -p runs
head -n 4 data/facts/facts_scale.jsonl > runs/svf-known-facts.jsonl  # evaluate.py needs a facts file
[ -f runs/svf-known/summary.json ] || /usr/bin/time -v -o runs/svf-known.time python train_svf.py \
  --mix-known data/known/known_keep.jsonl --out runs/svf-known --eval-limit 100 --overwrite
for e in known:runs/svf-known/svf.safetensors old:$OLD; do
  python evaluate.py --svf "${e#*:}" --facts runs/svf-known-facts.jsonl --limit 100 \
    --out "runs/eval-select-${e%%:*}"
done
