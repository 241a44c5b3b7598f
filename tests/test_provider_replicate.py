"""The Replicate adapter end to end: the official OpenAI SDK -> the gateway -> a fake Replicate.

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
from fakes.replicate import DATA_URL_LIMIT, FakeReplicate
from fakes.upstreams import solo_settings
from kontext_gateway.providers.calls import Done, Pending
from kontext_gateway.providers.errors import Moderated, ServerError, TaskFailed
from kontext_gateway.providers.replicate import Replicate, outcome

TOKEN = "r8_test"
PIL_NAMES = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF", "avif": "AVIF"}
SCALE = FakeReplicate().results.scale


fake, fake_url, gateway, sdk, _reset = upstream_fixtures("replicate", lambda: FakeReplicate(token=TOKEN))


@pytest.fixture
def rep(fake: FakeReplicate) -> FakeReplicate:
    return fake


def image_of(item: Any) -> Image.Image:
    return open_image(base64.b64decode(item.b64_json))


def sent_input(rep: FakeReplicate, i: int = 0) -> dict[str, Any]:
    return rep.submits()[i][3]["input"]


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
def test_generate(sdk: OpenAI, rep: FakeReplicate, variant: str, price: float) -> None:
    resp = generate(sdk, f"flux.1-kontext-{variant}", prompt="a lighthouse at dusk")
    img = image_of(resp.data[0])
    assert img.format == "PNG" and img.size == output_size("1:1", SCALE) and resp.size == "256x256"
    meta = resp.model_extra["metadata"]
    assert meta["provider"] == "replicate" and meta["executed_model"] == f"replicate/flux.1-kontext-{variant}"
    assert meta["cost"] == price and [a["outcome"] for a in meta["attempts"]] == ["succeeded"]

    ((_, path, headers, body),) = rep.submits()
    assert path == f"/v1/models/black-forest-labs/flux-kontext-{variant}/predictions"
    assert headers["authorization"] == f"Bearer {TOKEN}" and headers["prefer"].startswith("wait")
    assert body["input"] == {
        "prompt": "a lighthouse at dusk",
        "seed": meta["seed"],
        "aspect_ratio": "1:1",
        "output_format": "png",
    }
    # Polled the prediction's own urls.get until it succeeded: 2 pending polls, then the final one.
    polls = [r for r in rep.requests if r[0] == "GET" and r[1].startswith("/v1/predictions/")]
    assert len(polls) == 3 and all(p[2]["authorization"] == f"Bearer {TOKEN}" for p in polls)
    assert rep.predictions[polls[0][1].rsplit("/", 1)[1]]["status"] == "succeeded"


@pytest.mark.parametrize("variant", ["pro", "max"])
def test_edit_keeps_the_input_shape(sdk: OpenAI, rep: FakeReplicate, variant: str) -> None:
    resp = edit(sdk, f"flux.1-kontext-{variant}", [png_bytes(400, 300)])
    img = image_of(resp.data[0])
    assert img.format == "PNG" and img.size == output_size("4:3", SCALE)  # the fake matched the 4:3 input
    sent = sent_input(rep)
    assert rep.submits()[0][1] == f"/v1/models/black-forest-labs/flux-kontext-{variant}/predictions"
    assert sent["aspect_ratio"] == "match_input_image" and sent["prompt"] == "make it night"
    assert data_uri_image(sent["input_image"]).size == (400, 300)


def test_prefer_wait_answers_with_the_finished_prediction(sdk: OpenAI, rep: FakeReplicate) -> None:
    rep.pending_polls = 0  # done at once: the create call returns it succeeded, nothing to poll
    resp = generate(sdk)
    assert image_of(resp.data[0]).size == output_size("1:1", SCALE)
    assert len(rep.submits()) == 1
    assert not [r for r in rep.requests if r[1].startswith("/v1/predictions/")]


def test_dev_edit_maps_guidance_steps_and_quality(sdk: OpenAI, rep: FakeReplicate) -> None:
    resp = edit(
        sdk,
        "flux.1-kontext-dev",
        [png_bytes(300, 400)],
        output_format="webp",
        output_compression=70,
        extra_body={
            "guidance": 4.5,
            "num_inference_steps": 40,
            "disable_safety_checker": True,
            "seed": 7,
            "enhance_prompt": True,
        },
    )
    img = image_of(resp.data[0])
    assert img.format == "WEBP" and img.size == output_size("3:4", SCALE)
    assert rep.submits()[0][1] == "/v1/models/black-forest-labs/flux-kontext-dev/predictions"
    sent = sent_input(rep)
    assert data_uri_image(sent.pop("input_image")).size == (300, 400)
    assert sent == {
        "prompt": "make it night",
        "seed": 7,
        "aspect_ratio": "match_input_image",
        "output_format": "webp",
        "num_inference_steps": 40,
        "guidance": 4.5,
        "output_quality": 70,
        "disable_safety_checker": True,
    }  # a multipart "true", sent as a JSON boolean
    meta = resp.model_extra["metadata"]
    assert meta["cost"] == 0.025 and meta["ignored_params"] == ["enhance_prompt"]  # fal-only: not sent


def test_dev_sends_the_catalog_defaults(sdk: OpenAI, rep: FakeReplicate) -> None:
    resp = edit(sdk, "flux.1-kontext-dev", output_format="jpeg", size="16:9")
    assert image_of(resp.data[0]).format == "JPEG" and image_of(resp.data[0]).size == output_size("16:9", SCALE)
    sent = sent_input(rep)
    assert sent["num_inference_steps"] == 28 and sent["guidance"] == 2.5
    assert sent["output_format"] == "jpg" and sent["aspect_ratio"] == "16:9" and "output_quality" not in sent


def test_dev_has_no_text_to_image_on_replicate(sdk: OpenAI, rep: FakeReplicate) -> None:
    with pytest.raises(openai.APIStatusError) as exc:
        generate(sdk, "flux.1-kontext-dev")
    assert exc.value.status_code == 503 and exc.value.code == "provider_unavailable"
    assert rep.submits() == []


# -- parameter mapping ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "asked,upstream",
    [
        ({"size": "1000x500"}, "2:1"),  # Replicate's enum has 2:1
        ({"size": "1792x1024"}, "16:9"),
        ({"size": "1024x1792"}, "9:16"),
        ({"size": "3:2"}, "3:2"),
        ({"extra_body": {"aspect_ratio": "7:3"}}, "21:9"),
        ({"extra_body": {"aspect_ratio": "4:5"}}, "4:5"),
        ({"extra_body": {"aspect_ratio": "1:4"}}, "9:21"),  # the model's narrowest ratio
        ({"extra_body": {"resolution": "1K"}}, "1:1"),
    ],
)
def test_aspect_ratio_snaps_to_the_enum(sdk: OpenAI, rep: FakeReplicate, asked: dict[str, Any], upstream: str) -> None:
    resp = generate(sdk, **asked)
    assert sent_input(rep)["aspect_ratio"] == upstream
    assert image_of(resp.data[0]).size == output_size(upstream, SCALE)


@pytest.mark.parametrize(
    "asked,upstream",
    [
        ({"size": "16:9"}, "16:9"),
        ({"size": "1024x1024"}, "1:1"),
        ({"extra_body": {"resolution": "1K"}}, "match_input_image"),  # scale alone keeps the input's shape
    ],
)
def test_edit_with_a_size(sdk: OpenAI, rep: FakeReplicate, asked: dict[str, Any], upstream: str) -> None:
    edit(sdk, **asked)
    assert sent_input(rep)["aspect_ratio"] == upstream


@pytest.mark.parametrize(
    "asked,upstream", [("png", "png"), ("jpeg", "jpg"), ("webp", "png"), ("gif", "png"), ("avif", "png")]
)
def test_output_format(sdk: OpenAI, rep: FakeReplicate, asked: str, upstream: str) -> None:
    resp = generate(sdk, output_format=asked)
    assert sent_input(rep)["output_format"] == upstream  # always explicit; jpeg spelled jpg
    assert image_of(resp.data[0]).format == PIL_NAMES[asked] and resp.output_format == asked


@pytest.mark.parametrize("param,value,limits", [("num_inference_steps", 60, "4 to 50"), ("cfg_scale", 12, "0 to 10")])
def test_dev_values_out_of_range_are_a_400_naming_the_range(
    sdk: OpenAI, rep: FakeReplicate, param: str, value: float, limits: str
) -> None:
    """Not clamped silently: the caller learns what the route takes (or another route serves it)."""
    with pytest.raises(openai.BadRequestError) as exc:
        edit(sdk, "flux.1-kontext-dev", [png_bytes(64, 64)], extra_body={param: value})
    err = exc.value.body
    assert err["param"] == param and limits in err["message"] and "flux-kontext-dev" in err["message"]
    assert rep.submits() == []


def test_seed_passthrough_and_fal_only_params(sdk: OpenAI, rep: FakeReplicate) -> None:
    resp = generate(
        sdk,
        extra_body={
            "seed": 1234,
            "prompt_upsampling": True,
            "safety_tolerance": "5",
            "my_new_knob": 7,
            "enhance_prompt": True,
            "sync_mode": True,
        },
    )
    sent = sent_input(rep)
    assert sent["seed"] == 1234 and resp.model_extra["metadata"]["seed"] == 1234
    assert sent["prompt_upsampling"] is True and sent["safety_tolerance"] == 5  # catalog "5" -> the API's int
    assert "my_new_knob" not in sent  # not in the model's published input schema: never sent
    assert "enhance_prompt" not in sent and "sync_mode" not in sent
    assert resp.model_extra["metadata"]["ignored_params"] == ["enhance_prompt", "my_new_knob", "sync_mode"]


def test_safety_tolerance_is_capped_at_2_with_an_image(sdk: OpenAI, rep: FakeReplicate) -> None:
    resp = edit(sdk, extra_body={"safety_tolerance": 6, "prompt_upsampling": "true"})
    sent = sent_input(rep)
    assert sent["safety_tolerance"] == 2 and sent["prompt_upsampling"] is True
    assert "sent 2" in resp.model_extra["metadata"]["adjusted_params"]["safety_tolerance"]


def test_n_fans_out_into_predictions(sdk: OpenAI, rep: FakeReplicate) -> None:
    resp = generate(sdk, n=3, extra_body={"seed": 5})
    assert len(resp.data) == 3 and len(rep.submits()) == 3
    assert all(image_of(d).size == output_size("1:1", SCALE) for d in resp.data)
    meta = resp.model_extra["metadata"]
    assert meta["cost"] == pytest.approx(3 * 0.04)
    assert [a["outcome"] for a in meta["attempts"]] == ["succeeded"] * 3


@pytest.mark.parametrize("variant", ["pro", "max"])
def test_two_images_use_the_multi_image_model(sdk: OpenAI, rep: FakeReplicate, variant: str) -> None:
    resp = edit(
        sdk, f"flux.1-kontext-{variant}", [png_bytes(400, 300), png_bytes(200, 200)], extra_body={"safety_tolerance": 4}
    )
    assert image_of(resp.data[0]).size == output_size("4:3", SCALE)  # match_input_image: the first image's shape
    assert rep.submits()[0][1] == f"/v1/models/flux-kontext-apps/multi-image-kontext-{variant}/predictions"
    sent = sent_input(rep)
    assert "input_image" not in sent and sent["safety_tolerance"] == 2
    assert data_uri_image(sent["input_image_1"]).size == (400, 300)
    assert data_uri_image(sent["input_image_2"]).size == (200, 200)


def test_the_multi_image_app_gets_only_its_own_fields(sdk: OpenAI, rep: FakeReplicate) -> None:
    """multi-image-kontext-pro has no prompt_upsampling (pro has): asked for, it is not sent there."""
    edit(sdk, images=[png_bytes(400, 300), png_bytes(200, 200)], extra_body={"prompt_upsampling": True})
    assert rep.refused == [] and rep.submits()[0][1].endswith("/multi-image-kontext-pro/predictions")
    assert "prompt_upsampling" not in sent_input(rep)


def test_three_images_are_more_than_replicate_takes(sdk: OpenAI, rep: FakeReplicate) -> None:
    with pytest.raises(openai.APIStatusError) as exc:
        edit(sdk, images=[png_bytes(64, 64)] * 3)
    # Refused as a request the configured providers cannot take (400), not as an outage (503).
    assert exc.value.status_code == 400 and "at most 2 input image" in exc.value.message
    assert exc.value.body["code"] == "unsupported_by_providers"
    assert rep.submits() == []


def test_n_images_differ(sdk: OpenAI, rep: FakeReplicate) -> None:
    resp = generate(sdk, n=3)
    assert len({s[3]["input"]["seed"] for s in rep.submits()}) == 3
    assert len({d.b64_json for d in resp.data}) == 3


# -- moderation, failures and retries --------------------------------------------------------------------


@pytest.mark.parametrize("at", ["submit", "poll"])
def test_moderation_is_a_400_and_not_retried(sdk: OpenAI, rep: FakeReplicate, at: str) -> None:
    rep.faults.add("moderation", at=at)
    with pytest.raises(openai.BadRequestError) as exc:
        generate(sdk)
    assert exc.value.code == "content_policy_violation" and "(E005)" in exc.value.message
    assert len(rep.submits()) == 1


@pytest.mark.parametrize("variant", ["e005", "e005_tagged", "e005_prefixed", "safety_system"])
def test_every_documented_moderation_wording_is_a_400(sdk: OpenAI, rep: FakeReplicate, variant: str) -> None:
    """Replicate has no moderation status: a `failed` prediction whose error is one of these wordings."""
    rep.faults.add("moderation", at="poll", variant=variant)
    with pytest.raises(openai.BadRequestError) as exc:
        generate(sdk)
    assert exc.value.code == "content_policy_violation"
    assert len(rep.submits()) == 1  # not retried


def test_dev_safety_checker_is_a_400(sdk: OpenAI, rep: FakeReplicate) -> None:
    """[dev]'s predictor raises its own NSFW error, with no "(E005)" in it."""
    rep.faults.add("moderation", at="poll")  # flux-kontext-dev's own wording
    with pytest.raises(openai.BadRequestError) as exc:
        edit(sdk, "flux.1-kontext-dev")
    assert exc.value.code == "content_policy_violation"
    assert len(rep.submits()) == 1


