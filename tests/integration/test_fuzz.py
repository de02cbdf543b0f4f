"""A short fuzz run (``scripts/fuzz`` runs the long one): hostile requests against a real
mirror process in front of two fake upstreams."""

from pathlib import Path

from tests.support.fuzz import run


async def test_hostile_requests_get_no_5xx_no_traceback_and_the_process_stays_up(
    tmp_path: Path,
) -> None:
    report = await run(1500, seed=7, work_dir=tmp_path)

    assert report.sent == 1500
    assert report.alive, report.render()
    assert report.violations == [], report.render()
    assert report.tracebacks == 0, report.render()
    assert not report.foreign_lines, report.render()  # every log line is structured
    # Not one line per hostile request beyond the access lines.
    assert sum(report.events.values()) < 200, report.render()
