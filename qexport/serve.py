"""`qexport serve ARTIFACT`: a compiled artifact behind Ray Serve, with dynamic batching.

qexport does not grow a server of its own: Ray Serve brings replicas, autoscaling, multi-node clusters
and request batching, and the artifact runs through the same `qexport.runners` loader that `verify`
and `bench` use (AOTI packages, `.pte`, `.onnx`, `.pt2`). Two deployments:

- `Ingress` (HTTP, FastAPI): `/predict`, `/health`, `/info`. Every request is decoded and checked
  against the artifact's input signature (the manifest's `inputs`: dtype, rank, static sizes, dynamic
  bounds) and the body-size limit *here*, so a malformed request gets a 4xx and never reaches a model
  replica. A model replica that dies mid-request is retried on another one; when none answers, the
  client gets a 503 it can retry.
- `Model` (N replicas): `serve.batch` gathers concurrent requests and runs them as one call along the
  dynamic batch dim (dim 0 of every input), then splits the outputs back per request.

Batching is only done where it cannot change a result: every input's dim 0 must be dynamic (the same
dim), and no region may quantize activations per tensor at run time (a per-tensor dynamic scale is
computed over the whole batch, so a batched request would round differently than alone). `/info`
says whether batching is on and why not.

Wire formats: JSON `{"inputs": [nested lists, one per input]}` (or `{"inputs": {name: list}}`) answered
with `{"outputs": [...], "shapes": [...], "dtypes": [...]}`; `.npz` bodies (Content-Type
`application/x-npz`, arrays named like the inputs or arr_0...) answered in `.npz`; one `.npy` body
(`application/x-npy`) for single-input models. Numbers, not pickles: each `.npy` (alone or in an `.npz`)
is read from its header first, object arrays refused, sizes checked before anything is allocated.
"""

# No `from __future__ import annotations` here: FastAPI reads the route handlers' annotations
# (`request: Request`) at definition time, and Request is imported inside build_app.
import asyncio
import io
import json
import math
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import BackendUnavailableError, QExportError, UsageError
from .signature import InputSpec

#: request bodies larger than this are refused with 413 before they are read
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
JSON, NPY, NPZ = "application/json", "application/x-npy", "application/x-npz"


