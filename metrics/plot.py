"""The quality–diversity trade-off plot, drawn with Pillow (no plotting library needed)."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher is better on both)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def tradeoff_plot(diversity: list[float], reward: list[float], labels: list[str], *, x_label: str,
                  y_label: str, title: str, width: int = 768, height: int = 512) -> Image.Image:
    """Reward (y) against diversity (x), one labelled point per setting, Pareto front joined."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    small, big = _font(13), _font(16)
    # Pillow's default font has no glyphs beyond Latin-1: keep the labels ASCII
    left, right, top, bottom = 78, width - 24, 58, height - 58
    d.text((left, 8), title, fill="black", font=big)

    def span(values):
        lo, hi = min(values), max(values)
        pad = (hi - lo) * 0.08 or max(abs(hi) * 0.05, 1e-3)
        return lo - pad, hi + pad

    x0, x1 = span(diversity)
    y0, y1 = span(reward)
    px = lambda v: left + (v - x0) / (x1 - x0) * (right - left)
    py = lambda v: bottom - (v - y0) / (y1 - y0) * (bottom - top)
    d.rectangle([left, top, right, bottom], outline="black")
    for t in _ticks(x0, x1):
        d.line([px(t), bottom, px(t), bottom + 5], fill="black")
        d.line([px(t), top, px(t), bottom], fill=(232, 232, 232))
        d.text((px(t) - 18, bottom + 8), f"{t:.3g}", fill="black", font=small)
    for t in _ticks(y0, y1):
        d.line([left - 5, py(t), left, py(t)], fill="black")
        d.line([left, py(t), right, py(t)], fill=(232, 232, 232))
        d.text((6, py(t) - 7), f"{t:.3g}", fill="black", font=small)
    d.text(((left + right) // 2 - 6 * len(x_label) // 2, height - 26), x_label, fill="black", font=small)
    d.text((6, top - 26), y_label, fill="black", font=small)
    front = pareto_front(list(zip(diversity, reward)))
    if len(front) > 1:
        d.line([(px(diversity[i]), py(reward[i])) for i in front], fill=(200, 60, 40), width=2)
    for i, (x, y, name) in enumerate(zip(diversity, reward, labels)):
        on = i in front
        r = 6 if on else 4
        d.ellipse([px(x) - r, py(y) - r, px(x) + r, py(y) + r], fill=(200, 60, 40) if on else (60, 90, 160))
        d.text((px(x) + 8, py(y) - 16), name, fill="black", font=small)
    d.ellipse([right - 112, 12, right - 102, 22], fill=(200, 60, 40))  # legend, above the axes
    d.text((right - 96, 9), "Pareto front", fill=(200, 60, 40), font=small)
    return img


def curve_plot(steps: list[float], values: list[float], *, title: str, y_label: str, width: int = 640,
               height: int = 360, empty: tuple[str, ...] | list[str] = ("no steps yet",)) -> Image.Image:
    """A training curve (values against steps) with a 10-step running mean, drawn with Pillow.
    Without values the frame holds the lines of ``empty``, one per line."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    small, big = _font(13), _font(16)
    left, right, top, bottom = 78, width - 24, 44, height - 48
    d.text((left, 8), title, fill="black", font=big)
    d.rectangle([left, top, right, bottom], outline="black")
    if not values:
        for i, line in enumerate(empty):
            d.text((left + 12, top + 12 + 20 * i), line, fill="black", font=small)
        return img
    x_lo, x_hi = min(steps), max(max(steps), min(steps) + 1)
    y_lo, y_hi = min(values), max(values)
    pad = (y_hi - y_lo) * 0.08 or max(abs(y_hi) * 0.05, 1e-3)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def xy(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left), bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))
    for t in _ticks(y_lo, y_hi):
        _, py = xy(x_lo, t)
        d.line([left - 4, py, left, py], fill="black")
        d.text((4, py - 7), f"{t:.4g}", fill="black", font=small)
    for t in _ticks(x_lo, x_hi):
        px, _ = xy(t, y_lo)
        d.line([px, bottom, px, bottom + 4], fill="black")
        label = f"{t:.0f}" if x_hi - x_lo >= 8 else f"{t:.2f}".rstrip("0").rstrip(".")
        d.text((px - 10, bottom + 6), label, fill="black", font=small)
    d.text(((left + right) // 2 - 14, height - 20), "step", fill="black", font=small)
    d.text((4, top - 18), y_label, fill="black", font=small)
    raw = [xy(x, y) for x, y in zip(steps, values)]
    if len(raw) > 1:
        d.line(raw, fill=(170, 190, 230), width=1)
    smooth = [sum(values[max(0, i - 9):i + 1]) / len(values[max(0, i - 9):i + 1]) for i in range(len(values))]
    pts = [xy(x, y) for x, y in zip(steps, smooth)]
    if len(pts) > 1:
        d.line(pts, fill=(30, 80, 200), width=2)
    else:
        d.ellipse([pts[0][0] - 3, pts[0][1] - 3, pts[0][0] + 3, pts[0][1] + 3], fill=(30, 80, 200))
    return img