@pytest.mark.parametrize("count", [1, 2])
def test_large_inputs_are_not_sent_as_data_urls_over_256_kb(sdk: OpenAI, rep: FakeReplicate, count: int) -> None:
    """Replicate takes data URLs for files up to 256 KB only; a larger input goes as an HTTP URL (its
    files API gives one). The output keeps the first input's 3:2 shape: the picture itself got there."""
    big = noise_png(600, 400)
    assert len(big) > DATA_URL_LIMIT
    resp = edit(sdk, images=[big] * count)
    assert image_of(resp.data[0]).size == output_size("3:2", SCALE)
    assert rep.refused == [] and len(rep.submits()) == 1
    for name in ("input_image",) if count == 1 else ("input_image_1", "input_image_2"):
        assert not sent_input(rep)[name].startswith("data:")


def test_a_failed_prediction_is_not_resubmitted(sdk: OpenAI, rep: FakeReplicate) -> None:
    """Replicate ran it and says `failed`: it would likely fail again, and every prediction is paid."""
    rep.faults.add("task_error", at="poll")
    with pytest.raises(openai.InternalServerError) as exc:
        generate(sdk)
    assert exc.value.code == "all_providers_exhausted" and "CUDA error" in exc.value.message
    assert len(rep.submits()) == 1


