"""A braille line plot: the mean of a metric with its spread across clients as a band.

``render_plot`` is pure (points in, Rich Text out), so it is tested without a terminal.
Each character cell holds 2 x 4 dots; where layers meet in a cell, the later layer's colour
wins (band, then per-client lines, then the mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from rich.text import Text

from scaleout.core.metrics import Spread

_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))  # [row][col] within a cell
LINE_COLOURS = ("cyan", "magenta", "yellow", "green", "blue", "red")


class Canvas:
    def __init__(self, cols: int, rows: int) -> None:
        self.cols, self.rows = cols, rows
        self.width, self.height = cols * 2, rows * 4
        self.cells: list[list[int]] = [[0] * cols for _ in range(rows)]
        self.styles: list[list[str]] = [[""] * cols for _ in range(rows)]

    def dot(self, x: int, y: int, style: str) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            row, col = y // 4, x // 2
            self.cells[row][col] |= _BITS[y % 4][x % 2]
            self.styles[row][col] = style

    def line(self, x0: int, y0: int, x1: int, y1: int, style: str) -> None:
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.dot(x0, y0, style)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def rows_text(self) -> list[Text]:
        out = []
        for row in range(self.rows):
            t = Text()
            for col in range(self.cols):
                bits = self.cells[row][col]
                t.append(chr(0x2800 + bits) if bits else " ", self.styles[row][col] or None)
            out.append(t)
        return out


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.4g}"


def render_plot(
    width: int, height: int, points: list[tuple[float, Spread]], lines: dict[str, list[tuple[float, float]]] | None = None,
    x_label: str = "round",
) -> Text:
    """The plot in ``width`` x ``height`` cells: y labels left, x labels under it."""
    lines = lines or {}
    ys = [v for _, s in points for v in (s.min, s.max, s.mean)] + [v for pts in lines.values() for _, v in pts]
    xs = [x for x, _ in points] + [x for pts in lines.values() for x, _ in pts]
    ys = [y for y in ys if math.isfinite(y)]
    if not xs or not ys or width < 16 or height < 3:
        return Text("no values yet: they appear as clients report them", style="dim")
    lo, hi = min(ys), max(ys)
    label_w = max(len(_fmt(lo)), len(_fmt(hi)), len(_fmt((lo + hi) / 2)), len(x_label.split(".")[0]) + 1) + 1  # the axis' name fits left
    cols, rows = width - label_w, height - 1
    canvas = Canvas(cols, rows)
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    if x1 - x0 < 1e-12:
        x0, x1 = x0 - 0.5, x1 + 0.5

    def px(x: float) -> int:
        return round((x - x0) / (x1 - x0) * (canvas.width - 1))

    def py(y: float) -> int:
        return round((y1 - y) / (y1 - y0) * (canvas.height - 1))

    # The spread across clients: its min and max as dim lines (a band that still reads
    # without colour), the mean over them in bright dots.
    for (xa, sa), (xb, sb) in zip(points, points[1:]):
        canvas.line(px(xa), py(sa.max), px(xb), py(sb.max), "grey50")
        canvas.line(px(xa), py(sa.min), px(xb), py(sb.min), "grey50")
    for xs_, s in points:
        for y in range(py(s.max), py(s.min) + 1, 2):
            canvas.dot(px(xs_), y, "grey50")
    for i, (_, pts) in enumerate(sorted(lines.items())):
        colour = LINE_COLOURS[i % len(LINE_COLOURS)]
        for (xa, va), (xb, vb) in zip(pts, pts[1:]):
            canvas.line(px(xa), py(va), px(xb), py(vb), colour)
        if len(pts) == 1:
            canvas.dot(px(pts[0][0]), py(pts[0][1]), colour)
    for (xa, sa), (xb, sb) in zip(points, points[1:]):
        canvas.line(px(xa), py(sa.mean), px(xb), py(sb.mean), "bold bright_white")
    for xm, sm in points:
        canvas.dot(px(xm), py(sm.mean), "bold bright_white")
    out = Text()
    body = canvas.rows_text()
    for i, row in enumerate(body):
        label = _fmt(y1) if i == 0 else _fmt(y0) if i == rows - 1 else _fmt((y0 + y1) / 2) if i == rows // 2 else ""
        out.append(label.rjust(label_w - 1) + "┤" if label else " " * (label_w - 1) + "│", "dim")
        out.append_text(row)
        out.append("\n")
    out.append(x_axis(label_w, cols, px, x0, x1, x_label), "dim")
    return out


def x_axis(margin: int, cols: int, px: Callable[[float], int], x0: float, x1: float, x_label: str) -> str:
    """The line under the plot: the axis' name, then round numbers under their places, as many as fit. Training steps (``round.step``) sit in [round - 1, round): round r is labelled
    where it starts."""
    offset = 1 if x_label == "round.step" else 0
    first, last = math.ceil(x0 - 1e-9), math.floor(x1 + 1e-9)
    width = len(str(last + offset)) + 2
    step = next(n for n in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10**9) if (last - first) // n + 1 <= max(1, cols // width))
    line = [" "] * (margin + cols)
    end, start = 0, -1  # the first column free after the last label; where the first label starts
    for k in range(first - first % step if first % step else first, last + 1, step):
        if k < first:
            continue
        text = str(k + offset)
        at = margin + px(float(k)) // 2 - (len(text) - 1) // 2
        at = min(max(at, end, margin), len(line) - len(text))
        if at < end:
            continue
        line[at:at + len(text)] = text
        end = at + len(text) + 1
        start = at if start < 0 else start
    name = x_label.split(".")[0]  # "round 1   2   3", the name before the first label (the y labels' margin is free there)
    if start > len(name):
        line[start - len(name) - 1:start - 1] = name
    elif end + len(name) <= len(line):
        line[len(line) - len(name):] = name
    return "".join(line).rstrip()
