"""The fast path computes the same training as the plain one, for every family: same losses, same weights."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from transformers import AutoProcessor

from vlcap import caption_trainer, fused_layers, qwen, training_data, vision_attention, vision_encoding

import train
from helpers import FAMILIES, QUICK, TEST_IMAGE_SIZE, Losses, compared_args, for_family, needs_fast_paths, train_args


def train_run(model_dir, data_json, out, arch, *extra) -> tuple[list[float], dict, dict]:
    """(logged losses, adapter weights, train_settings.json) of 6 steps without dropout."""
    from safetensors.torch import load_file

    losses = Losses()
    train.main(
        [
            *train_args(model_dir, data_json, out),
            "--max-steps",
            "6",
            "--lora-dropout",
            "0",
            "--swanlab-mode",
            "disabled",
            *for_family(QUICK, arch),
            *extra,
        ],
        callbacks=[losses],
    )
    settings = json.loads((out / "adapter" / "train_settings.json").read_text())
    return losses.values, load_file(out / "adapter" / "adapter_model.safetensors"), settings


@needs_fast_paths
@pytest.mark.parametrize("arch", FAMILIES)
def test_fast_and_plain_paths_train_the_same(tiny_models, shapes_24, tmp_path, arch, monkeypatch):
    """Plain: pictures decoded per step, vision tower every step, full logits, per-batch padding.

    Fast: vision tower once (cache), precomputed positions, fixed padding, logits on caption positions only. Both fp32
    on the CPU from the same seed, dropout off (its random draws depend on the padded shape, so they would differ by
    design). The only differences left are summation order in padded attention and the LM head: ~1e-7 relative, so
    1e-4 on the losses and 1e-4 on the weights after 6 steps leaves room for rounding but not for a masking or
    normalisation bug (a wrong label shift or token count moves the loss by far more than 1%). Qwen3-VL: without its
    DeepStack features the fast path's losses move by ~3e-4, and the test checks that they do.
    """
    plain_losses, plain_weights, settings = train_run(
        tiny_models[arch], shapes_24, tmp_path / "plain", arch, "--vision-cache-gb", "0"
    )
    assert not settings["vision_cache"]
    assert [h["loss"] for h in settings["log_history"]] == plain_losses  # what bench/bench.py reads
    fast_losses, fast_weights, settings = train_run(tiny_models[arch], shapes_24, tmp_path / "fast", arch)
    assert settings["vision_cache"]
    assert len(plain_losses) == len(fast_losses) == 6
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(plain_losses), rtol=1e-4, atol=0)
    assert plain_losses[0] != plain_losses[-1], "the weights should have moved"
    for name, weight in plain_weights.items():  # fp32 rounding apart (the patch embedding is a product, not a conv)
        torch.testing.assert_close(fast_weights[name], weight, rtol=1e-4, atol=3e-6)

    if arch == "qwen3_vl":  # the comparison above can tell a fast path that leaves the DeepStack features out
        monkeypatch.setattr(
            caption_trainer, "_with_deepstack", lambda masks, embeds, module, args, kwargs: (args, kwargs)
        )
        without, _, _ = train_run(tiny_models[arch], shapes_24, tmp_path / "no-deepstack", arch)
        gap = (torch.tensor(without) - torch.tensor(plain_losses)).abs() / torch.tensor(plain_losses)
        agree = (torch.tensor(fast_losses) - torch.tensor(plain_losses)).abs() / torch.tensor(plain_losses)
        assert gap.max() > 1e-4 and gap.max() > 100 * agree.max(), (gap, agree)


@pytest.mark.parametrize("arch", FAMILIES)
def test_gradient_accumulation_trains_as_one_batch(tiny_models, shapes_24, tmp_path, arch):
    """Batch 4 in one step, or 2 x 2 accumulated (with checkpointing, as --low-memory runs): the same losses and weights,
    on both paths. (Qwen2.5-VL declares it takes no loss arguments; Trainer then divided the fast path's loss, already
    normalised by the accumulated batch's tokens, by the accumulation steps again: losses and gradients a factor 2 off.)"""
    for path, extra in (("fast", []), ("plain", ["--vision-cache-gb", "0"])):
        one, one_weights, _ = train_run(tiny_models[arch], shapes_24, tmp_path / f"{path}-1", arch, *extra)
        accumulated, weights, _ = train_run(
            tiny_models[arch],
            shapes_24,
            tmp_path / f"{path}-2",
            arch,
            *extra,
            "--batch-size",
            "2",
            "--grad-accum",
            "2",
            "--gradient-checkpointing",
        )
        torch.testing.assert_close(torch.tensor(accumulated), torch.tensor(one), rtol=1e-4, atol=0)
        for name, weight in one_weights.items():
            torch.testing.assert_close(weights[name], weight, rtol=1e-4, atol=1e-6)


@needs_fast_paths
@pytest.mark.parametrize("arch", FAMILIES)
def test_encoded_batch_keeps_exactly_the_caption_labels(tiny_models, shapes_24, arch):
    tiny_model = tiny_models[arch]
    processor = AutoProcessor.from_pretrained(tiny_model)
    items = json.loads(shapes_24.read_text())[:5]
    for i, item in enumerate(items):  # captions of different lengths, so rows end at different places
        item["conversations"][1]["value"] = " ".join(["a red circle"] * (i + 1))
    dataset = training_data.CaptionDataset(items, processor, "COCO Yes:", TEST_IMAGE_SIZE[arch], 8192)
    plain = training_data.collate([dataset[i] for i in range(5)], processor.tokenizer.pad_token_id)
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    examples = [
        {
            "input_ids": e["input_ids"],
            "labels": e["labels"],
            "position_ids": torch.zeros(3, len(e["input_ids"])),
            "image_positions": (e["input_ids"] == image_token).nonzero()[:, 0],
            "index": i,
        }
        for i, e in enumerate(dataset[j] for j in range(5))
    ]
    pad_to = plain["input_ids"].shape[1] + 8
    batch = caption_trainer.collate_encoded(examples, processor.tokenizer.pad_token_id, pad_to)
    assert batch["input_ids"].shape == (5, pad_to)
    keep = batch["logits_to_keep"]
    # Position t's logits predict token t + 1: the kept labels are the shifted labels at the kept positions, all of them.
    shifted = torch.nn.functional.pad(plain["labels"], (0, 8), value=-100)[:, 1:]
    assert torch.equal(batch["shift_labels"], shifted[:, keep])
    assert batch["shift_labels"].ne(-100).sum() == plain["labels"].ne(-100).sum() == batch["caption_tokens"]
    assert keep[0] == int((plain["labels"] != -100).int().argmax(1).min()) - 1

    # No attention mask: every row is its tokens, then padding only (causal attention never lets a token see padding).
    assert "attention_mask" not in batch
    for row, e in enumerate(examples):
        assert torch.equal(batch["input_ids"][row, : len(e["input_ids"])], e["input_ids"])
        assert (batch["input_ids"][row, len(e["input_ids"]) :] == processor.tokenizer.pad_token_id).all()
    # Image features go to exactly the image tokens' places, row after row.
    flat = batch["input_ids"].flatten()
    assert torch.equal(batch["image_positions"], (flat == image_token).nonzero()[:, 0])


@needs_fast_paths
@pytest.mark.parametrize("arch", FAMILIES)
def test_batched_vision_attention_gives_transformers_per_picture_features(tiny_models, arch):
    """One attention call for pictures of one size equals transformers' call per picture (Qwen2.5-VL's windowed blocks:
    per window), DeepStack features included; other sizes are left alone."""
    import numpy as np
    from PIL import Image

    model, processor = qwen.load_model(str(tiny_models[arch]), "cpu"), AutoProcessor.from_pretrained(tiny_models[arch])
    unit = qwen.image_unit(processor)

    def features(sides, batched):
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sides]
        inputs = processor.image_processor(images=images, return_tensors="pt")
        grid = inputs["image_grid_thw"]
        with (
            torch.no_grad(),
            vision_attention.batched(model, vision_attention.patches_per_image(grid) if batched else None),
        ):
            out = model.model.get_image_features(inputs["pixel_values"], grid, return_dict=True)
        return [torch.cat(level) for level in (out.pooler_output, *(getattr(out, "deepstack_features", None) or ()))]

    def same_batched_or_not(sides):
        expected, got = features(sides, batched=False), features(sides, batched=True)
        assert len(got) == vision_encoding.feature_levels(model.config)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        return expected[0]

    sides = [(2 * unit, 3 * unit)] * 4
    assert same_batched_or_not(sides).shape == (4 * 6, model.config.text_config.hidden_size)
    assert "forward" not in vars(model.model.visual.blocks[0].attn), "the tower's own forward is back after the block"
    if arch == "qwen2_5_vl":  # windows of 2x2 merged tokens over 13x9: full, edge and corner windows (16, 8, 4 patches)
        tower = model.model.visual
        assert set(tower.fullatt_block_indexes) != set(range(len(tower.blocks))), "needs a windowed block"
        tower.window_size = 2 * unit
        windowed = same_batched_or_not([(9 * unit, 13 * unit)] * 3)
        tower.window_size = 16 * unit  # one window per picture: what the windowed blocks compute differs
        assert not torch.allclose(windowed, features([(9 * unit, 13 * unit)] * 3, batched=True)[0])
    assert vision_attention.patches_per_image(torch.tensor([[1, 4, 6], [1, 4, 6]])) == 24
    assert vision_attention.patches_per_image(torch.tensor([[1, 4, 6], [1, 6, 4]])) is None


