"""`quantize(model, recipe)`: swap the weight-bearing layers of a model for modules that run one region each.

Layers taken: `nn.Linear` and its subclasses, transformers' `Conv1D` (GPT-2's projections, a Linear
with its weight stored [in, out]), `nn.Conv1d`, `nn.Conv2d` and `nn.Embedding`. The float weights are
dropped; the quantized tensors are buffers (so `state_dict`, `.pt2` files and memory shrink
accordingly). A parameter shared by several layers (GPT-2's tied `wte` / `lm_head`) is quantized once
and its tensors are shared by every region that reads it. Every check runs before the first module is
touched, and the model gets a `QuantizationSummary` (`model.qexport_summary`) saying what was
quantized and what was skipped, and why.
"""

from __future__ import annotations

import fnmatch
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch
from torch import nn

from . import validate
from .errors import (
    CalibrationError, InvalidSchemeError, NothingToQuantizeError, QExportError, QuantizedWeightError,
    UnsupportedModuleError, UsageError,
)
from .regions import invoke_quant
from .schemes import ALGORITHMS, Scheme, get as get_scheme, make_region_fn, math_for
from .schemes.activation import int8_asym_qparams

FilterFn = Callable[[nn.Module, str], bool]
#: a scheme for every layer it can take, or {nn.Module subclass | module-name glob: scheme or None}
Recipe = Union[str, Scheme, Mapping[Union[type, str], Union[str, Scheme, None]]]

# Weight-bearing layers with no region op (yet): reported as skipped; selecting one with filter_fn is an error.
_UNSUPPORTED_LAYERS = (nn.modules.conv._ConvNd, nn.EmbeddingBag, nn.RNNBase, nn.Bilinear)


#: the dtypes a float tensor (a scale, a bias) may be loaded from with a cast; codes must match exactly
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# -- the layers a region can replace ------------------------------------------------------------------

def _hf_conv1d() -> type | None:
    """transformers' Conv1D class if transformers is loaded (a model built from it has loaded it):
    qexport never imports transformers itself."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None)


@dataclass(frozen=True)
class _Layer:
    """How one kind of layer becomes a region: its op and its weight in the op's layout."""

    op: str
    transposed: bool = False  # weight stored [in, out] (transformers' Conv1D): the region takes weight.T

    def weight(self, m: nn.Module) -> torch.Tensor:
        w = m.weight.detach()
        return w.t().contiguous() if self.transposed else w

    def attributes(self, m: nn.Module) -> dict[str, Any]:
        """The float layer's hyperparameters (torch's `__constants__`: `in_features`, `kernel_size`,
        `padding_idx`, ...; Conv1D's `nf`/`nx`), which model code reads beside `.weight`."""
        names = ("nf", "nx") if self.transposed else getattr(type(m), "__constants__", ())
        return {n: getattr(m, n) for n in names if hasattr(m, n) and not isinstance(getattr(m, n), torch.Tensor)}

    def params(self, m: nn.Module) -> dict[str, Any]:
        dtype = str(m.weight.dtype).removeprefix("torch.")
        if self.op in ("conv1d", "conv2d"):
            return {
                "stride": list(m.stride),
                "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
                "dilation": list(m.dilation),
                "groups": m.groups,
                "out_dtype": dtype,
            }
        if self.op == "embedding":
            return {"padding_idx": m.padding_idx, "out_dtype": dtype}
        return {"out_dtype": dtype}


_LINEAR, _CONV1D_HF = _Layer("linear"), _Layer("linear", transposed=True)
_LAYERS: dict[type, _Layer] = {
    nn.Linear: _LINEAR, nn.Conv1d: _Layer("conv1d"), nn.Conv2d: _Layer("conv2d"), nn.Embedding: _Layer("embedding"),
}


def _layer_of(m: nn.Module) -> tuple[_Layer | None, str]:
    """The layer kind of `m`, or None and why it is not one (empty for modules that carry no weight).
    A subclass counts as its base layer when it keeps the base's forward: library wrappers, and
    torch's parametrized layers (`weight_norm` in wav2vec2 / HuBERT's positional conv), whose weight
    the region takes as computed."""
    hf = _hf_conv1d()
    if hf is not None and isinstance(m, hf):
        return _CONV1D_HF, ""
    base = _base_of(m)
    if base is not None:
        return (_LAYERS[base], "") if type(m).forward is base.forward else (None, _overrides_forward(m, base))
    if isinstance(m, _UNSUPPORTED_LAYERS):
        return None, f"{type(m).__name__} has no region op (qexport quantizes Linear, Conv1D, Conv1d, Conv2d, Embedding)"
    return None, _stacked_weights(m)


def _stacked_weights(m: nn.Module) -> str:
    """Why a module that holds stacks of weight matrices as its own parameters stays float, or "".
    transformers 5 stores a mixture-of-experts block's experts so (Mixtral, Qwen3-MoE, DeepSeek:
    `gate_up_proj [experts, 2 * inter, hidden]`) and its forward indexes them itself: no layer a region
    could replace, and most of such a model's weights, which the summary must not leave unmentioned."""
    stacks = [f"{n} {list(p.shape)}" for n, p in m.named_parameters(recurse=False)
              if p.dtype.is_floating_point and p.dim() >= 3 and p.shape[0] > 1]
    if not stacks:
        return ""
    return (f"its own forward reads stacked weight matrices ({', '.join(stacks)}; e.g. fused mixture-of-experts), "
            f"which no region op takes: they stay float")


