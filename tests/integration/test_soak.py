"""Two minutes of the soak (``scripts/soak --minutes 30`` is the long one): a real
``mirror serve --workers 2`` with a real Redis under a site's mix of pulls while upstream
429s, 5xx, hangs, the hub going down and Redis restarts come in turn, the disk budget full.
It runs in CI like every test here: redis-server missing there is a failure, not a skip."""

from pathlib import Path

import pytest

from tests.support.binaries import require_binary
from tests.support.soak import run


@pytest.mark.timeout(480)  # two minutes of load, priming before it, draining after
async def test_two_minutes_under_faults_stay_flat_and_every_byte_is_right(tmp_path: Path) -> None:
    require_binary("redis-server")

    report = await run(2.0, work_dir=tmp_path)

    assert report.failures == [], report.render()
    # Every fault came at least once, and the mix had each kind of request.
    assert set(report.faults) == {
        "upstream_429", "upstream_500", "upstream_503", "blob_hangs", "redis_restart", "hub_down"
    }, report.render()  # fmt: skip
    assert report.outcomes["206"] > 0, report.render()
    assert report.outcomes["hung_up"] > 0, report.render()
    assert len([s for s in report.samples if s.phase == "load"]) >= 5, report.render()