@pytest.mark.parametrize(
    "kind,error_class,status",
    [
        ("429", "rate_limited", 429),
        ("500", "server_error", 500),
        ("drop", "connection_error", None),
        ("malformed", "malformed_response", 200),
    ],
)
def test_a_failed_create_is_tried_again(
    sdk: OpenAI, rep: FakeReplicate, kind: str, error_class: str, status: int | None
) -> None:
    rep.faults.add(kind, at="submit", retry_after=1 if kind == "429" else None)
    resp = generate(sdk)
    assert image_of(resp.data[0]).size == output_size("1:1", SCALE)
    first, second = resp.model_extra["metadata"]["attempts"]
    assert first["outcome"] == "failed" and first["error_class"] == error_class
    assert first.get("status_code") == status and second["outcome"] == "succeeded"
    if kind == "429":
        assert "throttled" in first["message"]  # Replicate's own 429 detail


@pytest.mark.parametrize("kind", ["503", "drop", "malformed"])
def test_a_failed_poll_polls_again(sdk: OpenAI, rep: FakeReplicate, kind: str) -> None:
    rep.faults.add(kind, at="poll")
    resp = generate(sdk)
    assert image_of(resp.data[0]).size == output_size("1:1", SCALE)
    assert [a["outcome"] for a in resp.model_extra["metadata"]["attempts"]] == ["succeeded"]
    assert len(rep.submits()) == 1 and (kind, "poll") in rep.faults.fired