def _overrides_forward(m: nn.Module, base: type) -> str:
    kind = type(m).__name__
    return (f"{kind} overrides nn.{base.__name__}.forward; replacing it would drop its own computation. If its forward computes "
            f"exactly what {base.__name__}'s does, name its class in a recipe: {{{kind}: scheme}} "
            f"(qexport export: --recipe {kind}=SCHEME)")


def _base_of(m: nn.Module) -> type | None:
    """The torch layer class (a key of _LAYERS) that `m` is or subclasses, or None."""
    return next((base for base in _LAYERS if isinstance(m, base)), None)


def _read_directly(model: nn.Module) -> dict[str, str]:
    """fqn -> why: layers whose weight their parent reads without calling them (replacing them would
    change nothing the parent computes, or break it)."""
    out = {}
    for fqn, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            out[fqn] = "its in_proj weights are parameters of the attention, not layers a region can replace"
            out[f"{fqn}.out_proj" if fqn else "out_proj"] = (
                "nn.MultiheadAttention reads out_proj.weight directly instead of calling the layer")
    return out


# -- recipes ----------------------------------------------------------------------------------------

def _type_key_mro(m: nn.Module) -> tuple[type, ...]:
    """The classes a type key is matched against: transformers' Conv1D counts as an nn.Linear."""
    mro = type(m).__mro__
    hf = _hf_conv1d()
    return (type(m), nn.Linear, *mro[1:]) if hf is not None and isinstance(m, hf) else mro


class _RecipeTable:
    """Which scheme each module gets. Precedence (first that applies wins):
    1. a name key equal to the module's fully qualified name (any of them, for a module registered twice);
    2. the first name key (in the mapping's order) that matches it as a glob (`fnmatch`: `*` spans dots);
    3. the type key nearest the module's class in its MRO (`nn.Linear` also matches subclasses and
       transformers' Conv1D);
    4. nothing: the module is left as is ("no recipe entry").
    A value of None leaves the matched modules unquantized."""

    def __init__(self, recipe: Recipe, algorithm: str | None = None) -> None:
        self.single: Scheme | None = None
        self.names: list[tuple[str, Scheme | None]] = []
        self.used: set[str] = set()  # name keys that matched a weight layer
        self.types: dict[type, Scheme | None] = {}
        self._fill(recipe)
        if algorithm is not None:
            self._apply_algorithm(algorithm)

    def _fill(self, recipe: Recipe) -> None:
        if isinstance(recipe, (str, Scheme)):
            self.single = get_scheme(recipe)
            return
        if not isinstance(recipe, Mapping) or not recipe:
            raise UnsupportedModuleError(
                f"a recipe is a scheme (name or qexport.Scheme) or a non-empty dict {{nn.Module type or module-name "
                f"glob: scheme}}, got {recipe!r}"[:300])
        for key, value in recipe.items():
            scheme = None if value is None else get_scheme(value)
            if isinstance(key, str):
                self.names.append((key, scheme))
            elif isinstance(key, type) and issubclass(key, nn.Module):
                self.types[key] = scheme
            else:
                raise UnsupportedModuleError(
                    f"recipe key {key!r}: a key is an nn.Module subclass (e.g. nn.Linear) or a module-name glob "
                    f"(e.g. 'lm_head' or 'encoder.*.attn.*')")

    def _apply_algorithm(self, algorithm: str) -> None:
        """`quantize(..., algorithm=)`: every scheme of the recipe whose family offers the algorithm uses
        it (an int4 recipe with int8 embeddings: the int4 layers); none offering it is an error."""
        def apply(s: Scheme | None) -> Scheme | None:
            return s if s is None or algorithm not in math_for(s).algorithms else get_scheme(s, algorithm=algorithm)

        if algorithm not in ALGORITHMS:
            raise InvalidSchemeError(f"algorithm={algorithm!r} is not one of {ALGORITHMS}")
        offered = [s for s in self.schemes() if algorithm in math_for(s).algorithms]
        if not offered:
            from .schemes import names as scheme_names

            takers = [n for n in scheme_names() if algorithm in math_for(get_scheme(n)).algorithms]
            raise InvalidSchemeError(
                f"algorithm={algorithm!r}: no scheme of the recipe ({', '.join(sorted({s.name for s in self.schemes()}))}) "
                f"offers it; schemes that do: {', '.join(takers) or 'none'}"
            )
        self.single = apply(self.single)
        self.names = [(k, apply(s)) for k, s in self.names]
        self.types = {k: apply(s) for k, s in self.types.items()}

    def unmatched(self, model: nn.Module) -> tuple[str, ...]:
        """The name keys that decided no weight layer, each with why: a typo, or a container's name (a
        name key selects that module only; the layers under it need a glob)."""
        containers = {fqn for fqn, _ in model.named_modules()}
        return tuple(
            f"{key!r} matched no weight layer" + (f" (it is a container: select the layers under it with '{key}.*')"
                                                if key in containers else "")
            for key, _ in self.names if key not in self.used)

    def schemes(self) -> list[Scheme]:
        found = [self.single] if self.single else [s for _, s in self.names] + list(self.types.values())
        return [s for s in found if s is not None]

    def lookup(self, names: Sequence[str], m: nn.Module) -> "_Match | None":
        """The entry that decides `m`'s scheme, None if no entry does. `names` are all its paths (a module
        registered twice, `self.head = self.blocks[-1]`, answers to a key naming either)."""
        if self.single is not None:
            return _Match(self.single, "", exact=False)
        for key, s in self.names:
            if key in names:
                self.used.add(key)
                return _Match(s, repr(key), exact=True)
        for key, s in self.names:
            if any(fnmatch.fnmatchcase(fqn, key) for fqn in names):
                self.used.add(key)
                return _Match(s, repr(key), exact=False)
        for cls in _type_key_mro(m):
            if cls in self.types:
                return _Match(self.types[cls], cls.__name__, exact=False, names_class=cls is type(m))
        return None


