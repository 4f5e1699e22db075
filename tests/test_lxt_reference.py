"""xaijax's CP-LRP against the AttnLRP authors' ``lxt`` on a tiny torchvision ViT (issue 20).

``tests/fixtures/lxt_vit_ref.npz`` is recorded by ``experiments/make_lxt_reference.py`` in the
peer venv (lxt 2.1, zennit 0.5.1, torch 2.14.1, torchvision 0.29.1; ``experiments/PEERS.md``):
a torchvision ``VisionTransformer`` (image 32, patch 8, 2 layers, 2 heads, hidden 16, mlp 32,
3 classes) with seeded random weights (random biases, LayerNorm scales and shifts, class
token, position embedding), two inputs, all in float64. This test needs numpy and xaijax only.

What lxt does to torchvision's ViT (``lxt.efficient.monkey_patch(vision_transformer)``: its
only map for that module is ``cp_LRP``), read from its source, and the xaijax rule that
expresses it:

* LayerNorm: standard deviation detached, gradient x input -> ``LayerNormRule(0)``;
* ``nn.MultiheadAttention``: query and key detached, so only the value path carries
  gradient (softmax and ``q.k`` get nothing) -> ``Stop`` on the softmax,
  ``ConstantFactor(0, 0)`` on ``attention.v`` (xaijax's ``cp_lrp``);
* GELU: identity rule, implemented as gradient ``f(x) / (x + 1e-10)`` -> ``Pass`` (exactly:
  the test-local :class:`LxtIdentity`, which keeps lxt's ``1e-10``);
* linear layers, the patch convolution, residual sums, the position-embedding sum: plain
  autograd, i.e. the z-rule with the bias absorbing its share -> ``Epsilon(0)``;
* ``gamma`` recording: lxt's ViT example on top, ``monkey_patch_zennit()`` and zennit's
  ``LayerMapComposite([(Conv2d, Gamma(0.25)), (Linear, Gamma(0.05))])`` (stabiliser 1e-6)
  -> xaijax ``Gamma(0.25, 1e-6)`` / ``Gamma(0.05, 1e-6)``, the generalised (sign-aware)
  gamma rule of both libraries. The zennit hooks reach ``conv_proj``, the MLP's linear layers
  and ``heads.head``, but *not* the attention projections: ``nn.MultiheadAttention`` applies
  ``in_proj_weight`` and ``out_proj.weight`` with ``F.linear``, so ``out_proj``'s forward (and
  zennit's hook on it) never runs and both projections stay on the z-rule. xaijax's
  ``cp-lrp`` puts its dense gamma on ``in_proj`` / ``out_proj`` too; the lxt recipe in xaijax
  is ``cp_lrp`` with ``names`` mapping them to ``Epsilon(0)`` (:data:`LXT_ATTN`).
  monkey_patch_zennit also divides each hooked layer's input relevance by ``input + 1e-10
  sign(input)`` (undone by the layer below).

Numbers (float64, ``max|xaijax - lxt| / max|lxt|`` on the channel-summed heatmap): z-rule
recording 6.2e-8, gamma recording 1.2e-9, both from lxt's 1e-10 stabilisers alone: with
those written into the rules (GELU ``x / (x + 1e-10)``, LayerNorm below a zennit hook at
``eps=1e-10``, the input division) the agreement is 2.5e-15 / 3.3e-15, and the relevance at
every recorded layer (``t * dt``, 14 per run) agrees to 1e-14, except, in the gamma run, at
the three layers read by a zennit-hooked one (8e-11: the hook's division by ``t + 1e-10``).

Not compared: AttnLRP's softmax and ``q.k`` rules (xaijax ``attnlrp``). lxt 2.1 has no
AttnLRP patch for torchvision's ``nn.MultiheadAttention``; its AttnLRP attention wrapper
(``wrap_attention_forward``: gradients of q and k divided by 4, of v by 2) patches only
Hugging Face attention functions.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax import methods, models
from xaijax import propagation as P
from xaijax.checkpoints import vit_mapping
from xaijax.propagation import composites as C

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "lxt_vit_ref.npz")

#: zennit's hooks never reach torch's attention projections (see the module docstring)
LXT_ATTN = {"*.self_attention.in_proj": P.Epsilon(0.0), "*.self_attention.out_proj": P.Epsilon(0.0)}


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    scale = np.abs(theirs).max()
    assert scale > 0, "reference is identically zero: the comparison would be vacuous"
    return float(np.abs(ours - theirs).max() / scale)


@dataclasses.dataclass(frozen=True)
class LxtIdentity(P.Pass):
    """lxt's implicit identity rule as computed: gradient ``f(x) / (x + eps)``, so relevance
    ``R x / (x + eps)``. ``out_eps``: also the division of a zennit-hooked layer above (its
    input is this layer's output) by ``out + out_eps sign(out)``."""

    eps: float = 1e-10
    out_eps: float = 0.0

    def backward(self, layer, xs, out, R):
        x = xs[0]
        r = R * x / (x + self.eps)
        if self.out_eps:
            r = r * out / (out + self.out_eps * jnp.where(out >= 0, 1.0, -1.0).astype(out.dtype))
        return (r,)


def _composite(gamma: bool, exact: bool) -> P.Composite:
    """The rules lxt applies (``exact``: with its 1e-10 stabilisers)."""
    comp = C.cp_lrp(0.0, None, None)
    if gamma:
        comp = comp.replace(conv=P.Gamma(0.25, 1e-6), dense=P.Gamma(0.05, 1e-6), names=LXT_ATTN)
    if exact:
        kinds = dict(comp.kinds)
        kinds["activation"] = LxtIdentity(1e-10, 1e-10 if gamma else 0.0)
        names = dict(comp.names)
        if gamma:  # LayerNorms read by a zennit-hooked linear layer: mlp.0 and heads.head (via select)
            names.update({"*.ln_2": P.LayerNormRule(1e-10), "encoder.ln": P.LayerNormRule(1e-10)})
        comp = comp.replace(kinds=kinds, names=names)
    return comp


@pytest.fixture(scope="module")
def ref():
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        with np.load(FIXTURE) as z:
            a = {k: z[k] for k in z.files}
        meta = json.loads(str(a["meta"]))
        assert meta["dtype"] == "float64" and meta["versions"]["lxt"] == "2.1"
        model = models.get("vit_b_16", **meta["config"])
        sd = {k[3:]: v for k, v in a.items() if k.startswith("sd/")}
        # from_torch_state_dict returns float32 (the template's dtype); the mapping only
        # transposes, so three float32 pieces (hi, mid, lo) add up to the float64 weights
        pieces, rest = [], dict(sd)
        for _ in range(3):
            hi = {k: np.asarray(v, np.float32) for k, v in rest.items()}
            pieces.append(vit_mapping.from_torch_state_dict(model, hi))
            rest = {k: rest[k] - hi[k].astype(np.float64) for k in rest}
        v = jax.tree_util.tree_map(lambda *p: sum(jnp.asarray(q, jnp.float64) for q in p), *pieces)
        x = jnp.asarray(a["x"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
        yield dict(a=a, meta=meta, model=model, v=v, x=x, t=jnp.asarray(a["target"].astype(np.int32)))
    finally:
        jax.config.update("jax_enable_x64", prev)


def _heatmap(ref, name):
    return ref["a"][f"relevance/{name}"].sum(axis=1)  # lxt's heatmap: x * x.grad summed over channels


def test_logits_parity(ref):
    y = ref["model"].apply(ref["v"], ref["x"])
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(y), ref["a"]["logits"], rtol=0, atol=1e-12)  # measured 1.8e-15


def test_cp_lrp_zrule_matches_lxt_monkey_patch(ref):
    """lxt's default ViT map alone: xaijax's registered ``cp-lrp`` with eps 0 and no gamma."""
    m = methods.get("cp-lrp", eps=0.0, conv_gamma=None, dense_gamma=None)
    ours = m(ref["model"], ref["v"], ref["x"], ref["t"])
    assert rel_err(ours, _heatmap(ref, "plain")) < 2e-7  # measured 6.2e-8: lxt's GELU x / (x + 1e-10)
    exact = methods.get("cp-lrp", composite=_composite(gamma=False, exact=True))
    assert rel_err(exact(ref["model"], ref["v"], ref["x"], ref["t"]), _heatmap(ref, "plain")) < 1e-13  # 2.5e-15


def test_cp_lrp_gamma_matches_lxt_vit_example(ref):
    """lxt + zennit Gamma(0.25) on Conv2d, Gamma(0.05) on Linear (lxt's ViT example)."""
    comp = _composite(gamma=True, exact=False)
    ours = methods.get("cp-lrp", composite=comp)(ref["model"], ref["v"], ref["x"], ref["t"])
    theirs = _heatmap(ref, "gamma")
    assert rel_err(ours, theirs) < 1e-8  # measured 1.2e-9
    # xaijax's default cp-lrp gammas and zennit's stabiliser, gamma also on the attention
    # projections: a different rule set, visibly so
    dflt = methods.get("cp-lrp", composite=comp.replace(names={}))(ref["model"], ref["v"], ref["x"], ref["t"])
    assert rel_err(dflt, theirs) > 0.05  # measured 0.18
    # with lxt's 1e-10 stabilisers, and its input division x / (x + 1e-10 sign x)
    exact = P.relevance(ref["model"], ref["v"], ref["x"], lambda out: jax.nn.one_hot(ref["t"], 3, dtype=out.dtype) * out,
                        _composite(gamma=True, exact=True))
    x = np.asarray(ref["x"])
    exact = np.asarray(exact) * x / (x + 1e-10 * np.where(x >= 0, 1.0, -1.0))
    assert rel_err(exact, ref["a"]["relevance/gamma"].transpose(0, 2, 3, 1)) < 1e-13  # 3.3e-15, per channel


@pytest.mark.parametrize("name", ["plain", "gamma"])
def test_per_layer_relevance(ref, name):
    """Relevance ``t * dt`` at the outputs of the recorded torch modules, layer by layer."""
    seed = jax.nn.one_hot(ref["t"], 3, dtype=jnp.float64)
    _, trace = P.relevance_trace(ref["model"], ref["v"], ref["x"], lambda out: seed * out,
                                 _composite(gamma=name == "gamma", exact=True))
    compared = 0
    for tap in ref["meta"]["taps"]:
        theirs = ref["a"][f"taps/{name}/{tap}"]
        if tap == "conv_proj":
            theirs = theirs.transpose(0, 2, 3, 1)
        ours_name = tap + ".add_2" if tap.endswith(("encoder_layer_0", "encoder_layer_1")) else tap
        if ours_name not in trace:  # self_attention is written out in xaijax: its out_proj
            ours_name = tap + ".out_proj"
        # lxt's t * dt at the input of a zennit-hooked layer (mlp.0 reads ln_2, mlp.3 reads the
        # GELU, heads.head reads encoder.ln) is R t / (t + 1e-10 sign t): the hook's division
        tol = 1e-9 if name == "gamma" and tap.endswith(("ln_2", "mlp.1", "encoder.ln")) else 1e-12  # 8e-11 / 7e-15
        assert rel_err(trace[ours_name].output, theirs) < tol, tap
        compared += 1
    assert compared == len(ref["meta"]["taps"]) == 14
