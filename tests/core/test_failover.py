"""Failover chains: skip down targets, fail over mid-call, 4xx at once, 503 when all down."""

from __future__ import annotations

import asyncio
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from modelyard.core.breaker import BreakerSettings, CircuitBreaker
from modelyard.core.errors import (
    BackendError,
    BadRequestError,
    ConfigError,
    ModelNotFoundError,
    ModelNotReadyError,
    ServiceUnavailableError,
    TimeoutError_,
)
from modelyard.core.failover import (
    Availability,
    FailoverChain,
    Target,
    breaker_availability,
    build_chains,
    parse_target,
)
from modelyard.testing import FakeClock

SETTINGS = BreakerSettings(window_size=4, minimum_calls=4, wait_in_open_ms=30_000.0)


class Fleet:
    """Targets behind real breakers, as the service will wire them."""

    def __init__(self, clock: FakeClock, *names: str) -> None:
        self.clock = clock
        self.breakers = {n: CircuitBreaker(n, SETTINGS, clock=clock) for n in names}
        self.fail: dict[str, Exception] = {}
        self.unhealthy: set[str] = set()
        self.calls: list[str] = []

    def chain(self, name: str = "chat") -> FailoverChain:
        targets = [Target(*n.split(":")) for n in self.breakers]
        return FailoverChain(name, targets, availability=self.availability)

    def availability(self, target: Target) -> Availability:
        if str(target) in self.unhealthy:
            return Availability.down("unhealthy", retry_after=5)
        return breaker_availability(self.breakers[str(target)])

    async def call(self, target: Target) -> str:
        async with self.breakers[str(target)].call():
            self.calls.append(str(target))  # only reached when the breaker admitted the call
            if (exc := self.fail.get(str(target))) is not None:
                raise exc
            return f"answer from {target}"

    def trip(self, name: str) -> None:
        for _ in range(SETTINGS.window_size):
            self.breakers[name].acquire().failure(BackendError("down"))


async def test_the_primary_answers_when_it_is_up(fake_clock: FakeClock) -> None:
    fleet = Fleet(fake_clock, "a", "b")
    chain = fleet.chain()
    answer = await chain.run(fleet.call)
    assert (answer.target, answer.value) == (Target("a"), "answer from a")
    assert not answer.failed_over and chain.failovers == 0
    assert chain.answered_by == {"a": 1}


async def test_a_target_whose_breaker_is_open_is_skipped_without_a_call(
    fake_clock: FakeClock,
) -> None:
    fleet = Fleet(fake_clock, "a", "b:2")
    fleet.trip("a")
    chain = fleet.chain()
    answer = await chain.run(fleet.call)
    assert answer.target == Target("b", "2") and fleet.calls == ["b:2"]
    assert [(a.target, a.outcome) for a in answer.attempts] == [(Target("a"), "skipped")]
    assert answer.attempts[0].reason == "circuit breaker open"
    assert chain.failovers == 1


async def test_an_unhealthy_or_not_serving_target_is_skipped(fake_clock: FakeClock) -> None:
    fleet = Fleet(fake_clock, "a", "b", "c")
    fleet.unhealthy.add("a")
    chain = fleet.chain()

    def availability(target: Target) -> Availability:
        if target == Target("b"):
            raise ModelNotReadyError("model 'b' version '1' is failed", retry_after=5)
        return fleet.availability(target)

    answer = await chain.run(fleet.call, availability=availability)
    assert answer.target == Target("c") and fleet.calls == ["c"]
    assert [a.reason for a in answer.attempts] == [
        "unhealthy", "model 'b' version '1' is failed",
    ]


async def test_an_async_availability_check_is_awaited(fake_clock: FakeClock) -> None:
    fleet = Fleet(fake_clock, "a", "b")

    async def availability(target: Target) -> Availability:
        await asyncio.sleep(0)
        return Availability.down("draining") if target == Target("a") else Availability(True)

    chain = FailoverChain("chat", [Target("a"), Target("b")], availability=availability)
    assert (await chain.run(fleet.call)).target == Target("b")


