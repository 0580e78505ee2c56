"""Plain helpers shared by several test files: counting hooks, a seeded pair of residual statistics."""

from conftest import make_native, random_seqs

import reversion_lens as rl


def hook_count(model):
    points = {id(hp): hp for hp in model.hook_dict.values()}.values()
    return sum(
        len(hp.fwd_hooks) + len(hp.bwd_hooks) + len(hp._forward_hooks) + len(hp._backward_hooks) for hp in points
    )


def _stats_pair():
    seqs = random_seqs(8)
    probes = rl.ProbeSet.from_tokens(seqs)
    base = rl.residual_stats(make_native(seed=1), probes, keep_per_prompt=True, meta={"checkpoint": "base"})
    aligned = rl.residual_stats(make_native(seed=2), probes, keep_per_prompt=True, meta={"checkpoint": "aligned"})
    return base, aligned
