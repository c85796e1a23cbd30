"""Run any qexport artifact, by job: `runner` (the flat calling convention every runtime shares,
example inputs), `loaders` (one loader per artifact kind, named by `serializers.kinds`), `verify`
(outputs against the reference program) and `bench` (latency). `qexport.runners` re-exports them."""

from .bench import BenchResult, bench, bench_inputs, time_call
from .loaders import ARTIFACT_KINDS, STAGES, artifact_kind, load, load_program, stage
from .runner import InputInfo, Runner, make_inputs, program_inputs, program_runner, region_outputs
from .verify import (
    FLOAT_TOLERANCE, SPREAD_FACTOR, RegionError, VerifyResult, compare, reference_spread, tolerance_for, verify,
)

__all__ = [
    "ARTIFACT_KINDS", "BenchResult", "FLOAT_TOLERANCE", "InputInfo", "RegionError", "Runner", "STAGES", "VerifyResult",
    "artifact_kind", "bench", "bench_inputs", "compare", "load", "load_program", "make_inputs", "program_inputs",
    "program_runner", "reference_spread", "region_outputs", "SPREAD_FACTOR", "stage", "time_call", "tolerance_for",
    "verify",
]
