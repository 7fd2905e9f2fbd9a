"""Coverage heatmap for ``polygon-backfill report``: PNG (Pillow) and one self-contained HTML.

Pure rendering: the caller computes a :class:`CoverageGrid` (one :class:`DayState` per
(ticker, timeframe) row per calendar day) and this module draws it. Nothing here reads the
database or the clock, so the same grid always gives byte-identical files; the only time
printed is ``grid.generated_at``.

Long spans: the PNG keeps its grid at most :data:`MAX_GRID_WIDTH` pixels wide. Up to that
many days, each day is one column of 1 to :data:`MAX_CELL_WIDTH` pixels; beyond it, each
pixel column covers several consecutive days and shows the WORST state among them
(missing > partial > complete > no session, see :attr:`DayState.severity`), so a gap is never
hidden by aggregation. The HTML is never aggregated: its inline SVG run-length encodes each
row (one rect per run of equal days) and scrolls sideways instead.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from itertools import pairwise
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from polygon_backfill.coverage import DayState

__all__ = [
    "COLOURS",
    "MAX_CELL_WIDTH",
    "MAX_GRID_WIDTH",
    "CoverageGrid",
    "CoverageRow",
    "DayRange",
    "DayState",
    "PngLayout",
    "aggregate_states",
    "format_range",
    "png_layout",
    "render_html",
    "render_png",
    "state_ranges",
    "worst_state",
    "write_report",
]


#: Okabe-Ito colours, distinguishable with the common colour-vision deficiencies; partial
#: (orange) is also clearly lighter than missing (vermilion) for greyscale printing.
COLOURS: dict[DayState, tuple[int, int, int]] = {
    DayState.COMPLETE: (0, 158, 115),    # bluish green #009E73
    DayState.PARTIAL: (230, 159, 0),     # orange #E69F00
    DayState.MISSING: (213, 94, 0),      # vermilion #D55E00
    DayState.NO_SESSION: (221, 221, 221),  # light grey #DDDDDD
}
_BACKGROUND = (255, 255, 255)
_INK = (34, 34, 34)
_MUTED = (110, 110, 110)
_CSS_CLASS = {DayState.COMPLETE: "c", DayState.PARTIAL: "p", DayState.MISSING: "m",
              DayState.NO_SESSION: "n"}


def worst_state(states: Iterable[DayState]) -> DayState:
    """The state an aggregated column shows: missing > partial > complete > no session."""
    return max(states, key=lambda state: state.severity, default=DayState.NO_SESSION)


def aggregate_states(states: Sequence[DayState], days_per_column: int) -> list[DayState]:
    """Fold consecutive days into columns of ``days_per_column`` (the last may be shorter),
    each showing its worst day, so a single missing day stays visible on a 15-year image."""
    if days_per_column < 1:
        raise ValueError(f"days_per_column must be at least 1, got {days_per_column}")
    return [worst_state(states[start:start + days_per_column])
            for start in range(0, len(states), days_per_column)]


@dataclass(frozen=True, slots=True)
class CoverageRow:
    """One (ticker, timeframe) line of the heatmap: ``states[i]`` is day ``first_day + i``."""

    label: str  # e.g. "AAPL 1d"
    states: Sequence[DayState]

    def __post_init__(self) -> None:
        # An immutable tuple of real DayStates: callers may pass lists or plain strings.
        object.__setattr__(self, "states", tuple(DayState(state) for state in self.states))

    def counts(self) -> dict[DayState, int]:
        """Days per state, every state present (zero included) in DayState order."""
        return _count(self.states)


@dataclass(frozen=True, slots=True)
class CoverageGrid:
    """Everything the report draws; rows share ``first_day`` and their number of days."""

    first_day: date  # day of column 0; columns are consecutive calendar days
    rows: Sequence[CoverageRow]
    title: str
    generated_at: datetime

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", tuple(self.rows))
        lengths = {len(row.states) for row in self.rows}
        if len(lengths) > 1:
            raise ValueError(f"every row needs the same number of days, got {sorted(lengths)}")

    @property
    def n_days(self) -> int:
        return len(self.rows[0].states) if self.rows else 0

    @property
    def days(self) -> list[date]:
        """The calendar day of each column."""
        return [self.first_day + timedelta(days=index) for index in range(self.n_days)]

    @property
    def last_day(self) -> date:
        """The last column's day (``first_day`` when the grid has no days)."""
        return self.first_day + timedelta(days=max(self.n_days - 1, 0))

    @property
    def is_empty(self) -> bool:
        """No rows or no days: the renderers then draw a "no data" report instead."""
        return self.n_days == 0

    def counts(self) -> dict[DayState, int]:
        """Cells per state over all rows (days, not aggregated pixel columns)."""
        return _count(state for row in self.rows for state in row.states)


