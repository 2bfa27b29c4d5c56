"""The command-line layer the four scripts share.

Every script keeps its settings as UPPER_CASE constants in one block at the top, each with a type and a trailing comment
(the comment is what makes a constant a setting; internal constants have none):

    LEARNING_RATE: float = 1e-4  # peak learning rate
    MODEL_DIR: str | None = None  # model folder (default: download)
    LORA_TARGETS: cli.CommaSeparated = "q_proj,v_proj"  # projections given LoRA

`parse_settings` turns that block into argparse flags (`--learning-rate 1e-4`, help text included), so there is exactly one
override mechanism and the comments are the documentation. It returns the settings as one frozen object: a later step that
decides a value (the image size for the model, the memory plan) makes a new one with `dataclasses.replace`. The object
knows which flags were given on the command line (`given`), and which settings it may still choose for the machine
(`fitted`): those whose shipped value is wrapped in `fitted(...)` (`BATCH_SIZE: int = cli.fitted(16)`) and that the user
left alone; writing a plain value in its place, or giving the flag, makes a setting the user's. The type is checked against the value first, so an edit such
as `LEARNING_RATE = "1e-4"` or a stray trailing comma is taken as meant or refused in one line before anything loads.
A constant without a type still works (its value's type is the flag's). `require_at_least`, `require_positive` and
`require_range` check values up front. `run` gives every script the same behaviour on mistakes a user can make: one line on
stderr saying what is wrong and what to do, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import importlib.util
import io
import shlex
import sys
import tokenize
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path

# The type of a setting holding several names in one string, e.g. "q_proj,v_proj": a flag takes it that way, and a
# constant written as a list of names (the tutorial's `LORA_TARGETS = ["q_proj", "v_proj"]`) is joined with commas.
CommaSeparated = typing.Annotated[str, "names separated by commas"]

INTERRUPTED = "interrupted; rerun the same command to continue where it stopped"

_EXPECTED = {bool: "True or False", int: "a whole number", float: "a number", str: "text in quotes"}
_EXAMPLE = {bool: "True", int: "2", float: "1e-4", str: '"text"'}
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


class UserError(Exception):
    """A mistake the user can fix (bad path, bad value, missing data). Printed as one line, without a traceback."""


class Setting(typing.NamedTuple):
    name: str  # LEARNING_RATE
    default: object  # the constant's value, checked against `kind`
    kind: type  # bool, int, float or str: what a flag's text is converted to
    help: str  # the constant's trailing comment
    fitted: bool = False  # shipped as fitted(value): the script may choose it for the machine unless the user sets it


class _Fitted(typing.NamedTuple):
    value: object


def fitted(value):
    """A setting's shipped value that the script may fit to the machine (train.py: the batch split to the GPU's memory).

    `BATCH_SIZE: int = cli.fitted(16)`: 16 unless the GPU needs less. A plain value written in its place (the user edited
    the constant) or the flag on the command line is the user's, and is kept as given.
    """
    return _Fitted(value)


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


def _declared_type(annotation, namespace: dict, where: str) -> tuple[type, bool, bool]:
    """(bool/int/float/str, None allowed, comma-separated) from a setting's annotation."""
    if isinstance(annotation, str):  # module-level annotations under `from __future__ import annotations`
        try:
            annotation = eval(annotation, namespace)  # the script's own names: cli.CommaSeparated
        except Exception as e:
            raise UserError(f"{where}'s type {annotation!r} cannot be read ({error_text(e)}).") from None
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = typing.get_args(annotation)
        optional = type(None) in args
        args = [a for a in args if a is not type(None)]
        annotation = args[0] if len(args) == 1 else None
    comma = annotation == CommaSeparated
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if annotation not in _EXPECTED:
        raise UserError(f"{where}'s type must be bool, int, float, str or cli.CommaSeparated (or one of them | None).")
    return annotation, optional, comma


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:76] + " ..."


