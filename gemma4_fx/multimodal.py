"""Multimodal Gemma-4 (`Gemma4ForConditionalGeneration`): the Dynamo setting its compile needs, and random prompts.

`image_inputs` lays out images as transformers' image processor does (which needs torchvision or PIL), so tests and
benchmarks make them without either; `audio_inputs` runs clips through transformers' own feature extractor (numpy).
"""

from __future__ import annotations

import contextlib
import unittest.mock

import torch

MAX_SOFT_TOKENS = 70  # the image processor's smallest budget of soft tokens per image
DEFAULT_SOFT_TOKENS = 280  # its default budget
# Audio clips padded to a multiple of this many 16 kHz samples (2 s; the feature extractor's and processor's
# `pad_to_multiple_of`) size the audio encoder by their bucket alone, so its CUDA graphs are captured once per bucket
# (15 up to the extractor's 30 s) rather than per clip length. The padding is masked: the soft tokens and logits are
# those of the clip unpadded (tests/test_multimodal.py).
AUDIO_BUCKET_SAMPLES = 2 * 16000


@contextlib.contextmanager
def capture_data_dependent_ops():
    """A context in which Dynamo traces ops whose output size or value depends on tensor data (boolean masks,
    `nonzero`, `.tolist()`, `.item()`) into the graph, with unbacked sizes, instead of breaking the graph there.

    Multimodal Gemma-4 needs it around the calls of its compiled model (the first call traces): its encoders' soft
    tokens are selected by masks and split by `.tolist()`, and a break anywhere under `Gemma4Model.forward` leaves
    the language model's last hidden states as a graph output and the selection of the kept rows (`logits_to_keep`)
    in a graph of its own, where YOCO cannot move it. (torch.compile drops a backend's own context,
    `backend_ctx_ctor`, so the caller enters this one.)

    Inside it, where Dynamo cannot yet defer formatting a data-dependent size into a string (torch < 2.13), traced
    code gets a placeholder for it ("<u1>") instead of a graph break: `Gemma4Model.forward` formats the image
    features' count, an unbacked size, into the message of a check that compiled code drops."""
    with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True), \
            _format_unbacked_sizes():
        yield


def _format_unbacked_sizes():
    """Dynamo formats a size into an f-string through `LazySymNodeFormatString`, which reads the size's value; for an
    unbacked size torch 2.13 falls back to formatting it after the graph, older versions break the graph."""
    if torch.torch_version.TorchVersion(torch.__version__) >= (2, 13):
        return contextlib.nullcontext()
    from torch._dynamo.exc import UserError
    from torch._dynamo.variables.lazy import LazySymNodeFormatString
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    read = LazySymNodeFormatString.__repr__

    def placeholder_if_unbacked(self):
        try:
            return read(self)
        except (UserError, GuardOnDataDependentSymNode):
            return f"<{self.sym_node_var.sym_num}>"

    return unittest.mock.patch.object(LazySymNodeFormatString, "__repr__", placeholder_if_unbacked)


def image_inputs(vision_config, sizes, *, max_soft_tokens: int = MAX_SOFT_TOKENS, generator=None, device="cpu",
                 dtype=torch.float32):
    """(pixel_values, image_position_ids, soft tokens per image) of random images of `sizes` ((height, width), each
    a multiple of patch_size x pooling_kernel_size), laid out as the image processor lays them out: each image's
    patches in row-major order, each patch `patch x patch x channels`, padded to `max_soft_tokens x pooling^2` patches
    at position (-1, -1)."""
    patch, pool = vision_config.patch_size, vision_config.pooling_kernel_size
    max_patches = max_soft_tokens * pool ** 2
    pixels, positions, soft_tokens = [], [], []
    for height, width in sizes:
        rows, cols = height // patch, width // patch
        if height % (patch * pool) or width % (patch * pool) or not 0 < rows * cols <= max_patches:
            raise ValueError(f"sizes: expected multiples of {patch * pool} with at most {max_patches} patches, got "
                             f"{height}x{width}")
        image = torch.rand(3, height, width, generator=generator)
        patches = image.reshape(3, rows, patch, cols, patch).permute(1, 3, 2, 4, 0).reshape(rows * cols, -1)
        xy = torch.stack(torch.meshgrid(torch.arange(cols), torch.arange(rows), indexing="xy"), -1).reshape(-1, 2)
        pixels.append(torch.cat([patches, patches.new_zeros(max_patches - len(patches), patches.shape[1])]))
        positions.append(torch.cat([xy, xy.new_full((max_patches - len(xy), 2), -1)]))
        soft_tokens.append(rows * cols // pool ** 2)
    return torch.stack(pixels).to(device, dtype), torch.stack(positions).to(device), soft_tokens


def audio_inputs(model, seconds, *, bucket: int | None = AUDIO_BUCKET_SAMPLES, seed: int = 0, device="cpu",
                 dtype=torch.float32):
    """(input_features, input_features_mask, soft tokens per clip) of random 16 kHz clips `seconds` long, through
    transformers' `Gemma4AudioFeatureExtractor`, padded to a multiple of `bucket` samples (None: the extractor's own
    padding). The soft tokens are counted by `model`'s audio encoder's mask, as the processor counts them."""
    import numpy as np
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    generator = np.random.default_rng(seed)
    clips = [(0.1 * generator.standard_normal(int(16000 * s))).astype(np.float32) for s in seconds]
    features = Gemma4AudioFeatureExtractor()(clips, sampling_rate=16000, return_tensors="pt",
                                             pad_to_multiple_of=bucket)
    features, mask = features["input_features"], features["input_features_mask"]
    tower = model.model.audio_tower
    weight = next(tower.parameters())
    with torch.no_grad():
        kept = tower(features.to(weight.device, weight.dtype), mask.to(weight.device)).attention_mask
    return features.to(device, dtype), mask.to(device), kept.sum(-1).tolist()


def prompt(config, text_tokens: int, image_tokens=(), audio_tokens=(), *, generator=None) -> torch.Tensor:
    """A [1, length] prompt for a `Gemma4Config`: `text_tokens` random words, then each image's and audio clip's
    placeholders (counts of soft tokens) between their begin and end tokens, each followed by two words, then
    `text_tokens` words. Words are drawn below the lowest special id."""
    lowest = min(config.boi_token_id, config.boa_token_id, config.image_token_id, config.audio_token_id)

    def words(n):
        return torch.randint(3, lowest, (n,), generator=generator).tolist()

    ids = words(text_tokens)
    for count in image_tokens:
        ids += [config.boi_token_id] + [config.image_token_id] * count + [config.eoi_token_id] + words(2)
    for count in audio_tokens:
        ids += [config.boa_token_id] + [config.audio_token_id] * count + [config.eoa_token_index] + words(2)
    return torch.tensor([ids + words(text_tokens)])
