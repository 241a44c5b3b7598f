"""The fal.ai adapter against a faithful fake of fal's queue API, driven through the gateway with the
official OpenAI SDK: routes, every parameter mapping as fal receives it, batching, moderation,
transient faults, bad credentials, cancel on abandon, and the schema's handling table."""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from conftest import (
    noise_png,
    open_image,
    png_bytes,
    post_and_hang_up,
    running_server,
    upstream_fixtures,
    wait_until,
)
from fakes.common import output_size
from fakes.fal import FakeFal
from fakes.upstreams import solo_settings
from kontext_gateway.providers import contracts
from kontext_gateway.providers.fal import Fal

SCALE = FakeFal().results.scale
FORMATS = {"png": "PNG", "jpeg": "JPEG", "gif": "GIF", "webp": "WEBP", "avif": "AVIF"}


fake, fake_url, gateway, client, _reset = upstream_fixtures("fal", FakeFal)


def decode(item: Any) -> Image.Image:
    return open_image(base64.b64decode(item.b64_json))


def meta(resp: Any) -> dict[str, Any]:
    return resp.model_extra["metadata"]


def one_submit(fake: FakeFal) -> tuple[str, dict[str, Any]]:
    [(path, body)] = fake.submits()
    return path, body


def data_uri_image(uri: str) -> Image.Image:
    head, _, payload = uri.partition(",")
    assert head in ("data:image/png;base64", "data:image/jpeg;base64")  # compacted: the smaller of the two
    return open_image(base64.b64decode(payload))


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


def test_pro_text_to_image(client: OpenAI, fake: FakeFal) -> None:
    resp = client.images.generate(
        model="flux.1-kontext-pro",
        prompt="a red fox",
        size="1536x1024",
        output_format="png",
        response_format="b64_json",
        extra_body={"seed": 7},
    )
    img = decode(resp.data[0])
    assert img.format == "PNG" and img.size == output_size("3:2", SCALE)
    assert resp.size == "{}x{}".format(*img.size)
    path, body = one_submit(fake)
    assert path == "/fal-ai/flux-pro/kontext/text-to-image"
    assert body == {"prompt": "a red fox", "seed": 7, "num_images": 1, "output_format": "png", "aspect_ratio": "3:2"}
    m = meta(resp)
    assert m["provider"] == "fal" and m["executed_model"] == "fal/flux.1-kontext-pro"
    assert m["provider_model_id"] == "fal-ai/flux-pro/kontext/text-to-image"
    assert m["cost"] == 0.04 and [a["outcome"] for a in m["attempts"]] == ["succeeded"]
    # The key goes to fal's queue on every call, never to the file host.
    for _method, p, headers, _ in fake.requests:
        if p.startswith("/results/"):
            assert "authorization" not in headers
        else:
            assert headers["authorization"] == "Key fal_test"


def test_max_text_to_image_defaults_to_square_and_uses_returned_urls(client: OpenAI, fake: FakeFal) -> None:
    resp = client.images.generate(
        model="flux.1-kontext-max", prompt="a lighthouse", output_format="jpeg", response_format="b64_json"
    )
    img = decode(resp.data[0])
    assert img.format == "JPEG" and img.size == output_size("1:1", SCALE)
    path, body = one_submit(fake)
    assert path == "/fal-ai/flux-pro/kontext/max/text-to-image"
    assert body["aspect_ratio"] == "1:1" and body["output_format"] == "jpeg"
    assert meta(resp)["executed_model"] == "fal/flux.1-kontext-max" and meta(resp)["cost"] == 0.08
    # Status and result live at the app root, without the route's subpath.
    rid = list(fake.tasks)[-1]
    gets = [p for method, p, _, _ in fake.requests if method == "GET" and not p.startswith("/results/")]
    assert gets[:-1] == [f"/fal-ai/flux-pro/requests/{rid}/status"] * (fake.pending_polls + 1)
    assert gets[-1] == f"/fal-ai/flux-pro/requests/{rid}"


