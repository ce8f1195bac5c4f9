"""benchmarks.demo_lipsync: picking the most closed and most open frames of a demo."""

import numpy as np

from benchmarks.demo_lipsync import closed_open_sheet, pick_extremes


def test_pick_extremes_spaced_and_ignoring_frames_without_a_face():
    t = np.arange(100)
    mouth = 0.05 + 0.03 * np.sin(2 * np.pi * t / 20)  # opens at 5, 25, 45 ..., closes at 15, 35, ...
    mouth[35] = np.nan  # no face at one closed peak
    closed, opened = pick_extremes(mouth, n=4, gap=5)
    assert len(closed) == len(opened) == 4 and 35 not in closed
    assert all(np.diff(closed) >= 5) and all(np.diff(opened) >= 5)
    assert all(i % 20 == 5 for i in opened) and closed == [15, 55, 75, 95]
    assert max(mouth[closed]) < min(mouth[opened])


def test_sheet_has_two_rows_and_pads_when_few_faces(tmp_path):
    import cv2

    frames = np.zeros((12, 64, 64, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(12)[:, None, None] * 20  # frame k is red level 20k
    mouth = np.full(12, np.nan)
    mouth[[2, 9]] = [0.01, 0.09]
    closed_open_sheet(tmp_path / "s.png", frames, mouth, n=3, size=32)
    img = cv2.imread(str(tmp_path / "s.png"))[..., ::-1]  # RGB
    assert img.shape == (64, 96, 3)
    # only two frames have a face: each row shows both in time order, then a black cell
    for row in (0, 32):
        assert img[row + 28, 2, 0] == 40 and img[row + 28, 34, 0] == 180
        assert img[row + 20 : row + 32, 64:].max() == 0
