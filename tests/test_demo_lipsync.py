"""benchmarks.demo_lipsync: picking the most closed, most open and most turned frames of a demo."""

import numpy as np

from benchmarks.demo_lipsync import closed_open_sheet, look, look_row, pick_extremes, pick_look, yaw_proxy


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


def _face(nose_dx: float = 0.0, roll_deg: float = 0.0, scale: float = 1.0, shift=(0.0, 0.0)) -> np.ndarray:
    """Synthetic 68 points: outer eye corners 36/45 64 px apart, nose tip 30 below their midpoint,
    moved ``nose_dx`` px along the eye axis; then rolled, scaled and shifted. -> [68,2]"""
    lm = np.full((68, 2), 112.0)
    lm[36], lm[45], lm[30] = (80, 100), (144, 100), (112 + nose_dx, 130)
    r = np.deg2rad(roll_deg)
    rot = np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])
    return (lm - 112) @ rot.T * scale + 112 + np.asarray(shift)


def test_yaw_proxy_frontal_shifted_and_robust_to_roll_scale_and_position():
    lm = np.stack(
        [_face(), _face(16), _face(-16), _face(16, roll_deg=25, scale=0.7, shift=(9, -5)), np.full((68, 2), np.nan)]
    )
    yaw = yaw_proxy(lm)
    assert abs(yaw[0]) < 1e-12
    np.testing.assert_allclose(yaw[1:4], [0.25, -0.25, 0.25], atol=1e-9)
    assert np.isnan(yaw[4])


def test_pick_look_spaces_the_turned_frame_away_from_the_mouth_picks():
    mouth = np.full(40, 0.03)
    mouth[10], mouth[30] = 0.01, 0.12
    mouth[0] = np.nan  # no face: never picked, though its yaw would be the largest
    yaw = np.zeros(40)
    yaw[0], yaw[31], yaw[20] = 0.9, 0.5, -0.3  # frame 31 is too close to the open frame
    assert pick_look(mouth, yaw, gap=5) == {"closed": 10, "open": 30, "turned": 20}
    assert pick_look(np.full(3, np.nan), np.full(3, np.nan)) == {"closed": None, "open": None, "turned": None}


def test_look_row_photo_then_picked_frames_and_a_black_cell_without_a_face():
    frames = np.zeros((6, 48, 48, 3), np.uint8)
    frames[..., 1] = np.arange(6)[:, None, None] * 40  # frame k is green level 40k
    photo = np.full((100, 80, 3), 200, np.uint8)  # any size: resized to the frame size
    row = look_row(photo, frames, [(1, "closed"), (5, "open"), (None, "turned: no face")])
    assert row.shape == (48, 4 * 48, 3) and row.dtype == np.uint8
    bottom = row[40:]  # below the captions
    assert (bottom[:, :48] == 200).all()
    assert (bottom[:, 48:96, 1] == 40).all() and (bottom[:, 96:144, 1] == 200).all()
    assert bottom[:, 144:].max() == 0
    assert look_row(photo, frames, [(2, "x")], size=32).shape == (32, 64, 3)


def test_look_records_picks_with_video_frame_times():
    mouth = np.array([0.02, 0.01, 0.03, 0.02, 0.02, 0.02, 0.09, 0.02])
    yaw = np.array([0, 0, 0, 0.2, 0, 0, 0, 0.0])
    frame_inds = np.arange(8) + 2  # render's first target frame is 2
    res, cells = look(np.zeros((8, 8, 8, 3), np.uint8), frame_inds, mouth, yaw)
    assert [i for i, _ in cells] == [res["closed"]["index"], res["open"]["index"], res["turned"]["index"]]
    assert res["open"] == {"index": 6, "frame": 8, "t": 0.32, "mouth": 0.09, "yaw": 0.0}
    assert res["closed"]["index"] == 1 and cells[2][1].startswith("turned")
