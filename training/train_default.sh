#!/usr/bin/env bash
# Train the bundled default model end to end: preprocess ../shared/data, then the three stages.
# Every step is resumable: rerun this script to continue where it stopped (Ctrl-C / kill saves).
#   JOINT_STEPS=20000 bash training/train_default.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SHARED=${RT_ENGINE_SHARED:-../shared}
C=training/configs
python -m training.preprocess --csv "$SHARED/data/train.csv" --out runs/data/train --workers "${WORKERS:-1}"
python -m training.train --config $C/default_common.yaml --config $C/default_identity.yaml
python -m training.train --config $C/default_common.yaml --config $C/default_content.yaml
python -m training.train --config $C/default_common.yaml --config $C/default_joint.yaml --steps "${JOINT_STEPS:-100000}"
