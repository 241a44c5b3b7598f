"""LoRA adapters per request: where their files may come from, and loading them once per pipeline.

Paths name files under the operator's adapters directory (`KONTEXT_LORA_DIR`); a request can never
reach outside it (absolute paths, `..`, symlinks pointing out are refused). http(s) URLs are fetched
only when the operator allows downloads, and then once: they are kept under the data directory.

Loading goes through diffusers' `load_lora_weights`, so every layout its Flux loader detects works
(diffusers/PEFT, kohya sd-scripts, xlabs, the fal Kontext trainer...). Loaded adapters stay in the
transformer as unmerged PEFT layers, keyed by (file, mtime, size): a request switches between them with
`set_adapters` (names and scales) and a request without LoRAs disables them, so switching never
reloads the base model nor an adapter already loaded, and the base weights are never modified (a
disabled adapter, or one at scale 0, gives the base model's exact output).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import logging
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import GatewayError, unavailable

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
MAX_DOWNLOAD_BYTES = 4 * 1024**3  # a rank-128 FLUX LoRA is ~1.2 GB in bf16
# Kept loaded per pipeline (each holds its low-rank weights on the device: ~50-600 MB for FLUX.1);
# the least recently used is deleted past that.
MAX_ADAPTERS = 4


def invalid_lora(message: str) -> GatewayError:
    return GatewayError(message, status=400, param="loras", code="invalid_lora")


@dataclass(frozen=True)
class LoraSpec:
    """One resolved adapter of a request: a local file and its scale."""

    path: Path
    scale: float = 1.0
    name: str = ""  # as the request named it, for messages


def is_url(path: str) -> bool:
    return path.lower().startswith(("http://", "https://"))


def resolve_path(path: str, lora_dir: Path | None) -> Path:
    """The file under `lora_dir` that a request's `path` names. `style` finds `style.safetensors` too."""
    if lora_dir is None:
        raise invalid_lora(
            f"LoRA '{path}': no adapters directory is configured on this server (KONTEXT_LORA_DIR), "
            "so LoRA files cannot be named by path."
        )
    rel = PurePosixPath(path.replace("\\", "/"))
    if rel.is_absolute() or path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":"):
        raise invalid_lora(f"LoRA '{path}': give a path relative to the adapters directory, not an absolute one.")
    if ".." in rel.parts:
        raise invalid_lora(f"LoRA '{path}': '..' is not allowed; name a file inside the adapters directory.")
    root = lora_dir.resolve()
    candidates = [root.joinpath(*rel.parts)]
    if rel.suffix != SUFFIX:
        candidates.append(root.joinpath(*rel.parent.parts, rel.name + SUFFIX))
    for candidate in candidates:
        real = candidate.resolve()
        if not real.is_relative_to(root):  # a symlink pointing out of the directory
            raise invalid_lora(f"LoRA '{path}' points outside the adapters directory.")
        if real.is_file():
            if real.suffix != SUFFIX:
                raise invalid_lora(f"LoRA '{path}': only {SUFFIX} files are loaded (no pickled checkpoints).")
            return real
    raise invalid_lora(f"LoRA '{path}' was not found in the adapters directory.")


def fetch_url(url: str, cache_dir: Path, *, allow_downloads: bool, allow_private: bool) -> Path:
    """Download an adapter once (blocking: runs on the engine's thread) and return the local file."""
    if not allow_downloads:
        raise invalid_lora(
            f"LoRA '{url}': this server does not download adapters (KONTEXT_ALLOW_DOWNLOADS is off). "
            "Ask the operator to put the file in the adapters directory and name it by its relative path."
        )
    target = cache_dir / (hashlib.sha256(url.encode()).hexdigest()[:32] + SUFFIX)
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    import httpx

    try:
        # The engine's thread has no event loop of its own: the download gets one, for the pinned client.
        asyncio.run(_download(url, target, allow_private=allow_private))
    except httpx.HTTPError as exc:
        raise invalid_lora(f"LoRA '{url}' could not be downloaded ({type(exc).__name__}).") from None
    return target


