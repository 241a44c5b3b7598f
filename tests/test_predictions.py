"""The predictions API, driven by the official `replicate` Python client against a live server."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import replicate
from replicate.exceptions import ReplicateError

from conftest import open_image, png_bytes

TINY = "kontext-gateway/kontext-tiny"


@pytest.fixture(scope="module")
def rc(base_url: str) -> Iterator[replicate.Client]:
    # The client has no close(): its connections are closed through the transport given it.
    with httpx.HTTPTransport() as transport:
        client = replicate.Client(
            api_token="not-needed", base_url=base_url, timeout=httpx.Timeout(120), transport=transport
        )
        client.poll_interval = 0.05
        yield client


def image_at(url: str):
    resp = httpx.get(url, timeout=30)
    assert resp.status_code == 200, resp.text
    return open_image(resp.content)


def test_run_waits_and_returns_the_image(rc: replicate.Client) -> None:
    out = rc.run(
        TINY,
        input={
            "prompt": "a lighthouse",
            "aspect_ratio": "16:9",
            "output_format": "jpg",
            "seed": 3,
            "resolution": "0.5K",
        },
    )
    img = image_at(str(out))
    assert img.format == "JPEG" and img.size == (688, 384)  # 16:9 at 0.5K, multiples of 16


def test_create_then_poll(rc: replicate.Client) -> None:
    p = rc.predictions.create(model=TINY, input={"prompt": "a fox", "size": "64x64", "num_outputs": 2})
    assert p.status in ("starting", "processing") and p.urls["get"].endswith(f"/v1/predictions/{p.id}")
    p.wait()
    assert p.status == "succeeded" and p.error is None
    assert isinstance(p.output, list) and len(p.output) == 2  # two images: a list
    assert all(image_at(u).size == (64, 64) for u in p.output)
    assert p.metrics["predict_time"] >= 0 and p.started_at and p.completed_at
    again = rc.predictions.get(p.id)
    assert again.status == "succeeded" and again.input["num_outputs"] == 2


def test_local_file_is_uploaded_and_used(rc: replicate.Client, tmp_path: Path) -> None:
    src = tmp_path / "source.png"
    src.write_bytes(png_bytes(120, 90))
    with open(src, "rb") as fh:
        out = rc.run(
            TINY,
            input={"prompt": "make it night", "input_image": fh, "aspect_ratio": "match_input_image", "size": "96x64"},
        )
    assert image_at(str(out)).size == (96, 64)
    with open(src, "rb") as fh:
        f = rc.files.create(fh, metadata={"purpose": "test"})
    assert f.content_type == "image/png" and f.size == src.stat().st_size and f.metadata == {"purpose": "test"}
    assert rc.files.get(f.id).checksums["sha256"] == f.etag
    out = rc.run(TINY, input={"prompt": "again", "input_image": f.urls["get"], "size": "64x64"})
    assert image_at(str(out)).size == (64, 64)


def test_data_uri_and_replicate_field_names(base_url: str) -> None:
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes(80, 80)).decode()
    resp = httpx.post(
        f"{base_url}/v1/models/{TINY}/predictions",
        headers={"Prefer": "wait=30"},
        timeout=60,
        json={
            "input": {
                "prompt": "edit",
                "input_image": data_uri,
                "guidance": 3.0,
                "num_inference_steps": 2,
                "output_format": "webp",
                "output_quality": 50,
                "size": "64x64",
            }
        },
    )
    assert resp.status_code == 201, resp.text
    p = resp.json()
    assert p["status"] == "succeeded" and p["input"]["input_image"].startswith("data:image/png;base64,...")
    img = image_at(p["output"])
    assert img.format == "WEBP" and img.size == (64, 64)


def test_cancel(rc: replicate.Client) -> None:
    slow = rc.predictions.create(model=TINY, input={"prompt": "slow", "size": "1024x1024", "num_inference_steps": 100})
    rc.predictions.cancel(slow.id)
    deadline = time.monotonic() + 30
    while (p := rc.predictions.get(slow.id)).status not in ("canceled", "succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert p.status == "canceled" and p.output is None and p.completed_at


def test_list_newest_first_with_cursor(rc: replicate.Client, base_url: str) -> None:
    ids = [rc.predictions.create(model=TINY, input={"prompt": f"p{i}", "size": "32x32"}).id for i in range(3)]
    page = httpx.get(f"{base_url}/v1/predictions", params={"limit": 2}).json()
    assert [r["id"] for r in page["results"]] == ids[::-1][:2] and page["previous"] is None
    second = httpx.get(page["next"]).json()
    assert second["results"][0]["id"] == ids[0]
    first_page = rc.predictions.list()
    assert first_page.results[0].id == ids[-1]


def test_images_requests_share_the_history(client, base_url: str) -> None:
    resp = client.images.with_raw_response.generate(model="kontext-tiny", prompt="shared", size="32x32")
    rid = resp.headers["x-request-id"]
    p = httpx.get(f"{base_url}/v1/predictions/{rid}").json()
    assert p["status"] == "succeeded" and p["input"]["prompt"] == "shared" and p["source"] == "web"
    assert image_at(p["output"]).size == (32, 32)


@pytest.mark.parametrize(
    "path,body,status,code",
    [
        (f"/v1/models/{TINY}/predictions", {}, 400, "missing_required_parameter"),
        ("/v1/models/nobody/nothing/predictions", {"input": {"prompt": "x"}}, 404, "model_not_found"),
        ("/v1/predictions", {"input": {"prompt": "x"}}, 400, "missing_required_parameter"),
        (f"/v1/models/{TINY}/predictions", {"input": {"prompt": ""}}, 400, "invalid_value"),
        (
            f"/v1/models/{TINY}/predictions",
            {"input": {"prompt": "x", "input_image": "ftp://x/y.png"}},
            400,
            "invalid_image_url",
        ),
        (
            f"/v1/models/{TINY}/predictions",
            {"input": {"prompt": "x"}, "webhook_events_filter": ["start"], "webhook": 42},
            422,
            "invalid_url",
        ),
    ],
)
def test_errors(base_url: str, path: str, body: dict, status: int, code: str) -> None:
    resp = httpx.post(base_url + path, json=body, timeout=30)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code


def test_replicate_client_sees_errors(rc: replicate.Client) -> None:
    with pytest.raises(ReplicateError) as err:
        rc.predictions.get("no-such-prediction")
    assert err.value.status == 404
    assert "no-such-prediction" in (err.value.detail or "")


def test_replicate_names_resolve() -> None:
    from kontext_gateway.catalog import Catalog

    catalog = Catalog.load()
    for name, model_id in (
        ("black-forest-labs/flux-kontext-pro", "flux.1-kontext-pro"),
        ("black-forest-labs/flux-kontext-max", "flux.1-kontext-max"),
        ("black-forest-labs/flux-kontext-dev", "flux.1-kontext-dev"),
    ):
        model, forced = catalog.resolve(name)
        assert model.id == model_id and forced is None  # the model, served by the best provider


def test_webhook_secret_is_served(base_url: str) -> None:
    resp = httpx.get(f"{base_url}/v1/webhooks/default/secret")
    assert resp.status_code == 200 and resp.json()["key"].startswith("whsec_")


def test_logs_say_what_happened(rc: replicate.Client) -> None:
    p = rc.predictions.create(model=TINY, input={"prompt": "logged", "size": "32x32"})
    p.wait()
    assert "run 1 on worker" in p.logs and "local/kontext-tiny: succeeded" in p.logs
    assert "succeeded: 1 image(s) 32x32 png from local/kontext-tiny" in p.logs


def test_predictions_nobody_waits_on_leave_nothing_behind(base_url: str, rc: replicate.Client) -> None:
    """Each job someone waits on has a completion signal; one nobody waits on must not keep one."""
    ids = [
        rc.predictions.create(model=TINY, input={"prompt": f"fire and forget {i}", "size": "32x32"}).id
        for i in range(3)
    ]
    for pid in ids:
        rc.predictions.get(pid).wait()
    import gc

    from kontext_gateway.jobs.channels import JobChannels  # the server runs in this process

    # type(), not isinstance(): a dead weakref.proxy among gc's objects (torch.compile leaves some)
    # raises ReferenceError when isinstance() asks for its __class__.
    leftovers = [
        c
        for c in gc.get_objects()
        if type(c) is JobChannels and any(i in c._completions or i in c.progress for i in ids)
    ]
    assert leftovers == []
