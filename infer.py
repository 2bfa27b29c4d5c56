"""Caption images with Qwen2-VL and the LoRA adapter train.py saved.

    python infer.py                                    # the held-out pictures of the latest adapter under output/
    python infer.py --adapter output/Qwen2-VL-2B/adapter photo.jpg holiday_photos/
    python infer.py --json data_vl_test.json --output captions.jsonl
    python infer.py --merge merged-model               # base + adapter in one folder that loads with from_pretrained

Captions are printed and written one JSON object per line (`image`, `caption`) to --output. The prompt and image size are
the ones the adapter was trained with (read from its train_settings.json), so inference sees exactly what training saw.
Images are captioned in batches with left padding; greedy decoding gives the same captions as one image at a time.
A bad image path is reported and skipped; the rest are still captioned, and the exit status is 1.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
from pathlib import Path

import cli

ADAPTER: str | None = None  # adapter folder train.py saved (default: the newest under output/)
NO_ADAPTER: bool = False  # caption with the base model alone, e.g. to compare against the fine-tuned one
MODEL_DIR: str | None = None  # base model folder or ModelScope id (default: the one the adapter was trained from)
JSON: str | None = None  # data_vl-style JSON whose pictures to caption (default: the adapter's held-out split)
OUTPUT: str = "captions.jsonl"  # captions written here, one JSON object per image
BATCH_SIZE: int = 32  # images per generate call
MAX_NEW_TOKENS: int = 64  # longest caption, in tokens
PROMPT: str | None = None  # user prompt (default: the adapter's; "COCO Yes:" without an adapter)
IMAGE_SIZE: int | None = None  # side images are resized to, multiple of 28, 0 = native (default: the adapter's; 280)
DEVICE: str = "auto"  # auto (the GPU; error without one), cuda, or cpu
MERGE: str | None = None  # write base + adapter merged into this folder instead of captioning
SCORE: bool = False  # score the captions against the JSON's reference captions (BLEU-1..4, ROUGE-L, CIDEr)
FAST_DECODE: bool = True  # greedy search by fastdecode.py (static cache, a CUDA graph per token); off: transformers' generate

# Where train.py's adapters are looked for when --adapter is not given, and the file beside each adapter holding every
# setting of its training run.
OUTPUT_ROOT, SETTINGS_FILE = "output", "train_settings.json"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEFAULT_PROMPT, DEFAULT_IMAGE_SIZE = "COCO Yes:", 280
_VISION_RE = re.compile(r"<\|vision_start\|>(.*?)<\|vision_end\|>")


# ---------------------------------------------------------------------------------------------------------------- images
def as_rgb(image):
    """RGB pixels, upright; transparency is laid over white, the background a viewer would show."""
    from PIL import Image, ImageOps

    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of a picture that is upright already
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, "white")
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def load_image(path: str | Path, image_size: int):
    """Open any picture as RGB, resized to image_size x image_size (0 keeps its size). Raises ValueError saying why not."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = as_rgb(im)
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a readable image ({e})") from None
    if image_size:
        im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return im


def check_image_size(image_size: int) -> None:
    if image_size < 0 or image_size % 28:
        raise cli.UserError(
            f"image size {image_size} is not a multiple of 28 (Qwen2-VL's 14-pixel patches merge 2x2); use e.g. 280, "
            "or 0 for each image's own size."
        )


