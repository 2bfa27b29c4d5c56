"""The pipeline on each Qwen-VL family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), on their tiny folders: the folder decides the
model class, the image size and the LoRA targets; labels, learning, resuming, captioning, merging and the fallback line
work for each. (Qwen2-VL's learning, resume and merge tests are in test_train.py and test_infer.py; the fast paths'
comparisons for every family in test_fastpath.py and test_fastdecode.py.)"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import transformers
from PIL import Image
from test_fastpath import train_run

from vlcap import captioning, cli, compat, formats, images, qwen, training_data, vision_encoding

import infer
import train
from helpers import (
    FAMILIES,
    FAST_PATHS,
    QUICK,
    TEST_IMAGE_SIZE,
    CrashAt,
    assert_same_adapter,
    for_family,
    load_captioner,
    needs_fast_paths,
    resumable_args,
    train_args,
)

UNIT = {"qwen2_vl": 28, "qwen2_5_vl": 28, "qwen3_vl": 32}  # pixels per image token side: patch 14 or 16, merged 2x2
NEWER = ["qwen2_5_vl", "qwen3_vl"]  # the families added to Qwen2-VL's pipeline
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("arch", FAMILIES)
def test_the_folder_decides_the_model_class_and_the_image_size(tiny_models, arch):
    from make_offline_model import FAMILIES as BUILT

    assert qwen.model_class(tiny_models[arch]) is getattr(transformers, BUILT[arch].model_class)
    processor = qwen.load_processor(tiny_models[arch])
    unit = UNIT[arch]
    default = {28: 280, 32: 288}[unit]
    assert qwen.image_unit(processor) == unit
    assert qwen.resolve_image_size(processor, None) == default
    assert qwen.resolve_image_size(processor, 0) == 0 and qwen.resolve_image_size(processor, 2 * unit) == 2 * unit
    with pytest.raises(
        cli.UserError,
        match=rf"image size {unit + 4} is not a multiple of {unit} .* e\.g\. {default - unit} or {default}, or 0",
    ):
        qwen.resolve_image_size(processor, unit + 4)
    assert vision_encoding.image_token_count(processor, default) == (default // unit) ** 2  # 100 or 81 tokens


def test_a_folder_of_another_architecture_is_one_line_naming_those_supported(shapes_24, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    supported = r"'llava' model; supported: qwen2_vl \(Qwen2-VL\), qwen2_5_vl \(Qwen2\.5-VL\), qwen3_vl \(Qwen3-VL\)\.$"
    for load in (qwen.model_class, qwen.load_processor):
        with pytest.raises(cli.UserError, match=supported):
            load(tmp_path)
    with pytest.raises(cli.UserError, match=supported):
        train.main(
            ["--model-dir", str(tmp_path), "--data-json", str(shapes_24), "--output-dir", str(tmp_path / "o"), *QUICK]
        )


@pytest.mark.parametrize("arch", FAMILIES)
def test_lora_goes_on_the_language_models_projections_and_a_wrong_name_is_an_error(
    tiny_models, shapes_24, tmp_path, arch
):
    assert qwen.lora_target_names(tiny_models[arch]) == PROJECTIONS  # from the config, on the meta device
    model = qwen.load_model(str(tiny_models[arch]), "cpu")
    assert qwen.lora_target_names(model) == PROJECTIONS
    vision_mlp = {name.rsplit(".", 1)[-1] for name, _ in model.model.visual.named_modules() if ".mlp." in name}
    if arch == "qwen2_5_vl":
        assert {"gate_proj", "up_proj", "down_proj"} <= vision_mlp, "Qwen2.5-VL's vision MLP shares the names"
    model = qwen.add_lora(model, 4, 8, 0.0, train.LORA_TARGETS)
    lora = {name.split(".lora_")[0] for name, _ in model.named_parameters() if ".lora_" in name}
    n_layers = model.config.text_config.num_hidden_layers
    assert len(lora) == 7 * n_layers and all(".language_model.layers." in name for name in lora), sorted(lora)

    wrong = r"--lora-targets qkv, gate: no language-model layer has such a projection; this model's are q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj\.$"
    with pytest.raises(cli.UserError, match=wrong):
        qwen.check_lora_targets(tiny_models[arch], "q_proj,qkv,gate")
    with pytest.raises(cli.UserError, match=wrong):  # before the model loads or any picture is encoded
        train.main(
            [
                *train_args(tiny_models[arch], shapes_24, tmp_path / "o"),
                "--lora-targets",
                "q_proj,qkv,gate",
                *for_family(QUICK, arch),
            ]
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("arch", FAMILIES)
def test_labels_are_the_caption_and_its_closing_im_end(tiny_models, arch):
    """Pictures of several sizes through the family's own processor and chat template: the image tokens are the
    merged patches, and only the caption and <|im_end|> are labels (not the system prompt, image, prompt or padding)."""
    processor = qwen.load_processor(tiny_models[arch])
    tok, unit, patch = processor.tokenizer, UNIT[arch], UNIT[arch] // 2
    sides = [(2 * unit, 2 * unit), (4 * unit, 3 * unit), (5 * unit, 2 * unit), (3 * unit, 6 * unit)]
    captions = ["a red circle", "a long caption about a small blue square drawn on white", "one", "a green triangle"]
    examples = [
        training_data.encode_example(processor, Image.new("RGB", side, "white"), caption, "COCO Yes:", 8192)
        for side, caption in zip(sides, captions)
    ]
    batch = training_data.collate(examples, tok.pad_token_id)

    grid = batch["image_grid_thw"]
    assert [tuple(g[1:].tolist()) for g in grid] == [(h // patch, w // patch) for w, h in sides]
    image_token = tok.convert_tokens_to_ids("<|image_pad|>")
    assert (batch["input_ids"] == image_token).sum(1).tolist() == (grid.prod(-1) // 4).tolist()
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == image_token)
    # The family's template: Qwen2-VL and Qwen2.5-VL write a default system prompt, Qwen3-VL none.
    assert tok.decode(batch["input_ids"][0, :3]).startswith("<|im_start|>system") is (arch != "qwen3_vl")

    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for row, caption in enumerate(captions):
        labels, ids, mask = batch["labels"][row], batch["input_ids"][row], batch["attention_mask"][row]
        learnt = labels != -100
        assert tok.decode(labels[learnt]) == caption + "<|im_end|>"
        assert labels[learnt][-1] == im_end and torch.equal(labels[learnt], ids[learnt])
        n_real = int(mask.sum())
        assert learnt.nonzero().max() == n_real - 1 and learnt.nonzero().min() == n_real - learnt.sum()
        assert (ids[n_real:] == tok.pad_token_id).all() and not mask[n_real:].any()

    model = qwen.load_model(str(tiny_models[arch]), "cpu")
    assert torch.isfinite(model(**batch).loss)


@pytest.mark.parametrize("arch", NEWER)  # Qwen2-VL's: tests/test_train.py
def test_learns_colour_and_shape_from_the_pictures(trained_family, tiny_models, arch):
    adapter, output = trained_family(arch)
    settings = formats.read_train_settings(adapter)
    assert settings["model_dir"] == str(tiny_models[arch]) and settings["image_size"] == TEST_IMAGE_SIZE[arch]
    # The fast path where the installed transformers is the tested one; else (Python 3.10) the plain path, which must learn too.
    assert settings["vision_cache"] == FAST_PATHS, (
        "the fast path should have trained it" if FAST_PATHS else "the plain path should"
    )
    model, processor, _ = load_captioner(adapter)
    test = formats.read_conversations(settings["test_json"])
    pictures = [images.load(formats.image_of(it), settings["image_size"]) for it in test]
    captions = captioning.caption_images(model, processor, pictures, "COCO Yes:", max_new_tokens=16)
    both = sum(
        all(word in caption.split() for word in formats.caption_of(item).split()[1:3])
        for item, caption in zip(test, captions)
    )
    print(f"{arch}: colour and shape right for {both}/{len(test)} held-out pictures (chance 8%)")
    assert both / len(test) >= 2 / 12, f"both right for only {both}/{len(test)}: captions {captions}"


@pytest.mark.parametrize("arch", NEWER)  # Qwen2-VL's: tests/test_train.py
def test_resume_matches_an_uninterrupted_run(tiny_models, shapes_24, tmp_path, arch):
    def common(out):
        return resumable_args(tiny_models[arch], shapes_24, out, for_family(QUICK, arch))

    train.main(common(tmp_path / "a"))
    with pytest.raises(KeyboardInterrupt):
        train.main(common(tmp_path / "b"), callbacks=[CrashAt(3)])
    train.main([*common(tmp_path / "b"), "--resume"])
    state = json.loads((tmp_path / "b" / "checkpoint-6" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4, 5, 6]
    assert_same_adapter(tmp_path / "a" / "adapter", tmp_path / "b" / "adapter")


@pytest.mark.parametrize("arch", NEWER)  # Qwen2-VL's: tests/test_infer.py
def test_infer_captions_at_the_adapters_size_and_the_merged_folder_captions_the_same(trained_family, arch, tmp_path):
    adapter, _ = trained_family(arch)
    model, processor, settings = load_captioner(adapter)
    paths = [formats.image_of(it) for it in formats.read_conversations(settings["test_json"])[:4]]
    pictures = [images.load(p, TEST_IMAGE_SIZE[arch]) for p in paths]
    expected = captioning.caption_images(model, processor, pictures, settings["prompt"], max_new_tokens=16)

    out = tmp_path / "captions.jsonl"
    assert (
        infer.main(
            ["--adapter", str(adapter), "--device", "cpu", "--output", str(out), "--max-new-tokens", "16", *paths]
        )
        == 0
    )
    assert [json.loads(line)["caption"] for line in out.read_text().splitlines()] == expected

    assert infer.main(["--adapter", str(adapter), "--device", "cpu", "--merge", str(tmp_path / "merged")]) == 0
    merged = qwen.model_class(tmp_path / "merged").from_pretrained(tmp_path / "merged").eval()  # no peft needed
    merged_processor = qwen.load_processor(tmp_path / "merged")
    assert (
        captioning.caption_images(merged, merged_processor, pictures, settings["prompt"], max_new_tokens=16) == expected
    )


def test_the_default_image_size_is_the_models_and_is_saved(tiny_models, shapes_24, tmp_path):
    """Qwen3-VL's 16-pixel patches: 288 by default (81 image tokens), saved for infer.py; 56 is refused in one line."""
    at = QUICK.index("--image-size")
    quick = QUICK[:at] + QUICK[at + 2 :]  # the default image size
    model_dir = str(tiny_models["qwen3_vl"])
    common = ["--model-dir", model_dir, "--data-json", str(shapes_24), "--max-steps", "1", "--swanlab-mode", "disabled"]
    with pytest.raises(cli.UserError, match="image size 56 is not a multiple of 32 .* e.g. 256 or 288"):
        train.main([*common, "--output-dir", str(tmp_path / "bad"), *quick, "--image-size", "56"])
    train.main([*common, "--output-dir", str(tmp_path / "out"), *quick])
    assert formats.read_adapter_settings(tmp_path / "out" / "adapter").image_size == 288

    out = tmp_path / "base.jsonl"  # the base model alone: its own default
    picture = formats.image_of(formats.read_conversations(shapes_24)[0])
    assert (
        infer.main(
            [
                "--no-adapter",
                "--model-dir",
                model_dir,
                "--device",
                "cpu",
                "--output",
                str(out),
                "--max-new-tokens",
                "2",
                picture,
            ]
        )
        == 0
    )