@pytest.mark.parametrize(
    "kind,error_class,status",
    [("502", "server_error", 502), ("not_image", "bad_result", None), ("result_404", "bad_result", 404)],
)
def test_a_lost_result_is_resubmitted_once(
    sdk: OpenAI, rep: FakeReplicate, kind: str, error_class: str, status: int | None
) -> None:
    rep.faults.add(kind, at="download")
    resp = generate(sdk)
    first, second = resp.model_extra["metadata"]["attempts"]
    assert first["outcome"] == "failed" and first["error_class"] == error_class
    assert first.get("status_code") == status and first["billed_images"] == 1  # made, billed, lost
    assert second["outcome"] == "succeeded" and len(rep.submits()) == 2


def test_payment_required_is_not_retried(sdk: OpenAI, rep: FakeReplicate) -> None:
    rep.faults.add("402", at="submit")
    with pytest.raises(openai.APIStatusError) as exc:
        generate(sdk)
    assert exc.value.status_code == 502 and exc.value.code == "all_providers_exhausted"
    assert "insufficient credit" in exc.value.message and len(rep.submits()) == 1


def test_a_rejected_token_fails_without_leaking_it(rep: FakeReplicate, fake_url: str, tmp_path: Path) -> None:
    secret = "r8_wrong_s3cret_value"
    with running_server(solo_settings("replicate", tmp_path, fake_url, key=secret)) as gw:
        resp = httpx.post(
            f"{gw}/v1/images/generations", json={"model": "flux.1-kontext-pro", "prompt": "x"}, timeout=60
        )
    assert resp.status_code == 502, resp.text
    err = resp.json()["error"]
    assert err["code"] == "all_providers_exhausted"
    assert "authentication" in err["message"] and "credentials rejected" in err["message"]
    assert secret not in resp.text and "r8_wrong" not in resp.text
    assert len(rep.submits()) == 1  # bad credentials are not retried
    assert rep.submits()[0][2]["authorization"] == f"Bearer {secret}"


