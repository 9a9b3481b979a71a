#!/usr/bin/env bash
# Issue 15's experiments (beyond one operating point), in the issue's order; each step reuses
# finished runs (reproduce.py and inject.py refuse a folder holding another run), so a killed script
# continues where it stopped.
#   nohup bash experiments/beyond.sh PART > runs/beyond-PART.log 2>&1 &
# Needs the SVF expert (python train_svf.py) and stage2.sh's runs/reproduce (seed 2 with --keep-epochs).
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # on shared cores one busy thread beats two that wait on each other
cd "$(dirname "$0")/.."
SVF=runs/svf-smollm2_135m-reasoning/svf.safetensors
R=runs/reproduce
PART=${1:?a part: lane-c, lane-d, frontier, stream-a, stream-b, stream, sweep, capacity, smf, \
  others-a, others-b, others, capacity-a, capacity-b, capacity-120}
STREAM="--stream 5 --n-facts 40 --seeds 0 --limit 50 --svf $SVF --out $R"

lane() {  # lane RUN...: each <method>-s<seed> kept epoch by epoch, at the comparison's settings
  for run in "$@"; do
    [ -f "$R/$run/adapter_model.safetensors" ] && continue
    local resume=--overwrite; [ -f "$R/$run/state.safetensors" ] && resume=--resume
    python inject.py --svf "$SVF" --out "$R/$run" $resume --facts $R/facts.jsonl \
      --seed "${run##*-s}" --method "${run%-s*}" --keep-epochs --lr 5e-3 --mix-known ""
  done
}

# 1. Frontiers: a second seed (3) for every method, in two lanes side by side (one per core), then
#    the frontier of seeds 2 and 3, every other epoch, 50 reasoning items per split.
if [ "$PART" = lane-c ]; then lane palora-s3 random-s3 topk-s3; fi
if [ "$PART" = lane-d ]; then lane lora-s3 palora_act-s3; fi
if [ "$PART" = frontier ]; then
  python reproduce.py --n-facts 40 --seeds 2,3 --methods palora,random,topk,lora,palora_act \
    --limit 50 --svf "$SVF" --out $R --frontier --every 2 --plot
fi

# 2. A continual stream: 5 rounds of 40 new facts (facts.jsonl lines 1-40 are round 1, the
#    comparison's own runs; 41-80 round 2, ...), each injected on the previous round's merged
#    model, the probe staying the expert's; every round scored on all 200 facts. One lane per
#    method side by side, then the table of both (every row from the score cache).
if [ "$PART" = stream-a ]; then python reproduce.py $STREAM --methods palora_act; fi
if [ "$PART" = stream-b ]; then python reproduce.py $STREAM --methods lora; fi
if [ "$PART" = stream ]; then python reproduce.py $STREAM --methods palora_act,lora --plot; fi

# 3. The probe's settings on PALoRA (the paper's method): the protected share of each matrix, 10% and
#    90% beside the comparison's 50% (25%, 75%, global-0.5 and energy are in reproduce.py's sweep but
#    were not run, for CPU time); one seed, each run's final point (trained to recall 0.9), 50 items.
SWEEP=${SWEEP:-fraction-0.1,fraction-0.9}
if [ "$PART" = sweep ]; then
  python reproduce.py --sweep "$SWEEP" --n-facts 40 --seeds 0 --limit 50 --svf "$SVF" --out $R --plot
fi

# 4. Capacity and known-fact mixing (the packing study's question): 40, 120 and 240 facts of
#    facts.jsonl (1,000 would need more facts from data/facts/prepare.py), palora_act and lora, with and
#    without known facts mixed in. Not run yet: at ~8 CPU-minutes per 40 facts it needs ~6 CPU-hours.
CAP="--n-facts 120 --seeds 0 --limit 50 --svf $SVF --out runs/capacity/n120"
if [ "$PART" = capacity-a ]; then python reproduce.py $CAP --methods palora_act; fi  # 120 facts, side
if [ "$PART" = capacity-b ]; then python reproduce.py $CAP --methods lora; fi        # by side, then
if [ "$PART" = capacity-120 ]; then python reproduce.py $CAP --methods palora_act,lora; fi  # the table
if [ "$PART" = capacity ]; then
  for n in 40 120 240; do
    for mix in "" data/known/known_mix.jsonl; do
      python reproduce.py --n-facts $n --seeds 0 --methods palora_act,lora --limit 50 --svf "$SVF" \
        --mix-known "$mix" --out runs/capacity/n$n${mix:+-mix}
    done
  done
fi

# 5. SMF at a learning rate of its own (issue 12; docs/results.md's SMF paragraph): a probe on the first 8
#    facts without replay, 12 one-step epochs at lr 0.02, 0.2 and 2.0; then lr 2.0 on the comparison's
#    40 facts (its replay and stopping rule) and its row beside IMSM and LoRA. That run is now
#    $R/smf-s0 (reproduce.py's name for it, --smf-lr 2.0 its default); lr 5e-3's is smf-lr0.005-s0.
if [ "$PART" = smf ]; then
  mkdir -p runs/smf-probe; head -8 data/facts/facts.jsonl > runs/smf-probe/facts8.jsonl
  for lr in 0.02 0.2 2.0; do
    [ -f runs/smf-probe/lr$lr/summary.json ] && continue
    python inject.py --method smf --lr $lr --facts runs/smf-probe/facts8.jsonl --mix-skill none \
      --mix-known "" --epochs 12 --recall-target 1.0 --svf "$SVF" --out runs/smf-probe/lr$lr --overwrite
  done
  [ -f $R/smf-s0/summary.json ] || python inject.py --method smf --lr 2.0 --facts $R/facts.jsonl \
    --seed 0 --mix-known "" --svf "$SVF" --out $R/smf-s0 --overwrite
  python evaluate.py --svf "$SVF" --facts $R/facts.jsonl --limit 100 --out runs/others/eval-smf \
    --score-cache $R/eval/scores --adapter $R/smf-s0 --adapter $R/imsm-s0 --adapter $R/lora-s0
fi

# 6. IMSM and SMF as rows of the comparison (issue 12): seeds 1 and 2 of each, in two lanes side by
#    side (each scores its own rows into the shared score cache), then the table of all 15 runs.
OTHERS="--n-facts 40 --seeds 0,1,2 --limit 100 --svf $SVF --out $R"
if [ "$PART" = others-a ]; then python reproduce.py $OTHERS --methods imsm; fi
if [ "$PART" = others-b ]; then python reproduce.py $OTHERS --methods smf,lora,palora,palora_act; fi
if [ "$PART" = others ]; then
  python reproduce.py $OTHERS --methods palora,lora,palora_act,imsm,smf --plot
fi
