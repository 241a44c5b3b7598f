"""LoRA adapters on kontext-tiny loaded from disk: two file layouts, scales, composition, caching, bad
files and where adapter files may come from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

pytest.importorskip("peft", reason="LoRA adapters need the peft package (the engine extra)")

import torch
from safetensors.torch import save_file

from conftest import digest
from kontext_gateway.catalog import Catalog
from kontext_gateway.config import Settings
from kontext_gateway.engine.lora import LoraSpec, resolve_path
from kontext_gateway.engine.pipeline import KontextEngine
from kontext_gateway.errors import GatewayError
from kontext_gateway.params import Size, SizeRequest
from kontext_gateway.providers.base import ImageJob
from kontext_gateway.providers.local import LocalProvider

RANK = 4


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "kontext-tiny"
    KontextEngine.tiny("cpu").save(path)
    return path


@pytest.fixture(scope="module")
def engine(saved: Path) -> KontextEngine:
    """The engine adapters are loaded into."""
    return KontextEngine.from_dir(saved, name="tiny-lora", device="cpu")


@pytest.fixture(scope="module")
def fresh(saved: Path) -> KontextEngine:
    """Never sees an adapter: the reference for "unchanged"."""
    return KontextEngine.from_dir(saved, name="tiny-fresh", device="cpu")


def _lora_pair(gen: torch.Generator, fan_in: int, fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(RANK, fan_in, generator=gen) * 0.3, torch.randn(fan_out, RANK, generator=gen) * 0.3


def peft_lora(engine: KontextEngine, seed: int) -> dict[str, torch.Tensor]:
    """diffusers/PEFT layout: transformer.<diffusers module>.lora_A/B.weight, sized from the model."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module in (
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_v",
        "transformer_blocks.0.ff.net.2",
        "single_transformer_blocks.0.proj_out",
    ):
        lin = engine.pipe.transformer.get_submodule(module)
        a, b = _lora_pair(gen, lin.in_features, lin.out_features)
        out[f"transformer.{module}.lora_A.weight"], out[f"transformer.{module}.lora_B.weight"] = a, b
    return out


def kohya_lora(engine: KontextEngine, seed: int) -> dict[str, torch.Tensor]:
    """kohya sd-scripts layout on BFL module names. diffusers splits the fused img/txt qkv into equal
    thirds (any width), so double blocks map onto the tiny model; single blocks' fused linear1 is split
    at FLUX's fixed 3072-wide sizes, so only their linear2 (proj_out) is used here."""
    cfg = engine.pipe.transformer.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim  # 32
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "lora_unet_double_blocks_0_img_attn_qkv": (inner, 3 * inner),
        "lora_unet_double_blocks_0_txt_attn_qkv": (inner, 3 * inner),
        "lora_unet_double_blocks_0_img_attn_proj": (inner, inner),
        "lora_unet_single_blocks_1_linear2": (inner + 4 * inner, inner),
    }
    out = {}
    for key, (fan_in, fan_out) in shapes.items():
        down, up = _lora_pair(gen, fan_in, fan_out)
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down, up
        out[f"{key}.alpha"] = torch.tensor(float(RANK))
    return out


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, engine: KontextEngine) -> Path:
    d = tmp_path_factory.mktemp("loras")
    save_file(peft_lora(engine, 1), str(d / "style.safetensors"))
    save_file(peft_lora(engine, 2), str(d / "other.safetensors"))
    (d / "kohya").mkdir()
    save_file(kohya_lora(engine, 3), str(d / "kohya" / "character.safetensors"))
    return d


SRC = Image.new("RGB", (64, 64), (40, 160, 220))


def run(engine: KontextEngine, loras: list[tuple[Path, float]] | None = None, **kw: Any) -> str:
    args: dict[str, Any] = dict(
        prompt="a fox", image=SRC, context=Size(64, 64), output=Size(64, 64), steps=2, guidance=2.5, n=1, seed=1
    )
    args.update(kw)
    specs = [LoraSpec(path=p, scale=s, name=p.name) for p, s in (loras or [])]
    return digest(engine.run(loras=specs, **args))


