"""OCR synthesis: renders text images (scene text, documents, tables, bar charts) with exact ground truth.

Every string is drawn through its own ink mask, so the text, the per-line boxes and the
question-answer pairs describe exactly what is in the pixels. The functions are pure and
deterministic given the `random.Random` passed in (numpy noise is seeded from it); the Ray
Data step that wraps them owns the seeding, the fonts list and the I/O.

Kinds (`OCR_KINDS`)
    scene_text  one or two lines of large text on a background, the whole block rotated by
                `fields["rotation_deg"]`, drawn uniformly from [-max_rotation_deg, max_rotation_deg]
                and rounded to 0.1 degree (never beyond the bound). Only this kind is rotated.
    document    a title and wrapped paragraphs, wrapped with measured text widths.
    table       a grid with a header row and data rows; the first column holds unique item
                names. "How many rows does the table have?" counts data rows (not the header).
    chart       a bar chart: title, one label under each bar and its value printed above it.
                Values are distinct, so the highest and lowest categories are unique.

Reading order of `text`/`lines`: scene_text top to bottom; document title then every wrapped
line; table header cells then each row, left to right; chart title, then label and value of
each bar from left to right.

Guarantees
    * Every line box is the tight axis-aligned box of that line's ink in the final image (for
      scene_text it is measured on the rotated ink), lies inside the image, and text is never
      clipped: what does not fit is shrunk (down to `MIN_FONT_SIZE`) or left out, and `fields`,
      `text` and `qa` only describe what was drawn.
    * Contrast: every text pixel is drawn in one colour whose Rec. 601 luma
      (0.299 R + 0.587 G + 0.114 B) differs by at least `MIN_LUMA_CONTRAST` (80 of 255) from every
      background pixel it is drawn over (backgrounds, including gradients, noise and speckle, and
      table header fills all stay in one luma band; chart values sit above the bars, not on them).
    * Images must be at least `MIN_WIDTH` x `MIN_HEIGHT` (160 x 80); 1024 x 768 and larger work.
    * With no font files (`fonts=[]`) Pillow's built-in scalable font is used
      (`ImageFont.load_default(size=...)`, Pillow >= 10.1). A picked font file that fails to load,
      or lacks a glyph for a character the generators use (it would draw .notdef boxes), also
      falls back to it, and `OcrSample.font` then reads "default".

`render_ocr_layers` returns, besides the sample, the image before any text was drawn and the
union text mask, e.g. for text-detection targets or to check the boxes.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache, reduce
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFont

OCR_KINDS: tuple[str, ...] = ("scene_text", "document", "table", "chart")
MIN_WIDTH = 160
MIN_HEIGHT = 80
MIN_FONT_SIZE = 10
MIN_LUMA_CONTRAST = 80.0
DEFAULT_FONT = "default"
FONT_SUFFIXES: tuple[str, ...] = (".ttf", ".otf", ".ttc")
BACKGROUND_STYLES: tuple[str, ...] = ("solid", "gradient", "noise", "speckle")

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]
Font = Union[ImageFont.FreeTypeFont, ImageFont.ImageFont, ImageFont.TransposedFont]

# Luma bands (0-255). Backgrounds stay within their band widened by _BG_JITTER; the worst case
# gap to the text band is 200 - 12 - 100 = 88 (light) and 160 - (60 + 12) = 88 (dark), so
# MIN_LUMA_CONTRAST = 80 holds with room for rounding.
_LIGHT_BG = (200.0, 250.0)
_DARK_BG = (10.0, 60.0)
_DARK_TEXT = (0.0, 100.0)
_LIGHT_TEXT = (160.0, 255.0)
_BG_JITTER = 12
_NOISE_AMPLITUDE = 6
_SPECKLE_FRACTION = 0.03
_REF_GLYPHS = "Hgjy|$(Q"  # tall and deep glyphs: the vertical extent of a line of text
# Every character the content generators emit; a font must have its own glyph for each.
_CHARSET = string.ascii_letters + string.digits + "$%-./,!?"
_MISSING_GLYPH_PROBE = "\U0010fffd"  # a private-use code point: fonts draw their .notdef box

_WORDS: tuple[str, ...] = (
    "apple", "river", "market", "green", "north", "signal", "harbor", "silver", "garden",
    "station", "window", "coffee", "paper", "bridge", "summer", "orange", "planet", "music",
    "cloud", "stone", "forest", "copper", "simple", "rapid", "bright", "quiet", "yellow",
    "winter", "travel", "energy", "pixel", "vision", "model", "letter", "number", "city",
    "road", "house", "light", "water", "field", "point", "open", "data", "train", "order",
    "report", "sale", "price", "total", "daily", "fresh", "local", "public", "central",
    "modern", "golden", "the", "and", "of", "to", "in", "for", "with", "new", "all", "each",
    "more", "best", "free", "first", "last", "small", "large", "fast", "slow", "early", "late",
)
_SYLLABLES: tuple[str, ...] = (
    "ka", "lo", "mi", "ra", "ten", "vor", "shi", "da", "pel", "nu", "zor", "bex", "tra", "qui",
    "ran", "mo", "sel", "fi", "gan", "tu",
)
_ITEMS: tuple[str, ...] = (
    "Apple", "Banana", "Cherry", "Mango", "Lemon", "Grape", "Peach", "Melon", "Kiwi", "Plum",
    "Pear", "Olive", "Onion", "Carrot", "Tomato", "Pepper", "Bread", "Cheese", "Butter",
    "Coffee", "Tea", "Rice", "Pasta", "Honey", "Salt", "Sugar", "Flour", "Milk", "Juice", "Soap",
)
_MONTHS: tuple[str, ...] = (
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
)
_REGIONS: tuple[str, ...] = ("North", "South", "East", "West", "Central", "Coast", "Valley", "Metro")
_QUARTERS: tuple[str, ...] = ("Q1", "Q2", "Q3", "Q4")
_METRICS: tuple[str, ...] = ("Sales", "Revenue", "Visitors", "Orders", "Users", "Costs", "Growth")
_ITEM_HEADERS: tuple[str, ...] = ("Item", "Product", "Name")


@dataclass
class TextLine:
    """One drawn string and the tight axis-aligned box (x0, y0, x1, y1; x1/y1 exclusive) of its ink."""

    text: str
    box: tuple[int, int, int, int]


@dataclass
class OcrSample:
    """A rendered image with its exact ground truth (see the module docstring for each kind)."""

    kind: str
    image: Image.Image
    text: str
    lines: list[TextLine]
    qa: list[dict[str, str]]
    fields: dict[str, Any]
    font: str


@dataclass
class OcrLayers:
    """A sample plus its layers: `base` is the image before any text was drawn (background,
    grid, bars), `text_mask` ("L") the union of all text ink, `colors` the colour of each line."""

    sample: OcrSample
    base: Image.Image
    text_mask: Image.Image
    colors: list[RGB]


# --------------------------------------------------------------------------- public API


def available_fonts(font_dirs: Sequence[str]) -> list[str]:
    """Sorted .ttf/.otf/.ttc files found (recursively) under the given dirs; missing dirs are skipped."""
    found: set[str] = set()
    for directory in font_dirs:
        root = Path(directory)
        if not root.is_dir():
            continue
        for path in root.rglob("*"):
            if path.suffix.lower() in FONT_SUFFIXES and path.is_file():
                found.add(str(path))
    return sorted(found)


def render_ocr_sample(
    rng: random.Random,
    kind: str,
    width: int,
    height: int,
    fonts: Sequence[str],
    max_rotation_deg: float = 15.0,
) -> OcrSample:
    """Render one OCR sample of `kind` at width x height, with a font picked from `fonts` by `rng`.

    Raises ValueError for a kind not in OCR_KINDS, a size below MIN_WIDTH x MIN_HEIGHT, or a
    max_rotation_deg outside [0, 90].
    """
    return render_ocr_layers(rng, kind, width, height, fonts, max_rotation_deg).sample


def render_ocr_layers(
    rng: random.Random,
    kind: str,
    width: int,
    height: int,
    fonts: Sequence[str],
    max_rotation_deg: float = 15.0,
) -> OcrLayers:
    """Like `render_ocr_sample`, also returning the text-free image and the text mask."""
    _validate(kind, width, height, max_rotation_deg)
    source = _pick_font_source(rng, fonts)
    palette = _pick_palette(rng, light_probability=0.5 if kind == "scene_text" else 0.8)
    background, style = _background(rng, width, height, palette)
    if kind == "scene_text":
        painter, fields, qa = _render_scene_text(rng, background, source, palette, max_rotation_deg)
        fields["background"] = style
    elif kind == "document":
        painter, fields, qa = _render_document(rng, background, source, palette)
    elif kind == "table":
        painter, fields, qa = _render_table(rng, background, source, palette)
    else:
        painter, fields, qa = _render_chart(rng, background, source, palette)
    sample = OcrSample(
        kind=kind,
        image=painter.image,
        text="\n".join(line.text for line in painter.lines),
        lines=painter.lines,
        qa=qa,
        fields=fields,
        font=source,
    )
    return OcrLayers(sample=sample, base=painter.base, text_mask=painter.mask, colors=painter.colors)


def luma(color: Sequence[float]) -> float:
    """Rec. 601 luma of an RGB colour: the measure behind MIN_LUMA_CONTRAST."""
    return 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]


def _validate(kind: str, width: int, height: int, max_rotation_deg: float) -> None:
    if kind not in OCR_KINDS:
        raise ValueError(f"unknown OCR kind {kind!r}; expected one of {', '.join(OCR_KINDS)}")
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        raise ValueError(
            f"image size {width}x{height} is below the minimum {MIN_WIDTH}x{MIN_HEIGHT} for OCR synthesis"
        )
    if not (math.isfinite(max_rotation_deg) and 0.0 <= max_rotation_deg <= 90.0):
        raise ValueError(f"max_rotation_deg must be within [0, 90], got {max_rotation_deg}")


# --------------------------------------------------------------------------- fonts and ink


def _pick_font_source(rng: random.Random, fonts: Sequence[str]) -> str:
    """A font path drawn from `fonts`, or DEFAULT_FONT if there is none or it cannot draw our text."""
    if not fonts:
        return DEFAULT_FONT
    source = rng.choice(list(fonts))
    return source if _usable_font(source) else DEFAULT_FONT


@lru_cache(maxsize=256)
def _usable_font(path: str) -> bool:
    """Whether the font loads and has a glyph of its own for every character the generators use."""
    try:
        font = _font(path, 24)
        missing = font.getmask(_MISSING_GLYPH_PROBE)
        missing_key = (missing.size, bytes(missing))
        return all((m.size, bytes(m)) != missing_key for m in map(font.getmask, _CHARSET))
    except (OSError, ValueError):
        return False


@lru_cache(maxsize=512)
def _font(source: str, size: int) -> Font:
    """The font at `size` pixels; `source` is a font file path or DEFAULT_FONT."""
    if source == DEFAULT_FONT:
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: fixed-size bitmap font
            return ImageFont.load_default()
    return ImageFont.truetype(source, size)


@dataclass(frozen=True)
class _Ink:
    """A string's ink mask cropped to its tight box, and that box's offset from the draw origin."""

    mask: Image.Image
    dx: int
    dy: int

    @property
    def width(self) -> int:
        return self.mask.width

    @property
    def height(self) -> int:
        return self.mask.height

    def box_at(self, x: int, y: int) -> Box:
        return (x + self.dx, y + self.dy, x + self.dx + self.width, y + self.dy + self.height)


def _ink(text: str, font: Font) -> _Ink:
    """Render `text` as Pillow would at origin (0, 0) and return its exact ink."""
    left, top, right, bottom = (int(v) for v in font.getbbox(text))
    pad = 4 + (bottom - top) // 4
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(canvas).text((pad - left, pad - top), text, fill=255, font=font)
    bbox = canvas.getbbox()
    if bbox is None:
        raise ValueError(f"text {text!r} renders no ink with this font")
    return _Ink(canvas.crop(bbox), bbox[0] + left - pad, bbox[1] + top - pad)


def _vmetrics(font: Font) -> tuple[int, int]:
    """Top and bottom (relative to the draw origin) of a line of text in this font."""
    _, top, _, bottom = font.getbbox(_REF_GLYPHS)
    return int(top), int(bottom)


def _fit_text(words: list[str], source: str, size: int, max_width: int) -> tuple[str, Font, int]:
    """The words joined at the largest size <= `size` whose ink fits `max_width`.

    Below MIN_FONT_SIZE it drops trailing words, then trailing characters of the last word.
    """
    while True:
        font = _font(source, size)
        text = " ".join(words)
        if _ink(text, font).width <= max_width:
            return text, font, size
        if size > MIN_FONT_SIZE:
            size = max(MIN_FONT_SIZE, size - max(1, size // 8))
        elif len(words) > 1:
            words = words[:-1]
        elif len(words[0]) > 1:
            words = [words[0][:-1]]
        else:
            raise RuntimeError(f"a single character does not fit in {max_width} pixels")


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


# --------------------------------------------------------------------------- colours and backgrounds


@dataclass(frozen=True)
class _Palette:
    light_background: bool
    background: RGB
    text: RGB

    def background_color(self, rng: random.Random) -> RGB:
        """Another colour in this palette's background band (gradient ends, header fills)."""
        return _color_with_luma(rng, *(_LIGHT_BG if self.light_background else _DARK_BG))

    def graphic_color(self, rng: random.Random) -> RGB:
        """A colour visible on this background, for bars (never drawn under text)."""
        return _color_with_luma(rng, *((40.0, 150.0) if self.light_background else (110.0, 220.0)))


