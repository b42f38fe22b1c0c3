"""The shared benchmark schema: percentiles, CSV append with one header, table printing."""

import csv

from pplx.bench.common import FIELDS, Row, emit, percentiles


def test_percentiles_nearest_rank():
    samples = [float(x) for x in range(101)]  # 0..100: p20=20, p50=50, p80=80
    assert percentiles(samples) == (50.0, 20.0, 80.0)
    assert percentiles([7.0]) == (7.0, 7.0, 7.0)


def test_emit_appends_rows_under_one_header(tmp_path, capsys):
    path = tmp_path / "out" / "bench.csv"
    for i in range(2):
        emit(
            [Row(bench="t", case=f"c{i}", impl="x", p50_us=1.5, p20_us=1.0, p80_us=2.0)], str(path)
        )
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["c0", "c1"]
    assert list(rows[0].keys()) == list(FIELDS)
    assert rows[0]["time_utc"] and rows[0]["commit"] and rows[0]["device"]
    out = capsys.readouterr().out
    assert "p50_us" in out and "c1" in out