def test_pro_edit_keeps_input_ratio(client: OpenAI, fake: FakeFal) -> None:
    resp = edit(client, "flux.1-kontext-pro", (400, 300))
    img = decode(resp.data[0])
    assert img.format == "PNG" and img.size == output_size("400:300", SCALE)
    path, body = one_submit(fake)
    assert path == "/fal-ai/flux-pro/kontext"
    assert "aspect_ratio" not in body and "image_urls" not in body  # left out: fal keeps the input's ratio
    sent = data_uri_image(body["image_url"])
    assert sent.size == (400, 300)
    assert sent.convert("RGB").tobytes() == open_image(png_bytes(400, 300)).convert("RGB").tobytes()
    assert body["output_format"] == "png" and body["num_images"] == 1


def test_max_edit(client: OpenAI, fake: FakeFal) -> None:
    resp = edit(client, "flux.1-kontext-max", (300, 400), output_format="jpeg", extra_body={"aspect_ratio": "16:9"})
    img = decode(resp.data[0])
    assert img.format == "JPEG" and img.size == output_size("16:9", SCALE)
    path, body = one_submit(fake)
    assert path == "/fal-ai/flux-pro/kontext/max" and body["aspect_ratio"] == "16:9"
    assert meta(resp)["executed_model"] == "fal/flux.1-kontext-max-edit" and meta(resp)["cost"] == 0.08


def test_dev_edit(client: OpenAI, fake: FakeFal) -> None:
    resp = edit(
        client,
        "flux.1-kontext-dev",
        (320, 240),
        output_format="jpeg",
        extra_body={
            "seed": 5,
            "num_inference_steps": 20,
            "guidance_scale": 4.0,
            "acceleration": "high",
            "enable_safety_checker": False,
        },
    )
    img = decode(resp.data[0])
    assert img.format == "JPEG" and img.size == output_size("320:240", SCALE)
    path, body = one_submit(fake)
    assert path == "/fal-ai/flux-kontext/dev"
    assert body["num_inference_steps"] == 20 and body["guidance_scale"] == 4.0 and body["seed"] == 5
    assert body["acceleration"] == "high" and body["enable_safety_checker"] in (False, "false")  # a form field
    assert body["output_format"] == "jpeg" and body["num_images"] == 1
    assert "resolution_mode" not in body and "aspect_ratio" not in body  # match_input keeps the input's shape
    assert data_uri_image(body["image_url"]).size == (320, 240)
    m = meta(resp)
    assert m["executed_model"] == "fal/flux.1-kontext-dev" and m["cost"] == 0.025


def test_dev_edit_with_loras_goes_to_the_kontext_lora_route(client: OpenAI, fake: FakeFal) -> None:
    image = "data:image/png;base64," + base64.b64encode(png_bytes(64, 64)).decode()
    loras = [{"path": "https://example.com/style.safetensors", "scale": 0.7}, {"path": "owner/repo"}]
    resp = httpx.post(
        f"{client.base_url}images/edits",
        timeout=60,
        json={
            "model": "flux.1-kontext-dev",
            "prompt": "in the style",
            "images": [{"image_url": image}],
            "loras": loras,
        },
    )
    assert resp.status_code == 200, resp.text
    path, body = one_submit(fake)
    assert path == "/fal-ai/flux-kontext-lora"
    assert body["loras"] == [
        {"path": "https://example.com/style.safetensors", "scale": 0.7},
        {"path": "owner/repo", "scale": 1.0},
    ]
    m = resp.json()["metadata"]
    assert m["executed_model"] == "fal/flux.1-kontext-dev-lora" and m["cost"] == 0.035
    # Without adapters the cheaper plain [dev] route serves it; pro has no LoRA route: a clear 400.
    fake.requests.clear()
    plain = edit(client, "flux.1-kontext-dev", (64, 64))
    assert meta(plain)["executed_model"] == "fal/flux.1-kontext-dev"
    refused = httpx.post(
        f"{client.base_url}images/edits",
        timeout=60,
        json={"model": "flux.1-kontext-pro", "prompt": "x", "images": [{"image_url": image}], "loras": loras},
    )
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "unsupported_by_providers"


