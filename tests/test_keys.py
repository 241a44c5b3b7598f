"""API keys: lifecycle from the CLI and the admin API, and who may call what (401 / 403).

A real server on loopback, the official `openai` client, and `kontext keys ...` run as a separate
process on the same data directory: the server sees its changes at once.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import PATIENCE_S, open_image, running_server
from kontext_gateway.config import Settings

TINY = {"model": "kontext-tiny", "prompt": "a kite", "size": "32x32"}


def kontext(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KONTEXT_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "kontext_gateway", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def sdk(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)


def eventually(call: Callable[[], httpx.Response], status: int, within: float = PATIENCE_S) -> httpx.Response:
    """Servers cache what they read of keys for a second: another process's change shows after it (polled
    for generously, as a busy machine may take longer to get there)."""
    deadline = time.monotonic() + within
    while (resp := call()).status_code != status and time.monotonic() < deadline:
        time.sleep(0.1)
    return resp


def expect_error(resp: httpx.Response, status: int, code: str, type: str = "invalid_request_error") -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    # Replicate's routes add RFC 7807 fields (title, detail, status) beside the OpenAI envelope.
    assert set(body) - {"title", "detail", "status"} == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["type"] == type and body["error"]["message"]
    return body["error"]


def test_key_lifecycle_from_the_cli_is_seen_by_a_running_server(tmp_path: Path) -> None:
    with running_server(Settings(data_dir=tmp_path)) as base:
        # No key yet, on loopback: open (the embedded default).
        assert httpx.post(base + "/v1/images/generations", json=TINY, timeout=60).status_code == 200

        created = kontext(tmp_path, "keys", "create", "--name", "team-a", "--budget", "5", "--rpm", "100", "--json")
        assert created.returncode == 0, created.stderr
        view = json.loads(created.stdout)
        key = view["key"]
        assert key.startswith("kx-") and view["id"].startswith("key_") and view["name"] == "team-a"
        assert view["budget_usd"] == 5.0 and view["rpm"] == 100 and view["hint"] == f"{key[:7]}...{key[-4:]}"

        # Keyed from now on (a process that did not make the key notices within a second): no key,
        # a wrong key -> 401 in the OpenAI envelope.
        missing = eventually(lambda: httpx.post(base + "/v1/images/generations", json=TINY, timeout=60), 401)
        err = expect_error(missing, 401, "invalid_api_key")
        assert "Authorization: Bearer" in err["message"] and missing.headers["www-authenticate"] == "Bearer"
        wrong = httpx.get(base + "/v1/models", headers={"authorization": "Bearer kx-not-a-real-key-at-all"})
        assert "Incorrect API key" in expect_error(wrong, 401, "invalid_api_key")["message"]
        assert "kx-not-a-real-key-at-all" not in wrong.text  # the key is never echoed whole
        with sdk(base) as anonymous, pytest.raises(openai.AuthenticationError):
            anonymous.models.list()

        with sdk(base, key) as client:
            resp = client.images.generate(model="kontext-tiny", prompt="a kite", size="32x32", n=2)
        assert open_image(httpx.get(resp.data[0].url).content).size == (32, 32)

        shown = json.loads(kontext(tmp_path, "keys", "show", view["id"], "--json").stdout)
        assert shown["spent_usd"] == pytest.approx(0.002) and shown["reserved_usd"] == 0
        assert shown["last_used_at"] is not None and "key" not in shown
        listed = kontext(tmp_path, "keys", "list")
        assert "team-a" in listed.stdout and key not in listed.stdout

        updated = json.loads(
            kontext(tmp_path, "keys", "update", view["id"], "--rpm", "none", "--ipm", "7", "--json").stdout
        )
        assert updated["rpm"] is None and updated["ipm"] == 7 and updated["budget_usd"] == 5.0

        revoked = kontext(tmp_path, "keys", "revoke", view["id"], "--json")
        assert json.loads(revoked.stdout)["status"] == "revoked"
        eventually(lambda: httpx.get(base + "/v1/models", headers={"authorization": f"Bearer {key}"}), 401)
        with sdk(base, key) as client, pytest.raises(openai.AuthenticationError) as denied:
            client.images.generate(model="kontext-tiny", prompt="a kite", size="32x32")
        assert "revoked" in denied.value.body["message"]
        # Revoking every key does not reopen the gateway.
        assert httpx.get(base + "/v1/models").status_code == 401

    # Stored hashed: the database file holds the SHA-256, never the key.
    raw = (tmp_path / "kontext.db").read_bytes()
    assert key.encode() not in raw
    with sqlite3.connect(tmp_path / "kontext.db") as db:
        (stored,) = db.execute("SELECT hash FROM api_keys").fetchone()
    import hashlib

    assert stored == hashlib.sha256(key.encode()).hexdigest()


def test_cli_errors_are_clear(tmp_path: Path) -> None:
    bad = kontext(tmp_path, "keys", "create", "--name", "x", "--budget", "lots")
    assert bad.returncode != 0 and "--budget takes a number" in bad.stderr
    unknown = kontext(tmp_path, "keys", "create", "--name", "x", "--models", "no-such-model")
    assert unknown.returncode == 1 and "no-such-model" in unknown.stderr
    missing = kontext(tmp_path, "keys", "revoke", "key_nope")
    assert missing.returncode == 1 and "No API key 'key_nope'" in missing.stderr


def test_admin_api_guards_and_manages_keys(tmp_path: Path) -> None:
    admin = "adm-" + "s" * 40
    with running_server(Settings(data_dir=tmp_path, admin_key=admin)) as base:
        as_admin = {"authorization": f"Bearer {admin}"}
        # An admin key in the environment keys the gateway even before any key exists.
        expect_error(httpx.post(base + "/v1/admin/keys", json={"name": "a"}), 401, "invalid_api_key")
        expect_error(httpx.post(base + "/v1/images/generations", json=TINY), 401, "invalid_api_key")

        made = httpx.post(
            base + "/v1/admin/keys",
            headers=as_admin,
            json={"name": "app", "models": ["kontext-tiny"], "rpm": 30, "budget_usd": 2, "budget_period": "month"},
        )
        assert made.status_code == 201, made.text
        app = made.json()
        assert app["models"] == ["kontext-tiny"] and app["budget_period"] == "month" and app["key"].startswith("kx-")

        user = {"authorization": f"Bearer {app['key']}"}
        denied = httpx.get(base + "/v1/admin/keys", headers=user)
        assert "admin key" in expect_error(denied, 403, "admin_required", "permission_error")["message"]

        listed = httpx.get(base + "/v1/admin/keys", headers=as_admin).json()
        assert [k["id"] for k in listed["data"]] == [app["id"]] and "key" not in listed["data"][0]
        patched = httpx.patch(base + f"/v1/admin/keys/{app['id']}", headers=as_admin, json={"rpm": None, "ipm": 9})
        assert patched.json()["rpm"] is None and patched.json()["ipm"] == 9
        bad = httpx.patch(base + f"/v1/admin/keys/{app['id']}", headers=as_admin, json={"budget_usd": -1})
        assert expect_error(bad, 400, "invalid_value")["param"] == "budget_usd"
        bad = httpx.post(base + "/v1/admin/keys", headers=as_admin, json={"name": "p", "budget_period": "year"})
        assert expect_error(bad, 400, "invalid_value")["param"] == "budget_period"
        expect_error(httpx.get(base + "/v1/admin/keys/key_nope", headers=as_admin), 404, "key_not_found")

        # The key may use its model only: 403 names the ones it may use.
        ok = httpx.post(base + "/v1/images/generations", headers=user, json=TINY, timeout=60)
        assert ok.status_code == 200, ok.text
        other = httpx.post(
            base + "/v1/images/generations", headers=user, json={"model": "flux.1-kontext-pro", "prompt": "x"}
        )
        err = expect_error(other, 403, "model_not_allowed", "permission_error")
        assert err["param"] == "model" and "kontext-tiny" in err["message"]

        assert httpx.delete(base + f"/v1/admin/keys/{app['id']}", headers=as_admin).json()["status"] == "revoked"
        expect_error(httpx.post(base + "/v1/images/generations", headers=user, json=TINY), 401, "invalid_api_key")


def test_a_server_beyond_loopback_needs_a_key_even_with_none_made(tmp_path: Path) -> None:
    with running_server(Settings(data_dir=tmp_path, host="0.0.0.0")) as base:
        expect_error(httpx.get(base + "/v1/models"), 401, "invalid_api_key")
        assert httpx.get(base + "/health").status_code == 200


def test_predictions_and_idempotency_are_scoped_to_the_key(tmp_path: Path) -> None:
    with running_server(Settings(data_dir=tmp_path)) as base:
        # The open gateway makes its first key; from then on the admin key makes the others.
        root = httpx.post(base + "/v1/admin/keys", json={"name": "root", "admin": True}).json()
        as_root = {"authorization": f"Bearer {root['key']}"}
        a = httpx.post(base + "/v1/admin/keys", headers=as_root, json={"name": "a"}).json()
        b = httpx.post(base + "/v1/admin/keys", headers=as_root, json={"name": "b"}).json()

        def create(key: dict[str, Any], idem: str) -> httpx.Response:
            return httpx.post(
                base + "/v1/predictions",
                headers={"authorization": f"Bearer {key['key']}", "idempotency-key": idem},
                json={"model": "kontext-tiny", "input": {"prompt": "x", "size": "32x32"}},
            )

        pa, pb = create(a, "same").json(), create(b, "same").json()
        assert pa["id"] != pb["id"]  # the same Idempotency-Key from two keys names two predictions
        assert create(a, "same").json()["id"] == pa["id"]

        def get(key: dict[str, Any], path: str) -> httpx.Response:
            return httpx.get(base + path, headers={"authorization": f"Bearer {key['key']}"})

        assert get(a, f"/v1/predictions/{pa['id']}").status_code == 200
        expect_error(get(b, f"/v1/predictions/{pa['id']}"), 404, "prediction_not_found")
        assert [p["id"] for p in get(b, "/v1/predictions").json()["results"]] == [pb["id"]]
        assert {p["id"] for p in get(root, "/v1/predictions").json()["results"]} >= {pa["id"], pb["id"]}


async def test_authenticator_cache_sees_new_keys_at_once_and_revocations_within_a_second(tmp_path: Path) -> None:
    from kontext_gateway.errors import GatewayError
    from kontext_gateway.gateway import Gateway
    from kontext_gateway.keys import Authenticator

    now = [100.0]
    gw = Gateway(Settings(data_dir=tmp_path))
    await gw.db.start()
    try:
        auth = Authenticator(gw.settings, gw.keys, clock=lambda: now[0])
        assert (await auth.authenticate(None)).key_id is None  # open
        view, key = await gw.keys.create(name="a")
        assert (await auth.authenticate(f"Bearer {key}")).key_id == view["id"]  # new: looked up at once
        now[0] += 0.5
        with pytest.raises(GatewayError):
            await auth.authenticate(None)  # a key exists now: the stale "open" answer was not trusted
        await gw.keys.revoke(view["id"])  # as from another process: this one does not know yet
        assert (await auth.authenticate(f"Bearer {key}")).key_id == view["id"]
        now[0] += Authenticator.CACHE_S
        with pytest.raises(GatewayError) as revoked:
            await auth.authenticate(f"Bearer {key}")
        assert revoked.value.status == 401 and "revoked" in revoked.value.message
        other, other_key = await gw.keys.create(name="b")
        assert (await auth.authenticate(f"Bearer {other_key}")).key_id == other["id"]
        await gw.keys.revoke(other["id"])
        auth.forget(other["id"])  # revoked through this process: at once
        with pytest.raises(GatewayError):
            await auth.authenticate(f"Bearer {other_key}")
    finally:
        await gw.db.close()


def test_uploaded_files_belong_to_their_key(tmp_path: Path) -> None:
    with running_server(Settings(data_dir=tmp_path)) as base:
        root = httpx.post(base + "/v1/admin/keys", json={"name": "root", "admin": True}).json()
        as_root = {"authorization": f"Bearer {root['key']}"}
        a, b = (httpx.post(base + "/v1/admin/keys", headers=as_root, json={"name": n}).json() for n in "ab")
        auth = lambda k: {"authorization": f"Bearer {k['key']}"}  # noqa: E731
        from conftest import png_bytes

        up = httpx.post(
            base + "/v1/files", headers=auth(a), files={"content": ("x.png", png_bytes(32, 32), "image/png")}
        )
        assert up.status_code == 201, up.text
        fid, url = up.json()["id"], up.json()["urls"]["get"]
        assert httpx.get(url, headers=auth(a)).status_code == 200
        assert httpx.get(url + "/download", headers=auth(root)).status_code == 200  # admin sees all
        expect_error(httpx.get(url, headers=auth(b)), 404, "file_not_found")
        expect_error(httpx.get(url + "/download", headers=auth(b)), 404, "file_not_found")
        # Nor can another key use it as a prediction's input by its URL.
        body = {"model": "kontext-tiny", "input": {"prompt": "x", "input_image": url, "size": "32x32"}}
        mine = httpx.post(base + "/v1/predictions", headers={**auth(a), "prefer": "wait"}, json=body, timeout=60)
        theirs = httpx.post(base + "/v1/predictions", headers=auth(b), json=body)
        assert mine.status_code == 201 and mine.json()["status"] == "succeeded", mine.text
        assert theirs.status_code == 400 and theirs.json()["error"]["code"] == "invalid_image_url"
        assert fid in url