# --------------------------------------------------------------------------------------------------------------- prompts
def chat_messages(prompt: str) -> list[dict]:
    """The one-turn conversation every caption is asked with: a picture, then the prompt."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def prompt_text(processor, prompt: str) -> str:
    """The model's input text up to where the caption starts (Qwen2-VL chat template, generation prompt added)."""
    return processor.apply_chat_template(chat_messages(prompt), tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------------------------- models
def resolve_device(device: str) -> str:
    import torch

    if device not in ("auto", "cuda", "cpu"):
        raise cli.UserError(f"--device must be auto, cuda or cpu, not {device!r}.")
    if device == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise cli.UserError(
            "no CUDA GPU is visible; pass --device cpu to run on the CPU anyway (fine for the tiny test model and the "
            "smoke run, far too slow for Qwen2-VL-2B)."
        )
    if "LOCAL_RANK" in os.environ:  # under torchrun each process has a GPU of its own
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return "cuda"


def model_dtype(device: str):
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def resolve_model_dir(model_dir: str) -> str:
    """A local model folder as it is; otherwise a ModelScope id, downloaded (once; ModelScope caches it)."""
    path = Path(model_dir).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise cli.UserError(f"{path} has no config.json; --model-dir must be a Qwen2-VL model folder.")
        return str(path)
    if model_dir.count("/") != 1 or model_dir.startswith((".", "/", "~")):
        raise cli.UserError(f"model folder {model_dir} does not exist; pass --model-dir a local Qwen2-VL folder.")
    try:
        from modelscope import snapshot_download

        return snapshot_download(model_dir)
    except Exception as e:  # any network or hub failure reads the same to the user
        raise cli.UserError(
            f"could not download {model_dir} from ModelScope ({type(e).__name__}); pass --model-dir a local copy of "
            "the model folder."
        ) from None


def load_model(model_dir: str, device: str):
    """Qwen2-VL from a local folder. Never remote code: Qwen2-VL is part of transformers."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    if device.startswith("cuda"):
        # cuDNN's attention plans anew for every new sequence length, ~1 ms of CPU a call: the vision tower calls it
        # once per image and block, generation once per token and layer. Flash / memory-efficient attention don't.
        torch.backends.cuda.enable_cudnn_sdp(False)

    # Straight onto the device (one device, not "auto" layer splitting): no full copy in host memory first.
    return Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=model_dtype(device), device_map=device)


def load_processor(model_dir: str | Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(model_dir))


def base_model(model):
    """The transformers model inside a peft wrapper (its LoRA layers in place), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def patches_per_image(image_grid_thw: torch.Tensor) -> int | None:
    """Patches of each picture when every picture of a batch has the same grid (a CPU tensor: no GPU wait), else None."""
    if len(image_grid_thw) and bool((image_grid_thw == image_grid_thw[0]).all()):
        return int(image_grid_thw[0].prod())
    return None


@contextlib.contextmanager
def batched_vision_attention(model, patches: int | None):
    """Inside the block, the vision tower attends within each picture by one attention call for all the pictures, which
    must all have `patches` patches (None: leave the tower as it is). Training's encoding pass and captioning use it.

    transformers' SDPA path cuts the patches into pictures and calls attention once per picture and block: for 64
    pictures 2,048 calls and 32 device round-trips, during which the GPU waits on Python. Pictures of one size are just a
    batch: the same attention, one call per block.
    """
    if not patches:
        yield
        return
    attentions = [block.attn for block in base_model(model).model.visual.blocks]
    for attention in attentions:
        attention.forward = functools.partial(_vision_attention, attention, patches)
    try:
        yield
    finally:
        for attention in attentions:
            del attention.forward  # the class's forward again


def _vision_attention(attention, patches: int, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    """transformers' VisionAttention.forward for pictures of `patches` patches each, batched (see above)."""
    import torch
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    length, heads = hidden_states.shape[0], attention.num_heads
    q, k, v = attention.qkv(hidden_states).reshape(length, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
    q, k, v = (t.reshape(length // patches, patches, heads, -1).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attention.scaling)
    return attention.proj(out.transpose(1, 2).reshape(length, -1))


def latest_adapter(root: str | Path = OUTPUT_ROOT) -> Path:
    """The newest adapter folder train.py saved under root."""
    found = sorted(Path(root).glob(f"**/{SETTINGS_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise cli.UserError(f"no adapter found under {root}/; run train.py first or pass --adapter DIR.")
    return found[-1].parent


def read_train_settings(adapter: str | Path) -> dict:
    path = Path(adapter) / SETTINGS_FILE
    if not path.is_file():
        raise cli.UserError(f"{adapter} is not an adapter folder saved by train.py (no {SETTINGS_FILE}).")
    return json.loads(path.read_text())


def load_captioner(adapter: str | Path | None, model_dir: str | None, device: str, settings: dict | None = None):
    """Base model (+ adapter) and processor, with the training run's settings (empty dict without an adapter; pass
    `settings` when they were read already).

    A folder written by --merge carries train_settings.json but no adapter_config.json: it is loaded as a plain model.
    """
    if settings is None:
        settings = read_train_settings(adapter) if adapter else {}
    merged = adapter is not None and not (Path(adapter) / "adapter_config.json").is_file()
    base = str(adapter) if merged else (model_dir or settings.get("model_dir"))
    if not base:
        raise cli.UserError("no base model given; pass --model-dir a Qwen2-VL folder (or --adapter DIR).")
    model_dir = resolve_model_dir(base)
    model = load_model(model_dir, device)
    processor = load_processor(adapter or model_dir)  # an adapter's own processor: the one it was trained with
    if adapter and not merged:
        from peft import PeftModel

        # Folded into the base weights: the same function, without LoRA's extra kernels in every generation step.
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    return model, processor, settings


# ------------------------------------------------------------------------------------------------------------ captioning
def caption_images(
    model, processor, images: list, prompt: str, batch_size: int = 32, max_new_tokens: int = 64, fast: bool = True
) -> list[str]:
    """Greedy captions for PIL images, batch_size at a time, left-padded so every row ends where its caption starts.

    fast: fastdecode.py's static-cache loop (one CUDA graph per token on the GPU); else transformers' generate. Both
    are the same greedy search; a model whose generation settings the fast loop lacks always uses generate.
    """
    import torch

    import fastdecode

    text = prompt_text(processor, prompt)
    device = next(model.parameters()).device
    fast = fast and not fastdecode.unsupported_settings(model.generation_config)
    captions = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        inputs = processor(text=[text] * len(batch), images=batch, padding=True, padding_side="left", return_tensors="pt")
        # Pictures of one size: the vision tower attends within all of them in one call per block (fastpath.py).
        with torch.inference_mode(), batched_vision_attention(model, patches_per_image(inputs["image_grid_thw"])):
            if fast:
                new_tokens = fastdecode.greedy_tokens(model, inputs, max_new_tokens)  # takes the CPU tensors
            else:
                inputs = inputs.to(device)
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                new_tokens = out[:, inputs["input_ids"].shape[1] :]
        captions += [c.strip() for c in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    return captions


def read_conversations(path: str | Path) -> list[dict]:
    """A data_vl JSON, checked: a list of {"id", "conversations": [user with image, assistant caption]}."""
    path = Path(path)
    if not path.is_file():
        raise cli.UserError(f"{path} does not exist; run csv2json.py first (or pass the right --data-json / --json).")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise cli.UserError(f"{path} is not valid JSON ({e}); regenerate it with csv2json.py.") from None
    if not isinstance(items, list) or not items:
        raise cli.UserError(f"{path} holds no conversations; regenerate it with csv2json.py.")
    for i, item in enumerate(items):
        try:
            user, assistant = item["conversations"][0]["value"], item["conversations"][1]["value"]
            assert isinstance(user, str) and isinstance(assistant, str) and _VISION_RE.search(user)
        except (KeyError, IndexError, TypeError, AssertionError):
            raise cli.UserError(
                f"{path}: item {i + 1} is not a user turn with <|vision_start|>IMAGE<|vision_end|> followed by an "
                "assistant caption; regenerate the file with csv2json.py."
            ) from None
    return items


def image_of(item: dict) -> str:
    return _VISION_RE.search(item["conversations"][0]["value"]).group(1)


def caption_of(item: dict) -> str:
    return item["conversations"][1]["value"]


def references_of(item: dict) -> list[str]:
    return item.get("references") or [caption_of(item)]


def expand_paths(args: list[str]) -> list[str]:
    """Command-line images and folders (their pictures, sorted) as one list of paths."""
    paths = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            paths += sorted(str(f) for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            paths.append(arg)
    return paths


def caption_paths(model, processor, paths, prompt, image_size, batch_size, max_new_tokens, on_caption=None, fast=True):
    """Caption image files; unreadable ones are reported on stderr and skipped. Returns ({path: caption}, failures)."""
    from tqdm import tqdm

    results, failed = {}, []
    with tqdm(total=len(paths), desc="captioning", unit="img", disable=len(paths) <= batch_size) as bar:
        for start in range(0, len(paths), batch_size):
            chunk, images = [], []
            for path in paths[start : start + batch_size]:
                try:
                    images.append(load_image(path, image_size))
                    chunk.append(path)
                except ValueError as e:
                    print(f"warning: skipped {path}: {e}", file=sys.stderr)
                    failed.append(path)
            for path, caption in zip(chunk, caption_images(model, processor, images, prompt, batch_size, max_new_tokens, fast)):
                results[path] = caption
                if on_caption:
                    on_caption(path, caption)
            bar.update(len(paths[start : start + batch_size]))
    return results, failed


# ------------------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = cli.parse_settings(
        globals(), argv, lambda p: p.add_argument("images", nargs="*", help="image files or folders to caption")
    )
    cli.require_at_least(args, {"batch_size": 1, "max_new_tokens": 1})
    device = resolve_device(args.device)
    if args.no_adapter and args.adapter:
        raise cli.UserError("--no-adapter and --adapter contradict each other; pass one of them.")
    adapter = None if args.no_adapter else Path(args.adapter or latest_adapter())
    if args.merge and adapter is None:
        raise cli.UserError("--merge needs an adapter to merge; pass --adapter DIR.")
    settings = read_train_settings(adapter) if adapter else {}
    prompt = args.prompt or settings.get("prompt", DEFAULT_PROMPT)
    image_size = args.image_size if args.image_size is not None else settings.get("image_size", DEFAULT_IMAGE_SIZE)
    check_image_size(image_size)

    references = {}
    if args.images:
        paths = expand_paths(args.images)
    else:
        split = args.json or settings.get("test_json")
        if not split:
            raise cli.UserError("nothing to caption; pass image paths or folders, or --json SPLIT.json.")
        items = read_conversations(split)
        paths = [image_of(it) for it in items]
        references = {image_of(it): references_of(it) for it in items}
    if args.score and not references:
        raise cli.UserError("--score needs reference captions; pass --json SPLIT.json instead of image paths.")
    if not paths and not args.merge:
        raise cli.UserError("no images found in the given paths.")

    model, processor, _ = load_captioner(adapter, args.model_dir, device, settings)
    if args.merge:
        return merge_adapter(model, processor, adapter, settings, args.merge)

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:

        def write(path, caption):
            print(f"{path}\t{caption}")
            record = {"image": path, "caption": caption}
            if path in references:
                record["references"] = references[path]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()  # a long run interrupted keeps every caption made so far

        captions, failed = caption_paths(
            model, processor, paths, prompt, image_size, args.batch_size, args.max_new_tokens, write, args.fast_decode
        )
    summary = f"captioned {len(captions)} of {len(paths)} images -> {out}"
    if args.score and captions:
        from caption_metrics import score_captions

        scores = score_captions(captions, {p: references[p] for p in captions})
        summary += "  " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items())
        Path(out.with_suffix(".scores.json")).write_text(json.dumps(scores, indent=2))
    print(summary + (f"; {len(failed)} failed (see warnings above)" if failed else ""))
    return 1 if failed else 0


def merge_adapter(model, processor, adapter: Path, settings: dict, out: str) -> int:
    """Save the model load_captioner merged (base + LoRA) as one folder that loads without peft."""
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / SETTINGS_FILE).write_text(json.dumps({**settings, "merged_from": str(adapter)}, indent=2))
    print(f"merged {adapter} into its base model -> {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli.run(main)
