"""fgcompile.passes: the compiler passes, one idea per module, composed by pipeline.compile_graph."""
