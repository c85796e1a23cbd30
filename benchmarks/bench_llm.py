"""Decoder-LM generation at batch 1: prefill time and decode tokens/s of a Llama-architecture model
(random weights from a config: speed does not depend on them), every artifact timed in ONE run.

Variants, all exported with `qexport.export_lm` (a static KV cache in mutable buffers, the same cache
length) except the peer:
- fp32 AOTI: the float model, compiled by AOTInductor (the reference every ratio is taken against);
- qexport AOTI CPU: int8_weight_only, int4_weight_only (g32), int8_dynamic, and
  int8_dynamic_int4_weight when this qexport registers it;
- qexport .pte (ExecuTorch, XNNPACK): int8_dynamic (and int8_dynamic_int4_weight when registered);
- the ExecuTorch peer: torchao's 8da4w (`quantize_(model, Int8DynamicActivationIntxWeightConfig(int4,
  PerGroup(32)))`) on the same wrapped model, exported and lowered with
  `to_edge_transform_and_lower(XnnpackPartitioner())`.

Each round generates `--new` tokens after a `--prompt`-token prompt through every artifact, in an order
that rotates between rounds, so machine load drifts hit every variant alike; medians over rounds.
Artifacts are kept in `--work` and reused by later runs (delete them after changing the code).

    .venv/bin/python benchmarks/bench_llm.py [--layers 12] [--rounds 5] [--prompt 32] [--new 32] [--threads 1]
        [--work /tmp/bench_llm] [--json benchmarks/results/llm.json] [--extra LABEL=PATH ...]

`--gpu` (on a CUDA machine) runs the GPU comparison instead: bf16 AOTI vs int4 g128 (and int8)
weight-only AOTI CUDA packages of `GPU_CONFIG`, each decoded as CUDA-graph replays and per call:

    python3 benchmarks/bench_llm.py --gpu --only bf16,int4 --rounds 3 --json benchmarks/results/llm_gpu_h200.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import qexport  # noqa: E402
from qexport import runners  # noqa: E402
from qexport.generation import GenerationSpec, StaticCacheLM, generate  # noqa: E402

CACHE = 256
GROUP = 32


def llama(layers: int) -> torch.nn.Module:
    """~125 M parameters at 12 layers: hidden 768, MLP 2048, 12 heads (4 KV heads), vocabulary 32000,
    embeddings and LM head untied (as Llama's)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
                                   num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=CACHE,
                                   tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg).eval()


#: the GPU run's model: wide and shallow, so decode at batch 1 reads weights rather than launching small
#: kernels (297 M parameters: one layer of hidden 3072, MLP 8192, 24 heads with 8 KV heads, vocabulary 32000, untied)
GPU_CONFIG = dict(vocab_size=32000, hidden_size=3072, intermediate_size=8192, num_hidden_layers=1, num_attention_heads=24,
                  num_key_value_heads=8, max_position_embeddings=CACHE, tie_word_embeddings=False)


def llama_gpu(layers: int) -> torch.nn.Module:
    import transformers

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**GPU_CONFIG, "num_hidden_layers": layers})).eval().to(torch.bfloat16)


def gpu_variants() -> list[tuple[str, str, str | None]]:
    """bf16 AOTI vs the weight-only schemes' AOTI packages, all on the GPU (int4 at group 128, as the CUDA kernels are tuned)."""
    return [("bf16 AOTI CUDA", "aoti_cuda", None), ("qexport AOTI CUDA int4_weight_only g128", "aoti_cuda", "int4_weight_only"),
            (f"qexport AOTI CUDA int4_weight_only g128 {UNFUSED}", "aoti_cuda", "int4_weight_only"),
            ("qexport AOTI CUDA int8_weight_only", "aoti_cuda", "int8_weight_only")]


#: a variant compiled with one kernel per region (q/k/v and gate/up apart), for the siblings' share
UNFUSED = "(fuse_siblings off)"


def has_scheme(name: str) -> bool:
    return name in qexport.schemes.names()


