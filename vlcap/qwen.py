"""The model side: which device, which model folder (local, or downloaded from ModelScope), the model, its processor,
the picture size its patches allow, the prompt as the chat template writes it, LoRA, and an adapter loaded for captioning.

    from vlcap import qwen
    device = qwen.resolve_device("auto")
    model_dir = qwen.resolve_model_dir("Qwen/Qwen2.5-VL-3B-Instruct")  # or a local folder
    model, processor = qwen.load_model(model_dir, device), qwen.load_processor(model_dir)
    image_size = qwen.resolve_image_size(processor, None)            # 280 (Qwen2-VL, Qwen2.5-VL) or 288 (Qwen3-VL)

Three families, each transformers' own classes, picked by the folder's config.json (ARCHITECTURES): Qwen2-VL, Qwen2.5-VL
and Qwen3-VL. What differs between them is read from the folder: the patch size (the processor), the chat template and
special tokens (the processor), the module names LoRA can target (the model). Never `trust_remote_code`: the Qwen
vision-language models are part of transformers, and remote code would run whatever a downloaded model folder ships.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from vlcap.cli import UserError
from vlcap.formats import AdapterSettings

# transformers' own internals trip its v6 deprecation notices (is_gradient_checkpointing ...): nothing a user can act on.
warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6", category=FutureWarning)


@dataclass(frozen=True)
class Architecture:
    """A family's classes in transformers (module transformers.models.MODEL_TYPE.modeling_MODEL_TYPE). The fast paths
    (vlcap/compat.py checks them) reach into the inner ones."""

    name: str  # the family, as users know it
    model: str  # the whole model: vision tower + language model + LM head
    inner: str  # model.model: get_rope_index, get_image_features
    text_model: str  # model.model.language_model
    decoder_layer: str  # model.model.language_model.layers[i]
    vision_attention: str  # model.model.visual.blocks[i].attn


# model_type in a folder's config.json -> the family's classes.
ARCHITECTURES = {
    "qwen2_vl": Architecture(
        "Qwen2-VL",
        "Qwen2VLForConditionalGeneration",
        "Qwen2VLModel",
        "Qwen2VLTextModel",
        "Qwen2VLDecoderLayer",
        "VisionAttention",
    ),
    "qwen2_5_vl": Architecture(
        "Qwen2.5-VL",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLModel",
        "Qwen2_5_VLTextModel",
        "Qwen2_5_VLDecoderLayer",
        "Qwen2_5_VLVisionAttention",
    ),
    "qwen3_vl": Architecture(
        "Qwen3-VL",
        "Qwen3VLForConditionalGeneration",
        "Qwen3VLModel",
        "Qwen3VLTextModel",
        "Qwen3VLTextDecoderLayer",
        "Qwen3VLVisionAttention",
    ),
}


# ------------------------------------------------------------------------------------------------------------ device
def resolve_device(device: str) -> str:
    if device not in ("auto", "cuda", "cpu"):
        raise UserError(f"--device must be auto, cuda or cpu, not {device!r}.")
    if device == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise UserError(
            "no CUDA GPU is visible; pass --device cpu to run on the CPU anyway (fine for the tiny test model and the "
            "smoke run, far too slow for Qwen2-VL-2B)."
        )
    if "LOCAL_RANK" in os.environ:  # under torchrun each process has a GPU of its own
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return "cuda"


def model_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


# ------------------------------------------------------------------------------------------------------------- model
def resolve_model_dir(model_dir: str) -> str:
    """A local model folder as it is; otherwise a ModelScope id, downloaded (once; ModelScope caches it)."""
    path = Path(model_dir).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json; --model-dir must be a Qwen-VL model folder ({_supported()}).")
        return str(path)
    if model_dir.count("/") != 1 or model_dir.startswith((".", "/", "~")):
        raise UserError(f"model folder {model_dir} does not exist; pass --model-dir a local Qwen-VL model folder.")
    try:
        from modelscope import snapshot_download

        return snapshot_download(model_dir)
    except Exception as e:  # any network or hub failure reads the same to the user
        raise UserError(
            f"could not download {model_dir} from ModelScope ({type(e).__name__}); pass --model-dir a local copy of "
            "the model folder."
        ) from None


def _supported() -> str:
    return ", ".join(f"{key} ({arch.name})" for key, arch in ARCHITECTURES.items())


def model_type(source) -> str | None:
    """The model_type of a model folder, a config, or a model (peft-wrapped or not)."""
    if isinstance(source, (str, Path)):
        return json.loads((Path(source) / "config.json").read_text()).get("model_type")
    config = getattr(base_model(source), "config", source)
    return getattr(config, "model_type", None)


def architecture(source) -> Architecture:
    """The family of a model folder, config or model; one line naming those supported for any other."""
    kind = model_type(source)
    if kind not in ARCHITECTURES:
        where = f"{source} holds" if isinstance(source, (str, Path)) else "this is"
        raise UserError(f"{where} a {kind!r} model; supported: {_supported()}.")
    return ARCHITECTURES[kind]


def transformers_class(source, part: str = "model"):
    """transformers' class for `part` (a field of Architecture) of the family of `source`."""
    import importlib

    kind, arch = model_type(source), architecture(source)
    return getattr(importlib.import_module(f"transformers.models.{kind}.modeling_{kind}"), getattr(arch, part))


