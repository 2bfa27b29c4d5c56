"""Training examples: which conversations are usable, the held-out split, and pictures + captions as token ids, labels
and pixels, batched. This is the plain path's data; vlcap/vision_cache.py encodes the same examples once and caches them.

    data = training_data.prepare(settings, is_main=True)   # train.py: Data(model_dir, processor, train/test items, dataset)
    items = training_data.usable_conversations(formats.read_conversations("data_vl.json"))
    train_items, test_items = training_data.hold_out(items, test_size=4)
    dataset = training_data.CaptionDataset(train_items, processor, "COCO Yes:", image_size=280, max_length=8192)
    batch = training_data.collate([dataset[0], dataset[1]], pad_token_id)

Labels cover only the caption and its closing <|im_end|> (the token the model's chat template ends an answer with): the
system prompt, the image tokens, the user prompt and the padding are -100, so the model learns to answer and to stop.
The prompt is the model's own chat template, so each family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) sees its own format. A
caption too long for max_length is cut, never the image tokens.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from vlcap import formats, images
from vlcap.cli import UserError
from vlcap.qwen import answer_end_id, prompt_text


@dataclass(frozen=True)
class Data:
    """train.py's data: the model folder and its processor, the conversations split into training and held-out ones,
    and the training conversations as a dataset at the run's image size."""

    model_dir: str
    processor: object
    image_size: int
    train_items: list
    test_items: list
    dataset: CaptionDataset


def prepare(settings, is_main: bool) -> Data:
    """Read and check the conversations (settings.data_json), hold out the last TEST_SIZE, find the model folder and its
    processor, fix the image size to the model's patches, check the LoRA targets and encode the first example: every
    check that can fail does, before anything is written. Then (process 0) the split files are written."""
    from vlcap import qwen

    source = f"{settings.data_json} (--data-json)"
    items = usable_conversations(formats.read_conversations(settings.data_json), source=source)
    train_items, test_items = hold_out(items, settings.test_size)
    model_dir = qwen.resolve_model_dir(settings.model_dir)
    if Path(model_dir).is_dir():
        model_dir = str(Path(model_dir).resolve())  # recorded with the adapter: infer.py may run from another folder
    processor = qwen.load_processor(model_dir)
    image_size = qwen.resolve_image_size(processor, settings.image_size)  # a multiple of this model's patches
    qwen.check_lora_targets(model_dir, settings.lora_targets)
    dataset = CaptionDataset(train_items, processor, settings.prompt, image_size, settings.max_length)
    dataset.check_first()
    if is_main:  # every check that can fail early has passed: now the split files may change
        for path, part in zip(formats.split_paths(settings.data_json), (train_items, test_items)):
            formats.write_json(path, part)
    return Data(model_dir, processor, image_size, train_items, test_items, dataset)


def usable_conversations(items: list[dict], limit: int | None = None, source: str = "the data JSON") -> list[dict]:
    """Leave out conversations whose picture is missing or not a picture, or whose caption is empty; a warning each.
    With `limit`, stop once that many are kept (the rest are not opened). `source` names the file for the error when
    none is usable."""
    kept = []
    for i, item in enumerate(items):
        if limit is not None and len(kept) == limit:
            break
        path = formats.image_of(item)
        # The header only: cheap for 80,000 pictures; a picture truncated later is skipped when it is decoded.
        reason = "empty caption" if not formats.caption_of(item).strip() else images.problem(path, decode=False)
        if reason:
            print(f"warning: skipped conversation {i + 1} ({item.get('id')}): {path}: {reason}", file=sys.stderr)
        else:
            kept.append(item)
    if not kept:
        raise UserError(f"no conversation in {source} has a readable image and a caption; check that file.")
    return kept


def hold_out(items: list[dict], test_size: int) -> tuple[list[dict], list[dict]]:
    """The conversations split into (train, test): the last test_size are held out."""
    if not 0 <= test_size < len(items):
        raise UserError(f"--test-size {test_size} leaves nothing to train on ({len(items)} conversations).")
    return items[: len(items) - test_size], items[len(items) - test_size :]


def encode_example(processor, image, caption: str, prompt: str, max_length: int, prompts: dict | None = None) -> dict:
    """Token ids, labels and pixels for one picture and its caption.

    `prompts` keeps the prompt's tokens by image grid (they depend on nothing else), so every further picture of a size
    costs the image processor and the caption's tokens only. Raises ValueError when max_length cannot hold the prompt.
    """
    tok = processor.tokenizer
    im_end = answer_end_id(processor)
    pixels = processor.image_processor(images=[image], return_tensors="pt")
    key = (prompt, tuple(pixels["image_grid_thw"][0].tolist()))
    if prompts is None or key not in prompts:
        text = processor(text=[prompt_text(processor, prompt)], images=[image], return_tensors="pt")
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
            image = images.load(formats.image_of(item), self.image_size)
            return encode_example(
                self.processor, image, formats.caption_of(item), self.prompt, self.max_length, self.prompts
            )
        except ValueError as e:  # a file that went bad after the start-up check, or too big: skip it, don't stop
            print(f"warning: skipped {formats.image_of(item)}: {e}", file=sys.stderr)
            return None

    def check_first(self) -> None:
        """Encode the first example now, so settings that cannot fit a picture fail here, not in a DataLoader worker."""
        try:
            image = images.load(formats.image_of(self.items[0]), self.image_size)
            encode_example(self.processor, image, formats.caption_of(self.items[0]), self.prompt, self.max_length)
        except ValueError as e:
            raise UserError(f"{formats.image_of(self.items[0])}: {e}.") from None


def collate(examples: list[dict | None], pad_token_id: int) -> dict:
    """Pad a batch on the right; concatenate the pictures' patches (never stack: pictures may differ in size)."""
    examples = [e for e in examples if e is not None]
    if not examples:
        raise RuntimeError("every image of a batch failed to load; see the warnings above")
    length = max(len(e["input_ids"]) for e in examples)

    def pad(key, value):
        return torch.stack([torch.nn.functional.pad(e[key], (0, length - len(e[key])), value=value) for e in examples])

    return {
        "input_ids": pad("input_ids", pad_token_id),
        "attention_mask": pad("input_ids", -1).ne(-1).long(),
        "labels": pad("labels", -100),
        "mm_token_type_ids": pad("mm_token_type_ids", 0),
        "pixel_values": torch.cat([e["pixel_values"] for e in examples]),
        "image_grid_thw": torch.cat([e["image_grid_thw"] for e in examples]),
    }
