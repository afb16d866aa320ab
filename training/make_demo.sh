#!/usr/bin/env bash
# Rebuild the packaged demo model (fusarbatch/model/demo_model/) from real SAR data with the shipped commands
# only, and evaluate it against its baselines. Wall times go to $WORK/times.tsv, logs to $WORK/*.log.
#
#   DATA=/work/shared/data WORK=out/demo6 training/make_demo.sh
#
# DATA holds ssdd/, mstar_soc10/ and mstar_composite_detection/ (see their SOURCE.txt); they may not be
# committed and are read from DATA. Set EXPORT=0 to leave the packaged model alone, SKIP_EVAL=1 to train
# only. Every training step resumes from its latest checkpoint when started again (a step whose final model
# exists is skipped).
#
# Stage 0 (NOT part of FUSAR-GPT's method: it stands in for the pretraining a real Qwen2.5-VL base already has)
# runs in three phases: (a) the vision tower and merger alone learn where the targets are and what the image holds
# (--vision-only: dense target map + image probe, no language model run; STEPS0V); (b) the language model learns
# to read that tower and answer every task, the tower frozen (--freeze-vision; STEPS0), while a probe on its
# second layer makes it write each visual token's row and column into the token (--position-loss-weight);
# (c) the same on detection answers only (--task detection; STEPS0D).
# Then the paper's stages 1 (captions: TLM + LoRA) and 2 (tasks: LoRA) run unchanged on top of it.
set -euo pipefail
DATA=${DATA:-/work/shared/data}
WORK=${WORK:-out/demo4}
EXPORT=${EXPORT:-1}
BIN=${BIN:-.venv/bin}
GRID=${GRID:-336}
export HF_HUB_OFFLINE=1
# One torch thread: on a shared 2-core machine two OpenMP threads per process oversubscribe the cores (a training
# step ran 6x slower under load). Override with OMP_NUM_THREADS=2 on an idle machine.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
STEPS0V=${STEPS0V:-3000} STEPS0=${STEPS0:-4000} STEPS0D=${STEPS0D:-2000} STEPS1=${STEPS1:-150} STEPS2=${STEPS2:-400}
LR0D=${LR0D:-1e-3} LR1=${LR1:-2e-4} LR2=${LR2:-2e-4}

# the settings are checked before anything runs (a bad one would otherwise stop the script hours in)
die() { echo "make_demo.sh: $*" >&2; exit 2; }
for v in STEPS0V STEPS0 STEPS0D STEPS1 STEPS2; do
  [[ ${!v} =~ ^[1-9][0-9]{0,6}$ ]] || die "$v=${!v}: give a whole number of steps from 1 to 9999999"
done
for v in LR0D LR1 LR2; do
  [[ ${!v} =~ ^([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][-+]?[0-9]+)?$ ]] && awk -v x="${!v}" 'BEGIN { exit !(x > 0 && x < 1) }' \
    || die "$v=${!v}: give a learning rate in (0, 1), e.g. 2e-4"
done
[[ $GRID =~ ^[1-9][0-9]{0,3}$ ]] && (( GRID % 28 == 0 && GRID <= 8176 )) || die "GRID=$GRID: give a multiple of 28, e.g. 336"
for d in ssdd mstar_soc10 mstar_composite_detection; do
  [ -d "$DATA/$d" ] || die "DATA=$DATA: no $d/ in it; give the folder that holds ssdd/, mstar_soc10/ and mstar_composite_detection/"
done
[ -x "$BIN/fusarbatch" ] || die "BIN=$BIN: no fusarbatch there; run 'make venv' first or set BIN"

any() {  # any PATH...: whether one of the paths (a glob's expansion, or the pattern itself when none) exists
  local f
  for f in "$@"; do [ -e "$f" ] && return 0; done
  return 1
}
mkdir -p "$WORK"
touch "$WORK/times.tsv"