@pytest.mark.parametrize(
    "error",
    [BackendError("backend failed"), TimeoutError_("no answer in 300s"), RuntimeError("crash"),
     ServiceUnavailableError("queue full")],
    ids=["500", "504", "unexpected", "503"],
)
async def test_a_failure_during_the_call_fails_over_for_the_same_request(
    fake_clock: FakeClock, error: Exception
) -> None:
    fleet = Fleet(fake_clock, "a", "b")
    fleet.fail["a"] = error
    chain = fleet.chain()
    answer = await chain.run(fleet.call)
    assert answer.value == "answer from b" and fleet.calls == ["a", "b"]
    assert answer.attempts[0].outcome in ("failed", "refused")
    assert chain.failovers == 1
    assert fleet.breakers["a"].snapshot()["failed_calls"] == 1


async def test_a_client_error_is_returned_at_once_without_failing_over(
    fake_clock: FakeClock,
) -> None:
    fleet = Fleet(fake_clock, "a", "b")
    fleet.fail["a"] = BadRequestError("input 'x': wrong shape")
    chain = fleet.chain()
    with pytest.raises(BadRequestError, match="wrong shape"):
        await chain.run(fleet.call)
    assert fleet.calls == ["a"] and chain.failovers == 0
    assert fleet.breakers["a"].snapshot()["calls"] == 0, "a 4xx is not a breaker call"


async def test_all_targets_down_is_503_with_the_smallest_retry_after(
    fake_clock: FakeClock,
) -> None:
    fleet = Fleet(fake_clock, "a", "b", "c")
    fleet.trip("a")
    fake_clock.advance(10)  # a: 20 s left
    fleet.trip("c")  # c: 30 s left
    fleet.unhealthy.add("b")  # b: 5 s
    chain = fleet.chain()
    with pytest.raises(ServiceUnavailableError) as caught:
        await chain.run(fleet.call)
    exc = caught.value
    assert exc.status_code == 503 and exc.headers["Retry-After"] == "5"
    assert fleet.calls == [], "no backend was touched"
    assert [(a["target"], a["outcome"]) for a in exc.extra["attempts"]] == [
        ("a", "skipped"), ("b", "skipped"), ("c", "refused"),
    ]
    assert chain.exhausted == 1 and chain.failovers == 2
    assert "no target of 'chat' can answer now" in exc.detail

    fleet.unhealthy.clear()
    fleet.trip("b")
    with pytest.raises(ServiceUnavailableError) as caught:
        await chain.run(fleet.call)
    assert caught.value.headers["Retry-After"] == "20"


async def test_every_target_failing_mid_call_is_503_not_500_and_each_is_tried_once(
    fake_clock: FakeClock,
) -> None:
    fleet = Fleet(fake_clock, "a", "b", "c")
    for name in "abc":
        fleet.fail[name] = BackendError(f"{name} broke")
    with pytest.raises(ServiceUnavailableError) as caught:
        await fleet.chain().run(fleet.call)
    assert fleet.calls == ["a", "b", "c"]
    assert caught.value.headers["Retry-After"] == "1"
    assert "a: a broke; b: b broke; c: c broke" in caught.value.detail


async def test_the_last_target_is_never_ejected(fake_clock: FakeClock) -> None:
    fleet = Fleet(fake_clock, "a", "b")
    fleet.unhealthy.update({"a", "b"})  # a stale health verdict must not leave nobody to ask
    answer = await fleet.chain().run(fleet.call)
    assert answer.target == Target("b") and fleet.calls == ["b"]


async def test_repeated_failures_trip_the_primary_and_later_requests_skip_it(
    fake_clock: FakeClock,
) -> None:
    fleet = Fleet(fake_clock, "a", "b")
    fleet.fail["a"] = BackendError("boom")
    chain = fleet.chain()
    for _ in range(4):
        assert (await chain.run(fleet.call)).target == Target("b")
    assert fleet.calls.count("a") == 4
    await chain.run(fleet.call)
    assert fleet.calls.count("a") == 4, "the open breaker keeps the request off a"

    del fleet.fail["a"]
    fake_clock.advance(30)  # half-open: a gets probes again
    assert (await chain.run(fleet.call)).target == Target("a")
    assert chain.answered_by == {"b": 5, "a": 1}


