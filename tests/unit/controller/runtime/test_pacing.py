"""FetchPacer: the concurrency window and the per-minute rate over devices starting downloads."""

from __future__ import annotations

from agent.protocol import Event
from controller.runtime.pacing import FetchPacer


def _event(device: str, generation: int, state: str, kind: str = "update") -> Event:
    """An update (or error) event of `device` for `generation` in `state`."""
    return Event(
        device_id=device,
        event_id=f"g{generation}-{state}",
        kind=kind,  # type: ignore[arg-type]
        message=state,
        deployment_id="dep-1",
        generation=generation,
        state=state,  # type: ignore[arg-type]
    )


def test_window_admits_at_most_max_fetching_until_one_moves_on() -> None:
    """Three slots: the fourth device waits until one reports past `fetching`."""
    pacer = FetchPacer(max_fetching=3, per_minute=0)
    pacer.begin(0.0)
    assert [pacer.admit(f"d{i}", 1, 0.0) for i in range(5)] == [True, True, True, False, False]
    assert pacer.budget() == 0
    pacer.on_event(_event("d0", 1, "fetching"))  # still downloading: keeps its slot
    assert not pacer.admit("d3", 1, 0.1)
    pacer.on_event(_event("d0", 1, "verifying"))
    assert pacer.fetching == 2 and pacer.budget() == 1
    assert pacer.admit("d3", 1, 0.2)
    assert not pacer.admit("d4", 1, 0.2)
    assert pacer.counters.peak_fetching == 3


def test_an_error_or_an_event_about_an_older_generation() -> None:
    """An error frees the slot; an event about an older generation does not."""
    pacer = FetchPacer(max_fetching=1, per_minute=0)
    pacer.begin(0.0)
    assert pacer.admit("d0", 5, 0.0)
    pacer.on_event(_event("d0", 4, "active"))  # the previous rollout's late event
    assert pacer.fetching == 1
    pacer.on_event(_event("d0", 5, "fetching", kind="error"))
    assert pacer.fetching == 0


def test_a_device_already_fetching_keeps_its_slot_for_a_newer_generation() -> None:
    """A retry (new generation) while the slot is held costs no second slot or token."""
    pacer = FetchPacer(max_fetching=1, per_minute=1)
    pacer.begin(0.0)
    assert pacer.admit("d0", 1, 0.0)
    assert pacer.admit("d0", 2, 1.0)
    pacer.on_event(_event("d0", 1, "failed"))  # about generation 1: generation 2 still going
    assert pacer.fetching == 1


def test_rate_per_minute_holds_over_two_minutes() -> None:
    """60/min with no window: at most 60 start in the first minute (the bucket starts full),
    then one a second."""
    pacer = FetchPacer(max_fetching=0, per_minute=60)
    started = 0
    t = 0.0
    device = 0
    while t < 120.0:
        pacer.begin(t)
        while pacer.admit(f"d{device}", 1, t):
            device += 1
            started += 1
            pacer.on_event(_event(f"d{device - 1}", 1, "active"))  # done at once: no window
        t += 0.25
    assert 60 + 119 <= started <= 60 + 121
    assert pacer.counters.deferred > 0


def test_silent_device_gives_its_slot_back_after_the_timeout() -> None:
    """A device that never reports frees its slot after slot_timeout_s."""
    pacer = FetchPacer(max_fetching=1, per_minute=0, slot_timeout_s=10.0)
    pacer.begin(0.0)
    assert pacer.admit("d0", 1, 0.0)
    pacer.begin(9.0)
    assert not pacer.admit("d1", 1, 9.0)
    pacer.begin(10.5)
    assert pacer.admit("d1", 1, 10.5)
    assert pacer.counters.expired == 1
