"""qexport artifacts on disk: `.pt2` save/load with an embedded manifest, and `inspect` for every
artifact kind (AOTI, ExecuTorch and ONNX register their readers beside the .pt2 one)."""

from .inspect import inspect, register_reader
from .manifest import MANIFEST_VERSION, Manifest, RegionRecord


def __getattr__(name: str):
    # save/load pull in torch.export's archive code; importing them on use keeps `inspect` of a
    # .pte or .onnx file from paying for it.
    if name in ("save", "load"):
        from . import pt2

        return getattr(pt2, name)
    raise AttributeError(f"module 'serializers' has no attribute {name!r}")


__all__ = ["MANIFEST_VERSION", "Manifest", "RegionRecord", "inspect", "load", "register_reader", "save"]
