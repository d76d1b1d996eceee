"""prompts: append N trainable tokens to a transformer's sequence at the input of a block (deep visual
prompt tuning, one block), as a float parameter that passes/floatgrid.py puts on its int32 grid.

    h [B, T, D]  →  Concat(h, Expand(P, [B, N, D]), axis 1)  [B, T + N, D]   for every consumer of h

h is the input of the chosen LayerNormalization (`--prompt-at NAME`, default the first one whose input
has rank 3: [batch, tokens, features]); its other readers (the residual) read the same extended
sequence. Tokens are appended, so a class token at index 0 keeps its place. P starts as seeded N(0, 1)
values: at a LayerNormalization input only their direction matters.

Precondition: a canonical ModelProto (ctx.source).
Postcondition: with spec.prompts = N > 0, ctx.source is the model computing on T + N tokens from block
`at` on, with initializer PROMPT [N, D] float32 read only by the Expand named PROMPT_NODE (and a note
says so); else CompileError names what is missing. With 0 prompts the model is unchanged.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fgcompile.errors import CompileError
from .context import Context, Pass

PROMPT, PROMPT_NODE = "prompt", "fgcompile/prompt/expand"


def _over_tokens(norm: gs.Node) -> bool:
    h = norm.inputs[0]
    return h.shape is not None and len(h.shape) == 3 and isinstance(h.shape[2], int)


def _choices(graph: gs.Graph) -> str:
    names = [repr(n.name) for n in graph.nodes if n.op == "LayerNormalization" and _over_tokens(n)]
    return f"LayerNormalizations over [batch, tokens, features]: {', '.join(names) or 'none'}"


def _block_input(graph: gs.Graph, at: str) -> gs.Variable:
    norms = [n for n in graph.nodes if n.op == "LayerNormalization"]
    if at:
        norms = [n for n in norms if n.name == at]
        if not norms and any(_over_tokens(n) for n in graph.nodes if n.op == "LayerNormalization"):
            raise CompileError(f"--prompt-at {at!r}: the model has no LayerNormalization {at!r} "
                               f"({_choices(graph)}). Name one of those, or leave --prompt-at out (the first).")
    for n in norms:
        if _over_tokens(n):
            return n.inputs[0]
    where = f"LayerNormalization {at!r}" if at else "any LayerNormalization"
    raise CompileError(f"--prompts: no sequence axis found: {where} with an input shaped [batch, tokens, features] "
                       "(static features). Prompts need a transformer block; name one with --prompt-at "
                       "(a LayerNormalization node), or train without --prompts.")


def appended(model: onnx.ModelProto, count: int, at: str, seed: int) -> onnx.ModelProto:
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    h = _block_input(graph, at)
    dim = int(h.shape[2])
    readers = list(h.outputs)
    p = gs.Constant(PROMPT, np.random.default_rng([seed, count]).normal(0, 1, (count, dim)).astype(np.float32))
    shape = gs.Variable("fgcompile/prompt/shape", dtype=np.int64, shape=[3])
    batch = gs.Variable("fgcompile/prompt/batch", dtype=np.int64, shape=[1])
    tokens = gs.Variable("fgcompile/prompt/tokens", dtype=np.float32, shape=[h.shape[0], count, dim])
    joined = gs.Variable("fgcompile/prompt/joined", dtype=np.float32, shape=[h.shape[0], None, dim])
    graph.nodes += [
        gs.Node("Shape", "fgcompile/prompt/shape_of", {"start": 0, "end": 1}, [h], [batch]),
        gs.Node("Concat", "fgcompile/prompt/target", {"axis": 0},
                [batch, gs.Constant("fgcompile/prompt/nd", np.array([count, dim], np.int64))], [shape]),
        gs.Node("Expand", PROMPT_NODE, {}, [p, shape], [tokens]),
        gs.Node("Concat", "fgcompile/prompt/append", {"axis": 1}, [h, tokens], [joined])]
    for node in readers:
        node.inputs = [joined if t is h else t for t in node.inputs]
    io = {t.name for t in graph.inputs + graph.outputs}
    for t in graph.tensors().values():   # sequence lengths changed downstream: shape inference redoes them
        if isinstance(t, gs.Variable) and t.name not in io and not t.name.startswith("fgcompile/prompt/"):
            t.shape = None
    out = gs.export_onnx(graph.cleanup().toposort(), do_type_check=False)
    out.ir_version = model.ir_version
    out.metadata_props.extend(model.metadata_props)
    return out


def run(model: onnx.ModelProto, ctx: Context) -> onnx.ModelProto:
    if ctx.spec.prompt_at and not ctx.spec.prompts:
        graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
        raise CompileError(f"--prompt-at {ctx.spec.prompt_at!r} says where prompt tokens go, but --prompts is 0 "
                           f"({_choices(graph)}). Add --prompts N, or drop --prompt-at.")
    if ctx.spec.prompts:
        ctx.source = appended(model, ctx.spec.prompts, ctx.spec.prompt_at, ctx.spec.seed)
        ctx.notes.append(f"{ctx.spec.prompts} prompt tokens appended (initializer {PROMPT!r})")
    return ctx.source


PASS = Pass("prompts", run, reads=("source", "notes"))
