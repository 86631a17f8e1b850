"""The continuous-batching scheduler alone: pure Python, no model."""

from __future__ import annotations

import pytest

from visualglm.serving.scheduler import QueueFullError, Scheduler, SchedulerConfig


def make(batch: int = 4, budget: int = 1000, waiting: int = 100) -> Scheduler:
    return Scheduler(SchedulerConfig(max_batch_size=batch, max_prefill_tokens=budget, max_waiting=waiting))


def test_admits_in_arrival_order_up_to_free_slots():
    s = make(batch=3)
    for rid in "abcde":
        s.add(rid, 10)
    assert s.schedule() == ["a", "b", "c"]
    assert s.schedule() == []  # no free slot
    s.finish("b")
    assert s.free_slots == 1
    assert s.schedule() == ["d"]
    assert s.running == {"a", "c", "d"} and list(s.waiting) == ["e"]


def test_padded_prefill_budget():
    s = make(batch=8, budget=100)
    s.add("short", 10)
    s.add("long", 40)  # 2 x 40 = 80 padded tokens: fits
    s.add("third", 30)  # 3 x 40 = 120 > 100: next round
    assert s.schedule() == ["short", "long"]
    assert s.schedule() == ["third"]


def test_prompt_over_budget_still_runs_alone_and_is_never_overtaken():
    s = make(batch=8, budget=50)
    s.add("huge", 400)
    s.add("tiny", 5)
    assert s.schedule() == ["huge"]  # alone, despite the budget
    assert s.schedule() == ["tiny"]
    s2 = make(batch=8, budget=50)
    s2.add("a", 30)
    s2.add("big", 60)
    s2.add("b", 5)
    assert s2.schedule() == ["a"]  # "b" would fit but may not overtake "big"
    assert s2.schedule() == ["big"]


def test_abort_waiting_and_running():
    s = make(batch=1)
    s.add("run", 5)
    s.add("wait", 5)
    assert s.schedule() == ["run"]
    assert s.abort("wait") == "waiting"
    assert s.abort("run") == "running"  # the caller frees its engine slot
    assert s.abort("run") is None and s.abort("never") is None
    assert not s.has_unfinished() and s.free_slots == 1


def test_queue_limit_and_bad_input():
    s = make(waiting=2)
    s.add("a", 1)
    s.add("b", 1)
    with pytest.raises(QueueFullError, match="max_waiting=2"):
        s.add("c", 1)
    with pytest.raises(ValueError, match="already scheduled"):
        s.add("a", 1)
    with pytest.raises(ValueError, match="at least one"):
        s.add("d", 0)
    with pytest.raises(ValueError, match="max_batch_size"):
        SchedulerConfig(max_batch_size=0)


def test_continuous_admission_between_steps():
    """A request arriving while others decode is admitted at the next step, not after the batch ends."""
    s = make(batch=4)
    s.add(1, 20)
    assert s.schedule() == [1]
    s.add(2, 20)  # arrives mid-generation of 1
    assert s.schedule() == [2]
    assert s.running == {1, 2}
