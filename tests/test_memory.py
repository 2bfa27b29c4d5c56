"""vlcap/memory.py: the settings chosen for simulated cards (a pure function), the memory model against the measured GPU
figures, the precision per card, which settings count as the user's, the messages; fp16 mixed precision on the tiny
model (on the CPU, with torch's own autocast and loss scaling: transformers' Trainer runs no loss scaling there, so
train.py's fp16 path itself runs on the GPU only, in bench/memory_fit.py)."""

from __future__ import annotations

import math

import pytest

from vlcap import cli, memory, memory_plan
from vlcap.memory import Card, Job, Settings

# The tutorial's job: 496 training pictures at 280x280 (100 image tokens, a 0.15 GB cache in bf16), sequences padded to
# 144 tokens of which 18 are caption positions.
TUTORIAL = Job(pictures=496, seq_tokens=144, caption_tokens=18, cache_gb=496 * 100 * 1536 * 2 / 1e9)
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def shipped() -> dict:
    """train.py's values of the settings the plan may choose, as shipped (its constants)."""
    import train

    return memory_plan.knob_values(train.read_settings([]))


def plan_for(total_gb, bf16=True, free_gb=None, job=TUTORIAL, user=None, precision="auto"):
    card = Card.simulate(total_gb, bf16=bf16, free_gb=free_gb)
    return memory_plan.plan(card, memory.QWEN2_VL_2B, job, memory.choose_precision(card, precision), shipped(), user)


def test_the_memory_model_reproduces_the_measured_peaks():
    """bench/RESULTS.md's H100 peaks: three fitted the model's constants, two were left out to check it."""
    bf16 = memory.Precision("bf16", "")
    five_thousand = Job(4996, 144, 18, cache_gb=4996 * 100 * 1536 * 2 / 1e9)
    # bench/bench.py had no evaluation split: only the 4 held-out pictures were captioned after training.
    measured = [
        (Settings(16, 1, False, True, True, 4), TUTORIAL, 14.1),  # default fast path
        (Settings(4, 4, True, True, False, 4), TUTORIAL, 6.1),  # --low-memory
        (Settings(16, 1, False, False, False, 4), TUTORIAL, 17.3),  # plain path
        (Settings(4, 4, True, False, False, 4), TUTORIAL, 6.9),  # the tutorial's recipe (not fitted)
        (Settings(16, 1, False, True, True, 4), five_thousand, 15.4),  # 5,000 pictures (not fitted)
    ]
    for settings, job, peak in measured:
        estimate = memory.estimate(memory.QWEN2_VL_2B, job, bf16, settings)
        assert abs(estimate.peak - peak) < 0.15, (settings, estimate.peak, peak)
        assert estimate.need > estimate.peak  # headroom on top


# (card GB, bf16) -> (batch, accumulation, checkpointing, pictures captioned at a time). Smaller cards take smaller
# steps; on 8 GB in bf16 the CUDA graphs' memory pool, kept after training, leaves room to caption 8 pictures at a time.
FASTEST_THAT_FITS = {
    (80, True): (16, 1, False, 32),
    (80, False): (16, 1, False, 32),
    (24, True): (16, 1, False, 32),
    (24, False): (16, 1, False, 32),
    (16, True): (8, 2, False, 32),
    (16, False): (8, 2, False, 32),
    (12, True): (8, 2, False, 16),
    (12, False): (8, 2, False, 32),
    (8, True): (2, 8, False, 8),
    (8, False): (2, 8, False, 32),
}


@pytest.mark.parametrize("total_gb, bf16", list(FASTEST_THAT_FITS))
def test_each_card_gets_the_fastest_settings_that_fit(total_gb, bf16):
    plan = plan_for(total_gb, bf16)
    s = plan.settings
    assert (
        plan.fits
        and (s.batch_size, s.grad_accum, s.gradient_checkpointing, s.eval_batch_size)
        == FASTEST_THAT_FITS[total_gb, bf16]
    )
    assert s.batch_size * s.grad_accum == 16  # the tutorial's effective batch, always
    assert s.vision_cache and s.cuda_graphs == (bf16 and not s.gradient_checkpointing)  # graphs are captured in bf16
    assert plan.precision.name == ("bf16" if bf16 else "fp16")
    assert plan.estimate.need <= total_gb
    # Every faster configuration tried needs more than the card has.
    tried = [se[0] for se in plan.tried]
    assert all(e.need > total_gb for _, e in plan.tried[: tried.index(s)])
    assert f"{total_gb:.1f} GB free" in plan.reason
    assert ("in one step" if s.grad_accum == 1 else f"x {s.grad_accum} accumulation") in plan.reason


