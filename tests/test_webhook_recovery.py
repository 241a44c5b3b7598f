"""A job that ended without its `completed` webhook queued (a crash in between) is announced at start."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from kontext_gateway.config import Settings
from kontext_gateway.gateway import Gateway
from kontext_gateway.store.models import utcnow


async def test_ended_job_without_webhook_is_announced_on_start(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, allow_private_urls=True, workers=1)
    gw = Gateway(settings)
    await gw.start(workers=False)
    try:
        # As a crash would leave it: the job ended, its completed webhook never queued.
        await gw.db.create_request(
            id="req_crashed",
            endpoint="predictions",
            model="kontext-tiny",
            mode="text-to-image",
            params={"prompt": "x"},
            webhook="http://127.0.0.1:9/hook",
            webhook_events=["completed"],
        )
        await gw.db.mark_succeeded(
            "req_crashed",
            provider="local/kontext-tiny",
            cost=0.0,
            currency="USD",
            output_blob_ids=[],
            attempts=[],
            output_size="32x32",
            output_format="png",
            duration_ms=5,
            logs="done\n",
        )
        # It ended a minute ago (jobs that ended seconds ago are left to their own runner).
        await gw.db._update("req_crashed", completed_at=utcnow() - timedelta(minutes=1))
        assert await gw.db.list_deliveries("req_crashed") == []
        await gw.webhooks.start()
        await gw.webhooks.stop()
        events = [d.event for d in await gw.db.list_deliveries("req_crashed")]
        assert events == ["completed"]
        await gw.webhooks.start()  # a second start announces nothing twice
        await gw.webhooks.stop()
        assert [d.event for d in await gw.db.list_deliveries("req_crashed")] == ["completed"]
        assert (await gw.db.get_request("req_crashed")).logs == "done\n"
    finally:
        await gw.close()


async def test_the_database_keeps_one_completed_webhook_per_prediction(tmp_path: Path) -> None:
    gw = Gateway(Settings(data_dir=tmp_path))
    await gw.start(workers=False)
    try:
        await gw.db.create_request(
            id="req_once",
            endpoint="predictions",
            model="kontext-tiny",
            mode="text-to-image",
            params={"prompt": "x"},
            webhook="http://127.0.0.1:9/hook",
        )
        first = await gw.db.add_delivery("req_once", event="completed", url="http://127.0.0.1:9/hook", payload={})
        second = await gw.db.add_delivery("req_once", event="completed", url="http://127.0.0.1:9/hook", payload={})
        logs = await gw.db.add_delivery("req_once", event="logs", url="http://127.0.0.1:9/hook", payload={})
        again = await gw.db.add_delivery("req_once", event="logs", url="http://127.0.0.1:9/hook", payload={})
        assert first is not None and second is None and logs is not None and again is not None
        assert [d.event for d in await gw.db.list_deliveries("req_once")] == ["completed", "logs", "logs"]
    finally:
        await gw.close()
