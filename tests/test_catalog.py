"""The catalog holds the seed pages' facts, validated at load; ids, aliases and provider keys resolve."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from kontext_gateway.catalog import DEFAULT_CATALOG, Catalog
from kontext_gateway.errors import GatewayError

CATALOG = Catalog.load()


def test_models_present() -> None:
    assert CATALOG.ids == ["flux.1-kontext-pro", "flux.1-kontext-max", "flux.1-kontext-dev", "kontext-tiny"]


@pytest.mark.parametrize(
    "name,model_id",
    [
        ("flux.1-kontext-pro", "flux.1-kontext-pro"),
        ("flux-kontext-pro", "flux.1-kontext-pro"),
        ("flux-kontext-max", "flux.1-kontext-max"),
        ("flux-kontext-dev", "flux.1-kontext-dev"),
        ("FLUX.1-Kontext-Pro", "flux.1-kontext-pro"),
        ("black-forest-labs/flux.1-kontext-max", "flux.1-kontext-max"),
        ("kontext-gateway/kontext-tiny", "kontext-tiny"),
    ],
)
def test_ids_and_aliases_resolve(name: str, model_id: str) -> None:
    model, forced = CATALOG.resolve(name)
    assert model.id == model_id and forced is None


@pytest.mark.parametrize(
    "key,model_id,provider",
    [
        ("replicate/flux.1-kontext-pro", "flux.1-kontext-pro", "replicate"),
        ("fireworks/flux.1-kontext-pro", "flux.1-kontext-pro", "fireworks"),
        ("fal/flux.1-kontext-max-edit", "flux.1-kontext-max", "fal"),
        ("replicate/flux.1-kontext-dev", "flux.1-kontext-dev", "replicate"),
        ("local/kontext-tiny", "kontext-tiny", "local"),
    ],
)
def test_provider_keys_force_a_provider(key: str, model_id: str, provider: str) -> None:
    model, forced = CATALOG.resolve(key)
    assert model.id == model_id and forced is not None and forced.provider == provider


def test_unknown_model_is_404_with_a_suggestion() -> None:
    with pytest.raises(GatewayError) as err:
        CATALOG.resolve("flux-kontext-prro")
    assert err.value.status == 404 and err.value.code == "model_not_found" and err.value.param == "model"
    assert "Did you mean 'flux.1-kontext-pro'?" in err.value.message


def test_pro_facts_from_the_seed_page() -> None:
    pro = CATALOG.get("flux.1-kontext-pro")
    assert (pro.creator, pro.family, pro.status) == ("Black Forest Labs", "flux.1-kontext", "active")
    assert pro.aliases == ("flux-kontext-pro",)
    assert pro.tags == ("image-generation", "text-to-image", "image-editing", "typography", "character-consistency")
    assert pro.max_resolution == "2048x2048" and pro.max_pixels == 2048 * 2048
    # The seed page says 1 (single-image routes); multi-reference routes (BFL, fal /multi, Replicate's
    # multi-image apps) take more, so each provider entry carries its own limit.
    assert pro.max_input_images == 4 and pro.input_modalities == ("text", "image")
    assert {p.provider: p.max_input_images for p in pro.providers} == {
        "replicate": 2,
        "fireworks": 1,
        "fal": 4,
        "bfl": 4,
    }
    assert pro.output_modalities == ("image",) and pro.modes == ("text-to-image", "edit")
    by_key = {p.config_key: p for p in pro.providers}
    rep = by_key["replicate/flux.1-kontext-pro"]
    assert rep.provider_model_id == "black-forest-labs/flux-kontext-pro"
    assert rep.pricing.source == "official" and rep.pricing.currency == "USD"
    assert [(c.type, c.metric, c.unit_price) for c in rep.pricing.components] == [("output", "image", 0.04)]
    assert rep.pricing.source_url == "https://replicate.com/black-forest-labs/flux-kontext-pro"
    assert rep.pricing.effective_at == dt.date(2025, 12, 30)
    assert by_key["fireworks/flux.1-kontext-pro"].provider_model_id == "accounts/fireworks/models/flux-kontext-pro"
    assert by_key["fireworks/flux.1-kontext-pro"].pricing.effective_at is None
    fal = by_key["fal/flux.1-kontext-pro"]
    assert fal.provider_model_id == "fal-ai/flux-pro/kontext/text-to-image"
    assert fal.pricing.effective_at == dt.date(2025, 12, 28)
    assert fal.pricing.source_url == "https://fal.ai/models/fal-ai/flux-pro/kontext"


def test_max_facts_from_the_seed_page() -> None:
    mx = CATALOG.get("flux.1-kontext-max")
    keys = {p.config_key: p for p in mx.providers}
    assert set(keys) == {
        "fal/flux.1-kontext-max-edit",
        "fireworks/flux.1-kontext-max",
        "fal/flux.1-kontext-max",
        "replicate/flux.1-kontext-max",
        "bfl/flux.1-kontext-max",
    }
    assert keys["fal/flux.1-kontext-max-edit"].provider_model_id == "fal-ai/flux-pro/kontext/max"
    assert keys["fal/flux.1-kontext-max"].provider_model_id == "fal-ai/flux-pro/kontext/max/text-to-image"
    assert all(p.pricing.price_per_image() == 0.08 for p in mx.providers)
    assert [p.config_key for p in mx.providers_for("edit")] == [
        "fal/flux.1-kontext-max-edit",
        "fireworks/flux.1-kontext-max",
        "replicate/flux.1-kontext-max",
        "bfl/flux.1-kontext-max",
    ]
    params = {p.name: p for p in mx.params}
    # An integer 0-6 in the unified request; fal's route alone takes the string "1"-"6".
    tolerance = params["safety_tolerance"]
    assert (tolerance.type, tolerance.minimum, tolerance.maximum, tolerance.enum) == ("integer", 0, 6, None)
    fal = tolerance.route("fal", "edit")
    assert fal is not None and fal.type == "string" and fal.enum == ("1", "2", "3", "4", "5", "6")
    assert tolerance.string_form
    assert params["prompt_upsampling"].providers == ("replicate", "fireworks", "bfl")
    assert params["enhance_prompt"].providers == ("fal",) and params["sync_mode"].providers == ("fal",)


def test_dev_facts_from_the_seed_pages() -> None:
    dev = CATALOG.get("flux.1-kontext-dev")
    assert dev.license and "Non-Commercial" in dev.license
    assert {p.config_key for p in dev.providers} >= {"replicate/flux.1-kontext-dev", "fal/flux.1-kontext-dev"}
    assert min(p.pricing.price_per_image() for p in dev.providers if p.provider != "local") == 0.025
    assert dev.resolutions == ("1K",) and dev.default_steps == 28 and dev.default_guidance == 2.5
    params = {p.name: p for p in dev.params}
    assert params["acceleration"].enum == ("high", "none", "regular") and params["acceleration"].providers == (
        "fal",
        "local",
    )
    assert params["disable_safety_checker"].providers == ("replicate",)
    assert params["output_quality"].maximum == 100
    assert set(params) == {
        "acceleration",
        "disable_safety_checker",
        "enable_safety_checker",
        "enhance_prompt",
        "output_quality",
        "resolution_mode",
        "sync_mode",
    }


def test_tiny_is_a_local_smoke_test_model() -> None:
    tiny = CATALOG.get("kontext-tiny")
    assert [p.provider for p in tiny.providers] == ["local"] and tiny.default_steps == 4
    assert "abstract" in tiny.description


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_catalog_is_validated_at_load(tmp_path: Path) -> None:
    base = DEFAULT_CATALOG.read_text()
    with pytest.raises(ValueError, match="max_input_images"):
        Catalog.load(_write(tmp_path, base.replace("max_input_images = 4", "max_input_images = -1", 1)))
    with pytest.raises(ValueError, match="over the model's max_input_images"):
        Catalog.load(_write(tmp_path, base.replace("max_input_images = 4", "max_input_images = 1", 1)))
    with pytest.raises(ValueError, match="config_key"):
        Catalog.load(
            _write(
                tmp_path,
                base.replace(
                    'config_key = "replicate/flux.1-kontext-pro"', 'config_key = "fal/flux.1-kontext-pro-x"', 1
                ),
            )
        )
    with pytest.raises(ValueError, match="names both"):
        Catalog.load(_write(tmp_path, base.replace('aliases = ["flux-kontext-max"]', 'aliases = ["flux-kontext-pro"]')))
    with pytest.raises(ValueError, match="Extra inputs"):
        Catalog.load(_write(tmp_path, base.replace('family = "flux.1-kontext"', 'family = "x"\ncolour = "red"', 1)))
