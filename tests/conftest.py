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
def trained(trained_family):
    """The learning run, shared by every test that needs a trained adapter: (adapter folder, printed output)."""
    return trained_family("qwen2_vl")


@pytest.fixture(scope="session")
def tiny_models(tiny_model, tmp_path_factory) -> dict:
    """A tiny folder of each family, by model_type (Qwen2-VL's is tiny_model)."""
    root = tmp_path_factory.mktemp("families")
    others = {arch: make_offline_model("tiny", root / arch, arch=arch) for arch in ("qwen2_5_vl", "qwen3_vl")}
    return {"qwen2_vl": tiny_model, **others}


@pytest.fixture(scope="session")
def trained_family(tiny_models, shapes_132, tmp_path_factory):
    """trained_family(arch) -> (adapter folder, printed output) of that family's learning run (LEARN_ARGS, 300 steps),
    made on first use. Measured: both colour and shape right for 69% of the 36 held-out pictures with Qwen2-VL, 89% with
    Qwen2.5-VL and Qwen3-VL (200 steps: 58% and 92%; 150 steps: 8% and 75%; chance 8%); about 7 s each."""
    import io
    from contextlib import redirect_stdout

    import train
    from helpers import for_family

    runs = {}

    def get(arch: str):
        if arch not in runs:
            out = tmp_path_factory.mktemp(f"run-{arch}") / "out"
            buf = io.StringIO()
            with redirect_stdout(buf):
                train.main(
                    [
                        "--model-dir",
                        str(tiny_models[arch]),
                        "--data-json",
                        str(shapes_132),
                        "--output-dir",
                        str(out),
                        "--test-size",
                        "36",
                        "--max-steps",
                        "300",
                        *for_family(LEARN_ARGS, arch),
                    ]
                )
            runs[arch] = out / "adapter", buf.getvalue()
        return runs[arch]

    return get


@pytest.fixture(scope="session")
def family_captioner(trained_family):
    """family_captioner(arch) -> (model, processor, settings) of that family's learning run, loaded once. Tests that
    change the model's generation settings put them back."""
    from helpers import load_captioner

    loaded = {}

    def get(arch):
        if arch not in loaded:
            loaded[arch] = load_captioner(trained_family(arch)[0])
        return loaded[arch]

    return get