def _count(states: Iterable[DayState]) -> dict[DayState, int]:
    counts = dict.fromkeys(DayState, 0)
    for state in states:
        counts[state] += 1
    return counts


# --------------------------------------------------------------------------------------
# Ranges: what the HTML lists per row.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DayRange:
    """First and last day (inclusive) of a stretch in one state, and how many such days."""

    start: date
    end: date
    days: int


def state_ranges(states: Sequence[DayState], first_day: date, state: DayState) -> list[DayRange]:
    """Merge the days in ``state`` into ranges. No-session days between two such days do not
    break a range (a gap from Friday to Monday is one gap, not two); ``days`` counts only the
    days in ``state``, and ranges always start and end on a day in ``state``."""
    ranges: list[DayRange] = []
    current: list[int] = []  # indices of the days in ``state`` of the open range
    for index, day_state in enumerate(states):
        if day_state is state:
            current.append(index)
        elif day_state is not DayState.NO_SESSION and current:
            ranges.append(_day_range(first_day, current))
            current = []
    if current:
        ranges.append(_day_range(first_day, current))
    return ranges


def _day_range(first_day: date, indices: list[int]) -> DayRange:
    return DayRange(first_day + timedelta(days=indices[0]),
                    first_day + timedelta(days=indices[-1]), len(indices))


def format_range(day_range: DayRange) -> str:
    """``2020-03-02``, or start and end joined by an en dash plus the day count."""
    if day_range.start == day_range.end:
        return day_range.start.isoformat()
    return f"{day_range.start} – {day_range.end} ({_plural(day_range.days, 'day')})"


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def _runs(states: Sequence[DayState]) -> list[tuple[int, int, DayState]]:
    """(start index, length, state) per run of equal consecutive cells."""
    runs: list[tuple[int, int, DayState]] = []
    for index, state in enumerate(states):
        if runs and runs[-1][2] is state:
            start, length, _ = runs[-1]
            runs[-1] = (start, length + 1, state)
        else:
            runs.append((index, 1, state))
    return runs


def _month_ticks(first_day: date, n_days: int, x_of_day: Callable[[int], int],
                 label_width: Callable[[str], int], min_gap: int) -> list[tuple[int, str]]:
    """(x, label) for month starts, thinned to every 1, 2, 3, 6, 12, 24, 60 months until the
    labels no longer overlap; yearly steps print just the year."""
    if n_days == 0:
        return []
    last_day = first_day + timedelta(days=n_days - 1)
    month_starts: list[date] = []
    year, month = first_day.year, first_day.month
    if first_day.day != 1:
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    while (start := date(year, month, 1)) <= last_day:
        month_starts.append(start)
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    ticks: list[tuple[int, str]] = []
    for step in (1, 2, 3, 6, 12, 24, 60):
        ticks = [(x_of_day((start - first_day).days),
                  f"{start.year}" if step >= 12 else f"{start:%Y-%m}")
                 for start in month_starts if (start.year * 12 + start.month - 1) % step == 0]
        if all(right[0] - left[0] >= label_width(left[1]) + min_gap
               for left, right in pairwise(ticks)):
            break
    # A span starting mid-month (or shorter than a month) still says where it starts.
    first = (x_of_day(0), first_day.isoformat())
    if first_day.day != 1 and (not ticks or ticks[0][0] - first[0]
                               >= label_width(first[1]) + min_gap):
        ticks.insert(0, first)
    return ticks


# --------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------

#: The PNG grid (cells, not labels) is at most this wide; longer spans aggregate days.
MAX_GRID_WIDTH = 3600
#: Widest day column in the PNG, for short spans.
MAX_CELL_WIDTH = 6
_MARGIN = 10
_LINE = 14  # height of one text line with the default font
_ROW_HEIGHT = 12  # cell height plus the gap to the next row
_CELL_HEIGHT = 10
_TICK = 4