def test_less_free_memory_means_smaller_steps_then_checkpointing():
    # Another process holds most of a 24 GB card: the plan reads what is free, not the card's size.
    assert plan_for(24, free_gb=10).settings == Settings(4, 4, False, True, True, 32)
    low = plan_for(24, free_gb=7.5)
    assert low.fits and low.settings == Settings(8, 2, True, True, False, 32)  # no graphs with checkpointing
    low_memory = plan_for(24, free_gb=7.0)
    assert low_memory.settings == Settings(4, 4, True, True, False, 16)
    assert "as --low-memory, captions 16 pictures at a time" in low_memory.reason
    smallest = plan_for(24, free_gb=6.6)
    assert smallest.fits and smallest.settings == Settings(1, 16, True, True, False, 4)
    too_small = plan_for(6.2)
    assert not too_small.fits and "free GPU memory" in too_small.reason


def test_a_large_vision_cache_keeps_on_the_gpu_what_fits_and_the_rest_in_host_memory():
    big = Job(20_000, 144, 18, cache_gb=6.1)
    plan = plan_for(24, job=big)
    assert plan.settings.vision_cache and plan.estimate.cache == 6.1
    # On 12 GB nothing fits with all of it on the GPU: a smaller share there, the rest read from host memory.
    plan = plan_for(12, job=big)
    assert plan.fits and plan.settings.vision_cache and 0 <= plan.estimate.cache < 6.1
    assert plan.settings.cache_gpu_gb == plan.estimate.cache and "of the 6.1 GB vision cache on the GPU" in plan.reason
    assert f"--vision-cache-gb {plan.settings.cache_gpu_gb:g}" in plan.settings.flags()
    # A cache above VISION_CACHE_GB: that much on the GPU, the rest in host memory; none for pictures of their own size.
    full_split = plan_for(80, job=Job(80_000, 144, 18, cache_gb=24.6))
    assert full_split.settings.vision_cache and full_split.estimate.cache == 8.0
    assert not plan_for(80, job=Job(500, 1336, 40, cache_gb=None)).settings.vision_cache


def test_the_users_settings_are_kept_and_checked():
    # Batch 16 in one step on a 12 GB card: kept; it cannot fit, and the line says what would.
    plan = plan_for(12, user={"batch_size": 16, "gradient_checkpointing": False})
    assert (plan.settings.batch_size, plan.settings.grad_accum, plan.settings.gradient_checkpointing) == (16, 1, False)
    assert not plan.fits and plan.hopeless
    assert "--batch-size" in plan.reason and "batch 8 x 2 accumulation fits" in plan.reason
    # Only the batch given: checkpointing, left free, makes it fit.
    plan = plan_for(12, user={"batch_size": 16})
    assert plan.fits and plan.settings.gradient_checkpointing and plan.settings.batch_size == 16
    # Checkpointing asked for on a large card: kept.
    assert plan_for(80, user={"gradient_checkpointing": True}).settings == Settings(16, 1, True, True, False, 32)
    assert not plan_for(80, user={"cuda_graphs": False}).settings.cuda_graphs
    assert not plan_for(80, user={"vision_cache_gb": 0.0}).settings.vision_cache
    # The user's batch of 8 with accumulation 4 is an effective batch of 32: kept too.
    assert plan_for(24, user={"batch_size": 8, "grad_accum": 4}).settings.grad_accum == 4


def test_the_cpu_plan_changes_nothing():
    precision = memory.choose_precision(None)
    plan = memory_plan.plan(None, memory.QWEN2_VL_2B, TUTORIAL, precision, shipped(), {"batch_size": 4})
    assert (
        plan.fits and plan.settings.batch_size == 4 and plan.settings.grad_accum == 1 and not plan.settings.cuda_graphs
    )


def test_precision_follows_the_card():
    assert memory.choose_precision(Card.simulate(24)).name == "bf16"
    t4 = Card("Tesla T4", 15.8, 15.4, (7, 5), bf16=False)
    fp16 = memory.choose_precision(t4)
    assert fp16.name == "fp16" and "loss scaling" in fp16.reason and "Tesla T4" in fp16.reason
    assert "loss scaling" not in memory.choose_precision(t4, training=False).reason
    assert memory.choose_precision(t4, "fp32").name == "fp32"
    assert "has no bf16" in memory.choose_precision(t4, "bf16").reason
    assert memory.choose_precision(None).name == "fp32"
    assert memory.choose_precision(None, "bf16").name == "bf16"
    with pytest.raises(cli.UserError, match="needs a CUDA GPU"):
        memory.choose_precision(None, "fp16")
    assert memory.choose_precision(None, "fp16", training=False).name == "fp16"
    with pytest.raises(cli.UserError, match="--precision must be one of"):
        memory.choose_precision(t4, "fp8")
    # fp32 holds the weights and activations at twice the size: a 16 GB card trains it in smaller steps.
    fp32 = plan_for(16, bf16=False, precision="fp32")
    assert fp32.fits and fp32.settings.batch_size < 8 and fp32.estimate.weights > 8.8