step() {  # step NAME COMMAND...: run, log, record the wall time
  local name=$1; shift
  local t0 t1
  t0=$(date +%s%N)
  "$@" >> "$WORK/$name.log" 2>&1 || { echo "step $name failed, see $WORK/$name.log" >&2; tail -20 "$WORK/$name.log" >&2; exit 1; }
  t1=$(date +%s%N)
  printf '%s\t%d.%d\n' "$name" $(( (t1 - t0) / 1000000000 )) $(( (t1 - t0) / 100000000 % 10 )) | tee -a "$WORK/times.tsv"
}

train() {  # train NAME fusarbatch-train-args...: skipped when done, resumed when interrupted
  local name=$1; shift
  local out="$WORK/$name" base="" init="" prev="" a
  for a in "$@"; do
    [ "$prev" = --base-model ] && base=$a
    [ "$prev" = --init ] && init=$a
    prev=$a
  done
  if [ -f "$out/fusarbatch_train.json" ] && grep -q '"wall_s"' "$out/fusarbatch_train.json"; then
    # done only if it was trained on this base (and --init), and after them (else results mix two lineages)
    if ! "$BIN/python" -c 'import json, os, sys; r = json.load(open(sys.argv[1]))
same = lambda k, v: os.path.realpath(r.get(k) or "") == os.path.realpath(v) if v else not r.get(k)
sys.exit(not (same("base_model", sys.argv[2]) and same("init", sys.argv[3])))' \
         "$out/fusarbatch_train.json" "$base" "$init" \
       || [ "$base/fusarbatch_train.json" -nt "$out/fusarbatch_train.json" ] \
       || { [ -n "$init" ] && [ "$init/fusarbatch_train.json" -nt "$out/fusarbatch_train.json" ]; }; then
      die "$name: $out was trained on another or an older $base${init:+ / $init}; remove $out and run again"
    fi
    echo "$name: done already ($out)"; return
  fi
  local resume=()
  if any "$out"/checkpoint-*; then resume=(--resume); fi
  step "$name" "$BIN/fusarbatch" train --out "$out" "$@" "${resume[@]}"
}

# 1. the tiny base (random weights) and the triplet datasets on the GRID x GRID input
[ -f "$WORK/base/config.json" ] || step base "$BIN/python" -m training base --out "$WORK/base" --preset demo --seed 0
build() {  # build NAME ARGS...: skipped when its folder holds manifests
  local name=$1; shift
  any "$WORK/data/$name"/stage*_*.jsonl || step "data_$name" "$BIN/python" -m training build "$@" \
    --out "$WORK/data/$name" --grid "$GRID"
}
build ssdd "$DATA/ssdd" --name ssdd --split train --augment dihedral
build ssdd_test "$DATA/ssdd" --name ssdd --split test
build composite "$DATA/mstar_composite_detection" --name mstar_composite --class-map "$DATA/mstar_soc10/classes.json"
build soc "$DATA/mstar_soc10" --name mstar_soc10 --max-per-class 150 --split train
build soc_test "$DATA/mstar_soc10" --name mstar_soc10 --split val --task classification

TASKS=(--data "$WORK/data/ssdd/stage2_train.jsonl" --data "$WORK/data/composite/stage2_train.jsonl"
       --data "$WORK/data/soc/stage2_train.jsonl")
CAPTIONS=(--data "$WORK/data/ssdd/stage1_train.jsonl" --data "$WORK/data/composite/stage1_train.jsonl"
          --data "$WORK/data/soc/stage1_train.jsonl")
# 2. stage 0: (a) the vision tower alone, directly supervised (from scratch, a tower trained through the
# answers of an untrained language model did not learn to see ships: training/RESULTS.md); (b) the language
# model on every task, reading the frozen tower
train stage0v --stage 0 --vision-only --base-model "$WORK/base" --batch-size 16 --lr 2e-3 \
  --max-steps "$STEPS0V" --save-steps 250 --log-steps 25 --target-loss-weight 1 --probe-loss-weight 1 \
  "${TASKS[@]}"
train stage0 --stage 0 --freeze-vision --base-model "$WORK/stage0v" --batch-size 8 --grad-accum 1 --lr 2e-3 \
  --loss-mean answer --position-loss-weight 1 --max-steps "$STEPS0" --save-steps 250 --log-steps 10 \
  "${TASKS[@]}"