@dataclass(frozen=True, slots=True)
class PngLayout:
    """Where everything goes in the PNG; exposed so tests (and callers) can find a cell."""

    width: int
    height: int
    label_width: int
    grid_left: int
    grid_top: int
    cell_width: int  # pixels per column
    cell_height: int
    row_height: int
    days_per_column: int  # >1 means aggregated columns showing their worst day
    columns: int
    legend_top: int
    ticks_top: int

    def column_of(self, day_index: int) -> int:
        return day_index // self.days_per_column

    def x_of_day(self, day_index: int) -> int:
        """Left pixel of the column holding ``day_index``."""
        return self.grid_left + self.column_of(day_index) * self.cell_width

    def cell_box(self, row: int, day_index: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), inclusive, of the cell showing ``day_index`` of
        ``row``; with aggregation that cell is shared with the rest of its column's days."""
        left = self.x_of_day(day_index)
        top = self.grid_top + row * self.row_height
        return left, top, left + self.cell_width - 1, top + self.cell_height - 1

    def cell_center(self, row: int, day_index: int) -> tuple[int, int]:
        left, top, right, bottom = self.cell_box(row, day_index)
        return (left + right) // 2, (top + bottom) // 2


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _text_width(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str) -> int:
    return math.ceil(font.getlength(text))


