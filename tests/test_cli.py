"""The one settings mechanism: UPPER_CASE constants with a comment become --lower-case flags."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys

import pytest

from vlcap import cli

from helpers import REPO

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

# The same kind of block written the way the scripts are: every setting with its type.
TYPED = '''"""A typed script."""
from vlcap import cli

LEARNING_RATE: float = 1e-4  # peak learning rate
EPOCHS: int = 2  # passes over the data
LORA_TARGETS: cli.CommaSeparated = "q_proj,v_proj"  # projections given LoRA
FAST: bool = True  # use the fast path
MODEL_DIR: str | None = None  # model folder (default: download)
IMAGE_SIZE: int | None = None  # side in pixels (default: the adapter's)
'''


def namespace_of(tmp_path, source: str, name: str = "script.py") -> dict:
    path = tmp_path / name
    path.write_text(source)
    ns = {"__file__": str(path)}
    exec(compile(source, str(path), "exec"), ns)
    return ns


@pytest.fixture
def namespace(tmp_path):
    return namespace_of(tmp_path, SCRIPT)


def typed_with(tmp_path, old: str, new: str) -> dict:
    assert old in TYPED
    return namespace_of(tmp_path, TYPED.replace(old, new))


def test_constants_with_comments_become_typed_flags(namespace):
    args = cli.parse_settings(
        namespace, ["--learning-rate", "3e-3", "--epochs", "5", "--model-dir", "m", "--no-fast", "--no-adapter"]
    )
    assert args.learning_rate == 3e-3 and args.epochs == 5 and args.model_dir == "m"
    assert args.fast is False and args.no_adapter is True and args.name == "run"
    assert set(cli.values(args)) == {"learning_rate", "epochs", "name", "model_dir", "fast", "no_adapter"}
    assert args.given == {"learning_rate", "epochs", "model_dir", "fast", "no_adapter"}  # "name" was left alone
    with pytest.raises(dataclasses.FrozenInstanceError):  # resolved once: a later step makes a new object
        args.epochs = 3


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


# ------------------------------------------------------------------------------------------------- types of the settings
def test_the_annotation_gives_the_flag_its_type(tmp_path):
    ns = typed_with(tmp_path, "LEARNING_RATE: float = 1e-4", 'LEARNING_RATE: float = "1e-4"')
    args = cli.parse_settings(ns, ["--learning-rate", "2e-4", "--lora-targets", "q_proj", "--image-size", "56"])
    assert args.learning_rate == 2e-4 and args.lora_targets == "q_proj" and args.image_size == 56
    assert cli.parse_settings(ns, []).learning_rate == 1e-4


@pytest.mark.parametrize(
    ("old", "new", "name", "value"),
    [
        ("LEARNING_RATE: float = 1e-4", 'LEARNING_RATE: float = "1e-4"', "LEARNING_RATE", 1e-4),
        ("LEARNING_RATE: float = 1e-4", "LEARNING_RATE: float = 1", "LEARNING_RATE", 1.0),
        ("EPOCHS: int = 2", 'EPOCHS: int = "2"', "EPOCHS", 2),
        ("EPOCHS: int = 2", "EPOCHS: int = 2.0", "EPOCHS", 2),
        (
            'LORA_TARGETS: cli.CommaSeparated = "q_proj,v_proj"',
            'LORA_TARGETS: cli.CommaSeparated = ["q_proj", "v_proj"]',
            "LORA_TARGETS",
            "q_proj,v_proj",
        ),
        (
            'LORA_TARGETS: cli.CommaSeparated = "q_proj,v_proj"',
            'LORA_TARGETS: cli.CommaSeparated = ("q_proj",)',
            "LORA_TARGETS",
            "q_proj",
        ),
        ("FAST: bool = True", 'FAST: bool = "False"', "FAST", False),
        ("FAST: bool = True", 'FAST: bool = "true"', "FAST", True),
        ("FAST: bool = True", "FAST: bool = 0", "FAST", False),
    ],
)
def test_a_value_in_an_obvious_other_form_is_taken_as_meant(tmp_path, old, new, name, value):
    ns = typed_with(tmp_path, old, new)
    args = cli.parse_settings(ns, [])
    got = getattr(args, name.lower())
    assert got == value and type(got) is type(value)
    assert ns[name] == value and type(ns[name]) is type(value), "the constant itself holds the converted value"


def test_a_list_of_names_keeps_its_flag(tmp_path, capsys):
    ns = typed_with(tmp_path, '"q_proj,v_proj"  #', '["q_proj", "k_proj", "v_proj"]  #')
    with pytest.raises(SystemExit):
        cli.parse_settings(ns, ["--help"])
    assert "--lora-targets" in capsys.readouterr().out
    assert cli.parse_settings(ns, ["--lora-targets", "o_proj"]).lora_targets == "o_proj"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "LEARNING_RATE: float = 1e-4",
            "LEARNING_RATE: float = 1e-4,",
            "script.py: LEARNING_RATE = (0.0001,) is a tuple (a stray trailing comma?); write a number, "
            "e.g. LEARNING_RATE = 0.0001",
        ),
        (
            "LEARNING_RATE: float = 1e-4",
            'LEARNING_RATE: float = "fast"',
            "script.py: LEARNING_RATE = 'fast' is text; write a number, e.g. LEARNING_RATE = 1e-4",
        ),
        (
            "EPOCHS: int = 2",
            "EPOCHS: int = 2.5",
            "script.py: EPOCHS = 2.5 is a float; write a whole number, e.g. EPOCHS = 2",
        ),
        ("EPOCHS: int = 2", 'EPOCHS: int = "two"', "script.py: EPOCHS = 'two' is text; write a whole number"),
        ("EPOCHS: int = 2", "EPOCHS: int = True", "script.py: EPOCHS = True is a bool; write a whole number"),
        ("EPOCHS: int = 2", "EPOCHS: int = None", "script.py: EPOCHS = None is None; write a whole number"),
        ("FAST: bool = True", 'FAST: bool = "maybe"', "script.py: FAST = 'maybe' is text; write True or False"),
        (
            "MODEL_DIR: str | None = None",
            "MODEL_DIR: str | None = 5",
            'script.py: MODEL_DIR = 5 is an int; write text in quotes, e.g. MODEL_DIR = "5"',
        ),
        (
            'LORA_TARGETS: cli.CommaSeparated = "q_proj,v_proj"',
            "LORA_TARGETS: cli.CommaSeparated = [1, 2]",
            "script.py: LORA_TARGETS = [1, 2] is a list; write names separated by commas in quotes",
        ),
    ],
)
def test_a_value_of_the_wrong_type_is_one_line_naming_it(tmp_path, old, new, message):
    ns = typed_with(tmp_path, old, new)
    with pytest.raises(cli.UserError) as e:
        cli.parse_settings(ns, [])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            'LORA_TARGETS = ["q_proj", "v_proj"]  # projections given LoRA',
            "script.py: LORA_TARGETS = ['q_proj', 'v_proj'] is a list; a setting holds one value: write names separated "
            'by commas, e.g. LORA_TARGETS = "q_proj,v_proj"',
        ),
        (
            "LEARNING_RATE = 1e-4,  # peak learning rate",
            "script.py: LEARNING_RATE = (0.0001,) is a tuple (a stray trailing comma?); write LEARNING_RATE = 0.0001",
        ),
    ],
)
def test_an_untyped_setting_holding_several_values_is_refused(tmp_path, line, message):
    """A setting whose line was replaced whole (the tutorial's list style), type and all: its flag must not vanish."""
    ns = namespace_of(tmp_path, SCRIPT + line + "\n")
    with pytest.raises(cli.UserError) as e:
        cli.parse_settings(ns, [])
    assert str(e.value) == message


def test_a_type_cli_cannot_use_is_named(tmp_path):
    ns = typed_with(tmp_path, "EPOCHS: int = 2", "EPOCHS: list = 2")
    with pytest.raises(cli.UserError, match="script.py: EPOCHS's type must be bool, int, float, str"):
        cli.parse_settings(ns, [])


SCRIPTS = [
    "train.py",
    "infer.py",
    "csv2json.py",
    "data2csv.py",
    "tools/make_offline_model.py",
    "tools/make_coco_folder.py",
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_setting_of_the_scripts_declares_its_type(script):
    module = load(REPO / script)
    untyped = [s.name for s in cli.settings(vars(module)) if s.name not in module.__annotations__]
    assert not untyped, f"{script}: give {untyped} a type, e.g. `NAME: int = 2  # ...`"


def load(path):
    spec = importlib.util.spec_from_file_location(f"_copy_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def edited_train(tmp_path, old: str, new: str):
    source = (REPO / "train.py").read_text()
    assert old in source
    (tmp_path / "train.py").write_text(source.replace(old, new, 1))
    return tmp_path / "train.py"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "LEARNING_RATE: float = 1e-4",
            "LEARNING_RATE: float = 1e-4,",
            "error: train.py: LEARNING_RATE = (0.0001,) is a tuple (a stray trailing comma?); write a number",
        ),
        (
            "EPOCHS: int = 2",
            'EPOCHS: int = "2 epochs"',
            "error: train.py: EPOCHS = '2 epochs' is text; write a whole number",
        ),
        (
            "BATCH_SIZE: int = cli.fitted(16)",
            'BATCH_SIZE: int = "sixteen"',
            "error: train.py: BATCH_SIZE = 'sixteen' is text",
        ),
        (  # out of range: the line names the constant the user edited, and the flag
            "LEARNING_RATE: float = 1e-4",
            "LEARNING_RATE: float = -1e-4",
            "error: LEARNING_RATE / --learning-rate must be greater than 0, not -0.0001.",
        ),
        (
            'LORA_TARGETS: cli.CommaSeparated = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"',
            'LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]',
            "error: train.py: LORA_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj'] is a list; a setting holds one "
            'value: write names separated by commas, e.g. LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj"',
        ),
    ],
)
def test_an_edited_train_py_says_what_is_wrong_before_anything_loads(tmp_path, old, new, message):
    """The issue's edits, run the way a user runs the script; it stops at the settings (no data, no model here)."""
    script = edited_train(tmp_path, old, new)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(script), "--epochs", "1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize(
    ("old", "new", "argv", "name", "value"),
    [
        ("LEARNING_RATE: float = 1e-4", 'LEARNING_RATE: float = "1e-4"', [], "learning_rate", 1e-4),
        (
            "LEARNING_RATE: float = 1e-4",
            'LEARNING_RATE: float = "1e-4"',
            ["--learning-rate", "2e-4"],
            "learning_rate",
            2e-4,
        ),
        ("EPOCHS: int = 2", 'EPOCHS: int = "2"', [], "epochs", 2),
        ("BATCH_SIZE: int = cli.fitted(16)", 'BATCH_SIZE: int = "16"', ["--epochs", "1"], "batch_size", 16),
        (
            '"q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"',
            '["q_proj", "k_proj", "v_proj", "o_proj"]',
            [],
            "lora_targets",
            "q_proj,k_proj,v_proj,o_proj",
        ),
        ("CUDA_GRAPHS: bool = cli.fitted(True)", 'CUDA_GRAPHS: bool = "False"', [], "cuda_graphs", False),
    ],
)
def test_an_edited_train_py_takes_the_obvious_forms(tmp_path, old, new, argv, name, value):
    args = cli.parse_settings(vars(load(edited_train(tmp_path, old, new))), argv)
    assert getattr(args, name) == value and type(getattr(args, name)) is type(value)