@needs_fast_paths
@pytest.mark.parametrize("arch", FAMILIES)
def test_the_towers_rotary_turns_queries_and_keys_as_the_family_does(arch):
    """rotary_queries_and_keys (four passes over q and k together) against the family's apply_rotary_pos_emb_vision:
    bit for bit in fp32, bf16 and fp16, from a strided view of the attention's qkv output, with and without gradients
    (a sign or a half swapped the wrong way fails it at once)."""
    import importlib

    family = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}").apply_rotary_pos_emb_vision
    torch.manual_seed(0)
    length, heads, dim = 50, 4, 16
    angles = torch.randn(length, dim // 2) * 5
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        qkv = (torch.randn(length, 3, heads, dim) * 3).to(dtype)
        q, k = family(qkv[:, 0], qkv[:, 1], cos, sin)
        turned = vision_attention.rotary_queries_and_keys(qkv[:, :2], cos, sin)
        assert turned.dtype == dtype and torch.equal(turned[:, 0], q) and torch.equal(turned[:, 1], k)
        with torch.enable_grad():
            graded = vision_attention.rotary_queries_and_keys(qkv[:, :2].clone().requires_grad_(), cos, sin)
        assert graded.requires_grad and torch.equal(graded.detach(), turned)


@needs_fast_paths
def test_the_compiled_tower_encodes_as_the_eager_one_and_gives_way_when_compiling_fails(
    tiny_model, shapes_24, monkeypatch, capsys
):
    """The encoding with the tower's rotary and MLPs through torch.compile (Inductor, as on a GPU; here its CPU code):
    the eager tower's features to float rounding, with the tower's own modules back afterwards. A compiler that fails
    leaves a note and the eager features, not an error."""
    from torch._dynamo.utils import counters
    from transformers import AutoConfig

    model, processor = qwen.load_model(str(tiny_model), "cpu"), AutoProcessor.from_pretrained(tiny_model)
    items = json.loads(shapes_24.read_text())[:8]
    dataset = training_data.CaptionDataset(items, processor, "COCO Yes:", TEST_IMAGE_SIZE["qwen2_vl"], 8192)
    config = AutoConfig.from_pretrained(tiny_model)

    def encode(compiled):
        encoding = vision_encoding.start_encoding(dataset, config, workers=0, batch_size=4)
        return vision_encoding.finish_encoding(model, *encoding, compiled=compiled)[1].on_device

    eager = encode(False)
    graphs = counters["stats"]["unique_graphs"]
    mlp = model.model.visual.blocks[0].mlp
    torch.testing.assert_close(encode(True), eager, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] >= graphs + 2, "the rotary and the MLP should each have been compiled"
    assert model.model.visual.blocks[0].mlp is mlp

    class Fails(torch.nn.Module):  # what torch.compile hands back where it cannot compile: it fails when called
        def forward(self, *args, **kwargs):
            raise RuntimeError("no C compiler")

    monkeypatch.setattr(vision_attention, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", lambda function, **settings: Fails())
    assert torch.equal(encode(True), eager)
    assert (
        "the vision tower runs uncompiled: compiling it failed (RuntimeError: no C compiler)" in capsys.readouterr().out
    )
    assert model.model.visual.blocks[0].mlp is mlp


@needs_fast_paths
@pytest.mark.parametrize("arch", FAMILIES)
def test_fused_rms_norms_replace_every_language_model_norm_with_its_own_output(tiny_models, arch):
    """Inside fused_rms_norms every RMSNorm of the language model (two a layer, the final one, Qwen3's q and k norms)
    gives what its class's forward gives, to rounding (fp32 and bf16); the tower's norms are left alone, and every norm
    has its own forward again after the block."""
    model = qwen.load_model(str(tiny_models[arch]), "cpu")
    language_model, tower = model.model.language_model, model.model.visual
    norms = [m for m in language_model.modules() if type(m).__name__.endswith("RMSNorm")]
    layers = len(language_model.layers)
    assert len(norms) == (4 * layers if arch == "qwen3_vl" else 2 * layers) + 1
    torch.manual_seed(0)
    with fused_layers.fused_rms_norms(model):
        assert all("forward" in vars(norm) for norm in norms)
        assert not any("forward" in vars(m) for m in tower.modules() if type(m).__name__.endswith("RMSNorm"))
        for norm in norms:
            norm.weight.data.uniform_(0.5, 1.5)
            for (dtype, tolerance), scale in itertools.product(
                ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)), (4, 1e-3)
            ):
                x, norm = (torch.randn(3, 5, norm.weight.shape[0]) * scale).to(dtype), norm.to(dtype)
                fused, own = norm(x), type(norm).forward(norm, x)  # scale 1e-3: eps counts
                assert fused.dtype == own.dtype
                torch.testing.assert_close(fused, own, rtol=tolerance, atol=0)
            norm.float()
    assert not any("forward" in vars(norm) for norm in norms)
    with fused_layers.fast_training(model, active=True, autocast=False):  # what train.py trains inside
        assert all("forward" in vars(norm) for norm in norms)
    with fused_layers.fast_training(model, active=False, autocast=False):  # the plain path
        assert not any("forward" in vars(norm) for norm in norms)


