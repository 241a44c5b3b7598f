"""The Black Forest Labs adapter against a faithful fake of BFL's API, driven through the gateway with
the official OpenAI SDK: routes, every parameter mapping as BFL receives it, fan-out, moderation
statuses, transient faults, bad credentials, the active-task limits, and the schema's handling table."""

from __future__ import annotations

import base64
import itertools
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
from kontext_gateway.config import Settings
from kontext_gateway.providers.bfl import BFL
from kontext_gateway.providers.hosted import poll_schedule

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
    assert one_submit(fake)[1]["output_format"] == (fmt if fmt in ("png", "jpeg", "webp") else "png")  # BFL's own


@pytest.mark.parametrize("given,sent", [("5", 5), (0, 0), ("1", 1), (6, 6)])
def test_safety_tolerance_is_an_int(client: OpenAI, fake: FakeBFL, given: Any, sent: int) -> None:
    client.images.generate(
        model="flux.1-kontext-pro", prompt="x", response_format="b64_json", extra_body={"safety_tolerance": given}
    )
    value = one_submit(fake)[1]["safety_tolerance"]
    assert value == sent and type(value) is int


@pytest.mark.parametrize("given", [9, -1, "high"])
def test_safety_tolerance_out_of_range_is_a_400_naming_the_range(client: OpenAI, fake: FakeBFL, given: Any) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(model="flux.1-kontext-pro", prompt="x", extra_body={"safety_tolerance": given})
    err = exc.value.body
    assert err["param"] == "safety_tolerance" and err["code"] == "unsupported_by_providers"
    assert "an integer from 0 to 6" in err["message"]
    assert fake.submits() == []  # refused here, not by BFL


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
    assert body["prompt_upsampling"] is True
    for absent in ("bfl_new_knob", "enhance_prompt", "sync_mode", "guidance", "guidance_scale", "num_inference_steps"):
        assert absent not in body  # not in BFL's published schema: never sent
    assert meta(resp)["ignored_params"] == [
        "bfl_new_knob",
        "cfg_scale",
        "enhance_prompt",
        "num_inference_steps",
        "sync_mode",
    ]


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


def test_moderation_reasons_as_seen_in_the_wild(client: OpenAI, fake: FakeBFL) -> None:
    fake.faults.add("moderation", at="poll", reasons=["Safety Filter"])
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(model="flux.1-kontext-pro", prompt="something flagged")
    assert exc.value.body["code"] == "content_policy_violation" and "Safety Filter" in exc.value.body["message"]
    assert len(fake.submits()) == 1


def test_polls_the_returned_polling_url_on_its_own_host(client: OpenAI, fake: FakeBFL) -> None:
    """The task lives on the cluster its polling_url names: another host and port than the submit's."""
    client.images.generate(model="flux.1-kontext-pro", prompt="x", response_format="b64_json")
    assert fake.polling.url is not None
    polls = {r.host for r in fake.received if r.path.startswith("/v1/get_result")}
    assert polls == {httpx.URL(fake.polling.url).netloc.decode()} and fake.misrouted == []


# -- failures: what is tried again, and what is not --------------------------------------------------------


@pytest.mark.parametrize(
    "kind,error_class,status",
    [
        ("429", "rate_limited", 429),
        ("500", "server_error", 500),
        ("drop", "connection_error", None),
        ("malformed", "malformed_response", 200),
    ],
)
def test_a_failed_submit_is_tried_again(
    client: OpenAI, fake: FakeBFL, kind: str, error_class: str, status: int | None
) -> None:
    """Before a task exists nothing was made or paid: the submit is simply tried again."""
    fake.faults.add(kind, at="submit", retry_after=0.1 if kind == "429" else None)
    resp = client.images.generate(model="flux.1-kontext-pro", prompt="x", response_format="b64_json")
    assert decode(resp.data[0]).format == "PNG"
    first, second = meta(resp)["attempts"]
    assert first["outcome"] == "failed" and first["error_class"] == error_class
    assert first.get("status_code") == status
    assert second["outcome"] == "succeeded"


def test_an_answer_too_long_to_hold_is_refused_unread_and_tried_again(client: OpenAI, fake: FakeBFL) -> None:
    fake.faults.add("huge", at="submit")  # 17 MiB of JSON, past the 16 MiB an answer may hold
    resp = client.images.generate(model="flux.1-kontext-pro", prompt="x", response_format="b64_json")
    assert decode(resp.data[0]).format == "PNG"
    first, second = meta(resp)["attempts"]
    assert first["error_class"] == "malformed_response" and "the answer is over 16 MiB" in first["message"]
    assert second["outcome"] == "succeeded"


def test_polling_starts_soon_and_backs_off_to_the_interval() -> None:
    settings = Settings()
    waits = list(itertools.islice(poll_schedule(settings.upstream_first_poll_s, settings.upstream_poll_interval_s), 14))
    assert waits[:2] == [0.0, 0.05]  # looked at once (a task may be done already), then soon after
    assert all(later >= earlier for earlier, later in itertools.pairwise(waits))
    assert (
        sum(waits[:5]) < 0.5 and max(waits) == waits[-1] == 1.0
    )  # five polls in the first half second, then one a second
    assert list(itertools.islice(poll_schedule(0.5, 0.2), 3)) == [0.0, 0.2, 0.2]  # the interval bounds the waits


