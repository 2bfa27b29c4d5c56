"""The memory a training run needs on the GPU the reader has, and the precision that card computes in.

    card = memory.Card.detect("cuda")                     # total / free memory, compute capability, bf16
    precision = memory.choose_precision(card, "auto")     # bf16; fp16 mixed precision on cards without bf16
    shape = memory.Shape.of_model(model_dir, lora_r=64, lora_targets="q_proj,...")
    job = memory.Job(pictures=496, seq_tokens=144, caption_tokens=18, cache_gb=0.15)
    need = memory.estimate(shape, job, precision, memory.Settings(16, 1, False, True, True, 32)).need   # GB

This module is the memory model: what a GPU is (Card), how training computes (Precision), what a model and a job
need (Shape, Job), and the expected peak of one configuration (`estimate`). vlcap/memory_plan.py chooses among
configurations with it. GB here is 10^9 bytes, as the benchmarks and
torch.cuda.max_memory_allocated() / 1e9 report it.

For testing, VLCAP_GPU_MEMORY_GB=12 makes Card.detect cap this process's GPU memory at 12 GB
(torch.cuda.set_per_process_memory_fraction) and report a 12 GB card, so an 80 GB card can stand in for a 12 GB one;
VLCAP_GPU_BF16=0 makes it report a card without bf16 (as a T4 or V100).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from vlcap import cli

GB = 1e9
MEMORY_ENV = "VLCAP_GPU_MEMORY_GB"  # testing: imitate a card of this many GB (the process is capped to it)
BF16_ENV = "VLCAP_GPU_BF16"  # testing: 0 imitates a card without bf16

PRECISIONS = ("auto", "bf16", "fp16", "fp32")

# ---------------------------------------------------------------------------------------------------- memory model
# Peak GPU memory of a training run =
#     base weights                    parameters x 2 bytes (bf16 / fp16) or 4 (fp32)
#   + LoRA                            its parameters x 16 bytes: fp32 weight, gradient, Adam's two moments
#   + vision cache on the GPU         pictures x image tokens x hidden x 2 or 4 bytes (vision_cache_bytes), up to
#                                     VISION_CACHE_GB or less when that makes training fit; the rest is in host memory
#   + OVERHEAD_GB
#   + the larger of
#     - a training step: batch x per sample, without checkpointing tokens x layers x ACTIVATION_BYTES x (hidden +
#       intermediate); with checkpointing each layer's input (tokens x layers x hidden x 2 bytes) plus one layer's
#       activations, recomputed in the backward pass; plus the logits, LOGIT_BYTES x vocabulary per position the LM head
#       runs on (the caption positions on the fast path, every position on the plain path)
#     - captioning after training, EVAL_BATCH_SIZE pictures at a time, CAPTION_BYTES_PER_TOKEN per token of their prompts,
#       beside the memory pool of the CUDA graphs (when used), which keeps a batch's layer activations for the graphs' life
# with activations, logits and captioning twice as large in fp32.
#
# Calibration: bench/bench.py on one H100 80GB, the 2B stand-in (2,208,985,600 parameters: 4.42 GB in bf16; LoRA r=64 on
# the seven projections, 73,859,072 parameters: 1.18 GB), 496 pictures at 280x280 (100 image tokens each: a 0.15 GB
# cache), sequences padded to 144 tokens of which 18 are caption positions, the 4 held-out pictures captioned after
# training, peaks from torch.cuda.max_memory_allocated:
#   (a) fast path, batch 16, no checkpointing                     14.1 GB
#   (b) fast path, batch 4 x 4 with checkpointing (--low-memory)   6.1 GB
#   (c) plain path (no vision cache), batch 16                    17.3 GB
# (c) - (a) is the full logits: 16 x 126 more positions x 151,936 x LOGIT_BYTES, less the cache: LOGIT_BYTES 10.9.
# (a) and (b) then give ACTIVATION_BYTES (120 KB per token and layer of the 2B shape: 11.46 x (1536 + 8960)) and
# OVERHEAD_GB 0.11. Counting the tensors autograd saves for one decoder layer of that shape on the CPU gives 184 KB per
# token (the CPU's autocast keeps more fp32 copies), the same order. Checked against measurements not used to fit:
#   the tutorial's recipe (plain path, batch 4 x 4, checkpointing)   6.9 GB measured, 6.8 predicted
#   5,000 pictures (a 1.52 GB cache), fast path, batch 16            15.4 GB measured, 15.5 predicted
ACTIVATION_BYTES = 11.46  # saved per token, decoder layer and unit of (hidden + intermediate) size, 16-bit training
LOGIT_BYTES = 11.0  # per logit the LM head computes: bf16 logits, their fp32 copy, log-softmax and gradient (in part)
OVERHEAD_GB = 0.11  # what the rest of a step holds at its peak (cuBLAS workspace, optimizer temporaries, masks)
# Captioning (not measured; from the 2B shapes, per 280x280 picture of 144 tokens and 64 new ones): its KV cache 5.4 MB
# (28 layers x 2 x 256 x 2 bytes a token) and the larger of the vision tower's transients (~12.5 MB: a block's MLP over
# 400 patches) and one decoder layer's prefill (~7 MB): about 20 MB, 140 KB per token of the prompt.
CAPTION_BYTES_PER_TOKEN = 140e3
# Headroom: the caching allocator reserves more than it hands out, mostly in what changes every step; and the CUDA
# context, kernels loaded later and other libraries use memory outside it. From bench/memory_fit.py: batch 16 in one
# step, estimated 13.8 GB, needed 16.1 GB under a 16 GB cap (it ran out there at 0.15 / 0.75), while batch 8 x 2,
# estimated 10.1 GB, ran within 12 GB (10.8 GB reserved).
FRAGMENTATION = 0.25  # reserve this fraction of what changes (a step's activations, or captioning) on top
MARGIN_GB = 0.6  # and leave this much of the card untouched
# Token counts when none are measured: the chat template, the prompt and the closing tokens around the picture take 26
# tokens, captions up to 32 (COCO captions are 10-20 words).
PROMPT_TOKENS = 26
CAPTION_TOKENS = 32


# ------------------------------------------------------------------------------------------------------------ card
@dataclass(frozen=True)
class Card:
    """A GPU as the plan sees it: its memory (GB) and whether it computes in bf16."""

    name: str
    total_gb: float
    free_gb: float
    capability: tuple[int, int] = (8, 0)
    bf16: bool = True
    simulated: bool = False  # VLCAP_GPU_MEMORY_GB capped this process to total_gb

    @classmethod
    def simulate(cls, total_gb: float, bf16: bool = True, free_gb: float | None = None) -> Card:
        """A card for tests: total_gb of which free_gb (default: all) is free."""
        return cls(
            f"{total_gb:g} GB card",
            total_gb,
            total_gb if free_gb is None else free_gb,
            (8, 0) if bf16 else (7, 5),
            bf16,
            simulated=True,
        )

    @classmethod
    def detect(cls, device: str = "cuda") -> Card:
        """The GPU `device` names, as it is now. With VLCAP_GPU_MEMORY_GB set (testing), this process is capped to
        that much memory and the card reports it; VLCAP_GPU_BF16=0 reports no bf16."""
        import torch

        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        try:
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no emulation argument
            bf16 = props.major >= 8
        bf16 = bf16 and os.environ.get(BF16_ENV, "1") != "0"
        name, simulated = props.name, os.environ.get(MEMORY_ENV)
        if simulated:
            limit = float(simulated) * GB
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), index)
            free, total = min(free, limit - torch.cuda.memory_reserved(index)), limit
            name = f"{props.name} limited to {float(simulated):g} GB by {MEMORY_ENV}"
        return cls(name, total / GB, free / GB, (props.major, props.minor), bf16, simulated=bool(simulated))


# -------------------------------------------------------------------------------------------------------- precision
@dataclass(frozen=True)
class Precision:
    """How training computes: bf16 (autocast, bf16 weights), fp16 (autocast, fp16 weights, loss scaling) or fp32.
    LoRA weights and their optimizer state are fp32 in all three."""

    name: str
    reason: str

    @property
    def dtype(self):
        """The torch dtype the base model is loaded in."""
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.name]

    @property
    def bytes(self) -> int:
        return 4 if self.name == "fp32" else 2


def check_precision(requested: str) -> None:
    if requested not in PRECISIONS:
        raise cli.UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {requested!r}.")


def choose_precision(card: Card | None, requested: str = "auto", training: bool = True) -> Precision:
    """The precision for `card` (None: the CPU). `requested` forces one; "auto" takes bf16 where the card has it and
    fp16 where it does not (T4, V100: compute capability 7.x), for training with loss scaling and fp32 LoRA weights."""
    check_precision(requested)
    if card is None:
        if requested == "fp16" and training:
            raise cli.UserError(
                "--precision fp16 needs a CUDA GPU: on the CPU there is no loss scaling (transformers' Trainer runs fp16 "
                "there without it); pass --precision fp32 or bf16."
            )
        return Precision(
            "fp32" if requested == "auto" else requested, "the CPU" + (" (as set)" if requested != "auto" else "")
        )
    where = f"{card.name}, compute capability {card.capability[0]}.{card.capability[1]}"
    if requested == "auto":
        if card.bf16:
            return Precision("bf16", f"bf16 ({where})")
        if not training:
            return Precision(
                "fp16", f"fp16: {where}, has no bf16 (--precision fp32 if captions come out empty or garbled)"
            )
        return Precision(
            "fp16",
            f"fp16 mixed precision with loss scaling, LoRA weights in fp32: {where}, has no bf16 "
            "(--precision fp32 if the loss turns inf or nan)",
        )
    if requested == "bf16" and not card.bf16:
        return Precision(
            "bf16",
            f"bf16 as set, although {where}, has no bf16: expect it slow or failing; --precision auto picks fp16",
        )
    return Precision(requested, f"{requested} as set ({where})")


# ------------------------------------------------------------------------------------------------------------ shape
@dataclass(frozen=True)
class Shape:
    """What the memory model needs of a model: parameter counts and the language model's sizes."""

    params: int  # every weight of the base model (tied embeddings once)
    lora_params: int  # the LoRA weights trained
    layers: int
    hidden: int
    intermediate: int
    vocab: int

    @classmethod
    def of_model(cls, model_dir: str, lora_r: int, lora_targets: str) -> Shape:
        """Counted on an empty (meta device) copy of the model in `model_dir`: no weights are read."""
        import torch
        from transformers import AutoConfig

        from vlcap import qwen

        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = qwen.model_class(model_dir)(config)
        text = config.get_text_config()
        names = {t.strip() for t in lora_targets.split(",") if t.strip()}
        # The projections qwen.add_lora wraps: those named in lora_targets in the language model's decoder layers.
        layers = qwen.base_model(model).model.language_model.layers
        lora = sum(
            lora_r * (m.in_features + m.out_features)
            for n, m in layers.named_modules()
            if n.rsplit(".", 1)[-1] in names and isinstance(m, torch.nn.Linear)
        )
        return cls(
            sum(p.numel() for p in model.parameters()),
            lora,
            text.num_hidden_layers,
            text.hidden_size,
            text.intermediate_size,
            text.vocab_size,
        )


