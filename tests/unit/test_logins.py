"""The htpasswd file's checks and the throttle on guessing, without a server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import bcrypt

from mirror.services.clients import (
    ADDRESS_FAILURES,
    CHECKS_PER_ADDRESS,
    FREE_FAILURES,
    MAX_CHECKS,
    Credentials,
    Htpasswd,
    LoginThrottle,
)


def password_file(tmp_path: Path, cost: int = 12) -> Path:
    path = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=cost)).decode()
    path.write_text(f"alice:{hashed}\n")
    return path


async def test_an_unknown_user_costs_a_check_of_the_same_cost(tmp_path: Path) -> None:
    htpasswd = Htpasswd(password_file(tmp_path), threads=1)
    try:
        for user in ("alice", "nobody"):
            attempt = Credentials(user, "wrong")
            check = asyncio.create_task(htpasswd.check(attempt))
            await asyncio.sleep(0)
            assert htpasswd.checking(attempt), user  # on the bcrypt pool, as for a known user
            assert await check is False
        assert await htpasswd.check(Credentials("alice", "right")) is True
        assert await htpasswd.check(Credentials("alice", "right" + "x" * 80)) is False
    finally:
        htpasswd.close()


async def test_checks_under_way_are_bounded_and_the_same_pair_is_checked_once(
    tmp_path: Path,
) -> None:
    htpasswd = Htpasswd(password_file(tmp_path, cost=10), threads=1)
    try:
        same = [
            asyncio.create_task(htpasswd.check(Credentials("alice", "right"))) for _ in range(5)
        ]
        await asyncio.sleep(0)
        assert not htpasswd.busy
        distinct = [
            asyncio.create_task(htpasswd.check(Credentials("alice", f"guess{n}")))
            for n in range(MAX_CHECKS)
        ]
        await asyncio.sleep(0)
        assert htpasswd.busy  # the caller refuses more until some are done
        assert await asyncio.gather(*same) == [True] * 5
        assert not any(await asyncio.gather(*distinct))
        assert not htpasswd.busy
    finally:
        htpasswd.close()


def test_attempts_are_counted_before_their_check() -> None:
    now = [0.0]
    throttle = LoginThrottle(clock=lambda: now[0])
    admitted = [throttle.admit("10.0.0.1", "alice") == 0 for _ in range(40)]
    assert admitted.count(True) == CHECKS_PER_ADDRESS  # all at once: only so many run
    for _ in range(CHECKS_PER_ADDRESS):
        throttle.done("10.0.0.1", "alice", ok=False)
    while throttle.admit("10.0.0.1", "alice") == 0:
        throttle.done("10.0.0.1", "alice", ok=False)
    assert throttle.admit("10.0.0.1", "alice") > 0  # past the free failures: wait
    assert throttle.admit("10.0.0.2", "alice") == 0  # another address: its own count
    throttle.done("10.0.0.2", "alice", ok=True)


def test_a_user_who_logged_in_from_an_address_passes_its_guessing_limit() -> None:
    now = [0.0]
    throttle = LoginThrottle(clock=lambda: now[0])
    assert throttle.admit("10.0.0.1", "alice") == 0
    throttle.done("10.0.0.1", "alice", ok=True)
    for n in range(ADDRESS_FAILURES):  # a spray of user names from the same address
        now[0] += 0.01
        if throttle.admit("10.0.0.1", f"user{n}") == 0:
            throttle.done("10.0.0.1", f"user{n}", ok=False)
    assert throttle.admit("10.0.0.1", "mallory") > 0
    assert throttle.admit("10.0.0.1", "alice") == 0
    throttle.done("10.0.0.1", "alice", ok=True)
    assert FREE_FAILURES < ADDRESS_FAILURES