def test_cancel_when_the_client_goes_away(gateway: str, rep: FakeReplicate) -> None:
    rep.pending_polls = 10**9  # never finishes on its own
    post_and_hang_up(  # once the gateway polls the prediction
        gateway,
        "/v1/images/generations",
        {"model": "flux.1-kontext-pro", "prompt": "slow"},
        once=lambda: any(r[0] == "GET" and r[1].startswith("/v1/predictions/") for r in rep.requests),
    )
    wait_until(lambda: rep.canceled)
    assert len(rep.canceled) == 1, "the gateway did not cancel the prediction after the client left"
    (pid,) = rep.canceled
    cancel = [r for r in rep.requests if r[0] == "POST" and r[1] == f"/v1/predictions/{pid}/cancel"]
    assert cancel and cancel[0][2]["authorization"] == f"Bearer {TOKEN}"
    assert rep.predictions[pid]["status"] == "canceled"


# -- the schema and the adapter's own decisions ----------------------------------------------------------


def test_schema_shows_the_handling(gateway: str) -> None:
    body = httpx.get(f"{gateway}/v1/models/flux.1-kontext-pro", params={"schema": "true"}, timeout=30).json()
    modes = body["schema"]["modes"]
    for name, handling in Replicate.HANDLING.items():
        mode = "edit" if name == "image" else "text-to-image"
        # (a parameter nothing serving the mode honours is not listed at all: [pro] has no steps)
        shown = modes[mode]["properties"].get(name, {}).get("x-providers", {}).get("replicate/flux.1-kontext-pro")
        assert shown == handling, name
    # guidance and steps exist on Replicate's [dev] model only: pro does not claim them
    for name in ("cfg_scale", "num_inference_steps"):
        prop = modes["text-to-image"]["properties"].get(name, {"x-providers": {}})
        assert "replicate/flux.1-kontext-pro" not in prop["x-providers"]
    dev = httpx.get(f"{gateway}/v1/models/flux.1-kontext-dev", params={"schema": "true"}, timeout=30).json()["schema"]
    dev_steps = dev["modes"]["edit"]["properties"]["num_inference_steps"]["x-providers"]
    assert dev_steps["replicate/flux.1-kontext-dev"] == Replicate.DEV_HANDLING["num_inference_steps"]
    assert "resolution" not in Replicate.HANDLING  # Replicate's size is fixed at ~1 MP
    rep = next(p for p in body["providers"] if p["config_key"] == "replicate/flux.1-kontext-pro")
    assert rep["available"] is True
    upsampling = modes["text-to-image"]["properties"]["prompt_upsampling"]["x-providers"]
    assert upsampling["replicate/flux.1-kontext-pro"]["handling"] == "passthrough"


