"""Import dialects: each module rewrites one way quantizers export weights into the QDQ form that
passes/analyze.py reads. passes/canonicalize.py composes them; each states its precondition and
postcondition and keeps the model's function (tests/passes/test_dialects.py runs both in onnxruntime)."""
