"""What the GPU benchmarks share: the measured copy bandwidth (the floors' denominator), graph-replay timing and
the markdown tables they print, and the process pool that compiles benchmark variants side by side."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import queue
import statistics
import tempfile
import threading
import time
import traceback

import torch
import triton.testing

from gemma4_fx.multimodal import DEFAULT_SOFT_TOKENS, image_inputs, prompt

TURN_LOCK = os.path.join(tempfile.gettempdir(), "gemma4_fx-benchmark-turn.lock")


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def parse_image_size(text: str) -> tuple[int, int]:
    """`--image-size HxW` of the multimodal benchmarks."""
    height, _, width = text.partition("x")
    if not (height.isdigit() and width.isdigit()) or int(height) < 1 or int(width) < 1:
        raise argparse.ArgumentTypeError(f"image-size: expected HEIGHTxWIDTH such as 768x768, got {text!r}")
    return int(height), int(width)


def image_prompt(model, batch: int, text_tokens: int, images: int, size, seed: int) -> tuple[torch.Tensor, dict]:
    """(input_ids, image inputs) of `batch` copies of a prompt of `images` random images of `size` (height, width)
    between `text_tokens` words, laid out for the image processor's default budget."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values, positions, soft_tokens = image_inputs(
        model.config.vision_config, [size] * images, max_soft_tokens=DEFAULT_SOFT_TOKENS, generator=generator,
        device=model.device, dtype=model.dtype)
    ids = prompt(model.config, text_tokens // 2, soft_tokens, generator=generator).to(model.device)
    return ids.expand(batch, -1), dict(pixel_values=pixel_values.repeat(batch, 1, 1),
                                       image_position_ids=positions.repeat(batch, 1, 1))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_graph(fn):
    """`fn()` captured in a CUDA graph (after a warm-up on a side stream, as capture wants); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def graph_replay_us(fn, *args) -> float:
    """Median µs of replaying a CUDA graph that holds one call of `fn(*args)`; do_bench clears L2 before each."""
    with torch.no_grad():
        replay = cuda_graph(lambda: fn(*args))
        return triton.testing.do_bench(replay, warmup=25, rep=200, return_mode="median") * 1e3


def graph_stack_us(fn, arg_sets: list, rep: int = 200) -> float:
    """Median µs per call of replaying a CUDA graph that holds `fn(*args)` for each of `arg_sets` back to back: a
    decode step's view of a kernel (each layer's weights cold in L2 after the others', no launch gap between calls,
    one graph launch shared by all), where one call alone per graph adds the graph's own launch to every call."""
    with torch.no_grad():
        replay = cuda_graph(lambda: [fn(*args) for args in arg_sets])
        return triton.testing.do_bench(replay, warmup=10, rep=rep, return_mode="median") * 1e3 / len(arg_sets)


def plain_call_us(fns: dict, *args, calls: int = 50, repeats: int = 9) -> dict:
    """{name: µs per call} of `calls` back-to-back calls of each fn(*args) outside any CUDA graph, host wall clock
    from a synchronize to a synchronize, median of `repeats` rounds that take the fns in turn (so that the host's
    drift falls on all of them): what a run of calls costs a user, the host's launch work included (whichever of
    the host and the GPU is slower sets the pace). A fn that fails is left out, with its error printed."""
    times = {name: [] for name in fns}
    with torch.no_grad():
        for name, fn in fns.items():
            try:
                for _ in range(5):
                    fn(*args)
            except Exception as error:  # noqa: BLE001 (reported, the others still timed)
                print(f"{name}: plain calls failed: {error!r}")
                del times[name]
        for _ in range(repeats):
            for name in times:
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(calls):
                    fns[name](*args)
                torch.cuda.synchronize()
                times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


# Kernel families for `kernel_profile`, first match wins (names as the profiler prints them): attention before
# GEMMs, since PyTorch's memory-efficient attention is a CUTLASS kernel ("fmha_cutlassF_...").
KERNEL_FAMILIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn", "_mask_key_ranges")),
    ("gemm (cuBLAS/CUTLASS)", ("nvjet", "gemm", "gemv", "cutlass", "sm90_xmma", "cublas")),
    ("gemma4_fx kernels", ("_router", "_moe", "moe_", "_gate_up", "_down", "_combine", "_route", "post_attn",
                           "ple_", "_norm_kernel", "_rows", "_skinny", "_reduce_kernel", "_slide_window")),
    ("inductor triton", ("triton_",)),
    ("copies and fills", ("memcpy", "memset", "copy", "fill")),
)


def kernel_family(name: str) -> str:
    lowered = name.lower()
    return next((family for family, keys in KERNEL_FAMILIES if any(k in lowered for k in keys)), "other")


