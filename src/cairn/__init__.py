"""Cairn: add knowledge to an LLM contribution by contribution, and measure what it keeps.

The Python API (`cairn.run`, `cairn.sweep`, `cairn.train`, `cairn.evaluate`, `cairn.merge`, `cairn.mix`) lives in
`cairn.api`; it is imported on first use, so `import cairn` stays light.
"""

API = ("run", "sweep", "train", "evaluate", "merge", "mix")


def __getattr__(name: str):
    if name in API:
        from cairn import api

        return getattr(api, name)
    raise AttributeError(f"module 'cairn' has no attribute {name!r}")