async def test_cancellation_is_not_a_failover(fake_clock: FakeClock) -> None:
    fleet = Fleet(fake_clock, "a", "b")

    async def hang(target: Target) -> str:
        fleet.calls.append(str(target))
        await asyncio.Event().wait()
        return "never"

    task = asyncio.create_task(fleet.chain().run(hang))
    for _ in range(10):
        if fleet.calls:
            break
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fleet.calls == ["a"]


def test_describe(fake_clock: FakeClock) -> None:
    chain = FailoverChain("chat", [Target("a"), Target("b", "2")])
    assert chain.describe() == {
        "name": "chat", "targets": ["a", "b:2"], "failovers": 0, "exhausted": 0,
        "answered_by": {},
    }
    with pytest.raises(ValueError, match="at least one target"):
        FailoverChain("chat", [])


# -- configuration -----------------------------------------------------------------------------


@dataclass
class Alias:
    name: str
    targets: list[str] = field(default_factory=list)


VERSIONS = {"smollm2-135m-instruct": ["1"], "gemma-3-270m": ["1", "2"], "odd:name": ["1"]}


def test_targets_name_a_model_or_one_of_its_versions() -> None:
    assert parse_target("gemma-3-270m", VERSIONS) == Target("gemma-3-270m")
    assert parse_target("gemma-3-270m:2", VERSIONS) == Target("gemma-3-270m", "2")
    assert parse_target("odd:name", VERSIONS) == Target("odd:name"), "a model name wins"
    assert parse_target("odd:name:1", VERSIONS) == Target("odd:name", "1")
    assert parse_target("gemma-3-270m:9", VERSIONS) is None


def test_build_chains_from_the_config() -> None:
    chains = build_chains(
        [Alias("chat", ["smollm2-135m-instruct", "gemma-3-270m:1"])], VERSIONS
    )
    assert chains["chat"].targets == (
        Target("smollm2-135m-instruct"), Target("gemma-3-270m", "1"),
    )


@pytest.mark.parametrize(
    ("aliases", "message"),
    [
        ([Alias("gemma-3-270m", ["smollm2-135m-instruct"])],
         "$.aliases[0].name: 'gemma-3-270m' is already a model name"),
        ([Alias("chat", ["smollm2-135m-instruct"]), Alias("chat", ["gemma-3-270m"])],
         "$.aliases[1].name: alias 'chat' is defined twice"),
        ([Alias("chat", [])], "$.aliases[0].targets: an alias needs at least one target"),
        ([Alias("chat", ["gemma-3-270m", "llama"])],
         "$.aliases[0].targets[1]: no model or model:version 'llama'"),
        ([Alias("chat", ["gemma-3-270m:1", "gemma-3-270m:1"])],
         "$.aliases[0].targets[1]: 'gemma-3-270m:1' is listed twice"),
        ([Alias("a", ["gemma-3-270m"]), Alias("b", ["a"])],
         "$.aliases[1].targets[0]: no model or model:version 'a' (aliases cannot point at"),
    ],
    ids=["shadows-model", "twice", "empty", "unknown", "duplicate-target", "alias-of-alias"],
)
def test_bad_alias_config_names_the_path(aliases: list[Alias], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_chains(aliases, VERSIONS)
    assert caught.value.detail.startswith(message)


async def test_availability_raising_not_found_skips_the_target(fake_clock: FakeClock) -> None:
    fleet = Fleet(fake_clock, "a", "b")

    def availability(target: Target) -> Availability:
        if target == Target("a"):
            raise ModelNotFoundError("model 'a' does not exist")
        return Availability(True)

    chain = FailoverChain("chat", [Target("a"), Target("b")], availability=availability)
    answer = await chain.run(fleet.call)
    assert answer.target == Target("b")
    assert answer.attempts[0].reason == "model 'a' does not exist"


def test_the_documented_alias_table_builds() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "reliability.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)
    table = tomllib.loads(next(b for b in blocks if "[[aliases]]" in b))
    aliases = [Alias(a["name"], a["targets"]) for a in table["aliases"]]
    assert build_chains(aliases, VERSIONS)["chat"].targets == (
        Target("smollm2-135m-instruct"), Target("gemma-3-270m", "1"),
    )
