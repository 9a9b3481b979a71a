"""The command line every palora script shares: a parser generated from the script's config
dataclass, so defaults live once; flags checked before any work starts; expected errors printed as
one line.

    error: <file>:<line>: <problem>        (or "error: --flag: <problem>" for a bad flag), exit
    status 2

An expected error is bad input: a data file, a checkpoint, a setting, a run folder. Its exception
class says so with `expected = True` (tasks.DataError, checkpoints.CheckpointError,
palora.PaloraError, ConfigError), so that palora.py needs no import from here; FileNotFoundError
counts too, and so does any OSError naming a path (`error: <path>: <reason>`: permission denied,
a folder where a file goes). Anything else is a bug and keeps its traceback.
"""

import argparse
import dataclasses
import math
import sys
from pathlib import Path


class ConfigError(ValueError):
    """A bad flag, combination of flags or run folder; the message names the flag or the file."""

    expected = True


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: <problem>`, exit 2, no usage block."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


BOUNDS = {
    "gt": (lambda v, b: v > b, ">"),
    "ge": (lambda v, b: v >= b, ">="),
    "lt": (lambda v, b: v < b, "<"),
    "le": (lambda v, b: v <= b, "<="),
}


# the ceiling of an int flag with no upper bound of its own: counts, sizes and seeds all fit in it,
# and a seed times a million still fits the int64 a torch generator takes
INT_MAX = 2**31 - 1


def check_numbers(cfg):
    """Every float finite; every int at most INT_MAX unless its field bounds it; every bound in a
    field's metadata (gt, ge, lt, le) held. Raises ConfigError."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag}: must be a finite number, got {value}")
        bounded = "le" in f.metadata or "lt" in f.metadata
        if type(value) is int and not bounded and value > INT_MAX:
            raise ConfigError(f"{flag}: must be <= {INT_MAX}, got {value}")
        for key, (holds, sign) in BOUNDS.items():
            if key in f.metadata and not holds(value, f.metadata[key]):
                raise ConfigError(f"{flag}: must be {sign} {f.metadata[key]}, got {value}")


def nearest_existing(path: Path) -> Path:
    """path itself, or its nearest ancestor that exists (the root at worst): what a folder not yet
    made will be made in."""
    return next(p for p in [path, *path.parents] if p.exists() or p == Path(p.anchor))


def check_folder(path: str, flag: str):
    """A folder flag ('' for none) that names a file, or lies under one, is refused before any work:
    the folder is made when first written, by then the model would have loaded."""
    existing = nearest_existing(Path(path or "."))
    if path and not existing.is_dir():
        raise ConfigError(f"{flag} {path}: {existing} is not a folder")


def parse_config(cls, argv=None, description=None):
    """Build a parser from the dataclass `cls` (help from field metadata) and parse argv into a
    checked `cls`.

    Unknown and abbreviated flags are errors. Booleans are `--flag` / `--no-flag`; list fields take
    the flag several times (`--svf a --svf b`). Numbers are checked by check_numbers.
    """
    parser = Parser(
        description=description,
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    types = {"int": int, "float": float, "str": str, "bool": bool, "list": list}
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help strings
        kind = types[f.type if isinstance(f.type, str) else f.type.__name__]
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
        elif kind is list:
            parser.add_argument(
                flag, action="append", default=None, help=help_text + " (repeatable)"
            )
        else:
            parser.add_argument(
                flag,
                type=kind,
                default=f.default,
                choices=f.metadata.get("choices"),
                help=help_text,
            )
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(
        cls
    ):  # repeatable flags not given fall back to the field's default list
        if values[f.name] is None and f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    cfg = cls(**values)
    try:
        check_numbers(cfg)
    except ConfigError as e:
        parser.error(str(e))
    return cfg


def one_line(e: BaseException) -> str:
    """The first problem of an error message, with a count of the others (DataError collects
    several)."""
    lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    more = len(lines) - 1
    return lines[0] + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def os_refusal(e: BaseException) -> str | None:
    """`<path>: <reason>` when the system refused a path the user named (permission denied, a
    folder where a file goes, a file where a folder goes, a name too long), else None."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename2 or e.filename}: {e.strerror}"  # a rename: its target
    return None


def run(main, *args):
    """main(*args); an expected error, or the system's refusal of a path, becomes
    `error: <message>` on stderr and exit status 2."""
    try:
        return main(*args)
    except Exception as e:
        message = os_refusal(e)
        expected = getattr(e, "expected", False) or isinstance(e, FileNotFoundError)
        if message is None and not expected:
            raise
        print(f"error: {message or one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
