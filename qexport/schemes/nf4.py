"""nf4 family: NormalFloat4 codes with blockwise absmax scales (QLoRA, Dettmers et al. 2023).

Scheme: nf4 (block 64). Codes are packed two per byte like int4; the 16-value codebook travels
with each region as a tensor so the graph alone can dequantize it.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..errors import InvalidSchemeError
from .packing import grouped, pack_uint4, unpack_uint4
from ._scheme import Scheme, SchemeMath
from .registry import _register_builtin

# The NF4 data type of QLoRA (bitsandbytes' and torchao's table).
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


class Nf4Math(SchemeMath):
    family = "nf4"
    weight_format = ("nf4", 4)
    weight_roles = ("weight", "weight_scale", "weight_codebook")
    shared_roles = ("weight_codebook",)
    supported_ops = frozenset({"linear", "embedding"})
    tolerance = 8e-2

    def validate(self, s: Scheme) -> None:
        super().validate(s)
        if s.granularity != "per_group" or s.group_size not in (32, 64, 128, 256):
            raise InvalidSchemeError(f"{s.name}: block size group_size={s.group_size}; choose 32, 64 (QLoRA), 128 or 256")
        if s.activation != "none":
            raise InvalidSchemeError(f"{s.name}: nf4 is weight-only (activation='none')")
        if not s.symmetric or (s.qmin, s.qmax) != (-1, 1):
            # the codes are the fixed codebook's, normalised to [-1, 1] by each block's absmax
            raise InvalidSchemeError(
                f"{s.name}: nf4 codes are its codebook's, symmetric in [-1, 1] (symmetric=True, qmin=-1, qmax=1), "
                f"got symmetric={s.symmetric}, qmin={s.qmin}, qmax={s.qmax}")

    def quantize_weight(self, s: Scheme, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        g = grouped(weight.detach().float(), s.group_size)
        absmax = g.abs().amax(-1).clamp(min=torch.finfo(torch.float32).eps)
        book = torch.tensor(NF4_CODEBOOK)
        codes = ((g / absmax[..., None])[..., None] - book).abs().argmin(-1)
        return {
            "weight": pack_uint4(codes.reshape(weight.shape[0], -1)),
            "weight_scale": absmax,
            "weight_codebook": book.clone(),
        }

    def dequantize_weight(self, s: Scheme, t: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        codes = grouped(unpack_uint4(t["weight"]), s.group_size).long()
        return (t["weight_codebook"][codes] * t["weight_scale"][..., None]).reshape(shape)


NF4 = Nf4Math()
NF4_SCHEME = Scheme(
    name="nf4", family="nf4", weight_dtype="nf4", bits=4, granularity="per_group", group_size=64,
    symmetric=True, qmin=-1, qmax=1, compute_dtype="bfloat16",
)
_register_builtin(NF4_SCHEME, NF4)
