"""The report every backend returns: one record per region saying where it went and, if it was not
taken by the accelerated path, why (in words a user can act on). Shared by all backends; each
RegionReport is the region's lowering record (`serializers.manifest.LoweringRecord`, the one every
artifact's manifest stores) with the region's name and scheme."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from ..schemes import Scheme

if TYPE_CHECKING:
    from serializers.manifest import LoweringRecord


@dataclass(frozen=True)
class RegionReport:
    name: str
    scheme: Scheme | None
    backend: str
    delegated: bool
    reason: str = ""
    kernel: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, name: str, scheme: Scheme | None, record: "LoweringRecord") -> "RegionReport":
        """The report line of a region from its lowering record."""
        return cls(name, scheme, record.backend, record.taken, record.reason, record.kernel, dict(record.details))

    def record(self) -> "LoweringRecord":
        """This line as the manifest's lowering record."""
        from serializers.manifest import LoweringRecord

        return LoweringRecord(self.backend, self.delegated, self.kernel, self.reason, dict(self.details))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scheme": self.scheme.to_dict() if self.scheme else None,
            "backend": self.backend,
            "delegated": self.delegated,
            "reason": self.reason,
            "kernel": self.kernel,
            "details": dict(self.details),
        }


@dataclass
class LoweringReport:
    target: str
    path: str
    regions: list[RegionReport] = field(default_factory=list)
    delegated_nodes: int = 0
    total_nodes: int = 0
    bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def all_delegated(self) -> bool:
        return all(r.delegated for r in self.regions)

    def table(self) -> str:
        from ..table import format_table

        rows = [
            [r.name, r.scheme.name if r.scheme else "?", r.backend, "yes" if r.delegated else "no", r.kernel, r.reason]
            for r in self.regions
        ]
        head = format_table(["region", "scheme", "backend", "delegated", "kernel", "reason"], rows)
        if not self.path:  # a plan (qexport.lower.aoti.plan): no artifact to describe
            return f"{head}\n{self.target}: plan only, nothing written"
        nodes = f"{self.delegated_nodes}/{self.total_nodes} nodes delegated, " if self.total_nodes else ""
        data = self.extra.get("data_file")  # a .pte's shared weights, beside it (counted in bytes)
        also = f" + {data['path']}" if isinstance(data, dict) else ""
        notes = "".join(
            f"\nnote: {name} has no upper bound, so ExecuTorch planned it at the example's size: this .pte takes "
            f"{name} <= {size}; export with torch.export.Dim({name!r}, max=N) (CLI: --dynamic DIM:{name}:N) for more"
            for name, size in self.extra.get("unbounded_dims", {}).items())
        return f"{head}\n{self.target}: {self.path}{also} ({nodes}{self.bytes:,} bytes){notes}"

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "path": self.path,
            "regions": [r.to_dict() for r in self.regions],
            "delegated_nodes": self.delegated_nodes,
            "total_nodes": self.total_nodes,
            "bytes": self.bytes,
            **self.extra,
        }
