"""transformers' Trainer for captions: the plain Trainer when given no vision cache; with one, fed from the cached features
with the loss computed on the caption positions' logits only.

    model, graphs = caption_trainer.with_lora(model, settings, device, data, marks)   # data: vision_cache.TrainingData
    trainer = caption_trainer.make(settings, model, device, data, callbacks)
    result = caption_trainer.train(trainer, settings, resume_from, plan, device, tracker)

On the fast path every batch is padded to one length (`collate_encoded`): the positions, image-token places and the
loss's token count are built by the collator on the CPU and batches are copied without waiting, so no step waits on the
GPU. Padding goes on the right, so causal attention needs no mask (flash attention). The LM head runs on the caption
positions only, and the loss is the same sum / token count transformers computes (tests/test_fastpath.py compares the
two paths' losses and weights).
"""

from __future__ import annotations

import functools

import torch
from transformers import Trainer

from vlcap.feature_store import VisionCache
from vlcap.qwen import base_model


def collate_encoded(examples: list[dict], pad_token_id: int, pad_to: int) -> dict:
    """Pad to one fixed length (one shape for every batch: CUDA graphs replay it) and keep logits for captions only.

    Everything the step needs is built here, on the CPU, so the step itself never waits for the GPU: the flat
    positions the cached image features go to, the M-RoPE position ids. `logits_to_keep` are the positions whose next
    token is a caption token in some row; `shift_labels` are those next tokens (-100 elsewhere), the key transformers'
    Trainer counts the loss's tokens from; `labels` stays the full labels.

    No attention mask: the padding is on the right, so under causal attention no real token ever sees a padding one,
    and the language model, given no mask, attends causally through SDPA's fused kernels (flash attention on the GPU,
    with grouped keys and values as they are) instead of a masked kernel with the keys and values repeated per head.
    What the padding positions compute is never read: their labels are -100.
    """
    n = len(examples)
    input_ids = torch.full((n, pad_to), pad_token_id, dtype=torch.long)
    labels = torch.full((n, pad_to), -100, dtype=torch.long)
    position_ids = torch.zeros((3, n, pad_to), dtype=torch.long)
    for row, e in enumerate(examples):
        length = len(e["input_ids"])
        input_ids[row, :length], labels[row, :length] = e["input_ids"], e["labels"]
        position_ids[:, row, :length] = e["position_ids"]
    first_label = int((labels != -100).int().argmax(1).min())
    keep = torch.arange(first_label - 1, pad_to - 1)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "labels": labels,
        "shift_labels": labels[:, keep + 1],
        "logits_to_keep": keep,
        "image_index": torch.tensor([e["index"] for e in examples]),
        "image_positions": torch.cat([e["image_positions"] + row * pad_to for row, e in enumerate(examples)]),
        "caption_tokens": int((labels[:, keep + 1] != -100).sum()),  # an int: counted here, not on the GPU
    }


