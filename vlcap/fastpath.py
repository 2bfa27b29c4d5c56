"""The fast training path train.py takes by default: the same training as the plain Trainer path, in seconds.

    encoding = fastpath.start_encoding(dataset, config, workers)       # before the model loads: workers start decoding
    examples, features = fastpath.finish_encoding(model, *encoding)    # the vision tower, once per picture
    trainer = fastpath.CaptionTrainer(..., train_dataset=examples, data_collator=partial(collate_encoded, ...))
    trainer.use_vision_cache(features)
    fastpath.graph_decoder_layers(model, batch_size, pad_to)           # GPU: CUDA graphs of each decoder layer

What it does (bench/RESULTS.md has what each part bought):
1. Encode once. Every training picture is decoded, resized and tokenised once, by parallel DataLoader workers, and the
   frozen vision tower runs once per picture, in batches; what the language model takes from it is kept on the GPU
   (`VISION_CACHE_GB` bounds it, else the plain path runs): the image tokens' features, and for Qwen3-VL also the
   DeepStack features of intermediate vision layers, which the language model adds to the image tokens' hidden states
   after its first layers (passed to it as Qwen3VLModel passes them: `visual_pos_masks`, `deepstack_visual_embeds`).
   The M-RoPE position ids are computed once per example on the CPU, in the workers, by the family's own
   `get_rope_index`. Training steps then run only the language model.
2. Logits only where there are labels: the LM head runs on the caption positions only, not on the image tokens and the
   prompt, and the loss is the same sum / token count transformers computes.
3. CUDA graphs: with every batch padded to one length, each decoder layer's forward and backward are captured once
   (`torch.cuda.make_graphed_callables`) and replayed as one launch each; any other shape runs the eager layer. The
   attention mask, positions, image-token places and the loss's token count are built by the collator, and batches are
   copied without waiting, so no step waits on the GPU.
It leans on transformers internals (the mask builder, get_rope_index, the decoder layer's call): train.py uses it only
where vlcap/compat.py says the installed transformers has them for the model's family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).
None of it changes the mathematics: tests/test_fastpath.py trains each family with and without it and compares the
losses and weights.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from vlcap import vision_attention
from vlcap.qwen import base_model, transformers_class


# ------------------------------------------------------------------------------------------------------- encode once
def image_token_count(processor, image_size: int) -> int:
    """Language-model tokens per picture at a fixed image size, as the processor makes them (patches merged 2x2)."""
    from PIL import Image

    blank = Image.new("RGB", (image_size, image_size))
    grid = processor.image_processor(images=[blank], return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // processor.image_processor.merge_size**2


def feature_levels(config) -> int:
    """Feature tensors the language model takes per image token: the tower's output, plus (Qwen3-VL) one per DeepStack
    layer."""
    return 1 + len(getattr(config.vision_config, "deepstack_visual_indexes", None) or ())


def vision_cache_bytes(config, processor, n_images: int, image_size: int, dtype) -> int:
    tokens = image_token_count(processor, image_size)
    return n_images * feature_levels(config) * tokens * config.text_config.hidden_size * dtype.itemsize


class RopeIndex:
    """transformers' own M-RoPE position code (the family's get_rope_index: Qwen2VLModel's, Qwen2_5_VLModel's,
    Qwen3VLModel's), runnable without the model: in DataLoader workers, which start before the model loads. It reads
    nothing but the config."""

    def __init__(self, config):
        self.config = config
        self.inner = transformers_class(config, "inner")

    def get_rope_index(self, *args, **kwargs):
        return self.inner.get_rope_index(self, *args, **kwargs)

    def get_vision_position_ids(self, *args, **kwargs):
        return self.inner.get_vision_position_ids(self, *args, **kwargs)


class _EncodedBatches:
    """A DataLoader collate_fn, run in the workers: positions and image-token places per example, and the batch's
    pixels as one tensor, so the main process receives one shared-memory tensor per batch and computes nothing."""

    def __init__(self, rope: RopeIndex):
        self.rope = rope

    def __call__(self, batch: list[dict | None]) -> tuple[list[dict], torch.Tensor | None, torch.Tensor | None]:
        batch = [e for e in batch if e is not None]
        if not batch:
            return [], None, None
        examples = []
        for e in batch:
            positions, _ = self.rope.get_rope_index(
                e["input_ids"][None], e["mm_token_type_ids"][None], image_grid_thw=e["image_grid_thw"]
            )
            # NumPy arrays travel inside the pickled batch. Tensors would each travel as a shared-memory file
            # descriptor that stays open while the main process keeps the example: 5,000 pictures exceeded the
            # GPU machine's limit of 20,000 open files.
            examples.append({
                "input_ids": e["input_ids"].numpy(), "labels": e["labels"].numpy(), "position_ids": positions[:, 0].numpy(),
                "image_positions": (e["input_ids"] == self.rope.config.image_token_id).nonzero()[:, 0].numpy(),
            })  # fmt: skip
        pixels = torch.cat([e["pixel_values"] for e in batch])
        return examples, pixels, torch.cat([e["image_grid_thw"] for e in batch])


def start_encoding(dataset, config, workers: int, batch_size: int = 32):
    """Start the DataLoader workers decoding and tokenising pictures; they work ahead while the model loads.

    Batches of 32: the vision tower encodes each as it arrives while the workers still decode the rest.
    """
    collate = _EncodedBatches(RopeIndex(config))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    return iter(loader), len(loader)


@torch.no_grad()
def finish_encoding(model, batches, n_batches: int):
    """Run the vision tower once on every picture the workers encoded.

    Returns (examples, features): examples are dicts of CPU tensors (input_ids, labels, position_ids, image_positions)
    with an `index` into features, a (n_examples, levels, tokens_per_image, hidden) tensor on the model's device: level 0
    the tower's output, levels 1... (Qwen3-VL) the DeepStack features, one per DeepStack layer. Pixels are dropped as
    soon as the tower has seen them, so host memory holds token ids only.
    """
    from tqdm import tqdm

    device, dtype = model.device, model.dtype
    examples, features = [], []
    for batch, pixels, grids in tqdm(batches, total=n_batches, desc="encoding pictures", unit="batch"):
        if not batch:
            continue
        with vision_attention.batched(model, vision_attention.patches_per_image(grids)):
            out = model.model.get_image_features(pixels.to(device, dtype), grids.to(device), return_dict=True)
        levels = [out.pooler_output, *(getattr(out, "deepstack_features", None) or ())]  # each a tuple, one per image
        features += [torch.stack(per_image) for per_image in zip(*levels)]
        for e in batch:
            examples.append({**{k: torch.from_numpy(v) for k, v in e.items()}, "index": len(examples)})
    return examples, torch.stack(features)


@functools.cache
def _causal(length: int) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril()


def collate_encoded(examples: list[dict], pad_token_id: int, pad_to: int) -> dict:
    """Pad to one fixed length (one shape for every batch: CUDA graphs replay it) and keep logits for captions only.

    Everything the step needs is built here, on the CPU, so the step itself never waits for the GPU: the causal
    attention mask with padding (the 4-D boolean mask transformers builds for SDPA, True = may attend; every family's
    language model takes a 4-D mask as it is), the flat
    positions the cached image features go to, the M-RoPE position ids. `logits_to_keep` are the positions whose next
    token is a caption token in some row; `shift_labels` are those next tokens (-100 elsewhere), the key transformers'
    Trainer counts the loss's tokens from; `labels` stays the full labels.
    """
    n = len(examples)
    input_ids = torch.full((n, pad_to), pad_token_id, dtype=torch.long)
    labels = torch.full((n, pad_to), -100, dtype=torch.long)
    attention_mask = torch.zeros((n, pad_to), dtype=torch.bool)
    position_ids = torch.zeros((3, n, pad_to), dtype=torch.long)
    for row, e in enumerate(examples):
        length = len(e["input_ids"])
        input_ids[row, :length], labels[row, :length] = e["input_ids"], e["labels"]
        attention_mask[row, :length] = True
        position_ids[:, row, :length] = e["position_ids"]
    causal = _causal(pad_to)
    first_label = int((labels != -100).int().argmax(1).min())
    keep = torch.arange(first_label - 1, pad_to - 1)
    return {
        "input_ids": input_ids,
        "attention_mask": causal[None, None] & attention_mask[:, None, None, :],
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

    vision_features: torch.Tensor | None = None

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
        features = self.vision_features[inputs.pop("image_index")]  # rows x levels x image tokens x hidden
        embeds = embeds.flatten(0, 1).index_copy(
            0, inputs.pop("image_positions"), features[:, 0].flatten(0, 1).to(embeds.dtype)
        ).view_as(embeds)
        del inputs["labels"], inputs["caption_tokens"]
        labels = inputs.pop("shift_labels")
        deepstack = None
        if features.shape[1] > 1:  # Qwen3-VL: the DeepStack features go to the language model as Qwen3VLModel sends them
            deepstack = base_model(unwrapped).model.language_model.register_forward_pre_hook(
                functools.partial(_with_deepstack, input_ids == unwrapped.config.image_token_id,
                                  [features[:, level].flatten(0, 1) for level in range(1, features.shape[1])]),
                with_kwargs=True,
            )  # fmt: skip
        try:
            outputs = model(inputs_embeds=embeds, **inputs)
        finally:
            if deepstack is not None:
                deepstack.remove()
        loss = torch.nn.functional.cross_entropy(
            outputs.logits.float().flatten(0, 1), labels.flatten().to(outputs.logits.device), ignore_index=-100,
            reduction="sum",
        )  # fmt: skip
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


# ------------------------------------------------------------------------------------------------------- CUDA graphs
class _LayerCall(torch.nn.Module):
    """A decoder layer with positional tensor arguments only, the form make_graphed_callables captures."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, cos, sin, attention_mask):
        return self.layer(hidden_states, attention_mask=attention_mask, position_embeddings=(cos, sin))