@pytest.mark.parametrize(
    "model,route",
    [
        ("flux.1-kontext-pro", "/fal-ai/flux-pro/kontext/multi"),
        ("flux.1-kontext-max", "/fal-ai/flux-pro/kontext/max/multi"),
    ],
)
def test_several_images_go_to_multi(client: OpenAI, fake: FakeFal, model: str, route: str) -> None:
    resp = edit(client, model, (200, 100), (100, 100), (150, 100))
    assert decode(resp.data[0]).size == output_size("200:100", SCALE)
    path, body = one_submit(fake)
    assert path == route and "image_url" not in body
    assert [data_uri_image(u).size for u in body["image_urls"]] == [(200, 100), (100, 100), (150, 100)]


# -- parameter mapping ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "asked,pro,dev",
    [
        ({"size": "1000x500"}, "16:9", "16:9"),
        ({"aspect_ratio": "4:5"}, "3:4", "4:5"),  # 4:5 is not in pro/max's enum; [dev]'s has it
        ({"aspect_ratio": "21:9"}, "21:9", "21:9"),
        ({"size": "9:16"}, "9:16", "9:16"),
    ],
)
def test_ratio_snapping(client: OpenAI, fake: FakeFal, asked: dict[str, str], pro: str, dev: str) -> None:
    edit(client, "flux.1-kontext-pro", (64, 64), extra_body=asked)
    edit(client, "flux.1-kontext-dev", (64, 64), extra_body=asked)
    (_, pro_body), (_, dev_body) = fake.submits()
    assert pro_body["aspect_ratio"] == pro and "resolution_mode" not in pro_body
    assert dev_body["resolution_mode"] == dev and "aspect_ratio" not in dev_body


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_output_format_is_explicit_and_converted(client: OpenAI, fake: FakeFal, fmt: str) -> None:
    resp = client.images.generate(
        model="flux.1-kontext-pro",
        prompt="x",
        output_format=fmt,  # type: ignore[arg-type]
        response_format="b64_json",
    )
    assert decode(resp.data[0]).format == FORMATS[fmt] and resp.output_format == fmt
    _, body = one_submit(fake)
    assert body["output_format"] == (fmt if fmt in ("png", "jpeg") else "png")  # the gateway converts the rest


@pytest.mark.parametrize("given,sent", [(0, "1"), (3, "3"), ("5", "5"), (6, "6")])
def test_safety_tolerance_is_a_string(client: OpenAI, fake: FakeFal, given: Any, sent: str) -> None:
    resp = client.images.generate(
        model="flux.1-kontext-pro", prompt="x", response_format="b64_json", extra_body={"safety_tolerance": given}
    )
    assert one_submit(fake)[1]["safety_tolerance"] == sent
    # fal's strictest level is "1": a 0 is sent as "1", and says so.
    assert ("safety_tolerance" in meta(resp)["adjusted_params"]) == (given == 0)


def test_safety_tolerance_past_fals_range_is_a_400(client: OpenAI, fake: FakeFal) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(model="flux.1-kontext-pro", prompt="x", extra_body={"safety_tolerance": 9})
    assert exc.value.body["param"] == "safety_tolerance" and "one of 1, 2, 3, 4, 5, 6" in exc.value.message
    assert fake.submits() == []


@pytest.mark.parametrize("guidance", [0, 0.5])
def test_guidance_outside_fals_range_is_a_400_naming_it(client: OpenAI, fake: FakeFal, guidance: float) -> None:
    """fal's pro/max take guidance_scale 1-20: refused here, naming the caller's parameter, not a 502."""
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(model="flux.1-kontext-pro", prompt="x", extra_body={"cfg_scale": guidance})
    err = exc.value.body
    assert err["param"] == "cfg_scale" and "guidance_scale" in err["message"] and "from 1 to 20" in err["message"]
    assert fake.submits() == []


def test_guidance_enhance_prompt_and_unknown_extras(client: OpenAI, fake: FakeFal) -> None:
    resp = client.images.generate(
        model="flux.1-kontext-pro",
        prompt="x",
        response_format="b64_json",
        extra_body={"guidance": 4.5, "enhance_prompt": True, "fal_new_knob": "on", "num_inference_steps": 12},
    )
    _, body = one_submit(fake)
    assert body["guidance_scale"] == 4.5 and body["enhance_prompt"] is True
    assert "num_inference_steps" not in body and "fal_new_knob" not in body  # not in the route's schema
    assert meta(resp)["ignored_params"] == ["fal_new_knob", "num_inference_steps"]


