"""What a file really is, decided from its bytes: never from its name or its claimed type.

``inspect_media`` sniffs the leading bytes, then hands the file to the one decoder meant for that
format — Pillow for PNG/JPEG/WebP/GIF, PyAV (ffmpeg) for audio and video with the demuxer
*forced* — and makes it decode real data, so a truncated or disguised file is refused. Every
failure is a ``MediaError`` whose ``code`` a caller can map to a field error and whose
``message`` can be shown to the user as is:

- ``empty_file``: no bytes at all.
- ``unsupported_file_type``: not one of the formats we accept (text, HTML, PDF, zip, BMP, TIFF,
  HEIC/AVIF, AVI, ...), whatever its name says.
- ``unreadable_file``: starts like a format we accept but does not decode (truncated, corrupt,
  garbage after a valid header), has no audio or video in it, or has no measurable duration.
- ``image_too_large``: more pixels than ``max_pixels`` (an image, or the frames of a video);
  decided from the header, before anything is decoded.

Why the demuxer is forced rather than probed: ffmpeg's probing accepts far more than media. A
text file named ``*.txt`` opens as the ``tty`` demuxer, a 640x400 "video" two minutes long; an
``#EXTM3U`` file opens as HLS and makes ffmpeg fetch the URLs listed in it (SSRF); ``.srt`` opens
as subtitles; a ``ffconcat`` script asks to read local files. We only ever name the demuxer that
matches the magic bytes, and always give PyAV a Python file object, never a path or URL.

Images: only the first frame of an animated GIF/WebP is decoded (enough to refuse a disguised
or truncated file; bounded cost). An image whose pixel data decodes fully but has trailing bytes
(a PNG followed by HTML) is reported as what it decodes as: ``image/png``. Serving uploads with a
fixed ``Content-Type``, ``X-Content-Type-Options: nosniff`` and ``Content-Disposition`` is what
keeps such a polyglot harmless.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import wave
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO

import av
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image

logger = logging.getLogger(__name__)

# PyAV >= 13 ignores ffmpeg's log output unless ``av.logging.set_level`` is called, so decoding
# junk prints nothing; the level is process-wide and deliberately left alone here.

KIND_IMAGE = "image"
KIND_AUDIO = "audio"
KIND_VIDEO = "video"

ACCEPTED_HINT = (
    "Upload a PNG, JPEG, WebP or GIF image, a WAV, MP3, OGG, FLAC, WebM or M4A audio file, "
    "or a WebM or MP4 video."
)

# Pillow format name -> MIME type. MPO is how Pillow names a JPEG carrying extra pictures
# (many phone cameras write them); it is a JPEG to every browser and provider.
_IMAGE_MIME = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
}
_PIL_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")

# ISO-BMFF major brands that are still images (HEIF/AVIF/JPEG XL), not mp4 video: ffmpeg's mov
# demuxer would happily read some of them as a one-frame "video".
_IMAGE_BRANDS = frozenset(
    {b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}
    | {b"jxl ", b"crx "}
)
# First box of an ISO-BMFF / QuickTime file (old QuickTime files need not start with ftyp).
_MOV_FIRST_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"})

_WEBM_VIDEO_CODECS = frozenset({"vp8", "vp9", "av1"})
_WEBM_AUDIO_CODECS = frozenset({"opus", "vorbis"})

# Demuxing (not decoding) every packet to measure the duration costs about two microseconds per
# packet. A million packets is five hours of Opus in 20 ms packets, far beyond any real upload;
# a crafted file of tiny packets is refused after about two seconds instead of burning a worker.
_MAX_SCANNED_PACKETS = 1_000_000
# In-memory part of the copy made of a non-seekable (or mid-stream) file object.
_SPOOL_BYTES = 8 * 1024 * 1024
_HEAD_BYTES = 64

_AV_LABELS = {
    "wav": "a WAV file",
    "ogg": "an OGG file",
    "flac": "a FLAC file",
    "matroska": "a WebM/Matroska file",
    "mov": "an MP4/MOV file",
    "mp3": "an MP3 file",
}


@dataclass(frozen=True)
class MediaInfo:
    mime: str
    kind: str  # "image" | "audio" | "video"
    width: int | None
    height: int | None
    duration_ms: int | None  # audio and video only


class MediaError(Exception):
    """A file refused by ``inspect_media``; ``message`` is written for the end user."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"MediaError({self.code!r}, {self.message!r})"