def test_the_next_smaller_settings_and_the_out_of_memory_line(tmp_path):
    plan = plan_for(12)
    assert plan.smaller() == Settings(4, 4, False, True, True, 16)
    line = memory_plan.out_of_memory(plan, tmp_path, now=(0.2, 11.5))
    assert "ran out of memory" in line and "--batch-size 4 --grad-accum 4" in line and "no checkpoint yet" in line
    (tmp_path / "checkpoint-100").mkdir()
    (tmp_path / "checkpoint-200").mkdir()
    shared = memory_plan.plan(
        Card("RTX 4090", 25.2, 24.6, (8, 9), True),
        memory.QWEN2_VL_2B,
        TUTORIAL,
        memory.choose_precision(None, "bf16"),
        shipped(),
    )
    line = memory_plan.out_of_memory(shared, tmp_path, now=(0.1, 16.0))
    assert "other processes took" in line and "--resume (it continues from checkpoint-200)" in line
    assert "\n" not in line
    mine = plan_for(80, user={"batch_size": 16})
    assert "lower --batch-size" in memory_plan.out_of_memory(mine, tmp_path, now=(0.1, 70.0))


def test_the_loss_guard_stops_fp16_on_inf_or_nan():
    assert memory_plan.loss_guard(memory.Precision("bf16", "")) is None
    guard = memory_plan.loss_guard(memory.Precision("fp16", ""))
    guard.on_log(None, None, None, logs={"loss": 2.5})
    with pytest.raises(cli.UserError, match="--precision fp32"):
        guard.on_log(None, type("State", (), {"global_step": 30})(), None, logs={"loss": math.nan})


def test_settings_the_user_gave_are_told_apart_from_defaults():
    """Parsing knows the flags given (argparse's SUPPRESS); a constant shipped as cli.fitted(...) and edited to a plain
    value is the user's too. The plan's defaults are train.py's constants, read, not copied."""
    import train

    def user(namespace, argv):
        return set(memory_plan.user_settings(cli.parse_settings(namespace, argv)))

    namespace = vars(train)
    assert shipped() == {n.lower(): v.value for n, v in namespace.items() if isinstance(v, cli._Fitted)}
    assert set(shipped()) == set(memory_plan.KNOBS)
    assert user(namespace, []) == set()
    assert user(namespace, ["--batch-size", "16", "--epochs", "1"]) == {"batch_size"}
    assert user(namespace, ["--no-gradient-checkpointing", "--no-cuda-graphs"]) == {
        "gradient_checkpointing",
        "cuda_graphs",
    }
    assert user(namespace, ["--vision-cache-gb=0"]) == {"vision_cache_gb"}
    edited = {**namespace, "BATCH_SIZE": 8, "GRADIENT_CHECKPOINTING": True}  # constants edited in the file
    assert user(edited, []) == {"batch_size", "gradient_checkpointing"}
    assert cli.parse_settings(edited, []).batch_size == 8