@dataclass(frozen=True)
class _Match:
    scheme: Scheme | None
    entry: str  # the recipe key, as the summary names it
    exact: bool  # a key naming the module exactly selects it: refusing it is an error, not a skip
    names_class: bool = False  # a type key equal to the module's own class


def _weight_only(scheme: Scheme) -> Scheme:
    """The scheme's weights with float activations (what an embedding tied to its linear can take)."""
    return scheme if scheme.activation == "none" else scheme.replace(
        activation="none", act_dtype=None, act_granularity=None, act_symmetric=None)


def _for_op(scheme: Scheme, op: str) -> Scheme:
    """The scheme a region records: conv activations have no token axis, so a per-token dynamic scheme
    quantizes them per tensor (schemes/_region.py), and the region says so. GPTQ fits a linear's
    weights to the Hessian of its inputs; an embedding's output is its rows, with no reduction over
    inputs to trade errors across, and a conv's inputs would first have to be unfolded into patches,
    so under gptq those take the family's calibration-free algorithm (hqq, mse), and record that."""
    if op.startswith("conv") and scheme.activation == "dynamic" and scheme.act_granularity == "per_token":
        scheme = scheme.replace(act_granularity="per_tensor")
    if op != "linear" and scheme.algorithm == "gptq":
        scheme = scheme.replace(algorithm=math_for(scheme).calibration_free_algorithm)
    return scheme


def _weight_key(scheme: Scheme) -> tuple:
    """Schemes with equal keys quantize a weight onto the same grid (so tied layers can share its
    tensors, whichever algorithm chose the codes)."""
    return (scheme.family, scheme.weight_dtype, scheme.bits, scheme.granularity, scheme.group_size,
            scheme.symmetric, scheme.qmin, scheme.qmax)


# -- the summary ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerDecision:
    """What quantize() did with one weight-bearing layer."""

    module: str
    layer_type: str
    op: str | None
    scheme: Scheme | None  # None: skipped
    reason: str = ""  # why skipped (or a note on a quantized one, e.g. its tied weight)
    tied_to: str | None = None  # the layer whose quantized tensors this one shares


@dataclass(frozen=True)
class QuantizationSummary:
    """Every weight-bearing layer quantize() saw: what was quantized (with which scheme) and what was
    skipped and why. `str()` gives the per-type table the CLI prints."""

    decisions: tuple[LayerDecision, ...] = field(default_factory=tuple)
    #: recipe name keys that decided no layer (a typo; a container's name, whose layers need a glob)
    unmatched_keys: tuple[str, ...] = ()

    @property
    def quantized(self) -> list[LayerDecision]:
        return [d for d in self.decisions if d.scheme is not None]

    @property
    def skipped(self) -> list[LayerDecision]:
        return [d for d in self.decisions if d.scheme is None]

    def rows(self) -> list[tuple[str, int, str, str]]:
        """(layer type, count, scheme or 'skipped', reason or note), one row per distinct group."""
        groups = Counter(
            (d.layer_type, d.scheme.describe() if d.scheme else "skipped",
             d.reason if d.scheme is None or not d.tied_to else f"tied weight shared with {d.tied_to}")
            for d in self.decisions
        )
        return [(t, n, s, why) for (t, s, why), n in groups.items()]

    def __str__(self) -> str:
        from .table import format_table

        head = f"quantized {len(self.quantized)} of {len(self.decisions)} weight layers"
        rows = [[t, str(n), s, why] for t, n, s, why in self.rows()]
        unmatched = "".join(f"\nrecipe key {why}" for why in self.unmatched_keys)
        return head + "\n" + format_table(["layer type", "count", "scheme", "note"], rows) + unmatched


# -- the quantized module ---------------------------------------------------------------------------

