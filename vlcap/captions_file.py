"""infer.py's captions file: one JSON object per line, appended as captions are made, resumable after any stop.

    output = captions_file.CaptionsFile.open("captions.jsonl", settings, overwrite=False)   # before the model loads
    output.done                      # pictures captioned by earlier sittings: skipped
    output.add([{"image": "a.jpg", "caption": "a red circle"}, ...])   # whole lines, in one write
    output.close()

Each line is `{"image": PATH, "caption": CAPTION}` (plus `references` for a JSON split). Lines are written whole, a
batch's in one write to the file opened for appending, so a run killed at any point leaves whole lines; if a write
fails (a full disk), the file is cut back to its last whole line and the run stops with one line saying how to go on. A
torn last line (the machine lost power mid-write) is removed with a warning when the file is next opened, and its
picture captioned again. The file is created at the first caption: a run that captions nothing leaves no file, and an
earlier file stays as it was.

Beside it, `captions.settings.json` names the adapter (its folder and a fingerprint of its weights), the base model,
prompt, image size and caption length that made the captions: a later sitting with other ones is refused in one line, so
one file never mixes two runs' captions. `overwrite=True` starts afresh (the old file is replaced at the first caption).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from vlcap import formats
from vlcap.cli import UserError

# What makes two sittings one run: the captions depend on these. The other recorded settings are for the reader.
SAME_RUN = ("adapter_weights", "model_dir", "prompt", "image_size", "max_new_tokens")


@dataclass(frozen=True)
class RunSettings:
    """The settings a captions file was made with, as its settings file records them."""

    adapter: str | None  # the adapter folder (absolute), None for the base model alone
    adapter_weights: str | None  # fingerprint of the adapter's weight files: the same adapter, wherever it was moved
    model_dir: str | None  # the base model given or the adapter's
    prompt: str
    image_size: int | None  # as asked for (None: the model's default)
    max_new_tokens: int
    precision: str
    batch_size: int


def run_settings(adapter: Path | None, model_dir: str | None, prompt: str, image_size: int | None, args) -> RunSettings:
    """infer.py's settings as recorded beside its captions."""
    local = model_dir and Path(model_dir).expanduser().is_dir()
    return RunSettings(
        adapter=str(Path(adapter).resolve()) if adapter else None,
        adapter_weights=weights_fingerprint(adapter) if adapter else None,
        model_dir=str(Path(model_dir).expanduser().resolve()) if local else model_dir,
        prompt=prompt,
        image_size=image_size,
        max_new_tokens=args.max_new_tokens,
        precision=args.precision,
        batch_size=args.batch_size,
    )