async def _download(url: str, target: Path, *, allow_private: bool) -> None:
    """Redirects are followed by hand, each hop connecting only to an address checked as public
    (`PinnedTransport`); the file appears whole or not at all."""
    import httpx

    from ..net import PinnedTransport, split_url

    part = target.with_suffix(".part")
    current = url
    transport = PinnedTransport(allow_private=allow_private, param="loras", status=400)
    async with httpx.AsyncClient(
        transport=transport, timeout=httpx.Timeout(30.0, read=120.0), follow_redirects=False
    ) as client:
        for _ in range(6):
            split_url(current, param="loras", status=400)  # http(s) with a host, or a 400
            async with client.stream("GET", current) as resp:
                if resp.is_redirect:
                    current = str(resp.url.join(resp.headers["location"]))
                    continue
                if resp.status_code != 200:
                    raise invalid_lora(f"LoRA '{url}': the download failed with HTTP {resp.status_code}.")
                size = 0
                with part.open("wb") as out:
                    async for chunk in resp.aiter_bytes(1 << 20):
                        size += len(chunk)
                        if size > MAX_DOWNLOAD_BYTES:
                            out.close()
                            part.unlink(missing_ok=True)
                            raise invalid_lora(f"LoRA '{url}' is larger than {MAX_DOWNLOAD_BYTES >> 30} GiB.")
                        out.write(chunk)
                os.replace(part, target)
                return
    raise invalid_lora(f"LoRA '{url}': too many redirects.")


