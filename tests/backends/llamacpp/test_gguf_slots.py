"""Slot choice for the prefix cache: longest prefix first, then dense ids, empty, least recent."""

from __future__ import annotations

import pytest

from modelyard.backends.llamacpp.slots import SlotChoice, Slots, common_prefix_length

SYSTEM_A = list(range(1000, 1040))
SYSTEM_B = list(range(2000, 2040))


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([], [1, 2], 0),
        ([1, 2, 3], [1, 2, 3], 3),
        ([1, 2, 3], [1, 2], 2),
        ([1, 2, 3], [1, 9, 3], 1),
        ([5], [6], 0),
        (list(range(1000)), [*range(777), -1, *range(778, 1000)], 777),
        (list(range(1000)), list(range(999)), 999),
    ],
)
def test_common_prefix_length(a: list[int], b: list[int], expected: int) -> None:
    assert common_prefix_length(a, b) == expected
    assert common_prefix_length(b, a) == expected


def cached_slots(count: int, contents: dict[int, list[int]], *, minimum: int = 4) -> Slots:
    """Slots whose requests ran in the order of ``contents`` and left those tokens behind."""
    slots = Slots(count, prefix_cache=True, min_prefix_tokens=minimum)
    taken = [slots.take([-seq_id], active=set()).seq_id for seq_id in range(count)]
    assert taken == list(range(count))
    for seq_id in range(count):
        if seq_id not in contents:
            slots.give_back(seq_id, None)
    for seq_id, tokens in contents.items():
        slots.started(seq_id, 0, len(tokens))
        slots.give_back(seq_id, tokens)
    return slots


def test_the_slot_with_the_longest_shared_prefix_wins() -> None:
    slots = cached_slots(3, {0: SYSTEM_A + [1, 2], 1: SYSTEM_B + [3], 2: SYSTEM_A[:20]})
    choice = slots.take([*SYSTEM_A, 9, 9], active=set())
    assert choice == SlotChoice(seq_id=0, reusable=40, cached=42)


def test_a_whole_cached_prompt_leaves_its_last_token_to_decode() -> None:
    slots = cached_slots(1, {0: SYSTEM_A})
    assert slots.take(SYSTEM_A, active=set()) == SlotChoice(0, 39, 40)


def test_a_short_shared_prefix_is_no_hit() -> None:
    # Every chat prompt starts with a few template tokens: not a reason to pick a slot.
    slots = cached_slots(2, {0: SYSTEM_A}, minimum=8)
    choice = slots.take([*SYSTEM_A[:7], 5, 5, 5, 5, 5, 5, 5, 5], active=set())
    assert (choice.seq_id, choice.reusable) == (1, 0)  # the empty slot, not the cached one


def test_without_a_hit_an_empty_slot_goes_before_a_cached_one() -> None:
    slots = cached_slots(3, {0: SYSTEM_A, 2: SYSTEM_B})
    assert slots.take([7] * 30, active=set()).seq_id == 1


def test_without_a_hit_the_least_recently_used_cached_slot_is_given_up() -> None:
    slots = cached_slots(3, {2: SYSTEM_A, 0: SYSTEM_B, 1: [5] * 30})  # 2 is the oldest
    assert slots.take([7] * 30, active=set()).seq_id == 2


def test_equal_prefixes_go_to_the_least_recently_used_slot() -> None:
    slots = cached_slots(3, {1: [*SYSTEM_A, 1], 0: [*SYSTEM_A, 2], 2: SYSTEM_B})
    assert slots.take([*SYSTEM_A, 3], active=set()) == SlotChoice(1, 40, 41)


def test_without_a_hit_a_slot_next_to_running_ones_keeps_ids_dense() -> None:
    # Running {0, 1}: slot 2 extends their run, slot 5 would cost llama.cpp another pass.
    slots = cached_slots(6, {2: SYSTEM_B})
    slots.take([-1], active=set())  # 0
    slots.take([-1], active={0})  # 1
    assert slots.take([7] * 30, active={0, 1}).seq_id == 2
    # Joining two runs beats extending one: running {0, 1, 2, 4}, free {3, 5}.
    slots.take([-1], active={0, 1, 2})  # 3
    slots.take([-1], active={0, 1, 2, 3})  # 4
    slots.give_back(3, None)
    assert slots.take([7] * 30, active={0, 1, 2, 4}).seq_id == 3


def test_a_hit_beats_density() -> None:
    slots = cached_slots(4, {3: SYSTEM_A})
    slots.take([-1], active=set())  # 0 runs
    assert slots.take([*SYSTEM_A, 1], active={0}).seq_id == 3


def test_stats_count_requests_hits_and_tokens() -> None:
    slots = Slots(2, prefix_cache=True, min_prefix_tokens=4)
    slots.started(0, 0, 50)
    slots.started(1, 30, 45)
    stats = slots.stats()
    assert (stats.requests, stats.hits, stats.tokens_reused, stats.prompt_tokens) == (
        2, 1, 30, 95
    )


def test_with_the_cache_off_the_lowest_free_id_is_taken_and_nothing_is_kept() -> None:
    slots = Slots(3, prefix_cache=False, min_prefix_tokens=4)
    assert [slots.take(SYSTEM_A, active=set()).seq_id for _ in range(3)] == [0, 1, 2]
    slots.give_back(2, SYSTEM_A)
    slots.give_back(1, SYSTEM_A)
    assert slots.cached(1) == []
    assert slots.take(SYSTEM_A, active={0}) == SlotChoice(1, 0, 0)
