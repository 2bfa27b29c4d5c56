"""LoRA fine-tune Qwen2-VL-2B-Instruct to caption images, logging curves and sample captions to SwanLab.

    python train.py                                    # the tutorial's run: data_vl.json, 2 epochs, adapter in output/
    python train.py --model-dir models/Qwen2-VL-2B-Instruct --epochs 1
    python train.py --resume                           # continue an interrupted run from its last checkpoint
    torchrun --nproc_per_node 2 train.py               # data parallel on 2 GPUs

Every UPPER_CASE setting below is also a --lower-case flag (`python train.py --help` lists them). The last TEST_SIZE
conversations are held out (data_vl_test.json) and captioned after training. The adapter, its processor and every
setting of the run (train_settings.json) are saved to OUTPUT_DIR/adapter; infer.py reads them back so it captions with
the same prompt and image size. The last line printed names the adapter folder.

On a GPU, the batch split, gradient checkpointing and the vision cache are fitted to its free memory and the precision
to what it computes in (vlcap/memory.py), keeping the effective batch; one line says what was chosen and why. Settings
you give (on the command line, or by editing a constant below) are kept as they are, and checked against the memory.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from vlcap import cli, formats, gallery, memory, processes, timing, tracking

MODEL_DIR: str = "Qwen/Qwen2-VL-2B-Instruct"  # local Qwen2-VL folder, or a ModelScope id to download
DATA_JSON: str = "data_vl.json"  # conversations written by csv2json.py
OUTPUT_DIR: str = "output/Qwen2-VL-2B"  # checkpoints, and the final adapter in OUTPUT_DIR/adapter
TEST_SIZE: int = 4  # last conversations held out (data_vl_test.json) and captioned after training
PROMPT: str = formats.DEFAULT_PROMPT  # user prompt before each caption; infer.py reuses the one saved with the adapter
IMAGE_SIZE: int | None = None  # pictures resized to N x N: N a multiple of 28 (Qwen3-VL 32), 0 = own size
MAX_LENGTH: int = 8192  # longest training sequence in tokens; longer captions are cut, image tokens never
LORA_R: int = 64  # LoRA rank
LORA_ALPHA: int = 16  # LoRA scaling numerator (scale = alpha / r)
LORA_DROPOUT: float = 0.05  # dropout on the LoRA input
LORA_TARGETS: cli.CommaSeparated = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # LoRA's projections
EPOCHS: int = 2  # passes over the training conversations
MAX_STEPS: int = -1  # stop after this many optimizer steps (-1: run all EPOCHS)
BATCH_SIZE: int = 16  # conversations per device per forward pass
GRAD_ACCUM: int = 1  # forward passes per optimizer step (effective batch = BATCH_SIZE x GRAD_ACCUM x processes)
LEARNING_RATE: float = 1e-4  # peak learning rate (linear decay to 0)
GRADIENT_CHECKPOINTING: bool = False  # recompute activations in the backward pass: less memory, slower
LOW_MEMORY: bool = False  # a quarter of BATCH_SIZE, 4x GRAD_ACCUM (same effective batch), checkpointing
VISION_CACHE_GB: float = 8.0  # GPU memory for the vision tower's output, kept per picture (0: tower every step)
HOST_CACHE_GB: float = 32.0  # host memory for the vision cache beyond VISION_CACHE_GB; the rest in a file
KEEP_VISION_CACHE: bool = True  # keep OUTPUT_DIR/vision_cache for --resume and later runs on the same data
CUDA_GRAPHS: bool = True  # replay each decoder layer's forward and backward as CUDA graphs (GPU, with the vision cache)
PRECISION: str = "auto"  # auto (bf16 where the GPU has it, else fp16 with loss scaling), bf16, fp16 or fp32
LOGGING_STEPS: int = 10  # log the loss every this many optimizer steps
SAVE_STEPS: int = 100  # write a resumable checkpoint every this many optimizer steps
SEED: int = 42  # seed for LoRA initialisation, dropout and data order
DEVICE: str = "auto"  # auto (the GPU; error without one), cuda, or cpu (tests and the smoke run)
WORKERS: int = min(8, os.cpu_count() or 1)  # DataLoader processes decoding and tokenising pictures
RESUME: bool = False  # continue from the last checkpoint in OUTPUT_DIR
OVERWRITE: bool = False  # start afresh even though OUTPUT_DIR holds checkpoints of an earlier run (they are replaced)
SAMPLE_MAX_NEW_TOKENS: int = 64  # longest caption generated for the held-out and evaluation pictures
EVAL_JSON: str = "data_vl_eval.json"  # evaluation split with reference captions (data2csv.py --split validation)
EVAL_SIZE: int = 100  # first pictures of EVAL_JSON captioned and scored (BLEU-1..4, ROUGE-L, CIDEr); 0 = no evaluation
EVAL_BEFORE: bool = True  # also score the base model before training, so every run shows its gain
EVAL_BATCH_SIZE: int = 32  # pictures per captioning batch when captioning for evaluation
SWANLAB_PROJECT: str = "Qwen2-VL-finetune"  # SwanLab project the run is logged to
SWANLAB_EXPERIMENT: str = "qwen2-vl-coco2014"  # SwanLab experiment name
SWANLAB_MODE: str | None = None  # cloud, offline, local or disabled (default: cloud with an API key, else offline)
SWANLAB_REQUIRE_CLOUD: bool = False  # stop when the cloud rejects the key or is unreachable, not log offline


# ------------------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None, callbacks: list | None = None, marks: timing.Marks | None = None) -> int:
    """Train and save the adapter. `callbacks` are extra transformers TrainerCallbacks (tests use them); `marks`, the
    run's timing marks so far (run as a script: the process's start)."""
    marks = marks or timing.Marks()
    marks("main")
    args = read_settings(argv)
    is_main = processes.is_main()  # under torchrun, process 0 of all machines alone writes files, logs and captions
    if processes.count() > 1:
        processes.stop_with_one_line()  # when another process fails
    resume_from = check_output_dir(args, is_main)
    swanlab_mode = tracking.choose_mode(args.swanlab_mode, args.swanlab_require_cloud) if is_main else "disabled"
    marks("imports")
    global compat, evaluation, fastpath, qwen, training_data  # torch and transformers load once the settings are right
    from vlcap import compat, evaluation, fastpath, qwen, training_data

    marks("start")
    run = prepare(args, is_main, marks)
    config = {**vars(args), "model_dir": run.model_dir}
    tracker = tracking.start(swanlab_mode, args.swanlab_project, args.swanlab_experiment, config)
    recipe = captioning_recipe(args)
    results = (
        {"before": score(run, run.eval_items, recipe, "before", tracker)} if args.eval_before and run.eval_items else {}
    )
    if args.eval_before and tracker.enabled:  # the held-out pictures as the base model captions them
        tracker.log_pictures(
            "Prediction/before", evaluation.caption_conversations(*run.captioner, run.test_items, recipe)
        )
    marks("scored_before")

    run.model, graphs = add_lora(run.model, args, run.device, run.pad_to, marks)
    settings = run_settings(args, run.model_dir, run.model, len(run.train_items), run.features is not None, graphs)
    settings["memory_plan"] = run.plan.as_dict()
    tracker.update_config(settings)
    loss_guard = memory.loss_guard(run.plan.precision)  # fp16: an inf or nan loss stops the run with one line
    extra = [tracker.callback, marks.callback(), loss_guard, checkpoints_on_schedule(), *(callbacks or [])]
    trainer = make_trainer(args, run.model, run.device, run.train_dataset, run.collator, extra)
    trainer.use_vision_cache(run.features)
    with fastpath.fast_training(run.model, active=run.pad_to is not None, autocast=args.precision != "fp32"):
        result = train(trainer, args, resume_from, run, tracker)
    settings["log_history"] = [h for h in trainer.state.log_history if "loss" in h]  # loss, rate, norm per log
    peaks = processes.finish(run.device)  # several processes: each one's peak memory; then process 0 goes on alone
    if not is_main:
        return 0
    if peaks:
        settings["peak_gpu_memory_gb_by_process"] = peaks

    adapter_dir = save(run.model, run.processor, settings, result, marks, Path(args.output_dir) / "adapter", run.device)
    marks("saved")
    captions = evaluation.caption_conversations(*run.captioner, run.test_items, recipe)
    print_samples(run.test_items, captions)
    tracker.log_pictures("Prediction/after", captions)
    marks("sampled")
    if run.eval_items:
        results["after"] = score(run, run.eval_items, recipe, "after", tracker)
        write_evaluation(Path(args.output_dir), run.eval_items, results)
    tracker.finish()
    marks("end")
    settings["seconds"]["run"] = marks.parts(timing.TRAIN_RUN)
    formats.write_train_settings(adapter_dir, settings)  # again, with where the whole run's time went
    print(
        f"trained {result.global_step} steps in {settings['seconds']['train']:.1f} s, final loss {result.training_loss:.4f}"
    )
    print(timing.summary(settings["seconds"]["run"]))
    print(f"adapter saved to {adapter_dir}")
    return 0


@dataclass
class Prepared:
    """What training starts from: the data, the model and processor, the batches, and the memory plan."""

    device: str
    model_dir: str
    processor: object
    train_items: list
    test_items: list
    eval_items: list
    plan: object
    model: object
    train_dataset: object
    collator: object
    features: object  # the vision cache, or None on the plain path
    pad_to: int | None  # the fixed padded length of the fast path's batches (None: the plain path)

    @property
    def captioner(self) -> tuple:
        return self.model, self.processor


def prepare(args, is_main: bool, marks) -> Prepared:
    """Data, checks, memory plan, model and vision cache, in that order: nothing is written until every early check has
    passed, and the encoding workers start before the model loads."""
    device = qwen.resolve_device(args.device)
    items = training_data.usable_conversations(formats.read_conversations(args.data_json))
    train_items, test_items = training_data.hold_out(items, args.test_size)
    model_dir = qwen.resolve_model_dir(args.model_dir)
    processor = qwen.load_processor(model_dir)
    args.image_size = qwen.resolve_image_size(processor, args.image_size)  # a multiple of this model's patches
    qwen.check_lora_targets(model_dir, args.lora_targets)
    dataset = training_data.CaptionDataset(train_items, processor, args.prompt, args.image_size, args.max_length)
    dataset.check_first()
    if is_main:  # every check that can fail early has passed: now the split files may change
        for path, part in zip(formats.split_paths(args.data_json), (train_items, test_items)):
            formats.write_json(path, part)
    fast = compat.available("fast training")
    plan = fit_to_device(args, dataset, model_dir, processor, device, fast)
    finish_data = start_data(args, dataset, model_dir, processor, device, fast, plan)
    marks("loading")
    model = qwen.load_model(model_dir, device, plan.precision.dtype)
    marks("loaded")
    eval_items = evaluation.load_split(args.eval_json, args.eval_size) if is_main else []
    train_dataset, collator, features, pad_to = finish_data(model)
    marks("prepared")
    pad_to = pad_to if features is not None else None
    return Prepared(
        device,
        model_dir,
        processor,
        train_items,
        test_items,
        eval_items,
        plan,
        model,
        train_dataset,
        collator,
        features,
        pad_to,
    )


def train(trainer, args, resume_from: str | None, run: Prepared, tracker):
    """trainer.train(), with every way it can stop early turned into one line (and SwanLab's run marked aborted)."""
    import torch

    processes.same_start(resume_from, args.batch_size, args.grad_accum)
    if resume_from:
        print(f"resuming from {resume_from}")
    try:
        return trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        tracker.finish(aborted=True)
        raise
    except torch.OutOfMemoryError:  # another process took memory, or the estimate was short: one line, not a traceback
        tracker.finish(aborted=True)
        raise cli.UserError(memory.out_of_memory(run.plan, args.output_dir, run.device)) from None
    except Exception as e:
        if not processes.lost_peer(e):
            raise
        tracker.finish(aborted=True)
        line = processes.stopped("lost the connection to another process of this run")
        if line is None:  # torchrun's stop came first and was said: the process is ending
            raise SystemExit(2) from None
        raise cli.UserError(line) from None


# ------------------------------------------------------------------------------------------------------------- settings
def read_settings(argv: list[str] | None):
    """The settings, parsed and checked: every mistake is one line here, before anything is loaded or written."""
    args = cli.parse_settings(globals(), argv)
    set_by_user = memory.explicit_settings(globals(), argv)  # the others are fitted to the GPU (fit_to_device)
    memory.check_precision(args.precision)
    cli.require_at_least(
        args,
        {
            "batch_size": 1,
            "grad_accum": 1,
            "workers": 0,
            "logging_steps": 1,
            "save_steps": 1,
            "eval_batch_size": 1,
            "sample_max_new_tokens": 1,
            "lora_r": 1,
        },
    )
    cli.require_at_least(args, {"test_size": 0, "eval_size": 0, "max_length": 1})
    cli.require_positive(args, ["learning_rate", "epochs", "lora_alpha"])
    cli.require_range(args, ["lora_dropout"], at_least=0, below=1)
    cli.require_range(args, ["vision_cache_gb", "host_cache_gb"], at_least=0)
    if args.low_memory:  # the same effective batch in up to 4 pieces, with checkpointing
        pieces = next(d for d in (4, 3, 2, 1) if args.batch_size % d == 0)
        args.batch_size, args.grad_accum = args.batch_size // pieces, args.grad_accum * pieces
        args.gradient_checkpointing = True
        set_by_user |= {"batch_size", "grad_accum", "gradient_checkpointing"}
    args.set_by_user = sorted(set_by_user)
    if args.gradient_checkpointing:
        args.cuda_graphs = False  # recomputation inside a captured graph is not supported
    return args


def checkpoints_on_schedule():
    """A TrainerCallback: checkpoints every SAVE_STEPS steps only. transformers also writes one when training ends,
    but a finished run has nothing to resume (its adapter is saved next), and that checkpoint's optimizer state (0.6 GB
    for the 2B model) took 0.8-1.0 s of the tutorial's 5-second training (bench/RESULTS.md)."""
    from transformers import TrainerCallback

    class OnSchedule(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps and state.global_step % args.save_steps:
                control.should_save = False

    return OnSchedule()


def check_output_dir(args, is_main: bool) -> str | None:
    """The checkpoint to resume from, or None; refuses to silently overwrite an earlier run's checkpoints or
    adapter."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise cli.UserError(f"--output-dir {out} is a file; name a folder for the checkpoints and the adapter.")
    checkpoints = sorted((p for p in out.glob("checkpoint-*") if p.name[11:].isdigit()), key=lambda p: int(p.name[11:]))
    # Trainer writes trainer_state.json last: a checkpoint without it was cut short (a process died while saving).
    complete = [p for p in checkpoints if (p / "trainer_state.json").is_file()]
    last = str(complete[-1]) if complete else None
    finished = not checkpoints and (out / "adapter" / "adapter_config.json").is_file()
    if finished and not args.overwrite:
        raise cli.UserError(
            f"{out} holds the adapter of a finished run ({out / 'adapter'})"
            + (", with no checkpoint to resume" if args.resume else "")
            + "; pass --overwrite to train again (the adapter is replaced), or another --output-dir."
        )
    if args.resume:
        if last is None:
            print(
                f"warning: --resume given but {out} holds no checkpoint; starting from the beginning", file=sys.stderr
            )
        return last
    if checkpoints and not args.overwrite:
        raise cli.UserError(
            f"{out} holds checkpoints of an earlier run; pass --resume to continue it, --overwrite to start afresh, "
            "or another --output-dir."
        )
    if checkpoints and is_main:
        # --overwrite: the earlier run's checkpoints go, so no later --resume can pick one of them up by mistake.
        for checkpoint in checkpoints:
            shutil.rmtree(checkpoint)
    return None


def captioning_recipe(args):
    from vlcap.captioning import Recipe

    return Recipe(args.prompt, args.image_size, args.eval_batch_size, args.sample_max_new_tokens)


def fit_to_device(args, dataset, model_dir: str, processor, device: str, fast: bool):
    """The memory plan (vlcap/memory.py): on a GPU, the settings the user left alone chosen to fit its free memory, the
    precision to fit the card; one line each. Settings of the user's that cannot fit stop the run here."""
    from transformers import AutoConfig

    card = memory.Card.detect(device) if device.startswith("cuda") else None
    precision = memory.choose_precision(card, args.precision)
    if args.image_size:
        image_tokens = fastpath.image_token_count(processor, args.image_size)
        cache_gb = (
            fastpath.vision_cache_bytes(
                AutoConfig.from_pretrained(model_dir), processor, len(dataset), args.image_size, precision.dtype
            )
            / 1e9
        )
    else:  # pictures of their own size: the largest the processor makes, as a bound
        image_tokens, cache_gb = processor.image_processor.max_pixels // qwen.image_unit(processor) ** 2, None
    job = memory.Job.measure(
        dataset, image_tokens, args.max_length, cache_gb=cache_gb, cache_limit_gb=args.vision_cache_gb, fast=fast
    )
    shape = memory.Shape.of_model(model_dir, args.lora_r, args.lora_targets)
    plan = memory.plan(card, shape, job, precision, {n: getattr(args, n) for n in args.set_by_user})
    if card is not None:
        if plan.hopeless:
            raise cli.UserError(plan.reason + ".")
        print(plan.reason if plan.fits else f"warning: {plan.reason}; it may run out of memory")
        print(f"precision: {precision.reason}")
    plan.apply(args)
    return plan


# ------------------------------------------------------------------------------------------------------------------ data
def start_data(args, dataset, model_dir: str, processor, device: str, fast: bool, plan):
    """Start what can run before the model loads: the encoding workers when the vision cache will be used.

    Returns finish(model) -> (train dataset, collator, vision features, padded length); features and padded length are
    None on the plain path (pictures decoded by DataLoader workers, the vision tower every step).
    """
    from transformers import AutoConfig

    pad_id = processor.tokenizer.pad_token_id
    config = AutoConfig.from_pretrained(model_dir)
    fast = fast and compat.available("fast training", config)  # this family's internals (Qwen2-VL, 2.5, 3)
    dtype = plan.precision.dtype
    cache_bytes = (
        fastpath.vision_cache_bytes(config, processor, len(dataset), args.image_size, dtype)
        if args.image_size
        else None
    )
    # The plan keeps the cache unless --vision-cache-gb is 0 or nothing fits with it; its GPU share may be 0 (all of it
    # in host memory and the file).
    if not fast or cache_bytes is None or not plan.settings.vision_cache:
        why = (
            "the fast path is off"
            if not fast
            else "each image's own size"
            if cache_bytes is None
            else "--vision-cache-gb 0"
            if not args.vision_cache_gb
            else "no room beside training"
        )
        print(f"no vision cache ({why}): pictures are decoded by {args.workers} workers and the tower runs every step")
        return lambda model: (dataset, lambda batch: training_data.collate(batch, pad_id), None, None)
    layout = vision_cache_layout(args, dataset, model_dir, dtype, cache_bytes)
    header = fastpath.reusable(layout.folder, layout.key) if layout.folder else None
    if header:
        print(
            f"vision cache: reading {layout.folder} back (written {header['written']} for the same model, pictures and "
            "settings) instead of encoding the pictures again"
        )
    else:
        if layout.folder:
            fastpath.remove_cache(layout.folder)  # another model's, data's or settings' features, or a run cut short
        # The workers decode while the model loads.
        pin = device.startswith("cuda") and len(dataset) >= fastpath.PINNED_FROM
        encoding = fastpath.start_encoding(dataset, config, args.workers, pin_memory=pin)

    def finish(model):
        if header:
            examples, features = fastpath.read_cache(layout.folder, layout, model.device)
        else:
            examples, features = fastpath.finish_encoding(model, *encoding, layout)
        features.keep_file = args.keep_vision_cache
        pad_to = -(-max(len(e["input_ids"]) for e in examples) // 8) * 8
        print(f"vision cache: {features.describe()}; sequences padded to {pad_to} tokens")
        return (
            examples,
            lambda batch: features.collate(fastpath.collate_encoded(batch, pad_id, pad_to)),
            features,
            pad_to,
        )

    return finish


def vision_cache_layout(args, dataset, model_dir: str, dtype, cache_bytes: int):
    """Where the vision cache goes (fastpath.CacheLayout): the GPU up to --vision-cache-gb, host memory up to
    --host-cache-gb (at most half of what the system has available, shared by the processes of this machine), and a file
    in OUTPUT_DIR holding every picture when they do not all fit on the GPU. One line when it cannot go anywhere."""
    rank, local_processes = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    folder = Path(args.output_dir) / (fastpath.CACHE_FOLDER + (f"-rank{rank}" if rank else ""))  # one per process
    picture = cache_bytes // len(dataset)
    host_gb = min(args.host_cache_gb, fastpath.host_memory_available_gb() / 2 / local_processes)
    layout = fastpath.CacheLayout.choose(len(dataset), picture, args.vision_cache_gb, host_gb, folder)
    if layout.folder is None:
        return layout
    layout = replace(layout, key=fastpath.encoding_key(dataset, model_dir, dtype))
    if fastpath.reusable(folder, layout.key):
        return layout
    existing = folder / "features.bin"
    disk = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(disk).free + (existing.stat().st_size if existing.is_file() else 0)
    if free < cache_bytes + 1e9:  # and a GB to spare
        if layout.in_file == 0:
            print(
                f"vision cache: {free / 1e9:.1f} GB free in {disk}, {cache_bytes / 1e9:.1f} GB needed for its file: kept "
                "in GPU and host memory only (--resume will encode the pictures again)"
            )
            return replace(layout, folder=None)
        raise cli.UserError(
            f"the vision cache needs {cache_bytes / 1e9:.1f} GB on disk in {folder} ({layout.in_file} pictures fit neither "
            f"--vision-cache-gb nor --host-cache-gb) and {free / 1e9:.1f} GB are free there: free disk space, give another "
            "--output-dir, or raise --host-cache-gb."
        )
    return layout


# ----------------------------------------------------------------------------------------------------------------- model
def add_lora(model, args, device: str, pad_to: int | None, marks):
    """The model with LoRA (seeded), and whether its decoder layers run as CUDA graphs (captured here)."""
    from transformers import set_seed

    set_seed(args.seed)  # LoRA's initial weights do not depend on what preparing the data drew from the RNG
    if args.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad to backprop LoRA
    model = qwen.add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)
    # Under torchrun each process captures its own, before Trainer wraps the model in DDP (fastpath.graph_decoder_layers).
    graphs = pad_to is not None and args.cuda_graphs and can_graph(device) and compat.available("fast training", model)
    marks("capture")
    if graphs:
        model.train()  # captured with dropout active, as training replays it
        with fastpath.fast_training(model, active=pad_to is not None, autocast=args.precision != "fp32"):
            fastpath.graph_decoder_layers(model, args.batch_size, pad_to, accumulate=args.grad_accum > 1)
    marks("captured")
    return model, graphs


def can_graph(device: str) -> bool:
    """CUDA graphs need a GPU (the tests stand in for them on the CPU: tests/cpu_graphs.py)."""
    return device.startswith("cuda")


def run_settings(args, model_dir: str, model, train_size: int, cached: bool, graphs: bool) -> dict:
    """Every setting of the run, as saved beside the adapter (train_settings.json) and logged to SwanLab."""
    world_size = processes.count()
    effective_batch = args.batch_size * args.grad_accum * world_size
    steps = args.max_steps if args.max_steps > 0 else math.ceil(train_size / effective_batch) * args.epochs
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_json, test_json = formats.split_paths(args.data_json)
    print(
        f"training {train_size} conversations, effective batch {effective_batch} ({args.batch_size} x "
        f"{args.grad_accum} accumulation x {world_size} processes), {steps} steps, {trainable / 1e6:.1f}M trainable "
        f"parameters on {next(model.parameters()).device}"
    )
    return {
        **vars(args),
        "model_dir": model_dir,
        "train_json": str(train_json.resolve()),
        "test_json": str(test_json.resolve()),
        "train_size": train_size,
        "world_size": world_size,
        "effective_batch": effective_batch,
        "optimizer_steps": steps,
        "trainable_parameters": trainable,
        "vision_cache": cached,
        "cuda_graphs_used": graphs,
        "versions": library_versions(),
    }


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    names = ["torch", "transformers", "peft", "accelerate", "swanlab", "modelscope"]
    return {"python": platform.python_version(), **{n: installed(n) for n in names}}


# ----------------------------------------------------------------------------------------------------------------- train
def make_trainer(args, model, device: str, train_dataset, collator, callbacks: list):
    """transformers' Trainer (vlcap.fastpath.CaptionTrainer: the plain Trainer when given no vision cache)."""
    from transformers import TrainingArguments

    from vlcap import compat

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        optim="adamw_torch_fused" if device.startswith("cuda") else "adamw_torch",
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        seed=args.seed,
        data_seed=args.seed,
        # Autocast in the plan's precision (fp16 with loss scaling); the LoRA weights and their optimizer state stay fp32.
        bf16=args.precision == "bf16",
        fp16=args.precision == "fp16",
        logging_nan_inf_filter=False,  # its per-step NaN check makes every step wait for the GPU
        use_cpu=device == "cpu",
        # Batches are copied from pinned memory without making the CPU wait for the GPU.
        accelerator_config={"non_blocking": device.startswith("cuda")},
        dataloader_pin_memory=device.startswith("cuda"),
        dataloader_num_workers=0 if isinstance(train_dataset, list) else args.workers,
        dataloader_persistent_workers=not isinstance(train_dataset, list) and args.workers > 0,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        report_to="none",
        # activation_checkpointing (transformers 5.24) or gradient_checkpointing (5.20, Python 3.10's last release)
        **{compat.checkpointing_keyword(): args.gradient_checkpointing},
    )
    if device.startswith("cuda") and processes.count() == 1:
        # One process trains on one GPU. With several visible, Trainer would wrap the model in torch's DataParallel,
        # which splits every batch tensor along its first axis (the M-RoPE positions' is not the batch): torchrun runs
        # one process per GPU instead.
        import torch

        if torch.cuda.device_count() > 1:
            print(
                f"note: {torch.cuda.device_count()} GPUs visible, this process trains on one; "
                f"`torchrun --nproc_per_node {torch.cuda.device_count()} train.py` trains on all of them"
            )
        _ = training_args.device  # set up the devices now, so that Trainer keeps the count below
        training_args._n_gpu = 1
    return fastpath.CaptionTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        callbacks=[c for c in callbacks if c],
    )