def max_pixel_diff(a: list[Image.Image], b: list[Image.Image]) -> int:
    import numpy as np

    return int(
        max(np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() for x, y in zip(a, b, strict=False))
    )


def test_scale_zero_equals_no_adapter_and_scale_one_changes(
    engine: KontextEngine, fresh: KontextEngine, lora_dir: Path
) -> None:
    base = run(fresh)
    style = lora_dir / "style.safetensors"
    assert run(engine, [(style, 0.0)]) == base  # bit-identical: the base weights are never touched
    assert run(engine, [(style, 1.0)]) != base
    assert run(engine) == base  # a request without LoRAs disables them


def test_kohya_layout_maps_onto_the_tiny_model(engine: KontextEngine, fresh: KontextEngine, lora_dir: Path) -> None:
    character = lora_dir / "kohya" / "character.safetensors"
    assert run(engine, [(character, 1.0)]) != run(fresh)
    layer = engine.pipe.transformer.get_submodule("transformer_blocks.0.attn.to_k")
    assert any(name in getattr(layer, "lora_A", {}) for name in engine.adapters.loaded)  # qkv was split
    assert run(engine, [(character, 0.0)]) == run(fresh)


def test_adapters_compose_with_their_own_scales(engine: KontextEngine, lora_dir: Path) -> None:
    a, b = lora_dir / "style.safetensors", lora_dir / "other.safetensors"
    only_a, only_b = run(engine, [(a, 1.0)]), run(engine, [(b, 1.0)])
    both = run(engine, [(a, 1.0), (b, 1.0)])
    assert len({only_a, only_b, both}) == 3
    assert run(engine, [(a, 1.0), (b, 0.0)]) == only_a  # a zero-scaled second adapter adds exactly nothing
    # Scales follow their adapter whatever the order (the sum's rounding may differ by a level)...
    args = dict(
        prompt="a fox", image=SRC, context=Size(64, 64), output=Size(64, 64), steps=2, guidance=2.5, n=1, seed=1
    )
    ab = engine.run(loras=[LoraSpec(a, 0.5), LoraSpec(b, 1.0)], **args)
    ba = engine.run(loras=[LoraSpec(b, 1.0), LoraSpec(a, 0.5)], **args)
    swapped = engine.run(loras=[LoraSpec(a, 1.0), LoraSpec(b, 0.5)], **args)
    assert max_pixel_diff(ab, ba) <= 1
    assert max_pixel_diff(ab, swapped) > 8  # ...and swapping the scales is another picture
    assert engine.last_run is not None and engine.last_run.loras == ["style.safetensors", "other.safetensors"]


def test_adapters_are_loaded_once_per_file_version(engine: KontextEngine, lora_dir: Path, tmp_path: Path) -> None:
    transformer = engine.pipe.transformer
    weight = transformer.x_embedder.weight
    path = tmp_path / "evolving.safetensors"
    save_file(peft_lora(engine, 5), str(path))
    loads = engine.adapters.loads
    first = run(engine, [(path, 1.0)])
    run(engine, [(lora_dir / "style.safetensors", 1.0)])
    assert run(engine, [(path, 1.0)]) == first
    assert engine.adapters.loads == loads + 1  # switching back did not read the file again
    assert engine.pipe.transformer is transformer and transformer.x_embedder.weight is weight  # nor the model
    save_file(peft_lora(engine, 6), str(path))  # the file changed: its new version is loaded
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert run(engine, [(path, 1.0)]) != first and engine.adapters.loads == loads + 2
    assert len(engine.adapters.loaded) <= engine.adapters.max_adapters


def test_least_recently_used_adapters_are_deleted(
    engine: KontextEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine.adapters, "max_adapters", 2)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"a{i}.safetensors")
        save_file(peft_lora(engine, 20 + i), str(paths[-1]))
    first = run(engine, [(paths[0], 1.0)])
    run(engine, [(paths[1], 1.0)])
    run(engine, [(paths[2], 1.0), (paths[1], 0.5)])
    present = {n for names in engine.pipe.get_list_adapters().values() for n in names}
    assert len(engine.adapters.loaded) == 2 and present == set(engine.adapters.loaded)
    loads = engine.adapters.loads
    assert run(engine, [(paths[0], 1.0)]) == first and engine.adapters.loads == loads + 1  # read again