def test_prompt_upsampling_is_sent_as_enhance_prompt(client: OpenAI, fake: FakeFal) -> None:
    resp = client.images.generate(
        model="flux.1-kontext-max", prompt="x", response_format="b64_json", extra_body={"prompt_upsampling": True}
    )
    _, body = one_submit(fake)
    assert body["enhance_prompt"] is True and "prompt_upsampling" not in body
    assert "prompt_upsampling" not in meta(resp)["ignored_params"]


def test_replicate_only_params_are_not_sent(client: OpenAI, fake: FakeFal) -> None:
    resp = edit(
        client,
        "flux.1-kontext-dev",
        (64, 64),
        extra_body={"disable_safety_checker": True, "output_quality": 80, "resolution_mode": "auto"},
    )
    _, body = one_submit(fake)
    assert "disable_safety_checker" not in body and "output_quality" not in body
    assert body["resolution_mode"] == "auto"  # a fal parameter, passed through
    assert meta(resp)["ignored_params"] == ["disable_safety_checker", "output_quality"]


def test_dev_gets_none_of_pro_s_fields(client: OpenAI, fake: FakeFal) -> None:
    """fal's [dev] route has no enhance_prompt and no safety_tolerance (its checker is a boolean): asked
    for, they are not sent there."""
    edit(
        client,
        "flux.1-kontext-dev",
        (64, 64),
        extra_body={"prompt_upsampling": True, "enhance_prompt": True, "safety_tolerance": 3},
    )
    _, body = one_submit(fake)
    assert fake.refused == []
    assert not {"prompt_upsampling", "enhance_prompt", "safety_tolerance"} & set(body)


def test_sync_mode_results_come_back_as_data_uris(client: OpenAI, fake: FakeFal) -> None:
    resp = client.images.generate(
        model="flux.1-kontext-pro", prompt="x", n=2, response_format="b64_json", extra_body={"sync_mode": True}
    )
    assert [decode(d).format for d in resp.data] == ["PNG", "PNG"]
    assert one_submit(fake)[1]["sync_mode"] is True
    assert not [p for _, p, _, _ in fake.requests if p.startswith("/results/")]  # nothing to download


# -- n: num_images is native up to 4 ---------------------------------------------------------------------


def test_n4_is_one_request(client: OpenAI, fake: FakeFal) -> None:
    resp = client.images.generate(model="flux.1-kontext-pro", prompt="x", n=4, response_format="b64_json")
    images = [decode(d) for d in resp.data]
    assert len(images) == 4 and len({im.tobytes() for im in images}) == 4
    assert one_submit(fake)[1]["num_images"] == 4
    m = meta(resp)
    assert m["cost"] == pytest.approx(0.16) and [a["images"] for a in m["attempts"]] == [4]


def test_n6_is_two_requests(client: OpenAI, fake: FakeFal) -> None:
    resp = client.images.generate(model="flux.1-kontext-max", prompt="x", n=6, response_format="b64_json")
    assert len(resp.data) == 6 and all(decode(d).format == "PNG" for d in resp.data)
    assert sorted(body["num_images"] for _, body in fake.submits()) == [2, 4]
    m = meta(resp)
    assert m["cost"] == pytest.approx(6 * 0.08) and sorted(a["images"] for a in m["attempts"]) == [2, 4]


def test_fanned_out_requests_get_distinct_seeds(client: OpenAI, fake: FakeFal) -> None:
    resp = client.images.generate(
        model="flux.1-kontext-pro", prompt="x", n=6, response_format="b64_json", extra_body={"seed": 100}
    )
    assert sorted((body["seed"], body["num_images"]) for _, body in fake.submits()) == [(100, 4), (104, 2)]
    assert len({decode(d).tobytes() for d in resp.data}) == 6


# -- moderation: 400 content_policy_violation, never retried --------------------------------------------


@pytest.mark.parametrize("at", ["submit", "poll", "result"])
def test_pro_moderation_422(client: OpenAI, fake: FakeFal, at: str) -> None:
    fake.faults.add("moderation", at=at)
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(model="flux.1-kontext-pro", prompt="something flagged")
    assert exc.value.status_code == 400 and exc.value.body["code"] == "content_policy_violation"
    assert "fal" in exc.value.body["message"]
    assert len(fake.submits()) == 1


