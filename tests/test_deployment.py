"""A deployment across machines, as processes: one API process, `kontext worker` processes, PostgreSQL
and S3-compatible object storage, each process with a data directory of its own (nothing shared but
the database, the bucket and the signing secret).

One worker is killed (SIGKILL) mid-job, another drained (SIGTERM) mid-job, a third started: every job
completes exactly once, each upstream task is submitted once, and every image is readable through the
API process's links.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import signal
import sqlite3
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from PIL import Image

from conftest import PATIENCE_S, start_kontext, throwaway_postgres_database, wait_healthy, wait_until
from fakes.common import free_port, output_size, serve, stop
from fakes.replicate import FakeReplicate
from fakes.s3 import SHADOWING, MotoS3
from kontext_gateway.store.db import Database
from kontext_gateway.store.records import JobStatus, RequestRow

JOBS = 6
PER_WORKER = 3  # two workers hold every job between them


@pytest.fixture
def pg_database() -> Iterator[str]:
    with throwaway_postgres_database("kontext_deploy") as url:
        yield url


def rows(database_url: str, ids: list[str]) -> list[RequestRow]:
    async def read() -> list[RequestRow]:
        db = Database(database_url)
        await db.start()
        try:
            found = [await db.get_request(i) for i in ids]
        finally:
            await db.close()
        return [r for r in found if r is not None]

    return asyncio.run(read())


def test_killed_and_drained_workers_leave_every_job_done_once_and_every_image_readable(
    pg_database: str, s3: MotoS3, tmp_path: Path
) -> None:
    bucket = s3.new_bucket()
    fake = FakeReplicate(pending_polls=10**9)  # upstream tasks run until released below
    with serve(fake.app) as fake_url:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        shared = {
            "DATABASE_URL": pg_database,
            "REPLICATE_API_TOKEN": "r8_test",
            "REPLICATE_BASE_URL": fake_url,
            "KONTEXT_URL_SECRET": "one-secret-for-every-process",
            "KONTEXT_JOB_LEASE_S": "4",
            "KONTEXT_JOB_POLL_INTERVAL_S": "0.1",
            "KONTEXT_DRAIN_TIMEOUT_S": "1",
            "KONTEXT_BLOB_URL": f"s3://{bucket}/images",
            **s3.env(),
        }

        def machine(name: str) -> dict[str, str]:
            return {**shared, "KONTEXT_DATA_DIR": str(tmp_path / name)}

        procs: list[subprocess.Popen[bytes]] = []
        try:
            api = start_kontext(
                ["serve", "--port", str(port), "--workers", "0"], machine("api"), tmp_path / "api.log", unset=SHADOWING
            )
            procs.append(api)
            wait_healthy(url, api, tmp_path / "api.log")
            assert httpx.get(f"{url}/health/ready").status_code == 200
            first, second = (
                start_kontext(
                    ["worker", "--concurrency", str(PER_WORKER)],
                    machine(name),
                    tmp_path / f"{name}.log",
                    unset=SHADOWING,
                )
                for name in ("worker-a", "worker-b")
            )
            procs += [first, second]
            with httpx.Client(base_url=url, timeout=PATIENCE_S) as http:
                created = [
                    http.post(
                        "/v1/models/black-forest-labs/flux-kontext-pro/predictions",
                        json={"input": {"prompt": f"job {i}", "aspect_ratio": "1:1"}},
                    )
                    for i in range(JOBS)
                ]
                assert [r.status_code for r in created] == [201] * JOBS, created[0].text
                ids = [r.json()["id"] for r in created]

                # Both workers mid-job: every task submitted upstream, three held by each.
                def both_busy() -> bool:
                    held = Counter(r.claimed_by for r in rows(pg_database, ids) if r.status == JobStatus.PROCESSING)
                    return len(fake.submits()) == JOBS and sorted(held.values()) == [PER_WORKER, PER_WORKER]

                assert wait_until(both_busy, interval=0.2), Counter(r.status for r in rows(pg_database, ids))
                holders = {r.id: r.claimed_by for r in rows(pg_database, ids)}

                first.kill()  # a machine lost: its leases run out
                first.wait()
                second.send_signal(signal.SIGTERM)  # a deploy: drained, the rest handed back
                assert second.wait(timeout=PATIENCE_S) == 0
                now = datetime.now(UTC)
                second_log = (tmp_path / "worker-b.log").read_text()
                assert "handed 3 unfinished jobs back to the queue" in second_log, second_log[-2000:]
                released = [r for r in rows(pg_database, ids) if r.lease_until is not None and r.lease_until < now]
                assert len(released) >= PER_WORKER  # the drained worker's, at once (the killed one's may follow)

                third = start_kontext(
                    ["worker", "--concurrency", str(JOBS)],
                    machine("worker-c"),
                    tmp_path / "worker-c.log",
                    unset=SHADOWING,
                )
                procs.append(third)
                for prediction in list(fake.predictions.values()):
                    prediction["_polls_left"] = 0  # the upstream tasks finish now

                def all_ended() -> bool:
                    return all(r.status in (JobStatus.SUCCEEDED, JobStatus.FAILED) for r in rows(pg_database, ids))

                assert wait_until(all_ended, timeout=2 * PATIENCE_S, interval=0.2), (
                    tmp_path / "worker-c.log"
                ).read_text()[-3000:]
                final = rows(pg_database, ids)
                assert Counter(r.status for r in final) == {JobStatus.SUCCEEDED: JOBS}
                assert all(r.runs == 2 for r in final)  # taken up once more each, resumed, not rerun
                assert {r.claimed_by for r in final}.isdisjoint(holders.values())  # all by the third
                prompts = Counter(body["input"]["prompt"] for _, _, _, body in fake.submits())
                assert prompts == {f"job {i}": 1 for i in range(JOBS)}  # each upstream task submitted once

                for rid in ids:
                    prediction = http.get(f"/v1/predictions/{rid}").json()
                    assert prediction["status"] == "succeeded", prediction
                    (link,) = prediction["output"] if isinstance(prediction["output"], list) else [prediction["output"]]
                    image = httpx.get(link, timeout=PATIENCE_S)
                    assert image.status_code == 200, image.text
                    with Image.open(io.BytesIO(image.content)) as im:
                        # What the fake drew for 1:1, as the worker stored it in the bucket.
                        assert (im.format, im.size) == ("PNG", output_size("1:1", fake.results.scale))
        finally:
            for proc in procs:
                stop(proc)


@contextlib.contextmanager
def stopping_server(tmp_path: Path) -> Iterator[tuple[str, FakeReplicate, Callable[[], None]]]:
    """`kontext serve` on a data dir in `tmp_path` (drain timeout 1 s), its one upstream a fake Replicate
    whose tasks never end while it runs: (its URL, the fake, `sigterm`: sends SIGTERM once the fake
    has the task, and checks that the server drains and exits 0)."""
    fake = FakeReplicate(pending_polls=10**9)
    with serve(fake.app) as fake_url:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            "KONTEXT_DATA_DIR": str(tmp_path / "data"),
            "REPLICATE_API_TOKEN": "r8_test",
            "REPLICATE_BASE_URL": fake_url,
            "KONTEXT_DRAIN_TIMEOUT_S": "1",
        }
        server = start_kontext(["serve", "--port", str(port)], env, tmp_path / "serve.log")

        def sigterm() -> None:
            assert wait_until(lambda: len(fake.submits()) == 1)
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=PATIENCE_S) == 0

        try:
            wait_healthy(url, server, tmp_path / "serve.log")
            yield url, fake, sigterm
        finally:
            stop(server)


def handed_back_row(tmp_path: Path) -> RequestRow:
    """The one request `stopping_server` ran, checked handed back: its lease released for the next
    process to resume it at once from its journal; not failed, not canceled."""
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "kontext.db")) as conn:
        ids = [rid for (rid,) in conn.execute("SELECT id FROM requests")]
    (row,) = rows(f"sqlite+aiosqlite:///{tmp_path / 'data' / 'kontext.db'}", ids)
    assert row.status == JobStatus.PROCESSING and not row.cancel_requested, (row.status, row.cancel_requested)
    assert row.lease_until is not None and row.lease_until < datetime.now(UTC)
    assert "handed 1 unfinished jobs back to the queue" in (tmp_path / "serve.log").read_text()
    return row


def test_sigterm_drains_an_embedded_server_and_hands_its_running_job_back(tmp_path: Path) -> None:
    with stopping_server(tmp_path) as (url, _, sigterm):
        created = httpx.post(
            f"{url}/v1/models/black-forest-labs/flux-kontext-pro/predictions",
            json={"input": {"prompt": "a lighthouse"}},
            timeout=PATIENCE_S,
        )
        assert created.status_code == 201, created.text
        sigterm()
    assert handed_back_row(tmp_path).id == created.json()["id"]


def cut_off_by_a_stop(
    tmp_path: Path, path: str, body: dict, headers: dict[str, str]
) -> tuple[httpx.Response, RequestRow]:
    """A request that waits on the job of `stopping_server`, then SIGTERM: the request's answer (once
    the drain has run out), and its job's row after, handed back like any other job (not canceled as
    if its client had left)."""
    answers: list[httpx.Response | Exception] = []
    with stopping_server(tmp_path) as (url, _, sigterm):

        def send() -> None:
            try:
                answers.append(httpx.post(f"{url}{path}", json=body, headers=headers, timeout=PATIENCE_S))
            except httpx.HTTPError as exc:
                answers.append(exc)

        client = threading.Thread(target=send)
        client.start()
        sigterm()
        client.join(PATIENCE_S)
    (answer,) = answers
    assert isinstance(answer, httpx.Response), answer  # answered, not cut off without a word
    return answer, handed_back_row(tmp_path)


def test_a_synchronous_image_request_cut_off_by_a_stop_hears_where_its_job_goes_on(tmp_path: Path) -> None:
    """Still waiting when the drain runs out: 503 naming the request (never the server's bare 500),
    and the SDKs told not to retry (without an Idempotency-Key a retry would pay for a second job)."""
    body = {"model": "replicate/flux.1-kontext-pro", "prompt": "a lighthouse"}
    answer, row = cut_off_by_a_stop(tmp_path, "/v1/images/generations", body, {})
    error = answer.json()["error"]
    assert answer.status_code == 503 and error["code"] == "server_shutting_down", answer.text
    assert answer.headers["x-request-id"] == row.id and f"GET /v1/requests/{row.id}" in error["message"]
    assert answer.headers["x-should-retry"] == "false"


def test_an_idempotent_image_request_cut_off_by_a_stop_may_be_sent_again(tmp_path: Path) -> None:
    body = {"model": "replicate/flux.1-kontext-pro", "prompt": "a lighthouse"}
    answer, row = cut_off_by_a_stop(tmp_path, "/v1/images/generations", body, {"Idempotency-Key": "lighthouse-1"})
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "server_shutting_down"
    assert answer.headers["x-should-retry"] == "true" and answer.headers["retry-after"] == "1"
    assert answer.headers["x-request-id"] == row.id and "same Idempotency-Key" in answer.json()["error"]["message"]


def test_a_waiting_prediction_cut_off_by_a_stop_is_answered_as_it_stands(tmp_path: Path) -> None:
    """`Prefer: wait` still holding when the drain runs out: 201, the prediction not yet done, as when
    the wait runs out (its client polls `urls.get` on another process)."""
    path = "/v1/models/black-forest-labs/flux-kontext-pro/predictions"
    answer, row = cut_off_by_a_stop(tmp_path, path, {"input": {"prompt": "a lighthouse"}}, {"Prefer": "wait=60"})
    prediction = answer.json()
    assert answer.status_code == 201, answer.text
    assert prediction["id"] == row.id and prediction["status"] in ("starting", "processing")