class BadRequest(QExportError):
    """A request the server refuses before the model sees it: `status` is the HTTP code (4xx)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServeConfig:
    path: str
    replicas: int = 1
    max_batch: int = 32
    batch_wait_ms: float = 2.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: attempts on other replicas when the one serving a request dies
    retries: int = 3
    #: the artifact's SHA-256 (hex, what `sha256sum` prints): any other file is refused (docs/security.md)
    expected_sha256: str | None = None

    def check(self) -> "ServeConfig":
        for name, lo in (("replicas", 1), ("max_batch", 1), ("max_body_bytes", 1), ("retries", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise UsageError(f"{name}={v!r}: must be an int >= {lo}")
        if not isinstance(self.batch_wait_ms, (int, float)) or not 0 <= self.batch_wait_ms <= 10_000:
            raise UsageError(f"batch_wait_ms={self.batch_wait_ms!r}: must be a number of milliseconds in [0, 10000]")
        from serializers.files import pinned_digest

        pinned_digest(self.expected_sha256)
        return self


# -- the artifact's contract ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Signature:
    """What a request must look like, and whether requests may be batched."""

    inputs: tuple[InputSpec, ...]
    batching: bool
    why_not_batched: str = ""
    #: the largest batch the artifact takes along dim 0 (None: unbounded)
    max_rows: int | None = None


def signature(manifest: Any) -> Signature:
    """The request signature of an artifact from its manifest (`extra["inputs"]`, written by every
    backend since qexport 0.1; an artifact without it must be re-written to be served)."""
    raw = manifest.extra.get("inputs")
    if not isinstance(raw, list) or not raw:
        raise UsageError(
            "this artifact's manifest has no input signature (written by an older qexport); re-run "
            "qexport compile / partition on its .pt2 to serve it"
        )
    try:
        specs = tuple(InputSpec.from_json(d) for d in raw)
    except ValueError as e:
        raise UsageError(f"the artifact's input signature is unreadable: {e}") from None
    for spec in specs:
        try:
            _wire_dtype(spec)
        except TypeError:
            raise UsageError(f"input {spec.name} is {spec.dtype}, which no request can carry (numpy has no such dtype); "
                             f"export the model taking float32 and convert inside it") from None
    generation = manifest.extra.get("generation")
    if isinstance(generation, dict) and generation.get("layout") != "static_cache_io":
        raise UsageError(
            "this artifact is a language model exported for generation (qexport.export_lm) with its KV cache inside "
            "the program: every request would read and write the cache the others left, so it cannot be served "
            "request by request; run it with qexport generate, or serve a stateless export (export_lm(..., "
            "cache='io') to .onnx, or qexport.export of the model's forward)"
        )
    firsts = [s.shape[0] if s.shape else None for s in specs]
    why = ""
    if any(d is None or not d.dynamic for d in firsts):
        why = "not every input has a dynamic dim 0"
    elif len({d.name for d in firsts}) != 1:
        why = "the inputs' dim 0 are different dynamic dims"
    else:
        for r in manifest.regions:
            s = r.scheme
            if s.activation == "dynamic" and (s.act_granularity == "per_tensor" or r.op == "conv2d"):
                why = (f"region {r.name} quantizes activations per tensor at run time: a batch shares one scale, "
                       f"so a request batched with others would round differently than alone")
                break
    max_rows = firsts[0].max if firsts and firsts[0] is not None and firsts[0].dynamic else None
    return Signature(specs, batching=not why, why_not_batched=why, max_rows=max_rows)


# -- requests ------------------------------------------------------------------------------------------
def decode(body: bytes, content_type: str, sig: Signature, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> list[np.ndarray]:
    """The request's input arrays, checked against the signature (BadRequest otherwise). `.npy`/`.npz`
    arrays may hold at most `max_bytes` (413), checked from their headers before any data is read."""
    kind = (content_type or JSON).split(";")[0].strip().lower()
    if kind == NPY:
        arrays = [_read_npy(io.BytesIO(body), max_bytes, "the body")]
    elif kind == NPZ:
        arrays = _load_npz(body, sig, max_bytes)
    elif kind in (JSON, "text/json", ""):
        arrays = _load_json(body, sig)
    else:
        raise BadRequest(415, f"Content-Type {kind!r} is not served: send {JSON}, {NPZ} or {NPY}")
    return check(arrays, sig)


#: the longest .npy header read. numpy refuses one over 10,000 bytes (`max_header_size`), but only after
#: reading it whole, and a 2.0 header may declare 4 GiB: inflated from a 4 MB .npz member, that was 8 GB of
#: the ingress's memory for one request under the body limit
_MAX_NPY_HEADER = 10_000
#: .npy version -> (numpy's header reader, the header length field's struct format)
_NPY_HEADERS = {(1, 0): (np.lib.format.read_array_header_1_0, "<H"), (2, 0): (np.lib.format.read_array_header_2_0, "<I")}


def _read_npy(f: Any, max_bytes: int, what: str) -> np.ndarray:
    """One `.npy` array, its header checked before its data is read: np.load would allocate whatever
    shape the header declares (a 60-byte body declared terabytes) and, inside an .npz, inflate a member
    of any size first. Object arrays (pickles) are refused."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        header = _NPY_HEADERS.get(version)
        if header is None:
            raise ValueError(f".npy format version {version} (send 1.0 or 2.0)")
        read_header, length_format = header
        length_field = f.read(struct.calcsize(length_format))
        (length,) = struct.unpack(length_format, length_field)
        if length > _MAX_NPY_HEADER:
            raise BadRequest(400, f"{what} declares a .npy header of {length} bytes; numpy's are under {_MAX_NPY_HEADER} "
                                  f"(send arrays written by numpy.save / numpy.savez)")
        shape, fortran, dtype = read_header(io.BytesIO(length_field + f.read(length)))
    except BadRequest:
        raise
    except Exception as e:  # numpy raises ValueError/OSError/EOFError/SyntaxError for damaged headers
        raise BadRequest(400, f"{what} is not a readable .npy array ({type(e).__name__}: {e})") from None
    if dtype.hasobject:
        raise BadRequest(400, f"{what} holds Python objects ({dtype}): pickled data is never loaded; send numbers")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise BadRequest(413, f"{what} declares {nbytes} bytes of array data ({dtype}{list(shape)}), over the limit of "
                              f"{max_bytes}; split the batch or raise --max-body-bytes")
    data = f.read(nbytes)
    if len(data) != nbytes:
        raise BadRequest(400, f"{what} is a truncated .npy array: its header declares {nbytes} bytes, it holds {len(data)}")
    try:
        return np.frombuffer(bytearray(data), dtype).reshape(shape, order="F" if fortran else "C")
    except (ValueError, TypeError) as e:  # zero-size items and the like
        raise BadRequest(400, f"{what} is not a readable .npy array ({type(e).__name__}: {e})") from None


