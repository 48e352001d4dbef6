"""The benchmarks' process pool: a model rebuilt in another process over the sender's tensors computes the same
logits, jobs keep their order and their failures, and timed turns never overlap; the attention benchmarks' smoke
runs."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torch

import gemma4_fx
from benchmarks.common import kernel_family, rebuild, run_jobs, shareable, timeline_lines


def test_rebuilt_model_shares_the_tensors_and_computes_the_same():
    model = gemma4_fx.build_model("tiny-e2b", seed=3)
    rebuilt = rebuild(shareable(model))
    assert rebuilt.model.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight) == (
        model.lm_head.weight is model.model.embed_tokens.weight)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, rtol=0, atol=0)


def timed_turn(job, turn):
    if job == "fail":
        raise ValueError("boom")
    weight = rebuild(job).lm_head.weight  # arrived over the process boundary
    with turn() as alone:
        begin = time.monotonic()
        time.sleep(0.3)
        return float(weight.sum()), begin, time.monotonic(), alone


def test_jobs_keep_order_and_failures_and_take_turns():
    model = gemma4_fx.build_model("tiny-e2b", seed=1)
    shared = shareable(model)
    results = run_jobs(timed_turn, [shared, "fail", shared], deadline_s=240)
    assert results[1].startswith("failed: ValueError: boom")
    (total_a, begin_a, end_a, alone_a), (total_b, begin_b, end_b, alone_b) = results[0], results[2]
    assert total_a == total_b == float(model.lm_head.weight.detach().sum())
    assert alone_a and alone_b  # every job arrived (the failed one too) before the deadline
    assert end_a <= begin_b or end_b <= begin_a  # one at a time


def test_kernel_families_of_names_the_h200_profiles_show():
    """Memory-efficient attention is a CUTLASS kernel: counted as attention, not as a GEMM."""
    names = {
        "fmha_cutlassF_bf16_aligned_32x128_gmem_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bf": "attention",
        "cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16_knob_35_16x128x256_1x4x1_cga1x1x1_k": "attention",
        "nvjet_sm90_tst_64x8_64x16_4x1_v_bz_splitK_TNT": "gemm (cuBLAS/CUTLASS)",
        "_skinny_kernel": "gemma4_fx kernels",
        "_mask_key_ranges": "attention",
        "_prefill_attention": "attention",
        "triton_red_fused__to_copy__unsafe_view_add_mean_mul_pow_13": "inductor triton",
    }
    assert {name: kernel_family(name) for name in names} == names


def test_timeline_names_where_the_gpu_waited_for_the_host():
    """Pieces the GPU reached as the host did (the host bounded the call there) are named; the rest had the host
    ahead, by at most the largest lag."""
    rows = [("submod_0", 2.58, 2.56), ("submod_2", 3.09, 3.07), ("submod_4", 3.39, 3.41), ("submod_6", 3.60, 3.69),
            ("submod_8", 3.79, 4.93)]
    summary, *pieces = timeline_lines(rows, wall_ms=18.0, host_ms=14.0)
    assert "reached the first piece at 2.56 ms" in summary
    assert "waited for the host at 3 of 5 pieces (submod_0, submod_2, submod_4)" in summary
    assert "at most 1.14 ms ahead" in summary
    assert len(pieces) == 5 and pieces[-1].split() == ["submod_8", "host", "3.790", "gpu", "4.930", "(+1.140)"]
    assert "no captured piece" in timeline_lines([], wall_ms=1.0, host_ms=1.0)[0]


@pytest.mark.parametrize("script", ["decode_attention.py", "prefill_attention.py"])
def test_attention_benchmark_smoke_runs(script):
    """`--smoke`: tiny widths on CPU under the interpreter, a table row per layer with ours and SDPA's error against
    float64, both at fp32 rounding."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    out = subprocess.run([sys.executable, str(path), "--smoke"], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| tiny")]
    assert rows, out
    for row in rows:
        errors = [float(cell) for cell in re.findall(r"\| ([0-9.e+-]+) ", row + " ")[-2:]]
        assert len(errors) == 2 and max(errors) < 1e-5, row