def _unsupported() -> MediaError:
    return MediaError(
        "unsupported_file_type",
        f"This file is not an image, audio or video format we accept. {ACCEPTED_HINT}",
    )


def _unreadable(label: str, reason: str = "") -> MediaError:
    what = reason or "it may be damaged or incomplete"
    return MediaError(
        "unreadable_file",
        f"This file looks like {label} but could not be read: {what}. "
        "Export or download it again, then upload the new copy.",
    )


def _too_large(width: int, height: int, max_pixels: int, *, what: str = "image") -> MediaError:
    return MediaError(
        "image_too_large",
        f"This {what} is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels); "
        f"the limit is {max_pixels / 1e6:.1f} megapixels. Resize it and upload it again.",
    )


def inspect_media(
    source: str | os.PathLike[str] | BinaryIO | bytes, *, max_pixels: int = 40_000_000
) -> MediaInfo:
    """Identify an image, audio or video file by decoding it.

    ``source`` is a path, bytes, or a binary file object read from its current position (put
    back where it was afterwards when it is seekable; Django's ``UploadedFile`` works).

    Returns the MIME type, kind, pixel size (images and video) and duration in milliseconds
    (audio and video; exact for PCM WAV, otherwise measured from the packets' timestamps).
    Raises ``MediaError`` and nothing else.
    """
    try:
        with _opened(source) as fp:
            return _inspect(fp, max_pixels)
    except MediaError:
        raise
    except SoftTimeLimitExceeded:
        raise  # the Celery task ran out of time: not a verdict on the file
    except Exception as exc:  # a decoder bug or an odd file object must not become a 500
        logger.info("media inspection failed unexpectedly", exc_info=exc)
        raise _unreadable("a media file", "we could not read it") from None


@contextmanager
def _opened(source: str | os.PathLike[str] | BinaryIO | bytes) -> Iterator[BinaryIO]:
    """A seekable binary file whose position 0 is the start of the data."""
    if isinstance(source, bytes | bytearray | memoryview):
        yield io.BytesIO(bytes(source))
        return
    if isinstance(source, str | os.PathLike):
        try:
            fp = open(source, "rb")  # noqa: SIM115 - closed by the with below
        except OSError:
            raise _unreadable("a file", "it could not be opened") from None
        with fp:
            yield fp
        return
    start = _position(source)
    try:
        if start == 0:
            yield source
        else:
            # Pillow and ffmpeg seek to absolute offsets: give them a copy starting at 0.
            with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as copy:
                shutil.copyfileobj(source, copy)
                copy.seek(0)
                yield copy  # type: ignore[misc]
    finally:
        if start is not None:
            with suppress(Exception):
                source.seek(start)


def _position(fp: BinaryIO) -> int | None:
    """Where a file object is, or None when it cannot seek back there."""
    try:
        if hasattr(fp, "seekable") and not fp.seekable():
            return None
        return fp.tell()
    except (OSError, ValueError, AttributeError):
        return None


def _inspect(fp: BinaryIO, max_pixels: int) -> MediaInfo:
    head = fp.read(_HEAD_BYTES)
    fp.seek(0)
    if not head:
        raise MediaError("empty_file", "The file is empty. Choose the file again and upload it.")
    if (
        head.startswith(b"\x89PNG\r\n\x1a\n")
        or head.startswith(b"\xff\xd8\xff")
        or head[:6] in (b"GIF87a", b"GIF89a")
        or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
    ):
        return _inspect_image(fp, max_pixels)
    demuxer = _sniff_av(fp, head)
    if demuxer is None:
        raise _unsupported()
    return _inspect_av(fp, demuxer, max_pixels)


# --- images -----------------------------------------------------------------------------------