def _color_with_luma(rng: random.Random, low: float, high: float) -> RGB:
    """A random hue pulled towards white or black until its luma is inside [low, high]."""
    target = rng.uniform(low + 1.0, high - 1.0)
    channels = [float(rng.randint(0, 255)) for _ in range(3)]
    current = luma(channels)
    if current < target:
        k = (target - current) / (255.0 - current)
        channels = [c + (255.0 - c) * k for c in channels]
    elif current > target:
        channels = [c * target / current for c in channels]
    r, g, b = (int(round(min(255.0, max(0.0, c)))) for c in channels)
    return (r, g, b)


def _pick_palette(rng: random.Random, light_probability: float) -> _Palette:
    light = rng.random() < light_probability
    background = _color_with_luma(rng, *(_LIGHT_BG if light else _DARK_BG))
    text = _color_with_luma(rng, *(_DARK_TEXT if light else _LIGHT_TEXT))
    return _Palette(light_background=light, background=background, text=text)


def _background(rng: random.Random, width: int, height: int, palette: _Palette) -> tuple[Image.Image, str]:
    """A solid, vertical-gradient, noisy or speckled background; every pixel stays in the palette's band."""
    style = rng.choice(BACKGROUND_STYLES)
    top = np.array(palette.background, dtype=np.float64)
    bottom = np.array(palette.background_color(rng), dtype=np.float64) if style == "gradient" else top
    t = np.linspace(0.0, 1.0, height)[:, None]
    rows = np.rint(top * (1.0 - t) + bottom * t).astype(np.int16)  # (height, 3)
    pixels = np.broadcast_to(rows[:, None, :], (height, width, 3))
    if style in ("noise", "speckle"):
        pixels = np.clip(pixels + _jitter(rng, style, width, height)[:, :, None], 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), "RGB"), style


