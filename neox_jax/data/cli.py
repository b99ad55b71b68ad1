"""`data` command group (data issue)."""


def register(sub) -> None:
    """Add the `data` commands to the `neox-jax` parser."""
