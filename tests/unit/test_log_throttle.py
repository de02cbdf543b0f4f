from mirror.logs import LogThrottle
from tests.support.mirror import FakeClock


def test_one_line_per_interval_and_the_count_of_what_was_held_back() -> None:
    clock = FakeClock(now=0.0)
    throttle = LogThrottle(10.0, clock=clock)
    assert throttle.admit("a") == 0
    assert throttle.admit("a") is None
    assert throttle.admit("a") is None
    assert throttle.admit("b") == 0  # another key has its own interval
    clock.advance(10.0)
    assert throttle.admit("a") == 2
    assert throttle.admit("a") is None