def _load_npz(body: bytes, sig: Signature, max_bytes: int) -> list[np.ndarray]:
    import zipfile

    files: dict[str, np.ndarray] = {}
    total = 0
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as z:
            for info in z.infolist():
                name = info.filename.removesuffix(".npy")
                if name in files or name == info.filename:
                    raise BadRequest(400, f"the .npz member {info.filename[:80]!r} is repeated or not a .npy array")
                with z.open(info) as f:
                    files[name] = a = _read_npy(f, max_bytes - total, f"the .npz member {info.filename[:80]!r}")
                total += a.nbytes
    except BadRequest:
        raise
    except Exception as e:  # zipfile raises BadZipFile, NotImplementedError (compression), RuntimeError (encrypted)...
        raise BadRequest(400, f"the body is not a readable .npz archive ({type(e).__name__}: {e})") from None
    names = [s.name for s in sig.inputs]
    if set(files) == set(names):
        return [files[n] for n in names]
    positional = [f"arr_{i}" for i in range(len(names))]
    if set(files) == set(positional):
        return [files[n] for n in positional]
    raise BadRequest(400, f"the .npz holds {sorted(files)}; expected the inputs {names} (or arr_0..arr_{len(names) - 1})")


def _load_json(body: bytes, sig: Signature) -> list[np.ndarray]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nesting deeper than the parser goes
        raise BadRequest(400, f"the body is not JSON ({type(e).__name__}: {str(e)[:200]})") from None
    values = doc.get("inputs") if isinstance(doc, dict) else None
    names = [s.name for s in sig.inputs]
    if isinstance(values, dict):
        if set(values) != set(names):
            raise BadRequest(400, f"'inputs' names {sorted(values)}; expected {names}")
        values = [values[n] for n in names]
    if not isinstance(values, list):
        raise BadRequest(400, 'expected a JSON object {"inputs": [one nested list per input]}')
    out = []
    for spec, v in zip(sig.inputs, values):
        try:
            a = np.asarray(v)
        except (ValueError, RecursionError) as e:  # ragged nesting, more dims than numpy takes
            raise BadRequest(400, f"input {spec.name}: not a rectangular array ({str(e)[:200]})") from None
        if a.dtype == object or a.dtype.kind in "USV":
            raise BadRequest(400, f"input {spec.name}: expected numbers, got {a.dtype.name} data "
                                  f"(ragged lists, strings, or integers beyond 64 bits)")
        out.append(a)
    if len(values) != len(sig.inputs):
        raise BadRequest(400, f"got {len(values)} inputs, the model takes {len(sig.inputs)} ({', '.join(names)})")
    return out


