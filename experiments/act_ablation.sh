#!/usr/bin/env bash
# Which side of palora_act keeps the skill (issue 23; docs/probe-test.md, "The ablation")?
# 40 locked facts (facts_confirm.jsonl rows 1-40), the stream's recipe, one run per variant:
#   the output side U_S: the probe's S (the shipped default), as many at random, of the largest,
#   or none (V_act alone), each with V_act from 64 examples; then the probe's S with V_act from 16
#   and from 256 examples; plain LoRA as the control. Scored on the locked items (confirm.jsonl 200, confirm_ood.jsonl 50)
#   and the locked known facts. Nothing is chosen on them: this table reports, it selects nothing.
#   SEED=0 bash experiments/act_ablation.sh     # about 6 min a run and 25 min of scoring, 1 core
#   SEED=1 SIDES="probe none" EXAMPLES="" bash experiments/act_ablation.sh   # a second seed, 3 rows
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$(dirname "$0")/.."
SVF=${SVF:-runs/svf-smollm2_135m-reasoning/svf.safetensors}
SEED=${SEED:-0}
A=runs/ablate
mkdir -p $A
F=$A/confirm-0-40.jsonl
[ -f $F ] || head -n 40 data/facts/facts_confirm.jsonl > $F
RECIPE="--mix-skill none --batch-size 16 --lr 3e-3 --recall-target 0.95 --seed $SEED"

inject() {  # inject OUT [flags...]: skipped when finished, resumed when half done
  local out=$1; shift
  if [ -f "$out/summary.json" ]; then return; fi
  local resume=--overwrite; [ -f "$out/state.safetensors" ] && resume=--resume
  /usr/bin/time -v -o "$out.time" python inject.py --svf "$SVF" --facts $F --out "$out" \
    $resume $RECIPE "$@"
}

runs=()
for side in ${SIDES:-probe none random topk}; do
  inject $A/$side-64-s$SEED --output-side $side
  runs+=($A/$side-64-s$SEED)
done
for n in ${EXAMPLES-16 256}; do
  inject $A/probe-$n-s$SEED --act-examples $n
  runs+=($A/probe-$n-s$SEED)
done
inject $A/lora-s$SEED --method lora  # the control: nothing protected (does the test have power?)
runs+=($A/lora-s$SEED)
python evaluate.py --svf "$SVF" --facts $F --out $A/eval-s$SEED \
  --reasoning data/reasoning/confirm.jsonl --reasoning-ood data/reasoning/confirm_ood.jsonl \
  --known data/known/known_confirm.jsonl --score-cache ${SCORES:-$A/scores} \
  $(for r in "${runs[@]}"; do echo --adapter "$r"; done)