def test_dev_moderation_nsfw_flag(client: OpenAI, fake: FakeFal) -> None:
    fake.faults.add("moderation", at="submit")
    with pytest.raises(openai.BadRequestError) as exc:
        edit(client, "flux.1-kontext-dev", (64, 64))
    assert exc.value.body["code"] == "content_policy_violation" and "has_nsfw_concepts" in exc.value.body["message"]
    assert len(fake.submits()) == 1


@pytest.mark.parametrize("variant", ["content_policy", "nsfw_concepts"])
def test_every_documented_moderation_signal_is_a_400(client: OpenAI, fake: FakeFal, variant: str) -> None:
    """fal flags content two ways: a 422 `content_policy_violation` at the result (with `categories`), or
    `has_nsfw_concepts: [true]` in a 200 result."""
    fake.faults.add("moderation", at="submit", variant=variant, reasons=["violence"])
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(model="flux.1-kontext-pro", prompt="something flagged")
    assert exc.value.body["code"] == "content_policy_violation"
    assert len(fake.submits()) == 1


# -- failures: what is tried again, and what is not --------------------------------------------------------


@pytest.mark.parametrize(
    "kind,error_class,status",
    [
        ("429", "rate_limited", 429),
        ("500", "server_error", 500),
        ("drop", "connection_error", None),
    ],
)
def test_a_failed_submit_is_tried_again(
    client: OpenAI, fake: FakeFal, kind: str, error_class: str, status: int | None
) -> None:
    fake.faults.add(kind, at="submit", retry_after=0.1 if kind == "429" else None)
    resp = client.images.generate(model="flux.1-kontext-pro", prompt="x", response_format="b64_json")
    assert decode(resp.data[0]).format == "PNG"
    first, second = meta(resp)["attempts"]
    assert first["outcome"] == "failed" and first["error_class"] == error_class
    assert first.get("status_code") == status and second["outcome"] == "succeeded"


@pytest.mark.parametrize(
    "kind,at",
    [("503", "poll"), ("drop", "poll"), ("malformed", "poll"), ("502", "result"), ("malformed", "result")],
)
def test_a_failed_poll_polls_again(client: OpenAI, fake: FakeFal, kind: str, at: str) -> None:
    """The request is still in fal's queue: looked at again, not paid for twice."""
    fake.faults.add(kind, at=at)
    resp = client.images.generate(model="flux.1-kontext-pro", prompt="x", response_format="b64_json")
    assert decode(resp.data[0]).format == "PNG"
    assert [a["outcome"] for a in meta(resp)["attempts"]] == ["succeeded"]
    assert len(fake.submits()) == 1 and (kind, at) in fake.faults.fired


def test_a_failed_run_is_resubmitted_once(client: OpenAI, fake: FakeFal) -> None:
    """A run that failed on fal's side (its result URL answers 500 however often it is asked) is a
    transient failure: resubmitted once (5xx are never billed), then given up."""
    fake.faults.add("task_error", at="result", times=10)
    with pytest.raises(openai.InternalServerError) as exc:
        client.images.generate(model="flux.1-kontext-pro", prompt="x")
    assert exc.value.body["message"].count("server_error 500") == 2
    assert len(fake.submits()) == 2


@pytest.mark.parametrize("kind,status", [("not_image", None), ("result_404", 404)])
def test_a_lost_result_is_resubmitted_once(client: OpenAI, fake: FakeFal, kind: str, status: int | None) -> None:
    fake.faults.add(kind, at="download")
    resp = client.images.generate(model="flux.1-kontext-pro", prompt="x", response_format="b64_json")
    first, second = meta(resp)["attempts"]
    assert first["outcome"] == "failed" and first["error_class"] == "bad_result"
    assert first.get("status_code") == status and first["billed_images"] == 1  # made, billed, lost
    assert second["outcome"] == "succeeded" and len(fake.submits()) == 2