def _jitter(rng: random.Random, style: str, width: int, height: int) -> np.ndarray:
    """Grey-level offsets (the same on all channels) of at most _BG_JITTER, as int16."""
    generator = np.random.default_rng(rng.getrandbits(64))
    if style == "noise":
        return generator.integers(-_NOISE_AMPLITUDE, _NOISE_AMPLITUDE + 1, size=(height, width), dtype=np.int16)
    u = generator.random((height, width), dtype=np.float32)
    offsets = np.zeros((height, width), dtype=np.int16)
    offsets[u < _SPECKLE_FRACTION] = _BG_JITTER
    offsets[u < _SPECKLE_FRACTION / 2] = -_BG_JITTER
    return offsets


# --------------------------------------------------------------------------- painting


class _Painter:
    """Draws text through ink masks onto an image, recording each line, its box and colour."""

    def __init__(self, image: Image.Image) -> None:
        self.image = image
        self.base = image.copy()
        self.mask = Image.new("L", image.size, 0)
        self.lines: list[TextLine] = []
        self.colors: list[RGB] = []

    def inside(self, box: Box) -> bool:
        x0, y0, x1, y1 = box
        return 0 <= x0 < x1 <= self.image.width and 0 <= y0 < y1 <= self.image.height

    def paste(self, mask: Image.Image, x: int, y: int, color: RGB) -> None:
        box = (x, y, x + mask.width, y + mask.height)
        self.image.paste(color, box, mask)
        self.mask.paste(ImageChops.lighter(self.mask.crop(box), mask), box)

    def add_line(self, text: str, box: Box, color: RGB) -> None:
        self.lines.append(TextLine(text=text, box=box))
        self.colors.append(color)

    def draw(self, text: str, font: Font, x: int, y: int, color: RGB) -> bool:
        """Draw `text` as ImageDraw.text((x, y)) would; refuse (False) if any ink would be clipped."""
        return self.draw_ink(text, _ink(text, font), x, y, color)

    def draw_ink(self, text: str, ink: _Ink, x: int, y: int, color: RGB) -> bool:
        box = ink.box_at(x, y)
        if not self.inside(box):
            return False
        self.paste(ink.mask, box[0], box[1], color)
        self.add_line(text, box, color)
        return True