# The 2B model the tutorial fine-tunes (../shared/qwen2-vl-2b-config.json) with the default LoRA (r=64, seven projections).
QWEN2_VL_2B = Shape(
    params=2_208_985_600, lora_params=73_859_072, layers=28, hidden=1536, intermediate=8960, vocab=151_936
)


# -------------------------------------------------------------------------------------------------------------- job
@dataclass(frozen=True)
class Job:
    """What is trained, as far as memory goes."""

    pictures: int
    seq_tokens: int  # longest training sequence (the fast path pads every batch to it)
    caption_tokens: int  # positions the LM head runs on in the fast path (seq_tokens less the prompt)
    cache_gb: float | None = (
        None  # the vision cache's size (all of it); None: no cache possible (each picture's own size)
    )
    cache_limit_gb: float = math.inf  # VISION_CACHE_GB: GB of the cache on the GPU at most
    fast: bool = True  # the fast path (vision cache) is available with the installed transformers

    @classmethod
    def measure(cls, dataset, image_tokens: int, max_length: int, **kwargs) -> Job:
        """Token counts of a training_data.CaptionDataset: the prompt's (from its first picture) plus the longest caption."""
        from vlcap import formats

        first = dataset[0]
        prompt = int((first["labels"] == -100).sum())
        if dataset.image_size == 0:  # pictures of their own size: the processor's largest, as a bound
            prompt += (
                image_tokens - int(first["image_grid_thw"].prod()) // dataset.processor.image_processor.merge_size**2
            )
        captions = dataset.processor.tokenizer(
            [formats.caption_of(it) for it in dataset.items], add_special_tokens=False
        )
        caption = max(len(ids) for ids in captions["input_ids"]) + 1  # and <|im_end|>
        seq = min(max_length, prompt + caption)
        return cls(len(dataset), -(-seq // 8) * 8, -(-seq // 8) * 8 - prompt, **kwargs)

    @classmethod
    def estimate(cls, pictures: int, image_tokens: int, **kwargs) -> Job:
        """Token counts when no data is at hand: PROMPT_TOKENS + CAPTION_TOKENS around the picture."""
        seq = -(-(image_tokens + PROMPT_TOKENS + CAPTION_TOKENS) // 8) * 8
        return cls(pictures, seq, seq - image_tokens - PROMPT_TOKENS, **kwargs)


# ------------------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Settings:
    """The settings the plan chooses (train.py's flags of the same names)."""

    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    vision_cache: bool
    cuda_graphs: bool
    eval_batch_size: int  # pictures captioned at a time, after training
    cache_gpu_gb: float | None = None  # GB of the vision cache kept on the GPU when less than VISION_CACHE_GB allows

    def describe(self) -> str:
        split = (
            f"batch {self.batch_size} in one step"
            if self.grad_accum == 1
            else f"batch {self.batch_size} x {self.grad_accum} accumulation"
        )
        return split + (" with checkpointing" if self.gradient_checkpointing else "")

    def flags(self, eval_batch_size: int | None = None) -> str:
        """The command-line flags that ask for these settings (--eval-batch-size where it is not `eval_batch_size`)."""
        return (
            f"--batch-size {self.batch_size} --grad-accum {self.grad_accum}"
            + (" --gradient-checkpointing" if self.gradient_checkpointing else "")
            + ("" if self.vision_cache else " --vision-cache-gb 0")
            + (
                ""
                if self.cache_gpu_gb is None or not self.vision_cache
                else f" --vision-cache-gb {self.cache_gpu_gb:g}"
            )
            + ("" if self.eval_batch_size == eval_batch_size else f" --eval-batch-size {self.eval_batch_size}")
        )


@dataclass(frozen=True)
class Estimate:
    """GB of one configuration: the parts of the expected peak (as max_memory_allocated counts), and with headroom."""

    weights: float
    lora: float
    cache: float
    activations: float  # a training step's
    retained: float = 0.0  # kept after training: the CUDA graphs' memory pool
    captioning: float = 0.0  # a batch of captions after training
    overhead: float = OVERHEAD_GB

    @property
    def changing(self) -> float:
        """What is not there from the start: a training step's activations, or captioning beside what training kept."""
        return max(self.activations, self.retained + self.captioning)

    @property
    def peak(self) -> float:
        return self.weights + self.lora + self.cache + self.changing + self.overhead

    @property
    def need(self) -> float:
        """The peak plus headroom: what the card must have free."""
        return self.peak + FRAGMENTATION * self.changing + MARGIN_GB


def _cache_on_gpu(job: Job, settings: Settings) -> float:
    """GB of the vision cache on the GPU: up to VISION_CACHE_GB (cache_limit_gb), or the plan's smaller share."""
    if not settings.vision_cache or not job.cache_gb:
        return 0.0
    on_gpu = min(job.cache_gb, job.cache_limit_gb)
    return on_gpu if settings.cache_gpu_gb is None else min(on_gpu, settings.cache_gpu_gb)


def estimate(shape: Shape, job: Job, precision: Precision, settings: Settings) -> Estimate:
    """The memory model above, for one configuration."""
    scale = precision.bytes / 2  # activations and logits in fp32 take twice the room
    per_token_layer = ACTIVATION_BYTES * (shape.hidden + shape.intermediate) * scale
    if settings.gradient_checkpointing:
        layers = job.seq_tokens * (shape.layers * shape.hidden * precision.bytes + per_token_layer)
    else:
        layers = job.seq_tokens * shape.layers * per_token_layer
    logit_positions = job.caption_tokens if settings.vision_cache else job.seq_tokens
    logits = logit_positions * shape.vocab * LOGIT_BYTES * scale
    return Estimate(
        weights=shape.params * precision.bytes / GB,
        lora=shape.lora_params * 16 / GB,
        cache=_cache_on_gpu(job, settings),
        activations=settings.batch_size * (layers + logits) / GB,
        retained=settings.batch_size * layers / GB if settings.cuda_graphs else 0.0,
        captioning=settings.eval_batch_size * job.seq_tokens * CAPTION_BYTES_PER_TOKEN * scale / GB,
    )