def graph_decoder_layers(model, batch_size: int, seq_len: int, accumulate: bool = False) -> None:
    """Capture every decoder layer's forward and backward for (batch_size, seq_len) and route matching calls to them.

    The layers' `forward` is replaced on the instance, so parameter names, saving and peft are untouched; generation,
    evaluation and any other shape run the original forward. `accumulate`: gradients are accumulated over several
    micro-batches (see _fresh_parameter_gradients). Under torchrun each process captures its own, before DDP wraps the
    model: a graphed layer's backward feeds the LoRA weights' AccumulateGrad nodes, where DDP's hooks sit, as eager does.
    """
    from transformers.masking_utils import create_causal_mask

    language_model = base_model(model).model.language_model
    layers = list(language_model.layers)
    device, dtype = language_model.embed_tokens.weight.device, language_model.embed_tokens.weight.dtype
    hidden = torch.randn(batch_size, seq_len, language_model.config.hidden_size, device=device, dtype=dtype)
    positions = torch.arange(seq_len, device=device).expand(3, batch_size, seq_len)
    cos, sin = language_model.rotary_emb(hidden, positions)
    padding = torch.ones(batch_size, seq_len, dtype=torch.long, device=device)
    padding[0, -1] = 0  # a padded batch, the shape of mask every training batch has
    mask = create_causal_mask(config=language_model.config, inputs_embeds=hidden, attention_mask=padding, cache=None,
                              position_ids=None)  # fmt: skip
    # The first layer's input (embeddings and cached image features) needs no gradient; every later one does.
    samples = tuple(
        (hidden.clone().requires_grad_(i > 0), cos.clone(), sin.clone(), mask.clone()) for i in range(len(layers))
    )
    # Captured under bf16 autocast as training runs (without autocast's weight cache, which graphs cannot hold).
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        calls = torch.cuda.make_graphed_callables(tuple(_LayerCall(layer) for layer in layers), samples, num_warmup_iters=1)
    for layer, graphed, sample in zip(layers, calls, samples):
        layer.forward = _routed(layer, graphed, sample, accumulate)


