"""fgcompile: compile quantized ONNX inference graphs into forward-gradient (QZO-FF) training graphs."""
__version__ = "0.1.0"