# ------------------------------------------------------------------------------------------------------------------ flags
def test_flags_may_be_spelt_with_underscores_but_help_shows_hyphens(namespace, capsys):
    args = cli.parse_settings(namespace, ["--learning_rate", "1e-3", "--model_dir=m", "--no_adapter", "--no-fast"])
    assert args.learning_rate == 1e-3 and args.model_dir == "m" and args.no_adapter is True and args.fast is False
    with pytest.raises(SystemExit):
        cli.parse_settings(namespace, ["--help"])
    assert "_rate" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--learn", "5e-4"], "script.py: error: unknown flag --learn; did you mean --learning-rate?\n"),
        (["--lerning-rate", "5e-4"], "script.py: error: unknown flag --lerning-rate; did you mean --learning-rate?\n"),
        (["--epoch=3"], "script.py: error: unknown flag --epoch; did you mean --epochs?\n"),
        (["--xyz"], "script.py: error: unknown flag --xyz; --help lists the flags\n"),
        (["stray"], "script.py: error: unexpected argument 'stray'; --help lists the flags\n"),
        (["--epochs", "two"], "script.py: error: argument --epochs: invalid int value: 'two'\n"),
    ],
)
def test_a_flag_mistake_is_one_line_with_the_closest_flag(namespace, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.parse_settings(namespace, argv, prog="script.py")
    assert e.value.code == 2
    assert capsys.readouterr().err == message


def test_suggestions_include_the_callers_own_flags(namespace, capsys):
    with pytest.raises(SystemExit):
        cli.parse_settings(namespace, ["--smok"], prog="run.sh", suggest=["--smoke"])
    assert capsys.readouterr().err == "run.sh: error: unknown flag --smok; did you mean --smoke?\n"


def test_check_arguments_parses_a_script_without_running_it(capsys):
    cli.check_arguments(REPO / "train.py", ["--epochs", "1", "--learning_rate", "2e-4"])  # no error, no training
    with pytest.raises(SystemExit) as e:
        cli.check_arguments(REPO / "train.py", ["--learn", "5e-4"], prog="run.sh")
    assert e.value.code == 2
    assert capsys.readouterr().err == "run.sh: error: unknown flag --learn; did you mean --learning-rate?\n"


# ----------------------------------------------------------------------------------------------------------------- ranges
def test_require_positive_refuses_zero_negative_and_nan(namespace):
    cli.require_positive(cli.parse_settings(namespace, ["--learning-rate", "1e-6"]), ["learning_rate", "epochs"])
    for value in ["0", "-1", "nan"]:
        args = cli.parse_settings(namespace, ["--learning-rate", value])
        with pytest.raises(cli.UserError) as e:
            cli.require_positive(args, ["learning_rate"])
        assert str(e.value) == f"LEARNING_RATE / --learning-rate must be greater than 0, not {float(value)}."


def test_require_range_names_both_bounds_and_skips_unset_settings(namespace):
    args = cli.parse_settings(namespace, ["--learning-rate", "1.5"])
    cli.require_range(args, ["model_dir"], at_least=0)  # None: an optional setting left unset
    cli.require_range(args, ["learning_rate"], at_least=0, at_most=1.5)
    with pytest.raises(
        cli.UserError, match=r"^LEARNING_RATE / --learning-rate must be at least 0 and below 1, not 1\.5\.$"
    ):
        cli.require_range(args, ["learning_rate"], at_least=0, below=1)


def test_require_at_least_keeps_its_message(namespace):
    with pytest.raises(cli.UserError, match=r"^EPOCHS / --epochs must be at least 1, not 0\.$"):
        cli.require_at_least(cli.parse_settings(namespace, ["--epochs", "0"]), {"epochs": 1})


# ----------------------------------------------------------------------------------------------------------------- Ctrl-C
def interrupt():
    raise KeyboardInterrupt


def test_ctrl_c_says_rerun_by_default(capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(interrupt)
    assert e.value.code == 130
    assert capsys.readouterr().err == "interrupted; rerun the same command to continue where it stopped\n"


def test_ctrl_c_prints_the_scripts_own_line(capsys, monkeypatch):
    monkeypatch.setattr(sys, "orig_argv", ["python", "train.py", "--epochs", "1", "--prompt", "a photo:"])
    with pytest.raises(SystemExit) as e:
        cli.run(interrupt, interrupted=lambda: "interrupted; continue with: " + cli.rerun_command("--resume"))
    assert e.value.code == 130
    assert (
        capsys.readouterr().err
        == "interrupted; continue with: python train.py --epochs 1 --prompt 'a photo:' --resume\n"
    )
    with pytest.raises(SystemExit):
        cli.run(interrupt, interrupted="stopped; nothing was written")
    assert capsys.readouterr().err == "stopped; nothing was written\n"


def test_rerun_command_adds_a_flag_only_once(monkeypatch):
    monkeypatch.setattr(sys, "orig_argv", ["python", "train.py", "--resume"])
    assert cli.rerun_command("--resume") == "python train.py --resume"


@pytest.mark.parametrize(
    ("body", "status", "said"),
    [("return 3", 3, ""), ("raise cli.UserError('no such folder')", 2, "error: no such folder")],
)
def test_leaving_without_the_teardown_still_runs_atexit_and_flushes(tmp_path, body, status, said):
    """train.py and infer.py leave without the interpreter's teardown (cli.run(..., skip_teardown=True)): what was
    printed, unflushed, still arrives, the atexit handlers still run, and the exit status is main's."""
    script = tmp_path / "script.py"
    script.write_text(
        "import atexit, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from vlcap import cli\n"
        "atexit.register(print, 'atexit ran')\n"
        "def main():\n"
        "    print('unflushed', end='')\n"
        f"    {body}\n"
        "cli.run(main, skip_teardown=True)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == status
    assert done.stdout == "unflushedatexit ran\n"
    assert done.stderr.strip() == said
