"""SwanLab, behind one small object: the run's settings, the loss curves, the caption scores and captioned pictures.

    mode = tracking.choose_mode(args.swanlab_mode, args.swanlab_require_cloud)   # before anything heavy loads
    tracker = tracking.start(mode, project, experiment, config)                  # a do-nothing Tracker when disabled
    trainer = Trainer(..., callbacks=[tracker.callback, ...])
    tracker.log({"eval/after/CIDEr": 0.9}); tracker.log_pictures("Prediction/after", {path: caption})
    tracker.finish()

The mode is decided first: as set (--swanlab-mode or SWANLAB_MODE); else cloud when an API key is configured, checked
against swanlab.cn within a bounded wait; else offline, with the one command that uploads the run later. A rejected key
or an unreachable cloud costs one line and the run logs offline, unless cloud was made mandatory. Logging that is off is a
Tracker whose methods do nothing, so callers never ask whether SwanLab is on.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

from vlcap.cli import UserError

MODES = ("cloud", "online", "offline", "local", "disabled")
LOGIN_TIMEOUT = 10  # seconds to wait for swanlab.cn to accept the API key before logging offline


class Tracker:
    """Logging that is off: every method does nothing."""

    callback = None  # a transformers TrainerCallback that logs the curves, or None
    enabled = False  # whether anything logged goes anywhere (so callers can skip work made only to be logged)

    def update_config(self, settings: dict) -> None:
        pass

    def log(self, metrics: dict) -> None:
        pass

    def log_pictures(self, key: str, captions: dict[str, str]) -> None:
        pass

    def finish(self, aborted: bool = False) -> None:
        pass


class SwanLab(Tracker):
    """A SwanLab run (one per training run; under torchrun only process 0 has one)."""

    def __init__(self, mode: str, project: str, experiment: str, config: dict):
        import swanlab
        from swanlab.integration.transformers import SwanLabCallback

        before = signal.getsignal(signal.SIGINT)
        with _own_greeting() as ours:
            run = swanlab.init(project=project, experiment_name=experiment, mode=mode, config=config)
        # swanlab.init installs its own Ctrl-C handler, which finishes the run inside the signal handler and can leave the
        # process waiting at exit for a second Ctrl-C. Ours: Ctrl-C raises KeyboardInterrupt and finish(aborted=True) runs.
        signal.signal(signal.SIGINT, before)
        self.swanlab, self.callback, self.enabled = swanlab, SwanLabCallback(), True
        if ours:
            print(where_it_goes(run, mode))

    def update_config(self, settings: dict) -> None:
        self.callback.update_config(settings)

    def log(self, metrics: dict) -> None:
        self.swanlab.log(metrics)

    def log_pictures(self, key: str, captions: dict[str, str]) -> None:
        """Pictures with their generated captions, as the tutorial's `Prediction` panel."""
        self.swanlab.log({key: [self.swanlab.Image(path, caption=caption) for path, caption in captions.items()]})

    def finish(self, aborted: bool = False) -> None:
        if self.swanlab.has_run():
            with _own_greeting():
                self.swanlab.finish(state="aborted") if aborted else self.swanlab.finish()


@contextlib.contextmanager
def _own_greeting():
    """SwanLab's greeting and goodbye off within the block; yields whether they were found.

    SwanLab prints its version, the run folder and the command that uploads the run when it starts, and the command again
    when it finishes, folded at 80 columns where the output is not a terminal (the command breaks in two). The tracker
    prints one line of its own instead (`where_it_goes`). A SwanLab release that keeps its greeting elsewhere keeps its
    own lines, and the tracker prints none."""
    try:
        from swanlab.sdk.internal.run import greeting
    except ImportError:
        yield False
        return
    if not (callable(getattr(greeting, "welcome", None)) and callable(getattr(greeting, "goodbye", None))):
        yield False
        return
    saved = greeting.welcome, greeting.goodbye
    greeting.welcome = greeting.goodbye = _say_nothing
    try:
        yield True
    finally:
        greeting.welcome, greeting.goodbye = saved


def _say_nothing(*args, **kwargs) -> None:
    pass


def where_it_goes(run, mode: str) -> str:
    """One line: where a started run's curves can be seen (cloud), or its folder and the command that uploads it
    (offline) or shows it (local)."""
    if mode in ("cloud", "online"):
        return f"SwanLab: the run's curves and pictures are at {run.url}"
    folder = _shown(run.dir)
    if mode == "local":
        return f"SwanLab: this run is saved in {folder}; view it with `swanlab watch {_shown(run.dir.parent)}`"
    return f"SwanLab: this run is saved in {folder}; upload it later with `swanlab sync {folder}`"


def _shown(path) -> str:
    """A path as a command line would take it: relative to the current folder when it lies inside it."""
    path = Path(path).resolve()
    try:
        path = path.relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.quote(str(path))


def choose_mode(setting: str | None, require_cloud: bool = False) -> str:
    """The SwanLab mode for this run, decided before anything heavy loads (see the module's docstring)."""
    mode = setting or os.environ.get("SWANLAB_MODE")
    if mode and mode not in MODES:
        raise UserError(f"SwanLab mode {mode!r} is not one of cloud, offline, local, disabled.")
    if mode and mode not in ("cloud", "online"):
        return mode
    import swanlab

    key = os.environ.get("SWANLAB_API_KEY") or swanlab.Settings().api_key
    if not key:
        if mode or require_cloud:  # cloud asked for by name, and no key: swanlab would stop at once
            raise UserError("SwanLab cloud mode needs an API key: run `swanlab login` (or set SWANLAB_API_KEY) first.")
        print("SwanLab: no API key configured (`swanlab login`), so this run logs offline (`swanlab sync` uploads it).")
        return "offline"
    why = _login_problem(key)
    if why is None:
        return "cloud"
    if require_cloud:
        raise UserError(
            f"SwanLab cloud is required (--swanlab-require-cloud) but {why}; check the key and the network."
        )
    print(f"SwanLab: {why}, so this run logs offline (`swanlab sync` uploads it).")
    return "offline"


def _login_problem(key: str) -> str | None:
    """None when swanlab.cn accepts the key within LOGIN_TIMEOUT seconds, else what went wrong in a few words."""
    import swanlab

    outcome: dict = {}

    def login():
        try:
            swanlab.login(api_key=key, timeout=LOGIN_TIMEOUT)
            outcome["ok"] = True
        except Exception as e:  # a rejected key and a network failure both mean: no cloud for this run
            outcome["error"] = e

    thread = threading.Thread(target=login, daemon=True)
    thread.start()
    thread.join(LOGIN_TIMEOUT)
    if outcome.get("ok"):
        return None
    if "error" in outcome:
        return f"the cloud did not accept the API key ({type(outcome['error']).__name__})"
    return f"swanlab.cn did not answer within {LOGIN_TIMEOUT} s"


def start(mode: str, project: str, experiment: str, config: dict) -> Tracker:
    if mode == "disabled":
        return Tracker()
    try:
        return SwanLab(mode, project, experiment, config)
    except Exception as e:  # logging must never cost the training run
        print(
            f"warning: SwanLab could not start ({type(e).__name__}: {e}); training goes on without it.", file=sys.stderr
        )
        return Tracker()
