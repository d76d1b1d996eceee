"""fgcompile.runtime: drives compiled graphs on onnxruntime (training loop, state, checkpoints, export)."""