def model_class(model_dir: str | Path):
    """transformers' class for the folder's architecture; one line naming those supported for any other."""
    return transformers_class(model_dir)


def load_model(model_dir: str, device: str, dtype: torch.dtype | None = None):
    """The model from a local folder, straight onto the device (no full copy in host memory first), in `dtype`
    (default: bf16 on the GPU, fp32 on the CPU; vlcap/memory.py chooses it for the card)."""
    if device.startswith("cuda"):
        # cuDNN's attention plans anew for every new sequence length, ~1 ms of CPU a call: the vision tower calls it
        # once per image and block, generation once per token and layer. Flash / memory-efficient attention don't.
        torch.backends.cuda.enable_cudnn_sdp(False)
    return model_class(model_dir).from_pretrained(model_dir, dtype=dtype or model_dtype(device), device_map=device)


def load_processor(model_dir: str | Path):
    """The folder's processor (tokenizer, chat template, image processor); a model folder of a family not supported
    is one line, before anything loads."""
    from transformers import AutoProcessor

    if (Path(model_dir) / "config.json").is_file():
        architecture(model_dir)
    return AutoProcessor.from_pretrained(str(model_dir))


# -------------------------------------------------------------------------------------------------------- image size
def image_unit(processor) -> int:
    """Pixels per language-model token side: the patch size times the merge (Qwen2-VL, Qwen2.5-VL 14 x 2 = 28; Qwen3-VL
    16 x 2 = 32). A picture's side must be a multiple of it, or the processor resizes it to one."""
    return processor.image_processor.patch_size * processor.image_processor.merge_size


def resolve_image_size(processor, image_size: int | None) -> int:
    """The picture side to train and caption at: `image_size` checked against the model's patches, or by default the
    multiple nearest the tutorial's 280 (280 for Qwen2-VL and Qwen2.5-VL, 288 for Qwen3-VL). 0: each picture's own."""
    from vlcap.images import DEFAULT_SIZE

    unit = image_unit(processor)
    default = max(1, round(DEFAULT_SIZE / unit)) * unit
    if image_size is None:
        return default
    if image_size < 0 or image_size % unit:
        patch, merge = processor.image_processor.patch_size, processor.image_processor.merge_size
        raise UserError(
            f"image size {image_size} is not a multiple of {unit} (this model's {patch}-pixel patches merge "
            f"{merge}x{merge}); use e.g. {default - unit} or {default}, or 0 for each image's own size."
        )
    return image_size


def base_model(model):
    """The transformers model inside a peft wrapper (its LoRA layers in place), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """What the families' RMSNorm module `norm` gives for x (normalised in fp32, cast back to x's dtype, times the
    weight), by torch's rms_norm: on a GPU one fused kernel forward and one backward where the module's own code runs
    six and about ten. The same arithmetic but for the order of the sum of squares: equal to rounding."""
    return norm.weight * torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=rms_norm_eps(norm)).to(x.dtype)


def rms_norm_eps(norm) -> float:
    """The epsilon of a family's RMSNorm module (Qwen2's call it variance_epsilon, Qwen3-VL's eps)."""
    return getattr(norm, "variance_epsilon", None) or norm.eps


def is_rms_norm(module) -> bool:
    """One of the families' RMSNorm modules, whose forward `rms_norm` computes (a weight, `variance_epsilon`), with
    its class's forward."""
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and isinstance(getattr(module, "variance_epsilon", None), float)
        and "forward" not in vars(module)
    )