def test_bad_key_is_reported_without_the_key(
    fake: FakeFal, fake_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "fal_WRONG_d0n0tleak_42"
    with running_server(solo_settings("fal", tmp_path, fake_url, key=secret)) as url:
        resp = httpx.post(
            f"{url}/v1/images/generations", json={"model": "flux.1-kontext-pro", "prompt": "x"}, timeout=60
        )
    assert resp.status_code == 502, resp.text
    err = resp.json()["error"]
    assert err["code"] == "all_providers_exhausted" and "authentication" in err["message"]
    assert "credentials rejected" in caplog.text  # the failure was logged...
    assert secret not in resp.text and secret not in caplog.text  # ...without the key
    assert len(fake.submits()) == 1  # bad credentials are not retried


def test_abandoned_request_cancels_the_fal_task(fake: FakeFal, gateway: str) -> None:
    fake.pending_polls = 10**6  # the task stays in the queue
    post_and_hang_up(  # once the gateway polls the task
        gateway,
        "/v1/images/generations",
        {"model": "flux.1-kontext-pro", "prompt": "x"},
        once=lambda: any(method == "GET" and p.endswith("/status") for method, p, _, _ in fake.requests),
    )

    def cancels() -> list[tuple[str, dict[str, str]]]:
        return [(p, h) for method, p, h, _ in fake.requests if method == "PUT"]

    wait_until(cancels)
    assert len(cancels()) == 1, "the gateway did not cancel the fal task when the client went away"
    rid = list(fake.tasks)[-1]
    path, headers = cancels()[0]
    assert path == f"/fal-ai/flux-pro/requests/{rid}/cancel"  # the returned cancel_url, at the app root
    assert headers["authorization"] == "Key fal_test" and fake.tasks[rid].cancelled


@pytest.mark.parametrize(
    "model,key,table",
    [
        ("flux.1-kontext-max", "fal/flux.1-kontext-max", Fal.HANDLING),
        ("flux.1-kontext-max", "fal/flux.1-kontext-max-edit", Fal.HANDLING),
        ("flux.1-kontext-dev", "fal/flux.1-kontext-dev", Fal.DEV_HANDLING),
    ],
)
def test_schema_shows_fal_handling(gateway: str, model: str, key: str, table: dict[str, Any]) -> None:
    body = httpx.get(f"{gateway}/v1/models/{model}", params={"schema": "true"}, timeout=30).json()
    serves = next(p["modes"] for p in body["providers"] if p["config_key"] == key)  # a mode lists its own routes
    for spec in (body["schema"]["modes"][mode] for mode in serves):
        shown = {
            name: prop["x-providers"][key]
            for name, prop in spec["properties"].items()
            if prop["x-providers"].get(key, {}).get("handling") not in (None, "passthrough")
        }
        assert shown == {name: h for name, h in table.items() if name in spec["properties"]}
    assert "num_inference_steps" not in Fal.HANDLING  # pro/max have no steps; [dev] does


# -- the fake itself answers like fal ------------------------------------------------------------------


@pytest.mark.parametrize(
    "route,body,field",
    [
        ("fal-ai/flux-pro/kontext/text-to-image", {"prompt": "x", "safety_tolerance": 2}, "safety_tolerance"),
        ("fal-ai/flux-pro/kontext/text-to-image", {"prompt": "x", "output_format": "webp"}, "output_format"),
        ("fal-ai/flux-pro/kontext/text-to-image", {"prompt": "x", "num_images": 5}, "num_images"),
        ("fal-ai/flux-pro/kontext/text-to-image", {"prompt": "x", "aspect_ratio": "5:4"}, "aspect_ratio"),
        ("fal-ai/flux-pro/kontext", {"prompt": "x"}, "image_url"),
        # The route's image field is image_urls, and image_url is not one of its fields.
        (
            "fal-ai/flux-pro/kontext/multi",
            {"prompt": "x", "image_url": "https://example.com/a.png"},
            ["image_url", "image_urls"],
        ),
        ("fal-ai/flux-kontext/dev", {"prompt": "x", "image_url": "data:image/png;base64,AAAA"}, "image_url"),
        (
            "fal-ai/flux-kontext/dev",
            {"prompt": "x", "image_url": "https://e.com/a.png", "resolution_mode": "7:1"},
            "resolution_mode",
        ),
        # [dev] has neither pro's enhance_prompt nor its safety_tolerance.
        (
            "fal-ai/flux-kontext/dev",
            {"prompt": "x", "image_url": "https://e.com/a.png", "enhance_prompt": True},
            "enhance_prompt",
        ),
        (
            "fal-ai/flux-kontext/dev",
            {"prompt": "x", "image_url": "https://e.com/a.png", "safety_tolerance": "2"},
            "safety_tolerance",
        ),
    ],
)
def test_fake_validates_like_fal(
    fake: FakeFal, fake_url: str, route: str, body: dict[str, Any], field: str | list[str]
) -> None:
    auth = {"Authorization": "Key fal_test"}
    sub = httpx.post(f"{fake_url}/{route}", json=body, headers=auth)
    assert sub.status_code == 200  # the queue takes anything...
    for _ in range(10):
        if httpx.get(sub.json()["status_url"], headers=auth).json()["status"] == "COMPLETED":
            break
    resp = httpx.get(sub.json()["response_url"], headers=auth)  # ...and the result is the validation error
    assert resp.status_code == 422
    fields = [field] if isinstance(field, str) else field
    assert [d["loc"] for d in resp.json()["detail"]] == [["body", f] for f in fields]
    [refusal] = fake.refused  # kept as it arrived
    assert refusal.route == contracts.request_key("fal", route) and len(refusal.problems) == len(fields)


def test_a_value_the_route_refuses_is_a_400_before_anything_is_sent(client: OpenAI, fake: FakeFal) -> None:
    with pytest.raises(openai.BadRequestError) as exc:  # fal's schema wants a boolean
        client.images.generate(model="flux.1-kontext-pro", prompt="x", extra_body={"enhance_prompt": "maybe"})
    err = exc.value.body
    assert err["code"] == "unsupported_by_providers" and err["param"] == "enhance_prompt"
    assert "true or false" in err["message"]
    assert fake.submits() == []


def test_fake_checks_auth_and_app_root(fake_url: str) -> None:
    route = "fal-ai/flux-pro/kontext/max/text-to-image"
    assert (
        httpx.post(f"{fake_url}/{route}", json={"prompt": "x"}, headers={"Authorization": "Key nope"}).status_code
        == 401
    )
    sub = httpx.post(f"{fake_url}/{route}", json={"prompt": "x"}, headers={"Authorization": "Key fal_test"}).json()
    assert sub["status_url"] == f"{fake_url}/fal-ai/flux-pro/requests/{sub['request_id']}/status"
    rebuilt = f"{fake_url}/{route}/requests/{sub['request_id']}/status"  # with the subpath: not found
    assert httpx.get(rebuilt, headers={"Authorization": "Key fal_test"}).status_code in (404, 405)


# -- input images: compact, inline up to 1 MiB, else through fal's storage ---------------------------------


def test_a_large_input_goes_through_fals_storage(client: OpenAI, fake: FakeFal) -> None:
    """A noisy 1 MP input stays over 1 MiB even as JPEG: uploaded to fal's storage (the key on the REST
    host only, never on the signed upload URL), then sent by its file URL; the output keeps its shape."""
    big = noise_png(1500, 1000)
    resp = client.images.edit(
        model="flux.1-kontext-pro",
        image=("noise.png", big, "image/png"),
        prompt="make it night",
        response_format="b64_json",
    )
    assert decode(resp.data[0]).size == output_size("3:2", SCALE)
    [upload] = fake.uploads
    assert upload.uploaded and upload.content_type == "image/jpeg" and "authorization" not in upload.headers
    assert Image.open(io.BytesIO(upload.data)).size == (1254, 836)  # scaled to about 1 MP, shape kept
    [(_, body)] = fake.submits()
    assert body["image_url"] == upload.url and fake.refused == []


def test_a_small_input_goes_inline_compactly(client: OpenAI, fake: FakeFal) -> None:
    photo = Image.effect_mandelbrot((1600, 1200), (-2.0, -1.0, 1.0, 1.0), 50).convert("RGB")
    buf = io.BytesIO()
    photo.save(buf, "PNG")
    client.images.edit(
        model="flux.1-kontext-pro", image=("p.png", buf.getvalue(), "image/png"), prompt="x", response_format="b64_json"
    )
    [(_, body)] = fake.submits()
    sent = body["image_url"]
    assert sent.startswith("data:image/jpeg;base64,") and len(sent) < 1024 * 1024
    assert data_uri_image(sent).size == (1182, 886)  # 1600x1200 scaled to at most 1 MP
    assert fake.uploads == []