def test_the_shape_is_counted_from_the_model_folder(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from vlcap import qwen

    from make_offline_model import FAMILIES, build_config

    # The 2B model's shape, from a folder holding its config alone (an empty model is counted, no weights read).
    build_config(FAMILIES["qwen2_vl"], "full", AutoTokenizer.from_pretrained(tiny_model)).save_pretrained(tmp_path)
    assert memory.Shape.of_model(str(tmp_path), 64, TARGETS) == memory.QWEN2_VL_2B
    # The LoRA count is what peft trains, for any targets.
    shape = memory.Shape.of_model(str(tiny_model), 16, "q_proj,down_proj")
    model = qwen.load_model(str(tiny_model), "cpu")
    assert shape.params == sum(p.numel() for p in model.parameters())
    model = qwen.add_lora(model, 16, 16, 0.0, "q_proj,down_proj")
    assert shape.lora_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_token_counts_match_the_fast_paths_batches(tiny_model, shapes_24):
    """Job.measure's counts are the padded length and the LM head's positions caption_trainer.collate_encoded makes."""
    import torch

    from vlcap import caption_trainer, formats, qwen, training_data, vision_encoding

    processor = qwen.load_processor(tiny_model)
    items = formats.read_conversations(shapes_24)
    dataset = training_data.CaptionDataset(items, processor, "COCO Yes:", 56, 8192)
    job = Job.measure(dataset, vision_encoding.image_token_count(processor, 56), 8192)
    examples = [dataset[i] for i in range(len(dataset))]
    pad_to = -(-max(len(e["input_ids"]) for e in examples) // 8) * 8
    batch = caption_trainer.collate_encoded(
        [
            {
                "input_ids": e["input_ids"],
                "labels": e["labels"],
                "position_ids": torch.zeros(3, len(e["input_ids"])),
                "image_positions": torch.zeros(0, dtype=torch.long),
                "index": 0,
            }
            for e in examples
        ],
        pad_token_id=0,
        pad_to=pad_to,
    )
    assert (job.pictures, job.seq_tokens, job.caption_tokens) == (24, pad_to, len(batch["logits_to_keep"]))


def test_detect_reads_the_card_and_the_testing_variables(monkeypatch):
    import torch

    calls = {}
    props = type("Props", (), {"name": "NVIDIA H100 80GB HBM3", "major": 9, "minor": 0})()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (84.0e9, 85.0e9))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 0)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, i: calls.update(fraction=f))
    monkeypatch.delenv(memory.MEMORY_ENV, raising=False)
    card = Card.detect("cuda")
    assert (card.total_gb, card.free_gb, card.capability, card.bf16, card.simulated) == (
        85.0,
        84.0,
        (9, 0),
        True,
        False,
    )
    assert not calls
    monkeypatch.setenv(memory.MEMORY_ENV, "12")
    monkeypatch.setenv(memory.BF16_ENV, "0")
    card = Card.detect("cuda:0")
    assert (card.total_gb, card.free_gb, card.bf16, card.simulated) == (12.0, 12.0, False, True)
    assert calls["fraction"] == pytest.approx(12 / 85) and "limited to 12 GB" in card.name


def test_fp16_mixed_precision_trains_the_tiny_model_as_fp32_does(tiny_model, shapes_24):
    """fp16 weights, fp32 LoRA weights, fp16 autocast and loss scaling (torch's, on the CPU): the loss falls as in fp32."""
    import torch

    from vlcap import formats, qwen, training_data

    processor = qwen.load_processor(tiny_model)
    items = formats.read_conversations(shapes_24)
    dataset = training_data.CaptionDataset(items, processor, "COCO Yes:", 56, 8192)
    batches = [
        training_data.collate([dataset[i] for i in range(j, j + 8)], processor.tokenizer.pad_token_id)
        for j in (0, 8, 16)
    ]

    def train(dtype):
        torch.manual_seed(0)
        model = qwen.add_lora(qwen.load_model(str(tiny_model), "cpu", dtype), 16, 16, 0.0, TARGETS)
        lora = [p for p in model.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 for p in lora)  # peft keeps the trained weights in fp32
        optimizer = torch.optim.AdamW(lora, lr=3e-3)
        scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
        losses = []
        for step in range(24):
            with torch.autocast("cpu", dtype=torch.float16, enabled=dtype == torch.float16):
                loss = model(**batches[step % 3]).loss
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    fp32, fp16 = train(torch.float32), train(torch.float16)
    assert all(math.isfinite(x) for x in fp16)
    assert fp16[-1] < 0.9 * fp16[0]
    assert max(abs(a - b) / b for a, b in zip(fp16, fp32)) < 0.02


# ------------------------------------------------------------------------------------------------------ train.py wiring
def test_train_records_which_settings_the_user_gave():
    import train

    def set_by_user(settings):
        return sorted(memory_plan.user_settings(settings))

    assert set_by_user(train.read_settings([])) == []
    assert set_by_user(train.read_settings(["--batch-size", "8"])) == ["batch_size"]
    low = train.read_settings(["--low-memory"])
    assert set_by_user(low) == ["batch_size", "grad_accum", "gradient_checkpointing"] and low.precision == "auto"
    with pytest.raises(cli.UserError, match="--precision must be one of"):
        train.read_settings(["--precision", "fp8"])


def test_fp16_training_on_the_cpu_is_refused_in_one_line(tiny_model, shapes_24, tmp_path):
    from helpers import QUICK, run_script, train_args

    done = run_script(
        "train.py",
        *train_args(tiny_model, shapes_24, tmp_path / "out"),
        *QUICK,
        "--precision",
        "fp16",
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: --precision fp16 needs a CUDA GPU")


def test_the_plan_is_saved_beside_the_adapter(trained):
    from vlcap import formats

    settings = formats.read_train_settings(trained[0])
    assert settings["precision"] == "fp32" and settings["memory_plan"]["precision"] == "fp32"
    assert settings["memory_plan"]["card"] is None and "batch_size" in settings["set_by_user"]
