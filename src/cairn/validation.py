"""Strict pydantic models whose errors name the bad key and what is allowed."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, model_validator

from cairn.errors import ConfigError

# Validation context of options read back from where Cairn saved them (a manifest's model_dump):
# `Options.model_validate(data, context=SAVED)` takes them as written, unchecked against each other.
SAVED = {"saved": True}


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

    @classmethod
    def parse(cls, where: str, /, **values):
        """`cls(**values)`, every problem raised as one ConfigError (exit code 4) that names each
        key under `where`: how the Python API builds options from its keywords."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise config_error(exc, where) from None


def given(model: BaseModel, info: ValidationInfo | None = None) -> list[str]:
    """The keys (aliases where a field has one) of the fields the user set on `model`, in field
    order, for checks of what applies: a default never counts. Options read back from a dump count
    as they were written: under the `SAVED` context none count, and a complete set of fields (what
    `model_dump()` writes, defaults included) counts only its values that differ from the defaults."""
    if info is not None and (info.context or {}).get("saved"):
        return []
    fields = type(model).model_fields
    set_ = model.model_fields_set
    if set_ >= set(fields):
        set_ = {name for name, f in fields.items() if getattr(model, name) != f.get_default(call_default_factory=True)}
    return [f.alias or name for name, f in fields.items() if name in set_]


def config_error(exc: ValidationError, where: str) -> ConfigError:
    """One ConfigError listing every problem as `where: key.path: message` (`where: message` for a
    problem of the section as a whole)."""
    lines = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)
    return ConfigError(f"{where}: " + "; ".join(lines))
