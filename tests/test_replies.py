"""The reply model (worker/job/replies.py): its JSON is rendered once, and a copy with changes
(a replay) never carries the original's rendering."""

from __future__ import annotations

import json

from worker.job.replies import Reply, UpdateResult


def test_the_json_leaves_out_unset_fields_and_is_rendered_once() -> None:
    reply = Reply(id="a", status="ok", rowcount=1, worker="w")
    assert json.loads(reply.encode()) == {"id": "a", "status": "ok", "rowcount": 1,
                                          "dry_run": False, "replayed": False, "attempts": 1,
                                          "duration_ms": 0.0, "worker": "w"}  # fmt: skip
    assert reply.rendered is reply.rendered
    assert reply.encode() == reply.rendered.encode()


def test_a_copy_with_changes_renders_its_changes() -> None:
    reply = Reply(id="a", status="ok", rowcount=1, results=[UpdateResult(rowcount=1)])
    assert json.loads(reply.rendered)["replayed"] is False  # rendered before the copy
    replay = reply.model_copy(update={"replayed": True, "attempts": 3, "worker": "w2"})
    assert json.loads(replay.encode())["replayed"] is True
    assert json.loads(replay.rendered)["attempts"] == 3
    assert json.loads(reply.rendered)["replayed"] is False
    assert replay != reply
    assert Reply.model_validate_json(replay.rendered) == replay
