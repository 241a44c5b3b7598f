"""Size rules, table-driven: the seed pages' eleven 1K sizes, nearest ratio/tier, limits, errors."""

from __future__ import annotations

import re

import pytest

from kontext_gateway.catalog import Catalog
from kontext_gateway.engine.resolution import context_size, output_size, preferred_for, to_multiple
from kontext_gateway.errors import GatewayError
from kontext_gateway.params import RESOLUTION_PATTERN, Size, nearest_ratio, resolve_size, size_for, tier_area

CATALOG = Catalog.load()
DEV = CATALOG.get("flux.1-kontext-dev")
TINY = CATALOG.get("kontext-tiny")

# The eleven 1K sizes exactly as the product page lists them.
ELEVEN_1K = [
    ("4:3", "1183x887"),
    ("4:5", "916x1145"),
    ("5:4", "1145x916"),
    ("1:1", "1024x1024"),
    ("3:4", "887x1182"),
    ("2:3", "836x1254"),
    ("3:2", "1254x836"),
    ("9:16", "768x1365"),
    ("16:9", "1365x768"),
    ("9:21", "670x1564"),
    ("21:9", "1563x670"),
]


@pytest.mark.parametrize("ratio,expected", ELEVEN_1K)
def test_eleven_1k_sizes_from_aspect_ratio_and_resolution(ratio: str, expected: str) -> None:
    req = resolve_size(DEV, size=None, aspect_ratio=ratio, resolution="1K")
    assert str(req.size) == expected
    assert req.aspect_ratio == ratio and req.tier == "1K"


@pytest.mark.parametrize("ratio,expected", ELEVEN_1K)
def test_size_w_colon_h_equals_aspect_ratio(ratio: str, expected: str) -> None:
    assert str(resolve_size(DEV, size=ratio, aspect_ratio=None, resolution=None).size) == expected


@pytest.mark.parametrize("ratio,expected", ELEVEN_1K)
def test_1k_sizes_are_accepted_as_exact_wxh(ratio: str, expected: str) -> None:
    req = resolve_size(DEV, size=expected, aspect_ratio="21:9", resolution="4K")
    assert str(req.size) == expected and req.exact  # size wins over aspect_ratio and resolution


def test_seven_to_one_maps_to_eight_to_one() -> None:
    wide = DEV.model_copy(update={"aspect_ratios": ("1:1", "4:1", "8:1")})
    req = resolve_size(wide, size=None, aspect_ratio="7:1", resolution=None)
    assert req.aspect_ratio == "8:1"
    assert req.size == size_for(8.0, 1024 * 1024)
    assert nearest_ratio(7.0, ["4:1", "8:1"]) == "8:1"


@pytest.mark.parametrize(
    "asked,expected",
    [
        ("16:10", "3:2"),
        ("1.7:1", "16:9"),
        ("1.9:1", "16:9"),
        ("2.5:1", "21:9"),
        ("100:1", "21:9"),
        ("1:100", "9:21"),
        ("1.05:1", "1:1"),
        ("7:5", "4:3"),
        ("1:1.6", "2:3"),
        ("1:1.7", "9:16"),
    ],
)
def test_any_ratio_maps_to_nearest_supported(asked: str, expected: str) -> None:
    assert resolve_size(DEV, size=None, aspect_ratio=asked, resolution=None).aspect_ratio == expected


@pytest.mark.parametrize(
    "model,tier,expected_tier,expected_size",
    [
        (DEV, "4K", "1K", "1024x1024"),
        (DEV, "0.5K", "1K", "1024x1024"),
        (DEV, "1", "1K", "1024x1024"),
        (TINY, "0.5K", "0.5K", "512x512"),
        (TINY, "0.25", "0.5K", "512x512"),
        (TINY, "4K", "2K", "2048x2048"),
        (TINY, "1k", "1K", "1024x1024"),
        (TINY, "0.3", "0.5K", "512x512"),
        (TINY, "3MP", "2K", "2048x2048"),
    ],
)
def test_tiers_map_to_nearest_available(model, tier: str, expected_tier: str, expected_size: str) -> None:
    req = resolve_size(model, size=None, aspect_ratio=None, resolution=tier)
    assert req.tier == expected_tier and str(req.size) == expected_size


def test_resolution_alone_keeps_the_input_shape_for_edits() -> None:
    req = resolve_size(TINY, size=None, aspect_ratio=None, resolution="0.5K", input_size=Size(800, 400))
    assert req.size is not None and abs(req.size.ratio - 2.0) < 0.01
    assert abs(req.size.area - 512 * 512) < 1024


def test_aspect_ratio_and_tier_are_independent() -> None:
    req = resolve_size(TINY, size=None, aspect_ratio="16:9", resolution="0.5K")
    assert req.size == size_for(16 / 9, 512 * 512)


@pytest.mark.parametrize("size", [None, "", "auto", "AUTO"])
def test_auto_leaves_size_to_the_provider(size) -> None:
    assert resolve_size(DEV, size=size, aspect_ratio=None, resolution=None).size is None
    assert resolve_size(DEV, size=size, aspect_ratio="auto", resolution="auto").size is None


