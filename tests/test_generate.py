"""Generation with the Kimi-Linear stack: the one-jit decode loop against the step-by-step path, its
compilation, the LM head during prefill, sampling and donated caches. A float32 model keeps the
paths within float32 rounding of each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

from jax_kda import kimi_linear  # noqa: E402
from jax_kda.kimi_linear import Generator, KimiLinearStack  # noqa: E402

# Sizes distinct from each other, so that an array's shape tells which axes it has.
BATCH, PROMPT, STEPS = 2, 13, 5
SIZE = dict(vocab=97, hidden=64, layers=2, heads=2, head_dim=16, mlp_hidden=96)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


@pytest.fixture(scope="module")
def model():
    return KimiLinearStack(**SIZE, dtype=jnp.float32, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompt():
    return jax.random.randint(jax.random.key(1), (BATCH, PROMPT), 0, SIZE["vocab"])


def test_generate_equals_step_by_step_and_one_prefill(model, prompt):
    caches = model.init_cache(BATCH)
    out = Generator(model).generate(prompt, STEPS, caches, return_logits=True)
    assert out.tokens.shape == (BATCH, STEPS) and out.step_logits.shape == (BATCH, STEPS, SIZE["vocab"])
    assert all(c.is_deleted() for c in caches[0]), "the caches passed in are donated"
    # Greedy: each token is the argmax of the very logits returned for its step (the same array).
    np.testing.assert_array_equal(out.tokens, jnp.argmax(out.step_logits, axis=-1))

    # Step by step: the whole model per call, all logits, fed the tokens generate picked.
    call = nnx.jit(lambda model, tokens, caches: model(tokens, caches))
    logits, caches = call(model, prompt, model.init_cache(BATCH))
    want = [logits[:, -1]]
    for i in range(STEPS):
        logits, caches = call(model, out.tokens[:, i : i + 1], caches)
        want.append(logits[:, -1])
    assert rel_err(out.step_logits, jnp.stack(want[:-1], axis=1)) < 1e-5
    assert rel_err(out.logits, want[-1]) < 1e-5
    for got, ref in zip(jax.tree.leaves(out.caches), jax.tree.leaves(caches)):
        assert rel_err(got, ref) < 1e-5

    # One prefill of prompt and continuation predicts the same logits.
    whole, _ = model(jnp.concatenate([prompt, out.tokens], axis=1), model.init_cache(BATCH))
    assert rel_err(out.step_logits, whole[:, PROMPT - 1 : -1]) < 1e-5


def test_decode_loop_compiles_once(model, prompt, monkeypatch):
    traces = []
    call = KimiLinearStack.__call__
    monkeypatch.setattr(KimiLinearStack, "__call__", lambda *a, **kw: traces.append(1) or call(*a, **kw))
    gen = Generator(model)
    logits, caches = gen.prefill(prompt, model.init_cache(BATCH))
    kimi_linear._decode.clear_cache()
    counts = []
    for steps in (2, 6, 6):
        before = len(traces)
        out = gen.decode(logits, caches, steps)
        logits, caches = out.logits, out.caches
        counts.append(len(traces) - before)
    # The loop body is traced the same number of times for 2 and 6 steps (not unrolled), and a second
    # call with the same shapes reuses the compiled loop.
    assert counts[0] == counts[1] > 0 and counts[2] == 0, counts
    assert kimi_linear._decode._cache_size() == 2


def _shapes(jaxpr):
    """Shapes of every value a jaxpr computes, inside nested jaxprs (jit, scan, cond) too."""
    for eqn in jaxpr.eqns:
        yield from (v.aval.shape for v in eqn.outvars if hasattr(v.aval, "shape"))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _shapes(inner)


def test_prefill_applies_the_lm_head_to_the_last_token_only(model, prompt):
    def prompt_logits(fn):
        """Shapes of the values with a vocabulary axis last and a prompt-length axis."""
        jaxpr = jax.make_jaxpr(fn)(prompt, model.init_cache(BATCH)).jaxpr
        return [s for s in _shapes(jaxpr) if len(s) > 1 and s[-1] == SIZE["vocab"] and PROMPT in s]

    assert prompt_logits(lambda p, c: model(p, c)) == [(BATCH, PROMPT, SIZE["vocab"])]  # the check sees them
    assert prompt_logits(Generator(model).prefill) == []


def test_sampling_draws_from_the_step_logits(model, prompt):
    key, temperature = jax.random.key(7), 0.7
    out = Generator(model).generate(prompt, STEPS, key=key, temperature=temperature, return_logits=True)
    draw = jax.jit(lambda i, logits: jax.random.categorical(jax.random.fold_in(key, i), logits / temperature))
    want = jnp.stack([draw(i, out.step_logits[:, i]) for i in range(STEPS)], axis=1)
    np.testing.assert_array_equal(out.tokens, want)
