#!/bin/bash
# How default5_unseen_faces_demo/ was made (2026-12-02): the bundled model rendered six faces it
# never trained on with the bundled speech and a still pose, and benchmarks.demo_lipsync scored the
# mouth against the speech energy. The same renders (plus the astronaut and m0150) are now the demo
# loop of benchmarks/evaluate_model.sh, which reproduced these numbers:
cd "$(dirname "$0")/../../.." && bash benchmarks/evaluate_model.sh "" default5  # -> benchmarks/results/default5_demos/
