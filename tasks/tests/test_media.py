"""inspect_media decides a file's type from its content; the upload handler bounds file size.

Every fixture is generated here with Pillow, the stdlib ``wave`` module or PyAV: no binary files
in the repository, no network.
"""

from __future__ import annotations

import io
import math
import struct
import time
import wave
import zipfile
import zlib
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import RequestFactory
from PIL import Image, ImageFile

from tasks.media import MediaError, MediaInfo, inspect_media
from tasks.uploads import LimitedUploadHandler, upload_too_large

# --- fixture builders -------------------------------------------------------------------------


def image_bytes(fmt: str, size: tuple[int, int] = (20, 10), **save: Any) -> bytes:
    img = Image.new("RGB", size, (200, 40, 90))
    for x in range(size[0]):
        img.putpixel((x, x % size[1]), (x * 10 % 256, 255, 0))
    if fmt == "GIF":
        img = img.convert("P")
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def wav_bytes(seconds: float, rate: int = 8000) -> bytes:
    frames = round(seconds * rate)
    samples = (int(8000 * math.sin(2 * math.pi * 440 * n / rate)) for n in range(frames))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(struct.pack("<h", s) for s in samples))
    return buf.getvalue()


def _tone_frames(seconds: float, rate: int) -> list[av.AudioFrame]:
    """Mono s16 frames of a 440 Hz tone; PyAV resamples them to what the encoder wants."""
    frames, total, pts = [], round(seconds * rate), 0
    while pts < total:
        n = min(1024, total - pts)
        frame = av.AudioFrame(format="s16", layout="mono", samples=n)
        frame.planes[0].update(
            b"".join(
                struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * (pts + i) / rate)))
                for i in range(n)
            )
        )
        frame.sample_rate, frame.pts, frame.time_base = rate, pts, Fraction(1, rate)
        frames.append(frame)
        pts += n
    return frames


def audio_bytes(
    container_format: str, codec: str, rate: int, seconds: float = 1.0, **options: str
) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=container_format, options=options) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        for frame in _tone_frames(seconds, rate):
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


def video_bytes(
    container_format: str = "webm",
    codec: str = "libvpx",
    *,
    seconds: float = 2.0,
    fps: int = 10,
    size: tuple[int, int] = (64, 48),
    with_audio: str | None = None,
    **options: str,
) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=container_format, options=options) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        audio = out.add_stream(with_audio, rate=48000, layout="mono") if with_audio else None
        for i in range(round(seconds * fps)):
            img = Image.new("RGB", size, (i * 12 % 256, 80, 160))
            frame = av.VideoFrame.from_image(img)
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        if audio is not None:
            for frame in _tone_frames(seconds, 48000):
                out.mux(audio.encode(frame))
            out.mux(audio.encode(None))
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size in its header but carries almost no pixel data: opening it works,
    decoding it fails."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.png", image_bytes("PNG"))
    return buf.getvalue()


def refused(source: Any, **kwargs: Any) -> MediaError:
    with pytest.raises(MediaError) as info:
        inspect_media(source, **kwargs)
    assert info.value.message  # every refusal says something to the user
    return info.value


# --- accepted files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")],
)
def test_images_are_identified_with_their_size(fmt: str, mime: str) -> None:
    # given a real image of each accepted format
    data = image_bytes(fmt)
    # when / then
    assert inspect_media(data) == MediaInfo(
        mime=mime, kind="image", width=20, height=10, duration_ms=None
    )


def test_a_multi_picture_jpeg_from_a_phone_camera_is_a_jpeg() -> None:
    # Pillow calls these "MPO"; browsers and providers read them as JPEG.
    first = Image.new("RGB", (16, 8), "red")
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[Image.new("RGB", (16, 8), "blue")])
    info = inspect_media(buf.getvalue())
    assert (info.mime, info.width, info.height) == ("image/jpeg", 16, 8)


def test_wav_duration_is_exact() -> None:
    info = inspect_media(wav_bytes(1.5))
    assert info == MediaInfo(mime="audio/wav", kind="audio", width=None, height=None,
                             duration_ms=1500)  # fmt: skip


