"""LoRA fine-tune Qwen2-VL-2B-Instruct to caption images, logging curves and sample captions to SwanLab.

    python train.py                                    # the tutorial's run: data_vl.json, 2 epochs, adapter in output/
    python train.py --model-dir models/Qwen2-VL-2B-Instruct --epochs 1
    python train.py --resume                           # continue an interrupted run from its last checkpoint
    torchrun --nproc_per_node 2 train.py               # data parallel on 2 GPUs

Every UPPER_CASE setting below is also a --lower-case flag (`python train.py --help` lists them). The last TEST_SIZE
conversations are held out (data_vl_test.json) and captioned after training. The adapter, its processor and every
setting of the run (train_settings.json) are saved to OUTPUT_DIR/adapter; infer.py reads them back so it captions with
the same prompt and image size. The last line printed names the adapter folder.

On a GPU, the settings shipped as cli.fitted(...) are fitted to its free memory and the precision to what it computes
in (vlcap/memory_plan.py), keeping the effective batch; one line says what was chosen and why. Settings you give (on
the command line, or by writing a plain value in place of cli.fitted(...)) are kept as they are, and checked.
"""

from __future__ import annotations

import os

from vlcap import cli, formats, processes, run_outputs, timing, tracking, train_settings

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
BATCH_SIZE: int = cli.fitted(16)  # conversations per device per forward pass
GRAD_ACCUM: int = cli.fitted(
    1
)  # forward passes per optimizer step (effective batch = BATCH_SIZE x GRAD_ACCUM x processes)
LEARNING_RATE: float = 1e-4  # peak learning rate (linear decay to 0)
GRADIENT_CHECKPOINTING: bool = cli.fitted(False)  # recompute activations in the backward pass: less memory, slower
LOW_MEMORY: bool = False  # a quarter of BATCH_SIZE, 4x GRAD_ACCUM (same effective batch), checkpointing
VISION_CACHE_GB: float = cli.fitted(
    8.0
)  # GPU memory for the vision tower's output, kept per picture (0: tower every step)
HOST_CACHE_GB: float = 32.0  # host memory for the vision cache beyond VISION_CACHE_GB; the rest in a file
KEEP_VISION_CACHE: bool = True  # keep OUTPUT_DIR/vision_cache for --resume and later runs on the same data
CUDA_GRAPHS: bool = cli.fitted(True)  # replay each decoder layer's forward and backward as CUDA graphs (GPU, cache)
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
EVAL_BATCH_SIZE: int = cli.fitted(32)  # pictures per captioning batch when captioning for evaluation
SWANLAB_PROJECT: str = "Qwen2-VL-finetune"  # SwanLab project the run is logged to
SWANLAB_EXPERIMENT: str = "qwen2-vl-coco2014"  # SwanLab experiment name
SWANLAB_MODE: str | None = None  # cloud, offline, local or disabled (default: cloud with an API key, else offline)
SWANLAB_REQUIRE_CLOUD: bool = False  # stop when the cloud rejects the key or is unreachable, not log offline


def main(argv: list[str] | None = None, callbacks: list | None = None, marks: timing.Marks | None = None) -> int:
    """Train, save the adapter, caption the held-out pictures and score the evaluation split. `callbacks`: extra
    transformers TrainerCallbacks (tests use them); `marks`: the run's timing marks so far (as a script: its start)."""
    marks = marks or timing.Marks()
    marks("main")
    settings = read_settings(argv)
    is_main = processes.is_main()  # under torchrun, process 0 of all machines alone writes files, logs and captions
    if processes.count() > 1:
        processes.stop_with_one_line()  # when another process fails
    resume_from = run_outputs.checkpoint_to_resume(settings, is_main)
    swanlab_mode = (
        tracking.choose_mode(settings.swanlab_mode, settings.swanlab_require_cloud) if is_main else "disabled"
    )
    marks("imports")
    from dataclasses import replace

    from vlcap import caption_trainer, captioning, evaluation, memory_plan, qwen, training_data, vision_cache

    # Data: the conversations, checked and split; the model's processor and image size
    marks("start")
    device = qwen.resolve_device(settings.device)
    data = training_data.prepare(settings, is_main)
    settings = replace(settings, model_dir=data.model_dir, image_size=data.image_size)
    # The memory plan: batch split, checkpointing, vision cache and precision fitted to this GPU
    fit = memory_plan.fit(settings, data, device)
    settings = fit.settings
    # Model and training batches (on the fast path the pictures are encoded once, starting while the model loads)
    pending = vision_cache.prepare(settings, data, device, fit.plan)
    marks("loading")
    model = qwen.load_model(settings.model_dir, device, fit.plan.precision.dtype)
    marks("loaded")
    eval_items = evaluation.load_split(settings.eval_json, settings.eval_size) if is_main else []
    batches = pending.finish(model)
    marks("prepared")

    # Caption quality before training (and the base model's captions of the held-out pictures, to SwanLab)
    tracker = tracking.start(swanlab_mode, settings.swanlab_project, settings.swanlab_experiment, cli.values(settings))
    recipe = captioning.Recipe(
        settings.prompt, settings.image_size, settings.eval_batch_size, settings.sample_max_new_tokens
    )
    results = evaluation.before_training(model, data, eval_items, recipe, tracker) if settings.eval_before else {}
    marks("scored_before")

    # LoRA, the Trainer, training
    model, graphs = caption_trainer.with_lora(model, settings, device, batches, marks)
    record = run_outputs.record(settings, data, batches, model, fit.plan, graphs)
    tracker.update_config(record)
    extra = [tracker.callback, marks.callback(), memory_plan.loss_guard(fit.plan.precision), *(callbacks or [])]
    trainer = caption_trainer.make(settings, model, device, batches, extra)
    result = caption_trainer.train(trainer, settings, resume_from, fit.plan, device, tracker)
    record["log_history"] = [h for h in trainer.state.log_history if "loss" in h]  # loss, rate, norm per log
    peaks = processes.finish(device)  # several processes: each one's peak memory; then process 0 goes on alone
    if not is_main:
        return 0
    if peaks:
        record["peak_gpu_memory_gb_by_process"] = peaks

    # Save the adapter, caption the held-out pictures, score the evaluation split
    adapter_dir = run_outputs.save(model, data.processor, record, result, marks, device)
    marks("saved")
    evaluation.after_training(model, data, eval_items, recipe, tracker, results, settings.output_dir, marks)
    tracker.finish()
    marks("end")
    run_outputs.finish(adapter_dir, record, result, marks)  # the summary lines, the last naming the adapter
    return 0


def read_settings(argv: list[str] | None = None):
    """The settings, parsed, checked and resolved into one frozen object: every mistake is one line here, before
    anything is loaded or written (run.sh checks its arguments with this too)."""
    return train_settings.resolved(cli.parse_settings(globals(), argv))


def interrupted_line() -> str:
    """What Ctrl-C prints. Under torchrun, Ctrl-C reaches every process and torchrun, whose SIGTERM then follows: this
    line is the process's one (processes.say_once), so the SIGTERM adds none."""
    processes.say_once()
    return "interrupted; continue from the last checkpoint with: " + processes.rerun_command("--resume")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = timing.Marks()
    started.mark_process_start()
    cli.run(lambda: main(marks=started), interrupted=interrupted_line, skip_teardown=True)
