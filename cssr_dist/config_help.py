"""The config reference (`--help-config`, the README): type, default and the help that each
field of `config.py` carries beside it."""

from __future__ import annotations

import dataclasses
import typing

from .config import CHOICES, Config



def _rows(cls: type, prefix: str) -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) per leaf field; the meaning is the field's own `help`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += _rows(tp, key)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        name = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
        rows.append((key, name.replace("cssr_dist.config.", ""), repr(default), f.metadata.get("help", "")))
    return rows


def reference_table() -> str:
    """Markdown table of every key: type, default, meaning."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, meaning in _rows(Config, ""):
        if key in CHOICES and not meaning:
            meaning = " | ".join(CHOICES[key])
        cells = [f"`{key}`", tp, f"`{default}`", meaning]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
