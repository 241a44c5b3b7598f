"""GET /v1/models and /v1/models/{id}[?schema=true], through the SDK and raw HTTP."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai import OpenAI


def test_list_models_openai_shape(client: OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["flux.1-kontext-pro", "flux.1-kontext-max", "flux.1-kontext-dev", "kontext-tiny"]
    for m in models:
        assert m.object == "model" and isinstance(m.created, int) and m.owned_by
    pro = models[0].model_extra
    assert pro["creator"] == "Black Forest Labs" and pro["family"] == "flux.1-kontext"
    assert pro["max_resolution"] == "2048x2048" and pro["max_input_images"] == 4  # multi-reference routes
    limits = {p["config_key"]: p["max_input_images"] for p in pro["providers"]}
    assert limits == {
        "replicate/flux.1-kontext-pro": 2,
        "fireworks/flux.1-kontext-pro": 1,
        "fal/flux.1-kontext-pro": 4,
        "bfl/flux.1-kontext-pro": 4,
    }
    assert pro["aliases"] == ["flux-kontext-pro"]
    rep = next(p for p in pro["providers"] if p["config_key"] == "replicate/flux.1-kontext-pro")
    assert rep["pricing"]["components"] == [{"type": "output", "metric": "image", "unit_price": 0.04}]
    assert rep["available"] is False  # no REPLICATE_API_TOKEN here
    tiny = models[3].model_extra
    assert tiny["providers"][0]["available"] is True


@pytest.mark.parametrize(
    "name", ["flux-kontext-dev", "replicate/flux.1-kontext-dev", "black-forest-labs/flux.1-kontext-dev"]
)
def test_retrieve_resolves_aliases_and_provider_keys(client: OpenAI, name: str) -> None:
    m = client.models.retrieve(name)
    assert m.id == "flux.1-kontext-dev" and m.owned_by == "black-forest-labs"
    assert "Non-Commercial" in m.model_extra["license"]


def test_unknown_model(client: OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("flux.1-kontext-ultra")
    err = http.get("/v1/models/flux.1-kontex-pro").json()["error"]
    assert err["code"] == "model_not_found" and "Did you mean 'flux.1-kontext-pro'?" in err["message"]


def test_schema_for_the_local_model(http: httpx.Client) -> None:
    body = http.get("/v1/models/kontext-tiny", params={"schema": "true"}).json()
    schema = body["schema"]
    assert set(schema["modes"]) == {"text-to-image", "edit"}
    t2i, edit = schema["modes"]["text-to-image"]["properties"], schema["modes"]["edit"]["properties"]
    assert schema["modes"]["edit"]["required"] == ["prompt", "image"]
    assert schema["modes"]["text-to-image"]["required"] == ["prompt"] and "image" not in t2i
    assert edit["image"]["maxItems"] == 4  # several images, each its own context tokens
    assert t2i["output_format"]["enum"] == ["png", "jpeg", "gif", "webp", "avif"]
    assert t2i["response_format"]["default"] == "url" and t2i["n"]["default"] == 1
    # Any tier is accepted (mapped to the nearest): the supported ones are examples, not an enum.
    assert "enum" not in t2i["resolution"] and t2i["resolution"]["examples"] == ["auto", "0.5K", "1K", "2K"]
    assert t2i["num_inference_steps"]["default"] == 4
    local = t2i["cfg_scale"]["x-providers"]["local/kontext-tiny"]
    assert local == {"handling": "renamed", "as": "guidance_scale"}
    assert t2i["size"]["x-providers"]["local/kontext-tiny"]["handling"] == "converted"
    assert t2i["output_format"]["x-providers"]["local/kontext-tiny"]["handling"] == "emulated"
    assert schema["sizes"]["1K"]["4:3"] == "1183x887" and schema["sizes"]["1K"]["3:4"] == "887x1182"


def test_schema_lists_provider_only_parameters(http: httpx.Client) -> None:
    schema = http.get("/v1/models/flux-kontext-max?schema=true").json()["schema"]
    props = schema["modes"]["text-to-image"]["properties"]
    # An integer 0-6 or its string form; each route's own type and range under x-providers.
    tolerance = props["safety_tolerance"]
    assert tolerance["type"] == ["integer", "string"] and (tolerance["minimum"], tolerance["maximum"]) == (0, 6)
    assert tolerance["x-providers"]["fal/flux.1-kontext-max"]["enum"] == ["1", "2", "3", "4", "5", "6"]
    assert tolerance["x-providers"]["bfl/flux.1-kontext-max"]["type"] == "integer"
    assert props["prompt_upsampling"]["x-provider-only"] == ["replicate", "fireworks", "bfl"]
    assert props["prompt_upsampling"]["x-providers"]["replicate/flux.1-kontext-max"] == {
        "handling": "passthrough",
        "as": "prompt_upsampling",
        "type": "boolean",  # the type its route takes
    }
    assert set(props["enhance_prompt"]["x-providers"]) == {"fal/flux.1-kontext-max"}  # the t2i route
    edit_props = schema["modes"]["edit"]["properties"]
    assert set(edit_props["enhance_prompt"]["x-providers"]) == {"fal/flux.1-kontext-max-edit"}
    assert schema["limits"]["max_pixels"] == 2048 * 2048


def test_schema_shows_the_local_engines_features_only_where_a_provider_has_them(http: httpx.Client) -> None:
    tiny = http.get("/v1/models/kontext-tiny?schema=true").json()["schema"]["modes"]
    pro = http.get("/v1/models/flux.1-kontext-pro?schema=true").json()["schema"]["modes"]
    for name in ("negative_prompt", "true_cfg_scale", "loras", "partial_images"):
        assert "local/kontext-tiny" in tiny["text-to-image"]["properties"][name]["x-providers"]
        assert name not in pro["text-to-image"]["properties"]  # no hosted provider takes them
    assert "mask" in tiny["edit"]["properties"] and "mask" not in tiny["text-to-image"]["properties"]
    assert "mask" not in pro["edit"]["properties"]
    assert "previous_response_id" in pro["edit"]["properties"]  # the gateway's own: every model


def test_dev_text_to_image_lists_only_what_the_local_engine_honours(http: httpx.Client) -> None:
    """[dev] text-to-image is the local engine's alone (the hosted [dev] routes only edit): the
    hosted routes' parameters are not in that mode's schema, nor their providers in x-providers."""
    modes = http.get("/v1/models/flux.1-kontext-dev?schema=true").json()["schema"]["modes"]
    t2i, edit = modes["text-to-image"]["properties"], modes["edit"]["properties"]
    for name in ("disable_safety_checker", "enable_safety_checker", "output_quality", "resolution_mode", "sync_mode"):
        assert name not in t2i and edit[name]["x-providers"], name
    for name, prop in t2i.items():
        assert set(prop["x-providers"]) == {"local/flux.1-kontext-dev"}, name
    # fal's [dev] routes have no enhance_prompt (its pro/max routes do): no mode lists it.
    assert "enhance_prompt" not in edit
    assert set(edit["cfg_scale"]["x-providers"]) == {
        "replicate/flux.1-kontext-dev",
        "fal/flux.1-kontext-dev",
        "fal/flux.1-kontext-dev-lora",
        "local/flux.1-kontext-dev",
    }
    # Nothing serving [pro] takes steps, so [pro] does not list them; the gateway's own parameters stay.
    pro = http.get("/v1/models/flux.1-kontext-pro?schema=true").json()["schema"]["modes"]
    assert "num_inference_steps" not in pro["text-to-image"]["properties"]
    assert {"resolution", "response_format", "n"} <= set(pro["text-to-image"]["properties"])


def test_max_edit_lists_the_edit_routes_only(http: httpx.Client) -> None:
    modes = http.get("/v1/models/flux.1-kontext-max?schema=true").json()["schema"]["modes"]
    assert "fal/flux.1-kontext-max" not in modes["edit"]["properties"]["prompt"]["x-providers"]  # t2i only
    assert "fal/flux.1-kontext-max-edit" not in modes["text-to-image"]["properties"]["prompt"]["x-providers"]


def test_resolution_says_what_it_accepts(http: httpx.Client) -> None:
    import jsonschema

    prop = http.get("/v1/models/flux.1-kontext-pro?schema=true").json()["schema"]["modes"]["edit"]["properties"]
    resolution = prop["resolution"]
    assert resolution["type"] == "string" and "enum" not in resolution
    assert resolution["examples"] == ["auto", "1K"] and resolution["default"] == "auto"
    assert "nearest" in resolution["description"]
    check = jsonschema.Draft202012Validator(resolution)
    assert all(check.is_valid(v) for v in ("auto", "4K", "0.5k", "0.25", "2MP", " 1K "))
    assert not any(check.is_valid(v) for v in ("8X", "0K", "-1", "", "huge"))


def test_native_output_formats_per_provider(http: httpx.Client) -> None:
    body = http.get("/v1/models/flux.1-kontext-pro?schema=true").json()
    native = body["schema"]["modes"]["text-to-image"]["properties"]["output_format"]["x-native-formats"]
    assert native["bfl/flux.1-kontext-pro"] == ["png", "jpeg", "webp"]  # BFL's routes make webp
    assert native["fal/flux.1-kontext-pro"] == ["png", "jpeg"]
    providers = {p["config_key"]: p for p in body["providers"]}
    assert providers["bfl/flux.1-kontext-pro"]["output_formats"] == ["png", "jpeg", "webp"]
    assert "4:5" not in providers["fal/flux.1-kontext-pro"]["aspect_ratios"]  # fal's 9 ratios