# --------------------------------------------------------------------------- content


def _made_up_word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))


def _word(rng: random.Random) -> str:
    return rng.choice(_WORDS) if rng.random() < 0.8 else _made_up_word(rng)


def _price(rng: random.Random) -> str:
    return f"${rng.randint(0, 999)}.{rng.randint(0, 99):02d}"


def _date(rng: random.Random) -> str:
    year, month, day = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    style = rng.randrange(3)
    if style == 0:
        return f"{year}-{month:02d}-{day:02d}"
    if style == 1:
        return f"{day:02d}/{month:02d}/{year}"
    return f"{_MONTHS[month - 1]} {day}, {year}"


def _code(rng: random.Random) -> str:
    letters = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(rng.randint(2, 3)))
    return f"{letters}-{rng.randint(100, 99999)}"


def _token(rng: random.Random) -> str:
    """A short scene-text token: a word in some case, a number, price, date or code."""
    roll = rng.random()
    if roll < 0.25:
        return _word(rng).capitalize()
    if roll < 0.45:
        return _word(rng).upper()
    if roll < 0.6:
        return _word(rng)
    if roll < 0.7:
        return str(rng.randint(0, 9999))
    if roll < 0.8:
        return _price(rng)
    if roll < 0.9:
        return _date(rng)
    return _code(rng)


def _sentence(rng: random.Random) -> list[str]:
    words = [_word(rng) for _ in range(rng.randint(4, 12))]
    if rng.random() < 0.4:
        words.insert(rng.randrange(1, len(words)), rng.choice((_price, _date, _code))(rng))
    words[0] = words[0].capitalize()
    words[-1] += rng.choice((".", ".", ".", "!", "?"))
    return words


def _title_words(rng: random.Random) -> list[str]:
    return [_word(rng).capitalize() for _ in range(rng.randint(2, 5))]


# --------------------------------------------------------------------------- scene text


@dataclass
class _Block:
    """Rotated line masks of a text block, cropped to their union's box."""

    lines: list[str]
    masks: list[Image.Image]
    union: Image.Image


