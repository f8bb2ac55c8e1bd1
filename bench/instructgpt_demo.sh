#!/usr/bin/env bash
# The InstructGPT demonstration of docs/instructgpt.md, from pretraining to the last plot, on the built-in corpus.
# About 50 minutes on a 2-core CPU (49 min on 2026-12-02; docs/instructgpt.md has each step's time). Rerunning resumes or skips what is done (every stage resumes; finished files stay).
#   bash bench/instructgpt_demo.sh            # runs under runs/igpt, tables and plots to docs/instructgpt
#   ROOT=/tmp/igpt OUT=/tmp/igpt/report bash bench/instructgpt_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${ROOT:-runs/igpt}
OUT=${OUT:-docs/instructgpt}
mkdir -p "$ROOT" "$OUT"
TIMES="$ROOT/times.txt"
step() {  # step NAME COMMAND...: run it unless NAME is done, and record its wall time
    local name=$1; shift
    if [ -e "$ROOT/.done-$name" ]; then echo "== $name: done before"; return; fi
    echo "== $name: $*"
    local t0=$SECONDS
    "$@"
    echo "$name $((SECONDS - t0))" >> "$TIMES"
    touch "$ROOT/.done-$name"
}

# 1. pretraining: the main job, with a tenth of the corpus's files held out (304 held-out prompts of the code task
#    instead of 15 at the default 2%; pretraining never sees those files)
step pretrain python train.py data.val_fraction=0.1 run_dir="$ROOT/pretrain"
# 2. SFT on the code task's demonstrations (the real bodies of the training files' functions)
step sft python rlhf.py sft "$ROOT/pretrain" --data code --run-dir "$ROOT/sft" epochs=1
# 3. rankings: K=4 samples of 800 training prompts ranked by the 4 training labelers (round robin); every held-out
#    prompt's 4 samples ranked by all 6 labelers (round robin: each held-out prompt by one of them)
step rank python rlhf.py rank "$ROOT/sft" --out "$ROOT/rankings.jsonl" --n 800 --k 4
step rank-val python rlhf.py rank "$ROOT/sft" --out "$ROOT/val_rankings.jsonl" --split val --n 400 --k 4 \
    --labelers all
# 4. the reward model: one epoch (the paper's)
step reward python rlhf.py reward "$ROOT/sft" --data "$ROOT/rankings.jsonl" --val "$ROOT/val_rankings.jsonl" \
    --run-dir "$ROOT/reward" batch_size=32
# 5. PPO and PPO-ptx
PPO_ARGS=(iterations=16 prompts=32 minibatch=8 ppo_epochs=2 max_new_tokens=96 lr=1e-4 beta=0.02 eval_every=4
          eval_samples=1 sample_batch=32)
step ppo python rlhf.py ppo "$ROOT/sft" --reward "$ROOT/reward" --run-dir "$ROOT/ppo" "${PPO_ARGS[@]}"
step ppo-ptx python rlhf.py ppo "$ROOT/sft" --reward "$ROOT/reward" --run-dir "$ROOT/ppo-ptx" "${PPO_ARGS[@]}" \
    ptx_coef=1.0 ptx_batch=8
# 5b. a long low-beta PPO run: the PPO side of reward over-optimisation (Gao et al. 2022), far past PPO's KL above
step ppo-long python rlhf.py ppo "$ROOT/sft" --reward "$ROOT/reward" --run-dir "$ROOT/ppo-long" "${PPO_ARGS[@]}" \
    iterations=48 beta=0.002 eval_every=8
# 6. best-of-n: the no-RL baseline on the same axes
step bon python rlhf.py bon "$ROOT/sft" --reward "$ROOT/reward" --n 32 --prompts 64 --max-new-tokens 96 \
    --out "$ROOT/bon.json"
# 6b. DPO on the same rankings (beyond the paper), evaluated on PPO's axes against the same reward model
step dpo python rlhf.py dpo "$ROOT/sft" --data "$ROOT/rankings.jsonl" --val "$ROOT/val_rankings.jsonl" \
    --reward "$ROOT/reward" --run-dir "$ROOT/dpo" beta=0.1 optim.lr=1e-4 batch_size=32 eval_every=8 \
    max_new_tokens=96 sample_batch=32 eval_samples=1
# 7. the alignment tax: held-out bits per byte and the built-in zero/few-shot code tasks
for pair in pretrained:pretrain sft:sft ppo:ppo/policy ppo-ptx:ppo-ptx/policy; do
    name=${pair%%:*}; dir=${pair#*:}
    step "eval-$name" python eval.py "$ROOT/$dir" --tasks code-nextline,code-cloze --shots 0,5 --num-items 200 \
        --json "$ROOT/eval-$name.json"
done
# 8. the tables and plots
python bench/ppo_iteration.py --from-run "$ROOT/ppo" --out "$ROOT/ppo_timing.json"
python bench/ppo_iteration.py --from-run "$ROOT/ppo-ptx" --out "$ROOT/ppo_ptx_timing.json"
python rlhf.py report --out "$OUT" --reward "$ROOT/reward" --rank-report "$ROOT/val_rankings.jsonl.report.json" \
    --ppo PPO="$ROOT/ppo" --ppo PPO-ptx="$ROOT/ppo-ptx" --ppo "PPO, beta 0.002, 48 it."="$ROOT/ppo-long" \
    --ppo DPO="$ROOT/dpo" --bon "$ROOT/bon.json" \
    --eval pretrained="$ROOT/eval-pretrained.json" --eval SFT="$ROOT/eval-sft.json" \
    --eval PPO="$ROOT/eval-ppo.json" --eval PPO-ptx="$ROOT/eval-ppo-ptx.json"
python bench/calibrate_labelers.py "$ROOT/rankings.jsonl" --run "$ROOT/pretrain" | tee "$OUT/calibration.txt"
cp "$TIMES" "$OUT/times.txt"
cp "$ROOT/ppo_timing.json" "$ROOT/ppo_ptx_timing.json" "$OUT/"
echo "== the demonstration took $(awk '{s += $2} END {print s}' "$TIMES") s (per step: $TIMES)"
