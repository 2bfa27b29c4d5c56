"""The command-line layer the four scripts share.

Every script keeps its settings as UPPER_CASE constants in one block at the top, each with a trailing comment (the comment
is what makes a constant a setting; internal constants have none). `parse_settings` turns that block into argparse flags (`LEARNING_RATE = 1e-4  # peak learning rate` becomes `--learning-rate 1e-4`, help text
included), so there is exactly one override mechanism and the comments are the documentation. `run` gives every script the
same behaviour on mistakes a user can make: one line on stderr saying what is wrong and what to do, never a traceback.
"""

from __future__ import annotations

import argparse
import io
import sys
import tokenize
import types
import typing
from collections.abc import Callable
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix (bad path, bad value, missing data). Printed as one line, without a traceback."""


def _setting_comments(source: str) -> dict[str, str]:
    """Trailing comments of the module-level `NAME = value  # comment` lines, keyed by NAME."""
    comments, line_name = {}, None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 0:
            line_name = tok.string if tok.string.isupper() else None
        elif tok.type == tokenize.COMMENT and line_name and tok.start[1] > 0:
            text = tok.string.lstrip("#").strip()
            if not text.startswith(("fmt:", "noqa", "type:")):  # tool pragmas are not help texts
                comments[line_name] = text
        elif tok.type == tokenize.NEWLINE:
            line_name = None
    return comments


def _value_type(default, annotation):
    """The type a flag's string is converted to: from the annotation when there is one, else from the default."""
    if annotation is not None:
        if isinstance(annotation, str):
            annotation = eval(annotation, {"typing": typing})  # module-level annotations under `from __future__`
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
            annotation = args[0]
        return annotation
    return type(default) if default is not None else str


def _settings_with_help(namespace: dict) -> dict[str, tuple[object, str]]:
    """{NAME: (default, help text)} for a script's settings, in the order they were written (see settings_of)."""
    source_file = namespace.get("__file__")
    comments = _setting_comments(Path(source_file).read_text()) if source_file else {}
    simple = (bool, int, float, str, type(None))
    return {
        k: (namespace[k], help_text)
        for k, help_text in comments.items()
        if not k.startswith("_") and isinstance(namespace.get(k, ...), simple)
    }


def settings_of(namespace: dict) -> dict[str, object]:
    """The settings of a script, in the order they were written: its UPPER_CASE constants that carry a trailing comment.

    The comment is what makes a constant a setting (it is the flag's help); constants without one stay internal.
    """
    return {k: default for k, (default, _) in _settings_with_help(namespace).items()}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help already says what the default is."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


def parse_settings(
    namespace: dict,
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """Parse `argv` into the script's settings: each setting (see settings_of) is a `--lower-case` flag.

    Returns a namespace with lower_case attributes holding the defaults, overridden by the command line.
    """
    doc = (namespace.get("__doc__") or "").strip()
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None, formatter_class=_HelpFormatter)
    annotations = namespace.get("__annotations__", {})
    for name, (default, help_text) in _settings_with_help(namespace).items():
        flag = "--" + name.lower().replace("_", "-")
        if isinstance(default, bool) and name.startswith("NO_"):  # --no-adapter, not --no-adapter/--no-no-adapter
            parser.add_argument(flag, action="store_true", default=default, help=help_text)
        elif isinstance(default, bool):
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(
                flag, default=default, type=_value_type(default, annotations.get(name)), metavar=name, help=help_text
            )
    if add_arguments:
        add_arguments(parser)
    return parser.parse_args(argv)


def require_at_least(args: argparse.Namespace, minimums: dict[str, int]) -> None:
    """One line for the first setting below its minimum, e.g. {"batch_size": 1} -> "--batch-size must be at least 1"."""
    for name, low in minimums.items():
        value = getattr(args, name)
        if value < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}, not {value}.")


def error_text(error: BaseException, limit: int = 200) -> str:
    """An exception as one line for a message: its type and text, whitespace folded, at most `limit` characters."""
    return " ".join(f"{type(error).__name__}: {error}".split())[:limit]


def run(main: Callable[[], object]) -> None:
    """Run a script's main(); a UserError becomes one line on stderr and exit status 2, Ctrl-C exit status 130."""
    try:
        status = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)