def _coerce(value, kind: type, optional: bool, comma: bool):
    """`value` as a `kind`, where the intent is plain ("1e-4" for a float, "false" for a bool); raises ValueError if not."""
    if value is None and optional:
        return None
    if comma and isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return ",".join(v.strip() for v in value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                number = float(value)  # "2.0" is 2; "2.5" and "two" raise
                if number.is_integer():
                    return int(number)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            return float(value)
    elif isinstance(value, str):
        return value
    raise ValueError(value)


def _checked(script: str, name: str, value, kind: type, optional: bool, comma: bool):
    """The constant's value as its declared type, or a UserError naming the constant, the value and what is expected."""
    try:
        return _coerce(value, kind, optional, comma)
    except ValueError:
        pass
    expected = "names separated by commas in quotes" if comma else _EXPECTED[kind]
    what = "None" if value is None else "text" if isinstance(value, str) else _a(type(value).__name__)
    example = _EXAMPLE[kind]
    if isinstance(value, tuple) and len(value) == 1:
        what = "a tuple (a stray trailing comma?)"
        try:
            element = _coerce(value[0], kind, optional, comma)
            example = repr(element)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and kind is str:
        example = f'"{value}"'
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value) and kind is str:
        example = '"' + ",".join(value) + '"' if comma else example
    raise UserError(f"{script}: {name} = {_shown(value)} is {what}; write {expected}, e.g. {name} = {example}")


def _untyped(script: str, name: str, value) -> type | None:
    """The type of a setting written without one, from its value; None for a value that is not a setting (a dict)."""
    if isinstance(value, (bool, int, float, str)):
        return type(value)
    if value is None:
        return str
    if isinstance(
        value, (list, tuple)
    ):  # the tutorial's list of names, or a stray trailing comma: a flag must not vanish
        if isinstance(value, tuple) and len(value) == 1 and isinstance(value[0], (bool, int, float, str)):
            raise UserError(
                f"{script}: {name} = {_shown(value)} is a tuple (a stray trailing comma?); write {name} = {value[0]!r}"
            )
        example = '"' + ",".join(value) + '"' if all(isinstance(v, str) for v in value) else '"a,b"'
        raise UserError(
            f"{script}: {name} = {_shown(value)} is {_a(type(value).__name__)}; a setting holds one value: "
            f"write names separated by commas, e.g. {name} = {example}"
        )
    return None


def settings(namespace: dict) -> list[Setting]:
    """A script's settings in the order they were written, each value checked against its type (see the module doc).

    Values given in an obvious other form ("1e-4" for a float, a list of names for cli.CommaSeparated) are converted, in
    `namespace` too; anything else is a UserError naming the constant, its value and what to write instead.
    """
    source_file = namespace.get("__file__")
    comments = _setting_comments(Path(source_file).read_text()) if source_file else {}
    script = Path(source_file).name if source_file else "the script"
    annotations = namespace.get("__annotations__", {})
    found = []
    for name, help_text in comments.items():
        if name.startswith("_") or name not in namespace:
            continue
        value = namespace[name]
        is_fitted = isinstance(value, _Fitted)
        value = value.value if is_fitted else value
        if name in annotations:
            kind, optional, comma = _declared_type(annotations[name], namespace, f"{script}: {name}")
            value = _checked(script, name, value, kind, optional, comma)
            if not is_fitted:  # the value as its type, in the script too (a fitted value stays marked as shipped)
                namespace[name] = value
        else:
            kind = _untyped(script, name, value)
            if kind is None:
                continue
        found.append(Setting(name, value, kind, help_text, is_fitted))
    return found


def settings_of(namespace: dict) -> dict[str, object]:
    """The settings of a script, in the order they were written: its UPPER_CASE constants that carry a trailing comment.

    The comment is what makes a constant a setting (it is the flag's help); constants without one stay internal.
    """
    return {s.name: s.default for s in settings(namespace)}


def flag_of(name: str) -> str:
    """A setting's flag: LEARNING_RATE or learning_rate -> --learning-rate."""
    return "--" + name.lower().replace("_", "-")


def setting_names(name: str) -> str:
    """Both ways a setting is set, for a message: learning_rate -> "LEARNING_RATE / --learning-rate"."""
    return f"{name.upper()} / {flag_of(name)}"


def _with_default(setting: Setting) -> str:
    """A flag's help: the constant's comment, and its default unless the comment says what the default is."""
    if "default" in setting.help:
        return setting.help
    return f"{setting.help} (default: {setting.default})".replace("%", "%%")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are one line, not the whole usage."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings if s.startswith("--")]


