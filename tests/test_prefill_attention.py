"""The block-skipping prefill attention: its kernels under TRITON_INTERPRET=1 (CPU) against float64 and SDPA, and its
pass on Dynamo's graph and through the backend."""

import pytest
import torch
import torch.nn.functional as F

from gemma4_fx.replacements import prefill_attention as ops
from helpers import DEVICES, dynamo_graph

SMALL_TILES = dict(BLOCK_DV=64, BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
CASES = {  # (batch, heads, kv_heads, rows, keys, dim, mask kind): the tiles are SMALL_TILES but for the head dim
    "sliding-gqa": (2, 4, 2, 40, 40, 32, "sliding"),  # a ragged last block, key blocks skipped both sides
    "causal": (1, 4, 1, 33, 33, 48, "causal"),
    "full": (1, 2, 2, 20, 37, 24, None),  # more keys than rows, every key visible
    "cached-prefix": (2, 2, 1, 17, 45, 16, "sliding"),  # rows at the end of the keys, a mask per sequence
    "empty-row": (1, 2, 1, 24, 24, 16, "empty-row"),  # a row that sees no key
    "wide-head": (1, 2, 1, 18, 18, 80, "sliding"),  # the output dims split over programs (BLOCK_DV 64 < 80)
    "2d-mask": (2, 2, 1, 20, 20, 16, "sliding-2d"),  # [M, N]: SDPA broadcasts it over batch and heads
    "one-row-mask": (2, 2, 1, 20, 37, 16, "padding"),  # [B, 1, 1, N]: one row for every query row
    "wide-window": (1, 2, 1, 70, 70, 16, "sliding-wide"),  # key blocks every row sees whole: run unmasked
}


def inputs(batch, heads, kv_heads, rows, keys, dim, kind, dtype, device, seed=0):
    """q [B, H, M, D], k, v [B, Hkv, N, D], the mask (bool [B or 1, 1, M, N] or None) and `causal`: "sliding" is
    transformers' sliding-window mask (window 9) with the rows at the end of the keys, shared by the batch unless
    the batch differs in what it sees ("sliding-2d": one [M, N] mask for all); "empty-row" hides every key from row
    3; "padding" is one row per sequence, its first keys hidden (3 of them, 20 in the second sequence);
    "sliding-wide" has a window of 40."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g).to(dtype).to(device) for shape in
               ((batch, heads, rows, dim), (batch, kv_heads, keys, dim), (batch, kv_heads, keys, dim)))
    i = torch.arange(rows)[:, None] + keys - rows
    j = torch.arange(keys)[None, :]
    mask = None
    if kind == "sliding-2d":
        return q, k, v, ((j <= i) & (j > i - 9)).to(device), False
    if kind == "padding":
        return q, k, v, (j >= torch.tensor([3, 20]).view(2, 1, 1, 1)[:batch]).to(device), False
    if kind in ("sliding", "empty-row", "sliding-wide"):
        window = 40 if kind == "sliding-wide" else 9
        mask = ((j <= i) & (j > i - window)).view(1, 1, rows, keys).repeat(batch, 1, 1, 1)
        if batch > 1:
            mask[1:, :, :, :3] = False  # the later sequences left-padded: a mask per sequence
        else:
            mask = mask[:1]
        if kind == "empty-row":
            mask[:, :, 3] = False
        mask = mask.to(device)
    return q, k, v, mask, kind == "causal"


def check_against_float64(case, dtype, device, tiles=SMALL_TILES):
    batch, heads, kv_heads, rows, keys, dim, kind = CASES[case]
    q, k, v, mask, causal = inputs(batch, heads, kv_heads, rows, keys, dim, kind, dtype, device)
    scale = dim ** -0.5
    poisoned = torch.full_like(q, float("nan"))
    out = ops.prefill_attention_triton(q, k, v, mask, scale, causal, tiles=tiles, out=poisoned)
    assert out is poisoned and not out.isnan().any()  # every element written
    exact = ops.prefill_attention_reference(q.double(), k.double(), v.double(), mask, scale, causal)
    group = heads // kv_heads
    sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          attn_mask=mask, is_causal=causal, scale=scale)
    seen = torch.ones(batch, heads, rows, dtype=torch.bool, device=device)
    if mask is not None:
        seen = seen & mask.any(-1)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out[~seen] == 0).all()  # no visible key: zeros (SDPA leaves such a row undefined)
    # no further from float64 than SDPA's own result, beyond two ulps of the largest output: the fp32 sums run in
    # another order (the interpreter's numpy dot blocks them as its version likes), and the output is rounded
    ours, theirs = ((x.double()[seen] - exact[seen]).abs().max().item() for x in (out, sdpa))
    ulp = 2 * torch.finfo(dtype).eps * exact.abs().max().item()
    assert ours <= theirs + ulp, (ours, theirs, ulp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernels_match_float64(case, dtype, device):
    check_against_float64(case, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["sliding-gqa", "cached-prefix", "empty-row"])
def test_mask_read_in_several_steps(case, device, monkeypatch):
    """The mask's key ranges found over several steps of the scan (32 keys a step, not 256)."""
    monkeypatch.setattr(ops, "_SCAN_KEYS", 32)
    check_against_float64(case, torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["sliding-gqa", "cached-prefix", "empty-row", "one-row-mask"])
def test_query_blocks_of_several_row_groups(case, device):
    """Query blocks of 32 rows over key blocks of 32: each block walks the keys its two groups of 16 rows see."""
    check_against_float64(case, torch.float32, device, tiles={**SMALL_TILES, "BLOCK_M": 32, "BLOCK_N": 32})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim, masked, many_blocks", [(64, True, False), (256, True, False), (256, True, True),
                                                      (512, True, False), (512, True, True), (512, False, False)])
