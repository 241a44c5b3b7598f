"""The Black Forest Labs adapter against a faithful fake of BFL's API, driven through the gateway with
the official OpenAI SDK: routes, every parameter mapping as BFL receives it, fan-out, moderation
statuses, transient faults, bad credentials, the active-task limits, and the schema's handling table."""

from __future__ import annotations

import base64
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from conftest import open_image, png_bytes, running_server, upstream_fixtures
from fakes.bfl import FakeBFL
from fakes.common import output_size, serve
from fakes.upstreams import solo_settings
from kontext_gateway.providers.bfl import BFLProvider

SCALE = FakeBFL().results.scale
FORMATS = {"png": "PNG", "jpeg": "JPEG", "gif": "GIF", "webp": "WEBP", "avif": "AVIF"}


# Tasks nobody polls end after 10 minutes here, not the fake's 2 s: however slow the polls, no task
# ends before the gateway has seen it through.
fake, fake_url, gateway, client, _reset = upstream_fixtures(
    "bfl", lambda: FakeBFL(run_s=600), provider_concurrency={"bfl": 2}
)


def decode(item: Any) -> Image.Image:
    return open_image(base64.b64decode(item.b64_json))


def meta(resp: Any) -> dict[str, Any]:
    return resp.model_extra["metadata"]


def one_submit(fake: FakeBFL) -> tuple[str, dict[str, Any]]:
    [(path, body)] = fake.submits()
    return path, body


def bare_image(b64: str) -> Image.Image:
    return open_image(base64.b64decode(b64, validate=True))  # bare base64: no data: prefix


def edit(client: OpenAI, model: str, *sizes: tuple[int, int], **kw: Any) -> Any:
    images = [(f"in{i}.png", png_bytes(w, h), "image/png") for i, (w, h) in enumerate(sizes)]
    return client.images.edit(
        model=model,
        image=images if len(images) > 1 else images[0],
        prompt=kw.pop("prompt", "make it night"),
        response_format="b64_json",
        **kw,
    )


# -- routes and happy paths -----------------------------------------------------------------------------


def test_pro_text_to_image(client: OpenAI, fake: FakeBFL) -> None:
    resp = client.images.generate(
        model="flux.1-kontext-pro",
        prompt="a red fox",
        size="1024x1024",
        output_format="png",
        response_format="b64_json",
        extra_body={"seed": 7},
    )
    img = decode(resp.data[0])
    assert img.format == "PNG" and img.size == output_size("1:1", SCALE)
    path, body = one_submit(fake)
    assert path == "/v1/flux-kontext-pro"
    assert body == {"prompt": "a red fox", "seed": 7, "output_format": "png", "aspect_ratio": "1:1"}
    m = meta(resp)
    assert m["provider"] == "bfl" and m["executed_model"] == "bfl/flux.1-kontext-pro" and m["cost"] == 0.04
    assert [a["outcome"] for a in m["attempts"]] == ["succeeded"]
    task_id = list(fake.tasks)[-1]
    polls = [p for method, p, _, _ in fake.requests if method == "GET" and p.startswith("/v1/")]
    assert polls == [f"/v1/get_result?id={task_id}"] * (fake.pending_polls + 1)  # the returned polling_url
    # x-key on every API call, polling included; never sent to the delivery host.
    for _method, p, headers, _ in fake.requests:
        assert headers.get("x-key") == (None if p.startswith("/results/") else "bfl_test")


def test_max_text_to_image(client: OpenAI, fake: FakeBFL) -> None:
    resp = client.images.generate(
        model="flux.1-kontext-max",
        prompt="a lighthouse",
        output_format="jpeg",
        response_format="b64_json",
        extra_body={"aspect_ratio": "16:9"},
    )
    img = decode(resp.data[0])
    assert img.format == "JPEG" and img.size == output_size("16:9", SCALE)
    path, body = one_submit(fake)
    assert path == "/v1/flux-kontext-max" and body["aspect_ratio"] == "16:9" and body["output_format"] == "jpeg"
    assert meta(resp)["executed_model"] == "bfl/flux.1-kontext-max" and meta(resp)["cost"] == 0.08


def test_text_to_image_default_is_square(client: OpenAI, fake: FakeBFL) -> None:
    client.images.generate(model="flux.1-kontext-max", prompt="x", response_format="b64_json")
    assert one_submit(fake)[1]["aspect_ratio"] == "1:1"


