"""Gemma-4 with images through the backend: a prefill compiled as one graph, then generation from the image prompt
with `gemma4_fx.generate` and with HF generate. Random weights at tiny widths; runs on CPU in about a minute.

    python examples/multimodal.py
"""

import torch

import gemma4_fx
from gemma4_fx.multimodal import image_inputs, prompt

device = "cuda" if torch.cuda.is_available() else "cpu"
model = gemma4_fx.build_model("tiny-e2b", multimodal=True, device=device)

# Two images of different sizes, laid out as the image processor lays them out, between a few words of text. With
# real weights, `transformers.AutoProcessor` makes these (and `input_features` for audio).
pixel_values, image_position_ids, soft_tokens = image_inputs(model.config.vision_config, [(48, 72), (36, 24)],
                                                             device=device)
input_ids = prompt(model.config, 6, soft_tokens).to(device)
images = dict(pixel_values=pixel_values, image_position_ids=image_position_ids)

# 1. A prefill through the backend. Inside `capture_data_dependent_ops` the encoders' data-dependent ops stay in
# the graph, so the prefill is one graph and YOCO cuts the KV-shared layers to the kept row.
backend = gemma4_fx.Gemma4Backend()
with torch.no_grad(), gemma4_fx.capture_data_dependent_ops():
    logits = torch.compile(model, backend=backend)(input_ids, **images, logits_to_keep=1, use_cache=False).logits
print("prefill:", len(backend.graph_reports), "graph(s),", backend.report.counts)

# 2. Our decode loop: the prefill takes the images, each decode step is one compiled call.
tokens = gemma4_fx.generate(model, input_ids, **images, max_new_tokens=8)
print("gemma4_fx.generate:", tokens[0, input_ids.shape[1]:].tolist())

# 3. HF generate, uncompiled, for reference: greedy tokens are the same.
expected = model.generate(input_ids, **images, max_new_tokens=8, do_sample=False, cache_implementation="static")
print("HF generate:       ", expected[0, input_ids.shape[1]:].tolist(), "same" if torch.equal(tokens, expected)
      else "DIFFERENT")
