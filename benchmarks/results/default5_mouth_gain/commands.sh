#!/usr/bin/env bash
# The bundled model at several mouth gains (2026-12-02). Run from the repository root, with the
# held-out clips in runs/holdout_clips (see rt_engine/assets/default_model.md) and ../shared/data.
set -euo pipefail
D=benchmarks/results/default5_mouth_gain
# 1. choose: the unseen demo clip (not training data, not the held-out test clips)
for g in 1.25 1.5 1.75 2; do
  python -m benchmarks.quality --clips ../shared/data/demo.csv --out $D/unseen_demo_clip_g$g \
    --methods model --mouth-gain $g -q
done
# 2. test: the held-out clips at the gain step 1 picked, 200 frames per clip
python -m benchmarks.quality --clips runs/holdout_clips --out $D/holdout_200_g1.5 --max-frames 200 \
  --methods model,fixed_pose --mouth-gain 1.5 -q
# 3. the bundled demo at that gain
python -m rt_engine.render --identity rt_engine/assets/identity.jpg --audio rt_engine/assets/speech.flac \
  --aligned --pose still --mouth-gain 1.5 --save-raw runs/demo5_g1.5.npz --out runs/demo5_g1.5.mp4 -q
python -m benchmarks.demo_lipsync runs/demo5_g1.5.npz rt_engine/assets/speech.flac --out $D/demo_lipsync_g1.5