def kernel_profile(fn, top: int = 8, calls: int = 1) -> tuple[float, str]:
    """`calls` calls of `fn` (after one more for warm-up) under torch.profiler: the GPU's busy ms per call, and a
    summary of its wall ms against that (is the host or the GPU the bottleneck?), of the kernel families
    (`KERNEL_FAMILIES`) and of the `top` kernels and host ops, all per call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - begin) * 1e3 / calls
    events = prof.key_averages()
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: -e.self_device_time_total)
    host = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                  key=lambda e: -e.self_cpu_time_total)
    busy_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / calls
    families: dict[str, list] = {}
    for e in kernels:
        ms_count = families.setdefault(kernel_family(e.key), [0.0, 0])
        ms_count[0] += e.self_device_time_total / 1e3 / calls
        ms_count[1] += e.count / calls
    lines = [f"wall {wall_ms:.3f} ms (profiled), GPU busy {busy_ms:.3f} ms in "
             f"{sum(e.count for e in kernels) / calls:.0f} kernels, per call"]
    lines += ["  family " + "; ".join(f"{name} {ms:.3f} ms / {count:.0f}" for name, (ms, count)
                                      in sorted(families.items(), key=lambda item: -item[1][0]))]
    lines += [f"  gpu {e.self_device_time_total / 1e3 / calls:7.3f} ms {e.count / calls:6.1f}x {e.key[:100]}"
              for e in kernels[:top]]
    lines += [f"  cpu {e.self_cpu_time_total / 1e3 / calls:7.3f} ms {e.count / calls:6.1f}x {e.key[:100]}"
              for e in host[:top]]
    lines += idle_gaps(prof.events(), calls, top)
    return busy_ms, "\n".join(lines)


def piece_timeline(fn) -> str:
    """One call of `fn` (a model compiled by a gemma4_fx backend with CUDA graphs) with a CUDA event recorded as
    each captured piece is called, beside the host's clock: in ms from the call's start, when the host reached each
    piece and when the GPU did (`timeline_lines`). No profiler, so the host runs at its own pace."""
    from gemma4_fx.runtime.cudagraphs import CapturedPiece

    marks, call = [], CapturedPiece.__call__

    def marked(piece, *args):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        marks.append((piece.name, time.perf_counter(), event))
        return call(piece, *args)

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    CapturedPiece.__call__ = marked
    try:
        begin = time.perf_counter()
        start.record()
        fn()
        end.record()
        host_ms = (time.perf_counter() - begin) * 1e3
    finally:
        CapturedPiece.__call__ = call
    end.synchronize()
    rows = [(name, (at - begin) * 1e3, start.elapsed_time(event)) for name, at, event in marks]
    return "\n".join(timeline_lines(rows, start.elapsed_time(end), host_ms))


def timeline_lines(rows: list[tuple[str, float, float]], wall_ms: float, host_ms: float,
                   waited_ms: float = 0.05) -> list[str]:
    """`piece_timeline`'s report of (piece, host ms, GPU ms) rows. A piece the GPU reached less than `waited_ms` after
    the host did had the GPU waiting for the host (the host bounds the call there); one it reached later found the
    host ahead (the GPU bounds it). The first piece's GPU time is what the call spent before any of its graph ran:
    Dynamo's entry (guards, bytecode) and the runtime's own, before its first piece."""
    if not rows:
        return [f"timeline: wall {wall_ms:.2f} ms, host returned at {host_ms:.2f} ms; no captured piece was called"]
    waited = [name for name, host, gpu in rows if gpu - host < waited_ms]
    ahead = max(gpu - host for _, host, gpu in rows)
    lines = [f"timeline: wall {wall_ms:.2f} ms, host returned at {host_ms:.2f} ms; the GPU reached the first piece "
             f"at {rows[0][2]:.2f} ms; it waited for the host at {len(waited)} of {len(rows)} pieces"
             + (f" ({', '.join(waited[:8])}{', ...' if len(waited) > 8 else ''})" if waited else "")
             + f"; the host was at most {ahead:.2f} ms ahead"]
    lines += [f"  {name:16s} host {host:8.3f} gpu {gpu:8.3f} ({gpu - host:+.3f})" for name, host, gpu in rows]
    return lines


def idle_gaps(events, calls: int, top: int) -> list[str]:
    """Where the GPU waits between kernels, per call: the idle time in short gaps (launches back to back, or a CUDA
    graph's own), medium and long ones (the host is behind), and the `top` longest with the kernels around them."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    gaps, end, before = [], None, None
    for start, stop, name in spans:
        if end is not None and start > end:
            gaps.append((start - end, before, name))
        if end is None or stop > end:
            end, before = stop, name
    bins = ((0, 5), (5, 50), (50, float("inf")))
    summary = "; ".join(f"{low}-{high} us: {sum(g for g, *_ in gaps if low <= g < high) / 1e3 / calls:.3f} ms "
                        f"/ {sum(low <= g < high for g, *_ in gaps) / calls:.0f}" for low, high in bins)
    lines = [f"  GPU idle between kernels {sum(g for g, *_ in gaps) / 1e3 / calls:.3f} ms ({summary})"]
    lines += [f"  idle {gap:7.1f} us after {before[:60]} before {after[:60]}" for gap, before, after in
              sorted(gaps, key=lambda gap: -gap[0])[:top]]
    return lines


def markdown(rows: list[dict]) -> str:
    """A markdown table with a column for every key any row has."""
    keys = list(dict.fromkeys(k for row in rows for k in row))

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def shareable(model: torch.nn.Module) -> dict:
    """What `rebuild` needs to make `model` again in another process over the same memory: its config and every
    parameter and buffer (CUDA tensors travel between processes as IPC handles, so workers share one copy)."""
    tensors = {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)}
    tensors.update(model.named_buffers(remove_duplicate=False))
    return {"config": model.config, "tensors": tensors}