@pytest.mark.parametrize("kind", ["503", "drop", "malformed"])
def test_a_failed_poll_polls_again(client: OpenAI, fake: FakeBFL, kind: str) -> None:
    """The task is still there: one task, one attempt, nothing paid twice."""
    fake.faults.add(kind, at="poll")
    resp = client.images.generate(model="flux.1-kontext-pro", prompt="x", response_format="b64_json")
    assert decode(resp.data[0]).format == "PNG"
    assert [a["outcome"] for a in meta(resp)["attempts"]] == ["succeeded"]
    assert len(fake.submits()) == 1 and (kind, "poll") in fake.faults.fired


@pytest.mark.parametrize(
    "kind,at,error_class,status",
    [
        ("not_found", "poll", "task_lost", 404),
        ("not_image", "download", "bad_result", None),
        ("result_404", "download", "bad_result", 404),
    ],
)
def test_a_lost_task_is_resubmitted_once(
    client: OpenAI, fake: FakeBFL, kind: str, at: str, error_class: str, status: int | None
) -> None:
    fake.faults.add(kind, at=at)
    resp = client.images.generate(model="flux.1-kontext-pro", prompt="x", response_format="b64_json")
    assert decode(resp.data[0]).format == "PNG"
    first, second = meta(resp)["attempts"]
    assert first["outcome"] == "failed" and first["error_class"] == error_class
    assert first.get("status_code") == status
    # A result made upstream and lost on the way here was billed: the ledger counts it.
    assert first.get("billed_images") == (1 if at == "download" else None)
    assert second["outcome"] == "succeeded"
    assert len(fake.submits()) == 2  # the lost task, then a fresh one


def test_a_task_is_resubmitted_at_most_once(client: OpenAI, fake: FakeBFL) -> None:
    fake.faults.add("not_found", at="poll", times=2)
    with pytest.raises(openai.InternalServerError) as exc:  # BFL is the only provider here
        client.images.generate(model="flux.1-kontext-pro", prompt="x")
    assert exc.value.body["code"] == "all_providers_exhausted"
    assert exc.value.body["message"].count("task_lost") == 2
    assert len(fake.submits()) == 2


def test_a_failed_task_is_not_resubmitted(client: OpenAI, fake: FakeBFL) -> None:
    """BFL ran it and says `Error`: it would likely fail again, and every submit is paid."""
    fake.faults.add("task_error", at="poll")
    with pytest.raises(openai.InternalServerError) as exc:
        client.images.generate(model="flux.1-kontext-pro", prompt="x")
    assert exc.value.body["code"] == "all_providers_exhausted" and "task_failed" in exc.value.body["message"]
    assert len(fake.submits()) == 1


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
        assert shown == {name: h for name, h in BFL.HANDLING.items() if name in spec["properties"]}
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
        ({"prompt": "x", "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "safety_tolerance": 7}, "safety_tolerance"),
        ({"prompt": "x", "safety_tolerance": "2"}, "safety_tolerance"),  # an integer in the OpenAPI
        ({"prompt": "x", "enhance_prompt": True}, "enhance_prompt"),  # not a field of the route
    ],
)
def test_fake_validates_like_bfl(fake: FakeBFL, fake_url: str, body: dict[str, Any], field: str) -> None:
    resp = httpx.post(f"{fake_url}/v1/flux-kontext-pro", json=body, headers={"x-key": "bfl_test"})
    assert resp.status_code == 422
    assert [d["loc"] for d in resp.json()["detail"]] == [["body", field]]
    [refusal] = fake.refused
    assert refusal.route == "bfl.flux-kontext-pro" and refusal.problems[0].startswith(f"{field}: ")


def test_fake_makes_webp(fake: FakeBFL, fake_url: str) -> None:
    """webp is in the route's output_format enum: taken, and made."""
    auth = {"x-key": "bfl_test"}
    task = httpx.post(f"{fake_url}/v1/flux-kontext-pro", json={"prompt": "x", "output_format": "webp"}, headers=auth)
    assert task.status_code == 200, task.text
    for _ in range(10):
        answer = httpx.get(task.json()["polling_url"], headers=auth).json()
        if answer["status"] == "Ready":
            break
    assert open_image(httpx.get(answer["result"]["sample"]).content).format == "WEBP"


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
        # The polling_url names the cluster that took the task: another host and port than the submit's.
        assert fake.polling.url is not None and fake.other_origins == [fake.polling.url]
        assert task["polling_url"] == f"{fake.polling.url}/v1/get_result?id={task['id']}"
        submit_host, poll_host = httpx.URL(url), httpx.URL(task["polling_url"])
        assert (poll_host.host, poll_host.port) != (submit_host.host, submit_host.port)
        assert poll_host.host != submit_host.host
        assert httpx.get(task["polling_url"], headers={"x-key": "no"}).status_code == 401
        assert httpx.get(task["polling_url"], headers={"x-key": "bfl_test"}).json()["status"] == "Pending"
        lost = httpx.get(f"{fake.polling.url}/v1/get_result?id=nope", headers={"x-key": "bfl_test"})
        assert lost.status_code == 404 and lost.json()["status"] == "Task not found"
        # A URL rebuilt from the submit host finds nothing there.
        rebuilt = httpx.get(f"{url}/v1/get_result?id={task['id']}", headers={"x-key": "bfl_test"})
        assert rebuilt.status_code == 404 and rebuilt.json()["status"] == "Task not found"
        assert fake.misrouted == [f"{url}/v1/get_result?id={task['id']}"]
    assert fake.polling.url is None  # stopped with the fake
