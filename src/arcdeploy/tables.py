"""The one table renderer: a titled table as Markdown (reports), aligned text (the terminal), or a
PrettyTable-style box (the IJB and .bin tables, as insightface's scripts print them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def cell(value: Any) -> str:
    """How a value reads in a table: None as "-", floats with 6 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


@dataclass
class Table:
    header: list[str]
    rows: list[list[Any]]
    title: str | None = None
    note: str | None = None

    def _cells(self) -> list[list[str]]:
        return [[cell(v) for v in row] for row in self.rows]

    def _widths(self, cells: list[list[str]]) -> list[int]:
        return [max(len(r[i]) for r in [self.header, *cells]) for i in range(len(self.header))]

    def markdown(self) -> str:
        parts = [f"## {self.title}", ""] if self.title else []
        if self.rows:
            parts.append("| " + " | ".join(self.header) + " |")
            parts.append("|" + "|".join("---" for _ in self.header) + "|")
            parts += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self._cells()]
        else:
            parts.append("_no results_")
        if self.note:
            parts += ["", self.note]
        return "\n".join(parts)

    def text(self) -> str:
        cells = self._cells()
        if cells:
            widths = self._widths(cells)
            fmt = "  ".join(f"{{:<{w}}}" for w in widths)
            body = "\n".join(
                [fmt.format(*self.header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in cells]
            )
        else:
            body = "(no results)"
        return "\n".join(p for p in (self.title, body, self.note) if p)

    def box(self) -> str:
        cells = self._cells()
        widths = self._widths(cells)
        line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

        def fmt(row: list[str]) -> str:
            return "|" + "|".join(f" {c:^{w}} " for c, w in zip(row, widths)) + "|"

        return "\n".join([line, fmt(self.header), line] + [fmt(r) for r in cells] + [line])

    def as_json(self) -> dict:
        return {"title": self.title, "header": self.header, "rows": self.rows, "note": self.note}


def box_table(header: list[str], body: list[list[Any]]) -> str:
    """Cells in a PrettyTable-style box, centred."""
    return Table(header, body).box()