@contextlib.contextmanager
def forwards_replaced(replacements: dict):
    """Inside, each module (a key) runs the function given for it instead of its class's forward; on leaving, its
    class's forward again. How vlcap's fast paths put their versions of transformers' and peft's modules in place."""
    try:
        for module, forward in replacements.items():
            module.forward = forward
        yield
    finally:
        for module in replacements:
            vars(module).pop("forward", None)


# ------------------------------------------------------------------------------------------------------------ prompt
def prompt_text(processor, prompt: str) -> str:
    """The model's input text up to where the caption starts (the chat template, generation prompt added)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


_answer_ends: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # processor -> answer_end_id, worked out once


def answer_end_id(processor) -> int:
    """The token the chat template closes an assistant message with (<|im_end|> in every Qwen-VL family): what a caption
    ends with in training, so that the model learns to stop."""
    if processor not in _answer_ends:
        mark = "CAPTION"
        messages = [
            {"role": "user", "content": [{"type": "text", "text": "x"}]},
            {"role": "assistant", "content": [{"type": "text", "text": mark}]},
        ]
        after = processor.apply_chat_template(messages, tokenize=False).split(mark, 1)[1]
        _answer_ends[processor] = processor.tokenizer(after, add_special_tokens=False)["input_ids"][0]
    return _answer_ends[processor]


# -------------------------------------------------------------------------------------------------------------- LoRA
# The language model's projections, whatever the vision tower's names are (Qwen2.5-VL's vision MLP has gate_proj too).
_PROJECTION = re.compile(r"(.*\.)?language_model\.layers\.\d+\.(self_attn|mlp)\.(\w+)")


def lora_target_names(source) -> list[str]:
    """The names LoRA can target: the language model's linear projections, e.g. q_proj ... down_proj. `source` is a
    model, or a model folder (its architecture is built on the meta device: no weights, no memory)."""
    if isinstance(source, (str, Path)):
        from transformers import AutoConfig

        with torch.device("meta"):
            source = model_class(source)(AutoConfig.from_pretrained(str(source)))
    found = {}  # in the model's order: q_proj, k_proj, ... down_proj
    for name, module in source.named_modules():
        match = _PROJECTION.fullmatch(name)
        if match and isinstance(module, torch.nn.Linear):
            found[match.group(3)] = True
    return list(found)


def check_lora_targets(source, targets: str) -> list[str]:
    """The names in `targets` (comma-separated), each one a projection of the language model; else one line naming
    those that exist."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise UserError("--lora-targets is empty; name at least one projection, e.g. q_proj,v_proj.")
    existing = lora_target_names(source)
    unknown = [n for n in names if n not in existing]
    if unknown:
        raise UserError(
            f"--lora-targets {', '.join(unknown)}: no language-model layer has such a projection; this model's are "
            f"{','.join(existing)}."
        )
    return names


def add_lora(model, r: int, alpha: int, dropout: float, targets: str):
    """Wrap the model with LoRA on the language model's projections only; the vision tower stays frozen."""
    from peft import LoraConfig, get_peft_model

    names = check_lora_targets(model, targets)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        # A regex, so that only model.language_model.layers.N.* matches, whatever the vision tower's names are.
        target_modules=_PROJECTION.pattern.replace(r"(\w+)", f"({'|'.join(map(re.escape, names))})"),
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise UserError(f"--lora-targets {targets!r} matches no language-model projection ({e}).") from None


def load_for_captioning(
    adapter: str | Path | None,
    settings: AdapterSettings | None,
    model_dir: str | None,
    device: str,
    dtype: torch.dtype | None = None,
):
    """(model, processor) to caption with: the base model with the adapter folded in, or the base model alone.

    A folder written by infer.py --merge carries train_settings.json but no adapter_config.json: it loads as a plain model.
    """
    merged = adapter is not None and not (Path(adapter) / "adapter_config.json").is_file()
    base = str(adapter) if merged else (model_dir or (settings.model_dir if settings else None))
    if not base:
        raise UserError("no base model given; pass --model-dir a Qwen-VL model folder (or --adapter DIR).")
    base = resolve_model_dir(base)
    model = load_model(base, device, dtype)
    processor = load_processor(adapter or base)  # an adapter's own processor: the one it was trained with
    if adapter and not merged:
        from peft import PeftModel

        # Folded into the base weights: the same function, without LoRA's extra kernels in every generation step.
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.eval(), processor