def losses_and_adapter(tiny_model, shapes_24, out, precision: str, callback) -> tuple[list[float], dict]:
    """A short compared run (dropout off) at `precision` with `callback`: its logged losses and its adapter's weights."""
    from safetensors.torch import load_file

    losses = Losses()
    args = compared_args(tiny_model, shapes_24, "--precision", precision, "--swanlab-mode", "disabled")
    train.main([*args, "--output-dir", str(out)], callbacks=[losses, callback])
    return losses.values, load_file(out / "adapter" / "adapter_model.safetensors")


@needs_fast_paths
def test_lora_takes_its_input_in_bf16_on_the_fast_path_and_learns_the_same(
    tiny_model, shapes_24, tmp_path, monkeypatch
):
    """bf16 autocast on the CPU, dropout off: with peft's fp32 copy of each LoRA input (the context made a no-op) and
    without it, the same losses and weights bit for bit (the copies are exact both ways). The flag must be off during
    the steps and on again after them: the run's sample captions, without autocast, need peft's copy (bf16 inputs
    against fp32 LoRA weights fail)."""
    import contextlib

    from transformers import TrainerCallback

    seen = set()

    class Casting(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.update(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))

    def run(out):
        return losses_and_adapter(tiny_model, shapes_24, out, "bf16", Casting())

    as_given, weights = run(tmp_path / "as-given")
    assert seen == {False}
    seen.clear()
    monkeypatch.setattr(fused_layers, "lora_inputs_as_given", lambda *a: contextlib.nullcontext())
    copied, weights_copied = run(tmp_path / "copied")
    assert seen == {True}
    assert as_given == copied and len(as_given) == 4 and as_given[0] != as_given[-1]
    for name, weight in weights_copied.items():
        assert torch.equal(weights[name], weight), name


