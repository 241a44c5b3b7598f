"""GET /v1/usage and `kontext usage`: totals by day, key, model and provider that add up exactly to the
per-request costs and counts, on SQLite and on the real PostgreSQL (there with a session time zone
that is not UTC, so that day grouping is shown to use UTC days)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from conftest import PATIENCE_S, running_server, throwaway_postgres_database
from kontext_gateway import cli
from kontext_gateway.config import Settings
from kontext_gateway.store.db import Database
from kontext_gateway.store.models import RequestRecord


@pytest.fixture(params=["sqlite", "postgresql"], scope="module")
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'kontext.db'}"
        return
    with throwaway_postgres_database("kontext_usage") as url:
        import asyncpg

        async def off_utc() -> None:  # date(timestamptz) would now give New York days
            conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres", timeout=PATIENCE_S)
            try:
                await conn.execute(f"ALTER DATABASE \"{url.rsplit('/', 1)[1]}\" SET timezone TO 'America/New_York'")
            finally:
                await conn.close()

        asyncio.run(off_utc())
        yield url


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


TODAY = datetime.now(UTC).date()
# Every request is moved to a set time: a run that spans midnight UTC sees the same days.
# 02:30 UTC: still the day before in New York, so a non-UTC day grouping would put it a day early.
EARLY = datetime(TODAY.year, TODAY.month, TODAY.day, 2, 30, tzinfo=UTC) - timedelta(days=2)
LATE = datetime(TODAY.year, TODAY.month, TODAY.day, 23, 45, tzinfo=UTC) - timedelta(days=1)
MIDNIGHT = datetime(TODAY.year, TODAY.month, TODAY.day, tzinfo=UTC)  # the others: today, already begun


@pytest.fixture(scope="module")
def env(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Key A: n=1 and n=2 (one of them moved two days back) and a rejected request; key B: one request
    (moved to yesterday); the admin key: one request."""
    data_dir = tmp_path_factory.mktemp("usage")
    with running_server(Settings(data_dir=data_dir, database_url=database_url)) as base:
        admin = httpx.post(base + "/v1/admin/keys", json={"name": "root", "admin": True}).json()
        keys = {"admin": admin}
        for name in ("team-a", "team-b"):
            keys[name] = httpx.post(base + "/v1/admin/keys", json={"name": name}, headers=bearer(admin["key"])).json()

        def generate(key: str, **body: Any) -> httpx.Response:
            return httpx.post(
                base + "/v1/images/generations",
                headers=bearer(keys[key]["key"]),
                timeout=60,
                json={"model": "kontext-tiny", "prompt": "usage", "size": "32x32", **body},
            )

        a1, a2 = generate("team-a").headers["x-request-id"], generate("team-a", n=2).headers["x-request-id"]
        rejected = generate("team-a", size="0x0")
        assert rejected.status_code == 400
        b1 = generate("team-b").headers["x-request-id"]
        own = generate("admin")
        assert own.status_code == 200
        today = dict.fromkeys([a2, rejected.headers["x-request-id"], own.headers["x-request-id"]], MIDNIGHT)
        asyncio.run(_move(database_url, {a1: EARLY, b1: LATE, **today}))
        yield {"base": base, "keys": keys, "data_dir": data_dir, "database_url": database_url, "a2": a2}


async def _move(url: str, when: dict[str, datetime]) -> None:
    db = Database(Settings(database_url=url).resolved_database_url())
    await db.start()
    try:
        async with db.session() as session, session.begin():
            for rid, at in when.items():
                moved = await session.execute(
                    update(RequestRecord).where(RequestRecord.id == rid).values(created_at=at)
                )
                assert moved.rowcount == 1, rid
    finally:
        await db.close()


def usage(env: dict[str, Any], key: str, **params: Any) -> dict[str, Any]:
    resp = httpx.get(env["base"] + "/v1/usage", params=params, headers=bearer(env["keys"][key]["key"]))
    assert resp.status_code == 200, resp.text
    return resp.json()


def history(env: dict[str, Any], key: str) -> list[dict[str, Any]]:
    resp = httpx.get(env["base"] + "/v1/requests", params={"limit": 100}, headers=bearer(env["keys"][key]["key"]))
    return resp.json()["data"]


def expected(records: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "requests": len(records),
        "succeeded": sum(r["status"] == "succeeded" for r in records),
        "failed": sum(r["status"] == "failed" for r in records),
        "images": sum(r["n"] for r in records if r["status"] == "succeeded"),
        "cost_micros": sum(round((r["cost"] or 0) * 1_000_000) for r in records),
    }


def test_totals_equal_the_sum_of_the_requests(env: dict[str, Any]) -> None:
    report = usage(env, "admin")
    assert report["object"] == "usage" and report["group_by"] == ["day", "key", "model", "provider"]
    records = history(env, "admin")
    want = expected(records)
    assert want == {"requests": 5, "succeeded": 4, "failed": 1, "images": 5, "cost_micros": 5000}
    assert {k: report["totals"][k] for k in want} == want and report["totals"]["cost_usd"] == 0.005
    for name in want:  # the rows add up to the totals
        assert sum(row[name] for row in report["data"]) == want[name]
    # Each row is the sum of its own requests.
    for row in report["data"]:
        mine = [
            r
            for r in records
            if r["created_at"][:10] == row["day"]
            and r["key_id"] == row["key_id"]
            and r["model"] == row["model"]
            and r["provider"] == row["provider"]
        ]
        assert {k: row[k] for k in want} == expected(mine)
    names = {row["key_id"]: row["key_name"] for row in report["data"]}
    assert names[env["keys"]["team-a"]["id"]] == "team-a" and names[env["keys"]["admin"]["id"]] == "root"


