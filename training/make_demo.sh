#!/usr/bin/env bash
# Rebuild the packaged demo model (fusarbatch/model/demo_model/) from the real SAR data, with the shipped
# commands only, and evaluate it. Wall times go to $WORK/times.tsv, logs to $WORK/*.log.
#
#   DATA=/work/shared/data WORK=out/demo_train training/make_demo.sh
#
# DATA holds ship_chips/, mstar_soc10/ and mstar_composite_detection/ (see their SOURCE.txt). The MSTAR data
# may not be committed: it is read from DATA. Set EXPORT=0 to leave the packaged model alone.
set -euo pipefail
DATA=${DATA:-/work/shared/data}
WORK=${WORK:-out/demo_train}
EXPORT=${EXPORT:-1}
BIN=${BIN:-.venv/bin}
export HF_HUB_OFFLINE=1
# One torch thread: on a shared 2-core machine two OpenMP threads per process oversubscribe the cores and a
# training step ran 6x slower (measured: 3.1 s vs 0.48 s per sample under load); uncontended, 2 threads are
# about 1.5x faster. Override with OMP_NUM_THREADS=2 on an idle machine.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$WORK"
: > "$WORK/times.tsv"

step() {  # step NAME COMMAND...: run, log, record the wall time
  local name=$1; shift
  local t0 t1
  t0=$(date +%s%N)
  "$@" > "$WORK/$name.log" 2>&1 || { echo "step $name failed, see $WORK/$name.log" >&2; tail -20 "$WORK/$name.log" >&2; exit 1; }
  t1=$(date +%s%N)
  printf '%s\t%d.%d\n' "$name" $(( (t1 - t0) / 1000000000 )) $(( (t1 - t0) / 100000000 % 10 )) | tee -a "$WORK/times.tsv"
}

# 1. the tiny base (random weights) and the triplet datasets
step base "$BIN/python" -m training base --out "$WORK/base" --preset demo --seed 0
if [ -f "$WORK/data/soc_test/stage2_val.jsonl" ]; then
  echo "datasets already in $WORK/data: not rebuilt (deterministic)" | tee -a "$WORK/times.tsv"
else
step data_ship "$BIN/python" -m training build "$DATA/ship_chips" --out "$WORK/data/ship" --augment dihedral
step data_composite "$BIN/python" -m training build "$DATA/mstar_composite_detection" --out "$WORK/data/composite" \
  --name mstar_composite --class-map "$DATA/mstar_soc10/classes.json"
step data_soc "$BIN/python" -m training build "$DATA/mstar_soc10" --out "$WORK/data/soc" --name mstar_soc10 \
  --max-per-class "${SOC_PER_CLASS:-70}" --split train
step data_soc_test "$BIN/python" -m training build "$DATA/mstar_soc10" --out "$WORK/data/soc_test" --name mstar_soc10 \
  --split val --task classification
fi

# 2. stage 1 (captions: TLM + LoRA) and stage 2 (tasks: LoRA; TLM frozen)
COMMON=(--base-model "$WORK/base" --batch-size 4 --grad-accum 1 --save-steps 200 --log-steps 10 --lr "${LR:-2e-3}")
step stage1 "$BIN/fusarbatch" train --stage 1 --out "$WORK/stage1" --epochs "${EPOCHS1:-1}" --tlm-zero-init "${COMMON[@]}" \
  --data "$WORK/data/ship/stage1_train.jsonl" --data "$WORK/data/composite/stage1_train.jsonl" \
  --data "$WORK/data/soc/stage1_train.jsonl"
step stage2 "$BIN/fusarbatch" train --stage 2 --init "$WORK/stage1" --out "$WORK/stage2" --epochs "${EPOCHS2:-1}" "${COMMON[@]}" \
  --data "$WORK/data/ship/stage2_train.jsonl" --data "$WORK/data/composite/stage2_train.jsonl" \
  --data "$WORK/data/soc/stage2_train.jsonl"

# 3. evaluation on the validation splits: MSTAR SOC test split (classification), composite val (all tasks)
SOC_VAL=(--data "$WORK/data/soc_test/stage2_val.jsonl" --batch-size 16)
COMP_VAL=(--data "$WORK/data/composite/stage2_val.jsonl" --batch-size 16)
for model in stage1 stage2; do
  step "eval_${model}_soc" "$BIN/fusarbatch" eval --model "$WORK/$model" --out "$WORK/$model/eval_soc" "${SOC_VAL[@]}"
  step "eval_${model}_composite" "$BIN/fusarbatch" eval --model "$WORK/$model" --out "$WORK/$model/eval_composite" \
    "${COMP_VAL[@]}"
done
step eval_stage2_no_tlm_soc "$BIN/fusarbatch" eval --model "$WORK/stage2" --no-tlm --out "$WORK/stage2/eval_no_tlm_soc" \
  "${SOC_VAL[@]}"
step eval_stage2_no_tlm_composite "$BIN/fusarbatch" eval --model "$WORK/stage2" --no-tlm \
  --out "$WORK/stage2/eval_no_tlm_composite" "${COMP_VAL[@]}"

# 4. the packaged model: LoRA merged into the base, one self-contained folder
if [ "$EXPORT" = 1 ]; then
  step export "$BIN/python" -m training export --model "$WORK/stage2" --out fusarbatch/model/demo_model \
    --card training/DEMO_MODEL_CARD.md
fi
