"""What compiled HLO holds: the collectives a sharded call runs."""

import re

import jax

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def collectives(fn, *args):
    """How many of each collective the compiled `jax.jit(fn)` on `args` runs."""
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    return {name: len(re.findall(rf"\b{name}(-start)?\(", hlo)) for name in COLLECTIVES}
