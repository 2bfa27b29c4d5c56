"""LoRA fine-tune Qwen2-VL-2B-Instruct to caption images, logging curves and sample captions to SwanLab.

    python train.py                                    # the tutorial's run: data_vl.json, 2 epochs, adapter in output/
    python train.py --model-dir models/Qwen2-VL-2B-Instruct --epochs 1
    python train.py --resume                           # continue an interrupted run from its last checkpoint
    torchrun --nproc_per_node 2 train.py               # data parallel on 2 GPUs

Every UPPER_CASE setting below is also a --lower-case flag (`python train.py --help` lists them). The last TEST_SIZE
conversations are held out (data_vl_test.json) and captioned after training. The adapter, its processor and every
setting of the run (train_settings.json) are saved to OUTPUT_DIR/adapter; infer.py reads them back so it captions with
the same prompt and image size. The last line printed names the adapter folder.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import cli
import infer

MODEL_DIR: str = "Qwen/Qwen2-VL-2B-Instruct"  # local Qwen2-VL folder, or a ModelScope id to download
DATA_JSON: str = "data_vl.json"  # conversations written by csv2json.py
OUTPUT_DIR: str = "output/Qwen2-VL-2B"  # checkpoints, and the final adapter in OUTPUT_DIR/adapter
TEST_SIZE: int = 4  # last conversations held out (data_vl_test.json) and captioned after training
PROMPT: str = "COCO Yes:"  # user prompt before each caption; infer.py reuses the one saved with the adapter
IMAGE_SIZE: int = 280  # images resized to IMAGE_SIZE x IMAGE_SIZE (multiple of 28; 0 = each image's own size)
MAX_LENGTH: int = 8192  # longest training sequence in tokens; longer captions are cut, image tokens never
LORA_R: int = 64  # LoRA rank
LORA_ALPHA: int = 16  # LoRA scaling numerator (scale = alpha / r)
LORA_DROPOUT: float = 0.05  # dropout on the LoRA input
LORA_TARGETS: cli.CommaSeparated = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # language-model projections given LoRA
EPOCHS: int = 2  # passes over the training conversations
MAX_STEPS: int = -1  # stop after this many optimizer steps (-1: run all EPOCHS)
BATCH_SIZE: int = 16  # conversations per device per forward pass
GRAD_ACCUM: int = 1  # forward passes per optimizer step (effective batch = BATCH_SIZE x GRAD_ACCUM x processes)
LEARNING_RATE: float = 1e-4  # peak learning rate (linear decay to 0)
GRADIENT_CHECKPOINTING: bool = False  # recompute activations in the backward pass: less memory, slower
LOW_MEMORY: bool = False  # a quarter of BATCH_SIZE with 4x GRAD_ACCUM (same effective batch) and checkpointing: within 8 GB
VISION_CACHE_GB: float = 8.0  # run the frozen vision tower once per picture and keep its output if it fits (0: every step)
CUDA_GRAPHS: bool = True  # replay each decoder layer's forward and backward as CUDA graphs (GPU, with the vision cache)
LOGGING_STEPS: int = 10  # log the loss every this many optimizer steps
SAVE_STEPS: int = 100  # write a resumable checkpoint every this many optimizer steps (and at the end)
SEED: int = 42  # seed for LoRA initialisation, dropout and data order
DEVICE: str = "auto"  # auto (the GPU; error without one), cuda, or cpu (tests and the smoke run)
WORKERS: int = 8  # DataLoader processes decoding and tokenising pictures
RESUME: bool = False  # continue from the last checkpoint in OUTPUT_DIR
OVERWRITE: bool = False  # start afresh even though OUTPUT_DIR holds checkpoints of an earlier run (they are replaced)
SAMPLE_MAX_NEW_TOKENS: int = 64  # longest caption generated for the held-out and evaluation pictures
EVAL_JSON: str = "data_vl_eval.json"  # evaluation split with reference captions (csv2json.py of data2csv.py --split validation)
EVAL_SIZE: int = 100  # first pictures of EVAL_JSON captioned and scored (BLEU-1..4, ROUGE-L, CIDEr); 0 = no evaluation
EVAL_BEFORE: bool = True  # also score the base model before training, so every run shows its gain
EVAL_BATCH_SIZE: int = 32  # pictures per captioning batch when captioning for evaluation
SWANLAB_PROJECT: str = "Qwen2-VL-finetune"  # SwanLab project the run is logged to
SWANLAB_EXPERIMENT: str = "qwen2-vl-coco2014"  # SwanLab experiment name
SWANLAB_MODE: str | None = None  # cloud, offline, local or disabled (default: cloud with an API key, else offline)


# ------------------------------------------------------------------------------------------------------------------ data
def split_paths(data_json: str | Path) -> tuple[Path, Path]:
    """data_vl.json -> (data_vl_train.json, data_vl_test.json) beside it, the tutorial's file names."""
    p = Path(data_json)
    return p.with_name(f"{p.stem}_train.json"), p.with_name(f"{p.stem}_test.json")