class CaptionTrainer(Trainer):
    """transformers' Trainer, fed from the vision cache, with the loss computed on the kept logits."""

    vision_features: VisionCache | torch.Tensor | None = None

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        if isinstance(self.vision_features, VisionCache):
            self.vision_features.training_done()  # not after an interruption: --resume reads the cache's file back
        return result

    def use_vision_cache(self, features: torch.Tensor | None) -> None:
        """Train from the cached features (None: the plain path)."""
        self.vision_features = features
        if features is not None:
            # This path's loss is divided by the caption tokens of the whole accumulated batch (compute_loss), so
            # Trainer must not divide it by the accumulation steps again, whatever the model class declares
            # (Qwen2.5-VL declares accepts_loss_kwargs = False).
            self.model_accepts_loss_kwargs = True

    def _get_num_items_in_batch(self, batch_samples, device):
        # The loss's token count, from the collator's count: counting the labels, already on the GPU, and bringing the
        # sum back would make every step wait for the GPU. Several processes sum their counts on the GPU as Trainer does.
        if self.args.world_size == 1 and batch_samples and all("caption_tokens" in b for b in batch_samples):
            return torch.tensor(sum(b["caption_tokens"] for b in batch_samples))
        return super()._get_num_items_in_batch(batch_samples, device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "image_index" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The cached image features take the image tokens' places in the embeddings; every index is on the GPU
        # already, so nothing here waits for it (transformers' own placeholder check would: a sync per step).
        unwrapped = self.accelerator.unwrap_model(model)
        input_ids = inputs.pop("input_ids")
        embeds = unwrapped.get_input_embeddings()(input_ids)
        if isinstance(self.vision_features, VisionCache):  # rows x levels x image tokens x hidden
            features = self.vision_features.take(inputs)
        else:
            features = self.vision_features[inputs.pop("image_index")]
        embeds = (
            embeds.flatten(0, 1)
            .index_copy(0, inputs.pop("image_positions"), features[:, 0].flatten(0, 1).to(embeds.dtype))
            .view_as(embeds)
        )
        del inputs["labels"], inputs["caption_tokens"]
        labels = inputs.pop("shift_labels")
        deepstack = None
        if (
            features.shape[1] > 1
        ):  # Qwen3-VL: the DeepStack features go to the language model as Qwen3VLModel sends them
            deepstack = base_model(unwrapped).model.language_model.register_forward_pre_hook(
                functools.partial(
                    _with_deepstack,
                    input_ids == unwrapped.config.image_token_id,
                    [features[:, level].flatten(0, 1) for level in range(1, features.shape[1])],
                ),
                with_kwargs=True,
            )
        try:
            outputs = model(inputs_embeds=embeds, **inputs)
        finally:
            if deepstack is not None:
                deepstack.remove()
        loss = torch.nn.functional.cross_entropy(
            outputs.logits.float().flatten(0, 1),
            labels.flatten().to(outputs.logits.device),
            ignore_index=-100,
            reduction="sum",
        )
        # Normalised as transformers' causal-LM loss: by the caption tokens of the whole accumulated batch, counted over
        # every process; DDP then averages the gradients, so undo that average as Trainer.compute_loss does.
        loss = loss / (num_items_in_batch if num_items_in_batch is not None else labels.ne(-100).sum())
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def _with_deepstack(visual_pos_masks, deepstack_visual_embeds, module, args, kwargs):
    """A forward pre-hook of Qwen3-VL's language model: the arguments Qwen3VLModel.forward passes it when it has run the
    vision tower itself (the image tokens' places, and per DeepStack layer the features in the order of those places)."""
    return args, {**kwargs, "visual_pos_masks": visual_pos_masks, "deepstack_visual_embeds": deepstack_visual_embeds}


# ---------------------------------------------------------------------------------------------------- train.py's doors
def with_lora(model, settings, device: str, data, marks):
    """(the model with LoRA on the language model's projections, seeded; whether its decoder layers run as CUDA graphs,
    captured here on the fast path on a GPU)."""
    from transformers import set_seed

    from vlcap import compat, fused_layers, graphed_layers, qwen

    set_seed(settings.seed)  # LoRA's initial weights do not depend on what preparing the data drew from the RNG
    if settings.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad to backprop LoRA
    model = qwen.add_lora(model, settings.lora_r, settings.lora_alpha, settings.lora_dropout, settings.lora_targets)
    # Under torchrun each process captures its own, before Trainer wraps the model in DDP (graphed_layers.capture).
    graphs = data.fast and settings.cuda_graphs and can_graph(device) and compat.available("fast training", model)
    marks("capture")
    if graphs:
        model.train()  # captured with dropout active, as training replays it
        with fused_layers.fast_training(model, active=True, autocast=settings.precision != "fp32"):
            graphed_layers.capture(model, settings.batch_size, data.pad_to, accumulate=settings.grad_accum > 1)
    marks("captured")
    return model, graphs


def can_graph(device: str) -> bool:
    """CUDA graphs need a GPU (the tests stand in for them on the CPU: tests/cpu_graphs.py)."""
    return device.startswith("cuda")


def make(settings, model, device: str, data, callbacks: list) -> CaptionTrainer:
    """transformers' Trainer over `data` (vision_cache.TrainingData) with the run's settings (the plain Trainer when
    given no vision cache)."""
    from transformers import TrainingArguments

    from vlcap import compat, processes

    plain = not isinstance(data.dataset, list)  # the plain path's pictures are decoded by DataLoader workers
    training_args = TrainingArguments(
        output_dir=settings.output_dir,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="linear",
        optim="adamw_torch_fused" if device.startswith("cuda") else "adamw_torch",
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        seed=settings.seed,
        data_seed=settings.seed,
        # Autocast in the plan's precision (fp16 with loss scaling); the LoRA weights and their optimizer state stay fp32.
        bf16=settings.precision == "bf16",
        fp16=settings.precision == "fp16",
        logging_nan_inf_filter=False,  # its per-step NaN check makes every step wait for the GPU
        use_cpu=device == "cpu",
        # Batches are copied from pinned memory without making the CPU wait for the GPU.
        accelerator_config={"non_blocking": device.startswith("cuda")},
        dataloader_pin_memory=device.startswith("cuda"),
        dataloader_num_workers=settings.workers if plain else 0,
        dataloader_persistent_workers=plain and settings.workers > 0,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        report_to="none",
        # activation_checkpointing (transformers 5.24) or gradient_checkpointing (5.20, Python 3.10's last release)
        **{compat.checkpointing_keyword(): settings.gradient_checkpointing},
    )
    if device.startswith("cuda") and processes.count() == 1:
        # One process trains on one GPU. With several visible, Trainer would wrap the model in torch's DataParallel,
        # which splits every batch tensor along its first axis (the M-RoPE positions' is not the batch): torchrun runs
        # one process per GPU instead.
        if torch.cuda.device_count() > 1:
            print(
                f"note: {torch.cuda.device_count()} GPUs visible, this process trains on one; "
                f"`torchrun --nproc_per_node {torch.cuda.device_count()} train.py` trains on all of them"
            )
        _ = training_args.device  # set up the devices now, so that Trainer keeps the count below
        training_args._n_gpu = 1
    trainer = CaptionTrainer(
        model=model,
        args=training_args,
        train_dataset=data.dataset,
        data_collator=data.collator,
        callbacks=[c for c in [_checkpoints_on_schedule(), *callbacks] if c],
    )
    trainer.use_vision_cache(data.features)
    return trainer


def _checkpoints_on_schedule():
    """A TrainerCallback: checkpoints every SAVE_STEPS steps only. transformers also writes one when training ends, but
    a finished run has nothing to resume (its adapter is saved next), and that checkpoint's optimizer state (0.6 GB for
    the 2B model) takes a large share of a seconds-long training run."""
    from transformers import TrainerCallback

    class OnSchedule(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps and state.global_step % args.save_steps:
                control.should_save = False

    return OnSchedule()


def train(trainer: CaptionTrainer, settings, resume_from: str | None, plan, device: str, tracker):
    """trainer.train() with the fast path's layers in place, every way it can stop early turned into one line (and
    SwanLab's run marked aborted)."""
    from vlcap import cli, fused_layers, memory_plan, processes

    processes.same_start(resume_from, settings.batch_size, settings.grad_accum)
    if resume_from:
        print(f"resuming from {resume_from}")
    fast = trainer.vision_features is not None
    try:
        with fused_layers.fast_training(trainer.model, active=fast, autocast=settings.precision != "fp32"):
            return trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        tracker.finish(aborted=True)
        raise
    except torch.OutOfMemoryError:  # another process took memory, or the estimate was short: one line, not a traceback
        tracker.finish(aborted=True)
        raise cli.UserError(memory_plan.out_of_memory(plan, settings.output_dir, device)) from None
    except Exception as e:
        if not processes.lost_peer(e):
            raise
        tracker.finish(aborted=True)
        line = processes.stopped("lost the connection to another process of this run")
        if line is None:  # torchrun's stop came first and was said: the process is ending
            raise SystemExit(2) from None
        raise cli.UserError(line) from None