@needs_fast_paths
def test_lora_update_summed_inside_the_product_learns_what_peft_learns(tiny_model, shapes_24, tmp_path, monkeypatch):
    """fused_layers.lora_sum_in_product against peft's own forward (the context made a no-op), fp32, dropout off: the same
    losses and weights to rounding. The fused forward is on for every LoRA layer during the steps only (the run's sample
    captions after training go through peft's)."""
    import contextlib

    from peft.tuners.lora import Linear
    from transformers import TrainerCallback

    seen = []

    class Fused(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            layers = [m for m in model.modules() if isinstance(m, Linear)]
            seen.append(sum("forward" in vars(m) for m in layers) / len(layers))

    def run(out):
        return losses_and_adapter(tiny_model, shapes_24, out, "fp32", Fused())

    models, original = [], fused_layers.lora_sum_in_product

    def recorded(model, active=True):
        models.append(model)
        return original(model, active)

    monkeypatch.setattr(fused_layers, "lora_sum_in_product", recorded)
    fused, weights = run(tmp_path / "fused")
    assert seen and set(seen) == {1.0}, "every LoRA layer should take the fused forward during the steps"
    assert models and all("forward" not in vars(m) for m in models[0].modules()), "peft's forward after training"
    monkeypatch.setattr(fused_layers, "lora_sum_in_product", lambda *a, **k: contextlib.nullcontext())
    seen.clear()
    plain, weights_plain = run(tmp_path / "peft")
    assert set(seen) == {0.0}
    assert len(fused) == 4 and fused[0] != fused[-1]
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=0)
    for name, weight in weights_plain.items():
        torch.testing.assert_close(weights[name], weight, rtol=1e-4, atol=1e-6, msg=name)


