#!/usr/bin/env bash
# Issue 11's side-by-side measure: the 2026-11-23 reproduction (commit 069496e, `evaluate.py
# --reproduce`) against today's reproduce.py doing the same work, one thread each, CPU and wall time
# from /usr/bin/time -v. The same work: the first 40 facts of data/facts/facts.jsonl plus 20 replayed
# skill examples, the six methods of 2026-11-23 at seed 0, 6 epochs of 7 steps (no stopping rule),
# 100 in-template reasoning items (no held-out-template split), the 41 known facts of 2026-11-23.
#   nohup bash experiments/speed.sh then > runs/side-old.log 2>&1 &
#   nohup bash experiments/speed.sh now > runs/side-new.log 2>&1 &
# Needs the SVF expert (python train_svf.py); `then` runs in a worktree of 069496e at ../palora-then
# with a copy of the expert (its code finds the newest expert under its own runs/).
set -euo pipefail
export OMP_NUM_THREADS=1
cd "$(dirname "$0")/.."
SVF=runs/svf-smollm2_135m-reasoning
PART=${1:?a part: then, now}

if [ "$PART" = then ]; then
  THEN=../palora-then
  [ -d "$THEN" ] || git worktree add --detach "$THEN" 069496e
  mkdir -p "$THEN/runs" && cp -r -n "$SVF" "$THEN/runs/"
  [ -e "$THEN/checkpoints" ] || ln -s "$PWD/checkpoints" "$THEN/checkpoints"
  cd "$THEN"
  /usr/bin/time -v python evaluate.py --reproduce --seeds 0 --out runs/reproduce-old-s0
fi
if [ "$PART" = now ]; then
  head -41 data/known/known_facts.jsonl > runs/side-known41.jsonl  # 2026-11-23 had these 41 lines
  /usr/bin/time -v python reproduce.py --n-facts 40 --seeds 0 \
    --methods palora,topk,lora,pissa,milora,palora_act --limit 100 --epochs 6 --recall-target 0 \
    --reasoning-ood "" --known runs/side-known41.jsonl --svf "$SVF/svf.safetensors" --out runs/side-new-s0
fi
