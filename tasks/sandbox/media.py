"""Real media for the sandbox upstream: PNG images, WAV tones and VP8 WebM videos.

Everything is derived from a hash of the prompt, so two prompts give visibly (and audibly)
different results and the same prompt always gives the same bytes. Pure functions, no I/O.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import math
import textwrap
import wave
from array import array

import av
from PIL import Image, ImageDraw, ImageFont

KIND_IMAGE = "image"
KIND_AUDIO = "audio"
KIND_VIDEO = "video"

MIME = {KIND_IMAGE: "image/png", KIND_AUDIO: "audio/wav", KIND_VIDEO: "video/webm"}

DEFAULT_SIZE = 512
MAX_SIZE = 2048
MIN_SIZE = 16
DEFAULT_DURATION_S = 2.0
MIN_DURATION_S = 0.1
MAX_AUDIO_S = 600.0
MAX_VIDEO_S = 30.0

AUDIO_RATE = 16_000
VIDEO_FPS = 10
VIDEO_SIZE = (320, 240)

Color = tuple[int, int, int]


def kind_for_model(model: str) -> str:
    """What a model produces, from its name. Video wins over audio over image ("image-to-video"
    makes a video); anything else makes images."""
    name = model.lower()
    if "video" in name:
        return KIND_VIDEO
    if any(word in name for word in ("audio", "speech", "isolation")):
        return KIND_AUDIO
    return KIND_IMAGE


def clamp_size(value: float | None) -> int:
    if value is None:
        return DEFAULT_SIZE
    return max(MIN_SIZE, min(MAX_SIZE, int(value)))


def clamp_duration(value: float | None, kind: str) -> float:
    limit = MAX_VIDEO_S if kind == KIND_VIDEO else MAX_AUDIO_S
    if value is None:
        return DEFAULT_DURATION_S
    return max(MIN_DURATION_S, min(limit, float(value)))


def wav_duration(data: bytes) -> float | None:
    """The length in seconds of a WAV file, or None when ``data`` is not one."""
    try:
        with wave.open(io.BytesIO(data), "rb") as reader:
            rate = reader.getframerate()
            return reader.getnframes() / rate if rate else None
    except (wave.Error, EOFError, ValueError):
        return None


def _digest(prompt: str) -> bytes:
    return hashlib.sha256(prompt.encode("utf-8", "replace")).digest()


def _palette(digest: bytes) -> tuple[Color, Color, Color]:
    hue = digest[0] / 255
    second = (hue + 0.25 + digest[1] / 255 * 0.5) % 1.0
    accent = (hue + 0.5) % 1.0

    def rgb(h: float, s: float, v: float) -> Color:
        r, g, b = colorsys.hsv_to_rgb(h, s, v)
        return (round(r * 255), round(g * 255), round(b * 255))

    return (
        rgb(hue, 0.55 + digest[2] / 255 * 0.4, 0.95),
        rgb(second, 0.6 + digest[3] / 255 * 0.4, 0.35),
        rgb(accent, 0.8, 1.0),
    )


def _background(digest: bytes, size: tuple[int, int]) -> Image.Image:
    light, dark, _ = _palette(digest)
    mask = Image.linear_gradient("L") if digest[4] % 2 else Image.radial_gradient("L")
    turn = (
        None,
        Image.Transpose.ROTATE_90,
        Image.Transpose.ROTATE_180,
        Image.Transpose.ROTATE_270,
    )[digest[5] % 4]
    if turn is not None:
        mask = mask.transpose(turn)
    mask = mask.resize(size, Image.Resampling.BILINEAR)
    return Image.composite(Image.new("RGB", size, dark), Image.new("RGB", size, light), mask)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, size))


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int) -> None:
    font = _font(size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        # Pillow without FreeType: the bitmap font only encodes Latin-1.
        text = text.encode("latin-1", "replace").decode("latin-1")
        draw.text(xy, text, fill=(255, 255, 255), font=font)
        return
    draw.text(
        xy,
        text,
        fill=(255, 255, 255),
        font=font,
        stroke_width=max(1, size // 12),
        stroke_fill=(0, 0, 0),
    )


def render_png(
    prompt: str, *, index: int = 0, width: int = DEFAULT_SIZE, height: int = DEFAULT_SIZE
) -> bytes:
    """A ``width``×``height`` PNG: gradient and shapes coloured by the prompt, the prompt's text
    and the output number (1-based) drawn on it."""
    digest = _digest(prompt)
    image = _background(digest, (width, height))
    draw = ImageDraw.Draw(image)
    _, _, accent = _palette(digest)
    short = min(width, height)
    for n in range(3 + digest[6] % 3):
        cx = digest[7 + n] / 255 * width
        cy = digest[12 + n] / 255 * height
        radius = (0.08 + digest[17 + n] / 255 * 0.2) * short
        draw.ellipse(
            (cx - radius, cy - radius, cx + radius, cy + radius),
            outline=accent,
            width=max(1, short // 80),
        )
    font_size = max(8, short // 14)
    chars_per_line = max(4, int(width / (font_size * 0.6)) - 2)
    lines = textwrap.wrap(prompt or "(empty prompt)", chars_per_line)[:4]
    y = font_size // 2
    for line in lines:
        _draw_text(draw, (font_size // 2, y), line, font_size)
        y += int(font_size * 1.3)
    _draw_text(draw, (font_size // 2, height - int(font_size * 1.6)), f"#{index + 1}", font_size)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def render_wav(prompt: str, *, duration_s: float = DEFAULT_DURATION_S, index: int = 0) -> bytes:
    """A 16-bit mono 16 kHz WAV of ``duration_s`` seconds: a two-note chord whose pitch comes
    from the prompt (220-985 Hz), faded in and out."""
    digest = _digest(prompt)
    # Whole-Hz frequencies make one second exactly periodic, so a 10-minute file is one
    # computed second repeated (fast) instead of 9.6 million sin() calls.
    base = 220 + digest[0] * 3 + index * 20
    fifth = base * 3 // 2
    second = array(
        "h",
        (
            int(
                9000 * math.sin(2 * math.pi * base * i / AUDIO_RATE)
                + 4000 * math.sin(2 * math.pi * fifth * i / AUDIO_RATE)
            )
            for i in range(AUDIO_RATE)
        ),
    )
    total = max(1, round(duration_s * AUDIO_RATE))
    samples = second * (total // AUDIO_RATE + 1)
    del samples[total:]
    fade = min(AUDIO_RATE // 50, total // 2)
    for i in range(fade):
        gain = i / fade
        samples[i] = int(samples[i] * gain)
        samples[total - 1 - i] = int(samples[total - 1 - i] * gain)
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(AUDIO_RATE)
        writer.writeframes(samples.tobytes())
    return out.getvalue()


def render_webm(prompt: str, *, duration_s: float = DEFAULT_DURATION_S, index: int = 0) -> bytes:
    """A 320×240 VP8 WebM (plays in Chromium, unlike some H.264 MP4s) of ``duration_s`` seconds
    at 10 fps: the prompt's gradient, a ball moving across it, the prompt and a clock."""
    digest = _digest(prompt)
    width, height = VIDEO_SIZE
    background = _background(digest, VIDEO_SIZE)
    _, _, accent = _palette(digest)
    frames = max(1, round(duration_s * VIDEO_FPS))
    label = textwrap.shorten(prompt or "(empty prompt)", 40, placeholder="…")
    out = io.BytesIO()
    container = av.open(out, "w", format="webm")
    try:
        stream = container.add_stream("libvpx", rate=VIDEO_FPS)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.options = {"deadline": "realtime", "cpu-used": "8"}
        radius = 18
        speed = 6 + digest[8] % 10
        for n in range(frames):
            image = background.copy()
            draw = ImageDraw.Draw(image)
            travel = (n * speed + digest[9]) % (2 * (width - 2 * radius))
            x = radius + (
                travel if travel < width - 2 * radius else 2 * (width - 2 * radius) - travel
            )
            y = height / 2 + math.sin(n / 4 + digest[10]) * height / 4
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=accent)
            _draw_text(draw, (8, 8), label, 16)
            _draw_text(draw, (8, height - 26), f"#{index + 1}  {n / VIDEO_FPS:4.1f}s", 16)
            frame = av.VideoFrame.from_image(image)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    finally:
        container.close()
    return out.getvalue()