@pytest.mark.parametrize("kind", ["not_safetensors", "no_lora_keys", "unknown_layers", "wrong_shapes", "half_loaded"])
def test_a_bad_adapter_is_a_400_and_the_pipeline_stays_usable(
    kind: str, engine: KontextEngine, fresh: KontextEngine, lora_dir: Path, saved: Path, tmp_path: Path
) -> None:
    path = tmp_path / f"{kind}.safetensors"
    if kind == "not_safetensors":
        path.write_bytes(b"PK\x03\x04 this is a zip, or a pickle, or anything else")
    elif kind == "no_lora_keys":
        save_file({"transformer.x_embedder.weight": torch.zeros(32, 64)}, str(path))
    elif kind == "unknown_layers":
        save_file(
            {
                "transformer.no_such_block.lora_A.weight": torch.zeros(RANK, 32),
                "transformer.no_such_block.lora_B.weight": torch.zeros(32, RANK),
            },
            str(path),
        )
    elif kind == "wrong_shapes":  # wider than the layer: diffusers would widen the base layer to fit
        good = peft_lora(engine, 9)
        good["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.zeros(RANK, 48)
        save_file(good, str(path))
    else:  # the transformer part loads, then the text encoder part fails
        good = peft_lora(engine, 9)
        te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
        good[f"{te}.lora_A.weight"], good[f"{te}.lora_B.weight"] = torch.zeros(RANK, 48), torch.zeros(32, RANK)
        save_file(good, str(path))
    run(engine, [(lora_dir / "style.safetensors", 1.0)])
    before = set(engine.adapters.loaded)
    with pytest.raises(GatewayError) as err:
        run(engine, [(lora_dir / "style.safetensors", 1.0), (path, 1.0)])
    assert (err.value.status, err.value.code, err.value.param) == (400, "invalid_lora", "loras")
    assert path.name in err.value.message
    assert set(engine.adapters.loaded) == before  # nothing half-loaded is kept
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = [*engine.pipe.transformer.named_modules(), *engine.pipe.text_encoder.named_modules()]
    leftovers = [n for n, m in modules if isinstance(m, BaseTunerLayer) and set(m.lora_A) - before]
    assert leftovers == []
    # The next requests work, and give what a pipeline that never saw the bad file gives.
    assert run(engine) == run(fresh)
    if kind in ("wrong_shapes", "half_loaded"):  # a good adapter still gives what a fresh model gives
        style = lora_dir / "style.safetensors"
        assert run(engine, [(style, 1.0)]) == run(
            KontextEngine.from_dir(saved, name="check", device="cpu"), [(style, 1.0)]
        )


# -- where adapter files come from -------------------------------------------------------------------


def test_paths_stay_inside_the_adapters_directory(lora_dir: Path, tmp_path: Path) -> None:
    assert resolve_path("style.safetensors", lora_dir) == (lora_dir / "style.safetensors").resolve()
    assert resolve_path("style", lora_dir) == (lora_dir / "style.safetensors").resolve()
    assert resolve_path("kohya/character", lora_dir).name == "character.safetensors"
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"x")
    link = lora_dir / "escape.safetensors"
    link.symlink_to(outside)
    (lora_dir / "notes.txt").write_text("x")
    for bad, words in [
        (str(lora_dir / "style.safetensors"), "absolute"),
        ("../outside.safetensors", ".."),
        ("kohya/../../outside", ".."),
        ("escape.safetensors", "outside"),
        ("missing", "not found"),
        ("notes.txt", "safetensors"),
        ("C:\\loras\\x", "absolute"),
    ]:
        with pytest.raises(GatewayError) as err:
            resolve_path(bad, lora_dir)
        assert (err.value.status, err.value.code) == (400, "invalid_lora") and words in err.value.message, bad
    with pytest.raises(GatewayError) as err:
        resolve_path("style", None)
    assert err.value.code == "invalid_lora" and "KONTEXT_LORA_DIR" in err.value.message