def _cell_geometry(n_days: int) -> tuple[int, int]:
    """(cell width, days per column): as wide as fits up to MAX_CELL_WIDTH, and once a day
    per pixel no longer fits in MAX_GRID_WIDTH, several days per 1-pixel column."""
    if n_days <= MAX_GRID_WIDTH:
        return max(1, min(MAX_CELL_WIDTH, MAX_GRID_WIDTH // max(n_days, 1))), 1
    return 1, math.ceil(n_days / MAX_GRID_WIDTH)


def _title_lines(grid: CoverageGrid, days_per_column: int) -> list[str]:
    """ASCII only ("to", not an en dash): Pillow's default font has no glyph for the dash."""
    span = (f"{grid.first_day} to {grid.last_day}, {_plural(grid.n_days, 'day')}, "
            f"{_plural(len(grid.rows), 'row')}")
    if days_per_column > 1:
        span += (f"; 1 column = {days_per_column} days, showing the worst "
                 "(missing > partial > complete > no session)")
    return [grid.title, f"{span}; generated {grid.generated_at.isoformat()}"]


def _legend_items(grid: CoverageGrid) -> list[tuple[DayState, str]]:
    counts = grid.counts()
    return [(state, f"{state.text}: {counts[state]:,}") for state in DayState]


_SWATCH = 10
_LEGEND_GAP = 18


def png_layout(grid: CoverageGrid) -> PngLayout:
    """The geometry :func:`render_png` draws with (same grid, same layout)."""
    font = _font()
    cell_width, days_per_column = _cell_geometry(grid.n_days)
    columns = math.ceil(grid.n_days / days_per_column)
    label_width = max((_text_width(font, row.label) for row in grid.rows), default=0) + 8
    grid_left = _MARGIN + label_width
    legend_top = _MARGIN + 2 * _LINE + 4
    ticks_top = legend_top + _LINE + 8
    grid_top = ticks_top + _LINE + _TICK
    texts = [_MARGIN + _text_width(font, line) for line in _title_lines(grid, days_per_column)]
    texts.append(_MARGIN + sum(_SWATCH + 4 + _text_width(font, text) + _LEGEND_GAP
                               for _, text in _legend_items(grid)))
    width = max(grid_left + columns * cell_width + 4 * _MARGIN, *texts, 200)
    height = grid_top + len(grid.rows) * _ROW_HEIGHT + _MARGIN
    return PngLayout(width=width, height=height, label_width=label_width, grid_left=grid_left,
                     grid_top=grid_top, cell_width=cell_width, cell_height=_CELL_HEIGHT,
                     row_height=_ROW_HEIGHT, days_per_column=days_per_column, columns=columns,
                     legend_top=legend_top, ticks_top=ticks_top)


def render_png(grid: CoverageGrid, path: Path) -> Path:
    """Draw the heatmap to ``path`` (PNG whatever the suffix). An empty grid gives a small,
    readable "no data" image rather than an error, so a report run on an empty database
    still says why there is nothing to see."""
    image = _no_data_png(grid) if grid.is_empty else _heatmap_png(grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def _no_data_png(grid: CoverageGrid) -> Image.Image:
    font = _font()
    lines = [grid.title, "No data: the coverage grid has no rows or no days.",
             f"generated {grid.generated_at.isoformat()}"]
    width = max(_text_width(font, line) for line in lines) + 2 * _MARGIN
    image = Image.new("RGB", (max(width, 200), 2 * _MARGIN + len(lines) * _LINE), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    for index, line in enumerate(lines):
        draw.text((_MARGIN, _MARGIN + index * _LINE), line, fill=_INK, font=font)
    return image


def _heatmap_png(grid: CoverageGrid) -> Image.Image:
    font = _font()
    layout = png_layout(grid)
    image = Image.new("RGB", (layout.width, layout.height), _BACKGROUND)
    draw = ImageDraw.Draw(image)

    title, subtitle = _title_lines(grid, layout.days_per_column)
    draw.text((_MARGIN, _MARGIN), title, fill=_INK, font=font)
    draw.text((_MARGIN, _MARGIN + _LINE), subtitle, fill=_MUTED, font=font)

    x = _MARGIN
    for state, text in _legend_items(grid):
        top = layout.legend_top + 2
        draw.rectangle((x, top, x + _SWATCH - 1, top + _SWATCH - 1), fill=COLOURS[state],
                       outline=_MUTED)
        draw.text((x + _SWATCH + 4, layout.legend_top), text, fill=_INK, font=font)
        x += _SWATCH + 4 + _text_width(font, text) + _LEGEND_GAP

    grid_right = layout.grid_left + layout.columns * layout.cell_width
    for tick_x, label in _month_ticks(grid.first_day, grid.n_days, layout.x_of_day,
                                      lambda text: _text_width(font, text), 6):
        if tick_x + _text_width(font, label) > layout.width - 2:
            continue
        draw.line((tick_x, layout.grid_top - _TICK, tick_x, layout.grid_top - 1), fill=_MUTED)
        draw.text((tick_x, layout.ticks_top), label, fill=_INK, font=font)
    draw.line((layout.grid_left, layout.grid_top - 1, grid_right - 1, layout.grid_top - 1),
              fill=_MUTED)

    for row_index, row in enumerate(grid.rows):
        top = layout.grid_top + row_index * layout.row_height
        draw.text((_MARGIN, top - 1), row.label, fill=_INK, font=font)
        columns = aggregate_states(row.states, layout.days_per_column)
        for start, length, state in _runs(columns):
            left = layout.grid_left + start * layout.cell_width
            draw.rectangle((left, top, left + length * layout.cell_width - 1,
                            top + layout.cell_height - 1), fill=COLOURS[state])
    return image


# --------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------

_SVG_ROW = 14
_SVG_CELL = 12
_SVG_CHAR = 7  # monospace 11px advance, rounded up
_SVG_TICKS = 20
_SVG_MAX_WIDTH = 2000  # preferred grid width; wider spans use 1 px per day and scroll


def _hex(colour: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;color:#222;margin:1.5em;max-width:none}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
.meta{color:#666;margin:0}
.legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:1.4em}
.sw{display:inline-block;width:.9em;height:.9em;border:1px solid #888;margin-right:.35em;
vertical-align:-.1em}
.scroll{overflow-x:auto;border:1px solid #ddd;padding:4px}
svg text{font:11px monospace;fill:#222}svg line{stroke:#888}
table{border-collapse:collapse}th,td{border:1px solid #ddd;padding:2px 8px;
text-align:left;vertical-align:top}td.num{text-align:right}
""".strip()


def render_html(grid: CoverageGrid, path: Path) -> Path:
    """Write one self-contained HTML file (inline CSS and SVG, no scripts, no URLs) that can
    be mailed or archived as is; hovering a run of days shows its row, dates and state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_html_document(grid), encoding="utf-8")
    return path


def _html_document(grid: CoverageGrid) -> str:
    esc = html.escape
    css = _CSS + "\n" + "\n".join(
        f".{_CSS_CLASS[state]}{{fill:{_hex(COLOURS[state])}}}"
        f".sw.{_CSS_CLASS[state]}{{background:{_hex(COLOURS[state])}}}" for state in DayState)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8">',
        f"<title>{esc(grid.title)}</title>",
        f"<style>\n{css}\n</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(grid.title)}</h1>",
    ]
    if grid.is_empty:
        parts += [
            '<p class="nodata"><strong>No data:</strong> the coverage grid has no rows or '
            "no days.</p>",
            f'<p class="meta">generated {esc(grid.generated_at.isoformat())}</p>',
        ]
    else:
        parts += [
            f'<p class="meta">{esc(grid.first_day.isoformat())} – '
            f"{esc(grid.last_day.isoformat())}, {_plural(grid.n_days, 'day')}, "
            f"{_plural(len(grid.rows), 'row')}; generated "
            f"{esc(grid.generated_at.isoformat())}</p>",
            "<h2>Summary</h2>",
            _html_legend(grid),
            "<h2>Heatmap</h2>",
            f'<div class="scroll">{_svg(grid)}</div>',
            "<h2>Per row</h2>",
            _html_row_table(grid),
            "<h2>Missing and partial ranges</h2>",
            "<p class=\"meta\">Consecutive days merged; no-session days inside a range "
            "do not split it.</p>",
            _html_range_table(grid),
        ]
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _html_legend(grid: CoverageGrid) -> str:
    counts = grid.counts()
    total = sum(counts.values())
    items = "".join(
        f'<li><span class="sw {_CSS_CLASS[state]}"></span>{state.text}: '
        f'<strong class="count-{state.value}">{counts[state]:,}</strong> '
        f"({counts[state] / total:.1%})</li>" for state in DayState)
    return f'<ul class="legend">{items}</ul>'


def _html_row_table(grid: CoverageGrid) -> str:
    head = "".join(f"<th>{state.text}</th>" for state in DayState)
    rows = []
    for row in grid.rows:
        counts = row.counts()
        cells = "".join(f'<td class="num">{counts[state]:,}</td>' for state in DayState)
        rows.append(f"<tr><td>{html.escape(row.label)}</td>{cells}</tr>")
    return f"<table><thead><tr><th>row</th>{head}</tr></thead><tbody>{''.join(rows)}" \
           "</tbody></table>"


def _html_range_table(grid: CoverageGrid) -> str:
    rows = []
    for row in grid.rows:
        cells = []
        for state in (DayState.MISSING, DayState.PARTIAL):
            ranges = state_ranges(row.states, grid.first_day, state)
            text = "<br>".join(html.escape(format_range(r)) for r in ranges) or "none"
            cells.append(f"<td>{text}</td>")
        rows.append(f"<tr><td>{html.escape(row.label)}</td>{''.join(cells)}</tr>")
    return ("<table><thead><tr><th>row</th><th>missing</th><th>partial</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _svg(grid: CoverageGrid) -> str:
    """The grid as inline SVG, one rect per run of equal days per row; never aggregated."""
    esc = html.escape
    cell = max(1, min(8, _SVG_MAX_WIDTH // grid.n_days))
    left = _SVG_CHAR * max(len(row.label) for row in grid.rows) + 12
    width = left + grid.n_days * cell + 60
    height = _SVG_TICKS + len(grid.rows) * _SVG_ROW + 4

    def x_of_day(index: int) -> int:
        return left + index * cell

    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="{esc(grid.title)}" shape-rendering="crispEdges">']
    for tick_x, label in _month_ticks(grid.first_day, grid.n_days, x_of_day,
                                      lambda text: _SVG_CHAR * len(text), 8):
        parts.append(f'<line x1="{tick_x}" y1="{_SVG_TICKS - 5}" x2="{tick_x}" '
                     f'y2="{_SVG_TICKS - 1}"/><text x="{tick_x}" y="{_SVG_TICKS - 8}">'
                     f"{label}</text>")
    for row_index, row in enumerate(grid.rows):
        top = _SVG_TICKS + row_index * _SVG_ROW
        label = esc(row.label)
        parts.append(f'<text x="2" y="{top + _SVG_CELL - 2}">{label}</text>')
        # One unit per day and per row height inside the group keeps each rect short.
        parts.append(f'<g transform="translate({left},{top}) scale({cell},{_SVG_CELL})">')
        for start, length, state in _runs(row.states):
            first = grid.first_day + timedelta(days=start)
            when = (first.isoformat() if length == 1 else
                    f"{first} – {first + timedelta(days=length - 1)}")
            parts.append(f'<rect x="{start}" width="{length}" height="1" '
                         f'class="{_CSS_CLASS[state]}"><title>{label} {when}: {state.text}'
                         "</title></rect>")
        parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------


def write_report(grid: CoverageGrid, out_dir: Path, stem: str = "coverage") -> tuple[Path, Path]:
    """Both files side by side (``<stem>.png``, ``<stem>.html``); returns (png, html)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return (render_png(grid, out_dir / f"{stem}.png"),
            render_html(grid, out_dir / f"{stem}.html"))