def check(arrays: Sequence[np.ndarray], sig: Signature) -> list[np.ndarray]:
    """Count, rank, sizes (static sizes exact, dynamic within bounds, a dim shared by several inputs the
    same in each), dtype kind, values (integers that fit the model's dtype and, where the signature
    bounds them, its table; floats finite)."""
    if len(arrays) != len(sig.inputs):
        raise BadRequest(400, f"got {len(arrays)} inputs, the model takes {len(sig.inputs)} "
                              f"({', '.join(s.describe() for s in sig.inputs)})")
    out = []
    seen: dict[str, tuple[int, str]] = {}  # dynamic dim name -> (size, the input that set it)
    for spec, a in zip(sig.inputs, arrays):
        want = _wire_dtype(spec)
        if a.ndim != len(spec.shape) or not all(d.accepts(n) for d, n in zip(spec.shape, a.shape)):
            raise BadRequest(400, f"input {spec.name}: shape {list(a.shape)} does not fit {spec.describe()}")
        # the program was compiled for equal sizes there: a runtime may read past the shorter input
        for i, (d, n) in enumerate(zip(spec.shape, a.shape)):
            if d.dynamic:
                size, other = seen.setdefault(d.name, (n, spec.name))
                if size != n:
                    raise BadRequest(400, f"input {spec.name}: dim {i} ({d.name}) is {n} where input {other}'s is {size}; "
                                          f"the inputs share that dim, so send them with the same size")
        if not _same_kind(a.dtype, want):
            raise BadRequest(400, f"input {spec.name}: {a.dtype.name} values where the model takes {spec.dtype}")
        if a.size and want.kind in "iu":
            _check_integers(spec, a, want)
        if a.size and want.kind == "f":
            _check_floats(spec, a, want)
        with np.errstate(over="ignore"):  # _check_floats refused every value the cast would overflow
            out.append(np.ascontiguousarray(a, dtype=want))
    return out


def _check_floats(spec: InputSpec, a: np.ndarray, want: np.dtype) -> None:
    """Finite values the model's dtype holds: NaN and infinities would turn a quantized region's whole row
    into NaN, and a float64 1e39 sent to a float32 input became inf (reported as a value "not finite")."""
    bad = ~np.isfinite(a)
    if not bad.any():
        with np.errstate(over="ignore"):
            bad = ~np.isfinite(a.astype(want))
        if not bad.any():
            return
        where = [int(i) for i in np.argwhere(bad)[0]]
        raise BadRequest(400, f"input {spec.name}: {a[tuple(where)]} at {where} is outside the range of {want.name}, "
                              f"which the model takes")
    where = [int(i) for i in np.argwhere(bad)[0]]
    raise BadRequest(400, f"input {spec.name}: a value that is not finite ({a[tuple(where)]}) at {where}; "
                          f"NaN and infinities are refused (a quantized region would turn the whole row into NaN)")


#: dtypes numpy itself has (ml_dtypes, once imported, adds float8 and bfloat16 names torch cannot read back)
_NUMPY_DTYPES = frozenset({"bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
                           "float16", "float32", "float64", "complex64", "complex128"})


def _wire_dtype(spec: InputSpec) -> np.dtype:
    """The numpy dtype an input travels as: its own, or float32 for bfloat16 (numpy has none)."""
    if spec.dtype == "bfloat16":
        return np.dtype(np.float32)
    if spec.dtype not in _NUMPY_DTYPES:
        raise TypeError(spec.dtype)
    return np.dtype(spec.dtype)


def _check_integers(spec: InputSpec, a: np.ndarray, want: np.dtype) -> None:
    """Integers the model's dtype holds (a cast would wrap them) and, when the input indexes a table, in
    its range: out of it an AOTI package's process aborts, onnxruntime counts from the end."""
    lo, hi = int(a.min()), int(a.max())
    info = np.iinfo(want)
    limits = (max(info.min, spec.values[0]), min(info.max, spec.values[1])) if spec.values else (info.min, info.max)
    if lo < limits[0] or hi > limits[1]:
        bad = lo if lo < limits[0] else hi
        where = [int(i) for i in np.argwhere(a == bad)[0]]
        why = "the rows of the table it indexes" if spec.values else f"what {spec.dtype} holds"
        raise BadRequest(400, f"input {spec.name}: value {bad} at {where} is outside [{limits[0]}, {limits[1]}] ({why})")


def _same_kind(have: np.dtype, want: np.dtype) -> bool:
    if want.kind == "f":
        return have.kind in "fiub"
    if want.kind in "iu":
        return have.kind in "iub"
    if want.kind == "b":
        return have.kind == "b"
    return have == want


def encode(outputs: Sequence[np.ndarray], accept: str, request_kind: str) -> tuple[bytes, str]:
    """The response body: .npz when asked for (Accept or the request's own format), else JSON."""
    binary = NPZ in (accept or "") or request_kind.split(";")[0].strip().lower() in (NPZ, NPY)
    if binary:
        buf = io.BytesIO()
        np.savez(buf, *outputs)
        return buf.getvalue(), NPZ
    doc = {"outputs": [o.tolist() for o in outputs], "shapes": [list(o.shape) for o in outputs],
           "dtypes": [o.dtype.name for o in outputs]}
    return json.dumps(doc).encode(), JSON