# ------------------------------------------------------------------------------------------------------------------ save
def save(model, processor, settings: dict, result, marks, adapter_dir: Path, device: str) -> Path:
    """The adapter, its processor, and train_settings.json with the run's outcome and timings."""
    import torch

    model.save_pretrained(adapter_dir)
    processor.save_pretrained(adapter_dir)
    capture = marks.seconds("capture", "captured")
    steps = marks.seconds("first_step", "train_end")
    settings.update(
        train_loss=result.training_loss,
        global_step=result.global_step,
        # Training time: first step to last, plus the CUDA-graph capture (this path's compilation).
        seconds={
            "imports": marks.seconds("imports", "start"),
            "prepare": marks.seconds("start", "prepared"),
            "prepare_parts": {
                "before_model": marks.seconds("start", "loading"),
                "load_model": marks.seconds("loading", "loaded"),
                "after_model": marks.seconds("loaded", "prepared"),
            },
            "to_first_step": marks.seconds("start", "first_step"),
            "capture": capture,
            "steps": steps,
            "train": round(steps + capture, 2),
        },
        peak_gpu_memory_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.startswith("cuda") else None,
        peak_gpu_reserved_gb=round(torch.cuda.max_memory_reserved() / 1e9, 2) if device.startswith("cuda") else None,
    )
    formats.write_train_settings(adapter_dir, settings)
    return adapter_dir


