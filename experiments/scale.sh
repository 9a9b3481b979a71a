#!/usr/bin/env bash
# Facts that stay (issue 25): throughput levers, the recipe for many facts, capacity and streams.
#   nohup bash experiments/scale.sh PART > runs/scale/PART.log 2>&1 &
# Selection parts (every choice is made on them): data/facts/facts_scale.jsonl, reasoning items
# test.jsonl[:100] / test_ood.jsonl[:100], known facts known_eval.jsonl.
# Confirmation parts (nothing is chosen on them; the headline figures): data/facts/facts_confirm.jsonl,
# data/reasoning/confirm{,_ood}.jsonl, data/known/known_confirm.jsonl.
# Each part reuses finished runs; a killed part continues where it stopped.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$(dirname "$0")/.."
SVF=${SVF:-runs/svf-smollm2_135m-reasoning/svf.safetensors}
S=runs/scale
mkdir -p $S

facts() {  # facts SET N: the first N facts of data/facts/facts_SET.jsonl, as $S/SET-N.jsonl
  local path=$S/$1-$2.jsonl
  [ -f "$path" ] || head -n "$2" "data/facts/facts_$1.jsonl" > "$path"
  echo "$path"
}

slice() {  # slice SET FROM N: facts FROM+1 .. FROM+N of facts_SET.jsonl (a stream's round)
  local path=$S/$1-$2-$3.jsonl
  [ -f "$path" ] || tail -n "+$(($2 + 1))" "data/facts/facts_$1.jsonl" | head -n "$3" > "$path"
  echo "$path"
}

inject() {  # inject OUT [flags...]: a run, skipped when finished, resumed when half done
  local out=$1; shift
  if [ -f "$out/summary.json" ]; then return; fi
  local resume=--overwrite; [ -f "$out/state.safetensors" ] && resume=--resume
  /usr/bin/time -v -o "$out.time" python inject.py --svf "$SVF" --out "$out" $resume "$@"
}

select_eval() {  # select_eval OUT FACTS RUN...: scored on the selection items
  local out=$1 f=$2; shift 2
  python evaluate.py --svf "$SVF" --facts "$f" --limit 100 --out "$out" \
    --score-cache $S/scores $(for r in "$@"; do echo --adapter "$r"; done)
}

confirm_eval() {  # confirm_eval OUT FACTS RUN...: scored on the locked confirmation items
  local out=$1 f=$2; shift 2
  python evaluate.py --svf "$SVF" --facts "$f" --out "$out" \
    --reasoning data/reasoning/confirm.jsonl --reasoning-ood data/reasoning/confirm_ood.jsonl \
    --known "${KNOWN_CONFIRM:-data/known/known_confirm.jsonl}" \
    --score-cache $S/scores $(for r in "$@"; do echo --adapter "$r"; done)
}

PART=${1:?part}
FAST="--mix-skill none --batch-size 16"  # the levers under test; see each part
RECIPE="--mix-skill none --batch-size 16 --lr 3e-3 --recall-target 0.95"  # part 2 measures it

# 1. Throughput: one epoch of 200 selection facts, the defaults against each lever.
if [ "$PART" = throughput ]; then
  F=$(facts scale 200)
  inject $S/tp-defaults --facts "$F" --epochs 1 --recall-target 0
  inject $S/tp-noreplay --facts "$F" --epochs 1 --recall-target 0 --mix-skill none
  inject $S/tp-noreplay-b16 --facts "$F" --epochs 1 --recall-target 0 --mix-skill none \
    --batch-size 16
  inject $S/tp-noreplay-b32 --facts "$F" --epochs 1 --recall-target 0 --mix-skill none \
    --batch-size 32
fi