def hold_out(items: list[dict], test_size: int, data_json: str | Path, write: bool = True) -> tuple[list[dict], list[dict]]:
    """Split off the last test_size conversations and write both halves beside data_json (one process writes)."""
    if not 0 <= test_size < len(items):
        raise cli.UserError(f"--test-size {test_size} leaves nothing to train on ({len(items)} conversations).")
    train, test = items[: len(items) - test_size], items[len(items) - test_size :]
    if write:
        for path, part in zip(split_paths(data_json), (train, test)):
            write_json(path, part)
    return train, test


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=4), encoding="utf-8")
    os.replace(tmp, path)


def usable_conversations(items: list[dict], limit: int | None = None) -> list[dict]:
    """Leave out conversations whose picture is missing or not an image, or whose caption is empty; a warning each.
    With `limit`, stop once that many are kept (the rest are not opened)."""
    from PIL import Image

    kept = []
    for i, item in enumerate(items):
        if limit is not None and len(kept) == limit:
            break
        path, reason = infer.image_of(item), None
        if not infer.caption_of(item).strip():
            reason = "empty caption"
        else:
            try:
                with Image.open(path):  # the header only: cheap, and catches missing and non-image files
                    pass
            except FileNotFoundError:
                reason = "no such file"
            except (OSError, SyntaxError, Image.DecompressionBombError):
                reason = "not a readable image"
        if reason:
            print(f"warning: skipped conversation {i + 1} ({item.get('id')}): {path}: {reason}", file=sys.stderr)
        else:
            kept.append(item)
    if not kept:
        raise cli.UserError("no conversation has a readable image and a caption; check the data JSON.")
    return kept


def encode_example(processor, image, caption: str, prompt: str, max_length: int, prompts: dict | None = None) -> dict:
    """Token ids, labels and pixels for one picture and its caption.

    The labels are -100 (ignored) on the system prompt, the image tokens and the user prompt: only the caption and the
    closing <|im_end|> are learnt, so the model learns to answer and to stop. A caption too long for max_length is cut,
    never the image tokens. `prompts` keeps the prompt's tokens by image grid (they depend on nothing else), so every
    further picture of a size costs the image processor and the caption's tokens only.
    """
    import torch

    tok = processor.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    pixels = processor.image_processor(images=[image], return_tensors="pt")
    key = (prompt, tuple(pixels["image_grid_thw"][0].tolist()))
    if prompts is None or key not in prompts:
        text = processor(text=[infer.prompt_text(processor, prompt)], images=[image], return_tensors="pt")
        prompts = {} if prompts is None else prompts
        prompts[key] = text["input_ids"][0], text["mm_token_type_ids"][0]
    prompt_ids, prompt_types = prompts[key]
    answer = tok(caption, add_special_tokens=False)["input_ids"] + [im_end]
    room = max_length - len(prompt_ids)
    if room < 2:
        raise ValueError(
            f"the prompt and image need {len(prompt_ids)} tokens, more than MAX_LENGTH {max_length} allows; raise "
            "--max-length or lower --image-size"
        )
    if len(answer) > room:
        answer = answer[: room - 1] + [im_end]
    answer = torch.tensor(answer, dtype=prompt_ids.dtype)
    return {
        "input_ids": torch.cat([prompt_ids, answer]),
        "labels": torch.cat([torch.full_like(prompt_ids, -100), answer]),
        "mm_token_type_ids": torch.cat([prompt_types, torch.zeros_like(answer)]),
        "pixel_values": pixels["pixel_values"],
        "image_grid_thw": pixels["image_grid_thw"],
    }


