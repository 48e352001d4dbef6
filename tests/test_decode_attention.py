"""The split-KV decode attention kernels under TRITON_INTERPRET=1 (CPU) against a float64 reference and SDPA."""

import pytest
import torch
import torch.nn.functional as F

from gemma4_fx.replacements import decode_attention as ops
from helpers import DEVICES, decode_steps, dynamo_graph


def inputs(batch, heads, kv_heads, keys, dim, dtype, visible=None, seed=0, device="cpu"):
    """q [B, H, 1, D], a cache k, v [B, Hkv, S, D] and a bool mask [B, 1, 1, S]: each sequence sees its first
    `visible[b]` keys (default: all)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g).to(dtype).to(device) for shape in
               ((batch, heads, 1, dim), (batch, kv_heads, keys, dim), (batch, kv_heads, keys, dim)))
    visible = visible or [keys] * batch
    mask = (torch.arange(keys)[None, :] < torch.tensor(visible)[:, None]).view(batch, 1, 1, keys)
    return q, k, v, mask.to(device)


CASES = {  # (batch, heads, kv_heads, keys, dim, visible, block_s, splits): None for the launcher's defaults
    "one-split": (1, 2, 1, 16, 16, None, 16, 1),
    "gqa-splits": (2, 8, 2, 70, 32, [70, 33], 16, 3),  # a ragged last block, a split with no visible key
    "mha": (1, 4, 4, 40, 64, [17], 16, 2),
    "one-key": (1, 2, 1, 24, 16, [1], 16, 2),
    "odd-dim": (2, 6, 2, 30, 24, [30, 9], 16, 2),  # the tiny presets' head dims
}
GEMMA4_CASES = {  # E2B's and E4B's layers at decode: sliding (head dim 256, a 512-key window) and global (512)
    "e2b-sliding": (8, 8, 1, 512, 256, None, None, None),
    "e2b-global": (1, 8, 1, 1024, 512, [1000], None, None),
    "e4b-global": (8, 8, 2, 4096, 512, None, None, None),
}


def check_against_float64(batch, heads, kv_heads, keys, dim, visible, block_s, splits, dtype, device, masked=True):
    """`masked=False`: no mask at all (every key visible, as `visible=None` makes the mask say), and q laid out as
    transformers makes it ([B, 1, H, D] transposed: not contiguous)."""
    q, k, v, mask = inputs(batch, heads, kv_heads, keys, dim, dtype, visible, device=device)
    if not masked:
        q, mask = q.transpose(1, 2).contiguous().transpose(1, 2), None
    scale = dim ** -0.5
    poisoned = torch.full_like(q, float("nan"))
    out = ops.decode_attention_triton(q, k, v, mask, scale, block_s=block_s, split_count=splits, out=poisoned)
    assert out is poisoned and not out.isnan().any()  # every element written
    exact = ops.decode_attention_reference(q.double(), k.double(), v.double(), mask, scale)
    sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(heads // kv_heads, 1),
                                          v.repeat_interleave(heads // kv_heads, 1), attn_mask=mask, scale=scale)
    # no further from float64 than SDPA's own result, beyond two ulps of the largest output: the fp32 sums run in
    # another order (the interpreter's numpy dot blocks them as its version likes), and the output is rounded
    ours, theirs = ((x.double() - exact).abs().max().item() for x in (out, sdpa))
    ulp = 2 * torch.finfo(dtype).eps * exact.abs().max().item()
    assert out.dtype == dtype and out.shape == q.shape
    assert ours <= theirs + ulp, (ours, theirs, ulp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernels_match_float64(case, dtype, device):
    check_against_float64(*CASES[case], dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["one-split", "gqa-splits", "odd-dim"])
def test_kernels_without_a_mask(case, device):
    batch, heads, kv_heads, keys, dim, _, block_s, splits = CASES[case]
    check_against_float64(batch, heads, kv_heads, keys, dim, None, block_s, splits, torch.float32, device,
                          masked=False)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GEMMA4_CASES)
def test_kernels_at_gemma4_widths(case):
    check_against_float64(*GEMMA4_CASES[case], torch.bfloat16, "cuda")


def test_op_takes_a_shared_mask_and_checks_its_inputs():
    q, k, v, mask = inputs(2, 4, 2, 20, 16, torch.float32)
    shared = mask[:1]
    assert torch.equal(torch.ops.gemma4_fx.decode_attention(q, k, v, shared, 0.25),
                       ops.decode_attention_reference(q, k, v, shared, 0.25))
    with pytest.raises(ValueError, match="v's shape"):
        ops.check_inputs(q, k, v[..., :8, :], mask)
    with pytest.raises(ValueError, match="mask must be None or a bool"):
        ops.check_inputs(q, k, v, mask.float())
    with pytest.raises(ValueError, match="multiple of k's"):
        ops.check_inputs(q[:, :3], k, v, mask)


def build(name):
    """A tiny Gemma-4 preset, or a tiny Llama (GQA, no Gemma in it: one-row attention is the same math there)."""
    import transformers

    import gemma4_fx

    if name != "llama":
        return gemma4_fx.build_model(name)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=128, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("name", ["tiny-e2b", "tiny-e4b", "llama"])
def test_decode_step_through_the_backend(name):
    """Decode steps over HF's static cache at batch 2, then 3 and 5 (Dynamo makes the batch symbolic there): every
    attention of both graphs rewritten (GQA's repeat of the cache looked through), the logits of eager's steps."""
    from transformers import StaticCache

    import gemma4_fx
    from gemma4_fx.presets import cache_kwargs

    model = build(name)

    def step(forward, batch):
        ids = torch.randint(3, 100, (batch, 12), generator=torch.Generator().manual_seed(batch))
        cache = StaticCache(config=model.config, max_cache_len=40)
        with torch.no_grad():
            model(ids, **cache_kwargs(model, cache), use_cache=True)
            return forward(ids[:, -1:], **cache_kwargs(model, cache), use_cache=True,
                           position_ids=torch.full((batch, 1), 12), cache_position=torch.tensor([12])).logits

    backend = gemma4_fx.Gemma4Backend(cudagraphs=None)
    compiled = torch.compile(model, backend=backend)
    for batch in (2, 3, 5):
        got, expected = step(compiled, batch), step(model, batch)
        assert (got - expected).abs().max().item() <= 2e-5 * expected.abs().max().item(), batch
    layers = model.config.num_hidden_layers
    assert len(backend.report.graphs) == 2  # batch 2, then one graph with a symbolic batch for 3 and 5
    assert backend.report.counts["decode_attention"] == 2 * layers, backend.report


def test_decode_steps_over_a_dynamic_cache():
    """HF's DynamicCache: the cache grows a key per step (Dynamo makes its length symbolic at the second) and
    transformers passes no mask to the full-attention layers; every attention of both graphs rewritten, eager's
    logits at each step."""
    from transformers import DynamicCache

    import gemma4_fx
    from gemma4_fx.presets import cache_kwargs

    model = gemma4_fx.build_model("tiny-e4b")
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    backend = gemma4_fx.Gemma4Backend(cudagraphs=None)
    compiled = torch.compile(model, backend=backend)
    caches = [DynamicCache(config=model.config) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(ids, **cache_kwargs(model, cache), use_cache=True)
        token = ids[:, -1:]
        for position in range(12, 15):
            kwargs = dict(use_cache=True, position_ids=torch.full((2, 1), position),
                          cache_position=torch.tensor([position]))
            expected = model(token, **cache_kwargs(model, caches[0]), **kwargs).logits
            got = compiled(token, **cache_kwargs(model, caches[1]), **kwargs).logits
            assert (got - expected).abs().max().item() <= 2e-5 * expected.abs().max().item(), position
            token = expected.argmax(-1)
    assert len(backend.report.graphs) == 2, backend.report
    assert backend.report.counts["decode_attention"] == 2 * model.config.num_hidden_layers, backend.report


class OneRowAttention(torch.nn.Module):
    """SDPA of one query row over a [B, Hkv, S, D] cache repeated to the query heads `how`: "repeat_kv" as HF
    writes it, "tile" (kv heads repeated as a block: not what the kernels read, so not looked through), "none"."""

    def __init__(self, how="repeat_kv", mask="bool", is_causal=False):
        super().__init__()
        self.how, self.mask, self.is_causal = how, mask, is_causal

    def forward(self, q, k, v, mask):
        group = q.shape[1] // k.shape[1]
        if self.how == "repeat_kv":
            k, v = (t[:, :, None].expand(t.shape[0], t.shape[1], group, *t.shape[2:]).reshape(
                t.shape[0], t.shape[1] * group, *t.shape[2:]) for t in (k, v))
        elif self.how == "tile":
            k, v = (t.repeat(1, group, 1, 1) for t in (k, v))
        if self.mask != "bool":
            mask = torch.zeros(mask.shape).masked_fill(~mask, -1e9) if self.mask == "float" else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.is_causal) * 2


@pytest.mark.parametrize("how, mask, is_causal, reason", [
    ("repeat_kv", "bool", False, None),
    ("tile", "bool", False, None),
    ("none", "bool", False, None),
    ("repeat_kv", "float", False, "mask must be None or a bool"),
    ("repeat_kv", "none", False, None),  # every key visible
    ("repeat_kv", "none", True, "dropout or is_causal"),
])
def test_pass_rewrites_what_it_takes_and_says_why_not(how, mask, is_causal, reason):
    """Each candidate is rewritten (reading the cache itself where HF's repeat_kv made the heads, nothing else
    looked through) or left alone with its reason; the outputs stay SDPA's."""
    from gemma4_fx.passes import decode_attention
    from gemma4_fx.report import Report

    q, k, v, visible = inputs(2, 4, 2 if how != "none" else 4, 20, 16, torch.float32, [20, 7])
    module = OneRowAttention(how, mask, is_causal)
    report = Report((decode_attention.NAME,))
    gm = decode_attention.apply(dynamo_graph(module, q, k, v, visible)[0], report=report)
    named = {"L_q_": q, "L_k_": k, "L_v_": v, "L_mask_": visible}  # Dynamo's inputs, in the order it used them
    got = gm(*(named[p.target] for p in gm.graph.find_nodes(op="placeholder")))[0]
    torch.testing.assert_close(got, module(q, k, v, visible), rtol=1e-5, atol=1e-6)
    fused = [n for n in gm.graph.nodes if n.target is torch.ops.gemma4_fx.decode_attention.default]
    if reason is None:
        assert report.counts[decode_attention.NAME] == 1 and len(fused) == 1, report
        cache_read_as_is = all(arg.op == "placeholder" for arg in fused[0].args[1:3])
        assert cache_read_as_is == (how != "tile"), gm.code
        assert not any(n.op == "call_method" and n.target == "expand" for n in gm.graph.nodes)  # the repeat erased
    else:
        assert not fused and reason in report.skipped[0].reason, report


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8])
def test_e2b_decode_steps_at_real_widths(batch):
    """E2B at real widths (6 layers, bf16) over HF's static cache, decode steps replayed from the backend's CUDA
    graphs: every attention rewritten and eager's greedy token at each step."""
    import gemma4_fx

    model = gemma4_fx.build_model("e2b", dtype=torch.bfloat16, device="cuda", num_hidden_layers=6)
    ids = torch.randint(3, 1000, (batch, 300), device="cuda", generator=torch.Generator("cuda").manual_seed(batch))
    backend = gemma4_fx.Gemma4Backend()  # "auto": decode steps in one CUDA graph
    forwards = [model, torch.compile(model, backend=backend)]
    for position, (expected, got), _ in decode_steps(model, forwards, ids, range(300, 306), 320):
        assert torch.equal(got.argmax(-1), expected.argmax(-1)), position
    assert backend.report.counts["decode_attention"] == 6 * len(backend.report.graphs), backend.report
    stats = backend.cudagraph_stats
    assert stats.replays > 0 and not stats.failures and not backend.report.fallbacks
