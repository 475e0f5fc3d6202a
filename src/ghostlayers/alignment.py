"""How well each removed block's map aligns the pruned stream with the dense one, on held-out windows: the
alignment error ‖ĥ − Y‖ / ‖X − Y‖ per block (1.0: no repair), from the dense pass's sums or from what the pruned
model really delivers. What `compare` and the benchmarks report next to perplexity."""

from __future__ import annotations

from torch import Tensor
from transformers import PreTrainedModel

from . import recovery
from .capture import CaptureSpec, PairSource, Stats, collect
from .maps import Operator
from .operators import Moments, map_error
from .options import RunOptions
from .plan import Pair, Plan


def alignment_spec(plan: Plan) -> CaptureSpec:
    """The sums that score every method's alignment error at each removed block [s, e): (h_s, h_e) for maps at the
    boundary, and what methods acting before it (ReplaceMe) score theirs from."""
    blocks = plan.blocks()
    spec = CaptureSpec(grams=frozenset(s for s, _ in blocks), cross=frozenset(blocks))
    for how in recovery.REGISTRY.values():
        if not how.at_boundary and how.placement != "nothing":
            spec = spec | how.needs(blocks, blocks)
    return spec


def alignment_errors(stats: Stats, operators: list[Operator], blocks: list[Pair]) -> list[float]:
    """Relative alignment error ‖ĥ − Y‖/‖X − Y‖ of each block's recovery on the sums of (held-out) windows;
    blocks without an operator (no recovery) score 1.0 by definition."""
    by_block = {op.block: op for op in operators}
    out = []
    for block in blocks:
        op = by_block.get(block)
        if op is None:
            out.append(1.0)
            continue
        if op.map.matrix(op.hidden) is None:  # a map acting before the boundary (ReplaceMe's): its method scores it
            error = recovery.get(op.method).error(stats, block, op.map)
            assert error is not None, "alignment sums are uniform and hold the block's pair"
            out.append(error)
        else:
            out.append(map_error(Moments.of(stats, *block), op.map))
    return out


def delivered_alignment_errors(
    dense: PreTrainedModel,
    pruned: PreTrainedModel,
    windows: Tensor,
    plan: Plan,
    operators: list[Operator],
    batch_size: int = 8,
) -> list[float]:
    """‖X'W − Y‖ / ‖X' − Y‖ at each removed block [s, e): X' is what `pruned` really delivers to the block's boundary
    (earlier operators and refits applied), W the block's operator (identity where it has none at the boundary),
    Y the dense h_e: how much of what arrives wrong the operator repairs (1.0: nothing). For a block fitted from
    the dense pass this is `alignment_errors`' quantity; for sequential fits it scores each operator on the
    input it was fitted for instead of the dense one."""
    by_block = {op.block: op.map for op in operators}
    out = []
    for block in plan.blocks():
        s, e = block
        spec = CaptureSpec(grams=frozenset({s}), cross=frozenset({block}))
        got = collect(PairSource(dense, pruned, block, plan.pruned_index(e)), windows, spec, RunOptions(batch_size, False))
        out.append(map_error(Moments.of(got, s, e), by_block.get(block)))
    return out