class CaptionDataset:
    """Conversations decoded and tokenised as the training loop reads them (in DataLoader workers), never all at once."""

    def __init__(self, items: list[dict], processor, prompt: str, image_size: int, max_length: int):
        self.items, self.processor, self.prompt = items, processor, prompt
        self.image_size, self.max_length = image_size, max_length
        self.prompts = {}  # prompt tokens by image grid (encode_example), filled in each worker

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict | None:
        item = self.items[i]
        try:
            image = infer.load_image(infer.image_of(item), self.image_size)
            return encode_example(self.processor, image, infer.caption_of(item), self.prompt, self.max_length, self.prompts)
        except ValueError as e:  # a file that went bad after the start-up check, or too big: skip it, don't stop
            print(f"warning: skipped {infer.image_of(item)}: {e}", file=sys.stderr)
            return None


def collate(examples: list[dict | None], pad_token_id: int) -> dict:
    """Pad a batch on the right; concatenate the images' patches (never stack: images may differ in size)."""
    import torch

    examples = [e for e in examples if e is not None]
    if not examples:
        raise RuntimeError("every image of a batch failed to load; see the warnings above")
    length = max(len(e["input_ids"]) for e in examples)

    def pad(key, value):
        return torch.stack([torch.nn.functional.pad(e[key], (0, length - len(e[key])), value=value) for e in examples])

    input_ids = pad("input_ids", pad_token_id)
    return {
        "input_ids": input_ids,
        "attention_mask": pad("input_ids", -1).ne(-1).long(),
        "labels": pad("labels", -100),
        "mm_token_type_ids": pad("mm_token_type_ids", 0),
        "pixel_values": torch.cat([e["pixel_values"] for e in examples]),
        "image_grid_thw": torch.cat([e["image_grid_thw"] for e in examples]),
    }


# ----------------------------------------------------------------------------------------------------------------- model
def add_lora(model, r: int, alpha: int, dropout: float, targets: str):
    """Wrap the model with LoRA on the language model's projections only; the vision tower stays frozen."""
    from peft import LoraConfig, get_peft_model

    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise cli.UserError("--lora-targets is empty; name at least one projection, e.g. q_proj,v_proj.")
    config = LoraConfig(
        task_type="CAUSAL_LM",
        # A regex, so that only model.language_model.layers.N.* matches, whatever the vision tower's names are.
        target_modules=rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(names)})",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise cli.UserError(f"--lora-targets {targets!r} matches no language-model projection ({e}).") from None


# ------------------------------------------------------------------------------------------------------------- swanlab
def swanlab_mode(setting: str | None) -> str:
    """The SwanLab mode: as set; else cloud when an API key is configured; else offline, saying how to sync later."""
    mode = setting or os.environ.get("SWANLAB_MODE")
    if mode:
        if mode not in ("cloud", "online", "offline", "local", "disabled"):
            raise cli.UserError(f"SwanLab mode {mode!r} is not one of cloud, offline, local, disabled.")
        return mode
    import swanlab

    if os.environ.get("SWANLAB_API_KEY") or swanlab.Settings().api_key:
        return "cloud"
    print("SwanLab: no API key configured (`swanlab login`), so this run logs offline; upload it later with "
          "`swanlab sync RUN_FOLDER` (SwanLab prints the folder below).")  # fmt: skip
    return "offline"


def start_swanlab(args, config: dict):
    """Start the SwanLab run (rank 0 only) and return transformers' callback for it, or None when disabled."""
    mode = swanlab_mode(args.swanlab_mode)
    if mode == "disabled":
        return None
    import swanlab
    from swanlab.integration.transformers import SwanLabCallback

    swanlab.init(project=args.swanlab_project, experiment_name=args.swanlab_experiment, mode=mode, config=config)
    return SwanLabCallback()


def caption_items(model, processor, items: list[dict], args) -> dict[str, str]:
    """{image path: caption} for conversations' pictures; an unreadable picture is reported and skipped."""
    import fastdecode

    was_training = model.training
    model.eval()
    paths = [infer.image_of(it) for it in items]
    captions, _ = infer.caption_paths(model, processor, paths, args.prompt, args.image_size, args.eval_batch_size,
                                      args.sample_max_new_tokens)  # fmt: skip
    fastdecode.release(model)  # its cache is not needed while training, and LoRA would change the captured modules
    model.train(was_training)
    return captions