def check_safetensors(path: Path, label: str) -> None:
    """Refuse anything that is not a safetensors file before diffusers sees it (it would otherwise
    fall back to unpickling, which runs code)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise invalid_lora(f"LoRA {_what(label, path)} is not a readable safetensors file: {exc}.") from None
    if not keys:
        raise invalid_lora(f"LoRA {_what(label, path)} holds no tensors.")


class AdapterCache:
    """The adapters loaded into one pipeline, by (resolved file, mtime, size) -> adapter name."""

    def __init__(self, pipe: Any, max_adapters: int = MAX_ADAPTERS) -> None:
        self.pipe = pipe
        self.max_adapters = max_adapters
        self._names: OrderedDict[tuple[str, int, int], str] = OrderedDict()
        self._counter = 0
        self._enabled = False
        self._lock = threading.Lock()
        self.loads = 0  # adapters read from disk so far (tests: a cached adapter is not read again)

    @property
    def loaded(self) -> list[str]:
        return list(self._names.values())

    def activate(self, loras: list[LoraSpec]) -> None:
        """Make exactly these adapters, at these scales and in this order, the active ones; none: off."""
        with self._lock:
            if not loras:
                if self._enabled or self._present():
                    self.pipe.disable_lora()
                    self._enabled = False
                return
            if importlib.util.find_spec("peft") is None:
                raise unavailable(
                    "LoRA adapters need the 'peft' package on this server (pip install peft).", code="lora_unsupported"
                )
            merged: dict[Path, tuple[float, str]] = {}
            for spec in loras:  # the same file twice: LoRA deltas are linear in the scale
                scale, label = merged.get(spec.path, (0.0, spec.name or spec.path.name))
                merged[spec.path] = (scale + spec.scale, label)
            names = [self._ensure(path, label, keep=set(merged)) for path, (_, label) in merged.items()]
            scales = [scale for scale, _ in merged.values()]
            self.pipe.enable_lora()
            self.pipe.set_adapters(names, adapter_weights=scales)
            self._enabled = True

    def _ensure(self, path: Path, label: str, keep: set[Path]) -> str:
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        name = self._names.get(key)
        if name is not None:
            self._names.move_to_end(key)
            return name
        for old_key in [k for k in self._names if k[0] == key[0]]:  # the file changed: drop the old one
            self._delete(self._names.pop(old_key))
        check_safetensors(path, label)
        self._counter += 1
        name = f"lora_{self._counter}"
        try:
            self._check_shapes(path, label)
            with warnings.catch_warnings():  # PEFT warns on every adapter after the first: expected here
                warnings.simplefilter("ignore", UserWarning)
                self.pipe.load_lora_weights(
                    str(path.parent),
                    weight_name=path.name,
                    adapter_name=name,
                    use_safetensors=True,
                    local_files_only=True,
                )
        except GatewayError:
            raise
        except Exception as exc:
            self._delete(name)
            raise invalid_lora(
                f"LoRA {_what(label, path)} cannot be loaded into this model: {_first_line(exc)}"
            ) from None
        if name not in self._present():
            self._delete(name)
            raise invalid_lora(f"LoRA {_what(label, path)} has no weights for this model's layers.")
        self.loads += 1
        log.info("loaded LoRA %s as %s", path, name)
        self._names[key] = name
        spare = [k for k in self._names if Path(k[0]) not in keep]  # least recently used first
        while len(self._names) > self.max_adapters and spare:  # a request's own adapters all stay
            self._delete(self._names.pop(spare.pop(0)))
        return name

    def _check_shapes(self, path: Path, label: str) -> None:
        """Refuse, before loading, what would change the base model itself: diffusers' Flux loader
        widens a linear layer to fit a larger LoRA (meant for Flux Control LoRAs) and overwrites norm
        layers for files carrying norm weights. Either would outlive the request, so neither is loaded.
        Reads the file in the layout diffusers converts it to (kohya, fal... become diffusers keys)."""
        state = self.pipe.lora_state_dict(
            str(path.parent), weight_name=path.name, use_safetensors=True, local_files_only=True
        )
        state = state[0] if isinstance(state, tuple) else state
        transformer = self.pipe.transformer
        norm_keys = getattr(self.pipe, "_control_lora_supported_norm_keys", ())
        for key, tensor in state.items():
            if not key.startswith("transformer."):
                continue
            if "lora" not in key and any(k in key for k in norm_keys):
                raise invalid_lora(
                    f"LoRA {_what(label, path)} overwrites normalisation layers (a Flux Control "
                    "LoRA); only adapters that leave the base model as it is are loaded."
                )
            module_name, sep, kind = key.removeprefix("transformer.").rpartition(".lora_")
            if not sep or not kind.endswith("weight"):
                continue
            try:
                module = transformer.get_submodule(module_name)
            except AttributeError:
                continue  # no such layer: the load itself reports it
            base = getattr(module, "base_layer", module)
            if not hasattr(base, "in_features"):
                continue
            want = base.in_features if kind.startswith("A") else base.out_features
            got = tensor.shape[1] if kind.startswith("A") else tensor.shape[0]
            if got != want:
                raise invalid_lora(
                    f"LoRA {_what(label, path)} does not fit this model: {module_name} has "
                    f"{base.in_features} inputs and {base.out_features} outputs, the adapter's lora_{kind} "
                    f"has shape {tuple(tensor.shape)}."
                )

    def _present(self) -> set[str]:
        return {n for names in self.pipe.get_list_adapters().values() for n in names}

    def _delete(self, name: str) -> None:
        """Remove an adapter (also a half-loaded one) from every component; never raises."""
        try:
            if name in self._present():
                with warnings.catch_warnings():  # "adapter was active, now deleted": intended
                    warnings.simplefilter("ignore", UserWarning)
                    self.pipe.delete_adapters(name)
        except Exception:
            log.warning("could not delete LoRA adapter %s", name, exc_info=True)
        # A load that failed half-way may have wrapped layers without registering the adapter.
        from peft.tuners.tuners_utils import BaseTunerLayer

        for component in ("transformer", "text_encoder"):
            model = getattr(self.pipe, component, None)
            if model is None:
                continue
            for module in model.modules():
                if isinstance(module, BaseTunerLayer) and name in getattr(module, "lora_A", {}):
                    module.delete_adapter(name)
            config = getattr(model, "peft_config", None)
            if isinstance(config, dict):
                config.pop(name, None)


def _what(label: str, path: Path) -> str:
    """How messages name an adapter: as the request did, and the file when that differs."""
    return f"'{label}'" if label == path.name else f"'{label}' ({path.name})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:3])[:400]
