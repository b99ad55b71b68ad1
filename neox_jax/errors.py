"""Every error the CLI reports as one line (no traceback) and exit status 2.

They live here, not beside the code that raises them, so that a module can raise one without
importing jax, flax or orbax (the converters raise CheckpointError from pure NumPy code)."""


class UserError(ValueError):
    """Bad input from the user: a file, key, tensor or value we cannot accept (the message names it)."""


class ConfigError(UserError):
    """A configuration value or key that we cannot honour (the message names it)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read or written (the message names the file or tensor)."""


class VerifyError(CheckpointError):
    """`convert --verify` found logits outside the tolerance."""


class TrainingError(UserError):
    """The run cannot continue (non-finite loss, incompatible --init-from checkpoint, ...)."""
