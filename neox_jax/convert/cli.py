"""`convert`, `inspect` and `diff` commands (weight conversion issue)."""


def register(sub) -> None:
    """Add the conversion commands to the `neox-jax` parser."""