def write_evaluation(output_dir: Path, items: list[dict], results: dict) -> None:
    """The scores and captions before and after (files), and the page that shows them beside the pictures."""
    evaluation.write_results(output_dir, items, results)
    page = gallery.write_evaluation_page(output_dir / gallery.PAGE_FILE, items, results)
    print(f"the evaluation pictures with their captions before and after training: {page}")


def print_samples(items: list[dict], captions: dict[str, str], most: int = 4) -> None:
    """A few held-out pictures with their reference and generated captions (infer.py captions all of them)."""
    shown = [item for item in items if formats.image_of(item) in captions][:most]
    for item in shown:
        path = formats.image_of(item)
        print(f"{path}\n  reference: {formats.caption_of(item)}\n  generated: {captions[path]}")
    if len(captions) > len(shown):
        print(f"... and {len(captions) - len(shown)} more held-out pictures: `python infer.py` captions them all")


def score(run: Prepared, items: list[dict], recipe, when: str, tracker):
    """(captions, scores) of the evaluation split, printed and logged."""
    captions, scores = evaluation.evaluate(*run.captioner, items, recipe)
    print(evaluation.summary(when, scores))
    tracker.log(evaluation.metrics(when, scores))
    return captions, scores


def interrupted_line() -> str:
    """What Ctrl-C prints. Under torchrun, Ctrl-C reaches every process and torchrun, whose SIGTERM then follows: this
    line is the process's one (processes.say_once), so the SIGTERM adds none."""
    processes.say_once()
    return "interrupted; continue from the last checkpoint with: " + processes.rerun_command("--resume")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = timing.Marks()
    started.mark_process_start()
    cli.run(
        lambda: main(marks=started),
        interrupted=interrupted_line,
        skip_teardown=True,
    )