def test_keys_see_their_own_usage(env: dict[str, Any]) -> None:
    a = usage(env, "team-a")
    assert {row["key_id"] for row in a["data"]} == {env["keys"]["team-a"]["id"]}
    assert (
        {k: a["totals"][k] for k in ("requests", "succeeded", "failed", "images", "cost_micros")}
        == expected(history(env, "team-a"))
        == {"requests": 3, "succeeded": 2, "failed": 1, "images": 3, "cost_micros": 3000}
    )
    assert usage(env, "team-a", key_id=env["keys"]["team-b"]["id"])["data"] == []
    only_b = usage(env, "admin", key_id=env["keys"]["team-b"]["id"], group_by="key")
    assert [(r["key_name"], r["requests"], r["cost_usd"]) for r in only_b["data"]] == [("team-b", 1, 0.001)]


def test_grouping_and_filters(env: dict[str, Any]) -> None:
    by_day = usage(env, "admin", group_by="day")
    days = {row["day"]: row["requests"] for row in by_day["data"]}
    # The 02:30 UTC request counts on its UTC day, whatever the database session's time zone.
    assert days == {str(EARLY.date()): 1, str(LATE.date()): 1, str(TODAY): 3}
    assert all(row["key_id"] is None and row["model"] is None for row in by_day["data"])
    by_key = usage(env, "admin", group_by="key")
    assert sorted((r["key_name"], r["requests"]) for r in by_key["data"]) == [("root", 1), ("team-a", 3), ("team-b", 1)]
    model_provider = usage(env, "admin", group_by="model,provider")["data"]
    assert {(r["model"], r["provider"]): r["requests"] for r in model_provider} == {
        ("kontext-tiny", "local/kontext-tiny"): 4,
        ("kontext-tiny", None): 1,
    }
    assert usage(env, "admin", group_by="")["data"][0]["requests"] == 5  # one row: the grand total

    assert usage(env, "admin", start=str(TODAY))["totals"]["requests"] == 3
    assert usage(env, "admin", end=str(TODAY - timedelta(days=1)))["totals"]["requests"] == 2
    assert usage(env, "admin", start=str(EARLY.date()), end=str(EARLY.date()))["totals"]["cost_usd"] == 0.001
    assert usage(env, "admin", provider="local")["totals"]["requests"] == 4
    assert usage(env, "admin", provider="fal")["totals"]["requests"] == 0
    assert usage(env, "admin", model="kontext-tiny")["totals"]["requests"] == 5
    bad = httpx.get(
        env["base"] + "/v1/usage", params={"start": "yesterday"}, headers=bearer(env["keys"]["admin"]["key"])
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "start"
    assert (
        httpx.get(
            env["base"] + "/v1/usage", params={"group_by": "week"}, headers=bearer(env["keys"]["admin"]["key"])
        ).status_code
        == 400
    )


def test_usage_survives_a_purge(env: dict[str, Any]) -> None:
    before = usage(env, "admin")["totals"]
    httpx.delete(
        f"{env['base']}/v1/requests/{env['a2']}/payloads", headers=bearer(env["keys"]["team-a"]["key"])
    ).raise_for_status()
    assert usage(env, "admin")["totals"] == before


def test_cli_json_and_table(
    env: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", env["database_url"])
    args = ["usage", "--data-dir", str(env["data_dir"])]
    assert cli.main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == usage(env, "admin")

    assert cli.main([*args, "--key", env["keys"]["team-a"]["id"], "--json", "--group-by", "model"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"]["requests"] == 3 and report["totals"]["cost_micros"] == 3000

    assert cli.main([*args, "--days", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["requests"] == 3

    assert cli.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "DAY",
        "KEY",
        "KEY",
        "NAME",
        "MODEL",
        "PROVIDER",
        "REQUESTS",
        "SUCCEEDED",
        "FAILED",
        "IMAGES",
        "COST",
        "(USD)",
    ]
    assert lines[-1].startswith("TOTAL") and lines[-1].split()[1:] == ["5", "4", "1", "5", "0.005000"]
    assert len({len(line) for line in lines}) == 1  # aligned: numbers right-justified to one width
    assert any(line.startswith(str(EARLY.date())) and "team-a" in line for line in lines)

    assert cli.main([*args, "--group-by", "provider", "--model", "kontext-tiny"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "PROVIDER" and lines[-1].split()[1:] == ["5", "4", "1", "5", "0.005000"]

    assert cli.main([*args, "--group-by", "hour"]) == 2
    assert "Unknown group_by" in capsys.readouterr().err


def test_cli_help_lists_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["usage", "--help"])
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--data-dir", "--key", "--model", "--days", "--group-by", "--json"))