def test_truncated_wav_reports_the_samples_present_not_the_header_claim() -> None:
    # given a 2 s WAV cut after about 0.5 s of samples (its header still claims 2 s)
    data = wav_bytes(2.0)
    cut = data[: 44 + 8000 * 2 // 2]
    # then the duration is what can be played, which is what a per-second price must use
    assert inspect_media(cut).duration_ms == 500


@pytest.mark.parametrize(
    ("build", "mime"),
    [
        (lambda: audio_bytes("mp3", "libmp3lame", 44100), "audio/mpeg"),
        (lambda: audio_bytes("ogg", "libopus", 48000), "audio/ogg"),
        (lambda: audio_bytes("flac", "flac", 44100), "audio/flac"),
        (lambda: audio_bytes("webm", "libopus", 48000), "audio/webm"),
        (lambda: audio_bytes("mp4", "aac", 44100), "audio/mp4"),
    ],
    ids=["mp3", "ogg-opus", "flac", "webm-opus", "m4a-aac"],
)
def test_compressed_audio_is_identified_and_measured(build: Callable[[], bytes], mime: str) -> None:
    # given one second of audio (encoders add up to a frame of padding/priming)
    info = inspect_media(build())
    assert (info.mime, info.kind, info.width, info.height) == (mime, "audio", None, None)
    assert info.duration_ms is not None
    assert 950 <= info.duration_ms <= 1100


def test_wav_the_stdlib_cannot_read_is_measured_by_ffmpeg() -> None:
    # given a 24-bit WAV, which ffmpeg writes as WAVE_FORMAT_EXTENSIBLE (the wave module refuses)
    data = audio_bytes("wav", "pcm_s24le", 48000)
    with pytest.raises(wave.Error):
        wave.open(io.BytesIO(data)).close()
    info = inspect_media(data)
    assert (info.mime, info.duration_ms) == ("audio/wav", 1000)


def test_mp3_with_cover_art_is_audio() -> None:
    # given an MP3 whose ID3 tag holds a picture, which ffmpeg shows as a video stream
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3") as out:
        sound = out.add_stream("libmp3lame", rate=44100, layout="mono")
        cover = out.add_stream("png")
        cover.width, cover.height, cover.pix_fmt = 20, 10, "rgb24"
        cover.disposition = av.stream.Disposition.attached_pic
        picture = av.Packet(image_bytes("PNG"))
        picture.stream = cover
        out.mux(picture)
        for frame in _tone_frames(1.0, 44100):
            out.mux(sound.encode(frame))
        out.mux(sound.encode(None))
    # then it is audio, not a video
    info = inspect_media(buf.getvalue())
    assert (info.mime, info.kind, info.width, info.height) == ("audio/mpeg", "audio", None, None)


def test_vp8_webm_video_is_identified_with_size_and_duration() -> None:
    info = inspect_media(video_bytes())
    assert (info.mime, info.kind, info.width, info.height) == ("video/webm", "video", 64, 48)
    assert info.duration_ms == 2000


def test_webm_without_a_declared_duration_is_measured_from_its_packets() -> None:
    # given a WebM written like a browser's MediaRecorder does: live, no Duration element
    data = video_bytes(live="1")
    with av.open(io.BytesIO(data)) as container:
        assert container.duration is None  # the header really says nothing
    # then the duration still comes out, from the packets' timestamps
    assert inspect_media(data).duration_ms == 2000


def test_video_with_sound_is_video() -> None:
    info = inspect_media(video_bytes(with_audio="libopus"))
    assert (info.mime, info.kind, info.width, info.height) == ("video/webm", "video", 64, 48)
    assert info.duration_ms is not None
    assert 2000 <= info.duration_ms <= 2100


def test_h264_mp4_is_video_mp4() -> None:
    info = inspect_media(video_bytes("mp4", "libx264"))
    assert (info.mime, info.kind, info.width, info.height) == ("video/mp4", "video", 64, 48)
    assert info.duration_ms == 2000


def test_matroska_holding_h264_is_not_called_webm() -> None:
    # WebM means VP8/VP9/AV1 with Opus/Vorbis; the container alone does not say which.
    info = inspect_media(video_bytes("matroska", "libx264"))
    assert (info.mime, info.kind) == ("video/x-matroska", "video")


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("source", [b"", bytearray(), io.BytesIO()], ids=["bytes", "ba", "file"])
def test_empty_file(source: Any) -> None:
    assert refused(source).code == "empty_file"


@pytest.mark.parametrize(
    "data",
    [
        b"just some text\n" * 20,
        b"<!doctype html><html><body><script>alert(document.cookie)</script></body></html>",
        b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n",
        zip_bytes(),
        b"1\n00:00:01,000 --> 00:00:02,000\nhello\n\n",  # subtitles: ffmpeg would open these
        b"#EXTM3U\n#EXTINF:10,\nhttp://169.254.169.254/latest/meta-data/\n#EXT-X-ENDLIST\n",
        image_bytes("BMP"),
        image_bytes("TIFF"),
        b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf",  # an AVIF still image
    ],
    ids=["text", "html", "pdf", "zip", "srt", "hls", "bmp", "tiff", "avif"],
)
def test_other_content_is_an_unsupported_type(data: bytes) -> None:
    assert refused(data).code == "unsupported_file_type"


def test_html_named_png_is_refused_by_content(tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(b"<html><body onload=alert(1)>hi</body></html>")
    assert refused(path).code == "unsupported_file_type"


def test_text_named_txt_is_not_a_video(tmp_path: Path) -> None:
    # ffmpeg's "tty" demuxer opens any *.txt as a 640x400 video of the text, two minutes long.
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello world, this is just text\n" * 40)
    assert refused(path).code == "unsupported_file_type"
    assert refused(str(path)).code == "unsupported_file_type"


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n<html><script>alert(1)</script></html>",
        image_bytes("PNG", (64, 64))[:-40],  # truncated inside the pixel data
        image_bytes("JPEG", (64, 64))[:300],
        image_bytes("WEBP", (64, 64))[:40],
        image_bytes("GIF", (64, 64))[:60],
        png_header_only(20, 10),
    ],
    ids=["png-then-html", "png-cut", "jpeg-cut", "webp-cut", "gif-cut", "png-no-pixels"],
)
def test_images_that_do_not_decode_are_unreadable(data: bytes) -> None:
    assert refused(data).code == "unreadable_file"


