"""The hub's tail survives an error the old code did not expect: restarted, it delivers what was
appended meanwhile, in order, to the streams that stayed open."""

from __future__ import annotations

import pytest
from asyncpg import exceptions as pgerr

from backend.appkeys import POOL, SUPERVISOR
from backend.store.event_store import EventStore
from tests.conftest import mint_token
from tests.integration.ops.test_db_faults import pooled_queries_raise
from tests.integration.streaming.conftest import MakeClient, append, connect, new_stream
from tests.support import eventually


async def test_the_tail_restarts_after_a_protocol_state_error_and_keeps_streaming(
    make_client: MakeClient, store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client()
    app = client.app
    tail = app[SUPERVISOR].tasks["sse-tail"]
    token = await mint_token(app, "auditor", ["audit:read"])
    start = await store.head()
    stream_id = new_stream()
    sse = await connect(client, "/v1/streams/events", token, after=start, stream=stream_id)
    assert sse.status == 200
    assert (await sse.next()).kind == "checkpoint"
    error = pgerr.InternalClientError("cannot switch to state 12; another operation (2) is in progress")
    with pooled_queries_raise(monkeypatch, error, pool=app[POOL]):
        during = await append(store, stream_id, "During")  # the test's own pool: unaffected
        await eventually(lambda: tail.restarts >= 1)
    after = await append(store, stream_id, "After")
    events = await sse.events(2)
    assert [(m.last_id, m.json()["type"]) for m in events] == [(str(during[0]), "During"), (str(after[0]), "After")]
    await eventually(lambda: tail.state == "running")
    assert tail.last_error is not None and tail.last_error.startswith("InternalClientError")
    sse.close()
