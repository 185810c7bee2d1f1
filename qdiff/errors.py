"""User-facing errors: raised for bad input before expensive work; the CLI prints them as one line."""
from __future__ import annotations


class QDiffError(Exception):
    """Base class of errors caused by the user's input (config, files), not by a bug."""


class ConfigError(QDiffError, ValueError):
    """A config value is out of range, unknown or inconsistent with another."""


class CheckpointError(QDiffError, RuntimeError):
    """A checkpoint file is missing, unreadable, corrupt or does not fit the model."""


class WorkerError(QDiffError, RuntimeError):
    """A job of a parallel reconstruction failed or did not finish its units (what it finished is kept)."""


class DataError(QDiffError, ValueError):
    """Numbers broke: calibration data, a model's output, a loss or a quantized model holds non-finite values.

    Raised where they first appear (naming the row, trajectory, timestep, unit or step) and before the broken
    values reach anything that is kept: no cache entry, checkpoint or artifact is written from them.
    """


def check_switches(cfg, group: str) -> None:
    """Every field of dataclass ``cfg`` annotated ``bool`` takes only true/false (a string such as "no" would
    read as true): one ConfigError naming ``group.field`` otherwise."""
    import dataclasses

    for f in dataclasses.fields(cfg):
        if f.type in ("bool", bool) and not isinstance(getattr(cfg, f.name), bool):
            raise ConfigError(f"{group}.{f.name} must be true or false, got {getattr(cfg, f.name)!r}")


def config_from_dict(cls: type, data: dict | None, group: str):
    """Build dataclass ``cls`` from a config mapping; unknown keys give one clear error."""
    import dataclasses

    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{group}: unknown option(s) {unknown}; known: {sorted(names)}")
    return cls(**data)