def _job(**kw: Any) -> ImageJob:
    args: dict[str, Any] = dict(
        request_id="req_t",
        model=Catalog.load().get("kontext-tiny"),
        mode="edit",
        prompt="a fox",
        images=[SRC],
        size=SizeRequest(Size(64, 64), exact=True),
        n=1,
        seed=1,
        output_format="png",
        output_compression=None,
        steps=2,
    )
    args.update(kw)
    return ImageJob(**args)


def test_the_provider_resolves_and_applies_loras(
    tmp_path: Path, lora_dir: Path, engine: KontextEngine, fresh: KontextEngine
) -> None:
    provider = LocalProvider(Settings(data_dir=tmp_path, lora_dir=lora_dir))
    entry = next(p for p in Catalog.load().get("kontext-tiny").providers if p.provider == "local")
    provider._engines[entry.config_key] = engine
    styled = provider._generate_sync(entry, _job(loras=[{"path": "style", "scale": 1.0}]))
    direct = engine.run(
        prompt="a fox",
        images=[SRC],
        contexts=[Size(64, 64)],
        output=Size(64, 64),
        steps=2,
        guidance=2.5,
        n=1,
        seed=1,
        loras=[LoraSpec(lora_dir / "style.safetensors", 1.0)],
    )
    assert styled.images[0].image.tobytes() == direct[0].tobytes()
    plain = provider._generate_sync(entry, _job())
    assert (
        plain.images[0].image.tobytes()
        == fresh.run(
            prompt="a fox",
            images=[SRC],
            contexts=[Size(64, 64)],
            output=Size(64, 64),
            steps=2,
            guidance=2.5,
            n=1,
            seed=1,
        )[0].tobytes()
    )
    for loras, words in [
        ([{"path": "/etc/passwd"}], "absolute"),
        ([{"path": "../x"}], ".."),
        ([{"path": "https://example.com/x.safetensors"}], "KONTEXT_ALLOW_DOWNLOADS"),
    ]:
        with pytest.raises(GatewayError) as err:
            provider._generate_sync(entry, _job(loras=loras))
        assert err.value.status == 400 and err.value.code == "invalid_lora" and words in err.value.message


def test_urls_are_fetched_once_when_downloads_are_allowed(tmp_path: Path, lora_dir: Path) -> None:
    from starlette.applications import Starlette
    from starlette.responses import RedirectResponse, Response
    from starlette.routing import Route

    from fakes.common import serve
    from kontext_gateway.engine.lora import fetch_url

    body = (lora_dir / "style.safetensors").read_bytes()
    hits: list[str] = []

    async def file(request: Any) -> Response:
        hits.append(request.url.path)
        return Response(body, media_type="application/octet-stream")

    async def moved(request: Any) -> Response:
        hits.append(request.url.path)
        return RedirectResponse("/files/style.safetensors")

    app = Starlette(routes=[Route("/files/style.safetensors", file), Route("/moved", moved)])
    with serve(app) as url:
        with pytest.raises(GatewayError) as err:
            fetch_url(f"{url}/moved", tmp_path, allow_downloads=False, allow_private=True)
        assert err.value.code == "invalid_lora" and "KONTEXT_ALLOW_DOWNLOADS" in err.value.message and hits == []
        with pytest.raises(GatewayError) as err:  # loopback is not a public address
            fetch_url(f"{url}/moved", tmp_path, allow_downloads=True, allow_private=False)
        assert err.value.code == "url_not_allowed" and hits == []
        got = fetch_url(f"{url}/moved", tmp_path, allow_downloads=True, allow_private=True)
        assert got.read_bytes() == body and hits == ["/moved", "/files/style.safetensors"]
        assert fetch_url(f"{url}/moved", tmp_path, allow_downloads=True, allow_private=True) == got
        assert len(hits) == 2  # kept: not fetched again