def test_each_default_tiles_compute_the_math(dim, masked, many_blocks, device):
    """Every tile shape `config` picks for Gemma-4's head dims (few and many row blocks per SM), on the cases with
    masked edges, shared blocks and a causal diagonal (the cases' own head dims: the tiles' output dims are wider)."""
    tiles = ops.config(dim, masked, many_blocks)
    for case in ("wide-window", "causal"):
        check_against_float64(case, torch.float32, device, tiles=tiles)


@pytest.mark.parametrize("device", DEVICES)
def test_shared_key_blocks_read_no_mask(device):
    """The key blocks that every row of a query block sees whole, by the ranges, run without reading the mask: a key
    hidden there in the ready mask alone changes nothing (and the float64 checks above, "wide-window", show that
    those blocks compute what the mask says)."""
    batch, heads, kv_heads, rows, keys, dim, kind = CASES["wide-window"]
    q, k, v, mask, _ = inputs(batch, heads, kv_heads, rows, keys, dim, kind, torch.float32, device)
    ready, ranges = ops.prefill_attention_mask_triton(mask)
    out = ops.prefill_attention_triton(q, k, v, ready, 0.25, False, ranges, tiles=SMALL_TILES)
    block = 3  # rows [48, 64), one group of 16: window 40 shares keys [24, 49) among them
    full_first, full_end = ranges[0, block, 2:].tolist()
    key = -(-full_first // 16) * 16  # the first key block inside the shared run
    assert key + 16 <= full_end
    ready[0, 0, block * 16:(block + 1) * 16, key] = False
    again = ops.prefill_attention_triton(q, k, v, ready, 0.25, False, ranges, tiles=SMALL_TILES)
    torch.testing.assert_close(again, out, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["sliding-gqa", "cached-prefix", "empty-row", "2d-mask", "one-row-mask",
                                  "wide-window"])
def test_mask_made_ready(case, device, monkeypatch):
    """`prefill_attention_mask`: the mask in rows padded to 16 bytes and, per 16 query rows, the first key one of
    them sees, one past the last, the first all of them see and the end of that run, as the reference finds them
    (in several steps of the scan); the op on CPU computes the same."""
    monkeypatch.setattr(ops, "_SCAN_KEYS", 32)
    batch, heads, kv_heads, rows, keys, dim, kind = CASES[case]
    mask = inputs(batch, heads, kv_heads, rows, keys, dim, kind, torch.float32, device)[3]
    full = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
    expected = ops.mask_key_ranges_reference(full)
    assert expected.shape == (full.shape[0], -(-full.shape[2] // 16), 4)
    assert (expected[..., 1] > 0).any() and (expected[..., 0] > 0).any()  # key blocks to skip, below and above
    for b, group in ((b, g) for b in range(expected.shape[0]) for g in range(expected.shape[1])):
        first, end, full_first, full_end = expected[b, group].tolist()
        rows_seen = full[b, 0, group * 16:(group + 1) * 16]
        assert rows_seen[:, full_first:full_end].all()  # the shared run: every row sees it
        assert full_end == keys or full_first == keys or not rows_seen[:, full_end].all()  # and it ends there
        assert not rows_seen[:, :full_first].all(0).any()  # no shared key before it
    for ready, ranges in (ops.prefill_attention_mask_triton(mask), ops.prefill_attention_mask(mask.cpu())):
        assert ready.shape == full.shape[:3] + (-(-keys // 16) * 16,) and ready.is_contiguous()
        assert torch.equal(ready[..., :keys].cpu(), full.cpu())
        assert torch.equal(ranges.cpu(), expected.cpu())
    with pytest.raises(ValueError, match="mask must be a bool"):
        ops.prefill_attention_mask(full.float())


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1000, 300])
@pytest.mark.parametrize("layer", [(16, 8, 256, 1024), (16, 2, 512, None), (16, 2, 512, "image"), (8, 2, 256, 512),
                                   (8, 2, 512, None), (8, 2, 512, "image"), (12, 12, 64, "padding")],
                         ids=["26b-sliding", "26b-global", "26b-global-image", "e4b-sliding", "e4b-global",
                              "e4b-global-image", "e4b-vision"])
def test_kernels_at_gemma4_widths(layer, rows):
    """The default tiles at Gemma-4's head dims, 1000 tokens (a ragged last block; tiles for many query blocks) and
    300 (for few), against float64 and SDPA. A window: transformers' sliding mask; None: `is_causal`; "image": the
    global mask of a prompt with an image, causal but for the image's 256 tokens, which see each other (it takes the
    512-dim kernel's shared memory furthest); "padding": the vision encoder's, every row sees the keys but the last
    86."""
    heads, kv_heads, dim, window = layer
    g = torch.Generator().manual_seed(dim)
    q, k, v = (torch.randn(shape, generator=g).to(torch.bfloat16).cuda() for shape in
               ((1, heads, rows, dim), (1, kv_heads, rows, dim), (1, kv_heads, rows, dim)))
    i, j = torch.arange(rows)[:, None], torch.arange(rows)[None, :]
    image = (i >= rows * 3 // 10) & (i < rows * 3 // 10 + 256) & (j >= rows * 3 // 10) & (j < rows * 3 // 10 + 256)
    masks = {None: None, "image": (j <= i) | image, "padding": (j < rows - 86) & (i >= 0)}
    causal = window is None
    mask = masks[window] if window in masks else (j <= i) & (j > i - window)
    mask = None if mask is None else mask.view(1, 1, rows, rows).cuda()
    out = ops.prefill_attention_triton(q, k, v, mask, 1.0, causal)
    exact = ops.prefill_attention_reference(q.double(), k.double(), v.double(), mask, 1.0, causal)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=1.0, enable_gqa=True)
    ours, theirs = ((x.double() - exact).abs().max().item() for x in (out, sdpa))
    assert ours <= theirs + torch.finfo(torch.bfloat16).eps * exact.abs().max().item(), (ours, theirs)


def test_tiles_that_do_not_fit_give_way(monkeypatch):
    """Where the GPU's shared memory is too small for the tiles (Triton raises at launch), smaller ones are tried and
    remembered; if none fits, SDPA computes the call, with a warning. Here the interpreter stands in for a GPU that
    fits key blocks of 16 rows alone."""
    q, k, v, mask, _ = inputs(1, 4, 2, 40, 40, 32, "sliding", torch.float32, "cpu")
    launch, tried = ops._launch, []
    monkeypatch.setattr(ops, "_FITTING", {})

    def fits_16(*args):
        tried.append(args[7])
        if args[7]["BLOCK_N"] > 16:
            raise ops.OutOfResources(245760, 232448, "shared memory")
        return launch(*args)

    monkeypatch.setattr(ops, "_launch", fits_16)
    out = ops.prefill_attention_triton(q, k, v, mask, 0.25)
    first = ops.config(32, masked=True)
    assert tried == [first, {**first, "BLOCK_N": 32}, {**first, "BLOCK_N": 16}]  # first: 64 key rows
    ready, ranges = ops.prefill_attention_mask_triton(mask)
    torch.testing.assert_close(out, launch(q, k, v, ready, ranges, 0.25, False, tried[-1], None), rtol=0, atol=0)
    tried.clear()
    ops.prefill_attention_triton(q, k, v, mask, 0.25)
    assert tried == [{**first, "BLOCK_N": 16}]  # remembered: no second failure

    def fits_none(*args):
        raise ops.OutOfResources(245760, 232448, "shared memory")

    monkeypatch.setattr(ops, "_launch", fits_none)
    monkeypatch.setattr(ops, "_FITTING", {})
    with pytest.warns(UserWarning, match="no tiles fit"):
        out = ops.prefill_attention_triton(q, k, v, mask, 0.25)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_op_checks_its_inputs():
    q, k, v, mask, _ = inputs(1, 4, 2, 8, 8, 16, "sliding", torch.float32, "cpu")
    with pytest.raises(ValueError, match="mask must be None or a bool"):
        ops.prefill_attention(q, k, v, mask.float(), 1.0)
    with pytest.raises(ValueError, match="multiple of k's 3"):
        ops.prefill_attention(q, k.repeat(1, 3, 1, 1)[:, :3], v.repeat(1, 3, 1, 1)[:, :3], None, 1.0)
    with pytest.raises(ValueError, match="head dim must be at most 512"):
        ops.prefill_attention(*(t.repeat(1, 1, 1, 33) for t in (q, k, v)), None, 1.0)
    ready, ranges = ops.prefill_attention_mask(mask)
    with pytest.raises(ValueError, match="a ready mask: keys padded to 16"):
        ops.prefill_attention(q, k, v, mask, 1.0, False, ranges)  # the mask as it came, not the ready one
    with pytest.raises(ValueError, match=r"mask_ranges must be the int32 \[1, 1, 4\]"):
        ops.prefill_attention(q, k, v, ready, 1.0, False, ranges.long())
    with pytest.raises(ValueError, match="mask_ranges given without a mask"):
        ops.prefill_attention(q, k, v, None, 1.0, False, ranges)


class Attention(torch.nn.Module):
    """SDPA as transformers calls it in a prefill: the cache repeated to the query heads, a bool mask (an input;
    "causal-made": made in the graph from key and query positions, as transformers does; "padding-made": made in
    the graph from per-key data alone, as the vision encoder's from its patch positions); or `is_causal` with GQA,
    as its global layers call it with no mask; or a float mask (not taken)."""

    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, q, k, v, mask):
        if self.how == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) * 2
        group = q.shape[1] // k.shape[1]
        k, v = (t[:, :, None].expand(t.shape[0], t.shape[1], group, *t.shape[2:]).reshape(
            t.shape[0], t.shape[1] * group, *t.shape[2:]) for t in (k, v))
        if self.how == "float":
            mask = torch.zeros(mask.shape).masked_fill(~mask, -1e9)
        elif self.how == "causal-made":
            rows, keys = q.shape[2], k.shape[2]
            mask = torch.arange(keys)[None, :] <= torch.arange(rows)[:, None] + keys - rows
        elif self.how == "padding-made":  # a padding mask from the keys alone: every key visible here
            mask = k[:, :1, None, :, 0] > -100.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5) * 2