def _rotated_block(lines: list[str], font: Font, centered: bool, angle: float) -> _Block | None:
    inks = [_ink(line, font) for line in lines]
    top, bottom = _vmetrics(font)
    pitch = (bottom - top) + max(2, (bottom - top) // 5)
    pad = 2 + (bottom - top) // 4
    block_w = max(ink.width for ink in inks) + 2 * pad
    block_h = max(pad + i * pitch + ink.dy - top + ink.height for i, ink in enumerate(inks)) + pad
    masks = []
    for i, ink in enumerate(inks):
        layer = Image.new("L", (block_w, block_h), 0)
        x = pad + ((block_w - 2 * pad - ink.width) // 2 if centered else 0)
        layer.paste(ink.mask, (x, pad + i * pitch + ink.dy - top))
        masks.append(layer.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=0))
    union = reduce(ImageChops.lighter, masks)
    bbox = union.getbbox()
    if bbox is None or any(mask.crop(bbox).getbbox() is None for mask in masks):
        return None
    return _Block(lines=lines, masks=[mask.crop(bbox) for mask in masks], union=union.crop(bbox))


def _shorten(lines: list[str]) -> list[str]:
    """Drop the last line, else the last word, else the last character."""
    if len(lines) > 1:
        return lines[:-1]
    words = lines[0].split(" ")
    if len(words) > 1:
        return [" ".join(words[:-1])]
    if len(lines[0]) > 1:
        return [lines[0][:-1]]
    raise RuntimeError("a single rotated character does not fit the image")


def _fit_block(
    lines: list[str], source: str, size: int, centered: bool, angle: float, limit: tuple[int, int]
) -> tuple[_Block, int]:
    """Shrink the font (then shorten the text) until the rotated block fits in `limit`."""
    while True:
        block = _rotated_block(lines, _font(source, size), centered, angle)
        if block is not None and block.union.width <= limit[0] and block.union.height <= limit[1]:
            return block, size
        if size > MIN_FONT_SIZE:
            scale = 1.0 if block is None else min(limit[0] / block.union.width, limit[1] / block.union.height)
            size = max(MIN_FONT_SIZE, min(size - 1, int(size * scale * 0.97)))
        else:
            lines = _shorten(lines)


def _render_scene_text(
    rng: random.Random, image: Image.Image, source: str, palette: _Palette, max_rotation_deg: float
) -> tuple[_Painter, dict[str, Any], list[dict[str, str]]]:
    width, height = image.size
    lines = [" ".join(_token(rng) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 2))]
    angle = max(-max_rotation_deg, min(max_rotation_deg, round(rng.uniform(-max_rotation_deg, max_rotation_deg), 1)))
    angle = angle + 0.0  # no negative zero in the fields
    size = _clamp(rng.randint(min(width, height) // 8, min(width, height) // 3), MIN_FONT_SIZE, 200)
    margin = 2
    block, size = _fit_block(lines, source, size, rng.random() < 0.5, angle, (width - 2 * margin, height - 2 * margin))
    x = rng.randint(margin, width - margin - block.union.width)
    y = rng.randint(margin, height - margin - block.union.height)
    painter = _Painter(image)
    painter.paste(block.union, x, y, palette.text)
    for text, mask in zip(block.lines, block.masks):
        bx0, by0, bx1, by1 = mask.getbbox()
        painter.add_line(text, (x + bx0, y + by0, x + bx1, y + by1), palette.text)
    fields: dict[str, Any] = {
        "lines": list(block.lines),
        "font_size": size,
        "rotation_deg": angle,
        "text_color": list(palette.text),
        "background_color": list(palette.background),
        "light_background": palette.light_background,
    }
    qa = [
        {"question": "What does the text say?", "answer": " ".join(block.lines)},
        {"question": "How many lines of text are there?", "answer": str(len(block.lines))},
    ]
    return painter, fields, qa


# --------------------------------------------------------------------------- document


def _wrap(words: list[str], font: Font, max_width: int) -> list[str]:
    """Greedy word wrap by measured advance widths; a word wider than a whole line is left out.

    Widths are summed per word (kerning across a space is ignored), with 2 px to spare; the
    painter still refuses any line whose actual ink would leave the image.
    """
    space = font.getlength(" ")
    lines: list[str] = []
    current: list[str] = []
    used = 0.0
    for word in words:
        width = font.getlength(word)
        if width + 2 > max_width:
            continue
        if current and used + space + width + 2 > max_width:
            lines.append(" ".join(current))
            current = []
        used = used + space + width if current else width
        current.append(word)
    if current:
        lines.append(" ".join(current))
    return lines


def _render_document(
    rng: random.Random, image: Image.Image, source: str, palette: _Palette
) -> tuple[_Painter, dict[str, Any], list[dict[str, str]]]:
    width, height = image.size
    margin = max(4, min(width, height) // 16)
    body_size = _clamp(rng.randint(min(width, height) // 40, min(width, height) // 22), MIN_FONT_SIZE, 40)
    title_size = max(body_size + 2, round(body_size * rng.uniform(1.3, 1.8)))
    title, title_font, _ = _fit_text(_title_words(rng), source, title_size, width - 2 * margin)
    painter = _Painter(image)
    title_ink = _ink(title, title_font)
    x = (width - title_ink.width) // 2 - title_ink.dx if rng.random() < 0.5 else margin - title_ink.dx
    if not painter.draw_ink(title, title_ink, x, margin - title_ink.dy, palette.text):
        raise RuntimeError("document title does not fit")  # unreachable above the minimum size
    cursor = margin + title_ink.height + max(4, title_ink.height // 2)
    body_font = _font(source, body_size)
    paragraphs = _draw_paragraphs(rng, painter, body_font, margin, cursor, palette.text)
    fields: dict[str, Any] = {"title": title, "paragraphs": paragraphs}
    qa = [
        {"question": "What is the title of the document?", "answer": title},
        {"question": "How many paragraphs does the document have?", "answer": str(len(paragraphs))},
    ]
    return painter, fields, qa


def _draw_paragraphs(
    rng: random.Random, painter: _Painter, font: Font, margin: int, cursor: int, color: RGB
) -> list[str]:
    """Draw wrapped paragraphs from `cursor` down while they fit; return the drawn text of each."""
    width, height = painter.image.size
    top, bottom = _vmetrics(font)
    line_h = bottom - top
    pitch = line_h + max(2, round(line_h * rng.uniform(0.15, 0.5)))
    paragraphs: list[str] = []
    for _ in range(rng.randint(2, 8)):
        words = [w for _ in range(rng.randint(1, 4)) for w in _sentence(rng)]
        drawn = []
        for line in _wrap(words, font, width - 2 * margin):
            if cursor + line_h > height - margin or not painter.draw(line, font, margin, cursor - top, color):
                break
            drawn.append(line)
            cursor += pitch
        if drawn:
            paragraphs.append(" ".join(drawn))
        if len(drawn) == 0 or cursor + line_h > height - margin:
            break
        cursor += pitch // 2
    return paragraphs


# --------------------------------------------------------------------------- table


_COLUMN_MAKERS = {
    "Price": _price,
    "Qty": lambda rng: str(rng.randint(1, 999)),
    "Stock": lambda rng: str(rng.randint(0, 5000)),
    "Code": _code,
    "Date": lambda rng: f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
    "Rating": lambda rng: f"{rng.randint(10, 50) / 10:.1f}",
    "Weight": lambda rng: f"{rng.randint(1, 999) / 100:.2f} kg",
}
_NUMERIC_COLUMNS = frozenset({"Price", "Qty", "Stock", "Rating", "Weight"})


def _table_content(rng: random.Random) -> tuple[list[str], list[list[str]]]:
    columns = rng.sample(sorted(_COLUMN_MAKERS), rng.randint(1, 3))
    n_rows = rng.randint(2, 8)
    names = rng.sample(_ITEMS, n_rows)
    header = [rng.choice(_ITEM_HEADERS)] + columns
    rows = [[name] + [_COLUMN_MAKERS[c](rng) for c in columns] for name in names]
    return header, rows


@dataclass
class _TableLayout:
    font_size: int
    pad: int
    line_w: int
    cells: list[list[_Ink]]  # header row first
    col_w: list[int]
    row_h: int
    top: int  # smallest ink dy over all cells

    @property
    def size(self) -> tuple[int, int]:
        n_cols, n_rows = len(self.col_w), len(self.cells)
        return sum(self.col_w) + (n_cols + 1) * self.line_w, n_rows * self.row_h + (n_rows + 1) * self.line_w


def _measure_table(table: list[list[str]], source: str, size: int, line_w: int) -> _TableLayout:
    font = _font(source, size)
    pad = max(2, size // 4)
    cells = [[_ink(text, font) for text in row] for row in table]
    flat = [ink for row in cells for ink in row]
    top = min(ink.dy for ink in flat)
    row_h = max(ink.dy + ink.height for ink in flat) - top + 2 * pad
    col_w = [max(row[c].width for row in cells) + 2 * pad for c in range(len(table[0]))]
    return _TableLayout(size, pad, line_w, cells, col_w, row_h, top)


def _fit_table(
    table: list[list[str]], source: str, size: int, line_w: int, limit: tuple[int, int]
) -> tuple[list[list[str]], _TableLayout]:
    """Shrink the font, then drop the last rows / widest columns, until the table fits `limit`."""
    while True:
        layout = _measure_table(table, source, size, line_w)
        too_wide, too_tall = layout.size[0] > limit[0], layout.size[1] > limit[1]
        if not (too_wide or too_tall):
            return table, layout
        if size > MIN_FONT_SIZE:
            size = max(MIN_FONT_SIZE, size - max(1, size // 10))
        elif too_tall and len(table) > 2:
            table = table[:-1]
        elif too_wide and len(table[0]) > 2:
            drop = max(range(1, len(table[0])), key=lambda c: layout.col_w[c])
            table = [row[:drop] + row[drop + 1:] for row in table]
        else:
            raise RuntimeError("table does not fit the image even at the minimum font size")


def _draw_grid(
    image: Image.Image, layout: _TableLayout, x0: int, y0: int, palette: _Palette, header_fill: RGB | None
) -> None:
    """Draw the grid lines (in the text colour) and the optional header fill."""
    draw = ImageDraw.Draw(image)
    table_w, table_h = layout.size
    lw = layout.line_w
    if header_fill is not None:
        draw.rectangle((x0 + lw, y0 + lw, x0 + table_w - lw - 1, y0 + lw + layout.row_h - 1), fill=header_fill)
    y = y0
    for _ in range(len(layout.cells) + 1):
        draw.rectangle((x0, y, x0 + table_w - 1, y + lw - 1), fill=palette.text)
        y += layout.row_h + lw
    x = x0
    for w in [0] + layout.col_w:
        x += w
        draw.rectangle((x, y0, x + lw - 1, y0 + table_h - 1), fill=palette.text)
        x += lw


def _draw_cells(painter: _Painter, table: list[list[str]], layout: _TableLayout, x0: int, y0: int, color: RGB) -> None:
    """Draw every cell inside its grid cell: header and text left-aligned, numeric data right-aligned."""
    lw, pad = layout.line_w, layout.pad
    numeric = [name in _NUMERIC_COLUMNS for name in table[0]]
    for r, (texts, inks) in enumerate(zip(table, layout.cells)):
        cell_y = y0 + lw + r * (layout.row_h + lw)
        cell_x = x0 + lw
        for c, (text, ink) in enumerate(zip(texts, inks)):
            ink_x = cell_x + (layout.col_w[c] - pad - ink.width if r > 0 and numeric[c] else pad)
            if not painter.draw_ink(text, ink, ink_x - ink.dx, cell_y + pad - layout.top, color):
                raise RuntimeError(f"table cell {text!r} does not fit")  # unreachable: layout measured
            cell_x += layout.col_w[c] + lw


def _render_table(
    rng: random.Random, image: Image.Image, source: str, palette: _Palette
) -> tuple[_Painter, dict[str, Any], list[dict[str, str]]]:
    width, height = image.size
    margin = max(4, min(width, height) // 20)
    size = _clamp(rng.randint(min(width, height) // 30, min(width, height) // 16), MIN_FONT_SIZE, 32)
    header, rows = _table_content(rng)
    line_w = rng.choice((1, 1, 2))
    table, layout = _fit_table([header] + rows, source, size, line_w, (width - 2 * margin, height - 2 * margin))
    header, rows = table[0], table[1:]
    x0 = margin + rng.randint(0, width - 2 * margin - layout.size[0])
    y0 = margin + rng.randint(0, height - 2 * margin - layout.size[1])
    _draw_grid(image, layout, x0, y0, palette, palette.background_color(rng) if rng.random() < 0.5 else None)
    painter = _Painter(image)
    _draw_cells(painter, table, layout, x0, y0, palette.text)
    fields: dict[str, Any] = {"header": header, "rows": rows}
    return painter, fields, _table_qa(rng, header, rows)


def _table_qa(rng: random.Random, header: list[str], rows: list[list[str]]) -> list[dict[str, str]]:
    qa = [
        {"question": "How many rows does the table have?", "answer": str(len(rows))},
        {"question": "How many columns does the table have?", "answer": str(len(header))},
    ]
    cells = [(r, c) for r in range(len(rows)) for c in range(1, len(header))]
    for r, c in rng.sample(cells, min(3, len(cells))):
        qa.append({"question": f"What is the {header[c]} of {rows[r][0]}?", "answer": rows[r][c]})
    return qa


# --------------------------------------------------------------------------- chart


def _chart_content(rng: random.Random) -> tuple[list[str], list[str], list[float], list[str]]:
    pool = rng.choice((_MONTHS, _REGIONS, _QUARTERS, _ITEMS))
    n = rng.randint(3, min(7, len(pool)))
    start = rng.randrange(len(pool) - n + 1)
    labels = list(pool[start:start + n]) if pool is not _ITEMS else rng.sample(pool, n)
    title = [rng.choice(_METRICS)] + rng.choice((["by", "Month"], ["in", str(rng.randint(1990, 2030))], []))
    style = rng.randrange(3)
    numbers = rng.sample(range(5, 1000 if style == 1 else 100), n)
    if style == 1:
        values: list[float] = [v / 10 for v in numbers]
        printed = [f"{v:.1f}" for v in values]
    else:
        values = [float(v) for v in numbers]
        printed = [f"{v}%" if style == 2 else str(v) for v in numbers]
    return title, labels, values, printed


@dataclass
class _ChartLayout:
    title: str
    title_ink: _Ink
    labels: list[_Ink]
    values: list[_Ink]
    n: int
    gap: int


def _row_extent(inks: Sequence[_Ink]) -> tuple[int, int]:
    """Top and bottom of a row of inks sharing one baseline, relative to the draw origin."""
    return min(ink.dy for ink in inks), max(ink.dy + ink.height for ink in inks)


def _chart_fits(layout: _ChartLayout, width: int, height: int, margin: int) -> bool:
    slot = (width - 2 * margin) / layout.n
    widest = max(ink.width for ink in layout.labels[: layout.n] + layout.values[: layout.n])
    label_top, label_bottom = _row_extent(layout.labels[: layout.n])
    value_top, value_bottom = _row_extent(layout.values[: layout.n])
    needed = layout.title_ink.height + (label_bottom - label_top) + (value_bottom - value_top)
    min_bars = max(8, (height - 2 * margin) // 4)
    return widest + 4 <= slot and needed + 5 * layout.gap + min_bars <= height - 2 * margin


def _fit_chart(
    rng: random.Random,
    title_words: list[str],
    labels: list[str],
    printed: list[str],
    source: str,
    width: int,
    height: int,
    margin: int,
) -> _ChartLayout:
    """Shrink title and label fonts, then drop trailing categories (keeping 2), until the chart fits."""
    title_size = _clamp(rng.randint(min(width, height) // 16, min(width, height) // 10), MIN_FONT_SIZE, 48)
    label_size = _clamp(round(title_size * rng.uniform(0.6, 0.85)), MIN_FONT_SIZE, 36)
    n = len(labels)
    while True:
        title, title_font, _ = _fit_text(title_words, source, title_size, width - 2 * margin)
        font = _font(source, label_size)
        gap = max(2, label_size // 5)
        layout = _ChartLayout(title, _ink(title, title_font), [_ink(t, font) for t in labels],
                              [_ink(t, font) for t in printed], n, gap)
        if _chart_fits(layout, width, height, margin):
            return layout
        if title_size > MIN_FONT_SIZE or label_size > MIN_FONT_SIZE:
            title_size = max(MIN_FONT_SIZE, title_size - max(1, title_size // 8))
            label_size = max(MIN_FONT_SIZE, label_size - max(1, label_size // 8))
        elif n > 2:
            n -= 1
        else:
            raise RuntimeError("chart does not fit the image even at the minimum font size")


def _render_chart(
    rng: random.Random, image: Image.Image, source: str, palette: _Palette
) -> tuple[_Painter, dict[str, Any], list[dict[str, str]]]:
    width, height = image.size
    margin = max(4, min(width, height) // 20)
    title_words, labels, values, printed = _chart_content(rng)
    layout = _fit_chart(rng, title_words, labels, printed, source, width, height, margin)
    labels, values, printed = labels[: layout.n], values[: layout.n], printed[: layout.n]
    bar_tops = _draw_bars(rng, image, layout, values, palette, margin)
    painter = _Painter(image)
    _draw_chart_text(painter, layout, labels, printed, bar_tops, margin, palette.text)
    fields: dict[str, Any] = {"title": layout.title, "labels": labels, "values": values, "value_labels": printed}
    return painter, fields, _chart_qa(rng, layout.title, labels, values, printed)


def _axis_y(layout: _ChartLayout, height: int, margin: int) -> int:
    label_top, label_bottom = _row_extent(layout.labels[: layout.n])
    return height - margin - (label_bottom - label_top) - layout.gap - 2


def _draw_bars(
    rng: random.Random, image: Image.Image, layout: _ChartLayout, values: list[float], palette: _Palette, margin: int
) -> list[int]:
    """Draw the axis and bars; return the top y of each bar."""
    width, height = image.size
    value_top, value_bottom = _row_extent(layout.values[: layout.n])
    plot_top = margin + layout.title_ink.height + 2 * layout.gap + (value_bottom - value_top)
    axis_y = _axis_y(layout, height, margin)
    slot = (width - 2 * margin) / layout.n
    bar_w = max(2, int(slot * rng.uniform(0.45, 0.75)))
    draw = ImageDraw.Draw(image)
    draw.rectangle((margin, axis_y, width - margin - 1, axis_y + 1), fill=palette.text)
    if rng.random() < 0.5:
        colors = [palette.graphic_color(rng)] * layout.n
    else:
        colors = [palette.graphic_color(rng) for _ in values]
    tops = []
    for i, (value, color) in enumerate(zip(values, colors)):
        bar_h = max(2, round(value / max(values) * (axis_y - plot_top)))
        cx = margin + slot * (i + 0.5)
        x0 = int(round(cx - bar_w / 2))
        draw.rectangle((x0, axis_y - bar_h, x0 + bar_w - 1, axis_y - 1), fill=color)
        tops.append(axis_y - bar_h)
    return tops


def _draw_chart_text(
    painter: _Painter,
    layout: _ChartLayout,
    labels: list[str],
    printed: list[str],
    bar_tops: list[int],
    margin: int,
    color: RGB,
) -> None:
    width, height = painter.image.size
    title_ink = layout.title_ink
    title_x = (width - title_ink.width) // 2 - title_ink.dx
    ok = painter.draw_ink(layout.title, title_ink, title_x, margin - title_ink.dy, color)
    slot = (width - 2 * margin) / layout.n
    label_top, _ = _row_extent(layout.labels[: layout.n])
    _, value_bottom = _row_extent(layout.values[: layout.n])
    label_y = _axis_y(layout, height, margin) + 2 + layout.gap - label_top
    for i in range(layout.n):
        cx = margin + slot * (i + 0.5)
        value_y = bar_tops[i] - layout.gap - value_bottom
        for text, ink, y in ((labels[i], layout.labels[i], label_y), (printed[i], layout.values[i], value_y)):
            ok = painter.draw_ink(text, ink, int(round(cx - ink.width / 2)) - ink.dx, y, color) and ok
    if not ok:
        raise RuntimeError("chart text does not fit")  # unreachable: layout measured


def _chart_qa(
    rng: random.Random, title: str, labels: list[str], values: list[float], printed: list[str]
) -> list[dict[str, str]]:
    highest = max(range(len(values)), key=values.__getitem__)
    lowest = min(range(len(values)), key=values.__getitem__)
    qa = [
        {"question": "What is the title of the chart?", "answer": title},
        {"question": "Which category has the highest value?", "answer": labels[highest]},
        {"question": "Which category has the lowest value?", "answer": labels[lowest]},
    ]
    for i in rng.sample(range(len(labels)), min(3, len(labels))):
        qa.append({"question": f"What is the value for {labels[i]}?", "answer": printed[i]})
    return qa