def test_pro_edit_sends_bare_base64_and_keeps_input_ratio(client: OpenAI, fake: FakeBFL) -> None:
    resp = edit(client, "flux.1-kontext-pro", (400, 300))
    img = decode(resp.data[0])
    assert img.format == "PNG" and img.size == output_size("400:300", SCALE)
    path, body = one_submit(fake)
    assert path == "/v1/flux-kontext-pro"
    assert "aspect_ratio" not in body and "input_image_2" not in body  # BFL keeps the input's ratio
    assert not body["input_image"].startswith("data:")
    sent = bare_image(body["input_image"])
    assert sent.format == "PNG" and sent.size == (400, 300)
    assert sent.convert("RGB").tobytes() == open_image(png_bytes(400, 300)).convert("RGB").tobytes()


def test_max_edit_with_several_images(client: OpenAI, fake: FakeBFL) -> None:
    resp = edit(client, "flux.1-kontext-max", (200, 100), (100, 100), (150, 100))
    assert decode(resp.data[0]).size == output_size("200:100", SCALE)
    path, body = one_submit(fake)
    assert path == "/v1/flux-kontext-max" and "input_image_4" not in body
    sizes = [bare_image(body[k]).size for k in ("input_image", "input_image_2", "input_image_3")]
    assert sizes == [(200, 100), (100, 100), (150, 100)]


# -- parameter mapping ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "asked,sent",
    [
        ({"size": "1000x500"}, "16:9"),
        ({"size": "2000x500"}, "21:9"),  # 4:1 is past 21:9: clamped to the widest
        ({"aspect_ratio": "4:5"}, "4:5"),
        ({"size": "9:21"}, "9:21"),
    ],
)
def test_ratio_snapping(client: OpenAI, fake: FakeBFL, asked: dict[str, str], sent: str) -> None:
    edit(client, "flux.1-kontext-pro", (64, 64), extra_body=asked)
    assert one_submit(fake)[1]["aspect_ratio"] == sent


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_output_format_is_explicit_and_converted(client: OpenAI, fake: FakeBFL, fmt: str) -> None:
    resp = client.images.generate(
        model="flux.1-kontext-pro",
        prompt="x",
        output_format=fmt,  # type: ignore[arg-type]
        response_format="b64_json",
    )
    assert decode(resp.data[0]).format == FORMATS[fmt] and resp.output_format == fmt
    assert one_submit(fake)[1]["output_format"] == (fmt if fmt in ("png", "jpeg") else "png")


@pytest.mark.parametrize("given,sent", [("5", 5), (0, 0), ("1", 1), (9, 6)])
def test_safety_tolerance_is_an_int(client: OpenAI, fake: FakeBFL, given: Any, sent: int) -> None:
    client.images.generate(
        model="flux.1-kontext-pro", prompt="x", response_format="b64_json", extra_body={"safety_tolerance": given}
    )
    value = one_submit(fake)[1]["safety_tolerance"]
    assert value == sent and type(value) is int


def test_prompt_upsampling_extras_and_params_bfl_lacks(client: OpenAI, fake: FakeBFL) -> None:
    resp = client.images.generate(
        model="flux.1-kontext-pro",
        prompt="x",
        response_format="b64_json",
        extra_body={
            "prompt_upsampling": True,
            "bfl_new_knob": 3,
            "enhance_prompt": True,
            "sync_mode": True,
            "guidance": 4.0,
            "num_inference_steps": 12,
        },
    )
    _, body = one_submit(fake)
    assert body["prompt_upsampling"] is True and body["bfl_new_knob"] == 3  # unknown extras pass through
    for absent in ("enhance_prompt", "sync_mode", "guidance", "guidance_scale", "num_inference_steps", "steps"):
        assert absent not in body
    assert meta(resp)["ignored_params"] == ["enhance_prompt", "sync_mode"]  # fal's, not sent


def test_n3_is_three_tasks(client: OpenAI, fake: FakeBFL) -> None:
    resp = client.images.generate(model="flux.1-kontext-pro", prompt="x", n=3, response_format="b64_json")
    assert len(resp.data) == 3 and all(decode(d).format == "PNG" for d in resp.data)
    assert [p for p, _ in fake.submits()] == ["/v1/flux-kontext-pro"] * 3
    m = meta(resp)
    assert m["cost"] == pytest.approx(0.12) and [a["images"] for a in m["attempts"]] == [1, 1, 1]


