"""The coverage report as a reader sees it: cell colours in the PNG, ranges and counts in the
HTML, worst-state aggregation on long spans, and a readable result for an empty grid."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image

from polygon_backfill.report import (
    COLOURS,
    MAX_GRID_WIDTH,
    CoverageGrid,
    CoverageRow,
    DayRange,
    DayState,
    aggregate_states,
    png_layout,
    render_html,
    render_png,
    state_ranges,
    worst_state,
    write_report,
)

C, P, M, N = DayState.COMPLETE, DayState.PARTIAL, DayState.MISSING, DayState.NO_SESSION
_CODES = {"C": C, "P": P, "M": M, "N": N}
MONDAY = date(2020, 3, 2)
GENERATED = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def states(codes: str) -> list[DayState]:
    """``"CCMN"`` -> [complete, complete, missing, no session]."""
    return [_CODES[code] for code in codes]


def grid_of(rows: dict[str, str] | dict[str, list[DayState]], first_day: date = MONDAY,
            title: str = "Coverage") -> CoverageGrid:
    return CoverageGrid(
        first_day=first_day,
        rows=[CoverageRow(label, states(row) if isinstance(row, str) else row)
              for label, row in rows.items()],
        title=title, generated_at=GENERATED)


# Two weeks from Monday 2020-03-02; weekends are no-session days.
SMALL = {
    "AAPL 1d": "MMMPCNNMCCCCNN",
    "AAPL 1h": "CCCCMNNMCCPPNN",
    "MSFT 1d": "CCCCCNNCCCCCNN",
}


def pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    value = image.getpixel(xy)
    assert isinstance(value, tuple)
    return value[:3]


# --------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------


def test_png_cells_have_the_colour_of_their_state(tmp_path: Path) -> None:
    grid = grid_of(SMALL)
    layout = png_layout(grid)
    path = render_png(grid, tmp_path / "coverage.png")

    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (layout.width, layout.height)
        rgb = image.convert("RGB")
    assert layout.days_per_column == 1
    for row_index, row in enumerate(grid.rows):
        for day_index, state in enumerate(row.states):
            left, top, right, bottom = layout.cell_box(row_index, day_index)
            for xy in [layout.cell_center(row_index, day_index), (left, top), (right, bottom)]:
                assert pixel(rgb, xy) == COLOURS[state], (row.label, day_index, xy)


def test_png_labels_sit_left_of_the_grid_and_ticks_above_it(tmp_path: Path) -> None:
    grid = grid_of(SMALL)
    layout = png_layout(grid)
    with Image.open(render_png(grid, tmp_path / "coverage.png")) as image:
        rgb = image.convert("RGB")
    top = layout.grid_top
    label_area = [pixel(rgb, (x, y)) for x in range(layout.grid_left)
                  for y in range(top, top + layout.row_height)]
    assert any(sum(colour) < 300 for colour in label_area), "the first row label is drawn"
    above = [pixel(rgb, (x, y)) for x in range(layout.grid_left, layout.width)
             for y in range(layout.ticks_top, layout.grid_top - 1)]
    assert any(sum(colour) < 300 for colour in above), "a month label is drawn"


@pytest.mark.parametrize(("n_days", "cell_width", "days_per_column"), [
    (14, 6, 1),
    (365, 6, 1),  # the synthetic data set: one year, 6 px per day
    (MAX_GRID_WIDTH, 1, 1),
    (5_500, 1, 2),  # ~15 years: two days per pixel column
    (15_000, 1, 5),
])
def test_cell_width_shrinks_and_days_aggregate_as_the_span_grows(
        n_days: int, cell_width: int, days_per_column: int) -> None:
    layout = png_layout(grid_of({"AAPL 1d": [C] * n_days}))
    assert (layout.cell_width, layout.days_per_column) == (cell_width, days_per_column)
    assert layout.columns * layout.cell_width <= MAX_GRID_WIDTH
    assert layout.width <= 4_000


def test_synthetic_sized_grid_renders_every_row(tmp_path: Path) -> None:
    """25 tickers x 5 timeframes x 365 days: one row per pair, each cell its own colour."""
    rows = {f"T{ticker:02d} {timeframe}": [C] * 365
            for ticker in range(25) for timeframe in ("1m", "5m", "1h", "1d", "1w")}
    rows["T24 1w"] = [C] * 364 + [M]
    grid = grid_of(rows, first_day=date(2023, 1, 1))
    layout = png_layout(grid)
    with Image.open(render_png(grid, tmp_path / "big.png")) as image:
        rgb = image.convert("RGB")
        assert image.size == (layout.width, layout.height)
    assert layout.width <= 4_000
    assert pixel(rgb, layout.cell_center(124, 364)) == COLOURS[M]
    assert pixel(rgb, layout.cell_center(124, 363)) == COLOURS[C]
    assert pixel(rgb, layout.cell_center(0, 0)) == COLOURS[C]


@pytest.mark.parametrize(("day_states", "expected"), [
    ([N, C], C),
    ([C, P], P),
    ([P, M], M),
    ([N, M, C], M),
    ([N, N], N),
    ([C, P, N], P),
])
def test_worst_state_ranks_missing_then_partial_then_complete_then_no_session(
        day_states: list[DayState], expected: DayState) -> None:
    assert worst_state(day_states) is expected
    assert worst_state(reversed(day_states)) is expected


def test_aggregate_states_takes_the_worst_of_each_column_and_keeps_a_short_tail() -> None:
    assert aggregate_states(states("NCCPMCNNC"), 2) == [C, P, M, N, C]
    assert aggregate_states(states("NCCPMCNNC"), 1) == states("NCCPMCNNC")
    with pytest.raises(ValueError, match="at least 1"):
        aggregate_states(states("C"), 0)


def test_aggregated_png_column_shows_the_worst_day(tmp_path: Path) -> None:
    """Over 15 years two days share a pixel column; one missing day must still show."""
    row = [C] * 5_500
    row[101] = M  # column 50 = days 100, 101: complete + missing
    row[200] = P  # column 100 = days 200, 201: partial + complete
    row[300], row[301] = N, C  # column 150: no session + complete
    row[400], row[401] = N, N  # column 200: no session only
    row[500], row[501] = P, M  # column 250: partial + missing
    grid = grid_of({"SPY 1d": row}, first_day=date(2010, 1, 1))
    layout = png_layout(grid)
    assert layout.days_per_column == 2
    with Image.open(render_png(grid, tmp_path / "long.png")) as image:
        rgb = image.convert("RGB")
    expected = {100: M, 101: M, 200: P, 300: C, 400: N, 500: M, 0: C, 5_499: C}
    for day_index, state in expected.items():
        assert pixel(rgb, layout.cell_center(0, day_index)) == COLOURS[state], day_index
    assert layout.cell_box(0, 100) == layout.cell_box(0, 101)


def test_same_grid_gives_byte_identical_files(tmp_path: Path) -> None:
    first = write_report(grid_of(SMALL), tmp_path / "one")
    second = write_report(grid_of(SMALL), tmp_path / "two")
    for left, right in zip(first, second, strict=True):
        assert left.read_bytes() == right.read_bytes()


def test_write_report_writes_png_and_html_named_by_stem(tmp_path: Path) -> None:
    png, html_path = write_report(grid_of(SMALL), tmp_path / "out" / "nested", stem="daily")
    assert (png.name, html_path.name) == ("daily.png", "daily.html")
    assert png.parent == html_path.parent == tmp_path / "out" / "nested"
    with Image.open(png) as image:
        assert image.format == "PNG"
    assert html_path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


# --------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------


def html_of(grid: CoverageGrid, tmp_path: Path) -> str:
    return render_html(grid, tmp_path / "coverage.html").read_text(encoding="utf-8")


def test_html_is_one_self_contained_file(tmp_path: Path) -> None:
    page = html_of(grid_of(SMALL), tmp_path)
    assert "http://" not in page
    assert "https://" not in page
    assert not re.search(r"<(script|link|img|iframe)\b", page)
    assert not re.search(r"\b(src|href)\s*=", page)
    assert "<svg" in page
    assert page.count("<svg") == page.count("</svg>") == 1


def test_html_summarises_counts_per_state_and_per_row(tmp_path: Path) -> None:
    grid = grid_of(SMALL)
    page = html_of(grid, tmp_path)
    assert grid.counts() == {C: 21, P: 3, M: 6, N: 12}
    for state, count in grid.counts().items():
        assert f'class="count-{state.value}">{count}<' in page
    # AAPL 1d: complete 5, partial 1, missing 4, no session 4
    assert re.search(r"<td>AAPL 1d</td>" + "".join(
        rf'<td class="num">{count}</td>' for count in (5, 1, 4, 4)), page)


def test_html_lists_merged_missing_and_partial_ranges(tmp_path: Path) -> None:
    page = html_of(grid_of(SMALL), tmp_path)
    range_table = page[page.index("Missing and partial ranges"):]
    aapl_1d = re.search(r"<tr><td>AAPL 1d</td><td>(.*?)</td><td>(.*?)</td></tr>", range_table)
    assert aapl_1d is not None
    assert aapl_1d.group(1) == "2020-03-02 – 2020-03-04 (3 days)<br>2020-03-09"
    assert aapl_1d.group(2) == "2020-03-05"
    aapl_1h = re.search(r"<tr><td>AAPL 1h</td><td>(.*?)</td><td>(.*?)</td></tr>", range_table)
    assert aapl_1h is not None
    # Friday and Monday missing, the weekend between them: one gap of two trading days.
    assert aapl_1h.group(1) == "2020-03-06 – 2020-03-09 (2 days)"
    assert aapl_1h.group(2) == "2020-03-12 – 2020-03-13 (2 days)"
    assert "<tr><td>MSFT 1d</td><td>none</td><td>none</td></tr>" in range_table


def test_html_tooltips_name_row_days_and_state(tmp_path: Path) -> None:
    page = html_of(grid_of(SMALL), tmp_path)
    assert "<title>AAPL 1d 2020-03-02 – 2020-03-04: missing</title>" in page
    assert "<title>AAPL 1d 2020-03-05: partial</title>" in page
    assert "<title>MSFT 1d 2020-03-07 – 2020-03-08: no session</title>" in page


def test_html_run_length_encodes_rows(tmp_path: Path) -> None:
    """A long steady row is one rect, not one per day, so 15 years stay small."""
    page = html_of(grid_of({"SPY 1d": [C] * 5_500}, first_day=date(2010, 1, 1)), tmp_path)
    assert page.count("<rect") == 1
    assert "<title>SPY 1d 2010-01-01 – 2025-01-21: complete</title>" in page
    assert len(page) < 20_000


def test_html_escapes_labels_and_title(tmp_path: Path) -> None:
    grid = grid_of({"<b>X & Y</b> 1d": "MCN"}, title="Coverage <script>")
    page = html_of(grid, tmp_path)
    assert "<b>" not in page
    assert "<script" not in page
    assert "&lt;b&gt;X &amp; Y&lt;/b&gt; 1d" in page
    assert "Coverage &lt;script&gt;" in page


# --------------------------------------------------------------------------------------
# Ranges and the grid itself
# --------------------------------------------------------------------------------------


def test_state_ranges_merge_consecutive_days_and_bridge_only_no_session() -> None:
    day = MONDAY
    assert state_ranges(states("MMCMNNMPM"), day, M) == [
        DayRange(day, day + timedelta(days=1), 2),
        DayRange(day + timedelta(days=3), day + timedelta(days=6), 2),
        DayRange(day + timedelta(days=8), day + timedelta(days=8), 1),
    ]
    assert state_ranges(states("NNMNN"), day, M) == [
        DayRange(day + timedelta(days=2), day + timedelta(days=2), 1)]
    assert state_ranges(states("CCNC"), day, M) == []


def test_grid_helpers_and_validation() -> None:
    grid = grid_of({"AAPL 1d": "CNM", "AAPL 1h": ["complete", "no_session", "partial"]})
    assert grid.days == [MONDAY, MONDAY + timedelta(days=1), MONDAY + timedelta(days=2)]
    assert grid.last_day == MONDAY + timedelta(days=2)
    assert grid.rows[1].states == (C, N, P)  # plain strings become DayStates
    assert grid.rows[0].counts() == {C: 1, P: 0, M: 1, N: 1}
    with pytest.raises(ValueError, match="same number of days"):
        grid_of({"AAPL 1d": "CNM", "AAPL 1h": "CN"})
    with pytest.raises(ValueError, match="'gone'"):
        CoverageRow("AAPL 1d", ["gone"])  # type: ignore[list-item]


# --------------------------------------------------------------------------------------
# Empty grid: a readable "no data" report, not an exception
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [{}, {"AAPL 1d": ""}], ids=["no rows", "no days"])
def test_empty_grid_gives_a_no_data_report(tmp_path: Path, rows: dict[str, str]) -> None:
    grid = grid_of(rows)
    assert grid.is_empty
    png, html_path = write_report(grid, tmp_path)
    with Image.open(png) as image:
        rgb = image.convert("RGB")
        width, height = image.size
    assert 200 <= width <= 800
    assert height <= 100
    colours = {pixel(rgb, (x, y)) for x in range(width) for y in range(height)}
    assert any(sum(colour) < 300 for colour in colours), "the no-data text is drawn"
    assert not colours & {COLOURS[C], COLOURS[P], COLOURS[M]}, "no legend, no cells"
    page = html_path.read_text(encoding="utf-8")
    assert "No data" in page
    assert "<svg" not in page
