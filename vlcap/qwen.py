"""The model side: which device, which model folder (local, or downloaded from ModelScope), the model, its processor,
the prompt as the chat template writes it, LoRA, and an adapter loaded for captioning.

    from vlcap import qwen
    device = qwen.resolve_device("auto")
    model_dir = qwen.resolve_model_dir("Qwen/Qwen2-VL-2B-Instruct")  # or a local folder
    model, processor = qwen.load_model(model_dir, device), qwen.load_processor(model_dir)

Never `trust_remote_code`: the Qwen vision-language models are part of transformers, and remote code would run whatever a
downloaded model folder ships.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vlcap.cli import UserError
from vlcap.formats import AdapterSettings

# model_type in a folder's config.json -> transformers' class for it.
ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration"}


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
            raise UserError(f"{path} has no config.json; --model-dir must be a Qwen2-VL model folder.")
        return str(path)
    if model_dir.count("/") != 1 or model_dir.startswith((".", "/", "~")):
        raise UserError(f"model folder {model_dir} does not exist; pass --model-dir a local Qwen2-VL folder.")
    try:
        from modelscope import snapshot_download

        return snapshot_download(model_dir)
    except Exception as e:  # any network or hub failure reads the same to the user
        raise UserError(
            f"could not download {model_dir} from ModelScope ({type(e).__name__}); pass --model-dir a local copy of "
            "the model folder."
        ) from None


def model_class(model_dir: str | Path):
    """transformers' class for the folder's architecture; one line naming those supported for any other."""
    import transformers

    model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"{model_dir} holds a {model_type!r} model; supported: {', '.join(ARCHITECTURES)} (Qwen2-VL family)."
        )
    return getattr(transformers, ARCHITECTURES[model_type])


def load_model(model_dir: str, device: str):
    """The model from a local folder, straight onto the device (no full copy in host memory first)."""
    if device.startswith("cuda"):
        # cuDNN's attention plans anew for every new sequence length, ~1 ms of CPU a call: the vision tower calls it
        # once per image and block, generation once per token and layer. Flash / memory-efficient attention don't.
        torch.backends.cuda.enable_cudnn_sdp(False)
    return model_class(model_dir).from_pretrained(model_dir, dtype=model_dtype(device), device_map=device)


def load_processor(model_dir: str | Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(model_dir))


def base_model(model):
    """The transformers model inside a peft wrapper (its LoRA layers in place), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ------------------------------------------------------------------------------------------------------------ prompt
def prompt_text(processor, prompt: str) -> str:
    """The model's input text up to where the caption starts (the chat template, generation prompt added)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# -------------------------------------------------------------------------------------------------------------- LoRA
def add_lora(model, r: int, alpha: int, dropout: float, targets: str):
    """Wrap the model with LoRA on the language model's projections only; the vision tower stays frozen."""
    from peft import LoraConfig, get_peft_model

    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise UserError("--lora-targets is empty; name at least one projection, e.g. q_proj,v_proj.")
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
        raise UserError(f"--lora-targets {targets!r} matches no language-model projection ({e}).") from None


def load_for_captioning(adapter: str | Path | None, settings: AdapterSettings | None, model_dir: str | None, device: str):
    """(model, processor) to caption with: the base model with the adapter folded in, or the base model alone.

    A folder written by infer.py --merge carries train_settings.json but no adapter_config.json: it loads as a plain model.
    """
    merged = adapter is not None and not (Path(adapter) / "adapter_config.json").is_file()
    base = str(adapter) if merged else (model_dir or (settings.model_dir if settings else None))
    if not base:
        raise UserError("no base model given; pass --model-dir a Qwen2-VL folder (or --adapter DIR).")
    base = resolve_model_dir(base)
    model = load_model(base, device)
    processor = load_processor(adapter or base)  # an adapter's own processor: the one it was trained with
    if adapter and not merged:
        from peft import PeftModel

        # Folded into the base weights: the same function, without LoRA's extra kernels in every generation step.
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.eval(), processor
