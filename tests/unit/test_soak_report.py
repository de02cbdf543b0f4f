"""What makes a soak run fail (``tests.support.soak``), judged without running one."""

from collections import Counter

from tests.support.soak import Report, Sample


def report(rss_start: float, rss_end: float, fds: tuple[int, int]) -> Report:
    result = Report(30)
    result.samples = [Sample(60.0, "load", rss_start, 90, 10, 4, 100)]
    result.rss_start, result.rss_end = rss_start, rss_end
    result.fd_baseline, result.fd_end = fds
    return result


def test_a_flat_run_passes() -> None:
    flat = report(200.0, 219.9, (80, 80))
    assert flat.failures == []
    assert flat.render().endswith("PASS")


def test_rss_growing_more_than_a_tenth_after_the_warm_up_fails() -> None:
    grown = report(200.0, 221.0, (80, 79))
    assert grown.failures == [
        "RSS grew 10.5% after the warm-up (200.0 -> 221.0 MiB; the limit is 10%)"
    ]


def test_descriptors_left_open_fail_and_are_named() -> None:
    leaky = report(200.0, 200.0, (80, 83))
    leaky.fd_leaked = Counter({"socket to the hub's CDN": 2, "/data/blobs/tmp-1": 1})
    assert leaky.failures == [
        "descriptors did not return to the baseline: 83 open at the end, 80 after the"
        " priming pass; more than then: 2 socket to the hub's CDN, 1 /data/blobs/tmp-1"
    ]


def test_a_wrong_byte_or_a_traceback_fails() -> None:
    bad = report(200.0, 200.0, (80, 80))
    bad.violations.append("blob sha256:ab of library/warm1: wrong bytes")
    bad.tracebacks = 1
    assert bad.failures == [
        "1 wrong answers, first: blob sha256:ab of library/warm1: wrong bytes",
        "1 tracebacks in the mirror's log",
    ]
    assert "FAIL" in bad.render()