@needs_fast_paths
def test_a_family_lacking_what_the_fast_path_needs_trains_through_the_plain_path(
    tiny_models, shapes_24, tmp_path, monkeypatch, capsys
):
    """Qwen3-VL's fast path passes the cached DeepStack features to the language model; a transformers whose
    Qwen3VLTextModel took them otherwise gets one line and the plain path, with the plain path's losses."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    model_dir = tiny_models["qwen3_vl"]
    plain, _, plain_settings = train_run(model_dir, shapes_24, tmp_path / "plain", "qwen3_vl", "--vision-cache-gb", "0")
    assert not plain_settings["vision_cache"]

    forward = modeling_qwen3_vl.Qwen3VLTextModel.forward

    def renamed(self, *args, **kwargs):  # the same model, its signature without the DeepStack arguments
        return forward(self, *args, **kwargs)

    signature = inspect.signature(forward)
    renamed.__signature__ = signature.replace(
        parameters=[
            p for n, p in signature.parameters.items() if n not in ("visual_pos_masks", "deepstack_visual_embeds")
        ]
    )
    renamed.__qualname__ = forward.__qualname__
    monkeypatch.setattr(modeling_qwen3_vl.Qwen3VLTextModel, "forward", renamed)
    monkeypatch.setattr(compat, "_said", set())
    assert compat.problem("fast training") is None, "what every family shares is there"
    capsys.readouterr()
    guarded, _, settings = train_run(model_dir, shapes_24, tmp_path / "guarded", "qwen3_vl")  # defaults: fast if it can
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert notes == [
        f"note: fast training off, using the plain path instead: transformers {transformers.__version__} lacks what it relies on "
        "(Qwen3VLTextModel.forward has no visual_pos_masks, deepstack_visual_embeds)."
    ]
    assert not settings["vision_cache"] and guarded == plain
