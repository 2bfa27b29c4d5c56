"""Fit training to the GPU the reader has: its free memory picks the batch split, gradient checkpointing, the vision
cache's share of the GPU and the pictures captioned at a time; whether it has bf16 picks the precision. What the user
set (on the command line, or by editing a constant shipped as cli.fitted(...)) is never changed, only checked.

    fit = memory_plan.fit(settings, data, device)   # train.py: the settings with the plan's choices, and why
    plan = memory_plan.plan(card, shape, job, precision, defaults, user={"gradient_checkpointing": True})
    print(plan.reason)   # "memory: 12.0 GB free on ...: batch 8 x 2 accumulation (needs about 11.8 GB with headroom; ...)"

`plan` is a pure function of the card, the model's shape, the job, the precision and the settings: tests call it for
simulated cards. It tries configurations from fastest to smallest and takes the first the memory model (vlcap/memory.py)
says fits: the whole batch in one step; smaller batches with accumulation (the same effective batch); then gradient
checkpointing from the largest batch down; each with fewer pictures captioned at a time after training before the next;
when one does not fit with the vision cache on the GPU up to VISION_CACHE_GB, the same with less of it there (the rest
is read from host memory ahead of each step: vlcap/feature_store.py's VisionCache).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from vlcap import cli
from vlcap.memory import GB, Card, Estimate, Job, Precision, Settings, Shape, choose_precision, estimate

# train.py's settings this module may choose, unless the user set them.
KNOBS = ("batch_size", "grad_accum", "gradient_checkpointing", "vision_cache_gb", "cuda_graphs", "eval_batch_size")


def knob_values(settings) -> dict:
    """The values of the settings the plan may choose, by name (train.py's settings object)."""
    return {n: getattr(settings, n) for n in KNOBS}


def user_settings(settings) -> dict:
    """Those of the plan's settings the user set (on the command line or by editing the constant), by name."""
    return {n: getattr(settings, n) for n in KNOBS if n not in settings.fitted}


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
    tried: tuple = ()  # ((Settings, Estimate), ...) tried, fastest first
    defaults: dict = field(default_factory=dict)  # every setting of KNOBS as the run has it before the plan
    instead: Settings | None = None  # when the user's settings do not fit: what fits with those left to the plan

    @property
    def hopeless(self) -> bool:
        """Even the expected peak, without headroom, is more than the card has free: training would run out."""
        return self.card is not None and self.estimate.peak > self.card.free_gb

    def applied(self, settings):
        """train.py's settings object with the chosen settings (on the CPU only the precision): a new one."""
        if self.card is None:
            return replace(settings, precision=self.precision.name)
        s = self.settings
        return replace(
            settings,
            precision=self.precision.name,
            batch_size=s.batch_size,
            grad_accum=s.grad_accum,
            gradient_checkpointing=s.gradient_checkpointing,
            cuda_graphs=s.cuda_graphs,
            eval_batch_size=s.eval_batch_size,
            vision_cache_gb=settings.vision_cache_gb if s.cache_gpu_gb is None else s.cache_gpu_gb,
        )

    def smaller(self) -> Settings | None:
        """The next configuration tried whose training step needs less memory than this plan's, or None."""
        configurations = [s for s, _ in self.tried]
        later = self.tried[configurations.index(self.settings) + 1 :] if self.settings in configurations else self.tried
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


def plan(
    card: Card | None, shape: Shape, job: Job, precision: Precision, defaults: dict, user: dict | None = None
) -> Plan:
    """The fastest settings that fit `card`, starting from `defaults` (every name of KNOBS) and keeping every setting in
    `user` (the same names) as the user gave it.

    On the CPU (card None) nothing is chosen: the settings are the user's or the defaults.
    """
    user = dict(user or {})
    given = {**defaults, **user}
    # What does not fit VISION_CACHE_GB goes to host memory (feature_store.VisionCache): the cache is used whatever its size.
    cache_ok = job.fast and job.cache_gb is not None and given["vision_cache_gb"] > 0
    job = replace(job, cache_limit_gb=given["vision_cache_gb"])

    def settings(batch, accum, ckpt, cache, captions=given["eval_batch_size"]):
        graphs = given["cuda_graphs"] and cache and not ckpt and precision.name == "bf16" and card is not None
        return Settings(batch, accum, ckpt, cache, graphs, captions)

    if card is None:
        s = settings(given["batch_size"], given["grad_accum"], given["gradient_checkpointing"], cache_ok)
        e = estimate(shape, job, precision, s)
        reason = f"memory: the CPU: {s.describe()}; precision {precision.name}"
        return Plan(s, precision, e, None, True, reason, user, ((s, e),), defaults)

    if "batch_size" in user or "grad_accum" in user:
        splits = [(given["batch_size"], given["grad_accum"])]
    else:
        splits = _splits(given["batch_size"] * given["grad_accum"])
    # Captioning fewer pictures at a time after training costs seconds; a slower training step costs minutes: each
    # training configuration is tried with smaller captioning batches before the next.
    captions = given["eval_batch_size"]
    caption_batches = [captions] if "eval_batch_size" in user else [captions] + [c for c in (16, 8, 4) if c < captions]

    def configurations(cache: bool):
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

    # Configurations with the cache on the GPU up to VISION_CACHE_GB first; when one does not fit, the same with less
    # of it there. Where part of the cache is read from host memory anyway, right after it: streaming more costs about
    # nothing, a smaller step costs time. Where it all fits, only after every configuration with all of it on the GPU.
    with_cache = list(configurations(True)) if cache_ok else []
    spills = cache_ok and job.cache_gb > given["vision_cache_gb"]
    tried = []
    for s, e in with_cache:
        tried.append((s, e))
        if spills and e.need > card.free_gb and e.cache > 0:
            tried.append(less_on_gpu(s, e))
    if not spills:
        tried += [less_on_gpu(s, e) for s, e in with_cache if e.need > card.free_gb and e.cache > 0]
    tried += list(configurations(False))
    chosen = next(((s, e) for s, e in tried if e.need <= card.free_gb), None)
    fits = chosen is not None
    if chosen is None:
        chosen = min(tried, key=lambda se: se[1].need)
    s, e = chosen
    instead = None
    split_or_ckpt = {"batch_size", "grad_accum", "gradient_checkpointing"}
    if not fits and split_or_ckpt & set(user):
        free_choice = plan(
            card, shape, job, precision, defaults, {k: v for k, v in user.items() if k not in split_or_ckpt}
        )
        instead = free_choice.settings if free_choice.fits else None
    p = Plan(s, precision, e, card, fits, "", user, tuple(tried), defaults, instead)
    return replace(p, reason=_reason(p, job))


def _reason(p: Plan, job: Job) -> str:
    s, card, given = p.settings, p.card, {**p.defaults, **p.user}
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
    first_s, first_e = p.tried[0]
    why = f"; {first_s.describe()} needs {first_e.need:.1f}" if first_s != s else ""
    return f"memory: {where}: {what} (needs about {p.estimate.need:.1f} GB with headroom{why})"


# --------------------------------------------------------------------------------------------------- when it fails
def out_of_memory(plan: Plan, output_dir, device: str = "cuda", now: tuple[float, float] | None = None) -> str:
    """One line for an out-of-memory error during training: what happened, which setting to lower, how to resume.

    `now` is (GB free on the card, GB this process holds), read from the GPU when not given.
    """
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
    return f"the GPU ran out of memory while training ({cause}); {lower}rerun with {smaller.flags(plan.defaults.get('eval_batch_size'))}{resume}"


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


# ----------------------------------------------------------------------------------------------------- train.py's fit
@dataclass(frozen=True)
class Fit:
    """train.py's settings with the plan's choices in them, and the plan (what was chosen and why)."""

    settings: object
    plan: Plan


def fit(settings, data, device: str) -> Fit:
    """The memory plan for train.py: on a GPU, the settings the user left alone chosen to fit its free memory, the
    precision to fit the card; one line each. Settings of the user's that cannot fit stop the run here (one line).
    `data` is training_data.Data."""
    from transformers import AutoConfig

    from vlcap import compat, vision_encoding

    fast = compat.available("fast training")  # the vision cache can run with the installed transformers
    card = Card.detect(device) if device.startswith("cuda") else None
    precision = choose_precision(card, settings.precision)
    dataset = data.dataset
    if settings.image_size:
        image_tokens = vision_encoding.image_token_count(data.processor, settings.image_size)
        config = AutoConfig.from_pretrained(data.model_dir)
        cache_bytes = vision_encoding.vision_cache_bytes(
            config, data.processor, len(dataset), settings.image_size, precision.dtype
        )
        cache_gb = cache_bytes / 1e9
    else:  # pictures of their own size: the largest the processor makes, as a bound
        unit = data.processor.image_processor.patch_size * data.processor.image_processor.merge_size
        image_tokens, cache_gb = largest_picture_pixels(data.processor) // unit**2, None
    job = Job.measure(
        dataset,
        image_tokens,
        settings.max_length,
        cache_gb=cache_gb,
        cache_limit_gb=settings.vision_cache_gb,
        fast=fast,
    )
    shape = Shape.of_model(data.model_dir, settings.lora_r, settings.lora_targets)
    chosen = plan(card, shape, job, precision, knob_values(settings), user_settings(settings))
    if card is not None:
        if chosen.hopeless:
            raise cli.UserError(chosen.reason + ".")
        print(chosen.reason if chosen.fits else f"warning: {chosen.reason}; it may run out of memory")
        print(f"precision: {precision.reason}")
    return Fit(chosen.applied(settings), chosen)


def largest_picture_pixels(processor) -> int:
    """The most pixels the image processor resizes a picture to (its max_pixels). transformers 5 keeps the bound in the
    processor's `size` (longest_edge, in pixels for this family), earlier releases as an attribute."""
    image_processor = processor.image_processor
    size = getattr(image_processor, "size", None)
    for bound in (
        getattr(image_processor, "max_pixels", None),
        getattr(size, "max_pixels", None),
        getattr(size, "longest_edge", None),
        size.get("max_pixels") if isinstance(size, dict) else None,
        size.get("longest_edge") if isinstance(size, dict) else None,
    ):
        if bound:
            return int(bound)
    raise cli.UserError("the model's image processor states no largest picture size (max_pixels); pass --image-size N.")
