"""Fit training to the GPU the reader has: its free memory picks the batch split, gradient checkpointing and the vision
cache; whether it has bf16 picks the precision. What the user set explicitly is never changed, only checked.

    card = memory.Card.detect("cuda")                     # total / free memory, compute capability, bf16
    precision = memory.choose_precision(card, "auto")     # bf16; fp16 mixed precision on cards without bf16
    shape = memory.Shape.of_model(model_dir, lora_r=64, lora_targets="q_proj,...")
    job = memory.Job(pictures=496, seq_tokens=144, caption_tokens=18, cache_gb=0.15)
    plan = memory.plan(card, shape, job, precision, user={"gradient_checkpointing": True})
    print(plan.reason)   # "memory: 12.0 GB free on ...: batch 8 x 2 accumulation (needs about 11.8 GB with headroom; ...)"

`plan` is a pure function of those four things and the settings the user gave: tests call it for simulated cards.
It walks a ladder from fastest to smallest and takes the first rung the memory model says fits: the whole batch in
one step; smaller batches with accumulation (the same effective batch); then gradient checkpointing from the largest
batch down; each with fewer pictures captioned at a time after training before the next; when a rung does not fit
with the vision cache on the GPU up to VISION_CACHE_GB, with less of it there (the rest is read from host memory ahead
of each step: vlcap/fastpath.py's VisionCache). GB here is 10^9 bytes, as bench/RESULTS.md and
torch.cuda.max_memory_allocated() / 1e9 report it.

For testing, VLCAP_GPU_MEMORY_GB=12 makes Card.detect cap this process's GPU memory at 12 GB
(torch.cuda.set_per_process_memory_fraction) and report a 12 GB card, so an 80 GB card can stand in for a 12 GB one;
VLCAP_GPU_BF16=0 makes it report a card without bf16 (as a T4 or V100).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace

from vlcap import cli

GB = 1e9
MEMORY_ENV = "VLCAP_GPU_MEMORY_GB"  # testing: imitate a card of this many GB (the process is capped to it)
BF16_ENV = "VLCAP_GPU_BF16"  # testing: 0 imitates a card without bf16

# train.py's settings this module chooses when the user leaves them alone, at their shipped values (train.py's
# constants; tests/test_memory.py checks the two agree). A setting counts as the user's when it is on the command line or
# its constant no longer holds this value.
SHIPPED = {
    "batch_size": 16,
    "grad_accum": 1,
    "gradient_checkpointing": False,
    "vision_cache_gb": 8.0,
    "cuda_graphs": True,
    "eval_batch_size": 32,
}
PRECISIONS = ("auto", "bf16", "fp16", "fp32")

# ---------------------------------------------------------------------------------------------------- memory model
# Peak GPU memory of a training run =
#     base weights                    parameters x 2 bytes (bf16 / fp16) or 4 (fp32)
#   + LoRA                            its parameters x 16 bytes: fp32 weight, gradient, Adam's two moments
#   + vision cache on the GPU         pictures x image tokens x hidden x 2 or 4 bytes (fastpath.vision_cache_bytes), up to
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
# Calibration: bench/RESULTS.md, one H100 80GB, the 2B stand-in (2,208,985,600 parameters: 4.42 GB in bf16; LoRA r=64 on
# the seven projections, 73,859,072 parameters: 1.18 GB), 496 pictures at 280x280 (100 image tokens each: a 0.15 GB
# cache), sequences padded to 144 tokens of which 18 are caption positions, the 4 held-out pictures captioned after
# training, peaks from torch.cuda.max_memory_allocated:
#   (a) fast path, batch 16, no checkpointing                     14.1 GB   runs B, C, D, F-L
#   (b) fast path, batch 4 x 4 with checkpointing (--low-memory)   6.1 GB   runs A-C, H, I
#   (c) plain path (no vision cache), batch 16                    17.3 GB   runs B-D, H, I
# (c) - (a) is the full logits: 16 x 126 more positions x 151,936 x LOGIT_BYTES, less the cache: LOGIT_BYTES 10.9.
# (a) and (b) then give ACTIVATION_BYTES (120 KB per token and layer of the 2B shape: 11.46 x (1536 + 8960)) and
# OVERHEAD_GB 0.11. Counting the tensors autograd saves for one decoder layer of that shape on the CPU gives 184 KB per
# token (the CPU's autocast keeps more fp32 copies), the same order. Checked against measurements not used to fit:
#   the tutorial's recipe (plain path, batch 4 x 4, checkpointing)   6.9 GB measured (run A), 6.8 predicted
#   5,000 pictures (a 1.52 GB cache), fast path, batch 16            15.4 GB measured (runs E, K), 15.5 predicted
ACTIVATION_BYTES = 11.46  # saved per token, decoder layer and unit of (hidden + intermediate) size, 16-bit training
LOGIT_BYTES = 11.0  # per logit the LM head computes: bf16 logits, their fp32 copy, log-softmax and gradient (in part)
OVERHEAD_GB = 0.11  # what the rest of a step holds at its peak (cuBLAS workspace, optimizer temporaries, masks)
# Captioning (not measured; from the 2B shapes, per 280x280 picture of 144 tokens and 64 new ones): its KV cache 5.4 MB
# (28 layers x 2 x 256 x 2 bytes a token) and the larger of the vision tower's transients (~12.5 MB: a block's MLP over
# 400 patches) and one decoder layer's prefill (~7 MB): about 20 MB, 140 KB per token of the prompt.
CAPTION_BYTES_PER_TOKEN = 140e3
# Headroom: the caching allocator reserves more than it hands out, mostly in what changes every step; and the CUDA
# context, kernels loaded later and other libraries use memory outside it. From bench/memory_fit.py (bench/RESULTS.md,
# memory_fit run 1): batch 16 in one step, estimated 13.8 GB, needed 16.1 GB under a 16 GB cap (it ran out there at
# 0.15 / 0.75), while batch 8 x 2, estimated 10.1 GB, ran within 12 GB (10.8 GB reserved).
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
    cache_limit_gb: float = SHIPPED["vision_cache_gb"]  # VISION_CACHE_GB
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
    eval_batch_size: int = SHIPPED["eval_batch_size"]  # pictures captioned at a time, after training
    cache_gpu_gb: float | None = None  # GB of the vision cache kept on the GPU when less than VISION_CACHE_GB allows

    def describe(self) -> str:
        split = (
            f"batch {self.batch_size} in one step"
            if self.grad_accum == 1
            else f"batch {self.batch_size} x {self.grad_accum} accumulation"
        )
        return split + (" with checkpointing" if self.gradient_checkpointing else "")

    def flags(self) -> str:
        """The command-line flags that ask for these settings."""
        return (
            f"--batch-size {self.batch_size} --grad-accum {self.grad_accum}"
            + (" --gradient-checkpointing" if self.gradient_checkpointing else "")
            + ("" if self.vision_cache else " --vision-cache-gb 0")
            + (
                ""
                if self.cache_gpu_gb is None or not self.vision_cache
                else f" --vision-cache-gb {self.cache_gpu_gb:g}"
            )
            + (
                ""
                if self.eval_batch_size == SHIPPED["eval_batch_size"]
                else f" --eval-batch-size {self.eval_batch_size}"
            )
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


@dataclass(frozen=True)
class Plan:
    """The chosen settings, why, and what was tried."""

    settings: Settings
    precision: Precision
    estimate: Estimate
    card: Card | None
    fits: bool  # with headroom
    reason: str  # one line, for the user
    user: dict = field(default_factory=dict)  # the settings the user gave (never changed)
    ladder: tuple = ()  # ((Settings, Estimate), ...) tried, best first
    instead: Settings | None = None  # when the user's settings do not fit: what fits with those left to the plan

    @property
    def hopeless(self) -> bool:
        """Even the expected peak, without headroom, is more than the card has free: training would run out."""
        return self.card is not None and self.estimate.peak > self.card.free_gb

    def apply(self, args) -> None:
        """Write the chosen settings into train.py's parsed settings (on the CPU only the precision)."""
        args.precision = self.precision.name
        if self.card is not None:
            s = self.settings
            args.batch_size, args.grad_accum = s.batch_size, s.grad_accum
            args.gradient_checkpointing, args.cuda_graphs = s.gradient_checkpointing, s.cuda_graphs
            args.eval_batch_size = s.eval_batch_size
            if s.cache_gpu_gb is not None:
                args.vision_cache_gb = s.cache_gpu_gb

    def smaller(self) -> Settings | None:
        """The next rung of the ladder whose training step needs less memory than this plan's, or None."""
        rungs = [s for s, _ in self.ladder]
        later = self.ladder[rungs.index(self.settings) + 1 :] if self.settings in rungs else self.ladder
        smaller = [s for s, e in later if e.activations < self.estimate.activations]
        same_captions = [s for s in smaller if s.eval_batch_size == self.settings.eval_batch_size]
        return (same_captions or smaller or [None])[0]

    def as_dict(self) -> dict:
        """For train_settings.json: what was chosen, the estimate, the card."""
        return {
            "settings": asdict(self.settings),
            "precision": self.precision.name,
            "estimated_peak_gb": round(self.estimate.peak, 2),
            "estimated_need_gb": round(self.estimate.need, 2),
            "card": asdict(self.card) if self.card else None,
            "user": sorted(self.user),
            "reason": self.reason,
        }