class FloatWeightStandIn(torch.Tensor):
    """What `.weight` of a quantized layer answers: the float weight's dtype, shape and device, and no
    values. Model code reads a layer's weight for its metadata (transformers casts inputs to
    `layer.weight.dtype` in ~150 modeling files: ViT's patch embedding, T5's `wo`), and that must see
    the float layer's answer, not the codes'; the values live in the region's tensors
    (`QuantizedModule.tensors()`), so anything that would read them raises instead of computing on
    something else. A storage-less wrapper subclass (as torchao's float-dtype quantized weights):
    metadata queries never dispatch, every op does, and it is built on access, so nothing of it
    reaches a state_dict or an exported graph."""

    _where: str
    _scheme: str

    @staticmethod
    def __new__(cls, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, where: str, scheme: str):
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=False)
        t._where, t._scheme = where, scheme
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Under torch.export's fake and proxy modes an op on a stand-in never reaches __torch_dispatch__:
        # the modes answer NotImplemented for a subclass they do not know, and the user sees "Unable to
        # cast NotImplemented to Tensor" (DeBERTa reads rel_embeddings.weight). Any op that fails on a
        # stand-in failed for want of values: say so here, where the stand-in is still in hand.
        try:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        except QuantizedWeightError:
            raise
        except Exception as e:
            raise cls._needs_values(args, kwargs, func) from e

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise cls._needs_values(args, kwargs, func)

    @classmethod
    def _needs_values(cls, args, kwargs, func) -> QuantizedWeightError:
        stand_in = next(a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, cls))
        return QuantizedWeightError(
            f"{stand_in._where}.weight is quantized ({stand_in._scheme}): it answers dtype, shape and device "
            f"as the float weight did but holds no values, and {getattr(func, '__name__', func)} needs them. If the "
            f"model computes with this weight itself, leave the layer float: quantize(model, {{..., "
            f"{stand_in._where!r}: None}}); the quantized tensors are model.get_submodule({stand_in._where!r}).tensors()"
        )

    def __repr__(self) -> str:
        return (f"FloatWeightStandIn(shape={list(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"layer={self._where!r}, scheme={self._scheme!r})")

    def __deepcopy__(self, memo: dict) -> "FloatWeightStandIn":
        return FloatWeightStandIn(tuple(self.shape), self.dtype, self.device, self._where, self._scheme)


def _no_layers(model: nn.Module) -> str:
    done = sum(isinstance(m, QuantizedModule) for m in model.modules())
    if done:  # quantize() replaced them in place: a second call sees no float layer
        return (f"its {done} weight layers are already quantized (QuantizedModule); quantize a fresh copy of the "
                f"float model to try another scheme")
    if isinstance(model, torch.fx.GraphModule):
        # PT2E quantizes the exported graph (prepare_pt2e(ep.module(), ...)); qexport the eager model
        return ("it is a traced or exported graph (ep.module()?), whose layers are graph ops, not modules to "
                "replace: quantize the eager model, then export it (qexport.quantize(model, scheme); "
                "qexport.export(model, args))")
    return "the model has no Linear, Conv1D, Conv1d, Conv2d or Embedding layer"