# 2. The recipe, on 300 selection facts, batch 16, lr 3e-3 (2e-3 at batch 8 x √2) on the cosine
#    schedule, target 0.95:
#    does palora_act still need the skill's examples replayed (0.5 per fact) or not?
if [ "$PART" = recipe-noreplay ] || [ "$PART" = recipe-replay ]; then
  F=$(facts scale 300)
  replay=none; [ "$PART" = recipe-replay ] && replay=expert
  inject $S/$PART --facts "$F" --batch-size 16 --lr 3e-3 --recall-target 0.95 --mix-skill $replay
fi
if [ "$PART" = recipe-eval ]; then
  F=$(facts scale 300)
  select_eval $S/eval-recipe "$F" $S/recipe-noreplay $S/recipe-replay
fi

# 3. A stream on selection facts: 4 rounds of 60, earlier rounds protected (--act-earlier),
#    replayed (--mix-earlier) or neither.
if [ "$PART" = stream-select ]; then
  for variant in none protect replay; do
    case $variant in
      none) flags="--act-earlier 0 --mix-earlier 0" ;;
      protect) flags="--act-earlier 32 --mix-earlier 0" ;;
      replay) flags="--act-earlier 0 --mix-earlier 0.5" ;;
    esac
    after=""; runs=()
    for k in 1 2 3 4; do
      out=$S/ss-$variant-r$k
      inject $out --facts "$(slice scale $(((k - 1) * 60)) 60)" $FAST $flags \
        ${after:+--after $after}
      after=$out; runs+=("$out")
    done
    python experiments/stream_recall.py --svf "$SVF" --out $S/ss-$variant-recall.json "${runs[@]}"
  done
fi

# 4. The headline: the recipe on N facts none of the choices was made on (1,000 asked; 300 is what
#    this machine's session could run: 8 s a step of 16 facts on a shared core).
if [ "$PART" = headline ]; then
  n=${N:-1000}
  F=$(facts confirm "$n")
  inject $S/c$n --facts "$F" $RECIPE
  confirm_eval $S/eval-c$n "$F" $S/c$n
fi

# 5. The stream on confirmation facts: ROUNDS rounds of N facts (10 x 100 asked; 5 x 40 is what
#    this machine's session could run), VARIANT=protect (the shipped defaults) or VARIANT=none (no
#    earlier round protected: the control), side by side. Start protect first: round 1 is shared
#    (the other variant waits for it).
if [ "$PART" = stream ]; then
  variant=${VARIANT:?VARIANT} rounds=${ROUNDS:-10} n=${N:-100}
  flags=""; [ "$variant" = none ] && flags="--act-earlier 0 --mix-earlier 0"
  after=""; runs=()
  for k in $(seq 1 "$rounds"); do
    first=$S/cs$n-r01  # round 1 has no earlier round: one run for both variants
    while [ "$k" = 1 ] && [ "$variant" = none ] && [ ! -f $first/summary.json ]; do sleep 30; done
    out=$S/cs$n-$variant-r$(printf %02d "$k")
    [ "$k" = 1 ] && out=$first
    inject "$out" --facts "$(slice confirm $(((k - 1) * n)) "$n")" $RECIPE $flags \
      ${after:+--after $after}
    after=$out; runs+=("$out")
  done
  python experiments/stream_recall.py --svf "$SVF" --out $S/cs$n-$variant-recall.json "${runs[@]}"
  confirm_eval $S/eval-cs$n-$variant "$(facts confirm $((rounds * n)))" "${runs[-1]}"
fi

# 6. One table on the confirmation items: the headline run and both streams' last rounds, scored on
#    the headline's facts (the streams' facts are its first ROUNDS x N lines), then the tables.
if [ "$PART" = final ]; then
  n=${N:-300} rounds=${ROUNDS:-5} k=${K:-40}
  last=$(printf %02d "$rounds")
  confirm_eval $S/eval-final "$(facts confirm "$n")" $S/c$n $S/cs$k-protect-r$last $S/cs$k-none-r$last
  python experiments/scale_table.py $S/eval-final/results.json --known data/known/known_confirm.jsonl
  for v in protect none; do python experiments/scale_table.py --stream $S/cs$k-$v-recall.json; done
fi
