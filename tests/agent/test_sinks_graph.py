"""Graph sinks against the Graph stand-in: $batch limits, per-item throttling, Excel order and
no duplicate rows after a lost answer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.config import UploadSettings
from agent.errors import UploadError
from agent.sim.graph import SimGraph
from agent.sim.tls import TlsFiles
from agent.state import AgentState, OutboxCounts
from agent.telemetry.outbox import Outbox
from agent.telemetry.sinks import make_sink
from agent.telemetry.sinks.graph_excel import GraphExcelSink
from agent.telemetry.sinks.graph_list import GraphListSink
from agent.telemetry.uploader import Uploader
from tests.fixtures.api import DEVICE, FakeTokens, reading
from tests.fixtures.clock import FakeClock

SITE, LIST = "contoso.sharepoint.com,1111,2222", "readings-list"
ITEM, TABLE = "/me/drive/root:/sensors.xlsx:", "Readings"


@pytest.fixture
def list_settings(sim_graph: SimGraph, tls: TlsFiles) -> UploadSettings:
    return UploadSettings(sink="graph_list", graph_url=sim_graph.graph_url, site_id=SITE, list_id=LIST,
                          ca_file=str(tls.ca_file), batch_max=100, interval_s=10.0, timeout_s=5.0)


@pytest.fixture
def excel_settings(sim_graph: SimGraph, tls: TlsFiles) -> UploadSettings:
    return UploadSettings(sink="graph_excel", graph_url=sim_graph.graph_url, item_path=ITEM, table=TABLE,
                          ca_file=str(tls.ca_file), batch_max=50, interval_s=10.0, timeout_s=5.0)


@pytest.fixture
def list_sink(list_settings: UploadSettings) -> Iterator[GraphListSink]:
    sink = make_sink(list_settings, DEVICE)
    assert isinstance(sink, GraphListSink)
    yield sink
    sink.close()


@pytest.fixture
def excel_sink(excel_settings: UploadSettings) -> Iterator[GraphExcelSink]:
    sink = make_sink(excel_settings, DEVICE)
    assert isinstance(sink, GraphExcelSink)
    yield sink
    sink.close()


def drain(up: Uploader, clock: FakeClock, outbox: Outbox, max_steps: int = 50) -> None:
    for _ in range(max_steps):
        if not outbox.counts().pending:
            return
        clock.now += up.step()
    raise AssertionError(f"not drained: {outbox.counts()}")


def test_list_items_go_in_batches_of_at_most_20(outbox: Outbox, list_sink: GraphListSink, sim_graph: SimGraph,
                                                tokens: FakeTokens) -> None:
    outbox.put([reading(i) for i in range(45)])
    result = list_sink.send(outbox.claim(100), "token")
    assert result.acked == list(range(1, 46)) and not result.retry
    assert sim_graph.batch_sizes == [20, 20, 5]
    items = sim_graph.list_items(SITE, LIST)
    assert [i["Title"] for i in items] == [f"{DEVICE}:{s}" for s in range(1, 46)]
    assert items[0] | {"@odata.etag": None, "id": None} == {
        "@odata.etag": None, "id": None, "Title": f"{DEVICE}:1", "DeviceId": DEVICE, "Seq": 1,
        "Sensor": "cpu",
        "Type": "cpu_temperature", "Value": 40.0, "Unit": "°C", "Time": "2026-11-25T14:39:32.123Z"}


def test_stand_in_refuses_batches_over_20(sim_graph: SimGraph, tls: TlsFiles) -> None:
    import requests

    body = {"requests": [{"id": str(i), "method": "GET", "url": "/me"} for i in range(21)]}
    r = requests.post(f"{sim_graph.graph_url}/$batch", json=body, headers={"Authorization": "Bearer x"},
                      verify=str(tls.ca_file), timeout=5)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalidRequest"


def test_per_item_429_retried_until_every_item_delivered_exactly_once(
        outbox: Outbox, list_settings: UploadSettings, list_sink: GraphListSink, sim_graph: SimGraph,
        tokens: FakeTokens) -> None:
    sim_graph.item_throttle_every = 7
    sim_graph.item_retry_after_s = 3
    outbox.put([reading(i) for i in range(120)])
    clock = FakeClock(100.0)
    up = Uploader(outbox, list_sink, tokens, AgentState(), list_settings, clock=clock)
    waits = []
    for _ in range(100):
        if not outbox.counts().pending:
            break
        waits.append(up.step())
        clock.now += waits[-1]
    assert outbox.counts() == OutboxCounts(0, 0, 0)
    assert 3.0 in waits, "the items' Retry-After was honoured"
    titles = [i["Title"] for i in sim_graph.list_items(SITE, LIST)]
    assert sorted(titles) == sorted(f"{DEVICE}:{s}" for s in range(1, 121))
    assert len(titles) == len(set(titles)) == 120
    assert max(sim_graph.batch_sizes) <= 20


def test_duplicate_item_409_counts_as_delivered(outbox: Outbox, list_sink: GraphListSink,
                                                sim_graph: SimGraph) -> None:
    outbox.put([reading(i) for i in range(3)])
    batch = outbox.claim(3)
    list_sink.send(batch[:2], "token")
    result = list_sink.send(batch, "token")        # the first two are repeats
    assert result.acked == [1, 2, 3] and len(sim_graph.list_items(SITE, LIST)) == 3


def test_rejected_item_is_dead_lettered_and_the_rest_delivered(
        outbox: Outbox, list_settings: UploadSettings, list_sink: GraphListSink, sim_graph: SimGraph,
        tokens: FakeTokens) -> None:
    sim_graph.reject_titles = {f"{DEVICE}:4"}
    outbox.put([reading(i) for i in range(25)])
    clock = FakeClock(100.0)
    up = Uploader(outbox, list_sink, tokens, AgentState(), list_settings, clock=clock)
    drain(up, clock, outbox)
    assert outbox.counts() == OutboxCounts(pending=0, dead=1, dropped=0)
    seq, reason, _ = outbox.dead_rows()[0]
    assert seq == 4 and "400" in reason and "invalidRequest" in reason
    assert len(sim_graph.list_items(SITE, LIST)) == 24


def test_whole_batch_throttle_raises_with_retry_after(outbox: Outbox, list_sink: GraphListSink,
                                                      sim_graph: SimGraph) -> None:
    outbox.put([reading(i) for i in range(30)])
    sim_graph.fail(429, retry_after=12)
    with pytest.raises(UploadError) as info:
        list_sink.send(outbox.claim(30), "token")
    assert info.value.retryable and info.value.retry_after_s == 12.0 and info.value.status == 429
    assert sim_graph.list_items(SITE, LIST) == []


def test_whole_batch_failure_part_way_keeps_what_was_delivered(outbox: Outbox, list_sink: GraphListSink,
                                                               sim_graph: SimGraph) -> None:
    outbox.put([reading(i) for i in range(30)])
    sim_graph.fail(503, retry_after=5, after=1)      # the first $batch passes, the second meets a 503
    result = list_sink.send(outbox.claim(30), "token")
    assert result.acked == list(range(1, 21))
    assert result.retry == list(range(21, 31))
    assert result.error is not None and result.error.status == 503 and result.error.retry_after_s == 5.0


def test_excel_rows_appended_in_order_across_batches(outbox: Outbox, excel_settings: UploadSettings,
                                                     excel_sink: GraphExcelSink, sim_graph: SimGraph,
                                                     tokens: FakeTokens) -> None:
    outbox.put([reading(i) for i in range(130)])
    clock = FakeClock(100.0)
    up = Uploader(outbox, excel_sink, tokens, AgentState(), excel_settings, clock=clock)
    drain(up, clock, outbox)
    rows = sim_graph.table_rows(ITEM, TABLE)
    assert [r[2] for r in rows] == list(range(1, 131))
    assert rows[0] == [f"{DEVICE}:1", DEVICE, 1, "cpu", "cpu_temperature", 40.0, "°C",
                       "2026-11-25T14:39:32.123Z"]
    adds = [r for r in sim_graph.requests if r.path.endswith("/rows/add")]
    assert [r.items for r in adds] == [50, 50, 30], "many rows per call"


def test_excel_504_after_append_does_not_duplicate_rows(outbox: Outbox, excel_settings: UploadSettings,
                                                        excel_sink: GraphExcelSink, sim_graph: SimGraph,
                                                        tokens: FakeTokens) -> None:
    outbox.put([reading(i) for i in range(80)])
    sim_graph.lost_answers = 1          # the first rows/add is applied, then answered 504
    clock = FakeClock(100.0)
    up = Uploader(outbox, excel_sink, tokens, AgentState(), excel_settings, clock=clock)
    drain(up, clock, outbox)
    ids = [r[0] for r in sim_graph.table_rows(ITEM, TABLE)]
    assert ids == [f"{DEVICE}:{s}" for s in range(1, 81)], "each reading exactly once, in order"
    statuses = [(r.method, r.status) for r in sim_graph.requests]
    lost = statuses.index(("POST", 504))
    assert statuses[lost + 1:lost + 3] == [("GET", 200), ("GET", 200)], "table checked before resending"


def test_excel_504_without_append_resends(outbox: Outbox, excel_sink: GraphExcelSink,
                                          sim_graph: SimGraph) -> None:
    outbox.put([reading(i) for i in range(5)])
    sim_graph.fail(504)                  # nothing applied
    with pytest.raises(UploadError):
        excel_sink.send(outbox.claim(5), "token")
    assert excel_sink.send(outbox.claim(5), "token").acked == [1, 2, 3, 4, 5]
    assert len(sim_graph.table_rows(ITEM, TABLE)) == 5


def test_excel_restart_after_append_before_ack_does_not_duplicate(
        outbox: Outbox, excel_settings: UploadSettings, sim_graph: SimGraph) -> None:
    """Power cut between the table append and the outbox ack: the next process checks first."""
    outbox.put([reading(i) for i in range(10)])
    first = make_sink(excel_settings, DEVICE)
    assert first.send(outbox.claim(10), "token").acked == list(range(1, 11))
    first.close()                                   # ...and the agent dies before outbox.ack()
    second = make_sink(excel_settings, DEVICE)
    assert second.send(outbox.claim(10), "token").acked == list(range(1, 11))
    second.close()
    assert [r[2] for r in sim_graph.table_rows(ITEM, TABLE)] == list(range(1, 11))


@pytest.mark.parametrize("status", [409, 423])
def test_excel_workbook_open_or_locked_is_retried_with_retry_after_not_dead_lettered(
        outbox: Outbox, excel_settings: UploadSettings, excel_sink: GraphExcelSink, sim_graph: SimGraph,
        tokens: FakeTokens, status: int) -> None:
    outbox.put([reading(i) for i in range(10)])
    sim_graph.fail(status, count=2, retry_after=30, after=2)     # the two start-up GETs pass
    clock = FakeClock(100.0)
    state = AgentState()
    up = Uploader(outbox, excel_sink, tokens, state, excel_settings, clock=clock, rng=lambda: 0.5)
    waits = []
    for _ in range(3):
        waits.append(up.step())
        clock.now += waits[-1]
    assert waits[:2] == [30.0, 30.0], "Retry-After honoured, not a tight loop"
    assert outbox.counts() == OutboxCounts(pending=0, dead=0, dropped=0)
    assert [r[2] for r in sim_graph.table_rows(ITEM, TABLE)] == list(range(1, 11))
    adds = [r.status for r in sim_graph.requests if r.path.endswith("/rows/add")]
    assert adds == [status, status, 201]


def test_excel_413_halves_the_batch_until_the_rows_fit(outbox: Outbox, excel_settings: UploadSettings,
                                                       excel_sink: GraphExcelSink, sim_graph: SimGraph,
                                                       tokens: FakeTokens) -> None:
    outbox.put([reading(i) for i in range(40)])
    sim_graph.max_body_bytes = 1500                  # ~12 rows of ~110 bytes
    clock = FakeClock(100.0)
    up = Uploader(outbox, excel_sink, tokens, AgentState(), excel_settings, clock=clock)
    drain(up, clock, outbox)
    assert outbox.counts() == OutboxCounts(pending=0, dead=0, dropped=0)
    assert [r[2] for r in sim_graph.table_rows(ITEM, TABLE)] == list(range(1, 41)), "in order, once"
    adds = [(r.status, r.items) for r in sim_graph.requests if r.path.endswith("/rows/add")]
    assert adds[0] == (413, 40)
    assert [n for s, n in adds if s == 201] == [10, 10, 10, 10]


def test_excel_single_row_still_too_large_is_the_only_one_dead_lettered(
        outbox: Outbox, excel_settings: UploadSettings, excel_sink: GraphExcelSink, sim_graph: SimGraph,
        tokens: FakeTokens) -> None:
    outbox.put([reading(i) for i in range(5)] + [reading(5, sensor="x" * 3000)]
               + [reading(i) for i in range(6, 9)])
    sim_graph.max_body_bytes = 2000
    clock = FakeClock(100.0)
    up = Uploader(outbox, excel_sink, tokens, AgentState(), excel_settings, clock=clock)
    drain(up, clock, outbox)
    assert outbox.counts() == OutboxCounts(pending=0, dead=1, dropped=0)
    seq, reason, _ = outbox.dead_rows()[0]
    assert seq == 6 and "413" in reason
    assert [r[2] for r in sim_graph.table_rows(ITEM, TABLE)] == [1, 2, 3, 4, 5, 7, 8, 9]
