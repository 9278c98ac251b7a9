"""Strict pydantic models whose errors name the bad key and what is allowed."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from cairn.errors import ConfigError


class Strict(BaseModel):
    """A config section: unknown keys are errors that list the allowed ones."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data):
        if isinstance(data, dict):
            names = [f.alias or name for name, f in cls.model_fields.items()]
            unknown = [k for k in data if k not in names and k not in cls.model_fields]
            if unknown:
                raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(names)}")
        return data


def config_error(exc: ValidationError, where: str) -> ConfigError:
    """One ConfigError listing every problem as `where: key.path: message`."""
    lines = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}")
    return ConfigError(f"{where}: " + "; ".join(lines))
