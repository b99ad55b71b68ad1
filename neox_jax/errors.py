"""Every error the CLI reports as one line (no traceback) and exit status 2.

They live here, not beside the code that raises them, so that a module can raise one without
importing jax, flax or orbax (the converters raise CheckpointError from pure NumPy code)."""


class Terminated(BaseException):
    """Raised by the CLI's SIGTERM handler (a BaseException, like KeyboardInterrupt: never caught as an
    error, always let through, so every writer's cleanup runs and the command exits 143)."""


class UserError(ValueError):
    """Bad input from the user: a file, key, tensor or value we cannot accept (the message names it)."""


class UsageError(UserError):
    """A command line argparse cannot parse (unknown option, missing argument, bad value): `cli.Parser`
    raises it, with the command's name, instead of printing a usage block and exiting."""


class ConfigError(UserError):
    """A configuration value or key that we cannot honour (the message names it)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read or written (the message names the file or tensor)."""


class VerifyError(CheckpointError):
    """`convert --verify` found logits outside the tolerance."""


class TrainingError(UserError):
    """The run cannot continue (non-finite loss, incompatible --init-from checkpoint, ...)."""


# ----------------------------------------------------------------------------- foreign errors, one line
# Orbax, TensorStore, zstandard, the Rust tokenizers, torch's unpickler and the OS raise many types with
# multi-line messages (TensorStore's carry a JSON spec).  `reading(path)` turns any of them into one
# UserError line that names the file.

import contextlib as _contextlib
import re as _re

_SPEC = _re.compile(r"\s*(\{.*|\[source locations.*)$")  # a JSON spec / source-location list to the end
# TensorStore's 'Error reading "layers.x.kernel/0.0.0" in OCDBT database at local file "/long/path/": why'
_TS_READ = _re.compile(r'Error reading "([^"/]+)/[^"]*" in \w+ database at [^"]*"[^"]*":\s*')


def one_line(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message` without JSON specs, at most `limit` characters."""
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror
    else:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        text = lines[0] if lines else ""
        text = _SPEC.sub("", text) or text[:limit]
        text = _TS_READ.sub(lambda m: f"tensor {m.group(1)}: ", text)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__


@_contextlib.contextmanager
def reading(path, what: str = "cannot read"):
    """Re-raise any exception inside the block (a UserError passes unchanged) as
    `UserError("{path}: {what} ({one_line(e)})")`; KeyboardInterrupt, SIGTERM's Terminated and SystemExit pass."""
    try:
        yield
    except UserError:
        raise
    except (KeyboardInterrupt, Terminated, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001 - pyo3 panics derive from BaseException
        err = UserError(f"{path}: {what} ({one_line(e)})")
        err.__cause__ = e
        raise err from e
