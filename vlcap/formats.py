"""The files passed between the steps, written and read in one place each.

- data_vl.json: the tutorial's conversations, `[{"id": "identity_1", "conversations": [{"from": "user", "value":
  "COCO Yes: <|vision_start|>PATH<|vision_end|>"}, {"from": "assistant", "value": "CAPTION"}], "references": [...]}]`
  (`references`, every reference caption of the picture, is ours and optional). `conversation` makes one item,
  `read_conversations` reads and checks a file, `image_of` / `caption_of` / `references_of` take an item apart.
- train_settings.json, beside every adapter: every setting of the training run. `read_adapter_settings` returns the ones
  infer.py needs as named fields, and a file without one of them is an error, never a silent default.
- Every file is written whole or not at all (`atomic_file`): a reader sees the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vlcap.cli import UserError

DEFAULT_PROMPT = "COCO Yes:"  # the tutorial's prompt: written into data_vl.json and asked with every caption
SETTINGS_FILE = "train_settings.json"  # beside each adapter
OUTPUT_ROOT = "output"  # where train.py's runs go by default, and where infer.py looks for the newest adapter

_VISION = re.compile(r"<\|vision_start\|>(.*?)<\|vision_end\|>")


# ---------------------------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w"):
    """Open a temporary file beside `path`; on a clean exit it is renamed to `path`, on an error it is removed.

    The temporary name is unique to this writer, so two writers never share one; the rename is atomic on one file system.
    The file gets the permissions a plain open() would give it (mkstemp's are 0600, which would hide the file from the
    user's group on a shared machine): a new file 0666 less the umask, a replaced file its own.
    """
    path = Path(path)
    fd, part = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with open(fd, mode, encoding=None if "b" in mode else "utf-8", newline=None if "b" in mode else "") as f:
            os.chmod(part, _mode_for(path))
            yield f
        os.replace(part, path)
    except BaseException:
        Path(part).unlink(missing_ok=True)
        raise


def _mode_for(path: Path) -> int:
    """The permission bits open(path, "w") would leave `path` with: its own if it exists, else 0666 less the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask. Linux shows it in /proc (reading it there changes nothing); elsewhere it can only be read by
    setting it and putting it back, a moment in which another thread's new file would be made under 022."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_permissions(folder: str | Path) -> None:
    """Give the files directly in `folder` the permissions open() gives a new file (0666 less the umask): safetensors
    (0.8) writes its files 0600, which hides an adapter or a merged model from the user's group on a shared machine.
    For a folder just written by save_pretrained."""
    mode = 0o666 & ~_umask()
    for path in Path(folder).iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def write_json(path: str | Path, obj) -> None:
    with atomic_file(path) as f:
        f.write(json.dumps(obj, ensure_ascii=False, indent=4))


class JsonListWriter:
    """Writes a JSON list to an open file one item at a time, byte for byte as json.dump(items, f, ensure_ascii=False,
    indent=4) would, so a list of any length is never held in memory. Use inside `atomic_file`; call `close` last."""

    def __init__(self, file):
        self.file, self.count = file, 0

    def add(self, item: dict) -> None:
        body = json.dumps(item, ensure_ascii=False, indent=4).replace("\n", "\n    ")
        self.file.write(("[\n    " if self.count == 0 else ",\n    ") + body)
        self.count += 1

    def close(self) -> None:
        self.file.write("\n]" if self.count else "[]")


# ------------------------------------------------------------------------------------------------------ data_vl.json
def conversation(
    index: int, image_path, caption: str, references: list[str] | None = None, prompt: str = DEFAULT_PROMPT
):
    """One training example in the tutorial's format; `index` counts from 1."""
    item = {
        "id": f"identity_{index}",
        "conversations": [
            {"from": "user", "value": f"{prompt} <|vision_start|>{image_path}<|vision_end|>"},
            {"from": "assistant", "value": caption},
        ],
    }
    if references is not None:
        item["references"] = list(references)
    return item


def read_conversations(path: str | Path, flag: str = "--data-json") -> list[dict]:
    """A data_vl JSON, checked: a list of {"id", "conversations": [user message with a picture, assistant caption]}.

    `flag` is the reading script's option that names the file (train.py's --data-json, infer.py's --json), for the
    message when it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; run csv2json.py first, or pass the right file with {flag}.")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); regenerate it with csv2json.py.") from None
    if not isinstance(items, list) or not items:
        raise UserError(f"{path} holds no conversations; regenerate it with csv2json.py.")
    for i, item in enumerate(items):
        if not _is_conversation(item):
            raise UserError(
                f"{path}: item {i + 1} is not a user message with <|vision_start|>IMAGE<|vision_end|> followed by an "
                "assistant caption; regenerate the file with csv2json.py."
            )
    return items


def _is_conversation(item) -> bool:
    try:
        user, assistant = item["conversations"][0]["value"], item["conversations"][1]["value"]
    except (KeyError, IndexError, TypeError):
        return False
    return isinstance(user, str) and isinstance(assistant, str) and _VISION.search(user) is not None


def image_of(item: dict) -> str:
    return _VISION.search(item["conversations"][0]["value"]).group(1)


def caption_of(item: dict) -> str:
    return item["conversations"][1]["value"]


def references_of(item: dict) -> list[str]:
    return item.get("references") or [caption_of(item)]


def split_paths(data_json: str | Path) -> tuple[Path, Path]:
    """data_vl.json -> (data_vl_train.json, data_vl_test.json) beside it, the tutorial's file names."""
    path = Path(data_json)
    return path.with_name(f"{path.stem}_train.json"), path.with_name(f"{path.stem}_test.json")


# ------------------------------------------------------------------------------------------------- train_settings.json
@dataclass(frozen=True)
class AdapterSettings:
    """What captioning with an adapter must reproduce from its training run (train_settings.json's keys)."""

    model_dir: str  # the base model the adapter belongs to
    prompt: str  # the user prompt before each caption
    image_size: int  # side pictures were resized to (0: their own size)
    test_json: str  # the held-out conversations


def write_train_settings(folder: str | Path, settings: dict) -> None:
    missing = [key for key in AdapterSettings.__dataclass_fields__ if key not in settings]
    if missing:  # a renamed setting must fail here, in the tests, not later in infer.py
        raise KeyError(f"train settings lack {missing}, which infer.py reads back")
    write_json(Path(folder) / SETTINGS_FILE, settings)


def read_train_settings(folder: str | Path) -> dict:
    """Every setting of the run that saved the adapter in `folder`."""
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not an adapter folder saved by train.py (no {SETTINGS_FILE}).")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); retrain or restore the file.") from None


def read_adapter_settings(folder: str | Path) -> AdapterSettings:
    settings = read_train_settings(folder)
    missing = [key for key in AdapterSettings.__dataclass_fields__ if key not in settings]
    if missing:
        raise UserError(
            f"{Path(folder) / SETTINGS_FILE} has no {', '.join(missing)}; it was not written by this train.py: "
            "retrain, or add the missing keys."
        )
    return AdapterSettings(**{key: settings[key] for key in AdapterSettings.__dataclass_fields__})


def latest_adapter(root: str | Path = OUTPUT_ROOT) -> Path:
    """The newest adapter folder train.py saved under root."""
    found = sorted(Path(root).glob(f"**/{SETTINGS_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(
            f"no adapter found under {root}/; run train.py first or pass --adapter DIR (the smoke run saves its "
            "adapter in smoke/output/adapter: `python infer.py --adapter smoke/output/adapter ...`)."
        )
    return found[-1].parent
