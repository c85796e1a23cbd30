"""Hostile-file fuzzer for every artifact kind qexport opens (seeded, so every run sees the same files).

    PYTHONPATH=. .venv/bin/python tests/fuzz_artifacts.py [--cases 1000] [--seed 20261129] [--json out.json]

For each kind (.pt2 program, AOTI package, .pte, .onnx, and `ptd`: a .pte whose tied weight lives in
the .ptd beside it) it builds one artifact with qexport, then writes mutated copies, and a worker process opens each one through the public entry points
(`qexport.inspect`, `qexport.runners.load`, which is what `qexport.load`/`load_compiled`/`verify`/
`bench` use, then one call of the loaded runner). The worker loads many files and is restarted when
it dies, so a crash or a hang is counted against the file that caused it, at the cost of one
interpreter start per crash instead of per file.

Mutation classes:
- damage: what a disk, a cut download or a careless tool does: bit flips, truncations, overwritten
  or inserted blocks, for zips also members duplicated / removed / renamed / with JSON fields of
  another type, rewritten by Python's zipfile (digests left as they were); for .pte also flatbuffer
  offsets moved; for `ptd` the data file damaged under an intact .pte. None of these may load (.pte
  and .onnx carry a checksum trailer, which names the data file's size and SHA-256).
- rewrite: the same member edits, resealed with fresh digests (what anyone editing a file on purpose
  can do), and for .pte and .onnx damaged files given a fresh checksum, for `ptd` a damaged data file
  named by a resealed .pte: these may load; they must not crash, run code or escape.
- hostile: files built to run a pickle payload or write outside the extraction folder (duplicated
  members whose first copy is a pickle, a second program, pickled weights, `..`/absolute/symlink
  member names, tensor metadata promising 16 GB over an empty member, a symbolic size that sympy
  would evaluate as Python) plus, for AOTI, a damaged
  shared library resealed with fresh digests: native code by design, so the worker opens it only
  with the original's digest pinned, which must refuse it; for `ptd`, data file records naming a path
  outside the .pte's folder (a valid data file sits there), a data file missing, grown, or a link to a
  device, and malformed records.

Counted for every file: payloads executed (marker folders a payload would create), files written
outside the sandbox's extraction folders, crashes, hangs, exceptions other than QExportError, and
for damage the files that loaded.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

from serializers import kinds as artifact_kinds

SEED = 20261129
HANG_S = 90.0
#: the kinds whose files the mutations below know how to damage (suffixes and writers: the kind table)
KINDS = ("pt2", "aoti", "pte", "onnx")
SUFFIX = {k: artifact_kinds.get(k).suffix for k in KINDS}
#: what the fuzzer opens: every kind, and `ptd`, a .pte with the data file it names (_data_file_mutations)
TARGETS = (*KINDS, "ptd")
#: how the fuzzer writes a kind (writer options); a kind not listed gets its writer's defaults
WRITE_OPTIONS = {"aoti": {"device": "cpu"}}


# -- payloads -------------------------------------------------------------------------------------

class _Mkdir:
    """Unpickling this creates a folder: the observable trace of code run from a file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def pickle_payload(marker: str) -> bytes:
    """A torch.save-style zip whose data.pkl runs os.mkdir(marker) when unpickled."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(((_Mkdir(marker),), {}), protocol=2))
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


# -- mutations ------------------------------------------------------------------------------------

def _raw(data: bytes, rng: random.Random, op: str) -> bytes:
    b = bytearray(data)
    if op == "flip":
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        del b[rng.randrange(len(b)):]
    elif op == "block":
        off = rng.randrange(len(b))
        n = min(rng.randint(1, 512), len(b) - off)
        b[off:off + n] = rng.randbytes(n)
    elif op == "zeros":
        off = rng.randrange(len(b))
        n = min(rng.randint(1, 64), len(b) - off)
        b[off:off + n] = bytes(n)
    elif op == "insert":
        off = rng.randrange(len(b))
        b[off:off] = rng.randbytes(rng.randint(1, 64))
    elif op == "delete":
        off = rng.randrange(len(b))
        del b[off:off + rng.randint(1, 64)]
    elif op == "fb_offset":  # see below  # a flatbuffer uoffset/vtable field moved: 4-aligned words of the table area
        end = min(len(b) - 4, 4096)
        off = rng.randrange(0, end) & ~3
        word = int.from_bytes(b[off:off + 4], "little")
        word = rng.choice([word + rng.randint(-64, 64), word ^ (1 << rng.randrange(32)), 0xFFFFFFFF, 0, word * 16])
        b[off:off + 4] = (word & 0xFFFFFFFF).to_bytes(4, "little")
    if bytes(b) == data:  # a mutation that changed nothing is not a case
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


RAW_OPS = ("flip", "truncate", "block", "zeros", "insert", "delete")
PTE_OPS = RAW_OPS + ("fb_offset",) * 4
#: the module that seals each kind that carries a checksum trailer, and the trailer's head there
#: (the trailer is the head and a SHA-256: serializers._archive.seal_trailer)
_SEALS = {"pte": ("serializers.pte", "TRAILER_MAGIC"), "onnx": ("serializers.onnx", "_TRAILER_HEAD")}
MEMBER_OPS = ("duplicate", "remove", "rename", "json_type", "member_flip")


def _members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i.filename, z.read(i.filename)) for i in z.infolist()]


def _json_type_change(value, rng: random.Random):
    """`value` with one randomly chosen field (at any depth) replaced by a value of another type."""
    paths = []

    def walk(v, path):
        paths.append(path)
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, path + [k])
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, path + [i])

    walk(value, [])
    path = rng.choice(paths[1:] or paths)
    choices = [None, True, 0, -1, 2**70, 1.5, "x", "", [], {}, [1, "a"], {"as_int": -5}]
    if not path:
        return rng.choice(choices)
    node = value
    for k in path[:-1]:
        node = node[k]
    old = node[path[-1]]
    node[path[-1]] = rng.choice([c for c in choices if type(c) is not type(old)])
    return value


def _member_edit(members: list[tuple[str, bytes]], rng: random.Random, op: str) -> list[tuple[str, bytes]]:
    out = list(members)
    i = rng.randrange(len(out))
    name, data = out[i]
    if op == "duplicate":
        out.insert(rng.randrange(len(out) + 1), (name, _raw(data, rng, "flip") if data and rng.random() < 0.5 else data))
    elif op == "remove":
        del out[i]
    elif op == "rename":
        root, rest = name.split("/", 1)
        new = rng.choice([
            f"{root}/{rest}.bak", f"{root}/{rest.upper()}", f"{root}/../{rest}", f"/{name}", f"{root}/x/{rest}",
            f"{root}/models/other.json", f"other/{rest}", f"{root}/{rest}/", f"{root}\\{rest}",
        ])
        out[i] = (new, data)
    elif op == "json_type":
        js = [(j, n) for j, (n, d) in enumerate(out) if n.endswith(".json")]
        j, n = rng.choice(js)
        try:
            value = json.loads(out[j][1])
            out[j] = (n, json.dumps(_json_type_change(value, rng)).encode())
        except ValueError:
            out[j] = (n, b"{")
    elif op == "member_flip" and data:
        out[i] = (name, _raw(data, rng, rng.choice(("flip", "truncate", "block"))))
    return out


def _plain_zip(members: list[tuple[str, bytes]]) -> bytes:
    import warnings

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": the point of the case
        for n, d in members:
            z.writestr(zipfile.ZipInfo(n), d)
    return buf.getvalue()


def _resealed(members: list[tuple[str, bytes]]) -> bytes:
    from serializers._archive import reseal

    with tempfile.TemporaryDirectory() as d:
        return reseal(members, Path(d) / "x.zip").read_bytes()


def _hostile(kind: str, members: list[tuple[str, bytes]], rng: random.Random, marker: str, escape: str) -> tuple[str, bytes]:
    """One crafted attack on a zip artifact: (name, bytes)."""
    root = members[0][0].split("/")[0]
    payload = pickle_payload(marker)
    sample = f"{root}/data/sample_inputs/model.pt"
    choice = rng.randrange(9 if kind == "pt2" else 6)
    if kind == "aoti" and choice == 5:
        so = [n for n, _ in members if n.endswith(".so")][0]
        swapped = [(n, _raw(d, rng, "flip") if n == so else d) for n, d in members]
        return "swapped_so_resealed", _resealed(swapped)
    if choice == 0:  # torch reads the first of two same-named members, zipfile the last
        first = [(sample, payload)] + members
        return "duplicate_pickled_sample", _plain_zip(first) if rng.random() < 0.5 else _resealed(first)
    if choice == 1:  # a second program with its own (pickled) example inputs
        model = next(d for n, d in members if n.endswith("models/model.json")) if kind == "pt2" else b"{}"
        extra = members + [(f"{root}/models/evil.json", model), (f"{root}/data/sample_inputs/evil.pt", payload)]
        return "second_program", _resealed(extra)
    if choice == 2:  # members that climb out of the extraction folder
        name = rng.choice([f"{root}/data/aotinductor/model/../../../../../{escape}", f"{root}/../{escape}", escape if escape.startswith("/") else "/" + escape])
        return "escaping_name", _resealed(members + [(name, b"escaped")])
    if choice == 3:  # a symlink member
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for n, d in members:
                z.writestr(zipfile.ZipInfo(n), d)
            link = zipfile.ZipInfo(f"{root}/data/aotinductor/model/link")
            link.external_attr = (0o120777 << 16)
            z.writestr(link, escape)
        return "symlink_member", buf.getvalue()
    if choice == 4:  # pickled example inputs in place of the real ones
        return "pickled_sample", _resealed([(n, payload if n == sample else d) for n, d in members] + ([] if kind == "pt2" else [(sample, payload)]))
    if choice == 5:  # a weight marked pickled, with a pickle payload
        out = []
        for n, d in members:
            if n.endswith("model_weights_config.json"):
                cfg = json.loads(d)
                meta = next(iter(cfg["config"].values()))
                meta["use_pickle"] = True
                d = json.dumps(cfg).encode()
                target = f"{root}/data/weights/{meta['path_name']}"
            out.append((n, d))
        out = [(n, payload if n == target else d) for n, d in out]
        return "pickled_weight", _resealed(out)
    if choice == 6:  # legacy pickled weights
        return "legacy_pickled_weights", _resealed(members + [(f"{root}/data/weights/model.pt", payload)])
    if choice == 8:  # a symbolic size torch.export.load hands to sympy.sympify, which evaluates it as Python
        def sized(d: bytes) -> bytes:
            graph = json.loads(d)
            values = graph["graph_module"]["graph"]["tensor_values"]
            values[next(iter(values))]["sizes"][0] = {"as_expr": {"expr_str": f"__import__('os').mkdir({marker!r})", "hint": {"as_int": 4}}}
            return json.dumps(graph).encode()

        return "sympy_expr", _resealed([(n, sized(d) if n.endswith("models/model.json") else d) for n, d in members])
    # choice 7: a payload promising a huge tensor over an empty member
    out = []
    for n, d in members:
        if n.endswith("model_weights_config.json"):
            cfg = json.loads(d)
            meta = next(iter(cfg["config"].values()))
            meta["tensor_meta"]["sizes"] = [{"as_int": 1 << 20}, {"as_int": 1 << 12}]
            meta["tensor_meta"]["strides"] = [{"as_int": 1 << 12}, {"as_int": 1}]
            d = json.dumps(cfg).encode()
            target = f"{root}/data/weights/{meta['path_name']}"
        out.append((n, d))
    return "huge_tensor_meta", _resealed([(n, b"" if n == target else d) for n, d in out])


def _with_data_record(data: bytes, raw: bytes | None = None, **fields) -> bytes:
    """A sealed .pte with its data file record's `fields` changed, or `raw` in its place (resealed:
    what anyone can do)."""
    import dataclasses

    from serializers import pte

    program, rec = pte.DataFile.split(Path("x.pte"), data[:-(len(pte.TRAILER_MAGIC) + 32)])
    with tempfile.TemporaryDirectory() as d:
        q = Path(d) / "x"
        q.write_bytes(program + (raw if raw is not None else dataclasses.replace(rec, **fields).record()))
        pte.seal(q)
        return q.read_bytes()


#: a data file record whose fields have other types
_MALFORMED = b'{"name": ["x.ptd"], "bytes": "4096", "sha256": null}'


def _data_file_mutations(data: bytes, ptd: bytes, n: int, rng: random.Random, sandbox: Path):
    """Cases for a .pte (`data`) and the data file it names (`ptd`): the files to write in the
    sandbox's files/ folder, the .pte first (the one opened); None for a data file left missing, a
    str for a link to that path."""
    from serializers import pte

    name = pte.DataFile.split(Path("x.pte"), data[:-(len(pte.TRAILER_MAGIC) + 32)])[1].name
    for i in range(n):
        case, marker, r = f"ptd{i}", str(sandbox / "markers" / f"ptd{i}"), i % 10
        op = PTE_OPS[i % len(PTE_OPS)]
        if r < 5:  # the data file damaged, the .pte as written
            yield case, "damage", op, {f"{case}.pte": data, name: _raw(ptd, rng, op)}, marker
        elif r < 9:  # the data file damaged and the .pte resealed to name it: the runtime parses it
            damaged = _raw(ptd, rng, op)
            blob = _with_data_record(data, size=len(damaged), sha256=hashlib.sha256(damaged).hexdigest())
            yield case, "rewrite", op, {f"{case}.pte": blob, name: damaged}, marker
        else:
            valid = str(sandbox / "files" / name)
            op, files = rng.choice([
                ("escaping_name", {f"{case}.pte": _with_data_record(data, name=f"../files/{name}"), name: ptd}),
                ("absolute_name", {f"{case}.pte": _with_data_record(data, name=valid), name: ptd}),
                ("control_name", {f"{case}.pte": _with_data_record(data, name=name + "\n"), name: ptd}),
                ("malformed_record", {f"{case}.pte": _with_data_record(data, raw=pte.DATA_MAGIC + _MALFORMED + len(_MALFORMED).to_bytes(4, "little")), name: ptd}),
                ("missing_data_file", {f"{case}.pte": data, name: None}),
                ("grown_data_file", {f"{case}.pte": data, name: ptd + bytes(1 << 20)}),
                ("huge_size_claim", {f"{case}.pte": _with_data_record(data, size=1 << 62), name: ptd}),
                ("device_link", {f"{case}.pte": data, name: "/dev/zero"}),
            ])
            yield case, "hostile", op, files, marker


def mutations(kind: str, data: bytes, n: int, seed: int, sandbox: Path, ptd: bytes | None = None):
    """Yield (case id, class, op, bytes, marker) for `n` mutations of one artifact (for `ptd`, bytes
    is the files of the case: see _data_file_mutations)."""
    rng = random.Random(f"{seed}:{kind}")
    if kind == "ptd":
        yield from _data_file_mutations(data, ptd, n, rng, sandbox)
        return
    zipped = kind in ("pt2", "aoti")
    members = _members(data) if zipped else []
    for i in range(n):
        marker = str(sandbox / "markers" / f"{kind}{i}")
        r = i % 10
        if zipped and r == 9:
            op, out = _hostile(kind, members, rng, marker, str(sandbox / "escaped" / f"{kind}{i}"))
            yield f"{kind}{i}", "hostile", op, out, marker
        elif zipped and r >= 5:
            op = MEMBER_OPS[i % len(MEMBER_OPS)]
            edited = _member_edit(members, rng, op)
            while edited == members or (r >= 7 and _resealed(edited) == data):
                edited = _member_edit(members, rng, op)
            if kind == "aoti" and r >= 7:  # resealed: anything but the .so (native code by design)
                edited = [(nm, d if not nm.endswith(".so") else dict(members).get(nm, d)) for nm, d in edited]
            if r >= 7:
                yield f"{kind}{i}", "rewrite", op, _resealed(edited), marker
            else:
                stale = op == "member_flip" or rng.random() < 0.5  # qexport's layout, digests as they were
                yield f"{kind}{i}", "damage", op, _resealed_stale(edited, members) if stale else _plain_zip(edited), marker
        elif kind in ("pte", "onnx") and r >= 5:  # damage under a fresh checksum: reaches the runtime
            import importlib

            seal, trailer = _SEALS[kind]
            module = importlib.import_module(seal)
            op = (PTE_OPS if kind == "pte" else RAW_OPS)[i % len(PTE_OPS if kind == "pte" else RAW_OPS)]
            with tempfile.TemporaryDirectory() as d:
                q = Path(d) / "x"
                q.write_bytes(_raw(data[:-(len(getattr(module, trailer)) + 32)], rng, op))
                module.seal(q)
                yield f"{kind}{i}", "rewrite", op, q.read_bytes(), marker
        else:
            ops = PTE_OPS if kind == "pte" else RAW_OPS
            op = ops[i % len(ops)]
            yield f"{kind}{i}", "damage", op, _raw(data, rng, op), marker


def _resealed_stale(edited, original) -> bytes:
    """qexport's layout around an edited member, with the manifest (and digests) as they were: what a
    flipped bit inside a member looks like once a tool has recomputed the zip CRCs."""
    from serializers._archive import MANIFEST_MEMBER, manifest_comment, write_archive

    text = next(d for n, d in original if n.endswith("/" + MANIFEST_MEMBER))
    buf = io.BytesIO()
    write_archive(edited, buf, manifest_comment(text))
    return buf.getvalue()


# -- the worker -----------------------------------------------------------------------------------

def worker() -> None:
    """Read {"path", "kind", "sha"} lines; answer one JSON line per file."""
    import gc

    import torch

    import qexport
    from qexport import QExportError, runners

    # the replies get their own copy of stdout; whatever the libraries print goes to stderr
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    torch.manual_seed(0)
    x = {"": [torch.randn(4, 64)]}  # build_artifacts' MLP; each kind's base artifact sets its own inputs
    baseline: dict[str, list] = {}
    print(json.dumps({"ready": True}), file=reply, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        p = req["path"]
        res: dict[str, str] = {}
        if req.get("pinned_only"):  # native code by design: only the pinned load may open it
            try:
                runners.load(p, expected_sha256=req["sha"])
                res["pinned"] = "ok"
            except QExportError as e:
                res["pinned"] = type(e).__name__
            except Exception as e:
                res["pinned"] = f"ESCAPED {type(e).__name__}: {str(e)[:200]}"
            print(json.dumps(res), file=reply, flush=True)
            continue
        for name, fn in (("inspect", qexport.inspect), ("load", runners.load)):
            try:
                out = fn(p)
                res[name] = "ok"
                if name == "load":
                    if req.get("base") and out.inputs is not None:
                        x[req["kind"]] = runners.make_inputs(out.inputs)
                    try:
                        got = out([t.clone() for t in x.get(req["kind"], x[""])])
                        got = [t.float().flatten()[:64].tolist() for t in got]
                        if req.get("base"):
                            baseline[req["kind"]] = got
                        res["outputs"] = "same" if got == baseline.get(req["kind"]) else "different"
                    except QExportError as e:
                        res["run"] = type(e).__name__
                    except Exception as e:
                        res["run"] = f"raised {type(e).__name__}"
                    if req.get("sha"):  # a pinned digest must refuse every file but the original
                        try:
                            runners.load(p, expected_sha256=req["sha"])
                            res["pinned"] = "ok"
                        except QExportError as e:
                            res["pinned"] = type(e).__name__
                del out
                if name == "load" and req["kind"] == "aoti":
                    gc.collect()  # a loaded AOTI model's private folder goes with it
            except QExportError as e:
                res[name] = type(e).__name__
            except Exception as e:
                res[name] = f"ESCAPED {type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(res), file=reply, flush=True)


class Worker:
    def __init__(self, sandbox: Path):
        self.sandbox = sandbox
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def _start(self) -> None:
        env = dict(os.environ, TMPDIR=str(self.sandbox / "tmp"))
        root = Path(__file__).resolve().parent.parent
        env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, cwd=self.sandbox / "cwd", env=env, text=True,
        )
        self.starts += 1
        self._read(600)

    def _read(self, timeout: float) -> dict | None:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def open(self, path: Path, kind: str, sha: str | None, base: bool = False, pinned_only: bool = False) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"path": str(path), "kind": kind, "sha": sha, "base": base, "pinned_only": pinned_only}) + "\n")
        self.proc.stdin.flush()
        res = self._read(HANG_S)
        if res is not None:
            return res
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            return {"fatal": "HANG"}
        code = self.proc.returncode
        self.proc = None
        return {"fatal": f"CRASH (signal {-code})" if code < 0 else f"CRASH (exit {code})"}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(30)


# -- the run --------------------------------------------------------------------------------------

def build_artifacts(out: Path, kinds: tuple[str, ...]) -> dict[str, Path]:
    """One small quantized MLP in every requested kind, written by qexport."""
    import torch

    import qexport
    from qexport import runners
    from qexport.models import TinyNet

    torch.manual_seed(0)
    x = torch.randn(4, 64)
    model = qexport.quantize(TinyNet((64, 128, 32)).eval(), qexport.schemes.get("int8_weight_only"))
    ep = qexport.export(model, (x,))
    paths = {k: out / f"base_{k}{SUFFIX.get(k, '.pte')}" for k in kinds}
    for k in kinds:
        if k == "ptd":  # an embedding and the delegated linear head that shares its weight
            emb, head = torch.nn.Embedding(64, 16), torch.nn.Linear(16, 64, bias=False)
            head.weight = emb.weight
            tied = qexport.quantize(torch.nn.Sequential(emb, head), {torch.nn.Linear: "int8_dynamic", torch.nn.Embedding: "int8_weight_only"})
            qexport.to_executorch(qexport.export(tied, (torch.randint(0, 64, (2, 5)),)), paths[k], progress=False)
            continue
        runners.stage(artifact_kinds.get(k).writer.split(":")[1])(ep, paths[k], **WRITE_OPTIONS.get(k, {}))
    return paths


def _snapshot(sandbox: Path) -> set[str]:
    """Every path under the sandbox except the case files and the (swept) extraction folders."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(sandbox):
        rel = os.path.relpath(dirpath, sandbox)
        if rel.startswith(("files", "markers")):
            continue
        for n in dirnames + filenames:
            out.add(os.path.join(rel, n))
    return out


