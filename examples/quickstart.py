"""The three ways in (the backend, the Inductor pass, HF generate), then YOCO. Runs on CPU in about a minute.

    python examples/quickstart.py
"""

import torch
from transformers import CompileConfig

import gemma4_fx

device = "cuda" if torch.cuda.is_available() else "cpu"
model = gemma4_fx.build_model("tiny-26b-a4b", dtype=torch.bfloat16, device=device)
input_ids = torch.randint(0, model.config.vocab_size, (1, 12), device=device)

# 1. The backend: Inductor with the gemma4_fx rewrites.
with torch.no_grad():
    logits = torch.compile(model, backend=gemma4_fx.gemma4_backend)(input_ids, use_cache=False).logits
print(gemma4_fx.gemma4_backend.report)

# 2. The passes alone, for an engine that runs Inductor itself.
torch._dynamo.reset()
passes = gemma4_fx.Gemma4Passes()
with torch.no_grad(), torch._inductor.config.patch(post_grad_custom_post_pass=passes):
    torch.compile(model)(input_ids, use_cache=False)
print("\nInductor pass alone:", passes.report.counts)

# 3. HF generate with a static cache, compiled by the backend (prefill and decode graphs).
backend = gemma4_fx.Gemma4Backend()
compile_config = CompileConfig(backend=backend)
compile_config._compile_all_devices = device == "cpu"  # HF compiles on GPUs only unless told otherwise
tokens = model.generate(input_ids, max_new_tokens=8, do_sample=False, cache_implementation="static",
                        compile_config=compile_config)
print("\ngenerate:", tokens[0, input_ids.shape[1]:].tolist(), backend.report.counts)

# 4. YOCO: a KV-sharing (E2B-shaped) model's prefill that keeps the last token's logits only. Its shared layers
# run on that token alone (transformers >= 5.2x slices some of it itself: the report then says "already sliced").
torch._dynamo.reset()
e2b = gemma4_fx.build_model("tiny-e2b", dtype=torch.bfloat16, device=device)
backend = gemma4_fx.Gemma4Backend()
with torch.no_grad():
    torch.compile(e2b, backend=backend)(input_ids % e2b.config.vocab_size, logits_to_keep=1, use_cache=False)
print("\nYOCO prefill:", backend.report.counts, [skip.reason for skip in backend.report.skipped])