def _splits(batch: int) -> list[tuple[int, int]]:
    """Ways to run an effective batch of `batch` per device: (per-step batch, accumulation), largest batch first."""
    return [(b, batch // b) for b in range(batch, 0, -1) if batch % b == 0]


def plan(card: Card | None, shape: Shape, job: Job, precision: Precision, user: dict | None = None) -> Plan:
    """The fastest settings that fit `card`, keeping every setting in `user` (train.py's names: batch_size, grad_accum,
    gradient_checkpointing, vision_cache_gb, cuda_graphs) as the user gave it.

    On the CPU (card None) nothing is chosen: the settings are the user's or the shipped ones.
    """
    user = dict(user or {})
    given = {**SHIPPED, **user}
    # What does not fit VISION_CACHE_GB goes to host memory (fastpath.VisionCache): the cache is used whatever its size.
    cache_ok = job.fast and job.cache_gb is not None and given["vision_cache_gb"] > 0
    job = replace(job, cache_limit_gb=given["vision_cache_gb"])

    def settings(batch, accum, ckpt, cache, captions=given["eval_batch_size"]):
        graphs = given["cuda_graphs"] and cache and not ckpt and precision.name == "bf16" and card is not None
        return Settings(batch, accum, ckpt, cache, graphs, captions)

    if card is None:
        s = settings(given["batch_size"], given["grad_accum"], given["gradient_checkpointing"], cache_ok)
        e = estimate(shape, job, precision, s)
        return Plan(
            s, precision, e, None, True, f"memory: the CPU: {s.describe()}; precision {precision.name}", user, ((s, e),)
        )

    if "batch_size" in user or "grad_accum" in user:
        splits = [(given["batch_size"], given["grad_accum"])]
    else:
        splits = _splits(given["batch_size"] * given["grad_accum"])
    # Captioning fewer pictures at a time after training costs seconds; a slower training step costs minutes: each
    # training rung is tried with smaller captioning batches before the next rung.
    captions = given["eval_batch_size"]
    caption_batches = [captions] if "eval_batch_size" in user else [captions] + [c for c in (16, 8, 4) if c < captions]

    def rungs(cache: bool):
        for ckpt in [user["gradient_checkpointing"]] if "gradient_checkpointing" in user else [False, True]:
            for batch, accum in splits:
                if batch == 1 and not ckpt and len(splits) > 1 and "gradient_checkpointing" not in user:
                    continue  # one picture per step without checkpointing: checkpointing a larger batch is as small, faster
                for c in caption_batches:
                    s = settings(batch, accum, ckpt, cache, c)
                    yield s, estimate(shape, job, precision, s)

    def less_on_gpu(s: Settings, e: Estimate):
        """The same step with as much of the cache on the GPU as fits beside it (the rest read from host memory or disk)."""
        s = replace(s, cache_gpu_gb=math.floor(100 * max(0.0, e.cache - (e.need - card.free_gb))) / 100)
        return s, estimate(shape, job, precision, s)

    # Rungs with the cache on the GPU up to VISION_CACHE_GB first; when one does not fit, the same rung with less of
    # it there. Where part of the cache is read from host memory anyway, right after the rung: streaming more costs
    # about nothing, a smaller step costs time. Where it all fits, only after every rung with all of it on the GPU.
    with_cache = list(rungs(True)) if cache_ok else []
    spills = cache_ok and job.cache_gb > given["vision_cache_gb"]
    ladder = []
    for s, e in with_cache:
        ladder.append((s, e))
        if spills and e.need > card.free_gb and e.cache > 0:
            ladder.append(less_on_gpu(s, e))
    if not spills:
        ladder += [less_on_gpu(s, e) for s, e in with_cache if e.need > card.free_gb and e.cache > 0]
    ladder += list(rungs(False))
    chosen = next(((s, e) for s, e in ladder if e.need <= card.free_gb), None)
    fits = chosen is not None
    if chosen is None:
        chosen = min(ladder, key=lambda se: se[1].need)
    s, e = chosen
    instead = None
    split_or_ckpt = {"batch_size", "grad_accum", "gradient_checkpointing"}
    if not fits and split_or_ckpt & set(user):
        free_choice = plan(card, shape, job, precision, {k: v for k, v in user.items() if k not in split_or_ckpt})
        instead = free_choice.settings if free_choice.fits else None
    p = Plan(s, precision, e, card, fits, "", user, tuple(ladder), instead)
    return replace(p, reason=_reason(p, job))


def _reason(p: Plan, job: Job) -> str:
    s, card, given = p.settings, p.card, {**SHIPPED, **p.user}
    where = f"{card.free_gb:.1f} GB free on {card.name}"
    mine = [n for n in ("batch_size", "grad_accum", "gradient_checkpointing") if n in p.user]
    split = (
        f"batch {s.batch_size} in one step"
        if s.grad_accum == 1
        else f"batch {s.batch_size} x {s.grad_accum} accumulation"
    )
    what = split + (" (as set)" if {"batch_size", "grad_accum"} & set(mine) else "")
    if s.gradient_checkpointing:
        what += " with checkpointing" + (" (as set)" if "gradient_checkpointing" in mine else "")
    if (s.batch_size, s.grad_accum, s.gradient_checkpointing) == (4, 4, True) and not mine:
        what += ", as --low-memory"
    if s.eval_batch_size != given["eval_batch_size"]:
        what += f", captions {s.eval_batch_size} pictures at a time"
    if p.fits and not s.vision_cache and job.fast and job.cache_gb is not None and given["vision_cache_gb"] > 0:
        what += f", without the vision cache (its {job.cache_gb:.1f} GB do not fit beside training)"
    if s.vision_cache and job.cache_gb and job.cache_gb > p.estimate.cache:
        what += (
            f", {p.estimate.cache:.1f} GB of the {job.cache_gb:.1f} GB vision cache on the GPU (the rest read ahead "
            "of each step from host memory or disk)"
        )
    if given["cuda_graphs"] and s.vision_cache and not s.gradient_checkpointing and not s.cuda_graphs:
        what += f", no CUDA graphs in {p.precision.name} (they are captured in bf16)"
    if not p.fits:
        flags = ", ".join("--" + n.replace("_", "-") for n in mine)
        if mine:
            hint = f"leave out {flags} to let train.py choose" + (
                f" ({p.instead.describe()} fits)" if p.instead else ""
            )
        else:
            hint = "the smallest configuration; free GPU memory (other processes?) or use a card with more"
        return f"memory: {where}, but {what} needs about {p.estimate.need:.1f} GB with headroom: {hint}"
    first_s, first_e = p.ladder[0]
    why = f"; {first_s.describe()} needs {first_e.need:.1f}" if first_s != s else ""
    return f"memory: {where}: {what} (needs about {p.estimate.need:.1f} GB with headroom{why})"


# ------------------------------------------------------------------------------------------------ explicit settings
def explicit_settings(namespace: dict, argv: list[str] | None, names=tuple(SHIPPED)) -> set[str]:
    """The settings among `names` the user gave: on the command line, or by editing the constant in the script
    (`namespace`, the script's globals) away from its shipped value (SHIPPED)."""
    args = cli.parse_settings(namespace, argv)
    # Parsed again with every default moved: a value that stays put came from the command line.
    moved = {
        n.upper(): (not namespace[n.upper()]) if isinstance(namespace[n.upper()], bool) else namespace[n.upper()] + 7919
        for n in names
    }
    again = cli.parse_settings({**namespace, **moved}, argv)
    return {n for n in names if getattr(args, n) == getattr(again, n) or getattr(args, n) != SHIPPED.get(n)}


# --------------------------------------------------------------------------------------------------- when it fails
def out_of_memory(plan: Plan, output_dir, device: str = "cuda", now: tuple[float, float] | None = None) -> str:
    """One line for an out-of-memory error during training: what happened, which setting to lower, how to resume.

    `now` is (GB free on the card, GB this process holds), read from the GPU when not given.
    """
    from pathlib import Path

    if now is None:
        import torch

        now = torch.cuda.mem_get_info(device)[0] / GB, torch.cuda.memory_reserved(device) / GB
    free, mine = now
    card = plan.card
    if card is not None and card.simulated:  # capped by VLCAP_GPU_MEMORY_GB: free within the cap
        free = min(free, max(0.0, card.total_gb - mine))
    others_then = card.total_gb - card.free_gb if card else 0.0
    others_now = (card.total_gb - free - mine) if card else 0.0
    cause = (
        f"other processes took {others_now - others_then:.1f} GB since it started"
        if card and others_now > others_then + 0.5
        else f"it held {mine:.1f} GB, {free:.1f} GB were left"
    )
    smaller = plan.smaller()
    chosen = [n for n in ("batch_size", "grad_accum", "gradient_checkpointing") if n in plan.user]
    checkpoints = sorted(
        (p for p in Path(output_dir).glob("checkpoint-*") if p.name[11:].isdigit()), key=lambda p: int(p.name[11:])
    )
    resume = (
        f" --resume (it continues from {checkpoints[-1].name})"
        if checkpoints
        else " (no checkpoint yet: it starts again)"
    )
    if smaller is None:
        return f"the GPU ran out of memory while training ({cause}); nothing smaller fits this model: free GPU memory and rerun with{resume}"
    lower = f"lower {', '.join('--' + n.replace('_', '-') for n in chosen)}: " if chosen else ""
    return f"the GPU ran out of memory while training ({cause}); {lower}rerun with {smaller.flags()}{resume}"


def loss_guard(precision: Precision):
    """A transformers TrainerCallback that stops fp16 training with one line when the logged loss is inf or nan (the
    model's activations overflowed fp16's range, which loss scaling does not cure), or None for other precisions."""
    if precision.name != "fp16":
        return None
    from transformers import TrainerCallback

    class _LossGuard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                raise cli.UserError(
                    f"the loss is {loss} at step {state.global_step} in fp16: the model's activations overflow fp16; "
                    "rerun with --precision fp32 (slower, twice the memory)."
                )

    return _LossGuard()
