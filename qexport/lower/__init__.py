"""Backends: each lowers an ExportedProgram's regions by their schemes (aoti, executorch, onnx)."""