@pytest.mark.parametrize("how, dim, reason", [("bool", 16, None), ("causal", 16, None), ("causal-made", 16, None),
                                              ("padding-made", 16, None),
                                              ("padding-made", 24, "no key/query ordering"),
                                              ("float", 16, "mask must be None or a bool")])
def test_pass_rewrites_what_it_takes_and_says_why_not(how, dim, reason):
    """Each candidate is rewritten (the repeat of the cache looked through) or left alone with its reason; the
    outputs stay SDPA's. One query row is decode_attention's, not a candidate. A padding mask is taken at a head
    dim that is a power of two, left to SDPA at another."""
    from gemma4_fx.passes import prefill_attention
    from gemma4_fx.report import Report

    q, k, v, mask, _ = inputs(1, 4, 2, 20, 20, dim, "sliding", torch.float32, "cpu")
    module = Attention(how)
    for rows in (20, 1):
        report = Report((prefill_attention.NAME,))
        gm = prefill_attention.apply(dynamo_graph(module, q[:, :, :rows], k, v, mask[:, :, :rows])[0], report=report)
        named = {"L_q_": q[:, :, :rows], "L_k_": k, "L_v_": v, "L_mask_": mask[:, :, :rows]}
        got = gm(*(named[p.target] for p in gm.graph.find_nodes(op="placeholder")))[0]
        torch.testing.assert_close(got, module(q[:, :, :rows], k, v, mask[:, :, :rows]), rtol=1e-5, atol=1e-6)
        fused = [n for n in gm.graph.nodes if n.target is torch.ops.gemma4_fx.prefill_attention.default]
        if rows == 1:
            assert not fused and not report.skipped, report
        elif reason is None:
            assert report.counts[prefill_attention.NAME] == 1 and len(fused) == 1, report
            assert all(arg.op == "placeholder" for arg in fused[0].args[1:3]), gm.code  # the cache read as is
        else:
            assert not fused and reason in report.skipped[0].reason, report


