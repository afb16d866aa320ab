"""Loss curves as PNG, drawn with Pillow (no plotting library in the stack)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["plot_curves", "plot_loss"]

_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    ticks = []
    v = start
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 10))
        v += step
    return ticks


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_curves(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "optimizer step",
    ylabel: str = "loss",
    size: tuple[int, int] = (900, 520),
    smooth: int = 0,
) -> Path:
    """Draw ``{name: [(x, y), ...]}`` as lines on one chart and save it as PNG.

    :param smooth: also draw a moving average over this many points (thin raw line, thick average).
    :returns: ``Path(path)``.
    """
    width, height = size
    left, right, top, bottom = 80, 24, 44, 64
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(x) and math.isfinite(y)]
    if title:
        draw.text((left, 12), title, fill="black", font=font)
    x0, y0, x1, y1 = left, top, width - right, height - bottom
    draw.rectangle((x0, y0, x1, y1), outline=(80, 80, 80))
    if not pts:
        draw.text((x0 + 20, (y0 + y1) // 2), "no data", fill="black", font=font)
        img.save(path)
        return Path(path)
    xmin, xmax = min(p[0] for p in pts), max(p[0] for p in pts)
    ymin, ymax = min(p[1] for p in pts), max(p[1] for p in pts)
    if xmax == xmin:
        xmax = xmin + 1
    # a flat curve of huge values: 0.5 is lost in the float rounding of 1e16 and above, so pad relatively
    pad = (ymax - ymin) * 0.05 or max(0.5, abs(ymax) * 0.05)
    ymin, ymax = max(0.0, ymin - pad) if ymin >= 0 else ymin - pad, ymax + pad
    if not ymax > ymin:  # still no room (float64 rounding): pad by a tenth of the value
        span = abs(ymax) * 0.1 or 1.0
        ymin, ymax = ymin - span, ymax + span

    def sx(x: float) -> float:
        return x0 + (x - xmin) / (xmax - xmin) * (x1 - x0)

    def sy(y: float) -> float:
        return y1 - (y - ymin) / (ymax - ymin) * (y1 - y0)

    for t in _nice_ticks(ymin, ymax):
        y = sy(t)
        draw.line((x0, y, x1, y), fill=(230, 230, 230))
        draw.text((x0 - 8, y), f"{t:g}", fill="black", font=small, anchor="rm")
    for t in _nice_ticks(xmin, xmax):
        x = sx(t)
        draw.line((x, y1, x, y1 + 5), fill=(80, 80, 80))
        draw.text((x, y1 + 8), f"{t:g}", fill="black", font=small, anchor="mt")
    draw.text(((x0 + x1) / 2, height - 22), xlabel, fill="black", font=font, anchor="mm")
    draw.text((14, (y0 + y1) / 2), ylabel, fill="black", font=font, anchor="lm")
    for k, (name, s) in enumerate(series.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        clean = [(x, y) for x, y in s if math.isfinite(x) and math.isfinite(y)]
        if not clean:
            continue
        xy = [(sx(x), sy(y)) for x, y in clean]
        if smooth > 1 and len(clean) > smooth:
            faint = tuple(int(c + (255 - c) * 0.6) for c in colour)
            draw.line(xy, fill=faint, width=1)
            avg = _smooth([y for _, y in clean], smooth)
            draw.line([(sx(x), sy(y)) for (x, _), y in zip(clean, avg, strict=True)], fill=colour, width=3)
        elif len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        else:
            draw.ellipse((xy[0][0] - 3, xy[0][1] - 3, xy[0][0] + 3, xy[0][1] + 3), fill=colour)
        lx, ly = x1 - 200, y0 + 10 + 18 * k
        draw.line((lx, ly + 7, lx + 24, ly + 7), fill=colour, width=3)
        draw.text((lx + 30, ly), name, fill="black", font=small)
    img.save(path)
    return Path(path)


def plot_loss(losses: Sequence[tuple[int, float]], path: str | Path, *, title: str = "") -> Path:
    """One training loss curve (step, loss) with a moving average when there are many points."""
    window = max(1, len(losses) // 20)
    return plot_curves({"training loss": losses}, path, title=title, smooth=window if window > 1 else 0)