def variants() -> list[tuple[str, str, str | None]]:
    """(label, artifact kind, scheme or None for float / the peer)."""
    out = [("fp32 AOTI", "aoti", None), ("qexport AOTI int8_weight_only", "aoti", "int8_weight_only"),
           (f"qexport AOTI int4_weight_only g{GROUP}", "aoti", "int4_weight_only"),
           ("qexport AOTI int8_dynamic", "aoti", "int8_dynamic")]
    if has_scheme("int8_dynamic_int4_weight"):
        out.append((f"qexport AOTI int8_dynamic_int4_weight g{GROUP}", "aoti", "int8_dynamic_int4_weight"))
    out.append(("qexport .pte int8_dynamic (XNNPACK)", "pte", "int8_dynamic"))
    if has_scheme("int8_dynamic_int4_weight"):
        out.append((f"qexport .pte int8_dynamic_int4_weight g{GROUP} (XNNPACK)", "pte", "int8_dynamic_int4_weight"))
    out.append((f"ExecuTorch torchao 8da4w g{GROUP} .pte (XNNPACK)", "peer", None))
    return out


def scheme(name: str, group: int = GROUP):
    return qexport.schemes.get(name, group_size=group) if "int4" in name else qexport.schemes.get(name)


def build(label: str, kind: str, name: str | None, layers: int, work: Path) -> tuple[Path, dict[str, Any]]:
    path = work / (label.replace(" ", "_").replace("(", "").replace(")", "").replace(".", "") + (".pt2" if kind.startswith("aoti") else ".pte"))
    info: dict[str, Any] = {}
    if path.exists():
        return path, {"reused": True}
    t = time.perf_counter()
    if kind == "aoti_cuda":
        model = llama_gpu(layers)
        if name is not None:
            qexport.quantize(model, scheme(name, 128))
        options = {"qexport.fuse_siblings": "off"} if UNFUSED in label else None
        qexport.compile(qexport.export_lm(model, max_cache_len=CACHE), path, device="cuda", options=options)
        info["build_s"] = round(time.perf_counter() - t, 1)
        return path, info
    model = llama(layers)
    if kind == "peer":
        info.update(peer_pte(model, path))
    else:
        if name is not None:
            qexport.quantize(model, scheme(name))
        ep = qexport.export_lm(model, max_cache_len=CACHE)
        if kind == "aoti":
            qexport.compile(ep, path)
        else:
            report = qexport.to_executorch(ep, path, progress=False)
            info["regions_delegated"] = f"{sum(r.delegated for r in report.regions)}/{len(report.regions)}"
            info["delegated_nodes"] = f"{report.delegated_nodes}/{report.total_nodes}"
    info["build_s"] = round(time.perf_counter() - t, 1)
    del model
    gc.collect()
    return path, info


