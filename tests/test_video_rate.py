"""The one 25 fps rule: output frame k is the last source frame at or before k/25 s."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from rt_engine.errors import InputError
from rt_engine.inputs.pose import iter_video, read_video


def write_video(path, n: int, fps: int) -> None:
    """n frames at ``fps``, frame j filled with value 10*j (so the decoded frame index is readable)."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        s.time_base = Fraction(1, fps)
        s.codec_context.options = {"qscale": "1"}
        for j in range(n):
            f = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 * j, np.uint8), format="rgb24")
            f.pts = j
            for pkt in s.encode(f):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def source_index(frames: np.ndarray) -> list[int]:
    return [int(round(float(f.mean()) / 10)) for f in frames]


@pytest.mark.parametrize("src_fps", [30, 20, 25])
def test_nearest_earlier_frame(tmp_path, src_fps):
    write_video(tmp_path / "v.mp4", 24, src_fps)
    got = source_index(read_video(tmp_path / "v.mp4"))
    t_last = 23 / src_fps
    want = [int(np.floor(k / 25 * src_fps + 1e-6)) for k in range(int(np.floor(t_last * 25 + 1e-6)) + 1)]
    assert got == want


def test_lazy_and_capped(tmp_path):
    write_video(tmp_path / "v.mp4", 24, 30)
    it = iter_video(tmp_path / "v.mp4", max_frames=5)
    assert source_index(np.stack(list(it))) == source_index(read_video(tmp_path / "v.mp4"))[:5]


def test_bad_video(tmp_path):
    (tmp_path / "x.mp4").write_bytes(b"junk" * 50)
    with pytest.raises(InputError, match="x.mp4"):
        read_video(tmp_path / "x.mp4")


def test_quality_uses_the_same_decoder(tmp_path):
    from benchmarks import quality

    write_video(tmp_path / "v.mp4", 24, 30)
    frames = np.stack(list(quality._video_frames_25fps(tmp_path / "v.mp4", None)))
    assert source_index(frames) == source_index(read_video(tmp_path / "v.mp4"))