def test_fanned_out_tasks_get_distinct_seeds(client: OpenAI, fake: FakeBFL) -> None:
    resp = client.images.generate(
        model="flux.1-kontext-pro", prompt="x", n=3, response_format="b64_json", extra_body={"seed": 100}
    )
    assert sorted(body["seed"] for _, body in fake.submits()) == [100, 101, 102]
    assert len({decode(d).tobytes() for d in resp.data}) == 3


# -- moderation: 400 content_policy_violation, never retried --------------------------------------------


@pytest.mark.parametrize(
    "kind,at,status",
    [
        ("moderation", "submit", "Request Moderated"),
        ("moderation", "poll", "Content Moderated"),
        ("moderation_503", "poll", "Content Moderated"),  # the body's status wins over the HTTP 503
    ],
)
def test_moderation(client: OpenAI, fake: FakeBFL, kind: str, at: str, status: str) -> None:
    fake.faults.add(kind, at=at)
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(model="flux.1-kontext-pro", prompt="something flagged")
    err = exc.value.body
    assert exc.value.status_code == 400 and err["code"] == "content_policy_violation"
    assert "bfl" in err["message"] and status in err["message"]
    assert ("Derivative Works Filter" if at == "submit" else "NSFW") in err["message"]  # Moderation Reasons
    assert len(fake.submits()) == 1


# -- failures that are retried ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,at,error_class,status",
    [
        ("429", "submit", "rate_limited", 429),
        ("500", "submit", "server_error", 500),
        ("503", "poll", "server_error", 503),
        ("drop", "submit", "connection_error", None),
        ("drop", "poll", "connection_error", None),
        ("malformed", "submit", "malformed_response", None),
        ("malformed", "poll", "malformed_response", None),
        ("task_error", "poll", "task_failed", None),
        ("not_found", "poll", "task_failed", 404),
        ("not_image", "download", "bad_result", None),
        ("result_404", "download", "bad_result", 404),
    ],
)
def test_transient_fault_is_retried(
    client: OpenAI, fake: FakeBFL, kind: str, at: str, error_class: str, status: int | None
) -> None:
    fake.faults.add(kind, at=at, retry_after=0.1 if kind == "429" else None)
    resp = client.images.generate(model="flux.1-kontext-pro", prompt="x", response_format="b64_json")
    assert decode(resp.data[0]).format == "PNG"
    first, second = meta(resp)["attempts"]
    assert first["outcome"] == "failed" and first["error_class"] == error_class
    assert first.get("status_code") == status if status else True
    assert second["outcome"] == "succeeded"
    assert len(fake.submits()) == 2  # the failed task, then a fresh one


def test_newer_progress_states_are_pending(client: OpenAI, fake: FakeBFL) -> None:
    fake.pending_polls, fake.states = 3, ("Pending", "Reasoning", "Generating")
    resp = client.images.generate(model="flux.1-kontext-pro", prompt="x", response_format="b64_json")
    assert decode(resp.data[0]).format == "PNG" and len(meta(resp)["attempts"]) == 1


