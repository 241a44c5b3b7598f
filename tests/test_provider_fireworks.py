"""The Fireworks AI adapter end to end: the official OpenAI SDK -> the gateway -> a fake Fireworks.

Every test checks what the fake received (the parameter mapping of provider-apis.md §6) and what the
user got back (decoded image format and size, metadata), with faults injected into the fake.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from conftest import open_image, png_bytes, running_server, upstream_fixtures
from fakes.common import output_size
from fakes.fireworks import FakeFireworks
from fakes.upstreams import solo_settings
from kontext_gateway.catalog import Catalog
from kontext_gateway.providers.calls import Task
from kontext_gateway.providers.errors import TaskLost
from kontext_gateway.providers.fireworks import Fireworks
from kontext_gateway.providers.hosted import HostedProvider

KEY = "fw_test"
PIL_NAMES = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF", "avif": "AVIF"}
MODELS = "/inference/v1/workflows/accounts/fireworks/models"
SCALE = FakeFireworks().results.scale


fake, fake_url, gateway, sdk, _reset = upstream_fixtures("fireworks", lambda: FakeFireworks(key=KEY))


@pytest.fixture
def fw(fake: FakeFireworks) -> FakeFireworks:
    return fake


def image_of(item: Any) -> Image.Image:
    return open_image(base64.b64decode(item.b64_json))


def sent(fw: FakeFireworks, i: int = 0) -> dict[str, Any]:
    return fw.submits()[i][3]


def data_uri_image(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    return open_image(base64.b64decode(uri.split(",", 1)[1]))


def generate(sdk: OpenAI, model: str = "flux.1-kontext-pro", **kw: Any) -> Any:
    return sdk.images.generate(
        model=model, prompt=kw.pop("prompt", "a red fox in snow"), response_format="b64_json", **kw
    )


def edit(sdk: OpenAI, model: str = "flux.1-kontext-pro", images: list[bytes] | None = None, **kw: Any) -> Any:
    files = [(f"in{i}.png", data, "image/png") for i, data in enumerate(images or [png_bytes(400, 300)])]
    return sdk.images.edit(
        model=model,
        image=files if len(files) > 1 else files[0],
        prompt=kw.pop("prompt", "make it night"),
        response_format="b64_json",
        **kw,
    )


# -- happy paths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant,price", [("pro", 0.04), ("max", 0.08)])
def test_generate(sdk: OpenAI, fw: FakeFireworks, variant: str, price: float) -> None:
    resp = generate(sdk, f"flux.1-kontext-{variant}", prompt="a lighthouse at dusk")
    img = image_of(resp.data[0])
    assert img.format == "PNG" and img.size == output_size("1:1", SCALE)
    meta = resp.model_extra["metadata"]
    assert meta["provider"] == "fireworks" and meta["executed_model"] == f"fireworks/flux.1-kontext-{variant}"
    assert meta["provider_model_id"] == f"accounts/fireworks/models/flux-kontext-{variant}"
    assert meta["cost"] == price and [a["outcome"] for a in meta["attempts"]] == ["succeeded"]

    ((_, path, headers, body),) = fw.submits()
    assert path == f"{MODELS}/flux-kontext-{variant}" and headers["authorization"] == f"Bearer {KEY}"
    assert body == {
        "prompt": "a lighthouse at dusk",
        "seed": meta["seed"],
        "aspect_ratio": "1:1",
        "output_format": "png",
    }
    # Polled by POST with the request_id: Pending twice, then Ready.
    polls = [r for r in fw.requests if r[1].endswith("/get_result")]
    assert len(polls) == 3 and {p[0] for p in polls} == {"POST"}
    assert polls[0][1] == f"{MODELS}/flux-kontext-{variant}/get_result"
    assert polls[0][3]["id"] in fw.tasks and polls[0][2]["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("variant", ["pro", "max"])
def test_edit_keeps_the_input_shape(sdk: OpenAI, fw: FakeFireworks, variant: str) -> None:
    resp = edit(sdk, f"flux.1-kontext-{variant}", [png_bytes(300, 400)])
    img = image_of(resp.data[0])
    assert img.format == "PNG" and img.size == output_size("3:4", SCALE)  # the fake kept the 3:4 input's shape
    body = sent(fw)
    assert "aspect_ratio" not in body and body["prompt"] == "make it night"  # left out: the input's shape
    assert data_uri_image(body["input_image"]).size == (300, 400)


# -- parameter mapping ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "asked,upstream",
    [
        ({"size": "1000x500"}, "16:9"),  # 2:1 snaps to the nearest Kontext ratio
        ({"size": "1792x1024"}, "16:9"),
        ({"size": "1024x1792"}, "9:16"),
        ({"size": "3:2"}, "3:2"),
        ({"extra_body": {"aspect_ratio": "7:3"}}, "21:9"),
        ({"extra_body": {"aspect_ratio": "5:4"}}, "5:4"),
        ({"extra_body": {"aspect_ratio": "1:4"}}, "9:21"),  # clamped into 21:9..9:21
        ({"extra_body": {"resolution": "1K"}}, "1:1"),
    ],
)
def test_aspect_ratio(sdk: OpenAI, fw: FakeFireworks, asked: dict[str, Any], upstream: str) -> None:
    resp = generate(sdk, **asked)
    assert sent(fw)["aspect_ratio"] == upstream
    assert image_of(resp.data[0]).size == output_size(upstream, SCALE)


def test_edit_with_a_size(sdk: OpenAI, fw: FakeFireworks) -> None:
    resp = edit(sdk, size="16:9")
    assert sent(fw)["aspect_ratio"] == "16:9" and image_of(resp.data[0]).size == output_size("16:9", SCALE)


@pytest.mark.parametrize("asked,upstream", [("png", "png"), ("jpeg", "jpeg"), ("webp", "png"), ("avif", "png")])
def test_output_format(sdk: OpenAI, fw: FakeFireworks, asked: str, upstream: str) -> None:
    resp = generate(sdk, output_format=asked)
    assert sent(fw)["output_format"] == upstream  # always explicit
    assert image_of(resp.data[0]).format == PIL_NAMES[asked] and resp.output_format == asked


def test_seed_passthrough_and_fal_only_params(sdk: OpenAI, fw: FakeFireworks) -> None:
    resp = generate(
        sdk,
        extra_body={
            "seed": 99,
            "prompt_upsampling": True,
            "safety_tolerance": "5",
            "my_new_knob": "x",
            "enhance_prompt": True,
            "sync_mode": True,
        },
    )
    body = sent(fw)
    assert body["seed"] == 99 and body["prompt_upsampling"] is True and body["safety_tolerance"] == 5
    assert "my_new_knob" not in body and "enhance_prompt" not in body and "sync_mode" not in body
    assert resp.model_extra["metadata"]["ignored_params"] == ["enhance_prompt", "my_new_knob", "sync_mode"]


def test_safety_tolerance_is_capped_at_2_for_image_to_image(sdk: OpenAI, fw: FakeFireworks) -> None:
    resp = edit(sdk, extra_body={"safety_tolerance": 6, "prompt_upsampling": "true"})
    body = sent(fw)
    assert body["safety_tolerance"] == 2 and body["prompt_upsampling"] is True
    adjusted = resp.model_extra["metadata"]["adjusted_params"]
    assert "sent 2" in adjusted["safety_tolerance"]  # the cap is reported, not silent


def test_n_fans_out_into_tasks(sdk: OpenAI, fw: FakeFireworks) -> None:
    resp = generate(sdk, "flux.1-kontext-max", n=3)
    assert len(resp.data) == 3 and len(fw.submits()) == 3
    assert all(image_of(d).size == output_size("1:1", SCALE) for d in resp.data)
    assert resp.model_extra["metadata"]["cost"] == pytest.approx(3 * 0.08)


def test_two_images_are_more_than_fireworks_takes(sdk: OpenAI, fw: FakeFireworks) -> None:
    with pytest.raises(openai.APIStatusError) as exc:
        edit(sdk, images=[png_bytes(64, 64), png_bytes(64, 64)])
    # Refused as a request the configured providers cannot take (400), not as an outage (503).
    assert exc.value.status_code == 400 and "at most 1 input image" in exc.value.message
    assert exc.value.body["code"] == "unsupported_by_providers"
    assert fw.submits() == []


def test_n_images_differ(sdk: OpenAI, fw: FakeFireworks) -> None:
    resp = generate(sdk, n=3)
    assert len({s[3]["seed"] for s in fw.submits()}) == 3
    assert len({d.b64_json for d in resp.data}) == 3


# -- moderation, failures and retries --------------------------------------------------------------------


@pytest.mark.parametrize("at,status", [("submit", "Request Moderated"), ("poll", "Content Moderated")])
def test_moderation_is_a_400_and_not_retried(sdk: OpenAI, fw: FakeFireworks, at: str, status: str) -> None:
    fw.faults.add("moderation", at=at)
    with pytest.raises(openai.BadRequestError) as exc:
        generate(sdk)
    assert exc.value.code == "content_policy_violation"
    assert status in exc.value.message and "Derivative Works Filter" in exc.value.message
    assert len(fw.submits()) == 1


def test_moderation_reasons_as_seen_in_the_wild(sdk: OpenAI, fw: FakeFireworks) -> None:
    fw.faults.add("moderation", at="poll", reasons=["Safety Filter"])
    with pytest.raises(openai.BadRequestError) as exc:
        generate(sdk)
    assert exc.value.code == "content_policy_violation" and "Safety Filter" in exc.value.message
    assert len(fw.submits()) == 1


def test_newer_progress_states_are_pending(sdk: OpenAI, fw: FakeFireworks) -> None:
    fw.pending_polls, fw.states = 3, ("Pending", "Reasoning", "Generating")
    resp = generate(sdk)
    assert len(resp.model_extra["metadata"]["attempts"]) == 1 and len(fw.submits()) == 1


def test_a_failed_task_is_not_resubmitted(sdk: OpenAI, fw: FakeFireworks) -> None:
    """Fireworks ran it and says `Error`: it would likely fail again, and every submit is paid."""
    fw.faults.add("task_error", at="poll")
    with pytest.raises(openai.InternalServerError) as exc:
        generate(sdk)
    assert exc.value.code == "all_providers_exhausted" and "'Error'" in exc.value.message
    assert len(fw.submits()) == 1


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
    sdk: OpenAI, fw: FakeFireworks, kind: str, error_class: str, status: int | None
) -> None:
    fw.faults.add(kind, at="submit", retry_after=1 if kind == "429" else None)
    resp = generate(sdk)
    assert image_of(resp.data[0]).size == output_size("1:1", SCALE)
    first, second = resp.model_extra["metadata"]["attempts"]
    assert first["outcome"] == "failed" and first["error_class"] == error_class
    assert first.get("status_code") == status and second["outcome"] == "succeeded"


@pytest.mark.parametrize("kind", ["503", "drop", "malformed"])
def test_a_failed_poll_polls_again(sdk: OpenAI, fw: FakeFireworks, kind: str) -> None:
    fw.faults.add(kind, at="poll")
    resp = generate(sdk)
    assert image_of(resp.data[0]).size == output_size("1:1", SCALE)
    assert [a["outcome"] for a in resp.model_extra["metadata"]["attempts"]] == ["succeeded"]
    assert len(fw.submits()) == 1 and (kind, "poll") in fw.faults.fired


@pytest.mark.parametrize(
    "kind,error_class,status",
    [("502", "server_error", 502), ("not_image", "bad_result", None), ("result_404", "bad_result", 404)],
)
def test_a_lost_result_is_resubmitted_once(
    sdk: OpenAI, fw: FakeFireworks, kind: str, error_class: str, status: int | None
) -> None:
    fw.faults.add(kind, at="download")
    resp = generate(sdk)
    first, second = resp.model_extra["metadata"]["attempts"]
    assert first["outcome"] == "failed" and first["error_class"] == error_class
    assert first.get("status_code") == status and first["billed_images"] == 1  # made, billed, lost
    assert second["outcome"] == "succeeded" and len(fw.submits()) == 2
    assert resp.model_extra["metadata"]["cost"] == pytest.approx(2 * 0.04)  # both tasks were paid


def test_a_rejected_key_fails_without_leaking_it(fw: FakeFireworks, fake_url: str, tmp_path: Path) -> None:
    secret = "fw_wrong_s3cret_value"
    with running_server(solo_settings("fireworks", tmp_path, fake_url, key=secret)) as gw:
        resp = httpx.post(
            f"{gw}/v1/images/generations", json={"model": "flux.1-kontext-pro", "prompt": "x"}, timeout=60
        )
    assert resp.status_code == 502, resp.text
    err = resp.json()["error"]
    assert err["code"] == "all_providers_exhausted"
    assert "authentication" in err["message"] and "credentials rejected" in err["message"]
    assert secret not in resp.text and "fw_wrong" not in resp.text
    assert len(fw.submits()) == 1


# -- the schema and the adapter's own decisions ----------------------------------------------------------


def test_schema_shows_the_handling(gateway: str) -> None:
    body = httpx.get(f"{gateway}/v1/models/flux.1-kontext-max", params={"schema": "true"}, timeout=30).json()
    modes = body["schema"]["modes"]
    for name, handling in Fireworks.HANDLING.items():
        mode = "edit" if name == "image" else "text-to-image"
        assert modes[mode]["properties"][name]["x-providers"]["fireworks/flux.1-kontext-max"] == handling
    for absent in ("cfg_scale", "num_inference_steps", "resolution"):  # Fireworks has no such inputs
        # (a parameter nothing serving the mode honours is not listed at all: [max] has no steps)
        shown = modes["text-to-image"]["properties"].get(absent, {}).get("x-providers", {})
        assert "fireworks/flux.1-kontext-max" not in shown


async def test_an_unknown_task_is_a_lost_task(fake_url: str, tmp_path: Path) -> None:
    """`Task not found` (an id the upstream does not know) is a lost task: resubmitted, not re-polled."""
    provider = HostedProvider(Fireworks, solo_settings("fireworks", tmp_path, fake_url))
    entry = Catalog.load().resolve("fireworks/flux.1-kontext-pro")[1]
    task = Task(id="no-such-task")
    try:
        with pytest.raises(TaskLost, match="Task not found"):
            provider.dialect.polled(entry, task, await provider.send(provider.dialect.poll(entry, task)))
    finally:
        await provider.aclose()


# -- the fake itself answers like Fireworks ------------------------------------------------------------


def test_fake_validates_like_fireworks(fake_url: str) -> None:
    url = fake_url
    auth = {"Authorization": f"Bearer {KEY}"}
    image = "data:image/png;base64," + base64.b64encode(png_bytes(32, 32)).decode()

    def submit(body: dict[str, Any], headers: dict[str, str] = auth) -> httpx.Response:
        return httpx.post(f"{url}{MODELS}/flux-kontext-pro", json=body, headers=headers)

    webp = submit({"prompt": "x", "output_format": "webp"})
    assert webp.status_code == 422 and webp.json()["detail"][0]["loc"] == ["body", "output_format"]
    wide = submit({"prompt": "x", "aspect_ratio": "3:1"})
    assert wide.status_code == 422 and "between 21:9 and 9:21" in wide.json()["detail"][0]["msg"]
    assert submit({"prompt": "x", "aspect_ratio": "21:9"}).status_code == 200
    tolerant = submit({"prompt": "x", "input_image": image, "safety_tolerance": 3})
    assert tolerant.status_code == 400 and "limit of 2" in tolerant.text
    assert submit({"prompt": "x"}, {"Authorization": "Bearer nope"}).status_code == 401

    rid = submit({"prompt": "x"}).json()["request_id"]
    first = httpx.post(f"{url}{MODELS}/flux-kontext-pro/get_result", json={"id": rid}, headers=auth).json()
    assert first["status"] == "Pending" and first["id"] == rid
    other_model = httpx.post(f"{url}{MODELS}/flux-kontext-max/get_result", json={"id": rid}, headers=auth).json()
    assert other_model["status"] == "Task not found"
