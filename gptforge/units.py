"""Numbers for people: counts ("124M parameters", "52.3k tok/s") and sizes ("1.5 GiB"), written one way.

A bottom-layer module (standard library only), so `info`, the trainer's progress lines and every command
print the same number the same way.
"""

from __future__ import annotations

_COUNT_UNITS = (("", 1.0), ("k", 1e3), ("M", 1e6), ("B", 1e9), ("T", 1e12))
_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_count(n: float) -> str:
    """Three significant digits and a unit: 999, 52.3k, 124M, 1.32B, 175B; 17,867,008 -> "17.9M"."""
    sign, size = ("-" if n < 0 else ""), abs(n)
    for i, (unit, scale) in enumerate(_COUNT_UNITS):
        last = i == len(_COUNT_UNITS) - 1
        if not last and size >= _COUNT_UNITS[i + 1][1]:
            continue
        value = size / scale
        text = f"{value:.0f}" if not unit or value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"
        if float(text) >= 1000 and not last:  # 999.96k rounds to "1000": say 1.00M instead
            continue
        return sign + text + unit
    raise AssertionError("unreachable")


def human_bytes(n: float) -> str:
    """Binary units with one decimal: 512 B, 1.5 KiB, 3.0 TiB (TiB is the largest unit)."""
    for unit in _BYTE_UNITS:
        if abs(n) < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")
