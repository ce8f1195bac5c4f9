"""Re-measures ``rt_engine.inputs.face.TEMPLATE_224`` on aligned VoxCeleb2 224x224 crops.

Usage: python scripts/measure_face_template.py [--shared ../shared] [--stride 5]

Runs ``FaceCropper.detect`` (mediapipe face mesh) on the PC-AVS demo crops (identity image,
Pose_Source and Mouth_Source frames) and on every ``--stride``-th frame of the VoxCeleb2 224x224
clips under train/pcavs, prints the mean keypoint positions (paste them into face.py) and compares
how well a scale+translation and a similarity (with rotation) map each frame's keypoints onto the
mean (residual in pixels): the VoxCeleb2 crops are not rotation-normalised.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import cv2
import numpy as np


def aligned_frames(shared: Path, stride: int):
    demo = shared / "data" / "demo" / "pcavs" / "misc"
    files = [demo / "Input_unz/Input/517600055/000000.jpg"]
    files += sorted((demo / "Pose_Source_unz/Pose_Source/517600078").glob("*.jpg"))
    files += sorted((demo / "Mouth_Source_unz/Mouth_Source/681600002").glob("*.jpg"))
    for f in files:
        yield f.name, cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
    for mp4 in sorted((shared / "data" / "train" / "pcavs").rglob("*.mp4")):
        cap = cv2.VideoCapture(str(mp4))
        k = 0
        while True:
            ok, fr = cap.read()
            if not ok:
                break
            if k % stride == 0 and fr.shape[:2] == (224, 224):
                yield f"{mp4.name}:{k}", cv2.cvtColor(fr, cv2.COLOR_BGR2RGB)
            k += 1


def measure(frames, cropper) -> tuple[np.ndarray, int, int]:
    """Keypoints [N,7,2] of the frames where a face was found, number tried, number missed."""
    pts, n, miss = [], 0, 0
    for _, img in frames:
        n += 1
        face = cropper.detect(img)
        if face is None:
            miss += 1
            continue
        pts.append(face.keypoints)
    return np.stack(pts), n, miss


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rt_engine.inputs.face import FaceCropper, fit_scale_translation, fit_similarity

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_shared = os.environ.get("RT_ENGINE_SHARED", str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--shared", default=default_shared)
    ap.add_argument("--stride", type=int, default=5)
    args = ap.parse_args()
    with FaceCropper() as cropper:
        kp, n, miss = measure(aligned_frames(Path(args.shared), args.stride), cropper)
    mean = kp.mean(0)  # [7,2]
    print(f"frames: {n}, no face: {miss}")
    print("TEMPLATE_224 = [")
    for x, y in mean:
        print(f"    [{x:.2f}, {y:.2f}],")
    print("]")
    print("per-keypoint std (px):", np.round(kp.std(0), 2).tolist())
    r_st, r_sim, scales, rots = [], [], [], []
    for p in kp:
        s, tx, ty = fit_scale_translation(p, mean)
        r_st.append(np.linalg.norm(s * p + [tx, ty] - mean, axis=1).mean())
        m = fit_similarity(p, mean)
        r_sim.append(np.linalg.norm(p @ m[:, :2].T + m[:, 2] - mean, axis=1).mean())
        scales.append(s)
        rots.append(np.degrees(np.arctan2(m[1, 0], m[0, 0])))
    print(f"mean residual scale+translation: {np.mean(r_st):.2f} px, similarity: {np.mean(r_sim):.2f} px")
    print(
        f"scale spread (std of s): {np.std(scales):.3f}; rotation needed: mean {np.mean(rots):.2f} deg, "
        f"std {np.std(rots):.2f} deg"
    )


if __name__ == "__main__":
    main()
