"""Hugging Face hub access shared by the model loaders and the CLIP scorer.

Compute nodes are often offline: every check here answers without downloading anything and without minutes of
client retries, and a load that fails becomes one :class:`WeightsNotFoundError` line saying where to put a
local copy.
"""
from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from qdiff.models.base import WeightsNotFoundError


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is on, in the environment or as huggingface_hub read it at import."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub, so an offline machine fails in seconds instead of minutes of client retries."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows; let the client try
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_cached(source: str, subfolders: tuple[str, ...] = ("",)) -> bool:
    """Whether the hub cache holds the config of one of ``subfolders`` of repo ``source`` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for sub in subfolders:
        try:
            hit = try_to_load_from_cache(source, f"{sub}/config.json" if sub else "config.json")
        except ValueError:  # not a valid repo id
            return False
        if isinstance(hit, str):
            return True
    return False


def load_errors(*extra: type[BaseException]) -> tuple[type[BaseException], ...]:
    """What a failed ``from_pretrained`` raises (missing files, bad configs, hub HTTP errors), plus ``extra``."""
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, *extra)
    try:
        from huggingface_hub.errors import HfHubHTTPError

        errors += (HfHubHTTPError,)
    except ImportError:  # pragma: no cover
        pass
    return errors


def first_line(error: BaseException | None, default: str) -> str:
    """The first line of ``error``'s message (at most 200 characters), for one-line reports; ``default`` if empty."""
    lines = str(error).strip().splitlines() if error is not None else []
    return (lines[0] if lines else default)[:200]


def not_found(name: str, source: str, hint: str) -> WeightsNotFoundError:
    """The error for hub weights that are neither cached nor downloadable; ``hint`` names other accepted sources."""
    return WeightsNotFoundError(
        f"{name}: cannot load '{source}' (no network or not cached). Download it on a machine with access and set "
        f"model.source=/path/to/{source.rstrip('/').split('/')[-1]} (a diffusers folder{hint}), "
        "or use model.random_init=true for a smoke test."
    )


def from_pretrained(name: str, source: str, subfolders: tuple[str, ...], load: Callable[..., Any],
                    local_files_only: bool = False, hint: str = "") -> Any:
    """``load(source, [subfolder=...,] local_files_only=...)``: cache/folder first, then one online attempt.

    ``subfolders`` are tried in order ("" is the folder itself); any failure raises one
    :class:`WeightsNotFoundError` line naming model ``name`` instead of a client traceback.
    """
    is_dir = Path(source).expanduser().is_dir()
    if is_dir:
        root = Path(source).expanduser()
        subfolders = tuple(s for s in subfolders if (root / s / "config.json").is_file()
                           or (root / s / "tokenizer_config.json").is_file() or (root / s / "vocab.json").is_file()) or subfolders
    errors = load_errors()
    last: BaseException | None = None
    where = str(Path(source).expanduser()) if is_dir else source
    for sub in subfolders:
        try:
            with warnings.catch_warnings():  # diffusers passes a deprecated hub argument; not the user's concern
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")
                return load(where, local_files_only=True, **({"subfolder": sub} if sub else {}))
        except errors as e:
            last = e
    if is_dir:
        raise WeightsNotFoundError(f"{name}: cannot load '{source}' ({first_line(last, 'missing files')})") from None
    if local_files_only or hub_offline() or not hub_reachable():
        raise not_found(name, source, hint) from None
    for sub in subfolders:
        try:
            return load(source, local_files_only=False, **({"subfolder": sub} if sub else {}))
        except errors:
            pass
    raise not_found(name, source, hint) from None


__all__ = ["hub_offline", "hub_reachable", "hub_cached", "load_errors", "first_line", "not_found", "from_pretrained"]