def write_eval(output_dir: Path, items: list[dict], results: dict) -> None:
    """OUTPUT_DIR/eval_scores.json (the scores before and after) and eval_captions.jsonl (every caption, both times)."""
    write_json(output_dir / "eval_scores.json", {when: scores for when, (_, scores) in results.items()})
    with (output_dir / "eval_captions.jsonl").open("w", encoding="utf-8") as f:
        for item in items:
            path = infer.image_of(item)
            record = {"image": path, **{when: captions.get(path) for when, (captions, _) in results.items()},
                      "references": infer.references_of(item)}  # fmt: skip
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def swanlab_running() -> bool:
    if "swanlab" not in sys.modules:  # never imported: disabled
        return False
    import swanlab

    return swanlab.has_run()


def log_samples(key: str, captions: dict[str, str]) -> None:
    """Held-out pictures with their generated captions, as the tutorial's `Prediction` panel."""
    import swanlab

    swanlab.log({key: [swanlab.Image(path, caption=caption) for path, caption in captions.items()]})


# ------------------------------------------------------------------------------------------------------------ evaluation
def load_eval_split(args) -> list[dict]:
    """The first EVAL_SIZE conversations of EVAL_JSON, or [] (with one line saying why) when there are none to score."""
    if args.eval_size <= 0:
        return []
    if not Path(args.eval_json).is_file():
        print(f"no evaluation split ({args.eval_json} does not exist): captions will not be scored. Make one with "
              "`python data2csv.py --split validation --n 100 --image-dir coco_2014_caption_val --csv coco-2014-val.csv`"
              " and `python csv2json.py --csv coco-2014-val.csv --json data_vl_eval.json`.")  # fmt: skip
        return []
    return usable_conversations(infer.read_conversations(args.eval_json), limit=args.eval_size)


def evaluate(model, processor, items: list[dict], args) -> tuple[dict, dict]:
    """Caption the evaluation pictures (batched) and score them against their references: (captions, scores)."""
    from caption_metrics import mean_words, score_captions, tokenizer_used

    captions = caption_items(model, processor, items, args)
    references = {infer.image_of(it): infer.references_of(it) for it in items}
    scores = score_captions(captions, {p: references[p] for p in captions})
    scores.update(mean_words=mean_words(captions), images=len(captions), tokenizer=tokenizer_used())
    return captions, scores


def report_scores(when: str, scores: dict) -> None:
    """Print the scores and log them to SwanLab as eval/<when>/<metric>."""
    numbers = {k: v for k, v in scores.items() if isinstance(v, float)}
    print(f"caption quality {when} training ({scores['images']} pictures, {scores['tokenizer']} tokenizer): "
          + "  ".join(f"{k} {v:.3f}" for k, v in numbers.items()))  # fmt: skip
    if swanlab_running():
        import swanlab

        swanlab.log({f"eval/{when}/{k}": v for k, v in numbers.items()})


# ------------------------------------------------------------------------------------------------------------------ main
def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    names = ["torch", "transformers", "peft", "accelerate", "swanlab", "modelscope"]
    return {"python": platform.python_version(), **{n: installed(n) for n in names}}


def check_output_dir(args, is_main: bool = True) -> str | None:
    """The checkpoint to resume from, or None; refuses to silently overwrite an earlier run's checkpoints."""
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(args.output_dir)
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if args.resume:
        if last is None:
            print(f"warning: --resume given but {out} holds no checkpoint; starting from the beginning", file=sys.stderr)
        return last
    if last is not None and not args.overwrite:
        raise cli.UserError(
            f"{out} holds checkpoints of an earlier run; pass --resume to continue it, --overwrite to start afresh, "
            "or another --output-dir."
        )
    if last is not None and is_main:
        # --overwrite: the earlier run's checkpoints go, so no later --resume can pick one of them up by mistake.
        for checkpoint in out.glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
    return None


def resolve_memory_settings(args) -> None:
    """--low-memory: same effective batch in up to 4 pieces, with checkpointing (and so without CUDA graphs)."""
    if args.low_memory:
        pieces = next(d for d in (4, 3, 2, 1) if args.batch_size % d == 0)  # exact: the effective batch is unchanged
        args.batch_size, args.grad_accum = args.batch_size // pieces, args.grad_accum * pieces
        args.gradient_checkpointing = True
    if args.gradient_checkpointing:
        args.cuda_graphs = False  # recomputation inside a captured graph is not supported


