"""The errors a user can fix: each message names what is wrong and what would be right. The CLI
prints them as one line and exits with code 2. A leaf module: everything may import it."""

from __future__ import annotations

__all__ = ["RecipeError"]


class RecipeError(ValueError):
    """A recipe key or value is wrong; the message names the key and what would be right."""