def test_bad_key_is_reported_without_the_key(
    fake: FakeBFL, fake_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "bfl_WRONG_d0n0tleak_42"
    with running_server(solo_settings("bfl", tmp_path, fake_url, key=secret)) as url:
        resp = httpx.post(
            f"{url}/v1/images/generations", json={"model": "flux.1-kontext-max", "prompt": "x"}, timeout=60
        )
    assert resp.status_code == 502, resp.text
    err = resp.json()["error"]
    assert err["code"] == "all_providers_exhausted" and "authentication" in err["message"]
    assert "credentials rejected" in caplog.text  # the failure was logged...
    assert secret not in resp.text and secret not in caplog.text  # ...without the key
    assert len(fake.submits()) == 1  # bad credentials are not retried


# -- active-task limits: queue rather than fail ----------------------------------------------------------


@pytest.mark.parametrize(
    "model,requests,limit",
    [
        ("flux.1-kontext-pro", 6, 2),  # provider_concurrency={"bfl": 2}
        ("flux.1-kontext-max", 8, 6),  # BFL's own limit for kontext-max
    ],
)
def test_active_tasks_stay_under_the_limit(
    client: OpenAI, fake: FakeBFL, model: str, requests: int, limit: int
) -> None:
    fake.pending_polls = 8  # tasks stay active for a while, so the limit is pressed
    fake.overlap = 2  # and pending until two are active at once: requests do overlap, however slow
    with ThreadPoolExecutor(requests) as pool:
        results = list(
            pool.map(
                lambda i: client.images.generate(model=model, prompt=f"x{i}", response_format="b64_json"),
                range(requests),
            )
        )
    assert all(decode(r.data[0]).format == "PNG" for r in results)
    assert all(len(meta(r)["attempts"]) == 1 for r in results)  # none was refused with a 429
    upstream_model = f"flux-kontext-{model.rsplit('-', 1)[1]}"
    assert 2 <= fake.peak[upstream_model] <= limit and fake.peak["total"] <= limit
    assert len(fake.submits()) == requests


def test_provider_wide_limit_covers_every_model(client: OpenAI, fake: FakeBFL) -> None:
    fake.pending_polls = 8
    models = ["flux.1-kontext-pro", "flux.1-kontext-max"] * 3
    with ThreadPoolExecutor(len(models)) as pool:
        list(pool.map(lambda m: client.images.generate(model=m, prompt="x", response_format="b64_json"), models))
    assert fake.peak["total"] <= 2  # provider_concurrency={"bfl": 2}, like BFL's 24 across all models


@pytest.mark.parametrize("model", ["flux.1-kontext-pro", "flux.1-kontext-max"])
def test_schema_shows_bfl_handling(gateway: str, model: str) -> None:
    schema = httpx.get(f"{gateway}/v1/models/{model}", params={"schema": "true"}, timeout=30).json()["schema"]
    key = f"bfl/{model}"
    for spec in schema["modes"].values():
        shown = {
            name: prop["x-providers"][key]
            for name, prop in spec["properties"].items()
            if prop["x-providers"].get(key, {}).get("handling") not in (None, "passthrough")
        }
        assert shown == {name: h for name, h in BFLProvider.HANDLING.items() if name in spec["properties"]}
    n = schema["modes"]["text-to-image"]["properties"]["n"]["x-providers"][key]
    assert n["handling"] == "emulated"


# -- the fake itself answers like BFL ------------------------------------------------------------------


def _b64_png() -> str:
    return base64.b64encode(png_bytes(32, 32)).decode()


@pytest.mark.parametrize(
    "body,field",
    [
        ({}, "prompt"),
        ({"prompt": "x", "input_image": "data:image/png;base64," + _b64_png()}, "input_image"),
        ({"prompt": "x", "input_image_2": "not base64!"}, "input_image_2"),
        ({"prompt": "x", "aspect_ratio": "4:1"}, "aspect_ratio"),
        ({"prompt": "x", "aspect_ratio": "wide"}, "aspect_ratio"),
        ({"prompt": "x", "output_format": "webp"}, "output_format"),
        ({"prompt": "x", "safety_tolerance": 7}, "safety_tolerance"),
    ],
)
def test_fake_validates_like_bfl(fake_url: str, body: dict[str, Any], field: str) -> None:
    resp = httpx.post(f"{fake_url}/v1/flux-kontext-pro", json=body, headers={"x-key": "bfl_test"})
    assert resp.status_code == 422
    assert [d["loc"] for d in resp.json()["detail"]] == [["body", field]]


def test_fake_checks_auth_and_limits_active_tasks() -> None:
    fake = FakeBFL(run_s=30)
    with serve(fake.app) as url:
        assert (
            httpx.post(f"{url}/v1/flux-kontext-max", json={"prompt": "x"}, headers={"x-key": "no"}).status_code == 401
        )
        codes = [
            httpx.post(f"{url}/v1/flux-kontext-max", json={"prompt": "x"}, headers={"x-key": "bfl_test"}).status_code
            for _ in range(7)
        ]
        assert codes == [200] * 6 + [429]
        task = httpx.post(
            f"{url}/v1/flux-kontext-pro", json={"prompt": "x", "input_image": _b64_png()}, headers={"x-key": "bfl_test"}
        ).json()
        assert task["polling_url"] == f"{url}/v1/get_result?id={task['id']}"
        assert httpx.get(task["polling_url"], headers={"x-key": "no"}).status_code == 401
        lost = httpx.get(f"{url}/v1/get_result?id=nope", headers={"x-key": "bfl_test"})
        assert lost.status_code == 404 and lost.json()["status"] == "Task not found"