def test_low_memory_keeps_the_effective_batch():
    args = train.read_settings(["--low-memory", "--batch-size", "16", "--grad-accum", "1"])
    assert (args.batch_size, args.grad_accum, args.gradient_checkpointing, args.cuda_graphs) == (4, 4, True, False)


def test_encoding_holds_no_open_file_per_picture(tiny_model, shapes_132):
    """The workers' examples must not stay as shared-memory files in the main process: with 256 open files allowed,
    132 pictures (4 tensors each) are encoded. (Sent as tensors they failed this way at 5,000 pictures on the GPU
    machine: "received 0 items of ancdata".)"""
    import subprocess
    import sys

    from helpers import REPO

    script = f"""
import resource, sys
sys.path[:0] = [{str(REPO)!r}]
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from vlcap import caption_trainer, formats, fused_layers, qwen, training_data, vision_encoding
from transformers import AutoConfig
items = formats.read_conversations({str(shapes_132)!r})
processor = qwen.load_processor({str(tiny_model)!r})
dataset = training_data.CaptionDataset(items, processor, "COCO Yes:", 56, 8192)
encoding = vision_encoding.start_encoding(dataset, AutoConfig.from_pretrained({str(tiny_model)!r}), workers=2)
examples, features = vision_encoding.finish_encoding(qwen.load_model({str(tiny_model)!r}, "cpu"), *encoding)
print(len(examples), tuple(features.shape))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-1500:]
    assert result.stdout.split("\n")[-2].startswith("132 (132, 1, 4,")  # pictures, feature levels, image tokens
