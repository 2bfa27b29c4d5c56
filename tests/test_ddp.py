"""torchrun data parallel on the CPU (gloo): two processes train what one process trains with the same effective batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from helpers import QUICK, REPO
from swanlab_files import only_run, read_run

import train


def test_two_processes_match_one(tiny_model, shapes_24, tmp_path):
    """Effective batch 4 either way: 2 processes x batch 2, or 1 process x batch 4; same seed, dropout off.

    The data order is the same (both draw one permutation from the seed and the two processes take alternate halves of
    each batch of 4), and the loss is normalised by the caption tokens of all processes together, so the runs compute the
    same gradients up to the order of float32 sums in the all-reduce (~1e-7 relative). After 4 Adam steps of lr 1e-4
    each weight has moved at most 4e-4; 1e-6 absolute is 0.25% of that: rounding passes, a wrong normalisation (a factor
    of 2 in the gradient) or a wrong data split does not.
    """
    from safetensors.torch import load_file

    common = ["--model-dir", str(tiny_model), "--data-json", str(shapes_24), "--max-steps", "4", "--lora-dropout", "0", *QUICK]
    common[common.index("--batch-size") + 1] = "2"
    env = {**os.environ, "SWANLAB_MODE": "offline", "SWANLAB_LOG_DIR": str(tmp_path / "swanlog"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "train.py"), *common,
         "--output-dir", str(tmp_path / "ddp")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("adapter saved to") == 1  # only process 0 saves, captions and reports
    settings = json.loads((tmp_path / "ddp" / "adapter" / "train_settings.json").read_text())
    assert settings["world_size"] == 2 and settings["effective_batch"] == 4 and settings["global_step"] == 4
    run = read_run(only_run(tmp_path / "swanlog"))  # one SwanLab run, one loss series
    ddp_losses = [v for _, v in run["scalars"]["train/loss"]]
    assert len(ddp_losses) == 4

    single = [*common, "--output-dir", str(tmp_path / "one"), "--swanlab-mode", "disabled"]
    single[single.index("--batch-size") + 1] = "4"
    train.main(single)
    one_state = json.loads(next((tmp_path / "one").glob("checkpoint-*/trainer_state.json")).read_text())
    one_losses = [h["loss"] for h in one_state["log_history"] if "loss" in h]
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(one_losses), rtol=1e-4, atol=0)
    ddp, one = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("ddp", "one"))
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], rtol=0, atol=1e-6)