@pytest.mark.parametrize(
    "data",
    [
        b"RIFF\x24\x10\x00\x00WAVE" + b"junk" * 500,
        wav_bytes(1.0)[:44],  # a valid header and no samples
        b"OggS" + b"\x00" * 30 + b"junk" * 500,
        b"fLaC" + b"junk" * 500,
        b"\x1a\x45\xdf\xa3" + b"junk" * 500,
        b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"junk" * 500,
        b"ID3\x03\x00\x00\x00\x00\x00\x00" + b"junk" * 500,
        b"\xff\xfb\x90\x64" + b"junk" * 500,
        video_bytes()[:200],  # WebM header, no frames
    ],
    ids=["wav-junk", "wav-empty", "ogg", "flac", "ebml", "mp4", "id3", "mp3-sync", "webm-cut"],
)
def test_media_headers_followed_by_junk_are_unreadable(data: bytes) -> None:
    assert refused(data).code == "unreadable_file"


def test_image_over_the_pixel_limit() -> None:
    error = refused(image_bytes("PNG", (20, 20)), max_pixels=100)
    assert error.code == "image_too_large"
    assert "20x20" in error.message


def test_pixel_limit_is_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    # given a PNG header claiming 9000x9000 (81 Mpx: over our 40 Mpx default, under Pillow's own
    # guard) and no pixel data at all: decoding it would fail as unreadable
    def no_decoding(self: Any) -> None:
        raise AssertionError("decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    # then it is refused for its size, and nothing was decoded
    assert refused(png_header_only(9000, 9000)).code == "image_too_large"


def test_a_decompression_bomb_is_refused_fast() -> None:
    # 100000x100000 RGB would need 30 GB; Pillow's own guard raises at this size
    started = time.perf_counter()
    assert refused(png_header_only(100_000, 100_000)).code == "image_too_large"
    assert time.perf_counter() - started < 1


def test_video_frames_over_the_pixel_limit() -> None:
    assert refused(video_bytes(), max_pixels=1000).code == "image_too_large"


def test_png_with_html_appended_is_still_a_png() -> None:
    # A polyglot whose pixel data decodes fully is what it decodes as: image/png, never text/html.
    # Serving uploads with a fixed Content-Type and nosniff is what keeps it harmless.
    data = image_bytes("PNG") + b"<html><script>alert(document.cookie)</script></html>"
    assert inspect_media(data).mime == "image/png"


def test_damaged_files_raise_only_media_error() -> None:
    # given real files cut at many points and with bytes flipped
    samples = [
        image_bytes("PNG", (32, 32)),
        image_bytes("JPEG", (32, 32)),
        image_bytes("GIF", (32, 32)),
        image_bytes("WEBP", (32, 32)),
        wav_bytes(0.2),
        audio_bytes("mp3", "libmp3lame", 44100, 0.3),
        audio_bytes("ogg", "libopus", 48000, 0.3),
        audio_bytes("flac", "flac", 44100, 0.3),
        video_bytes(seconds=0.5),
        video_bytes("mp4", "libx264", seconds=0.5),
    ]
    outcomes: set[str] = set()
    for data in samples:
        for fraction in (0.05, 0.2, 0.5, 0.8, 0.95):
            cut = round(len(data) * fraction)
            flipped = bytearray(data)
            for i in range(cut, len(data), 7):
                flipped[i] ^= 0x5A
            for variant in (data[:cut], bytes(flipped)):
                try:
                    outcomes.add(inspect_media(variant).kind)
                except MediaError as exc:
                    outcomes.add(exc.code)
    # then each was accepted or refused with a MediaError: nothing else escaped
    assert "unreadable_file" in outcomes
    assert outcomes <= {"image", "audio", "video", "unreadable_file", "unsupported_file_type"}


def test_junk_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    for data in (b"\x1a\x45\xdf\xa3" + b"junk" * 500, b"\xff\xfb\x90\x64" + b"junk" * 500):
        refused(data)
    assert capfd.readouterr() == ("", "")


# --- sources ----------------------------------------------------------------------------------


def test_accepts_a_path(tmp_path: Path) -> None:
    path = tmp_path / "upload.bin"  # the name says nothing; the content decides
    path.write_bytes(image_bytes("PNG"))
    assert inspect_media(path).mime == "image/png"
    assert inspect_media(str(path)).mime == "image/png"


def test_a_missing_path_is_unreadable(tmp_path: Path) -> None:
    assert refused(tmp_path / "gone.png").code == "unreadable_file"


def test_accepts_a_file_object_and_leaves_it_at_the_start() -> None:
    fp = io.BytesIO(wav_bytes(0.5))
    assert inspect_media(fp).duration_ms == 500
    assert fp.tell() == 0
    assert fp.read(4) == b"RIFF"  # still usable by whoever stores it next


def test_reads_a_file_object_from_its_current_position() -> None:
    fp = io.BytesIO(b"PREFIX" + image_bytes("GIF"))
    fp.seek(6)
    assert inspect_media(fp).mime == "image/gif"
    assert fp.tell() == 6


def test_accepts_a_non_seekable_stream() -> None:
    class Pipe(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            chunk = self._data.read(len(buffer))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    info = inspect_media(Pipe(video_bytes()))  # type: ignore[arg-type]
    assert (info.mime, info.duration_ms) == ("video/webm", 2000)


def test_accepts_bytes_and_django_uploaded_files() -> None:
    data = audio_bytes("ogg", "libopus", 48000, 0.5)
    assert inspect_media(bytearray(data)).mime == "audio/ogg"
    upload = SimpleUploadedFile("voice.png", data, content_type="image/png")  # lies twice
    assert inspect_media(upload).mime == "audio/ogg"  # type: ignore[arg-type]
    assert upload.tell() == 0


# --- upload handler ---------------------------------------------------------------------------


def _post_file(settings: Any, size: int, limit: int) -> Any:
    settings.MAX_UPLOAD_BYTES = limit
    request = RequestFactory().post(
        "/api/v1/uploads/",
        {"file": SimpleUploadedFile("a.wav", b"x" * size), "note": "after the file"},
    )
    request.upload_handlers = [LimitedUploadHandler(request)]
    return request


def test_upload_within_the_limit_is_stored(settings: Any) -> None:
    request = _post_file(settings, size=1000, limit=1000)
    assert request.FILES["file"].size == 1000
    assert not upload_too_large(request)


def test_upload_over_the_limit_is_stopped_and_marked(settings: Any) -> None:
    # given a 1001-byte file and a 1000-byte limit
    request = _post_file(settings, size=1001, limit=1000)
    # when the body is parsed
    files = request.FILES
    # then no partial file reaches the view, and the view can answer 413 instead of 500
    assert "file" not in files
    assert upload_too_large(request)