def peer_pte(model: torch.nn.Module, path: Path) -> dict[str, Any]:
    """torchao's 8da4w on the same model and cache wrapper, lowered the way ExecuTorch's own examples do."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup, quantize_

    wrapper = StaticCacheLM(model, CACHE)
    quantize_(wrapper, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP)))
    prompt = torch.export.Dim("prompt_len", min=1, max=CACHE)
    with torch.no_grad():
        ep = torch.export.export(wrapper, (torch.zeros(1, 2, dtype=torch.long), torch.arange(2)),
                                 dynamic_shapes=({1: prompt}, {0: prompt}), strict=False)
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
        info = get_delegation_info(edge.exported_program().graph_module)
        et = edge.to_executorch()
    with open(path, "wb") as f:
        et.write_to_file(f)
    return {"delegated_nodes": f"{info.num_delegated_nodes}/{info.num_delegated_nodes + info.num_non_delegated_nodes}"}


def open_runner(path: Path, kind: str) -> Callable:
    if kind != "peer":
        return runners.load(path)
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")
    return runners.Runner("pte", path, lambda flat: list(method.execute([x.contiguous() for x in flat])))


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = open("/proc/cpuinfo").read()
    return {"cpu": model, "cores": os.cpu_count(), "capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_vnni": "avx512_vnni" in flags, "machine": f"{model}, {os.cpu_count()} cores, "
            f"{torch.backends.cpu.get_cpu_capability()}{' + VNNI' if 'avx512_vnni' in flags else ''}"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op and XNNPACK threads (default 1: on a shared machine more threads add noise)")
    ap.add_argument("--work", default="/tmp/bench_llm")
    ap.add_argument("--only", default=None, help="comma-separated substrings of variant labels to keep")
    ap.add_argument("--skip", default=None, help="comma-separated substrings of variant labels to leave out")
    ap.add_argument("--extra", action="append", default=[], metavar="LABEL=PATH",
                    help="also time an artifact built elsewhere (e.g. by the code before a change, or with "
                         "other compile options) in the same interleaved rounds")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="with --gpu: also list each package's GPU kernels per decode step")
    ap.add_argument("--gpu", action="store_true", help="the GPU run: bf16 vs int4 / int8 weight-only AOTI CUDA packages of "
                    "GPU_CONFIG (--layers defaults to 1), decode as CUDA-graph replays and, for comparison, plain calls")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.gpu:
        return main_gpu(args)
    # The runtime's pybindings expose no public knob for the threadpool; this is what its own tests use.
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    chosen = [v for v in variants() if args.only is None or any(k in v[0] for k in args.only.split(","))]
    params = sum(p.numel() for p in llama(args.layers).parameters())
    print(f"Llama, {args.layers} layers, {params / 1e6:.0f} M parameters; cache {CACHE}; prompt {args.prompt}, "
          f"{args.new} new tokens; {args.threads} thread(s)", flush=True)

    built: dict[str, tuple[Path, str, dict[str, Any]]] = {}
    for label, kind, name in chosen:
        print(f"building {label} ...", flush=True)
        path, info = build(label, kind, name, args.layers, work)
        info["bytes"] = path.stat().st_size
        built[label] = (path, kind, info)
        print(f"  {path.name}: {info}", flush=True)
    for extra in args.extra:
        label, _, file = extra.rpartition("=")
        path = Path(file)
        built[label] = (path, "aoti" if path.suffix == ".pt2" else "pte", {"bytes": path.stat().st_size, "built": "elsewhere"})

    spec = GenerationSpec(max_cache_len=CACHE, vocab_size=32000)
    loaded = {label: open_runner(path, kind) for label, (path, kind, _) in built.items()}
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 32000, (args.prompt,), generator=g).tolist()
    tokens: dict[str, list[int]] = {}
    for label, r in loaded.items():  # warm-up: first calls allocate, page in weights, build kernels' packs
        tokens[label] = generate(r, prompt, args.new, stop_at_eos=False, spec=spec).tokens
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label in loaded}
    labels = list(loaded)
    for rnd in range(args.rounds):
        for label in labels[rnd % len(labels):] + labels[:rnd % len(labels)]:
            res = generate(loaded[label], prompt, args.new, stop_at_eos=False, spec=spec)
            samples[label].append((res.prefill_s, res.decode_tokens_per_s))
        print(f"round {rnd + 1}/{args.rounds} done", flush=True)

    base = "fp32 AOTI"
    med = {label: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v)) for label, v in samples.items()}
    rows = []
    for label, (prefill, rate) in med.items():
        path, kind, info = built[label]
        row = {"variant": label, "kind": kind, "prefill_ms": prefill * 1e3, "decode_tokens_per_s": rate,
               "decode_vs_fp32_aoti": rate / med[base][1] if base in med else None,
               "prefill_speedup_vs_fp32_aoti": med[base][0] / prefill if base in med else None,
               "same_tokens_as_fp32": (sum(a == b for a, b in zip(tokens[label], tokens[base])) if base in tokens else None),
               **info}
        rows.append(row)
        print(f"{label:55s} prefill {prefill * 1e3:8.1f} ms  decode {rate:7.1f} tok/s  "
              f"x{row['decode_vs_fp32_aoti'] or float('nan'):.2f} decode, x{row['prefill_speedup_vs_fp32_aoti'] or float('nan'):.2f} "
              f"prefill vs fp32 AOTI  {info.get('bytes', 0) / 1e6:.0f} MB", flush=True)
    result = {"machine": machine()["machine"], "meta": {**machine(), "torch": torch.__version__,
              "threads": args.threads, "layers": args.layers, "params": params, "cache": CACHE,
              "prompt": args.prompt, "new_tokens": args.new, "rounds": args.rounds, "group_size": GROUP,
              "note": "ratios on a shared machine (other jobs ran at the same time); medians of interleaved rounds"},
              "rows": rows}
    from importlib.metadata import PackageNotFoundError, version

    for package in ("executorch", "torchao", "transformers"):
        try:
            result["meta"][package] = version(package)
        except PackageNotFoundError:
            pass
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def kernel_profile(runner: Any, spec: Any, new: int) -> dict[str, Any]:
    """GPU kernels of single-token steps (a one-token prompt, then `new` tokens, called per step so
    that the profiler sees each kernel): per kernel name, launches and µs per token, longest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generate(runner, [1], new, stop_at_eos=False, spec=spec, cuda_graph=False)
        torch.cuda.synchronize()
    steps = new  # the one-token prefill and the new - 1 decode steps
    rows = [{"kernel": e.key[:120], "per_token": round(e.count / steps, 2),
             "us_per_token": round(e.device_time_total / steps, 2)}
            for e in prof.key_averages() if e.device_time_total > 0 and e.count]
    rows.sort(key=lambda r: -r["us_per_token"])
    total = sum(r["us_per_token"] for r in rows)
    print(f"  kernels per token: {sum(r['per_token'] for r in rows):.0f}, {total:.1f} µs of kernel time", flush=True)
    for r in rows[:12]:
        print(f"    {r['us_per_token']:7.1f} µs  x{r['per_token']:<5} {r['kernel'][:90]}", flush=True)
    return {"kernel_us_per_token": round(total, 1), "kernels": rows[:40]}