# (c) detection only, from (b): the mix leaves boxes behind the short answers (one box is ~31 tokens); a
# detection-only continuation at a lower rate took SSDD F1@0.25 from 3.8 % to 9.8 % after stages 1 + 2
# (training/RESULTS.md, session 5)
train stage0det --stage 0 --freeze-vision --base-model "$WORK/stage0" --task detection --batch-size 8 \
  --grad-accum 1 --lr "$LR0D" --loss-mean answer --position-loss-weight 1 --max-steps "$STEPS0D" \
  --save-steps 250 --log-steps 10 "${TASKS[@]}"

# 3. the paper's stages on top: 1 (captions: TLM + LoRA), 2 (tasks: LoRA, TLM frozen)
C12=(--base-model "$WORK/stage0det" --batch-size 8 --grad-accum 1 --save-steps 100 --log-steps 10)
train stage1 --stage 1 "${C12[@]}" --lr "$LR1" --max-steps "$STEPS1" "${CAPTIONS[@]}"
train stage2 --stage 2 --init "$WORK/stage1" "${C12[@]}" --lr "$LR2" --max-steps "$STEPS2" "${TASKS[@]}"

if [ "${SKIP_EVAL:-0}" = 1 ]; then echo "trained; evaluation and export skipped (SKIP_EVAL=1)"; exit 0; fi

# 4. evaluation on the held-out splits, each beside its baselines (majority answers of the training manifest,
# constant median box, shuffled images, CFAR; eval prints them)
ev() {  # ev NAME MODEL DATA TRAIN [ARGS]
  local name=$1 model=$2 data=$3 train_data=$4; shift 4
  [ -f "$WORK/eval/$name/metrics.json" ] || step "eval_$name" "$BIN/fusarbatch" eval --model "$model" --data "$data" \
    --train-data "$train_data" --out "$WORK/eval/$name" --batch-size 16 --max-new-tokens "${MAX_NEW_TOKENS:-512}" "$@"
}
# composite val: the first COMPOSITE_LIMIT records per task (long detection answers are slow on a CPU)
SETS=(ssdd:ssdd_test/stage2_test:ssdd/stage2_train composite:composite/stage2_val:composite/stage2_train
      soc:soc_test/stage2_val:soc/stage2_train)
limit() { [ "$1" = composite ] && echo "--limit ${COMPOSITE_LIMIT:-100}" || true; }
for m in ${EVAL_MODELS:-stage0det stage1 stage2}; do
  for s in "${SETS[@]}"; do
    IFS=: read -r name data train_data <<< "$s"
    # shellcheck disable=SC2046
    ev "${m}_$name" "$WORK/$m" "$WORK/data/$data.jsonl" "$WORK/data/$train_data.jsonl" $(limit "$name")
  done
done
for s in "${SETS[@]}"; do
  IFS=: read -r name data train_data <<< "$s"
  # shellcheck disable=SC2046
  ev "stage2_no_tlm_$name" "$WORK/stage2" "$WORK/data/$data.jsonl" "$WORK/data/$train_data.jsonl" --no-tlm \
    $(limit "$name")
  # CFAR answers detection, counting and grounding: none of the SOC test records (classification)
  [ "$name" = soc ] && continue
  # shellcheck disable=SC2046
  [ -f "$WORK/eval/cfar_$name/metrics.json" ] || step "eval_cfar_$name" "$BIN/fusarbatch" eval --engine cfar \
    --data "$WORK/data/$data.jsonl" --train-data "$WORK/data/$train_data.jsonl" --out "$WORK/eval/cfar_$name" \
    $(limit "$name")
done

# 5. the packaged model: LoRA merged into the stage-0 base, one self-contained folder
if [ "$EXPORT" = 1 ]; then
  step export "$BIN/python" -m training export --model "$WORK/stage2" --out fusarbatch/model/demo_model \
    --card training/DEMO_MODEL_CARD.md
fi
