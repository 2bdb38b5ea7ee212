"""MP4 video for robot datasets with PyAV: sequential segment decoding, a byte-bounded LRU, a streaming encoder.

PyAV's wheel bundles FFmpeg with dav1d (AV1 decoding), SVT-AV1 (`libsvtav1`, AV1 encoding, LeRobot's default)
and x264; no system FFmpeg and no torchvision are needed.

Usage:

    import numpy as np
    from training.video_io import VideoStreamWriter, decode_segment
    w = VideoStreamWriter("cam.mp4", fps=10, width=64, height=64)
    for i in range(20):
        w.write(np.full((64, 64, 3), 10 * i, np.uint8))
    w.close()                                  # cam.mp4 appears only now (written as cam.mp4.partial first)
    seg = decode_segment("cam.mp4", 0.5, 1.4)  # seg.timestamps (10,) seconds, seg.frames 10 x (64, 64, 3) uint8
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DecodedSegment",
    "LRUCache",
    "VideoStreamWriter",
    "decode_segment",
    "default_av1_codec",
    "probe_video",
]

# SVT-AV1 prints a banner and warnings to stderr for every encoder it opens; keep errors only.
os.environ.setdefault("SVT_LOG", "1")


def _av():
    import av  # imported lazily: a dataset of images in parquet needs no PyAV

    return av


_LOCAL = threading.local()


def _reformatter():
    """One swscale context per thread and process, reused across frames, single-threaded.

    A frame's own `to_ndarray(format=...)` builds a new context (with its own slice-thread pool) every call,
    5x the cost of the conversion itself here (0.30 vs 0.05 ms per 256 x 256 frame). Keyed by process id and
    run with `threads=1`: a context inherited through fork (a DataLoader worker) would wait forever on the
    parent's worker threads, which do not exist in the child.
    """
    if getattr(_LOCAL, "pid", None) != os.getpid():
        from av.video.reformatter import VideoReformatter

        _LOCAL.reformatter, _LOCAL.pid = VideoReformatter(), os.getpid()
    return _LOCAL.reformatter


def default_av1_codec() -> str:
    """ "libsvtav1" (LeRobot's default encoder) where PyAV's FFmpeg has it, else "libaom-av1", else "h264"."""
    av = _av()
    for name in ("libsvtav1", "libaom-av1", "libx264"):
        try:
            av.codec.Codec(name, "w")
        except Exception:
            continue
        return "h264" if name == "libx264" else name
    return "h264"


@dataclass
class DecodedSegment:
    """Frames decoded from one time range of one video file."""

    timestamps: np.ndarray  # (N,) float64 seconds in the file's time line, increasing
    frames: list[np.ndarray]  # N arrays (H, W, 3) uint8 RGB (a list: stacking them cost more than decoding)

    @property
    def nbytes(self) -> int:
        return int(sum(f.nbytes for f in self.frames) + self.timestamps.nbytes)

    def lookup(self, t: np.ndarray | float, tolerance_s: float) -> np.ndarray:
        """Indices of the frames nearest to times `t` (seconds); a time farther than `tolerance_s` from every
        decoded frame raises ValueError (LeRobot's check: frame timestamps must match the parquet's)."""
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        if len(self.timestamps) == 0:
            raise ValueError(f"no frame decoded near t = {t.tolist()} s")
        pos = np.clip(np.searchsorted(self.timestamps, t), 1, max(len(self.timestamps) - 1, 1))
        left = self.timestamps[pos - 1]
        right = self.timestamps[np.minimum(pos, len(self.timestamps) - 1)]
        idx = np.where(
            np.abs(t - left) <= np.abs(right - t), pos - 1, np.minimum(pos, len(self.timestamps) - 1)
        )
        err = np.abs(self.timestamps[idx] - t)
        if (err > tolerance_s).any():
            bad = int(np.argmax(err))
            raise ValueError(
                f"the decoded frame nearest to t = {t[bad]:.6f} s is {err[bad]:.6f} s away "
                f"(tolerance_s = {tolerance_s}); decoded {len(self.timestamps)} frames in "
                f"[{self.timestamps[0]:.4f}, {self.timestamps[-1]:.4f}] s"
            )
        return idx


_INHERITED: list = []  # containers a forked process inherited: never used, never freed


class OpenVideos:
    """Per-process LRU of open video files (demuxer + decoder), so repeated reads of one file skip the open and
    the decoder start-up (1.9 vs 3.4 ms per random single-frame read here). Keyed by process id: a container
    inherited through fork is never used."""

    def __init__(self, max_open: int = 8, threads: int = 1):
        self.max_open, self.threads = max_open, threads
        self._open: OrderedDict[str, Any] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:  # pickled into spawned workers: open files do not travel
        return {"max_open": self.max_open, "threads": self.threads, "_open": OrderedDict(), "_pid": None}

    def get(self, path: str | os.PathLike):
        if self._pid != os.getpid():
            # A forked copy: the parent's decoders are not ours to use, nor to free (freeing one could wait on
            # decoder threads that exist only in the parent), so they are parked for the life of the process.
            _INHERITED.extend(self._open.values())
            self._open, self._pid = OrderedDict(), os.getpid()
        key = str(path)
        container = self._open.get(key)
        if container is None:
            container = _av().open(key)
            stream = container.streams.video[0]
            stream.thread_count = self.threads
            stream.thread_type = "AUTO" if self.threads > 1 else "SLICE"
            self._open[key] = container
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)[1].close()
        self._open.move_to_end(key)
        return container

    def drop(self, path: str | os.PathLike) -> None:
        container = self._open.pop(str(path), None)
        if container is not None:
            container.close()

    def close(self) -> None:
        for container in self._open.values():
            container.close()
        self._open.clear()


def decode_segment(
    path: str | os.PathLike,
    start_s: float,
    end_s: float,
    size: int | None = None,
    margin_s: float = 1e-3,
    threads: int = 1,
    videos: OpenVideos | None = None,
) -> DecodedSegment:
    """Decode every frame with start_s - margin_s <= t <= end_s + margin_s, in one seek and one forward pass.

    Seeks to the last keyframe at or before `start_s` (LeRobot's AV1 files have one every 2 frames) and decodes
    forward; frames are converted to RGB (and resized to size x size when `size` is given) by FFmpeg's swscale.
    `threads` decoder threads (1 suits DataLoader workers, which already use the cores). With `videos`, the
    file is taken from (and left open in) that pool instead of being opened and closed here.
    """
    if videos is None:
        with _av().open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_count = threads
            stream.thread_type = "AUTO" if threads > 1 else "SLICE"
            return _decode(container, start_s, end_s, size, margin_s, always_seek=False)
    try:
        return _decode(videos.get(path), start_s, end_s, size, margin_s, always_seek=True)
    except Exception:
        videos.drop(path)  # a failed read leaves no half-used decoder behind
        raise


def _decode(container, start_s: float, end_s: float, size: int | None, margin_s: float, always_seek: bool):
    stream = container.streams.video[0]
    tb = stream.time_base
    frames: list[np.ndarray] = []
    times: list[float] = []
    reformat = _reformatter()
    if always_seek or start_s > margin_s:  # seeking flushes the decoder, so a reused container starts clean
        container.seek(max(int((start_s - margin_s) / tb), 0), stream=stream, backward=True, any_frame=False)
    for frame in container.decode(stream):
        if frame.pts is None:
            continue
        t = float(frame.pts * tb)
        if t < start_s - margin_s:
            continue
        if t > end_s + margin_s:
            break
        if size is None:
            rgb = reformat.reformat(frame, format="rgb24", threads=1)
        else:
            rgb = reformat.reformat(
                frame, format="rgb24", width=size, height=size, interpolation="BILINEAR", threads=1
            )
        frames.append(rgb.to_ndarray())
        times.append(t)
    return DecodedSegment(np.asarray(times, np.float64), frames)


def probe_video(path: str | os.PathLike) -> dict[str, Any]:
    """Demux (without decoding) a video file: codec, size, fps and the last packet time, so a truncated or
    unreadable file is found before training. Raises ValueError naming the file."""
    av = _av()
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: video file missing")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream")
            stream = container.streams.video[0]
            tb = stream.time_base
            last = -np.inf
            packets = 0
            for packet in container.demux(stream):
                if packet.pts is None or packet.size == 0:
                    continue
                packets += 1
                last = max(last, float(packet.pts * tb))
            info = {
                "codec": stream.codec_context.name,
                "width": stream.codec_context.width,
                "height": stream.codec_context.height,
                "fps": float(stream.average_rate or stream.base_rate or 0),
                "last_frame_s": last,
                "packets": packets,
            }
    except ValueError:
        raise
    except Exception as e:  # av.error.InvalidDataError and friends: the file is damaged
        raise ValueError(f"{path}: cannot be read as video ({type(e).__name__}: {e})") from None
    if packets == 0:
        raise ValueError(f"{path}: video stream holds no frames")
    return info


class LRUCache:
    """A least-recently-used map bounded by the total `nbytes` of its values (each worker process has its own)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Any) -> Any | None:
        entry = self._items.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return entry[0]

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        """Insert `value`; the oldest entries leave until the total fits (the newest always stays)."""
        if key in self._items:
            return
        self._items[key] = (value, int(nbytes))
        self._bytes += int(nbytes)
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, (_, size) = self._items.popitem(last=False)
            self._bytes -= size

    def __len__(self) -> int:
        return len(self._items)


class VideoStreamWriter:
    """One MP4 stream appended frame by frame (episodes follow each other in one file, as in LeRobot v3).

    Frame n gets pts n / fps exactly. The file is written as `<path>.partial` and renamed on `close()`.
    Default encoder settings are LeRobot's: yuv420p, a keyframe every 2 frames (`g=2`, cheap seeks), CRF 30,
    SVT-AV1 preset 12.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: int,
        width: int,
        height: int,
        codec: str = "libsvtav1",
        crf: int = 30,
        gop: int = 2,
        pix_fmt: str = "yuv420p",
    ):
        av = _av()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.fps, self.width, self.height, self.codec = int(fps), int(width), int(height), codec
        options = {"g": str(gop), "crf": str(crf)}
        if codec == "libsvtav1":
            options["preset"] = "12"
        elif codec in ("h264", "libx264"):
            options["preset"] = "veryfast"
        self._container = av.open(str(self.tmp), "w", format="mp4")
        self._stream = self._container.add_stream(codec, rate=self.fps, options=options)
        self._stream.width, self._stream.height, self._stream.pix_fmt = self.width, self.height, pix_fmt
        self._tb = Fraction(1, self.fps)
        self.frames = 0
        self.options = {"video.g": gop, "video.crf": crf, "video.pix_fmt": pix_fmt}

    @property
    def duration_s(self) -> float:
        """Seconds written so far: frames / fps (the next frame's timestamp)."""
        return self.frames / self.fps

    def bytes_written(self) -> int:
        return self.tmp.stat().st_size if self.tmp.exists() else 0

    def write(self, rgb: np.ndarray) -> None:
        """Append one (height, width, 3) uint8 RGB frame."""
        av = _av()
        if rgb.shape != (self.height, self.width, 3) or rgb.dtype != np.uint8:
            raise ValueError(
                f"{self.path}: frame must be ({self.height}, {self.width}, 3) uint8, got {rgb.shape} {rgb.dtype}"
            )
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts, frame.time_base = self.frames, self._tb
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> Path:
        """Flush the encoder, close the file and move it into place."""
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        os.replace(self.tmp, self.path)
        return self.path
