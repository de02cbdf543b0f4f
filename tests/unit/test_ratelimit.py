"""Token buckets: all-or-nothing takes, and a budget no one client can use up."""

from mirror.upstream.ratelimit import FairBudget, TokenBucket, take_all


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_take_all_takes_from_every_bucket_or_from_none() -> None:
    clock = Clock()
    plenty, one = TokenBucket(1.0, 5.0, clock=clock), TokenBucket(1.0, 1.0, clock=clock)
    assert take_all(plenty, None, one) is None
    refused = take_all(plenty, None, one)
    assert refused is not None
    assert refused[0] == 2
    assert refused[1] > 0
    # The refusal cost the first bucket nothing: four of its five are left.
    assert [take_all(plenty) for _ in range(5)] == [None, None, None, None, (0, 1.0)]


def test_one_client_takes_at_most_half_and_the_rest_is_left_to_others() -> None:
    clock = Clock()
    budget = FairBudget(1.0, 10.0, clock=clock)

    def take(client: str) -> bool:
        return take_all(budget.share_of(client), budget.shared) is None

    assert sum(take("10.0.0.1") for _ in range(100)) == 5
    assert sum(take("10.0.0.2") for _ in range(100)) == 5
    assert not take("10.0.0.3")  # the whole budget is spent now
    clock.now += 10.0  # refilled: each share and the budget
    assert sum(take("10.0.0.1") for _ in range(100)) == 5
    assert sum(take("10.0.0.3") for _ in range(100)) == 5


def test_a_share_in_use_is_not_forgotten_and_so_refilled() -> None:
    clock = Clock()
    budget = FairBudget(1.0, 1000.0, clock=clock)  # a share: 0.5 a second, 500 at once
    taken = 0
    for _ in range(100):  # a client that keeps asking, past a full share's refill time
        while take_all(budget.share_of("10.0.0.1")) is None:
            taken += 1
        clock.now += 100.0
    assert taken == 500 + 99 * 50