def rebuild(shared: dict) -> torch.nn.Module:
    """The `Gemma4ForCausalLM` (or, for a multimodal config, `Gemma4ForConditionalGeneration`) that `shareable`
    described, its weights (tied ones tied) the very tensors it sent."""
    from transformers import Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    model_class = Gemma4ForConditionalGeneration if isinstance(shared["config"], Gemma4Config) else Gemma4ForCausalLM
    with torch.device("meta"):
        model = model_class(shared["config"])
    parameters = {}
    for name, tensor in shared["tensors"].items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if leaf in module._parameters:
            key = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)
            module._parameters[leaf] = parameters.setdefault(key, torch.nn.Parameter(tensor, requires_grad=False))
        else:
            module._buffers[leaf] = tensor
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"shared: no tensors for {left[:3]}")
    return model.eval()


def run_jobs(worker, jobs: list, *, deadline_s: float) -> list:
    """`worker(job, turn)` for every job, each in its own process, all at once; the results in `jobs`' order (a
    failed or unfinished job's is the string saying why).

    Compiling a full-depth model takes minutes of host CPU, and the host has many cores: so every job compiles and
    warms up side by side, then calls `turn()`, a context manager that waits until every job has arrived (or 80% of
    the deadline has passed: the rest is for timing) and then lets the jobs time their runs one at a time (one at a
    time on the whole host, a file lock: two benchmark scripts may share a machine), the GPU otherwise idle. It
    gives True if every job had arrived: else others may still be compiling, and host-bound timings suffer. A job may
    take several turns (timing rounds that interleave with the other jobs', so that a host that drifts over the run
    falls on every job alike)."""
    if torch.cuda.is_initialized():  # what this process freed stays cached (the weights' random draw: gigabytes)
        torch.cuda.empty_cache()
    context = torch.multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(len(jobs)), context.Queue()
    threads = max(1, (os.cpu_count() or 1) // len(jobs))
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(threads))  # read by the children
    release = time.time() + 0.8 * deadline_s  # wall clock: the children share it
    processes = [context.Process(target=_run_job, args=(worker, index, job, barrier, results, release))
                 for index, job in enumerate(jobs)]
    for process in processes:
        process.start()
    outcome = ["unfinished: past the deadline"] * len(jobs)
    pending, end = set(range(len(jobs))), time.monotonic() + deadline_s
    while pending and time.monotonic() < end:
        try:
            index, result = results.get(timeout=5)
        except queue.Empty:
            if not any(process.is_alive() for process in processes):
                break
            continue
        outcome[index] = result
        pending.discard(index)
    for index in pending:
        if processes[index].exitcode not in (None, 0):
            outcome[index] = f"failed: the process exited with code {processes[index].exitcode}"
    for process in processes:
        process.terminate()
        process.join()
    return outcome


def _wait_for_peers(index: int, release: float) -> bool:
    """With `GEMMA4_FX_BENCHMARK_PEERS=DIR:N` (N scripts started together, e.g. two builds side by side), wait until
    all N scripts' jobs have compiled (each script's first job leaves a file in DIR) or the release time has come,
    so that no script times its runs while another compiles. True unless the release time came first."""
    peers = os.environ.get("GEMMA4_FX_BENCHMARK_PEERS")
    if not peers:
        return True
    folder, _, count = peers.rpartition(":")
    os.makedirs(folder, exist_ok=True)
    if index == 0:
        open(os.path.join(folder, str(os.getppid())), "w").close()
    while len(os.listdir(folder)) < int(count):
        if time.time() > release:
            print(f"job {index}: timed while other scripts may still compile (host contention)", flush=True)
            return False
        time.sleep(1)
    return True


def _run_job(worker, index, job, barrier, results, release: float):
    arrived, alone = False, True

    @contextlib.contextmanager
    def turn():
        nonlocal arrived, alone
        if not arrived:  # the first turn waits for the others to arrive
            arrived = True
            try:
                barrier.wait(max(0.0, release - time.time()))
            except threading.BrokenBarrierError:  # a job is slow or dead: time anyway, still one at a time
                alone = False
                print(f"job {index}: timed while other jobs may still compile (host contention)", flush=True)
            alone = _wait_for_peers(index, release) and alone
        else:
            time.sleep(0.2)  # a job waiting for the lock gets it before this one takes it again
        with open(TURN_LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed
            yield alone

    try:
        result = worker(job, turn)
    except Exception as error:  # noqa: BLE001 (reported in the job's row; the other jobs go on)
        traceback.print_exc()
        result = f"failed: {type(error).__name__}: {str(error)[:200]}"
        if not arrived:  # arrive anyway, so the others need not wait for the barrier's timeout
            with turn():
                pass
    results.put((index, result))
