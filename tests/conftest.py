"""Session fixtures: a tiny Qwen2-VL built offline, shape-picture datasets made by the pipeline's own scripts, and one
trained adapter shared by the tests that need one. Shared helpers live in tests/helpers.py."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SWANLAB_MODE", "offline")
os.environ.setdefault("SWANLAB_LOG_DIR", tempfile.mkdtemp(prefix="swanlog-"))  # never into the working tree

from helpers import LEARN_ARGS, make_dataset  # noqa: E402
from make_offline_model import make_offline_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_offline_model("tiny", tmp_path_factory.mktemp("model") / "tiny-qwen2-vl")


@pytest.fixture(scope="session")
def shapes_132(tmp_path_factory) -> Path:
    """96 training + 36 held-out pictures of 4 colours x 3 shapes."""
    return make_dataset(tmp_path_factory.mktemp("shapes"), 132)


@pytest.fixture(scope="session")
def shapes_24(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shapes24"), 24)


@pytest.fixture(scope="session")
def trained(tiny_model, shapes_132, tmp_path_factory):
    """The learning run, shared by every test that needs a trained adapter: (adapter folder, printed output)."""
    import io
    from contextlib import redirect_stdout

    import train

    out = tmp_path_factory.mktemp("run") / "out"
    buf = io.StringIO()
    with redirect_stdout(buf):
        train.main(["--model-dir", str(tiny_model), "--data-json", str(shapes_132), "--output-dir", str(out),
                    "--test-size", "36", "--max-steps", "300", *LEARN_ARGS])  # fmt: skip
    return out / "adapter", buf.getvalue()
