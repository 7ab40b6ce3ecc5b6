"""What a training run shows: a progress bar and a loss-curve PNG, with no required dependencies.

* :class:`ProgressBar` draws on a terminal only (in a log file the periodic log lines are the record): with
  ``tqdm`` when it is installed, else a one-line bar of its own.
* :func:`save_loss_curve` draws with ``matplotlib`` when it is installed, else rasterises the curve itself and
  writes the PNG with ``zlib`` (axes, grid, the curve, the entropy floor dashed, numeric tick labels; no title).
  ``pip install matplotlib tqdm`` (the ``examples`` extra) gives the nicer versions.
"""

from __future__ import annotations

import struct
import sys
import time
import zlib
from typing import Optional, Sequence

import numpy as np


class ProgressBar:
    """``update(n)`` / ``set_postfix(text)`` / ``write(line)`` / ``close()``, over ``total`` steps."""

    def __init__(self, total: int, enabled: bool = True, desc: str = "train") -> None:
        self.total, self.enabled, self.desc = total, enabled, desc
        self.count, self.postfix, self.start = 0, "", time.perf_counter()
        self._tqdm = None
        self._tty = enabled and sys.stderr.isatty()
        if self._tty:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._tqdm = tqdm(total=total, desc=desc, dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._tqdm is not None:
            self._tqdm.update(n)
        elif self._tty:
            self._draw()

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(text)

    def write(self, line: str) -> None:
        """Print ``line`` above the bar."""
        if self._tqdm is not None:
            self._tqdm.write(line)
            return
        if self._tty:
            sys.stderr.write("\r\033[K")
        print(line, flush=True)
        if self._tty:
            self._draw()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._tty:
            sys.stderr.write("\n")

    def _draw(self) -> None:
        width = 30
        done = int(width * self.count / max(self.total, 1))
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r{self.desc} [{'#' * done}{'.' * (width - done)}] {self.count}/{self.total} "
                         f"{elapsed:.0f}s {self.postfix}")
        sys.stderr.flush()


def save_loss_curve(path: str, losses: Sequence[float], floor: Optional[float] = None, title: str = "") -> str:
    """Write the loss per step to the PNG ``path`` (``floor``, if given, as a dashed line); return how it was
    drawn (``"matplotlib"`` or ``"builtin"``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _write_png(path, _raster_curve(list(losses), floor))
        return "builtin"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(range(1, len(losses) + 1), losses, label="training loss (mean over ranks)")
    if floor is not None:
        ax.axhline(floor, linestyle="--", color="gray", label=f"entropy of the data ({floor:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return "matplotlib"


# ------------------------------------------------------------------------------------------------------------
# The fallback rasteriser: numpy canvas, a 3x5 digit font, and a minimal PNG encoder.
_FONT = {  # 3 columns x 5 rows per glyph
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
}


def _text(canvas: np.ndarray, x: int, y: int, text: str, scale: int = 2) -> None:
    for ch in text:
        glyph = _FONT.get(ch)
        if glyph is not None:
            for i, bit in enumerate(glyph):
                if bit == "1":
                    r, c = divmod(i, 3)
                    canvas[y + r * scale:y + (r + 1) * scale, x + c * scale:x + (c + 1) * scale] = 0
        x += 4 * scale


def _line(canvas: np.ndarray, x0: float, y0: float, x1: float, y1: float, color: Sequence[int], dash: int = 0,
          width: int = 2) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    for i in range(n + 1):
        if dash and (i // dash) % 2:
            continue
        t = i / max(n, 1)
        x, y = int(round(x0 + t * (x1 - x0))), int(round(y0 + t * (y1 - y0)))
        canvas[max(y - width // 2, 0):y + (width + 1) // 2, max(x - width // 2, 0):x + (width + 1) // 2] = color


def _raster_curve(losses: list, floor: Optional[float], width: int = 720, height: int = 420) -> np.ndarray:
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 70, width - 20, 20, height - 40
    lo = min(losses + ([floor] if floor is not None else [])) if losses else 0.0
    hi = max(losses) if losses else 1.0
    lo, hi = lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9)
    steps = max(len(losses), 2)

    def px(step: float, value: float) -> tuple:
        return (left + (step - 1) / (steps - 1) * (right - left), bottom - (value - lo) / (hi - lo) * (bottom - top))

    for i in range(5):  # horizontal grid with value labels
        value = lo + (hi - lo) * i / 4
        _, y = px(1, value)
        _line(canvas, left, y, right, y, (225, 225, 225), width=1)
        _text(canvas, 8, int(y) - 5, f"{value:.2f}")
    for i in range(5):  # vertical grid with step labels
        step = 1 + (steps - 1) * i / 4
        x, _ = px(step, lo)
        _line(canvas, x, top, x, bottom, (225, 225, 225), width=1)
        _text(canvas, int(x) - 8, bottom + 10, str(int(round(step))))
    _line(canvas, left, bottom, right, bottom, (0, 0, 0))
    _line(canvas, left, top, left, bottom, (0, 0, 0))
    if floor is not None:
        _line(canvas, *px(1, floor), *px(steps, floor), (128, 128, 128), dash=6)
    for i in range(1, len(losses)):
        _line(canvas, *px(i, losses[i - 1]), *px(i + 1, losses[i]), (31, 119, 180))
    return canvas


def _write_png(path: str, rgb: np.ndarray) -> None:
    """Encode an ``[H, W, 3]`` uint8 image as an 8-bit RGB PNG (no filtering, zlib level 9)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))