def main_gpu(args: argparse.Namespace) -> None:
    layers = 1 if args.layers == 12 else args.layers  # 12 is the CPU run's default
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    chosen = [v for v in gpu_variants() if (args.only is None or any(k in v[0] for k in args.only.split(",")))
              and not (args.skip and any(k in v[0] for k in args.skip.split(",")))]
    params = sum(p.numel() for p in llama_gpu(layers).parameters())
    gpu = torch.cuda.get_device_name()
    print(f"Llama {GPU_CONFIG} x {layers} layer(s), {params / 1e6:.0f} M parameters, bf16, on {gpu}; cache {CACHE}; "
          f"prompt {args.prompt}, {args.new} new tokens", flush=True)
    built = {}
    for label, kind, name in chosen:
        print(f"building {label} ...", flush=True)
        path, info = build(label, kind, name, layers, work)
        info["bytes"] = path.stat().st_size
        built[label] = (path, info)
        print(f"  {path.name}: {info}", flush=True)
    spec = GenerationSpec(max_cache_len=CACHE, vocab_size=32000)
    loaded = {label: runners.load(path) for label, (path, _) in built.items()}
    prompt = torch.randint(0, 32000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    modes = {"graph replay": True, "per-call": False}
    tokens = {}
    for label, r in loaded.items():  # warm-up, and the captured decode step of each runner
        for mode, graph in modes.items():
            tokens[(label, mode)] = generate(r, prompt, args.new, stop_at_eos=False, spec=spec, cuda_graph=graph).tokens
    profiles = {}
    for label, r in loaded.items() if args.profile else ():
        print(f"profiling {label} ...", flush=True)
        try:
            profiles[label] = kernel_profile(r, spec, args.new)
        except Exception as e:  # noqa: BLE001 - the timing below is the run's point
            profiles[label] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"  {profiles[label]['error']}", flush=True)
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in tokens}
    keys = list(samples)
    for rnd in range(args.rounds):
        for label, mode in keys[rnd % len(keys):] + keys[:rnd % len(keys)]:
            res = generate(loaded[label], prompt, args.new, stop_at_eos=False, spec=spec, cuda_graph=modes[mode])
            samples[(label, mode)].append((res.prefill_s, res.decode_tokens_per_s))
    base = chosen[0][0]
    med = {key: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v)) for key, v in samples.items()}
    rows = []
    for (label, mode), (prefill, rate) in med.items():
        path, info = built[label]
        ref = med.get((base, mode))
        row = {"variant": label, "decode": mode, "prefill_ms": prefill * 1e3, "decode_tokens_per_s": rate,
               "decode_vs_bf16": rate / ref[1] if ref else None,
               "same_tokens_as_graph_replay": sum(a == b for a, b in zip(tokens[(label, mode)], tokens[(label, "graph replay")])),
               "same_tokens_as_bf16": sum(a == b for a, b in zip(tokens[(label, mode)], tokens[(base, mode)])), **info}
        rows.append(row)
        print(f"{label:45s} {mode:12s} prefill {prefill * 1e3:7.2f} ms  decode {rate:8.1f} tok/s  x{row['decode_vs_bf16'] or float('nan'):.2f} "
              f"vs bf16  {info['bytes'] / 1e6:.0f} MB  same tokens {row['same_tokens_as_graph_replay']}/{args.new}", flush=True)
    result = {"machine": gpu, "meta": {"gpu": gpu, "torch": torch.__version__, "layers": layers, "config": GPU_CONFIG,
              "params": params, "cache": CACHE, "prompt": args.prompt, "new_tokens": args.new, "rounds": args.rounds,
              "note": "batch 1, greedy; decode tok/s over the new tokens after the first; medians of interleaved rounds"}, "rows": rows,
              **({"profiles": profiles} if profiles else {})}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
