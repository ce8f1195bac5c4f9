#!/bin/bash
# How default5_unseen_faces_demo/ was made (2026-12-02): the bundled model renders faces it never
# trained on with the bundled speech and a still pose; benchmarks.demo_lipsync scores the mouth
# against the speech energy. Needs ../shared/data and runs/holdout_clips (python -m training.holdout).
cd "$(dirname "$0")/../../.."  # repository root
D=../shared/data
mkdir -p runs/unseen_demo  # result.json and lipsync.png of each were then copied here
declare -A IDS=(
 [vox_id05124]=$D/train/pcavs/misc/Input_unz/Input/512400353/000000.jpg
 [vox_id07494]=$D/train/pcavs/misc/Input_unz/Input/749400016/000000.jpg
 [vox_id05176]=$D/demo/pcavs/misc/Input_unz/Input/517600055/000000.jpg
 [kristi_noem]=$D/train/styletalk/samples/source_video/image/KristiNoem.png
 [vox_u00086]=runs/holdout_clips/m0132_00086.mp4
 [woman_news_blue]=runs/holdout_clips/m0259_4.mp4
)
for k in "${!IDS[@]}"; do
  python -m rt_engine.render --identity "${IDS[$k]}" --audio rt_engine/assets/speech.flac --pose still --save-raw runs/unseen_demo/$k.npz --out runs/unseen_demo/$k.mp4 > runs/unseen_demo/$k.log 2>&1 || { echo "$k render failed"; tail -2 runs/unseen_demo/$k.log; continue; }
  python -m benchmarks.demo_lipsync runs/unseen_demo/$k.npz rt_engine/assets/speech.flac --out runs/unseen_demo/$k 2>&1 | tail -1 | python -c "
import sys,json; l=sys.stdin.read(); j=json.loads(l[l.index('{'):]); av=j.get('av', {'corr': float('nan'), 'z': float('nan')}); print('$k', 'face %.0f%%'%(100*j['face_found']), 'corr %.2f z %.1f'%(av['corr'],av['z']), 'open p10-p90 %.3f-%.3f'%(j.get('mouth_open_p10', float('nan')),j.get('mouth_open_p90', float('nan'))))"
done