def weights_fingerprint(folder: Path) -> str:
    """A short digest of a folder's weight files (*.safetensors, *.bin): their sizes and 1 MiB from the start, middle and
    end of each. Two trainings differ in all of them; reading 3 MiB a file keeps this instant for a merged 4 GB model."""
    digest = hashlib.sha256()
    for file in sorted(Path(folder).glob("*.safetensors")) + sorted(Path(folder).glob("*.bin")):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as f:
            for start in sorted({0, max(0, size // 2 - 2**19), max(0, size - 2**20)}):
                f.seek(start)
                digest.update(f.read(2**20))
    return digest.hexdigest()[:16]


def settings_path(output: Path) -> Path:
    """captions.jsonl -> captions.settings.json"""
    return output.with_suffix(".settings.json")


class CaptionsFile:
    """A captions file open for appending (see the module's docstring). `done`: the pictures already in it (absolute
    paths); `before`: how many earlier sittings wrote."""

    def __init__(self, path: Path, settings: RunSettings, done: set[str], writes: bool, folder: str | None = None):
        self.path, self.settings, self.done, self.writes = path, settings, done, writes
        self.folder = folder or os.getcwd()  # where the file's relative paths start: the first sitting's folder
        self.before = len(done)
        self.fd: int | None = None

    @classmethod
    def open(cls, path: str | Path, settings: RunSettings, overwrite: bool, writes: bool = True) -> CaptionsFile:
        """Check and read what an earlier sitting left, before any model loads. `writes=False` (every process under
        torchrun but process 0) reads without repairing anything: process 0 alone writes."""
        path = Path(path)
        if path.is_dir():
            raise UserError(
                f"--output {path} is a folder; name the captions file to write, e.g. --output {path / 'captions.jsonl'}."
            )
        if overwrite or not path.exists() or path.stat().st_size == 0:
            return cls(path, settings, set(), writes)
        folder = _same_run(path, settings)
        return cls(path, settings, _captioned(path, folder, repair=writes), writes, folder)

    def add(self, records: list[dict]) -> int:
        """Append the records not in the file yet, as whole lines in one write; how many were written."""
        new, lines = [], []
        elsewhere = os.getcwd() != self.folder  # a relative path is written whole, so later sittings read it right
        for record in records:
            key = os.path.abspath(record["image"])
            if key not in self.done and key not in new:
                new.append(key)
                record = {**record, "image": key} if elsewhere and not os.path.isabs(record["image"]) else record
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        if not lines or not self.writes:
            self.done.update(new)
            return len(lines)
        if self.fd is None:
            self._start()
        data = "".join(lines).encode("utf-8")
        end = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            written = os.write(self.fd, data)
            if written != len(data):
                raise OSError(f"wrote {written} of {len(data)} bytes")
        except OSError as e:
            os.ftruncate(self.fd, end)  # the file keeps its whole lines only
            raise UserError(
                f"could not write to {self.path} ({e.strerror or e}); it keeps every caption made so far: free some "
                "space, then run the same command again to continue."
            ) from None
        self.done.update(new)
        return len(lines)

    def captions(self, images: Iterable[str]) -> dict[str, str]:
        """{picture: caption} of the file, for the pictures asked for (scoring and the web page)."""
        wanted = {os.path.abspath(p): p for p in images}
        found = {}
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                image = wanted.get(os.path.abspath(os.path.join(self.folder, record["image"])))
                if image is not None:
                    found[image] = record["caption"]
        return found

    def _start(self) -> None:
        """At the first caption: the settings file written, the captions file created (or emptied, overwriting)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.done
        if fresh:
            formats.write_json(settings_path(self.path), {**asdict(self.settings), "folder": os.getcwd()})
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if fresh else 0)
        self.fd = os.open(self.path, flags, 0o666)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _same_run(path: Path, settings: RunSettings) -> str:
    """Refuse to add to a file begun by another run (another adapter, model, prompt, image size or caption length);
    the folder the first sitting ran in."""
    recorded_path = settings_path(path)
    how = f"pass --output another file to keep both, or --overwrite to replace {path}"
    try:
        recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"{path} exists but was not begun by this infer.py (no {recorded_path.name} beside it); {how}."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{recorded_path} is not valid JSON ({e}); {how}.") from None
    now = asdict(settings)
    differ = [key for key in SAME_RUN if recorded.get(key) != now[key]]
    if differ:
        names = {"adapter_weights": "adapter", "model_dir": "base model"}
        what = ", ".join(
            f"{names.get(key, key.replace('_', ' '))} {_shown(recorded, key)} then, {_shown(now, key)} now"
            for key in differ
        )
        raise UserError(f"{path} holds captions of another run ({what}); {how}.")
    return recorded.get("folder") or os.getcwd()


def _shown(settings: dict, key: str) -> str:
    if key == "adapter_weights":
        return repr(settings.get("adapter") or "none")
    return repr(settings.get(key))


def _captioned(path: Path, folder: str, repair: bool) -> set[str]:
    """The pictures the file holds (absolute paths, relative ones taken from `folder`). A torn last line is cut off
    (when `repair`), with a warning; any other line that is not a caption is an error."""
    done, good_end, number = set(), 0, 0
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):  # noqa: B007  (number is the last line's afterwards)
            record = _record(line)
            if record is None:
                if f.read(1):  # not the last line: something else wrote into the file
                    raise UserError(
                        f"{path}: line {number} is not a caption ({line[:60]!r}); remove or mend it, or pass "
                        "--overwrite to start afresh."
                    )
                if repair:
                    os.truncate(path, good_end)
                    print(
                        f"warning: {path} ended in a broken line (a run stopped while writing it): removed; its "
                        "picture is captioned again.",
                        file=sys.stderr,
                    )
                break
            done.add(os.path.join(folder, record["image"]))
            good_end += len(line)
    return {os.path.abspath(p) for p in done}


def _record(line: bytes) -> dict | None:
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("image"), str) else None