def run(artifacts: dict[str, Path], cases: int, seed: int, sandbox: Path, log=print) -> dict:
    for sub in ("files", "markers", "tmp", "cwd", "escaped"):
        (sandbox / sub).mkdir(parents=True, exist_ok=True)
    worker_ = Worker(sandbox)
    report: dict = {"seed": seed, "cases_per_kind": cases, "kinds": {}}
    try:
        for kind, base in artifacts.items():
            data = base.read_bytes()
            ptd = base.with_suffix(".ptd").read_bytes() if kind == "ptd" else None
            sha = hashlib.sha256(data).hexdigest()
            first = worker_.open(base, kind, sha, base=True)
            if first.get("load") != "ok" or first.get("pinned") != "ok":
                raise SystemExit(f"the unmodified {kind} artifact does not load: {first}")
            counts: Counter = Counter()
            examples: dict[str, list] = {}
            t0 = time.perf_counter()
            for case, cls, op, blob, marker in mutations(kind, data, cases, seed, sandbox, ptd):
                files = blob if isinstance(blob, dict) else {f"{case}{SUFFIX[kind]}": blob}
                for name, b in files.items():
                    if isinstance(b, str):
                        os.symlink(b, sandbox / "files" / name)
                    elif b is not None:
                        (sandbox / "files" / name).write_bytes(b)
                path = sandbox / "files" / next(iter(files))
                before = _snapshot(sandbox)
                res = worker_.open(path, kind, sha, pinned_only=op == "swapped_so_resealed")
                after = _snapshot(sandbox)
                for name in files:
                    (sandbox / "files" / name).unlink(missing_ok=True)
                counts[f"{cls}"] += 1
                outcome = res.get("fatal") or res.get("load") or f"pinned {res.get('pinned')}"
                bad = []
                if "fatal" in res:
                    bad.append("crash" if res["fatal"].startswith("CRASH") else "hang")
                if any(v.startswith("ESCAPED") for v in res.values() if isinstance(v, str)):
                    bad.append("other_exception")
                if os.path.exists(marker):
                    bad.append("payload_executed")
                    shutil.rmtree(marker, ignore_errors=True)
                leftovers = {a for a in after - before if not a.startswith(os.path.join("tmp", "qexport-aoti."))}
                if leftovers or any((sandbox / "escaped").iterdir()):
                    bad.append("written_outside")
                    shutil.rmtree(sandbox / "escaped")
                    (sandbox / "escaped").mkdir()
                if res.get("pinned") == "ok":
                    bad.append("pinned_digest_accepted_another_file")
                if res.get("load") == "ok":
                    counts[f"{cls}_loaded"] += 1
                    if res.get("outputs") == "different":
                        counts[f"{cls}_loaded_different_outputs"] += 1
                    if cls == "damage" and kind in ("pt2", "aoti", "ptd"):
                        bad.append("damaged_loaded")
                    if cls == "hostile" and kind == "ptd":  # every one names a file it must not read
                        bad.append("hostile_loaded")
                if "run" in res:
                    counts[f"{cls}_run_{res['run']}"] += 1
                counts[f"{cls}:{outcome.split(':')[0]}"] += 1
                for b in bad:
                    counts["BAD_" + b] += 1
                    examples.setdefault(b, []).append(f"{case} {cls}/{op}: {res}")
            report["kinds"][kind] = {
                "seconds": round(time.perf_counter() - t0, 1),
                "counts": dict(sorted(counts.items())),
                "bad_examples": {k: v[:5] for k, v in examples.items()},
            }
            log(f"{kind}: {json.dumps(report['kinds'][kind], indent=1)}")
        leftover = [n for n in os.listdir(sandbox / "tmp") if n.startswith("qexport-aoti.")]
        report["extraction_folders_left"] = len(leftover)
    finally:
        worker_.close()
    report["worker_starts"] = worker_.starts
    return report


def bad_total(report: dict) -> int:
    return sum(v for k in report["kinds"].values() for name, v in k["counts"].items() if name.startswith("BAD_"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cases", type=int, default=1000, help="mutations per kind (default 1000)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--kinds", default=",".join(TARGETS))
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args()
    if args.worker:
        return worker()
    kinds = tuple(k for k in args.kinds.split(",") if k)
    with tempfile.TemporaryDirectory(prefix="qexport-fuzz-") as d:
        d = Path(d)
        (d / "base").mkdir()
        artifacts = build_artifacts(d / "base", kinds)
        report = run(artifacts, args.cases, args.seed, d / "sandbox")
    report["bad_total"] = bad_total(report)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    sys.exit(1 if report["bad_total"] else 0)


if __name__ == "__main__":
    main()