def _with_hyphens(argv: list[str], flags: list[str]) -> list[str]:
    """--learning_rate (as Hugging Face scripts spell flags) -> --learning-rate, where that is a flag."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if name.startswith("--") and "_" in name and "--" + name[2:].replace("_", "-") in flags:
            out[i] = "--" + name[2:].replace("_", "-") + eq + value
    return out


def _unknown(extras: list[str], flags: list[str]) -> str:
    """One line for the first argument no flag took, with the closest flag when one is close."""
    arg = next((a for a in extras if a.startswith("-")), extras[0])
    word = arg.partition("=")[0] if arg.startswith("-") else arg
    typed = word.lstrip("-").replace("_", "-").lower()
    names = {f.lstrip("-"): f for f in flags}  # compared without the dashes every flag shares
    close = [f for n, f in names.items() if n.startswith(typed)] or [
        names[n] for n in difflib.get_close_matches(typed, names, n=1, cutoff=0.7)
    ]
    what = f"unknown flag {word}" if arg.startswith("-") else f"unexpected argument {arg!r}"
    if len(close) == 1:
        return f"{what}; did you mean {close[0]}?"
    if close:
        return f"{what}; did you mean one of {', '.join(close[:4])}?"
    return f"{what}; --help lists the flags"


def parse_settings(
    namespace: dict,
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    prog: str | None = None,
    suggest: Iterable[str] = (),
):
    """Parse `argv` into the script's settings: each setting (see `settings`) is a `--lower-case` flag.

    Returns a frozen object with lower_case attributes holding the defaults, overridden by the command line, plus
    `given` (the names whose flag was on the command line) and `fitted` (the settings shipped as fitted(...) that the
    user left alone: the script may choose them). Flags may be spelt with underscores (--learning_rate) but not
    abbreviated; an unknown flag is one line naming the closest one (among the settings and `suggest`, flags the caller
    handles itself), exit status 2.
    """
    doc = (namespace.get("__doc__") or "").strip()
    parser = _Parser(prog=prog, description=doc.split("\n\n")[0] if doc else None, allow_abbrev=False)
    known = settings(namespace)
    for s in known:
        flag, suppressed = flag_of(s.name), argparse.SUPPRESS  # absent from the result unless given: `given` is exact
        if s.kind is bool and s.name.startswith("NO_"):  # --no-adapter, not --no-adapter/--no-no-adapter
            parser.add_argument(flag, action="store_true", default=suppressed, help=_with_default(s))
        elif s.kind is bool:
            parser.add_argument(flag, default=suppressed, action=argparse.BooleanOptionalAction, help=_with_default(s))
        else:
            parser.add_argument(flag, default=suppressed, type=s.kind, metavar=s.name, help=_with_default(s))
    if add_arguments:
        add_arguments(parser)
    flags = _flags(parser)
    argv = _with_hyphens(sys.argv[1:] if argv is None else argv, flags)
    parsed, extras = parser.parse_known_args(argv)
    if extras:
        parser.error(_unknown(extras, flags + list(suggest)))
    names = {s.name.lower() for s in known}
    given = frozenset(n for n in vars(parsed) if n in names)
    values = {**{s.name.lower(): s.default for s in known}, **vars(parsed)}
    fitted_names = frozenset(s.name.lower() for s in known if s.fitted) - given
    return _settings_class(tuple(values))(**values, given=given, fitted=fitted_names)


@functools.cache
def _settings_class(names: tuple[str, ...]) -> type:
    """A frozen dataclass of these settings, plus `given` and `fitted` (see parse_settings)."""
    fields = [(n, object) for n in names]
    fields += [(n, frozenset, dataclasses.field(default=frozenset())) for n in _RECORDS]
    return dataclasses.make_dataclass("Settings", fields, frozen=True)


def values(settings) -> dict:
    """The settings' values by name, without `given` and `fitted`: what a run saves beside its results."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name not in _RECORDS}


_RECORDS = ("given", "fitted")