@pytest.mark.parametrize("size", ["1x1", "2048x2048", "14142x296", "296x14142", "1024X768", " 640 x 480 "])
def test_custom_sizes_within_limits(size: str) -> None:
    w, h = (int(v) for v in size.lower().replace(" ", "").split("x"))
    assert resolve_size(DEV, size=size, aspect_ratio=None, resolution=None).size == Size(w, h)


@pytest.mark.parametrize(
    "size,fragment",
    [
        ("0x100", "between 1 and 14142"),
        ("14143x10", "between 1 and 14142"),
        ("2049x2048", "over the maximum"),
        ("3000x3000", "over the maximum"),
        ("big", "WIDTHxHEIGHT"),
        ("1024x", "WIDTHxHEIGHT"),
        ("-5x10", "WIDTHxHEIGHT"),
        ("16:0", "WIDTHxHEIGHT"),
    ],
)
def test_invalid_sizes(size: str, fragment: str) -> None:
    with pytest.raises(GatewayError) as err:
        resolve_size(DEV, size=size, aspect_ratio=None, resolution=None)
    assert err.value.status == 400 and err.value.param == "size" and err.value.code == "invalid_size"
    assert fragment in err.value.message


@pytest.mark.parametrize(
    "param,kw",
    [
        ("aspect_ratio", {"aspect_ratio": "wide"}),
        ("aspect_ratio", {"aspect_ratio": "0:1"}),
        ("resolution", {"resolution": "8X"}),
        ("resolution", {"resolution": "-1"}),
    ],
)
def test_invalid_ratio_or_tier(param: str, kw: dict) -> None:
    args = {"size": None, "aspect_ratio": None, "resolution": None, **kw}
    with pytest.raises(GatewayError) as err:
        resolve_size(DEV, **args)
    assert err.value.status == 400 and err.value.param == param


# -- the local engine's conversion ------------------------------------------------------------------


@pytest.mark.parametrize(
    "asked,produced",
    [
        (Size(1183, 887), Size(1184, 880)),
        (Size(887, 1182), Size(880, 1184)),
        (Size(1, 1), Size(16, 16)),
        (Size(300, 200), Size(304, 208)),
        (Size(1024, 1024), Size(1024, 1024)),
        (Size(1563, 670), Size(1568, 672)),
    ],
)
def test_local_engine_honours_size_to_nearest_multiple_of_16(asked: Size, produced: Size) -> None:
    assert to_multiple(asked) == produced
    assert output_size(asked, None, DEV.max_pixels) == produced


def test_local_rounding_never_crosses_the_model_limit() -> None:
    out = output_size(Size(1000, 4194), None, DEV.max_pixels)
    assert out.area <= DEV.max_pixels and out.width % 16 == 0 and out.height % 16 == 0


@pytest.mark.parametrize(
    "input_size,expected",
    [
        (Size(1024, 768), Size(1184, 880)),
        (Size(768, 1024), Size(880, 1184)),
        (Size(500, 500), Size(1024, 1024)),
        (Size(1920, 1080), Size(1392, 752)),
        (Size(4000, 1000), Size(1568, 672)),
    ],
)
def test_edit_default_keeps_input_shape_at_preferred_resolution(input_size: Size, expected: Size) -> None:
    assert output_size(None, input_size, DEV.max_pixels) == expected
    assert preferred_for(input_size.ratio) == expected


def test_context_image_scales_with_the_output() -> None:
    assert context_size(Size(1024, 768), Size(1184, 880)) == Size(1184, 880)
    small = context_size(Size(1024, 768), Size(256, 256))
    assert small.width % 16 == 0 and small.height % 16 == 0
    assert abs(small.area - 256 * 256) / (256 * 256) < 0.15 and small.width > small.height


# -- what the schema says `resolution` accepts ----------------------------------------------------------


ACCEPTED = ["auto", "AUTO", " 1K ", "0.5k", "4K", "3 k", "1", "0.25", "4MP", "1.5 mp", "0.0001"]
REFUSED = ["0K", "0", "0.0k", "0mp", "", "8X", "-1", "1KK", "k", "mp", "1e3", "1,5", "auto1", "1K2"]


@pytest.mark.parametrize("text", [*ACCEPTED, *REFUSED])
def test_the_schemas_resolution_pattern_is_what_resolve_size_takes(text: str) -> None:
    takes = True
    try:
        tier_area(text)
    except ValueError:
        takes = False
    assert bool(re.match(RESOLUTION_PATTERN, text)) == takes == (text in ACCEPTED), text


@pytest.mark.parametrize("tier", ["0K", "0.0k", "0.00000001"])
def test_zero_or_tiny_tiers_are_a_400_or_the_smallest_tier(tier: str) -> None:
    try:
        req = resolve_size(TINY, size=None, aspect_ratio=None, resolution=tier)
    except GatewayError as err:
        assert err.status == 400 and err.code == "invalid_resolution"
    else:
        assert req.tier == "0.5K"  # a tiny scale maps to the smallest tier
