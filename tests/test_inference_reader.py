"""The consuming side of a chat, shared by the blocking and the asyncio streams (engine._Reader)."""

from __future__ import annotations

import pytest

from services.common.errors import NotFound
from services.inference.engine import ChatStats, GenerationParams, _Reader
from services.inference.scheduler import DONE, ERROR, PIECE, Request


class Scheduler:
    def __init__(self):
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1


def reader(cancelled: bool = False) -> tuple[_Reader, Request, Scheduler]:
    req = Request("a", GenerationParams(), ChatStats(finish_reason="length"), lambda item: None,
                  cancel=lambda: cancelled)  # fmt: skip
    scheduler = Scheduler()
    return _Reader(req, scheduler), req, scheduler


def test_pieces_pass_until_done_and_a_finished_request_needs_no_draining():
    """Pieces come out as text, "done" ends the stream, and leaving then neither wakes nor drains."""
    r, req, scheduler = reader()
    assert [r.take((PIECE, "he")), r.take((PIECE, "llo")), r.take((DONE, None))] == ["he", "llo", None]
    assert r.leave() is False and scheduler.wakes == 0 and not req.gone
    assert req.stats.finish_reason == "length"


def test_an_error_item_is_raised_in_the_consumer():
    """The request's error reaches whoever reads the stream."""
    r, _, _ = reader()
    with pytest.raises(NotFound):
        r.take((ERROR, NotFound("adapter 'x' not found")))
    assert r.leave() is False


def test_a_piece_arriving_after_cancel_is_dropped_and_the_request_drained_as_cancelled():
    """No text after cancel is seen; leaving marks the request gone, wakes the scheduler, and reads
    until its last item, which makes it "cancelled"."""
    r, req, scheduler = reader(cancelled=True)
    assert r.take((PIECE, "late")) is None
    assert r.leave() is True and req.gone and scheduler.wakes == 1
    assert r.drained((PIECE, "more")) is False
    assert r.drained((DONE, None)) is True and req.stats.finish_reason == "cancelled"
