"""qexport artifacts on disk: every kind is one entry of the table in `serializers.kinds` (suffix,
sniff, manifest reader and writer, runner), with its format code in `serializers/<kind>.py`; `.pt2`
save/load with an embedded manifest; `inspect` for every kind; `files` for checked paths and atomic
writes. Backends and runtimes never parse or write these files themselves."""

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