class QuantizedModule(nn.Module):
    """A Linear / Conv1D / Conv1d / Conv2d / Embedding whose forward is one `invoke_quant` region.

    Its buffers are the region's tensors by role (`tensors()`; `state_dict` keys `<path>.weight`,
    `<path>.weight_scale`, ...). Attribute access answers as the float layer did: `.weight` is a
    `FloatWeightStandIn` (the float dtype, shape and device), the layer's hyperparameters
    (`in_features`, `kernel_size`, `padding_idx`, Conv1D's `nf`, ...) are kept, and `.bias` is None
    when the layer had none."""

    def __init__(
        self,
        scheme: Scheme,
        op: str,
        op_params: Mapping[str, Any],
        weight_shape: tuple[int, ...],
        tensors: Mapping[str, torch.Tensor],
        module_path: str,
        *,
        float_weight_shape: tuple[int, ...] | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.op = op
        self.op_params = dict(op_params)
        self.weight_shape = tuple(weight_shape)
        self.float_weight_shape = tuple(float_weight_shape or weight_shape)
        self.module_path = module_path
        self.roles = tuple(tensors)
        for role, t in tensors.items():
            self.register_buffer(role, t)
        if op != "embedding" and "bias" not in tensors:
            self.register_buffer("bias", None)
        for name, value in (attributes or {}).items():
            if not hasattr(self, name):
                setattr(self, name, value)
        self._region = make_region_fn(scheme, op, self.op_params, self.roles, self.weight_shape)

    @property
    def weight(self) -> torch.Tensor:
        codes = self._buffers.get("weight")
        if codes is None:  # during __init__: register_buffer("weight") asks hasattr first
            raise AttributeError("weight")
        dtype = getattr(torch, self.op_params.get("out_dtype", "float32"))
        if torch.compiler.is_dynamo_compiling():  # Dynamo cannot trace _make_wrapper_subclass; export() drops it
            return torch.empty(self.float_weight_shape, dtype=dtype, device=codes.device)
        return FloatWeightStandIn(self.float_weight_shape, dtype, codes.device, self.module_path, self.scheme.describe())

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight" and isinstance(value, FloatWeightStandIn):
            # transformers' tie_weights() assigns one layer's .weight to another: after quantize() that
            # would put a value-less stand-in where the codes are (quantize() ties shared weights itself)
            raise UnsupportedModuleError(
                f"{self.module_path}.weight = {value._where}.weight: both layers are quantized, and a quantized "
                f"weight cannot be reassigned; tie the weights before quantize(), which quantizes a shared "
                f"weight once for every layer that reads it"
            )
        super().__setattr__(name, value)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The region's tensors by role (the codes are `tensors()["weight"]`)."""
        return {r: self._buffers[r] for r in self.roles}

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "QuantizedModule":
        # model.to(torch.bfloat16) / .half() cast every floating tensor, and here those are the scheme's: fp8
        # codes became bf16 (twice the bytes, no longer float8 weights), nf4's codebook and the scales were
        # rounded (other numerics than the scheme's). They keep their dtype and values and follow the device;
        # the layer answers in the new float dtype, as the float layer would (its output, `.weight.dtype`)
        kept = {r: t for r, t in self.tensors().items() if r != "bias" and t.is_floating_point()}
        out_dtype = getattr(torch, self.op_params.get("out_dtype", "float32"))
        super()._apply(fn, recurse)
        for role, t in kept.items():
            now = self._buffers[role]
            if now.dtype != t.dtype:
                self._buffers[role] = t.to(now.device)
        new_dtype = fn(torch.empty((), dtype=out_dtype, device=self._buffers["weight"].device)).dtype
        if new_dtype != out_dtype and new_dtype.is_floating_point:
            self.op_params["out_dtype"] = str(new_dtype).removeprefix("torch.")
            self._region = make_region_fn(self.scheme, self.op, self.op_params, self.roles, self.weight_shape)
        return self

    def __getstate__(self) -> dict[str, Any]:
        # the region function is a closure, which pickle cannot store (torch.save(model) failed with a
        # PicklingError); it is made again from the scheme on load
        state = dict(super().__getstate__())
        state.pop("_region", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._region = make_region_fn(self.scheme, self.op, self.op_params, self.roles, self.weight_shape)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # torch copies a float checkpoint's weight into the int8 codes, casting it (every code 0), and
        # strict=False reports only the missing scales: a float state_dict loaded after quantize()
        for role, t in self.tensors().items():
            given = state_dict.get(prefix + role)
            if not isinstance(given, torch.Tensor):
                continue
            codes = t.dtype not in _FLOAT_DTYPES or given.dtype not in _FLOAT_DTYPES
            if given.shape != t.shape or (codes and given.dtype != t.dtype):
                raise QuantizedWeightError(
                    f"{prefix}{role}: the state_dict holds {given.dtype} {list(given.shape)}, but this layer is quantized "
                    f"({self.scheme.describe()}) and its {role} is {t.dtype} {list(t.shape)}. Load a float checkpoint "
                    f"before quantize() (model.load_state_dict(...), then qexport.quantize(model, ...)), or a "
                    f"state_dict saved from a model quantized the same way"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op != "embedding" and not x.dtype.is_floating_point:
            # computing on integers would be silently wrong (an integer example input)
            raise UnsupportedModuleError(
                f"{self.module_path}: the quantized {self.op} gets a {x.dtype} activation: pass floating-point "
                f"inputs (e.g. x.float())"
            )
        return invoke_quant(
            self._region,
            x,
            *self.tensors().values(),
            scheme=self.scheme,
            op=self.op,
            op_params=self.op_params,
            module=self.module_path,
            roles=("input", *self.roles),
            weight_shape=self.weight_shape,
        )[0]

    def quantized_bytes(self) -> int:
        return sum(t.nbytes for r, t in self.tensors().items() if r != "bias")

    def float_bytes(self) -> int:
        n = 1
        for d in self.weight_shape:
            n *= d
        return n * getattr(torch, self.op_params.get("out_dtype", "float32")).itemsize

    def extra_repr(self) -> str:
        return f"{self.op}, weight={list(self.weight_shape)}, scheme={self.scheme.describe()}"


# -- selection --------------------------------------------------------------------------------------

@dataclass
class _Choice:
    fqn: str
    module: nn.Module
    layer: _Layer
    scheme: Scheme
    tied_to: str | None = None


def _plan(
    model: nn.Module, table: _RecipeTable, filter_fn: FilterFn | None, aliases: Mapping[int, list[str]]
) -> tuple[list[_Choice], list[LayerDecision]]:
    """The layers to quantize (with their scheme) and the decision for every weight-bearing layer;
    `aliases` is `_alias_paths(model)`, every name of each module.

    An explicit selection (filter_fn, a recipe key equal to the module's name) of something that cannot be
    quantized is an error; a layer merely not taken by the default selection is reported as skipped."""
    read_directly = _read_directly(model)
    chosen: list[_Choice] = []
    skipped: dict[str, LayerDecision] = {}
    op_refused: dict[str, tuple[nn.Module, _Layer, Scheme]] = {}  # scheme cannot take the op (tie candidates)
    for fqn, m in model.named_modules():
        layer, why_not = _layer_of(m)
        if layer is None and not why_not and fqn not in read_directly:
            continue
        kind = type(m).__name__

        def skip(reason: str, op: str | None = None) -> None:
            skipped[fqn] = LayerDecision(fqn, kind, op, None, reason)

        if fqn in read_directly:
            # only a recipe key naming it is an explicit choice: a filter_fn keeping every nn.Linear keeps
            # MultiheadAttention's out_proj too, and that one is skipped, not an error for the model
            match = table.lookup(aliases[id(m)], m)
            if match is not None and match.exact and match.scheme is not None:
                raise UnsupportedModuleError(f"{fqn}: {read_directly[fqn]}; leave it out of the recipe")
            skip(read_directly[fqn], layer.op if layer else None)
            continue
        explicit = filter_fn is not None and _keeps(filter_fn, m, fqn)
        if filter_fn is not None and not explicit:
            skip("filter_fn returned False", layer.op if layer else None)
            continue
        match = table.lookup(aliases[id(m)], m)
        explicit = explicit or (match is not None and match.exact)
        if layer is None and match is not None and match.names_class and (base := _base_of(m)) is not None:
            # a recipe naming a subclass that overrides forward: the user says it computes what its base
            # does (Falcon's `FalconLinear` is `x @ W.T + b`), so it is that layer
            layer = _LAYERS[base]
        if layer is None:
            if explicit:
                raise UnsupportedModuleError(f"{fqn}: {why_not}; make filter_fn (or the recipe) leave it out")
            skip(why_not)
            continue
        if match is None:
            skip("no recipe entry matches it", layer.op)
            continue
        scheme = match.scheme
        if scheme is None:
            skip(f"recipe entry {match.entry} maps it to None", layer.op)
            continue
        math = math_for(scheme)
        if not math.supports(scheme, layer.op):
            if explicit:
                supported = sorted(o for o in math.supported_ops if math.supports(scheme, o))
                raise UnsupportedModuleError(
                    f"{fqn}: scheme {scheme.name} cannot quantize {kind} (it quantizes {supported} layers); "
                    f"make filter_fn (or the recipe) leave it out or pick another scheme")
            skip(_why_op_refused(scheme, layer.op), layer.op)
            op_refused[fqn] = (m, layer, scheme)
            continue
        validate.check_modules([(fqn, m, layer.op)])
        refused = _layer_refused(m, fqn, scheme, layer)
        if refused is not None:
            if explicit:
                raise refused
            skip(str(refused).removeprefix(f"{fqn}: "), layer.op)
            continue
        chosen.append(_Choice(fqn, m, layer, _for_op(scheme, layer.op)))
    _tie(chosen, skipped, op_refused, model)
    order = {fqn: i for i, (fqn, _) in enumerate(model.named_modules())}
    decisions = [LayerDecision(c.fqn, type(c.module).__name__, c.layer.op, c.scheme, tied_to=c.tied_to) for c in chosen]
    decisions += list(skipped.values())
    decisions.sort(key=lambda d: order[d.module])
    return chosen, decisions


def _keeps(filter_fn: FilterFn, m: nn.Module, fqn: str) -> bool:
    """filter_fn's answer for one layer; a filter_fn that cannot answer (a one-argument lambda, a bug in it)
    is named with the layer it failed on, before anything is replaced."""
    try:
        return bool(filter_fn(m, fqn))
    except QExportError:
        raise
    except Exception as e:
        raise UsageError(
            f"filter_fn raised on {fqn or 'the model'} ({type(m).__name__}): {type(e).__name__}: {e}; it is called as "
            f"filter_fn(module, fqn) and returns True for the layers to quantize"
        ) from e


def _why_op_refused(scheme: Scheme, op: str) -> str:
    if op == "embedding" and scheme.activation != "none":
        return (f"{scheme.name} quantizes activations and an embedding's input is indices; give embeddings a "
                f"weight-only scheme in a recipe, e.g. {{nn.Embedding: 'int8_weight_only'}}")
    return f"{scheme.name} has no {op} form"


def _tie(chosen: list[_Choice], skipped: dict[str, LayerDecision], op_refused: dict, model: nn.Module) -> None:
    """Tied weights are quantized once: the first chosen layer reading a parameter owns its tensors,
    later ones share them (`tied_to`) when their scheme quantizes weights the same way. A layer the
    scheme refused only for its op (an embedding under a dynamic-activation scheme) whose weight is
    tied to a quantized layer takes the weight-only form of that scheme, so the weight is stored once."""
    owners: dict[tuple[int, bool], _Choice] = {}
    for c in chosen:
        key = (id(c.module.weight), c.layer.transposed)
        owner = owners.setdefault(key, c)
        if owner is not c and _weight_key(owner.scheme) == _weight_key(c.scheme):
            # Same grid, codes chosen by another algorithm (a tied embedding under gptq takes hqq or mse): the
            # weight is still stored once, and the region records the algorithm of the codes it holds.
            c.tied_to, c.scheme = owner.fqn, c.scheme.replace(algorithm=owner.scheme.algorithm)
    for fqn, (m, layer, scheme) in op_refused.items():
        owner = owners.get((id(m.weight), layer.transposed))
        if owner is None:
            continue
        ws = _weight_only(owner.scheme)
        if not math_for(ws).supports(ws, layer.op) or _layer_refused(m, fqn, ws, layer) is not None:
            continue
        del skipped[fqn]
        chosen.append(_Choice(fqn, m, layer, ws, tied_to=owner.fqn))
    # a tied parameter left float beside its quantized twin is stored twice: say so
    for fqn, d in list(skipped.items()):
        m = model.get_submodule(fqn)
        owner = next((o for (pid, _), o in owners.items() if pid == id(getattr(m, "weight", None))), None)
        if owner is not None:
            skipped[fqn] = LayerDecision(d.module, d.layer_type, d.op, None,
                                         f"{d.reason}; its weight is tied to {owner.fqn}, so it is stored twice "
                                         f"(float here, quantized there)")


def _layer_refused(m: nn.Module, fqn: str, scheme: Scheme, layer: _Layer) -> QExportError | None:
    """Why `scheme` cannot take this particular layer (its settings or its weight's shape), or None.
    Selected explicitly, that is the error raised; selected by type, glob or default, a skip with its
    message: one odd layer (T5's relative_attention_bias, an Embedding(32, num_heads), under int4
    g128) must not refuse the whole model."""
    if isinstance(m, nn.modules.conv._ConvNd) and m.padding_mode != "zeros":
        return UnsupportedModuleError(f"{fqn}: {type(m).__name__} padding_mode={m.padding_mode!r} is not supported (only 'zeros')")
    if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.sparse):
        return UnsupportedModuleError(f"{fqn}: Embedding with max_norm or sparse=True is not supported")
    if not m.weight.dtype.is_floating_point:
        return UnsupportedModuleError(f"{fqn}: weight dtype {m.weight.dtype} is not floating point")
    try:
        math_for(scheme).check_weight(scheme, layer.op, tuple(layer.weight(m).shape), fqn)
    except InvalidSchemeError as e:
        return e
    return None


@dataclass
class _Calibration:
    """What one run of the float model over the calibration data recorded, per module."""

    activations: dict[str, dict[str, torch.Tensor]]  # static schemes: input/output scale and zero point
    hessians: dict[str, torch.Tensor]  # gptq: sum of x^T x over the inputs of the layer


def _calibrate(model: nn.Module, chosen: list[_Choice], data: Iterable[Any]) -> _Calibration:
    """Run the float model on `data`, recording input/output ranges of the chosen modules with static
    activations and the input Hessians of those quantized with GPTQ."""
    static = [c for c in chosen if c.scheme.activation == "static"]
    gptq = [c for c in chosen if c.scheme.algorithm == "gptq"]
    ranges: dict[str, list[torch.Tensor]] = {}
    hessians: dict[str, torch.Tensor] = {}

    def record_range(name: str):
        def record(_m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            for key, t in (("input", inputs[0]), ("output", output)):
                t = t.detach().float()
                lo, hi = t.amin(), t.amax()
                prev = ranges.get(f"{name}/{key}")
                ranges[f"{name}/{key}"] = [lo, hi] if prev is None else [torch.minimum(prev[0], lo), torch.maximum(prev[1], hi)]

        return record

    def record_hessian(name: str):
        def record(_m: nn.Module, inputs: tuple, _output: torch.Tensor) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            hessians[name] = hessians[name] + x.T @ x if name in hessians else x.T @ x

        return record

    handles = [c.module.register_forward_hook(record_range(c.fqn)) for c in static]
    handles += [c.module.register_forward_hook(record_hessian(c.fqn)) for c in gptq]
    n = 0
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for batch in validate.calibration_batches(data):
                if isinstance(batch, Mapping):
                    model(**batch)
                else:
                    model(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
                n += 1
    except Exception as e:
        raise validate.calibration_failed(e, n) from e
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    if n == 0:
        raise CalibrationError("calibration_data is empty; pass at least one batch of example inputs")
    _check_every_layer_ran([c.fqn for c in gptq if c.fqn not in hessians], "GPTQ has no inputs to fit them to")
    _check_every_layer_ran([c.fqn for c in static if f"{c.fqn}/input" not in ranges], "their activation ranges are unknown")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for c in static:
        t: dict[str, torch.Tensor] = {}
        for key in ("input", "output"):
            scale, zp = int8_asym_qparams(*ranges[f"{c.fqn}/{key}"])
            t[f"{key}_scale"] = scale.float()
            t[f"{key}_zero_point"] = zp.to(torch.int32)
        out[c.fqn] = t
    return _Calibration(out, hessians)


def _check_every_layer_ran(missing: list[str], why: str) -> None:
    if missing:
        raise CalibrationError(
            f"{len(missing)} layer(s) never ran during calibration ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); "
            f"{why}. A layer the forward does not call for these inputs (or whose weight the model reads itself "
            f"instead of calling it, as Mamba's conv1d) cannot be calibrated: calibrate with inputs that reach it, "
            f"or leave it float: quantize(model, {{..., {missing[0]!r}: None}})"
        )


def _alias_paths(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every path naming it. Why: `named_modules()` yields a module registered under two
    names (`self.head = self.blocks[-1].proj`) once, so replacing it at that path alone left the float
    layer running, and its float weight stored, wherever the model called it by its other name."""
    paths: dict[int, list[str]] = {}
    for fqn, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(fqn)
    return paths


def _set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize(
    model: nn.Module,
    scheme: Recipe,
    *,
    filter_fn: FilterFn | None = None,
    calibration_data: Iterable[Any] | None = None,
    algorithm: str | None = None,
) -> nn.Module:
    """Replace the model's Linear (and subclasses), transformers Conv1D, Conv1d, Conv2d and Embedding
    modules by quantized modules, in place; returns the model, with `model.qexport_summary` (a
    `QuantizationSummary`) saying what was quantized and what was skipped, and why.

    `scheme` is one scheme (a name or `Scheme`: every layer it can take) or a recipe mapping
    `nn.Module` subclasses and module-name globs to schemes (or None to leave them float), e.g.
    `{nn.Linear: "int8_dynamic", nn.Embedding: "int8_weight_only", "lm_head": None}`; see
    `_RecipeTable` for which entry wins. `filter_fn(module, fqn)`, when given, must also keep a layer.
    `calibration_data` (an iterable of argument tuples, or kwarg dicts) is required by static schemes
    and by GPTQ. `algorithm` ("rtn", "hqq", "mse" or "gptq") picks how the weights' codes are chosen for
    every scheme of the recipe that offers it (hqq: int4; mse: int8; gptq: both); a scheme can also
    carry its own (`qexport.schemes.get("int4_weight_only", algorithm="hqq")`). Each region records its algorithm.
    """
    if not isinstance(model, nn.Module):
        hint = ("; quantize the eager model, then export it (qexport.quantize(model, scheme); qexport.export(model, args))"
                if isinstance(model, torch.export.ExportedProgram) else "")
        raise UnsupportedModuleError(f"quantize() takes an nn.Module, got {type(model).__name__}{hint}")
    if filter_fn is not None and not callable(filter_fn):
        raise UsageError(f"filter_fn must be a callable filter_fn(module, fqn) -> bool, got {type(filter_fn).__name__}")
    table = _RecipeTable(scheme, algorithm)
    calibrated = [s for s in table.schemes() if s.needs_calibration]
    if calibrated and calibration_data is None:
        s = calibrated[0]
        why = "quantizes activations statically" if s.activation == "static" else "fits its weights with GPTQ"
        raise CalibrationError(
            f"scheme {s.name} {why} and needs calibration_data: an iterable of example argument "
            f"tuples, e.g. calibration_data=[(x,) for x in batches]"
            + ("" if s.activation == "static" else f"; algorithm='{math_for(s).calibration_free_algorithm}' needs none")
        )
    if _layer_of(model)[0] is not None:
        raise UnsupportedModuleError(
            "quantize() replaces submodules in place; wrap a bare Linear/Conv/Embedding in a container "
            "(e.g. nn.Sequential(layer))"
        )
    aliases = _alias_paths(model)  # the replacement below puts each quantized layer under all its names
    chosen, decisions = _plan(model, table, filter_fn, aliases)
    if not chosen:
        names = ", ".join(s.name for s in table.schemes()) or "the recipe"
        reasons = sorted({f"{d.layer_type}: {d.reason}" for d in decisions})
        raise NothingToQuantizeError(
            f"no module to quantize with {names}: "
            + (f"{'; '.join(reasons[:4])}" if reasons else _no_layers(model))
            + (" (none passed filter_fn)" if filter_fn else "")
        )
    calib = _calibrate(model, chosen, calibration_data) if calibrated else _Calibration({}, {})
    shared: dict[str, dict[str, torch.Tensor]] = {}
    for c in chosen:
        m, math = c.module, math_for(c.scheme)
        weight = c.layer.weight(m)
        if c.tied_to:
            tensors = dict(shared[c.tied_to])
        elif c.fqn in calib.hessians:
            tensors = math.quantize_weight(c.scheme, weight, hessian=calib.hessians.pop(c.fqn))
        else:
            tensors = math.quantize_weight(c.scheme, weight)
        shared.setdefault(c.fqn, {k: v for k, v in tensors.items()})
        tensors.update(calib.activations.get(c.fqn, {}))
        if c.layer.op != "embedding" and getattr(m, "bias", None) is not None:
            tensors["bias"] = m.bias.detach().clone()
        q = QuantizedModule(c.scheme, c.layer.op, c.layer.params(m), tuple(weight.shape), tensors, c.fqn,
                            float_weight_shape=tuple(m.weight.shape), attributes=c.layer.attributes(m))
        q.to(m.weight.device)
        q.train(m.training)
        for path in aliases[id(m)]:
            _set_submodule(model, path, q)
    model.qexport_summary = QuantizationSummary(tuple(decisions), table.unmatched(model))
    return model


def quantized_modules(model: nn.Module) -> list[tuple[str, QuantizedModule]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedModule)]