class StepClock:
    """Marks when the first optimizer step starts and when training ends (a transformers TrainerCallback)."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                outer.first_step = outer.first_step or time.perf_counter()

            def on_train_end(self, args, state, control, **kwargs):
                outer.end = time.perf_counter()

        self.callback, self.first_step, self.end = _Callback(), None, None


def main(argv: list[str] | None = None, callbacks: list | None = None) -> int:
    """Train and save the adapter. `callbacks` are extra transformers TrainerCallbacks (tests use them)."""
    args = cli.parse_settings(globals(), argv)
    # transformers' own internals trip its v6 deprecation notices; nothing a user of this script can act on.
    warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6", category=FutureWarning)
    infer.check_image_size(args.image_size)
    cli.require_at_least(args, {"batch_size": 1, "grad_accum": 1, "workers": 0, "logging_steps": 1, "save_steps": 1,
                                "eval_batch_size": 1, "sample_max_new_tokens": 1})  # fmt: skip
    resolve_memory_settings(args)
    device = infer.resolve_device(args.device)
    # Under torchrun every process runs this script; process 0 alone writes files, logs and captions.
    is_main = int(os.environ.get("RANK", "0")) == 0
    resume_from = check_output_dir(args, is_main)
    imports_started = time.perf_counter()
    import torch
    from transformers import AutoConfig, TrainingArguments, set_seed

    import fastpath

    started = time.perf_counter()  # preparation: from reading the data to the first training step
    items = usable_conversations(infer.read_conversations(args.data_json))
    train_items, test_items = hold_out(items, args.test_size, args.data_json, write=is_main)

    model_dir = infer.resolve_model_dir(args.model_dir)
    processor = infer.load_processor(model_dir)
    try:  # fail now, not in a DataLoader worker, when the settings cannot fit an image
        first = train_items[0]
        image = infer.load_image(infer.image_of(first), args.image_size)
        encode_example(processor, image, infer.caption_of(first), args.prompt, args.max_length)
    except ValueError as e:
        raise cli.UserError(f"{infer.image_of(first)}: {e}.") from None
    dataset = CaptionDataset(train_items, processor, args.prompt, args.image_size, args.max_length)
    pad_id = processor.tokenizer.pad_token_id

    # The fast path when the frozen vision tower's output for every training picture fits the cache (fastpath.py).
    config, dtype = AutoConfig.from_pretrained(model_dir), infer.model_dtype(device)
    cache_gb = fastpath.vision_cache_bytes(config, processor, len(dataset), args.image_size, dtype) / 1e9 if args.image_size else None
    cached = cache_gb is not None and cache_gb <= args.vision_cache_gb
    if cached:
        encoding = fastpath.start_encoding(dataset, config, args.workers)  # decoding starts while the model loads
    loading = time.perf_counter()
    model = infer.load_model(model_dir, device)
    loaded = time.perf_counter()
    eval_items = load_eval_split(args) if is_main else []
    if cached:
        examples, features = fastpath.finish_encoding(model, *encoding)
        pad_to = -(-max(len(e["input_ids"]) for e in examples) // 8) * 8
        train_dataset, collator = examples, lambda batch: fastpath.collate_encoded(batch, pad_id, pad_to)
        print(f"vision cache: {len(examples)} pictures, {features.numel() * features.element_size() / 1e9:.2f} GB on "
              f"{features.device}; sequences padded to {pad_to} tokens")  # fmt: skip
    else:
        train_dataset, collator, features = dataset, (lambda batch: collate(batch, pad_id)), None
        why = "each image's own size" if not args.image_size else f"{cache_gb:.1f} GB > --vision-cache-gb"
        print(f"no vision cache ({why}): pictures are decoded by {args.workers} workers and the tower runs every step")
    prepared = time.perf_counter()

    swanlab_callback = start_swanlab(args, {**vars(args), "model_dir": model_dir}) if is_main else None
    results = {}
    if args.eval_before and is_main:
        if eval_items:
            results["before"] = evaluate(model, processor, eval_items, args)
            report_scores("before", results["before"][1])
        if swanlab_running():  # the held-out pictures as the base model captions them, beside the trained captions
            log_samples("Prediction/before", caption_items(model, processor, test_items, args))

    set_seed(args.seed)  # LoRA's initial weights do not depend on what preparing the data drew from the RNG
    if args.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad to backprop LoRA
    model = add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # Graphs are captured per process before DDP wraps the model; that pairing is untested, so several processes run eager.
    graphs = cached and args.cuda_graphs and device.startswith("cuda") and world_size == 1
    capture_started = time.perf_counter()
    if graphs:
        model.train()  # captured with dropout active, as training replays it
        fastpath.graph_decoder_layers(model, args.batch_size, pad_to)
    capture_seconds = time.perf_counter() - capture_started

    effective_batch = args.batch_size * args.grad_accum * world_size
    steps = args.max_steps if args.max_steps > 0 else math.ceil(len(train_items) / effective_batch) * args.epochs
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    settings = {
        **vars(args),
        "model_dir": model_dir,
        "train_json": str(split_paths(args.data_json)[0].resolve()),
        "test_json": str(split_paths(args.data_json)[1].resolve()),
        "train_size": len(train_items),
        "world_size": world_size,
        "effective_batch": effective_batch,
        "optimizer_steps": steps,
        "trainable_parameters": trainable,
        "vision_cache": cached,
        "cuda_graphs_used": graphs,
        "versions": library_versions(),
    }
    print(f"training {len(train_items)} conversations, effective batch {effective_batch} "
          f"({args.batch_size} x {args.grad_accum} accumulation x {world_size} processes), {steps} steps, "
          f"{trainable / 1e6:.1f}M trainable parameters on {device}")  # fmt: skip

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        optim="adamw_torch_fused" if device.startswith("cuda") else "adamw_torch",
        activation_checkpointing=args.gradient_checkpointing,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        seed=args.seed,
        data_seed=args.seed,
        # bf16 autocast on the GPU: the base weights are bf16, the LoRA weights and their optimizer state stay fp32.
        bf16=device.startswith("cuda"),
        logging_nan_inf_filter=False,  # its per-step NaN check makes every step wait for the GPU
        use_cpu=device == "cpu",
        # Batches are copied from pinned memory without making the CPU wait for the GPU.
        accelerator_config={"non_blocking": True},
        dataloader_num_workers=0 if cached else args.workers,
        dataloader_persistent_workers=not cached and args.workers > 0,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        report_to="none",
    )
    if swanlab_callback:
        swanlab_callback.update_config(settings)
    clock = StepClock()
    trainer = fastpath.CaptionTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        callbacks=[c for c in [swanlab_callback, clock.callback, *(callbacks or [])] if c],
    )
    trainer.vision_features = features
    if resume_from:
        print(f"resuming from {resume_from}")
    result = trainer.train(resume_from_checkpoint=resume_from)
    if not is_main:
        return 0

    adapter_dir = Path(args.output_dir) / "adapter"
    model.save_pretrained(adapter_dir)
    processor.save_pretrained(adapter_dir)
    # Training time: first step to last, plus the CUDA-graph capture (this path's compilation).
    step_seconds = clock.end - clock.first_step if clock.first_step else 0.0
    train_seconds = step_seconds + capture_seconds
    settings.update(
        train_loss=result.training_loss,
        global_step=result.global_step,
        seconds={"imports": round(started - imports_started, 2), "prepare": round(prepared - started, 2),
                 "prepare_parts": {"before_model": round(loading - started, 2), "load_model": round(loaded - loading, 2),
                                   "after_model": round(prepared - loaded, 2)},
                 "to_first_step": round((clock.first_step or prepared) - started, 2),
                 "capture": round(capture_seconds, 2), "steps": round(step_seconds, 2), "train": round(train_seconds, 2)},
        peak_gpu_memory_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.startswith("cuda") else None,
    )  # fmt: skip
    write_json(adapter_dir / infer.SETTINGS_FILE, settings)

    captions = caption_items(model, processor, test_items, args)
    for item in test_items:
        if infer.image_of(item) in captions:
            print(f"{infer.image_of(item)}\n  reference: {infer.caption_of(item)}\n  generated: {captions[infer.image_of(item)]}")
    if swanlab_running():
        log_samples("Prediction/after", captions)
    if eval_items:
        results["after"] = evaluate(model, processor, eval_items, args)
        report_scores("after", results["after"][1])
        write_eval(Path(args.output_dir), eval_items, results)
    if swanlab_callback:
        import swanlab

        swanlab.finish()
    print(f"trained {result.global_step} steps in {train_seconds:.1f} s, final loss {result.training_loss:.4f}")
    print(f"adapter saved to {adapter_dir}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli.run(main)
