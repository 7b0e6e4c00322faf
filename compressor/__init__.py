"""compressor: compress LLMs, export them, and check every artifact in its own runtime."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "Recipe", "run"]


def __getattr__(name: str):
    # Lazy: `compress validate` and recipe checks must not pay for importing torch and transformers.
    if name == "Recipe":
        from .recipe import Recipe

        return Recipe
    if name == "run":
        from .run import run

        return run
    raise AttributeError(name)
