"""Composites: which rule each layer of a network uses.

A :class:`Composite` is a frozen, hashable value (so a method built from it can be a static
argument of ``jax.jit``). The rule of a layer is the first match of, in this order:

1. ``names`` — ``{pattern: rule}`` on the dotted torchvision-style layer name, shell-style
   patterns allowed (``"features.0"``, ``"layer4.*"``), first matching pattern wins;
2. position — ``first`` / ``last``: the first / last *convolution or dense* layer called
   in the forward pass (the input layer and the classifier);
3. ``types`` — ``{module class: rule}`` by ``isinstance`` (also the way to give a rule to a
   layer type the engine does not know; such layers are treated as generic functions, so
   only rules that need no weights — Epsilon, Vjp, Pass — apply to them);
4. ``conv`` / ``dense`` — the rules of the remaining convolutions and dense layers;
5. ``kinds`` — ``{kind: rule}`` for the other layer kinds, falling back to
   :data:`DEFAULT_RULES`.

Default rules of the parameter-free layers (:data:`DEFAULT_RULES`):

* ``relu`` — :class:`~xaijax.propagation.rules.Pass` (relevance passes; it is already zero
  where the activation is zero);
* ``maxpool`` — :class:`~xaijax.propagation.rules.Vjp` (the ordinary VJP): winner-take-all (the z-rule
  on a max pool gives the same result: ``x_i * d max / d x_i = max`` for the winner);
* ``avgpool`` (average and adaptive average pooling) — ``Epsilon(0)``: the z-rule, inputs
  share in proportion to their values;
* ``add`` (residual sums) — ``Epsilon(0)``: each branch gets relevance in proportion to its
  contribution ``x_k / sum_k' x_k'``;
* ``concat`` — ``Vjp``: relevance is split by channels;
* ``reshape`` (flatten), ``dropout`` (eval mode), ``identity`` — ``Vjp`` (identity up
  to shape);
* ``batchnorm`` — see ``canonize``.

Transformer layers (:mod:`xaijax.models.transformer_layers`), the same in every composite
unless it maps them (AttnLRP's rules, :mod:`~xaijax.propagation.transformer_rules`, since
plain LRP rules do not fit them: the epsilon rule on a bilinear product passes on twice the
relevance, on a LayerNorm it follows the normaliser's derivative):

* ``layernorm`` — :class:`~xaijax.propagation.transformer_rules.LayerNormRule` (eps 1e-6):
  normaliser held constant, epsilon rule on the rest;
* ``softmax`` — :class:`~xaijax.propagation.transformer_rules.SoftmaxRule`;
* ``matmul`` (``q.k^T``, ``attention.v``) —
  :class:`~xaijax.propagation.transformer_rules.BilinearUniform` (eps 1e-6): each factor half;
* ``activation`` (GELU, Tanh) — :class:`~xaijax.propagation.rules.Pass` (identity rule);
* ``rearrange`` (patch tokens, head split/merge, token concatenation/selection) —
  :class:`~xaijax.propagation.rules.Vjp`: exact, every output entry is one input entry.
  Relevance reaching a prefix token (class/distillation token, a parameter) stays there,
  as relevance reaching a bias does;
* ``average`` (a distilled DeiT's two heads) — ``Epsilon(0)``, the z-rule;
* ``mask`` (BERT's attention mask on the logits, ``where(keep, logits, finfo.min)``) —
  :class:`~xaijax.propagation.rules.Vjp`: the relevance of each kept logit passes to it
  unchanged, a masked entry is a constant and passes nothing (its softmax probability is
  exactly 0, so the softmax rule sends it exactly 0 anyway), the keep-mask input gets 0.
  Conserving.

On a network without transformer layers the composites ``attnlrp`` and ``cp_lrp`` are plain
LRP-epsilon (or gamma) composites.

``canonize=True`` (default) folds every eval-mode BatchNorm whose input is the output of a
convolution or dense layer read by nothing else into that layer
(:mod:`xaijax.propagation.canonizers`): the layer's rule sees the effective weights and
bias, and relevance passes through the folded BatchNorm. BatchNorms that follow no such
layer (DenseNet's pre-activation ``norm1``/``norm``/``norm5``, after concatenations) use the
``batchnorm`` kind rule, :class:`~xaijax.propagation.rules.Pass` by default; map
``kinds={"batchnorm": Epsilon(...)}`` to treat them as affine layers whose shift absorbs
relevance instead.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Mapping

from xaijax.propagation.rules import (
    AlphaBeta,
    Epsilon,
    Excitation,
    Flat,
    FlipContrast,
    Gamma,
    Pass,
    PerSampleZBox,
    Rule,
    Vjp,
    ZBox,
    ZPlus,
)
from xaijax.propagation.transformer_rules import BilinearUniform, ConstantFactor, LayerNormRule, SoftmaxRule, Stop
from xaijax.propagation.rsp_rules import RSPAdd, RSPBatchNorm, RSPConv, RSPShifted

__all__ = [
    "KINDS",
    "DEFAULT_RULES",
    "Composite",
    "zero",
    "epsilon",
    "epsilon_plus",
    "epsilon_plus_flat",
    "epsilon_gamma_box",
    "alpha_beta",
    "zplus_box",
    "zplus_nobias_samplebox",
    "excitation",
    "contrastive_excitation",
    "rsp",
    "attnlrp",
    "cp_lrp",
    "get",
    "names",
    "resolve",
]

#: Layer kinds the engine recognises (``custom``: a type mapped through ``Composite.types``).
KINDS = (
    "conv",
    "dense",
    "batchnorm",
    "relu",
    "maxpool",
    "avgpool",
    "add",
    "concat",
    "reshape",
    "dropout",
    "identity",
    "layernorm",
    "softmax",
    "matmul",
    "activation",
    "rearrange",
    "average",
    "mask",
)

#: Rules of the layer kinds that a composite does not map.
DEFAULT_RULES: dict[str, Rule] = {
    "conv": Epsilon(0.0),
    "dense": Epsilon(0.0),
    "batchnorm": Pass(),
    "relu": Pass(),
    "maxpool": Vjp(),
    "avgpool": Epsilon(0.0),
    "add": Epsilon(0.0),
    "concat": Vjp(),
    "reshape": Vjp(),
    "dropout": Vjp(),
    "identity": Vjp(),
    "layernorm": LayerNormRule(1e-6),
    "softmax": SoftmaxRule(),
    "matmul": BilinearUniform(1e-6),
    "activation": Pass(),
    "rearrange": Vjp(),
    "average": Epsilon(0.0),
    "mask": Vjp(),
}


def _pairs(value: Any, what: str) -> tuple[tuple[Any, Rule], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    out = []
    for item in items:
        try:
            key, rule = item
        except (TypeError, ValueError):
            raise ValueError(f"Composite {what} must be a mapping or (key, rule) pairs; got {value!r}") from None
        if not isinstance(rule, Rule):
            raise ValueError(f"Composite {what}[{key!r}] must be a Rule, got {rule!r}")
        out.append((key, rule))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Composite:
    """Layer -> rule mapping (see the module docstring for the precedence).

    Attributes:
      conv: rule of convolutions (``nn.Conv``).
      dense: rule of dense layers (``nn.Dense``).
      first: rule of the first convolution/dense layer (the input layer), or None.
      last: rule of the last convolution/dense layer (the classifier), or None.
      kinds: ``{kind: rule}`` for other layer kinds (see :data:`KINDS`).
      names: ``{pattern: rule}`` by dotted layer name (``fnmatch`` patterns), first match wins.
      types: ``{module class: rule}`` by ``isinstance``.
      canonize: fold eval-mode BatchNorm into a directly preceding convolution/dense layer.

    Mappings may be given as dicts; they are stored as tuples of pairs (hashable).
    """

    conv: Rule = Epsilon(0.0)
    dense: Rule = Epsilon(0.0)
    first: Rule | None = None
    last: Rule | None = None
    kinds: Any = ()
    names: Any = ()
    types: Any = ()
    canonize: bool = True

    def __post_init__(self) -> None:
        for field in ("conv", "dense"):
            if not isinstance(getattr(self, field), Rule):
                raise ValueError(f"Composite {field} must be a Rule, got {getattr(self, field)!r}")
        for field in ("first", "last"):
            v = getattr(self, field)
            if v is not None and not isinstance(v, Rule):
                raise ValueError(f"Composite {field} must be a Rule or None, got {v!r}")
        kinds = _pairs(self.kinds, "kinds")
        for k, _ in kinds:
            if k not in KINDS:
                raise ValueError(f"unknown layer kind {k!r} in Composite kinds; known kinds: {', '.join(KINDS)}")
        names = _pairs(self.names, "names")
        for k, _ in names:
            if not isinstance(k, str):
                raise ValueError(f"Composite names keys must be layer-name patterns (str), got {k!r}")
        types = _pairs(self.types, "types")
        for k, _ in types:
            if not isinstance(k, type):
                raise ValueError(f"Composite types keys must be module classes, got {k!r}")
        object.__setattr__(self, "kinds", kinds)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "types", types)

    def replace(self, **changes: Any) -> "Composite":
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def rule_for(self, name: str, kind: str, module: Any, *, first: bool = False, last: bool = False) -> Rule | None:
        """The rule of one layer (None: a layer of unknown type that nothing maps).

        ``module`` is the module or its class (``types`` match by subclass).
        """
        cls_ = module if isinstance(module, type) else type(module)
        for pattern, rule in self.names:
            if fnmatch.fnmatchcase(name, pattern):
                return rule
        if first and self.first is not None:
            return self.first
        if last and self.last is not None:
            return self.last
        for cls, rule in self.types:
            if issubclass(cls_, cls):
                return rule
        if kind == "conv":
            return self.conv
        if kind == "dense":
            return self.dense
        for k, rule in self.kinds:
            if k == kind:
                return rule
        return DEFAULT_RULES.get(kind)


# ------------------------------------------------------------------- named composites


def zero() -> Composite:
    """LRP-0: the z-rule everywhere (equals gradient x input on bias-free ReLU networks)."""
    return Composite(Epsilon(0.0), Epsilon(0.0))


def epsilon(eps: float = 1e-6) -> Composite:
    """LRP-epsilon on every convolution and dense layer."""
    return Composite(Epsilon(eps), Epsilon(eps))


def epsilon_plus(eps: float = 1e-6) -> Composite:
    """z+ (alpha1-beta0) on convolutions, epsilon on dense layers (zennit's EpsilonPlus)."""
    return Composite(ZPlus(), Epsilon(eps))


def epsilon_plus_flat(eps: float = 1e-6) -> Composite:
    """:func:`epsilon_plus` with the flat rule on the first layer."""
    return Composite(ZPlus(), Epsilon(eps), first=Flat())


def epsilon_gamma_box(
    eps: float = 1e-6,
    gamma: float = 0.25,
    low: float | tuple[float, ...] | None = None,
    high: float | tuple[float, ...] | None = None,
) -> Composite:
    """z^B on the first layer, gamma on convolutions, epsilon on dense layers.

    Bounds default to the ImageNet-normalised range of RGB values in [0, 1].
    """
    return Composite(Gamma(gamma), Epsilon(eps), first=ZBox(low, high))


def alpha_beta(alpha: float = 1.0, beta: float = 0.0) -> Composite:
    """Alpha-beta on every convolution and dense layer (Bach et al. 2015)."""
    rule = AlphaBeta(alpha, beta)
    return Composite(rule, rule)


def zplus_box(
    low: float | tuple[float, ...] | None = None,
    high: float | tuple[float, ...] | None = None,
    bias: bool = True,
) -> Composite:
    """z^B on the first layer and z+ everywhere else (deep Taylor decomposition, bounded).

    Bounds default to the ImageNet-normalised range of RGB values in [0, 1], per channel.
    z+ counts the positive bias in its denominators (as zennit's ``ZPlus``); ``bias=False``
    ignores biases. The CLRP authors' code (``JindongGu/Contrastive-LRP``, ``clrp_lib.py``)
    is ``zplus_box(-2.1179, 2.64, bias=False)``: z+ without biases, z^B with the scalar
    bounds of the normalised ImageNet range over all channels, 1e-9 added to every
    denominator (the stabilizer here; the denominators are non-negative, so it is the same).
    """
    return Composite(ZPlus(bias=bias), ZPlus(bias=bias), first=ZBox(low, high))


def zplus_nobias_samplebox(input_stabilizer: float = 1e-9) -> Composite:
    """The LRP baseline of the RAP / RSP authors' code (``wjNam/Relative_Attributing_Propagation``,
    ``modules/layers.py``, the ``relprop`` methods with ``alpha=1``; seed: the target logit).

    * first convolution/dense layer: :class:`~xaijax.propagation.rules.PerSampleZBox`, z^B
      with each image's own minimum and maximum as bounds; the reference adds 1e-9 to its
      (non-negative) denominators (``input_stabilizer``);
    * every other convolution and dense layer, the classifier included: z+ with the bias
      *ignored* and an exact-zero-safe division (``a / b`` where ``b != 0``, else 0; no
      stabilizer): ``AlphaBeta(1, 0, stabilizer=0, bias=False)``;
    * BatchNorm: relevance passes unchanged and is not folded into the convolution
      (``canonize=False``: each convolution's rule sees its own weights);
    * max/average pooling, residual sums, concatenations: the z-rule with the same
      zero-safe division (the reference's ``RelPropSimple``); ReLU and dropout pass; flatten
      and identity: :class:`~xaijax.propagation.rules.Vjp`.

    With biases ignored every rule conserves relevance wherever its denominator is non-zero,
    so the input total is the target logit (up to the input layer's 1e-9).

    Where xaijax differs from that code (documented, not bugs): its BatchNorm multiplies the
    relevance by ``x a / (x a + 1e-9)`` (``x`` its input, ``a = weight / sqrt(running_var**2 +
    eps)`` as written there), i.e. passes it up to a relative 1e-9 / |x a|, and zero where
    its input is exactly zero; its z+ normalises the
    ``x+ W+`` and ``x- W-`` paths separately, which differs from the joint denominator here
    only for layers with inputs of both signs (none in its networks: every hidden layer reads
    ReLU outputs). Compare :func:`zplus_box` (xaijax's and zennit's z+, fixed bounds).
    """
    zero = Epsilon(0.0)
    zplus = AlphaBeta(1.0, 0.0, 0.0, bias=False)
    return Composite(
        conv=zplus,
        dense=zplus,
        first=PerSampleZBox(input_stabilizer),
        kinds={
            "batchnorm": Pass(),
            "relu": Pass(),
            "dropout": Pass(),
            "maxpool": zero,
            "avgpool": zero,
            "add": zero,
            "concat": zero,
            "reshape": Vjp(),
            "identity": Vjp(),
        },
        canonize=False,
    )


def excitation(stabilizer: float = 1e-20) -> Composite:
    """Excitation Backprop as in TorchRay: MWP rule on convolutions and dense layers.

    Average pools and residual sums share in proportion to their inputs, BatchNorm passes the
    signal unchanged and is not folded, ReLU and max pooling use the ordinary VJP (:class:`~xaijax.propagation.rules.Vjp`).
    """
    rule = Excitation(stabilizer)
    return Composite(
        rule,
        rule,
        kinds={"relu": Vjp(), "batchnorm": Pass(), "maxpool": Vjp(), "avgpool": Epsilon(0.0), "add": Epsilon(0.0)},
        canonize=False,
    )


def contrastive_excitation(stabilizer: float = 1e-20) -> Composite:
    """:func:`excitation` whose classifier layer emits target minus flipped-weights signal."""
    return excitation(stabilizer).replace(last=FlipContrast(Excitation(stabilizer)))


def rsp() -> Composite:
    """Stage 2 of Relative Sectional Propagation (Nam et al. 2021), from the reference code.

    First convolution: :class:`~xaijax.propagation.rules.PerSampleZBox` (z^B with per-sample
    image bounds, the reference's ``RSPInput``); other convolutions: :class:`~xaijax.propagation.rsp_rules.RSPConv`
    (sectional weight-gradient kernels, doubled and uniformly shifted for kernels larger
    than 1x1); ReLU passes; max/average pooling: z-rule on ``x + 1e-9``; residual sums: split
    by ``max(x_k, 0) + 1e-9``; BatchNorm is *not* folded (the reference propagates the
    convolution with its own weights and passes relevance through the BatchNorm where its
    input is nonzero). RSP starts at the CAM layer (``seed_at``), so dense layers (the
    classifier) are never reached; they get the z-rule only so that the plan is complete.
    """
    return Composite(
        conv=RSPConv(),
        dense=Epsilon(0.0),
        first=PerSampleZBox(),
        kinds={
            "relu": Pass(),
            "maxpool": RSPShifted(),
            "avgpool": RSPShifted(),
            "add": RSPAdd(),
            "batchnorm": RSPBatchNorm(),
            "concat": Vjp(),
        },
        canonize=False,
    )


#: Gamma of AttnLRP on a ViT's convolution (patch embedding) and dense layers: the middle
#: values of the grid the AttnLRP authors' ViT example sweeps (``lxt``, ``examples/vit_torch.py``:
#: convolution 0.1, 0.25, 100; linear 0, 0.01, 0.05, 0.1, 1). They give no single recommended
#: value; the paper's main rule for linear layers is epsilon (``conv_gamma=None,
#: dense_gamma=None``).
VIT_CONV_GAMMA = 0.25
VIT_DENSE_GAMMA = 0.05


def _linear_rule(gamma: float | None, eps: float) -> Rule:
    return Epsilon(eps) if gamma is None else Gamma(gamma)


def attnlrp(eps: float = 1e-6, conv_gamma: float | None = VIT_CONV_GAMMA, dense_gamma: float | None = VIT_DENSE_GAMMA) -> Composite:
    """AttnLRP (Achtibat et al., ICML 2024) for the zoo's vision transformers.

    * LayerNorm: :class:`~xaijax.propagation.transformer_rules.LayerNormRule` (``eps``);
    * softmax: :class:`~xaijax.propagation.transformer_rules.SoftmaxRule`;
    * ``q.k^T`` and ``attention.v``: :class:`~xaijax.propagation.transformer_rules.BilinearUniform`
      (``eps``), each factor gets half;
    * GELU: identity (:class:`~xaijax.propagation.rules.Pass`); token re-arrangements: Vjp;
      residual sums, the position-embedding sum and averages: the z-rule;
    * convolutions / dense layers: ``Gamma(conv_gamma)`` / ``Gamma(dense_gamma)`` (the gamma
      rule the authors use on ViTs, :data:`VIT_CONV_GAMMA`, :data:`VIT_DENSE_GAMMA`), or
      ``Epsilon(eps)`` where the gamma is None (the paper's epsilon rule).

    With ``eps=0``, no gamma and zero biases every layer but the softmax conserves relevance.
    """
    return Composite(
        conv=_linear_rule(conv_gamma, eps),
        dense=_linear_rule(dense_gamma, eps),
        kinds={"layernorm": LayerNormRule(eps), "softmax": SoftmaxRule(), "matmul": BilinearUniform(eps)},
    )


def cp_lrp(eps: float = 1e-6, conv_gamma: float | None = VIT_CONV_GAMMA, dense_gamma: float | None = VIT_DENSE_GAMMA) -> Composite:
    """CP-LRP (Ali et al., ICML 2022, "conservative propagation"): attention held constant.

    As :func:`attnlrp` except inside attention: in ``attention.v`` the attention probabilities
    are constants and ``v`` gets all the relevance
    (:class:`~xaijax.propagation.transformer_rules.ConstantFactor`, first factor held — the
    zoo's ``MatMul()(attn, v)`` order), and the softmax passes nothing
    (:class:`~xaijax.propagation.transformer_rules.Stop`), so ``q``, ``k`` and their projection
    receive no relevance. LayerNorm as in AttnLRP (normaliser held constant). With ``eps=0``,
    no gamma and zero biases (position embedding and prefix tokens included) the input total
    equals the target logit.

    This is also what the AttnLRP authors' ``lxt`` does to torchvision's ViT in its efficient
    mode (CP-LRP inside the attention, AttnLRP's LayerNorm and GELU rules outside; their
    comment: easier to tune with gamma), with one difference: in torchvision's
    ``nn.MultiheadAttention`` the q/k/v and output projections run through ``F.linear``, so
    zennit's gamma hooks never reach them and ``lxt`` leaves them on the z-rule, while this
    composite gives them the dense gamma like every other linear layer. ``tests/test_lxt_reference.py``
    matches ``lxt`` to 1e-9 (float64) with ``names={"*.in_proj": Epsilon(0), "*.out_proj": Epsilon(0)}``.
    """
    return Composite(
        conv=_linear_rule(conv_gamma, eps),
        dense=_linear_rule(dense_gamma, eps),
        kinds={"layernorm": LayerNormRule(eps), "softmax": Stop(), "matmul": ConstantFactor(0, eps)},
    )


_NAMED: dict[str, Callable[..., Composite]] = {
    "zero": zero,
    "epsilon": epsilon,
    "epsilon-plus": epsilon_plus,
    "epsilon-plus-flat": epsilon_plus_flat,
    "epsilon-gamma-box": epsilon_gamma_box,
    "alpha-beta": alpha_beta,
    "alpha1-beta0": lambda: alpha_beta(1.0, 0.0),
    "alpha2-beta1": lambda: alpha_beta(2.0, 1.0),
    "zplus-box": zplus_box,
    "zplus-nobias-samplebox": zplus_nobias_samplebox,
    "excitation": excitation,
    "contrastive-excitation": contrastive_excitation,
    "rsp": rsp,
    "attnlrp": attnlrp,
    "cp-lrp": cp_lrp,
}


def names() -> list[str]:
    """Names of the built-in composites."""
    return sorted(_NAMED)


def get(name: str, **kwargs: Any) -> Composite:
    """Build the built-in composite ``name`` with keyword overrides."""
    try:
        factory = _NAMED[name]
    except KeyError:
        raise ValueError(f"unknown composite {name!r}; built-in composites: {', '.join(names())}") from None
    try:
        return factory(**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for composite {name!r}: {e}") from None


def resolve(composite: Composite | str) -> Composite:
    """A :class:`Composite` from itself or a built-in composite name."""
    if isinstance(composite, Composite):
        return composite
    if isinstance(composite, str):
        return get(composite)
    raise ValueError(f"composite must be a Composite or a built-in composite name, got {composite!r}")
