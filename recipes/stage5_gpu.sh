#!/bin/bash
# Recipe of the stage-5 weights (docs/weights.md): on one GPU machine, make the training data in
# shards, fine-tune stage 4 in four arms at once (they share the GPU), export each. It ran once,
# on a lent H100 with 16 CPU cores:  END_S=535 OUT=<folder> bash recipes/stage5_gpu.sh
# Arm c_blend became stage 5 after held-out scoring on the CPU (bench/tune_fusion.py).
# Every step is guarded and the pack into $OUT runs whatever happened, because the run had one shot.
# Env: DEVICE (cuda), END_S (seconds after the start by which training must have stopped: the
# training budget is what the data left of it), NMIX/NSTEP shard sizes, NSH_MIX/NSH_STEP shard
# counts, W (work folder), OUT (where stage5.tgz goes), PRETRAINED (default: stage 4 from git).
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T0=$(date +%s)
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
END_S=${END_S:-530}
NMIX=${NMIX:-500}; NSH_MIX=${NSH_MIX:-8}
NSTEP=${NSTEP:-215}; NSH_STEP=${NSH_STEP:-7}
NVAL=${NVAL:-48}
W=${W:-/tmp/s5}
OUT=${OUT:-/tmp/s5out}
mkdir -p "$W/data" "$W/exp" "$W/logs" "$OUT"
log() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

pack() {
    log "packing"
    tar -czf "$OUT/stage5.tgz" -C "$W" exp logs $(cd "$W" && ls -d runs/*/*.csv runs/*/*.json 2>/dev/null) 2>/dev/null
    ls -la "$W/exp" "$OUT"
}
trap pack EXIT

nvidia-smi -L 2>/dev/null; $PY -c "import torch, cv2, skimage; print('torch', torch.__version__, torch.cuda.is_available())"
git log --oneline -1
PRETRAINED=${PRETRAINED:-$W/stage4.pth}
[ -f "$PRETRAINED" ] || git show 2ee17a5:weights/stackmffv2_synthetic.pth > "$PRETRAINED"
sha256sum "$PRETRAINED"   # stage 4: 64c5373bb685bc526da5042841d22eaef31a3eeb90e49fe6c2ef5263b5534ba1

# --- data (scene i depends only on the seed and i, so shards of --first make the recipe's sets) ---
gen() { $PY make_datasets/make_synthetic.py --size 256 --min_slices 4 --max_slices 16 --seed 0 "$@"; }
train_sets=()
for k in $(seq 0 $((NSH_MIX - 1))); do
    gen --output_dir "$W/data/mix$k" --num_stacks $NMIX --first $((k * NMIX)) --blur mixed \
        > "$W/logs/gen_mix$k.log" 2>&1 &
    train_sets+=(--train_dataset "$W/data/mix$k/image_stacks" "$W/data/mix$k/depth_maps")
done
for k in $(seq 0 $((NSH_STEP - 1))); do
    gen --output_dir "$W/data/steps$k" --num_stacks $NSTEP --first $((200000 + k * 50000)) --blur physical \
        --min_step_share 0.1 > "$W/logs/gen_steps$k.log" 2>&1 &
    train_sets+=(--train_dataset "$W/data/steps$k/image_stacks" "$W/data/steps$k/depth_maps")
done
gen --output_dir "$W/data/val" --num_stacks $NVAL --first 100000 --blur mixed > "$W/logs/gen_val.log" 2>&1 &
wait
log "data made: $(ls -d $W/data/*/image_stacks/* | wc -l) stacks"
tail -n 2 "$W"/logs/gen_*.log | grep -i -E "error|Traceback" && log "a shard failed"

# --- four arms from stage 4, each with the card's blend in the objective ---
# (the card flags --views ... --depth_window give both the blend the fusion term scores and the exported card)
left=$(( END_S - ($(date +%s) - T0) ))
minutes=$($PY -c "print(max(0.2, ($left - 25) / 60))")
log "training budget $minutes min per arm"
common=(--val_dataset "$W/data/val/image_stacks" "$W/data/val/depth_maps"
        --training_image_size 256 --crop 192 --rotate --all_in_focus --batch_size 8 --num_epochs 100
        --lr 1e-4 --lr_schedule cosine --max_minutes "$minutes" --loss mse+ce
        --pretrained "$PRETRAINED" --num_workers 3 --num_threads 1 --max_val_batches 8
        --no-keep_epoch_checkpoints --save_dir "$W/runs" --device "$DEVICE"
        --views 4 --fusion_temperature 1 --focus_prior 4 --depth_window 1.5)
arm() {  # name seed extra-flags...
    local name=$1 seed=$2; shift 2
    $PY train.py "${train_sets[@]}" "${common[@]}" --save_name "$name" --seed "$seed" \
        --export "$W/exp/$name.pth" "$@" > "$W/logs/$name.log" 2>&1 &
}
arm a_more 11 --ce_weight 0.3 --fusion_weight 30
arm b_sharpest 12 --ce_weight 0.3 --fusion_weight 30 --ce_target sharpest
arm c_blend 13 --ce_weight 0.1 --fusion_weight 100
arm d_distance 14 --ce_weight 0.3 --fusion_weight 30 --distance_weight 1
sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv 2>/dev/null; uptime
wait
log "training done"
for f in "$W"/logs/[a-d]_*.log; do echo "== $f"; grep -E "^epoch|exported|budget|rror" "$f" | tail -n 6; done
