"""Cairn: add knowledge to an LLM contribution by contribution, and measure what it keeps.

The Python API, one function per command (`cairn.run`, `cairn.sweep`, `cairn.tune`, `cairn.frontier`, `cairn.report`, `cairn.train`,
`cairn.evaluate`, `cairn.generate`, `cairn.merge`, `cairn.mix`, `cairn.store_add` / `store_list` /
`store_show` / `store_verify`, `cairn.packs`, `cairn.inspect`), lives in `cairn.api`; it is imported
on first use, so `import cairn` stays light.
"""

API = ("run", "check", "sweep", "tune", "frontier", "report", "train", "evaluate", "generate", "merge", "mix", "store_add", "store_list", "store_show", "store_verify", "packs", "inspect")


def __getattr__(name: str):
    if name in API:
        from cairn import api

        return getattr(api, name)
    raise AttributeError(f"module 'cairn' has no attribute {name!r}")