def check_arguments(script: str | Path, argv: list[str], prog: str | None = None, suggest: Iterable[str] = ()) -> None:
    """Parse and check `argv` as `script` would, without running it: a one-line error for a mistake, else nothing.

    For a script whose arguments are all settings. It imports the script (not as __main__, so its main() does not run):
    its imports at the top must stay cheap. A script with a `read_settings(argv)` (train.py) has its values checked by
    it as well. run.sh checks train.py's arguments this way before any download.
    """
    path = Path(script)
    spec = importlib.util.spec_from_file_location(f"_checked_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a script's dataclasses look their module up there
    spec.loader.exec_module(module)
    parse_settings(vars(module), list(argv), prog=prog or path.name, suggest=suggest)
    if callable(getattr(module, "read_settings", None)):
        module.read_settings(list(argv))


def _bounds_text(above, at_least, below, at_most) -> str:
    parts = [
        f"{word} {bound:g}"
        for word, bound in [("greater than", above), ("at least", at_least), ("below", below), ("at most", at_most)]
        if bound is not None
    ]
    return " and ".join(parts)


def require_range(
    args,
    names: Iterable[str],
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
) -> None:
    """One line for the first of `names` outside the bounds (None, an optional setting left unset, passes).

    require_range(args, ["lora_dropout"], at_least=0, below=1)
    -> "LORA_DROPOUT / --lora-dropout must be at least 0 and below 1, not 1.5." (the constant, or the flag, was wrong)
    NaN is outside every bound.
    """
    for name in names:
        value = getattr(args, name)
        if value is None:
            continue
        inside = (
            (above is None or value > above)
            and (at_least is None or value >= at_least)
            and (below is None or value < below)
            and (at_most is None or value <= at_most)
        )
        if not inside:
            raise UserError(
                f"{setting_names(name)} must be {_bounds_text(above, at_least, below, at_most)}, not {value}."
            )


def require_positive(args, names: Iterable[str]) -> None:
    """One line for the first of `names` not above 0: ["learning_rate"] -> "LEARNING_RATE / --learning-rate must be
    greater than 0, not -1.0"."""
    require_range(args, names, above=0)


def require_at_least(args, minimums: dict[str, float]) -> None:
    """One line for the first setting below its minimum, e.g. {"batch_size": 1} -> "--batch-size must be at least 1"."""
    for name, low in minimums.items():
        require_range(args, [name], at_least=low)


def error_text(error: BaseException, limit: int = 200) -> str:
    """An exception as one line for a message: its type and text, whitespace folded, at most `limit` characters."""
    return " ".join(f"{type(error).__name__}: {error}".split())[:limit]


def rerun_command(*extra: str) -> str:
    """The command that started this process, as a shell line, with `extra` flags added where missing.

    For a Ctrl-C message: rerun_command("--resume") -> "python train.py --epochs 1 --resume".
    """
    argv = list(getattr(sys, "orig_argv", None) or [Path(sys.executable).name, *sys.argv])
    return shlex.join(argv + [e for e in extra if e not in argv])


def run(
    main: Callable[[], object], interrupted: str | Callable[[], str] = INTERRUPTED, skip_teardown: bool = False
) -> None:
    """Run a script's main(); a UserError becomes one line on stderr and exit status 2, Ctrl-C exit status 130.

    `interrupted` is what Ctrl-C prints: the default suits a script that picks up where it stopped when rerun as it was;
    a script that needs something else passes its own line, or a function making it, e.g. for train.py
    `lambda: "interrupted; continue from the last checkpoint with: " + cli.rerun_command("--resume")`.
    `skip_teardown`: once main has returned (all its work done and written), leave without the interpreter freeing
    every object one by one (1.5-2 s of CPU after a training run with torch and transformers loaded); the atexit
    handlers still run and the output is flushed.
    """
    try:
        status = main() or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print(interrupted() if callable(interrupted) else interrupted, file=sys.stderr)
        status = 130
    if skip_teardown:
        _leave_now(status)
    sys.exit(status)


def _leave_now(status: int) -> None:
    """Exit with `status` as sys.exit would, less the interpreter's teardown."""
    import atexit
    import os

    atexit._run_exitfuncs()  # what the interpreter would run on its way out (SwanLab, multiprocessing, logging)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)