def _routed(layer, graphed, sample, accumulate: bool):
    """The layer's new forward: the graph for calls like the captured one (training, with gradients), else eager."""
    eager_forward, (hidden_s, _, _, mask_s) = layer.forward, sample
    fresh_gradients = functools.partial(_fresh_parameter_gradients, len(sample))

    def forward(hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        if (
            layer.training
            and torch.is_grad_enabled()
            and hidden_states.shape == hidden_s.shape
            and hidden_states.requires_grad == hidden_s.requires_grad
            and isinstance(attention_mask, torch.Tensor)
            and attention_mask.shape == mask_s.shape
            and attention_mask.dtype == mask_s.dtype
        ):
            out = graphed(hidden_states, *position_embeddings, attention_mask)
            if accumulate:
                out.grad_fn.register_hook(fresh_gradients)
            return out
        return eager_forward(hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings, **kwargs)

    return forward


def _fresh_parameter_gradients(args: int, grad_inputs, grad_outputs):
    """A hook on a graphed layer's backward node: its parameters' gradients (after its `args` inputs) as fresh tensors.

    The graph's backward returns its static gradient buffers, which its next replay overwrites, and autograd makes a
    gradient that nothing else holds the parameter's .grad as it is: after the first micro-batch .grad would be the
    buffer, and the next micro-batch's replay would overwrite the sum being accumulated (pytorch/pytorch#181723; the
    tests reproduce it on the CPU). Without accumulation each step's .grad is consumed before the next replay.
    """
    return (*grad_inputs[:args], *(g.clone() if g is not None else None for g in grad_inputs[args:]))