@pytest.mark.parametrize("rows", [20, 1], ids=["prefill", "decode"])
def test_attention_a_backward_needs_is_left_to_sdpa(rows):
    """With grad on and q, k, v requiring grad, a backward may follow and our kernels have none: each attention pass
    leaves its candidates to SDPA with that reason, and the compile gives eager's outputs and gradients."""
    import gemma4_fx

    q, k, v, mask, _ = inputs(1, 4, 2, 20, 20, 16, "sliding", torch.float32, "cpu")
    q, k, v, mask = q[:, :, :rows].clone(), k, v, mask[:, :, :rows]
    module, backend = Attention("bool"), gemma4_fx.Gemma4Backend(patterns=["prefill_attention", "decode_attention"])
    grads = []
    for forward in (module, torch.compile(module, backend=backend)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = forward(*leaves, mask)
        out.square().sum().backward()
        grads.append((out.detach(), *(t.grad for t in leaves)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    name = "prefill_attention" if rows > 1 else "decode_attention"
    assert not backend.report.matches and not backend.report.fallbacks, backend.report
    assert [(skip.pattern, skip.reason) for skip in backend.report.skipped] == [
        (name, "a backward may follow (an input requires grad): the kernels have none")], backend.report


def test_a_mask_is_made_ready_once():
    """Three attentions over one mask and one over another: two `prefill_attention_mask` calls, each before the first
    attention over its mask, which every attention over it reads; the outputs stay SDPA's."""
    from gemma4_fx.passes import prefill_attention

    def layers(q, k, v, mask, other):
        for layer_mask in (mask, other, mask, mask):
            q = F.scaled_dot_product_attention(q, k, v, attn_mask=layer_mask, enable_gqa=True) + q
        return q

    q, k, v, mask, _ = inputs(1, 4, 2, 20, 20, 16, "sliding", torch.float32, "cpu")
    other = torch.ones_like(mask).tril()
    gm, example = dynamo_graph(layers, q, k, v, mask, other)
    gm = prefill_attention.apply(gm)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    made = [n for n in nodes if n.target is torch.ops.gemma4_fx.prefill_attention_mask.default]
    attentions = [n for n in nodes if n.target is torch.ops.gemma4_fx.prefill_attention.default]
    assert len(made) == 2 and len(attentions) == 4, gm.code
    for attention, index in zip(attentions, (0, 1, 0, 0)):
        ready, ranges = attention.args[3], attention.args[6]
        assert ready.args == (made[index], 0) and ranges.args == (made[index], 1), gm.code
        assert nodes.index(made[index]) < nodes.index(attention)
    assert all("example_value" in n.meta for n in made)
    torch.testing.assert_close(gm(*example)[0], layers(q, k, v, mask, other), rtol=0, atol=0)


def test_sdpa_left_alone_gets_its_bool_mask_made_additive_once():
    """SDPA calls the pass leaves alone (a padding mask at head dim 24, as 26B-A4B's vision encoder's at 72) share one
    additive mask per mask and query dtype, made before the first of them, where SDPA made it at every call; the
    outputs are SDPA's, bit for bit, rows with no visible key (the second sequence's) included."""
    from gemma4_fx.passes import prefill_attention
    from gemma4_fx.replacements.prefill_attention import sdpa_additive_mask

    def layers(q, k, v):
        mask = k[:, :1, None, :, 0] > 0.0  # per key only: left to SDPA
        for _ in range(3):
            q = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True) + q
        half = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask,
                                              enable_gqa=True)
        return q, half

    q, k, v, _, _ = inputs(2, 4, 2, 20, 20, 24, "sliding", torch.float32, "cpu")
    k[1, :, :, 0] = -1.0  # the second sequence sees no key
    gm, example = dynamo_graph(layers, q, k, v)
    gm = prefill_attention.apply(gm)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    made = [n for n in nodes if n.target is sdpa_additive_mask]
    attentions = [n for n in nodes if n.target is F.scaled_dot_product_attention]
    assert [n.args[1] for n in made] == [torch.float32, torch.bfloat16] and len(attentions) == 4, gm.code
    for attention, index in zip(attentions, (0, 0, 0, 1)):
        assert attention.kwargs["attn_mask"] is made[index], gm.code
        assert nodes.index(made[index]) < nodes.index(attention)
    assert all("example_value" in n.meta for n in made)
    for got, expected in zip(gm(*example), layers(q, k, v)):
        assert torch.equal(got, expected)
    assert not layers(q, k, v)[1][1].any()  # SDPA's zeros where no key is visible, kept


@pytest.mark.parametrize("made", ["ours", "sdpa"])
def test_a_mask_written_between_attentions_is_made_ready_per_attention(made):
    """A mask written in place between two attentions over it (here, the first keys hidden after the first one) is
    not made ready once: the second attention would read it as it was. Each attention then makes its own (ours: the
    op itself, SDPA: at the call), and the outputs stay SDPA's."""
    from gemma4_fx.passes import prefill_attention
    from gemma4_fx.replacements.prefill_attention import sdpa_additive_mask

    def layers(q, k, v, mask):
        if made == "sdpa":
            mask = k[:, :1, None, :, 0] > -100.0  # per key only: left to SDPA
        first = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        mask[..., :3] = False
        return first, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    q, k, v, mask, _ = inputs(1, 4, 2, 20, 20, 24, "sliding", torch.float32, "cpu")  # 24: the padding mask left
    gm = prefill_attention.apply(dynamo_graph(layers, q, k, v, mask.clone())[0])
    targets = {node.target for node in gm.graph.nodes}
    assert torch.ops.gemma4_fx.prefill_attention_mask.default not in targets and sdpa_additive_mask not in targets
    assert (torch.ops.gemma4_fx.prefill_attention.default in targets) == (made == "ours"), gm.code
    named = {"L_q_": q, "L_k_": k, "L_v_": v, "L_mask_": mask.clone()}  # tracing ran the write on its mask
    got = gm(*(named[p.target] for p in gm.graph.find_nodes(op="placeholder")))
    for got, expected in zip(got, layers(q, k, v, mask.clone())):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny-26b-a4b", "tiny-e4b"])
def test_prefill_through_the_backend(preset):
    """A prefill through the backend: every attention of the prompt rewritten (sliding layers' masks, global layers'
    is_causal), the logits and the cache eager's (fp32)."""
    from transformers import DynamicCache

    import gemma4_fx

    model = gemma4_fx.build_model(preset)
    ids = torch.randint(3, 400, (2, 30), generator=torch.Generator().manual_seed(1))
    backend = gemma4_fx.Gemma4Backend(patterns=["prefill_attention"], cudagraphs=None)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        got_cache, expected_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
        got = compiled(ids, **gemma4_fx.presets.cache_kwargs(model, got_cache), use_cache=True).logits
        expected = model(ids, **gemma4_fx.presets.cache_kwargs(model, expected_cache), use_cache=True).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    shared = model.config.num_kv_shared_layers
    assert backend.report.counts["prefill_attention"] == model.config.num_hidden_layers, backend.report
    for layer in range(model.config.num_hidden_layers - shared):
        torch.testing.assert_close(got_cache.layers[layer].keys, expected_cache.layers[layer].keys)
