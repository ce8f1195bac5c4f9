#!/usr/bin/env bash
# Every measurement of rt_engine/assets/default_model.md for one model, in one go (about 15 CPU
# minutes on 2 cores). Needs ../shared/data and the held-out clips in runs/holdout_clips
# (python -m training.holdout); trained identities in runs/seen_clips if present (python -m
# training.holdout ../shared/data/train.csv runs/seen_clips --ids m0080,m0134,m0152,m0397). Run from the repository root:
#   bash benchmarks/evaluate_model.sh CHECKPOINT TAG      # results in benchmarks/results/TAG_*
# CHECKPOINT "" means the bundled model. Extra render flags (e.g. --mouth-gain 1.5) go in $RENDER_FLAGS.
set -euo pipefail
CK=${1?checkpoint (.safetensors, or "" for the bundled model)}
TAG=${2:?tag for the result folders}
R=benchmarks/results
D=../shared/data
CKA=()
if [ -n "$CK" ]; then CKA=(--checkpoint "$CK"); fi
# shellcheck disable=SC2206
RF=(${RENDER_FLAGS:-})
Q=(python -m benchmarks.quality "${CKA[@]}" "${RF[@]}" -q)

# ground truth: held-out identities (the test), the unseen demo clip (the choice), trained identities
"${Q[@]}" --clips runs/holdout_clips --out $R/${TAG}_holdout_200 --max-frames 200 --methods model,fixed_pose,still
"${Q[@]}" --clips runs/holdout_clips --out $R/${TAG}_holdout_full --methods model,fixed_pose,still,true_opening
"${Q[@]}" --clips $D/demo.csv --out $R/${TAG}_unseen_demo_clip --methods model,fixed_pose,still
# the opening sweep needs a model with the opening channel (model.warp_open); any other failure stops
has_opening=0
python -c 'import sys; from rt_engine.models.checkpoint import load_checkpoint
sys.exit(0 if load_checkpoint(sys.argv[1] or None).cfg.has_opening else 3)' "$CK" || has_opening=$?
case $has_opening in
  0) PAIRS=()  # the training-pair fit needs the training cache with mouth labels
     if [ -d runs/data/train ]; then PAIRS=(--pairs runs/data/train); fi
     python -m benchmarks.opening_response "${CKA[@]}" "${PAIRS[@]}" --clips runs/holdout_clips \
       --out $R/${TAG}_opening_response -q ;;
  3) echo "opening_response skipped: the model has no opening channel (model.warp_open)" ;;
  *) exit "$has_opening" ;;
esac
if [ -d runs/seen_clips ]; then
  "${Q[@]}" --clips runs/seen_clips --out $R/${TAG}_seen --max-frames 60 --methods model,fixed_pose,still
fi

# rendered demos with the bundled speech, no ground truth: the mouth against the speech energy
mkdir -p runs/eval_$TAG
declare -A IDS=(
 [astronaut]=rt_engine/assets/identity.jpg
 [m0150]=runs/holdout_clips/m0150_731200067.mp4
 [vox_id05124]=$D/train/pcavs/misc/Input_unz/Input/512400353/000000.jpg
 [vox_id07494]=$D/train/pcavs/misc/Input_unz/Input/749400016/000000.jpg
 [vox_id05176]=$D/demo/pcavs/misc/Input_unz/Input/517600055/000000.jpg
 [kristi_noem]=$D/train/styletalk/samples/source_video/image/KristiNoem.png
 [vox_u00086]=runs/holdout_clips/m0132_00086.mp4
 [woman_news_blue]=runs/holdout_clips/m0259_4.mp4
)
for k in astronaut m0150 vox_id05124 vox_id07494 vox_id05176 kristi_noem vox_u00086 woman_news_blue; do
  flags=(--pose still)
  case $k in astronaut|m0150) flags+=(--aligned) ;; esac  # already aligned crops: no re-detection
  python -m rt_engine.render --identity "${IDS[$k]}" --audio rt_engine/assets/speech.flac "${flags[@]}" \
    "${CKA[@]}" "${RF[@]}" --save-raw runs/eval_$TAG/$k.npz --out runs/eval_$TAG/$k.mp4 -q
  python -m benchmarks.demo_lipsync runs/eval_$TAG/$k.npz rt_engine/assets/speech.flac --out runs/eval_$TAG/$k
  # the numbers go into the repository; the pictures stay in runs/ (no binaries in git)
  mkdir -p $R/${TAG}_demos
  cp runs/eval_$TAG/$k/result.json $R/${TAG}_demos/$k.json
done
python - "$R/${TAG}_demos" <<'PY'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    j = json.loads(f.read_text())
    av = j.get("av") or {}
    print(f"{f.stem:16s} face {100 * j['face_found']:5.1f}%  corr {av.get('corr', float('nan')):5.2f}  "
          f"z {av.get('z', float('nan')):4.1f}  open p10-p90 {j.get('mouth_open_p10', float('nan')):.3f}-"
          f"{j.get('mouth_open_p90', float('nan')):.3f}")
PY