def model_inputs(arrays: Sequence[np.ndarray], sig: Signature) -> list[Any]:
    """Checked arrays as the tensors the model takes: numpy has no bfloat16, so such inputs travel as
    float32 and take the model's dtype here (an AOTI package refuses float32 there)."""
    import torch

    tensors = [torch.from_numpy(a) for a in arrays]
    return [t if t.dtype == s.torch_dtype else t.to(s.torch_dtype) for t, s in zip(tensors, sig.inputs)]


# -- batching -------------------------------------------------------------------------------------------
def run_batched(call, requests: Sequence[list[np.ndarray]], max_rows: int | None) -> list[list[np.ndarray]]:
    """Run requests that share shapes beyond dim 0 as one call (chunks of at most `max_rows` rows),
    splitting every output along dim 0; requests whose outputs do not follow dim 0 run alone."""
    results: list[list[np.ndarray] | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for i, arrays in enumerate(requests):
        groups.setdefault(tuple((a.dtype.str, a.shape[1:]) for a in arrays), []).append(i)
    for members in groups.values():
        chunk: list[int] = []
        rows = 0
        for i in members:
            n = requests[i][0].shape[0]
            if chunk and max_rows is not None and rows + n > max_rows:
                _run_chunk(call, requests, chunk, results)
                chunk, rows = [], 0
            chunk.append(i)
            rows += n
        _run_chunk(call, requests, chunk, results)
    return results  # type: ignore[return-value]


def _run_chunk(call, requests, chunk: list[int], results: list) -> None:
    if not chunk:
        return
    if len(chunk) == 1:
        results[chunk[0]] = call(requests[chunk[0]])
        return
    sizes = [requests[i][0].shape[0] for i in chunk]
    stacked = [np.concatenate([requests[i][k] for i in chunk]) for k in range(len(requests[chunk[0]]))]
    outs = call(stacked)
    if not all(o.ndim and o.shape[0] == sum(sizes) for o in outs):  # an output that does not follow the batch
        for i in chunk:
            results[i] = call(requests[i])
        return
    bounds = np.cumsum([0, *sizes])
    for j, i in enumerate(chunk):
        results[i] = [o[bounds[j]:bounds[j + 1]] for o in outs]


# -- Ray Serve ------------------------------------------------------------------------------------------
def _ray():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise BackendUnavailableError(f"qexport serve needs Ray Serve: pip install 'qexport[serve]' ({e})") from None
    return ray, serve


def _load_once(config: ServeConfig) -> str:
    """Load the artifact here, before Ray starts anything, and return its SHA-256, which every replica
    pins. A file any loader check refuses (a damaged member, a pickle, a package for another CPU) had
    started a cluster whose replicas then failed; and each replica read whatever the path held when it
    started, so a file replaced meanwhile was served by some replicas and not others."""
    from serializers.files import file_sha256, pinned_digest

    from . import runners

    path = Path(config.path)
    digest = pinned_digest(config.expected_sha256) or file_sha256(path)
    runners.load(path, expected_sha256=digest)
    return digest


def build_app(config: ServeConfig):
    """The Ray Serve application for `config` (bind it with `serve.run`). Reads and checks the
    artifact's manifest here, so a bad path or an unservable artifact fails before Ray starts anything."""
    import serializers

    config = config.check()
    manifest = serializers.inspect(config.path)
    sig = signature(manifest)
    digest = _load_once(config)
    ray, serve = _ray()
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    path = os.path.abspath(os.fspath(config.path))  # replicas may start in another working directory
    info = {
        "artifact": manifest.artifact, "path": path, "qexport_version": manifest.qexport_version,
        "inputs": [s.to_json() for s in sig.inputs], "batching": sig.batching,
        "why_not_batched": sig.why_not_batched, "config": asdict(config),
        "regions": [{"name": r.name, "op": r.op, "scheme": r.scheme.name, "describe": r.scheme.describe()} for r in manifest.regions],
        "lowering": {r.name: r.lowering.to_dict() for r in manifest.regions if r.lowering is not None} or None,
    }
    max_rows = min(config.max_batch, sig.max_rows) if sig.max_rows is not None else config.max_batch

    # Serve's default of 5 requests in flight per replica makes its router back off and retry as soon as
    # clients outnumber that (64 clients: 8 req/s where 1 client got 57): requests wait in the replica's
    # queue instead, where a batching replica also needs a batch's worth of them.
    @serve.deployment(num_replicas=config.replicas, max_ongoing_requests=max(64, 2 * config.max_batch),
                      ray_actor_options={"num_cpus": 0})
    class Model:
        def __init__(self) -> None:
            from . import runners
            import torch

            self.runner = runners.load(path, expected_sha256=digest)  # the bytes _load_once checked
            self.torch = torch
            self.batches: list[int] = []
            self.run.set_max_batch_size(max(1, config.max_batch if sig.batching else 1))
            self.run.set_batch_wait_timeout_s(config.batch_wait_ms / 1e3)

        def _call(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
            outs = self.runner(model_inputs(arrays, sig))
            return [o.detach().float().numpy() if o.dtype == self.torch.bfloat16 else o.detach().numpy() for o in outs]

        @serve.batch(max_batch_size=1)
        async def run(self, requests: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
            self.batches.append(len(requests))
            return run_batched(self._call, requests, max_rows)

        async def __call__(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
            return await self.run(arrays)

        def stats(self) -> dict[str, Any]:
            return {"pid": os.getpid(), "batches": len(self.batches), "requests": sum(self.batches),
                    "largest_batch": max(self.batches, default=0)}

    app = FastAPI(title="qexport serve", description=f"{manifest.artifact} artifact {os.path.basename(path)}")

    @serve.deployment(num_replicas=1, max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Ingress:
        def __init__(self, model) -> None:
            self.model = model

        @app.get("/health")
        async def health(self) -> dict[str, str]:
            return {"status": "ok"}

        @app.get("/info")
        async def info(self) -> dict[str, Any]:
            return info

        @app.get("/stats")
        async def stats(self) -> dict[str, Any]:
            return await self.model.stats.remote()

        @app.post("/predict")
        async def predict(self, request: Request):
            try:
                length = int(request.headers.get("content-length") or 0)
            except ValueError:
                return JSONResponse({"error": "a Content-Length that is not a number"}, status_code=400)
            if length > config.max_body_bytes:
                return JSONResponse({"error": f"the body ({length} bytes) is over the limit of {config.max_body_bytes}; "
                                              f"split the batch or raise --max-body-bytes"}, status_code=413)
            body = bytearray()
            async for chunk in request.stream():  # a chunked body declares no length: stop at the limit
                body += chunk
                if len(body) > config.max_body_bytes:
                    return JSONResponse({"error": f"the body is over the limit of {config.max_body_bytes} bytes"},
                                        status_code=413)
            kind = request.headers.get("content-type", JSON)
            try:
                arrays = decode(bytes(body), kind, sig, config.max_body_bytes)
            except BadRequest as e:
                return JSONResponse({"error": str(e)}, status_code=e.status)
            outputs = await self._with_retries(arrays)
            if isinstance(outputs, Response):
                return outputs
            data, media = encode(outputs, request.headers.get("accept", ""), kind)
            return Response(content=data, media_type=media)

        async def _with_retries(self, arrays):
            from ray.exceptions import RayActorError

            unavailable = (RayActorError,) + tuple(
                e for e in (getattr(ray.exceptions, "ActorUnavailableError", None),) if e is not None)
            for attempt in range(config.retries + 1):
                try:
                    return await self.model.remote(arrays)
                except unavailable:  # the replica died under the request: another one takes it
                    await asyncio.sleep(0.05 * 2 ** attempt)
                except Exception as e:  # the model itself failed on a valid request
                    return JSONResponse({"error": f"the model failed: {type(e).__name__}: {str(e)[:500]}"}, status_code=500)
            return JSONResponse({"error": "no model replica answered; retry the request"}, status_code=503,
                                headers={"Retry-After": "1"})

    return Ingress.bind(Model.bind())


def run(config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
        blocking: bool = True, ready: Callable[[str], None] | None = None) -> str:
    """Start (or join, with `address`) a Ray cluster and serve the artifact; returns the base URL, and
    calls `ready(url)` once it answers. With blocking=True it serves until interrupted (Ctrl-C or
    SIGTERM), then deletes the application and stops the Ray cluster it started."""
    app = build_app(config)
    ray, serve = _ray()
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise UsageError(f"port={port!r}: must be an int in [1, 65535]")
    connected = not ray.is_initialized()  # this call connects to (and without an address, starts) a cluster
    if connected:
        if address is None:
            _check_can_listen(host, port)
        elif ":" in address and "://" not in address:
            _check_reachable(address)
        # a cluster of one started here stays on loopback; joining one uses the cluster's own addresses
        local = {"num_cpus": max(2, os.cpu_count() or 2), "_node_ip_address": "127.0.0.1"}
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, **({} if address else local))
        except (ConnectionError, RuntimeError, ValueError) as e:
            how = ("leave --address out to start a local one, or start one first (ray start --head); a cluster "
                   "`ray start` started checks a token: join it with RAY_AUTH_MODE=token and its token in "
                   "~/.ray/auth_token or RAY_AUTH_TOKEN") if address else "see Ray's log lines above"
            raise UsageError(f"could not start or join a Ray cluster (address={address!r}): {str(e)[:300]}; {how}") from None
    url = f"http://{host}:{port}"
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(app, name="qexport", route_prefix="/")
        except RuntimeError as e:
            raise _deploy_failure(serve, e) from None
        if ready is not None:
            ready(url)
        if blocking:
            _wait_for_a_stop()
    except BaseException:
        blocking = True  # whatever stopped it, leave nothing running
        raise
    finally:
        if blocking:
            _stop(ray, serve, connected, own_cluster=connected and address is None)
    return url


def _deploy_failure(serve, e: RuntimeError) -> QExportError:
    """Serve reports replicas that fail to start as "Failed to update the deployments ['Model']"; their
    own error (an artifact this node cannot load: compiled for another CPU, damaged since it was
    inspected) ends the deployment's status message."""
    from .errors import ArtifactError

    try:
        messages = [d.message for d in serve.status().applications["qexport"].deployments.values() if d.message.strip()]
    except Exception:  # no status to read: Serve's own message is all there is
        messages = []
    cause = messages[0].strip().splitlines()[-1] if messages else str(e)
    return ArtifactError(f"the model replicas could not start: {cause[:1000]}")


def _check_can_listen(host: str, port: int) -> None:
    """Fail before Ray starts: Serve's proxy finds a busy port only after the cluster is up (~15 s), and
    then as a traceback from inside an actor."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind(infos[0][4])
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e}): pick another --port, or a --host of this "
                         f"machine") from None


def _check_reachable(address: str) -> None:
    """Ray retries an unreachable head node for minutes before it gives up: ask once, briefly."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
            pass
    except (OSError, ValueError) as e:
        raise UsageError(f"no Ray head node answers at {address} ({getattr(e, 'strerror', None) or e}): start it there "
                         f"with `ray start --head`, or fix --address") from None


def _wait_for_a_stop() -> None:
    import signal
    import threading
    import time

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM (a service manager, `kill`) ended the process at once and left Ray's agents running
    # (reparented to init): it stops the server the way Ctrl-C does.
    stops = (signal.SIGTERM,) if threading.current_thread() is threading.main_thread() else ()
    previous = {s: signal.signal(s, interrupt) for s in stops}
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stop(ray, serve, connected: bool, own_cluster: bool) -> None:
    """Stop what this run started: Serve and the whole Ray cluster if it started one, else only its
    application (Serve on a joined cluster may hold other applications), and disconnect."""
    try:
        if own_cluster:
            serve.shutdown()
        else:
            serve.delete("qexport")
    except Exception:  # cleanup after a failed start: the error that stopped it is the one to report
        pass
    finally:
        if connected:
            ray.shutdown()


__all__ = ["BadRequest", "ServeConfig", "Signature", "build_app", "check", "decode", "encode", "model_inputs", "run", "run_batched",
           "signature"]