def _inspect_image(fp: BinaryIO, max_pixels: int) -> MediaInfo:
    label = "an image"
    try:
        # Image.open reads the header only. Pillow's own bomb guard warns above MAX_IMAGE_PIXELS
        # and raises only above twice that, so our limit is checked here, before
        # load() allocates anything. Warnings are not caught: catch_warnings() is process-wide
        # and not thread-safe, and a warning turned into an error lands in the except below.
        with Image.open(fp, formats=_PIL_FORMATS) as img:
            mime = _IMAGE_MIME.get(img.format or "")
            if mime is None:
                raise _unsupported()
            label = f"a {img.format} image"
            width, height = img.size
            if width <= 0 or height <= 0:
                raise _unreadable(label, "it has no pixels")
            if width * height > max_pixels:
                raise _too_large(width, height, max_pixels)
            img.load()  # decodes the pixel data: truncated or corrupt files fail here
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Only reached when the header claims far more than any sane max_pixels.
        raise MediaError(
            "image_too_large",
            "This image has far too many pixels to process. Resize it and upload it again.",
        ) from None
    except SoftTimeLimitExceeded:
        raise  # the Celery task ran out of time: not a verdict on the file
    except Exception as exc:  # UnidentifiedImageError, OSError, SyntaxError, zlib errors, ...
        logger.info("image refused: %s", exc)
        raise _unreadable(label) from None
    return MediaInfo(mime=mime, kind=KIND_IMAGE, width=width, height=height, duration_ms=None)


# --- audio and video --------------------------------------------------------------------------