def test_prediction_outcomes() -> None:
    assert isinstance(outcome({"id": "a", "status": "processing"}), Pending)
    assert outcome({"id": "a", "status": "succeeded", "output": ["https://x/1.png"]}) == Done(["https://x/1.png"])
    assert outcome({"id": "a", "status": "succeeded", "output": "https://x/1.png"}) == Done(["https://x/1.png"])
    with pytest.raises(TaskFailed, match="CUDA out of memory"):
        outcome({"id": "a", "status": "failed", "error": "CUDA out of memory"})
    with pytest.raises(TaskFailed):
        outcome({"id": "a", "status": "canceled"})  # stopped from outside: not ours to resubmit
    with pytest.raises(ServerError):
        outcome({"id": "a", "status": "aborted"})  # its deadline passed before it started: nothing ran


@pytest.mark.parametrize(
    "error",
    [
        "The input or output was flagged as sensitive. Please try again with different inputs. (E005)",
        "Prediction failed: ModelError: The input or output was flagged as sensitive. (E005) (uIJ6l3ruRD)",
        "The generated output was flagged as potentially sensitive by the safety system.",
        "Generated image contained NSFW content. Try running it again with a different prompt.",
    ],
)
def test_every_moderation_wording_is_moderation(error: str) -> None:
    with pytest.raises(Moderated):
        outcome({"id": "a", "status": "failed", "error": error})


# -- the fake itself answers like Replicate ------------------------------------------------------------


def test_fake_validates_like_replicate(rep: FakeReplicate, fake_url: str) -> None:
    url = fake_url
    auth = {"Authorization": f"Bearer {TOKEN}"}
    image = "data:image/png;base64," + base64.b64encode(png_bytes(32, 32)).decode()

    def create(model: str, inputs: dict[str, Any], headers: dict[str, str] = auth) -> httpx.Response:
        return httpx.post(f"{url}/v1/models/{model}/predictions", json={"input": inputs}, headers=headers)

    bad = create("black-forest-labs/flux-kontext-pro", {"prompt": "x", "output_format": "jpeg"})
    assert bad.status_code == 422 and "output_format" in bad.json()["detail"] and bad.json()["status"] == 422
    capped = create("black-forest-labs/flux-kontext-pro", {"prompt": "x", "input_image": image, "safety_tolerance": 3})
    assert capped.status_code == 422 and "maximum allowed when input images are used" in capped.json()["detail"]
    dev = create("black-forest-labs/flux-kontext-dev", {"prompt": "x"})
    assert dev.status_code == 422 and "input_image is required" in dev.json()["detail"]
    unauthorized = create("black-forest-labs/flux-kontext-pro", {"prompt": "x"}, {"Authorization": "Bearer nope"})
    assert unauthorized.status_code == 401 and unauthorized.json()["title"] == "Unauthenticated"

    rep.faults.add("429", at="submit", retry_after=30)
    throttled = create("black-forest-labs/flux-kontext-pro", {"prompt": "x"})
    assert throttled.status_code == 429 and throttled.headers["retry-after"] == "30"
    assert throttled.json()["detail"] == "Request was throttled. Your rate limit resets in ~30s."

    started = create("black-forest-labs/flux-kontext-pro", {"prompt": "x"}).json()
    assert started["status"] == "starting" and started["output"] is None
    assert started["urls"]["get"] == f"{url}/v1/predictions/{started['id']}"
    canceled = httpx.post(started["urls"]["cancel"], headers=auth).json()
    assert canceled["status"] == "canceled" and httpx.get(started["urls"]["get"], headers=auth).json() == canceled
    rep.faults.clear()
