"""The one settings mechanism: UPPER_CASE constants with a comment become --lower-case flags."""

from __future__ import annotations

import pytest

from vlcap import cli

SCRIPT = '''"""A script."""
LEARNING_RATE = 1e-4  # peak learning rate
EPOCHS = 2  # passes over the data
NAME = "run"  # experiment name
MODEL_DIR: str | None = None  # model folder (default: download)
FAST = True  # use the fast path
NO_ADAPTER = False  # base model alone
TABLE = {"a": 1}  # not a simple value: not a flag
INTERNAL = 3
_HIDDEN = 4  # private
'''


@pytest.fixture
def namespace(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    ns = {"__file__": str(path)}
    exec(compile(SCRIPT, str(path), "exec"), ns)
    return ns


def test_constants_with_comments_become_typed_flags(namespace):
    args = cli.parse_settings(namespace, ["--learning-rate", "3e-3", "--epochs", "5", "--model-dir", "m", "--no-fast",
                                          "--no-adapter"])  # fmt: skip
    assert args.learning_rate == 3e-3 and args.epochs == 5 and args.model_dir == "m"
    assert args.fast is False and args.no_adapter is True and args.name == "run"
    assert set(vars(args)) == {"learning_rate", "epochs", "name", "model_dir", "fast", "no_adapter"}


def test_defaults_and_help_come_from_the_block(namespace, capsys):
    args = cli.parse_settings(namespace, [])
    assert (args.learning_rate, args.epochs, args.model_dir, args.fast, args.no_adapter) == (1e-4, 2, None, True, False)
    with pytest.raises(SystemExit):
        cli.parse_settings(namespace, ["--help"])
    out = capsys.readouterr().out
    assert "peak learning rate (default: 0.0001)" in out and "model folder (default: download)" in out
    assert "--internal" not in out and "--table" not in out and "--no-no-adapter" not in out


def test_wrong_type_is_a_usage_error(namespace, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_settings(namespace, ["--epochs", "two"])
    assert e.value.code == 2 and "invalid int value" in capsys.readouterr().err


def test_run_turns_user_errors_into_one_line(capsys):
    def main():
        raise cli.UserError("the data JSON is missing; run csv2json.py first.")

    with pytest.raises(SystemExit) as e:
        cli.run(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: the data JSON is missing; run csv2json.py first.\n"