def _sniff_av(fp: BinaryIO, head: bytes) -> str | None:
    """The ffmpeg demuxer for these leading bytes, or None when it is nothing we accept."""
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska or WebM
        return "matroska"
    if head[4:8] in _MOV_FIRST_BOXES and len(head) >= 12:
        if head[4:8] == b"ftyp" and head[8:12] in _IMAGE_BRANDS:
            return None
        return "mov"
    if head[:3] == b"ID3" and len(head) >= 10:
        # An ID3v2 tag (syncsafe size) may precede MP3 frames or, rarely, a FLAC stream;
        # ffmpeg skips the tag itself for either demuxer.
        size = 10 + ((head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7)
        size += head[9] & 0x7F
        if head[5] & 0x10:  # footer present
            size += 10
        fp.seek(size)
        after = fp.read(4)
        fp.seek(0)
        return "flac" if after == b"fLaC" else "mp3"
    if _is_mpeg_audio_sync(head):
        return "mp3"
    return None


def _is_mpeg_audio_sync(head: bytes) -> bool:
    # 11 set sync bits, a version that is not "reserved", a layer that is not "reserved" (which
    # also rules out AAC ADTS, layer 00), and a bitrate index that is not "bad".
    if len(head) < 3 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return False
    version, layer, bitrate = (head[1] >> 3) & 3, (head[1] >> 1) & 3, head[2] >> 4
    return version != 1 and layer != 0 and bitrate != 15


def _inspect_av(fp: BinaryIO, demuxer: str, max_pixels: int) -> MediaInfo:
    label = _AV_LABELS[demuxer]
    # PCM WAV: count the samples with the stdlib, before ffmpeg reads the file.
    wav_ms = _wav_duration_ms(fp) if demuxer == "wav" else None
    try:
        with av.open(fp, mode="r", format=demuxer) as container:
            audio = list(container.streams.audio)
            # Cover art in MP3/FLAC/M4A/OGG shows up as a one-picture "video" stream.
            video = [
                s
                for s in container.streams.video
                if not s.disposition & av.stream.Disposition.attached_pic
            ]
            if not audio and not video:
                raise _unreadable(label, "it contains no audio or video")
            primary = video[0] if video else audio[0]
            width = height = None
            if video:
                width, height = primary.codec_context.width, primary.codec_context.height
                if width * height > max_pixels:
                    raise _too_large(width, height, max_pixels, what="video")
                # The bitstream can claim a bigger frame than the container did: ffmpeg's own
                # per-frame limit makes the decoder refuse it instead of allocating it.
                primary.codec_context.options = {"max_pixels": str(min(max_pixels, 2**31 - 1))}
            measured_ms = _decode_and_measure(
                container, primary, [*video, *audio], label, measure=wav_ms is None
            )
            if video and not (width and height):
                # Some demuxers only learn the frame size from the first decoded frame.
                width, height = primary.codec_context.width, primary.codec_context.height
                if width * height > max_pixels:
                    raise _too_large(width, height, max_pixels, what="video")
            mime = _av_mime(demuxer, audio, video)
            duration_ms = wav_ms if wav_ms is not None else measured_ms
            if duration_ms is None:
                duration_ms = _declared_duration_ms(container, [*video, *audio])
    except MediaError:
        raise
    except SoftTimeLimitExceeded:
        raise  # the Celery task ran out of time: not a verdict on the file
    except Exception as exc:  # av.error.*, OSError, ValueError from odd containers
        logger.info("%s refused: %s", label, exc)
        raise _unreadable(label) from None
    if duration_ms is None or duration_ms <= 0:
        raise _unreadable(label, "its duration could not be determined")
    if video and not (width and height):
        raise _unreadable(label, "its frame size could not be determined")
    kind = KIND_VIDEO if video else KIND_AUDIO
    return MediaInfo(mime=mime, kind=kind, width=width, height=height, duration_ms=duration_ms)


def _decode_and_measure(
    container: av.container.InputContainer,
    primary: av.stream.Stream,
    streams: list[av.stream.Stream],
    label: str,
    *,
    measure: bool,
) -> int | None:
    """Decode the primary stream's first frame (refusing the file if none comes out) and, when
    ``measure``, the duration spanned by the packets' timestamps, in one pass over the file.

    The timestamps are preferred to the headers: a header can understate (a crafted file priced
    per second) or be missing (WebM recorded by a browser's MediaRecorder has no duration).
    """
    decoded = False
    # Per stream: [earliest timestamp, latest end], in that stream's time_base (integers keep
    # the per-packet cost to a few microseconds).
    spans: dict[int, list[int]] = {}
    # demux() ends with one empty packet per stream, which flushes its decoder: a codec that
    # buffers (B-frames, VP8 alt-ref) still yields its first frame there.
    for count, packet in enumerate(container.demux(*streams)):
        if count >= _MAX_SCANNED_PACKETS:
            raise _unreadable(label, "it holds far too many packets for its size")
        if not decoded and packet.stream is primary and packet.decode():
            decoded = True
            if not measure:
                break
        ts = packet.pts
        if ts is None:
            ts = packet.dts
            if ts is None:
                continue
        end = ts + (packet.duration or 0)
        span = spans.get(packet.stream_index)
        if span is None:
            spans[packet.stream_index] = [ts, end]
        else:
            if ts < span[0]:
                span[0] = ts
            if end > span[1]:
                span[1] = end
    if not decoded:
        raise _unreadable(label, "no audio or video could be decoded from it")
    by_index = {s.index: s for s in streams}
    first: Fraction | None = None
    last: Fraction | None = None
    for index, (lo, hi) in spans.items():
        time_base = by_index[index].time_base
        if time_base is None:
            continue
        first = min(first, lo * time_base) if first is not None else lo * time_base
        last = max(last, hi * time_base) if last is not None else hi * time_base
    if first is None or last is None or last <= first:
        return None
    return int((last - first) * 1000)


def _declared_duration_ms(
    container: av.container.InputContainer, streams: list[av.stream.Stream]
) -> int | None:
    if container.duration is not None and container.duration > 0:
        return int(container.duration // 1000)  # AV_TIME_BASE is microseconds
    for stream in streams:
        if stream.duration and stream.time_base:
            return int(stream.duration * stream.time_base * 1000)
    return None


def _av_mime(demuxer: str, audio: list[av.stream.Stream], video: list[av.stream.Stream]) -> str:
    if demuxer == "matroska":
        # The demuxer does not tell a WebM from a Matroska file holding H.264 or AAC, which
        # browsers and providers refuse as WebM: the codecs decide.
        webm = {s.codec_context.name for s in video} <= _WEBM_VIDEO_CODECS and {
            s.codec_context.name for s in audio
        } <= _WEBM_AUDIO_CODECS
        if video:
            return "video/webm" if webm else "video/x-matroska"
        return "audio/webm" if webm else "audio/x-matroska"
    if demuxer == "mov":
        return "video/mp4" if video else "audio/mp4"
    if demuxer == "ogg":
        return "video/ogg" if video else "audio/ogg"
    return {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg"}[demuxer]


def _wav_duration_ms(fp: BinaryIO) -> int | None:
    """Exact duration of a PCM WAV from the samples actually present, or None to fall back.

    The header's frame count is a claim: a truncated file (or one streamed with a placeholder
    size) holds fewer frames, so the frames are counted, not trusted.
    """
    try:
        with wave.open(fp, "rb") as w:  # type: ignore[arg-type]
            rate, frame_bytes = w.getframerate(), w.getsampwidth() * w.getnchannels()
            if rate <= 0 or frame_bytes <= 0:
                return None
            frames = 0
            while chunk := w.readframes(65536):
                frames += len(chunk) // frame_bytes
    except (wave.Error, EOFError, OSError, ValueError):
        return None  # not plain PCM (e.g. WAVE_FORMAT_EXTENSIBLE before Python 3.12)
    finally:
        fp.seek(0)
    return frames * 1000 // rate
