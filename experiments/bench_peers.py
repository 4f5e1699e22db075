"""xaijax vs the PyTorch peers (zennit, Captum, TorchRay, pytorch-grad-cam): speed and agreement.

VGG16 and ResNet50 (torchvision classes on the torch side, the xaijax zoo models on the
other) with the *same* seeded random weights (He-normal kernels, random biases and BN
statistics; ported with :func:`xaijax.checkpoints.to_torch_state_dict`) and the same
images. For every method both sides have, each side is run after a warm-up call (xaijax:
the jit compile; torch: first-call allocations), ``--repeats`` times, and the median wall
time is reported together with the agreement of the two maps:

    err(a, b) = max|a - b| / max|b|      (after the documented transformation)

Four errors per row: ``err(xaijax, peer f32)``; ``err(xaijax, peer f64)``, the peer run
once more (not timed) on a float64 copy of the torch model (fresh ``.double()`` model,
float64 input, torch's default dtype float64 so the peer's own tensors follow);
``err(peer f32, peer f64)``, the peer's own float32 error; and ``err(xaijax f64, peer f64)``,
xaijax run once more (not timed) with ``jax_enable_x64`` on float64 weights and input.

Agreement (``--criterion``, :func:`judge`). ``float64``, the default (issue 26): an ``exact``
or ``raw terms`` row agrees when ``err(xaijax f64, peer f64) <= --agree`` (1e-6): both
libraries compute the same function; the float32 errors are information (a float32 gap
is the input's conditioning: near-ties of ReLU / max-pool that rounding flips, visible in
the peer's own float32 error). Without ``err(xaijax f64, peer f64)`` (``--no-peer-f64``,
``--xaijax-f64 never``, or a float64 run that failed) the row is *not judged* ("n/a"), never
judged on a float32 error instead. Extremal perturbation agrees when the energies at
iteration 0 (reward and area regulariser, computed by both sides from the same initial
masks) agree: xaijax float64 (one SGD step with ``jax_enable_x64``: the method optimises in
its input's dtype) vs TorchRay float64 ``<= --agree``, or, without that, xaijax float32 (the
timed run) vs TorchRay float64 ``<= --agree-energy`` (1e-5); the final masks' statistics
(per mask: mean, fraction of pixels >= 0.5, both sides) are recorded as information.
``--criterion float32`` restores the rule of the tables before issue 26, for comparison
with them: ``err(xaijax f32, peer f64) <= --agree-f32`` (1e-4; ``err(xaijax f32, peer f32)``
without the float64 peer; extremal: its final masks). A timing is a win (``ratio = peer /
xaijax > 1``) only for a row that agrees. Every row also records ``agrees_float32_rule``.

Comparison kinds: ``exact`` (the same quantity, after the documented transformation);
``raw terms`` (FullGrad: pytorch-grad-cam's own per-layer terms ``sum_c |b_c dS/dz_c|``
and its input term ``|dS/dx * x|``, captured from its hooks, against
:func:`xaijax.methods.gradient.fullgrad_decompose`, max error over the terms; its final
map, whose per-channel min-max normalisation amplifies rounding noise in nearly constant
channels, is reported for information, rebuilt on xaijax's terms); ``optimisation``
(extremal perturbation: TorchRay's and xaijax's masks after the same ``ep_iter`` SGD
steps, same areas / blur / jitter, and the same reward: the target logit times ``ep_reward /
|target logit of the clean image|``, so that reward and area term have comparable sizes; a
row whose masks never left their initial value is marked vacuous; its SGD trajectories
diverge after the first iterations, as TorchRay's float32 run diverges from its own
float64 run: the area regulariser's sort and the network's ReLUs make the gradient
discontinuous, and rounding picks a side). SmoothGrad is exact: Captum's NoiseTunnel is
given xaijax's very noise (``torch.normal`` replaced during the call) and both report the
channel sum of the mean raw gradient.
Transformations (those of ``tests/test_peer_references.py``, plus the LRP stabilizer below):
min-max normalisation of xaijax's maps for pytorch-grad-cam, ``p`` times xaijax's RISE for
TorchRay (which was given xaijax's masks and the model ``logit(softmax(f))``), z+ composites
on the network with conv-side biases zeroed (as the recorded references; not needed for the
definitions: zennit's z+ keeps ``b+`` exactly as xaijax's does), LRP output relevance
= target logit for zennit, xaijax's LRP composites given zennit's stabilizer (1e-9) on
average pools and residual sums (zennit's ``Norm`` rule there; xaijax's default is the plain
z-rule, which the recorded-reference tests compare at their looser tolerance), and zennit on
ResNet is given the same network with every BatchNorm's ``eps`` folded into ``running_var``
(its BatchNorm merge leaves ``x / sqrt(1 + eps)``
behind; see :func:`make_peer_references.fold_bn_eps`; the note gives the unfolded error).

Environment: the peer virtualenv (``experiments/PEERS.md``), one process for both sides::

    /work/peer-venv/bin/python experiments/bench_peers.py --quick          # 112 px, batch 1
    /work/peer-venv/bin/python experiments/bench_peers.py                  # 224 px, batches 1 16
    /work/peer-venv/bin/python experiments/bench_peers.py --criterion float32   # the pre-issue-26 rule
    /work/peer-venv/bin/python experiments/bench_peers.py --batches 1
    /work/peer-venv/bin/python experiments/bench_peers.py --size 64 --batches 1 --repeats 1 --out-dir /tmp/p

Writes ``experiments/results/bench_peers.json`` and ``.md`` (atomically) at the end; every
finished row is also appended to ``bench_peers.partial.jsonl`` there, so a crash keeps them.
``--update`` merges a run into the existing files instead (its rows replace those with the same
model, batch, method and peer; each row records which run it came from), e.g. to redo one model
and batch size. The float64 peer reference runs over the batch in chunks of ``--f64-chunk`` (4)
images: every method here maps each image independently, and pytorch-grad-cam's FullGrad, which
upsamples every channel of every layer to the input size, peaks at 17 GB for ResNet50 at batch
16 in float32 alone. For the same reason its *timed* float32 call runs over the batch in chunks
of ``--peer-chunk`` (4) images, back to back (an earlier full run was killed at 24 GB RSS on a
23 GB machine in ResNet50 batch-16 FullGrad); the row's note and ``peer_chunk`` say so.

"The table must come from one run": the JSON's meta records the run's ``started``,
``finished`` and ``duration_s``, and the markdown says "One run from START to END"; a table
merged with ``--update`` says that it is NOT from one run and lists the runs. torch uses
``torch.set_num_threads(os.cpu_count())``; JAX/XLA uses its default CPU thread pool. The
JSON records versions, thread settings, and the load average before and after each model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pytorch-grad-cam's normalisations, shared with tests/test_peer_references.py
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import make_peer_references as R  # noqa: E402
from reference_helpers import fullgrad_postprocess, minmax  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out = fn()  # warm-up (compile / allocation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def rel_err(ours: np.ndarray, theirs: np.ndarray) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    scale = np.abs(theirs).max()
    return float(np.abs(ours - theirs).max() / scale) if scale > 0 else float("nan")


def xaijax_methods(cfg: dict[str, Any]) -> dict[str, tuple[Any, Callable[[np.ndarray], np.ndarray], str, str]]:
    """``{name: (method, transform applied to xaijax's map, comparison kind, peer key)}``.

    ``peer key``: the entry of :func:`make_peer_references.peer_methods` it is compared with.
    """
    from xaijax.methods import get
    from xaijax.methods.cam import GradCAMPlusPlus
    from xaijax.methods.perturbation import ExtremalPerturbation
    from xaijax.methods.gradient import IntegratedGradients
    from xaijax.methods.excitation import ExcitationBackprop
    from xaijax.methods.lrp import LRP
    from xaijax.methods.perturbation import RISE
    from xaijax.propagation import composites as C
    from xaijax.propagation.rules import Epsilon

    ident = lambda m: m  # noqa: E731

    def lrp(composite: C.Composite) -> LRP:
        # zennit's composites (layer_map_base(stabilizer)) put Norm(stabilizer) on average pools and
        # residual sums: R x_k / (z + stabilizer sign z), where xaijax's composites use the plain z-rule
        # (Epsilon(0)). The two differ by a relative stabilizer / z, ~1e-6 where a pooled or summed value is
        # ~1e-3 (measured at 224 px in float64: 1.9e-6 for VGG16, 1.4e-6 for ResNet50, -> <= 6e-8 with the
        # same stabilizer). The bench gives xaijax the stabilizer zennit is given.
        kinds = {"avgpool": Epsilon(R.ZPLUS_STABILIZER), "add": Epsilon(R.ZPLUS_STABILIZER)}
        return LRP(dataclasses.replace(composite, kinds=kinds))

    rise = cfg["rise"]
    ep = ExtremalPerturbation(areas=tuple(cfg["ep_areas"]), max_iter=cfg["ep_iter"])
    out = {
        "gradient": (get("gradient"), ident, "exact", "gradient"),
        "gradient-x-input": (get("gradient-x-input"), ident, "exact", "gradient-x-input"),
        "guided-backprop": (get("guided-backprop"), ident, "exact", "guided-backprop"),
        "integrated-gradients": (IntegratedGradients(steps=cfg["ig_steps"], rule="gauss-legendre"), ident, "exact",
                                 "integrated-gradients"),
        # Smooth's default seed 0: the noise given to Captum (smoothgrad_eps) is drawn with it
        "smoothgrad": (get("smoothgrad", n=cfg["sg_n"], noise=cfg["sg_noise"], reduce="sum"), ident, "exact",
                       "smoothgrad-shared-noise"),
        "grad-cam": (get("grad-cam"), ident, "exact", "grad-cam"),
        "grad-cam-plus-plus": (GradCAMPlusPlus(eps=1e-6), ident, "exact", "grad-cam-plus-plus"),
        "fullgrad": (get("fullgrad"), ident, "raw terms", "fullgrad"),
        "lrp-epsilon": (lrp(C.epsilon(R.EPS)), ident, "exact", "lrp-epsilon"),
        "lrp-epsilon-plus": (lrp(C.epsilon_plus(R.EPS)), ident, "exact", "lrp-epsilon-plus"),
        "lrp-epsilon-plus-flat": (lrp(C.epsilon_plus_flat(R.EPS)), ident, "exact", "lrp-epsilon-plus-flat"),
        "excitation-backprop": (ExcitationBackprop(resize=False), ident, "exact", "excitation-backprop"),
        "contrastive-excitation-backprop": (ExcitationBackprop(contrastive=True, resize=False), ident, "exact",
                                            "contrastive-excitation-backprop"),
        "rise": (RISE(n=rise["n"], s=rise["s"], p=rise["p"], seed=rise["seed"], chunk=min(rise["n"], 16)),
                 lambda m: m * rise["p"], "exact", "rise"),
        # (N, A, H, W): one mask per area, as TorchRay returns them
        # ExtremalResult: masks (N, A, H, W), one per area as TorchRay returns them, and the energy history
        "extremal-perturbation": (lambda mo, v, x, t: ep.optimise(mo, v, x, t), ident, "optimisation",
                                  "extremal-perturbation-masks"),
    }
    return out


PGC = "pytorch-grad-cam"
#: methods whose timed peer call runs over the batch in chunks of ``--peer-chunk`` images (memory)
PEER_CHUNKED = ("fullgrad",)
#: peers that patch the model (hooks, canonizers; TorchRay's extremal_perturbation sets
#: ``requires_grad=False`` on every parameter, after which pytorch-grad-cam's backward fails):
#: a fresh model per call
PATCHING = ("excitation-backprop", "contrastive-excitation-backprop", "lrp-epsilon", "lrp-epsilon-plus",
            "lrp-epsilon-plus-flat", "extremal-perturbation")


#: xaijax float64 vs peer float64 at most this: the same function (some peers keep float32 constants in
#: their float64 run, e.g. Captum's IG step sizes ``torch.tensor(step_sizes).float()``: ~6e-8). The
#: default of ``--agree`` (the float64 criterion's threshold) is this value.
X64_SAME = 1e-6

#: the agreement criteria of ``--criterion`` (see :func:`judge`)
CRITERIA = ("float64", "float32")


def judge(kind: str, criterion: str, *, err32: float | None, err64: float | None, x64err: float | None,
          energy_it0: float | None = None, energy_it0_x64: float | None = None, vacuous: bool = False,
          agree: float = X64_SAME, agree_f32: float = 1e-4, agree_energy: float = 1e-5
          ) -> tuple[bool | None, float | None, str]:
    """Whether a row agrees: ``(agrees, decisive error, basis)``; ``agrees`` is None when the row cannot be
    judged under ``criterion`` (then ``decisive`` is None and ``basis`` says why).

    ``criterion="float64"`` (the default; issue 26): ``exact`` and ``raw terms`` rows agree when
    ``x64err = err(xaijax float64, peer float64) <= agree``; without ``x64err`` (peer float64 off or failed,
    xaijax float64 not run or failed) the row is not judged, never judged on a float32 error instead.
    ``optimisation`` rows (extremal perturbation) are judged on the energies at iteration 0, which both
    sides compute from the same initial masks (the SGD trajectories diverge afterwards; the final masks
    are information): xaijax float64 vs peer float64 ``<= agree`` when xaijax's float64 energies exist,
    else xaijax float32 vs peer float64 ``<= agree_energy`` (the benchmark's timed extremal run is float32).
    ``criterion="float32"``: the rule of the tables before issue 26, for comparison with them:
    ``err(xaijax float32, peer float64) <= agree_f32``, or ``err(xaijax float32, peer float32)`` without the
    float64 peer, for every kind (extremal: the masks). ``vacuous`` (masks that never moved): False.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if kind not in ("exact", "raw terms", "optimisation"):
        raise ValueError(f"kind must be 'exact', 'raw terms' or 'optimisation', got {kind!r}")
    if criterion == "float32":
        decisive = err64 if err64 is not None else err32
        if decisive is None:
            return None, None, "not judged: no float32 error"
        basis = "xaijax f32 vs peer f64" if err64 is not None else "xaijax f32 vs peer f32 (no float64 peer)"
        ok = bool(decisive <= agree_f32) and not vacuous
        return ok, decisive, f"{basis} <= {agree_f32:g}" + ("; vacuous" if vacuous else "")
    if kind == "optimisation":
        if energy_it0_x64 is not None:
            decisive, thr, basis = energy_it0_x64, agree, "iteration-0 energies, xaijax f64 vs peer f64"
        elif energy_it0 is not None:
            decisive, thr, basis = energy_it0, agree_energy, "iteration-0 energies, xaijax f32 vs peer f64"
        else:
            return None, None, "not judged: no float64 peer energy history"
        ok = bool(decisive <= thr) and not vacuous
        return ok, decisive, f"{basis} <= {thr:g}" + ("; vacuous" if vacuous else "")
    if x64err is None:
        return None, None, "not judged: no xaijax float64 vs peer float64 error"
    return bool(x64err <= agree), x64err, f"xaijax f64 vs peer f64 <= {agree:g}"


def mask_stats(masks: np.ndarray) -> dict[str, np.ndarray]:
    """Per mask of ``masks`` (N, A, H, W): ``mean`` and ``frac05`` (the fraction of pixels >= 0.5), (N, A)."""
    m = np.asarray(masks, np.float64)
    return {"mean": m.mean(axis=(-2, -1)), "frac05": (m >= 0.5).mean(axis=(-2, -1))}


def _f64(tree: Any) -> Any:
    """Every array of ``tree`` as a float64 jax array (call inside :func:`_in_x64`)."""
    import jax
    import jax.numpy as jnp

    return jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float64)), tree)


def _in_x64(fn: Callable[[], Any]) -> Any:
    """``fn()`` with ``jax_enable_x64`` on (restored afterwards); its arrays come back as numpy."""
    import jax

    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        return jax.tree_util.tree_map(np.asarray, fn())
    finally:
        jax.config.update("jax_enable_x64", prev)


def _fullgrad_terms(model, v, x, t) -> tuple[list[np.ndarray], tuple[np.ndarray, list[np.ndarray]]]:
    """xaijax's FullGrad terms in pytorch-grad-cam's form: ``[|dS/dx x| (N, C, H, W)] + [sum_c |b dS/dz|
    (N, h, w) per 2-D bias]``, and ``(dS/dx x, [b dS/dz (N, h, w, K)])`` for the final-map rebuild."""
    import jax

    from xaijax.methods.gradient import fullgrad_decompose

    gx, biases, _ = jax.jit(lambda vv, xx, tt: fullgrad_decompose(model, vv, xx, tt))(v, x, t)
    gx = np.asarray(gx)
    bias4 = [np.asarray(bt) for bt in biases.values() if np.ndim(bt) == 4]
    return [np.abs(gx).transpose(0, 3, 1, 2)] + [np.abs(bt).sum(-1) for bt in bias4], (gx, bias4)


def _energy_divergence(ours_hist, hist32, hist64) -> dict[str, Any]:
    """Extremal perturbation energy histories: xaijax ``(reward, regul)`` each (T, N, A); TorchRay's
    per image (A, 2, T) lists. Error at iteration 0 and the first iteration whose reward or regulariser
    is off by more than 1e-4 (relative to the float64 value) for xaijax and for TorchRay float32."""
    r64 = np.stack([h[:, 0].T for h in hist64], 1)  # (T, N, A)
    g64 = np.stack([h[:, 1].T for h in hist64], 1)

    def rel(a, b):
        return np.abs(a - b).max(axis=(1, 2)) / np.abs(b).max(axis=(1, 2))  # per iteration

    def first_off(r, g):
        off = np.nonzero(np.maximum(rel(r, r64), rel(g, g64)) > 1e-4)[0]
        return int(off[0]) if len(off) else None

    xr, xg = ours_hist
    out = {"energy_it0_err": _energy_it0_err(xr, xg, hist64), "first_iter_off_xaijax": first_off(xr, xg)}
    if hist32:
        out["first_iter_off_peer_f32"] = first_off(np.stack([h[:, 0].T for h in hist32], 1),
                                                   np.stack([h[:, 1].T for h in hist32], 1))
    return out


def _energy_it0_err(reward: np.ndarray, regul: np.ndarray, hist64: list[np.ndarray]) -> float:
    """Relative error of iteration 0's (reward, regul) (T, N, A) against TorchRay's float64 history (A, 2, T)
    per image: max over images and areas of |a - b| / max|b|, the worse of reward and regulariser."""
    r64 = np.stack([h[:, 0, 0] for h in hist64], 0)  # (N, A)
    g64 = np.stack([h[:, 1, 0] for h in hist64], 0)
    rel = lambda a, b: float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())  # noqa: E731
    return max(rel(reward[0], r64), rel(regul[0], g64))


def _chunked(pfn: Callable, chunk: int) -> Callable:
    """``pfn(model, x, t)`` over the batch in chunks of ``chunk`` images, outputs concatenated (timed as one
    call: the chunks run back to back, no garbage collection between them)."""
    def run(model, x, t):
        return np.concatenate([np.asarray(pfn(model, x[i:i + chunk], t[i:i + chunk]))
                               for i in range(0, len(x), chunk)])
    return run


def _in_chunks(make_fn: Callable[[dict], Callable], model, x, t, chunk: int, side: dict) -> np.ndarray:
    """A peer method over the batch ``x`` in chunks of ``chunk`` images, outputs concatenated.

    ``make_fn(s)`` builds the peer method with side-output dict ``s``; the arrays the chunks
    leave there (pytorch-grad-cam's FullGrad terms) are concatenated into ``side``. Only for
    methods whose map of one image does not depend on the others in the batch (all of the
    bench's, extremal perturbation aside: it is run whole)."""
    outs, sides = [], []
    for i in range(0, len(x), chunk):
        s: dict = {}
        outs.append(np.asarray(make_fn(s)(model, x[i:i + chunk], t[i:i + chunk])))
        sides.append(s)
        _release_memory()
    for key in sides[0]:
        parts = [s_[key] for s_ in sides]
        if key == "fullgrad_terms":  # one (n, h, w) array per layer
            side[key] = [np.concatenate(layer) for layer in zip(*parts)]
        elif isinstance(parts[0], np.ndarray):  # batch-first arrays
            side[key] = np.concatenate(parts)
        else:  # lists of per-image items (extremal's energy histories)
            side[key] = [item for p in parts for item in p]
    return np.concatenate(outs)


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so that
    the peak of one row (pytorch-grad-cam's FullGrad: 17 GB at batch 16) does not stay resident."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _pgc_terms(side: dict) -> list[np.ndarray]:
    """pytorch-grad-cam's captured FullGrad terms (see make_peer_references.peer_methods ``side``)."""
    return [side["fullgrad_input"]] + list(side["fullgrad_terms"])


def _match_terms(ours: list[np.ndarray], theirs: list[np.ndarray]) -> float:
    """Max over ``theirs`` of the error of the best-matching (same shape, smallest error) term of
    ``ours``, each used once (pytorch-grad-cam's terms are in module order, xaijax's by name)."""
    left = list(ours)
    worst = 0.0
    if len(left) != len(theirs):
        return float("inf")
    for t in theirs:
        errs = [rel_err(o, t) if o.shape == t.shape else np.inf for o in left]
        i = int(np.argmin(errs))
        worst = max(worst, float(errs[i]))
        left.pop(i)
    return worst


def bench_family(family: str, size: int, batches: list[int], cfg: dict[str, Any], args) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    import torch

    from xaijax.checkpoints import from_torch_state_dict
    from xaijax.methods.perturbation import rise_masks

    arch = {"vgg": "vgg16", "resnet": "resnet50"}[family]
    from xaijax import models

    model = models.get(arch)
    sd = R.make_weights(family, model, size, seed=0)
    sd_nb = R.bias_free(sd)
    variables = from_torch_state_dict(model, sd, input_shape=(1, size, size, 3))
    variables_nb = from_torch_state_dict(model, sd_nb, input_shape=(1, size, size, 3))
    tmodel = {"vgg": lambda: R.torch_model("vgg", 1000), "resnet": lambda: R.torch_model("resnet", 1000, 64)}[family]
    torch_full = R.load_torch(tmodel(), sd)
    torch_nb = R.load_torch(tmodel(), sd_nb)
    xm = xaijax_methods(cfg)
    rows = []
    rng = np.random.default_rng(1)
    sg_eps = R.smoothgrad_eps(cfg["sg_n"], (size, size, 3), seed=0)
    for b in batches:
        x = rng.standard_normal((b, size, size, 3)).astype(np.float32)
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        with torch.no_grad():  # explain the predicted class (random weights give near one-hot
            logits = torch_full(xt).numpy()  # softmax: RISE needs p > 0)
        target = logits.argmax(1).astype(np.int64)
        tt = torch.from_numpy(target)
        xj, tj = jnp.asarray(x), jnp.asarray(target.astype(np.int32))
        masks = np.asarray(rise_masks(cfg["rise"]["seed"], np.arange(cfg["rise"]["n"]), (size, size),
                                      cfg["rise"]["s"], cfg["rise"]["p"]), np.float32)
        side: dict = {}
        # extremal perturbation: reward = scale * target logit, scale = ep_reward / (target logit of the clean
        # image), the same on both sides (random-weight ResNet50 logits are ~1e3-1e4: unscaled, the reward's
        # gradient swamps the area term, every parameter stays clipped at 1 and the masks never move)
        clean = np.abs(logits[np.arange(b), target])
        ep_scale = (np.ones(b) if cfg["ep_reward"] is None else cfg["ep_reward"] / clean).astype(np.float32)
        ep_seed = jnp.asarray(ep_scale[:, None] * np.eye(logits.shape[-1], dtype=np.float32)[target])
        pkw = dict(ig_steps=cfg["ig_steps"], sg_n=cfg["sg_n"], sg_noise=cfg["sg_noise"], sg_eps=sg_eps,
                   ep_areas=tuple(cfg["ep_areas"]), ep_iter=cfg["ep_iter"], ep_reward_scale=[float(s_) for s_ in ep_scale])
        peers = R.peer_methods(family, masks, **pkw)
        peers_side = R.peer_methods(family, masks, side=side, **pkw)  # FullGrad: also its raw terms
        for name, (method, transform, kind, peer_key) in xm.items():
            if args.methods and name not in args.methods:
                continue
            if b > 1 and name in cfg["batch1_only"]:
                continue
            nobias = name in R.NOBIAS_METHODS
            v = variables_nb if nobias else variables
            fn = jax.jit(lambda vv, xx, t, _m=method: _m(model, vv, xx, t))
            if kind == "optimisation":
                # extremal perturbation called on concrete arrays runs its SGD steps from a Python loop
                # over one jitted step; jitted whole it is one lax.scan, whose backward passes XLA's CPU
                # backend runs ~2x slower (see xaijax.methods.perturbation.extremal._optimise)
                fn = lambda vv, xx, t, _m=method: _m(model, vv, xx, t)  # noqa: E731
            load0 = os.getloadavg()
            tv = ep_seed if kind == "optimisation" else tj  # extremal: the float seed scale * one_hot(target)
            tx, ours = _median_time(lambda: jax.block_until_ready(fn(v, xj, tv)), cfg["repeats"])
            ours_hist = None
            if kind == "optimisation":  # ExtremalResult: masks (N, A, H, W) and the energy history
                ours, ours_hist = ours.masks, (np.asarray(ours.reward), np.asarray(ours.regul))
            ours = transform(np.asarray(ours))
            for peer, pfn in peers.get(peer_key, {}).items():
                if peer == "torchray" and name in ("gradient", "guided-backprop") and not args.all_peers:
                    continue  # same algorithm as Captum's; --all-peers times it too
                sdict = sd_nb if nobias else sd
                # zennit on ResNet: the same network with BatchNorm eps folded into running_var, on which
                # zennit's BatchNorm merge is exact (see make_peer_references.fold_bn_eps)
                prep = R.fold_bn_eps if (peer == "zennit" and family == "resnet") else (lambda m_: m_)
                tm = torch_nb if nobias else torch_full
                if name in PATCHING:
                    tm = prep(R.load_torch(tmodel(), sdict))  # these peers patch the model
                if kind == "optimisation":
                    pfn = peers_side[peer_key][peer]  # also stores the energy history (side)
                note = ""
                peer_chunk = None
                if name in PEER_CHUNKED and b > args.peer_chunk:
                    # pytorch-grad-cam's FullGrad upsamples every channel of every biased layer to the input
                    # size: ResNet50 at batch 16 peaks at ~17 GB in float32, which with the process's other
                    # memory exceeded a 23 GB machine (an earlier full run was killed at 24 GB RSS here).
                    # Its map of one image does not depend on the others: timed over the batch in chunks.
                    peer_chunk = args.peer_chunk
                    pfn = _chunked(pfn, peer_chunk)
                    note += (f"; peer timed over the batch in chunks of {peer_chunk} images, back to back (its "
                             f"whole-batch call peaks at ~17 GB for ResNet50 at batch 16)")
                tp, theirs = _median_time(lambda: pfn(tm, xt, tt), cfg["repeats"])
                _release_memory()
                # the float64 reference: a fresh float64 model (peers patch modules), not timed
                theirs64 = None
                side64: dict = {}
                if args.peer_f64:
                    # per-image methods: the float64 run goes over the batch in chunks of --f64-chunk images
                    # (the same maps; pytorch-grad-cam's FullGrad needs 17 GB for 16 images even in float32)
                    chunk = b if kind == "optimisation" else args.f64_chunk

                    def run64(model64, _peer=peer, _key=peer_key, _chunk=chunk):
                        return _in_chunks(lambda s: R.peer_methods(family, masks, side=s, **pkw)[_key][_peer],
                                          model64, xt.double(), tt, _chunk, side64)

                    try:
                        with R.float64_defaults():
                            theirs64 = run64(prep(R.load_torch(tmodel(), sdict).double()))
                            if peer == "zennit" and family == "resnet":  # as zennit runs it: the BN eps kept
                                asis = run64(R.load_torch(tmodel(), sdict).double())
                                note += (f"; zennit given the network with BatchNorm eps folded into running_var "
                                         f"(its BN merge leaves x/sqrt(1+eps)); unfolded: err vs peer f64 "
                                         f"{rel_err(ours, asis):.1e}")
                    except Exception as e:  # noqa: BLE001 - reported in the row
                        msg = f"peer float64 run failed ({type(e).__name__}: {str(e)[:120]})"
                        note += f"; {msg}"
                        print(f"  {msg}", flush=True)
                else:
                    note += "; float64 peer not run (--no-peer-f64)"
                pgc_map = peer == PGC and name != "fullgrad"
                extra: dict[str, Any] = {}
                if kind == "raw terms":
                    # pytorch-grad-cam's own terms (untimed call on the same model, in chunks like the
                    # float64 run: the same terms, a quarter of the memory) vs xaijax's decomposition
                    _in_chunks(lambda s: R.peer_methods(family, masks, side=s, **pkw)[peer_key][peer], tm, xt, tt,
                               args.f64_chunk, side)
                    ours_cmp, (gx, bias4) = _fullgrad_terms(model, v, xj, tj)
                    theirs_cmp = _pgc_terms(side)
                    theirs64_cmp = _pgc_terms(side64) if theirs64 is not None else None
                    compare = _match_terms
                    rebuilt = fullgrad_postprocess(gx, bias4)
                    extra = {"n_terms": len(ours_cmp), "final_map_err_peer_f32": rel_err(rebuilt, theirs),
                             "final_map_err_peer_f64": rel_err(rebuilt, theirs64) if theirs64 is not None else None}
                else:
                    ours_cmp = minmax(ours) if pgc_map else ours
                    theirs_cmp, theirs64_cmp = theirs, theirs64
                    compare = rel_err
                err32 = compare(ours_cmp, theirs_cmp)
                err64 = compare(ours_cmp, theirs64_cmp) if theirs64 is not None else None
                drift = compare(theirs_cmp, theirs64_cmp) if theirs64 is not None else None
                vacuous = False
                if kind == "optimisation":  # vacuous if the masks never left their initial value (pm = 1)
                    from xaijax.methods.perturbation.extremal import extremal_mask, mask_geometry

                    g = mask_geometry((size, size), 7, 21.0)
                    moved = float(np.abs(ours - np.asarray(extremal_mask(jnp.ones(g.shape_in), g)[0])).max())
                    extra["mask_moved"] = moved
                    if moved < 1e-6:
                        vacuous = True
                        note += "; vacuous: the masks never left their initial value (pm = 1)"
                    # the final masks' statistics, information: per mask (N, A) the mean and the fraction >= 0.5
                    stats = {"xaijax": mask_stats(ours), "peer_f32": mask_stats(theirs)}
                    if theirs64 is not None:
                        stats["peer_f64"] = mask_stats(theirs64)
                    for side_name, st in stats.items():
                        for stat, val in st.items():
                            extra[f"mask_{stat}_{side_name}"] = val.tolist()
                    ref = "peer_f64" if "peer_f64" in stats else "peer_f32"
                    for stat in ("mean", "frac05"):
                        extra[f"mask_{stat}_diff_xaijax_vs_{ref}"] = float(
                            np.abs(stats["xaijax"][stat] - stats[ref][stat]).max())
                        if ref == "peer_f64":
                            extra[f"mask_{stat}_diff_peer_f32_vs_f64"] = float(
                                np.abs(stats["peer_f32"][stat] - stats["peer_f64"][stat]).max())
                    # the energies at iteration 0 (the same initial masks on both sides: the exact part of the
                    # comparison) and where the trajectories part
                    if ours_hist is not None and "extremal_hist" in side64:
                        extra.update(_energy_divergence(ours_hist, side.get("extremal_hist"), side64["extremal_hist"]))
                # xaijax in float64 against the float64 peer: the float64 criterion's error (--xaijax-f64 always,
                # the default), else the diagnosis of a row that does not agree in float32 (auto)
                x64err = None
                agrees32 = judge(kind, "float32", err32=err32, err64=err64, x64err=None, vacuous=vacuous,
                                 agree_f32=args.agree_f32)[0]
                want64 = args.xaijax_f64 == "always" or (args.xaijax_f64 == "auto" and not agrees32)
                if theirs64 is not None and want64:
                    try:
                        if kind == "optimisation":
                            # xaijax's extremal perturbation optimises in its input's dtype: one SGD step in float64
                            # gives its iteration-0 energies in float64 (the timed run above is float32)
                            if "extremal_hist" in side64:
                                from xaijax.methods.perturbation import ExtremalPerturbation

                                ep1 = ExtremalPerturbation(areas=tuple(cfg["ep_areas"]), max_iter=1)
                                res = _in_x64(lambda: ep1.optimise(model, _f64(v), _f64(xj), _f64(tv)))
                                if res.reward.dtype != np.float64:
                                    raise TypeError(f"extremal energies came back as {res.reward.dtype}")
                                extra["energy_it0_err_x64"] = _energy_it0_err(res.reward, res.regul,
                                                                              side64["extremal_hist"])
                                x64err = extra["energy_it0_err_x64"]
                        elif kind == "raw terms":
                            ours64 = _in_x64(lambda: _fullgrad_terms(model, _f64(v), _f64(xj), tj)[0])
                            x64err = compare(ours64, theirs64_cmp)
                        else:  # (SmoothGrad: Smooth draws its noise in float32 also under x64, as Captum got it)
                            ours64 = transform(_in_x64(lambda: np.asarray(
                                jax.jit(lambda vv, xx, t, _m=method: _m(model, vv, xx, t))(_f64(v), _f64(xj), tj),
                                np.float64)))
                            ours64 = minmax(ours64) if pgc_map else ours64
                            x64err = compare(ours64, theirs64_cmp)
                    except Exception as e:  # noqa: BLE001 - reported in the row
                        note += f"; xaijax float64 run failed ({type(e).__name__}: {str(e)[:120]})"
                    _release_memory()
                agrees, decisive, basis = judge(
                    kind, args.criterion, err32=err32, err64=err64, x64err=x64err if kind != "optimisation" else None,
                    energy_it0=extra.get("energy_it0_err"), energy_it0_x64=extra.get("energy_it0_err_x64"),
                    vacuous=vacuous, agree=args.agree, agree_f32=args.agree_f32, agree_energy=args.agree_energy)
                if theirs64 is not None and not agrees32:
                    if name == "contrastive-excitation-backprop":
                        from xaijax.methods.excitation import ExcitationBackprop

                        eb = np.asarray(jax.jit(lambda vv, xx, t: ExcitationBackprop(resize=False)(model, vv, xx, t))(
                            v, xj, tj))
                        ratio = float(np.abs(eb).max() / np.abs(theirs64).max())
                        extra["cancellation"] = ratio
                        note += (f"; c-EB = EB(target) - EB(flipped classifier), two probability maps that cancel: "
                                 f"max|EB| / max|c-EB| = {ratio:.1e}, so vs max|EB| the float32 error is "
                                 f"{err64 / ratio:.0e}")
                if kind == "optimisation" and "energy_it0_err" in extra:
                    ref = "peer f64" if "mask_mean_peer_f64" in extra else "peer f32"
                    key = ref.replace(" ", "_")
                    note += (f"; energies at iteration 0: xaijax f32 vs peer f64 {extra['energy_it0_err']:.0e}"
                             + (f", xaijax f64 vs peer f64 {extra['energy_it0_err_x64']:.0e}"
                                if "energy_it0_err_x64" in extra else "")
                             + f"; first iteration off by > 1e-4 from TorchRay float64: xaijax "
                             f"{extra['first_iter_off_xaijax']}, TorchRay float32 {extra.get('first_iter_off_peer_f32')}"
                             f"; final masks vs {ref}: mean max|diff| {extra[f'mask_mean_diff_xaijax_vs_{key}']:.1e}, "
                             f"fraction >= 0.5 max|diff| {extra[f'mask_frac05_diff_xaijax_vs_{key}']:.2f}"
                             + (f" (TorchRay f32 vs f64: {extra['mask_mean_diff_peer_f32_vs_f64']:.1e}, "
                                f"{extra['mask_frac05_diff_peer_f32_vs_f64']:.2f})"
                                if "mask_mean_diff_peer_f32_vs_f64" in extra else "")
                             + " (information: the area regulariser's sort and the network's ReLUs make the gradient "
                             "discontinuous; rounding picks a side and the SGD trajectories drift apart after the "
                             "first iterations)")
                if x64err is not None and kind != "optimisation" and args.criterion == "float32" and not agrees:
                    if x64err <= X64_SAME:
                        note += (f"; float64: xaijax = peer to {x64err:.0e}, so the float32 gap is the input's "
                                 f"conditioning (peer f32 vs f64 {drift:.0e})")
                    else:
                        note += (f"; float64: xaijax vs peer {x64err:.1e}, above the {X64_SAME:g} same-function "
                                 f"threshold (not diagnosed)")
                if agrees is None:
                    note += f"; {basis}"
                row = {
                    "model": arch, "batch": b, "size": size, "method": name, "peer": peer,
                    "peer_s": tp, "xaijax_s": tx, "ratio": tp / tx, "comparison": kind,
                    "err_peer_f32": err32, "err_peer_f64": err64, "peer_f32_vs_f64": drift,
                    "xaijax_f64_vs_peer_f64": x64err, "criterion": args.criterion, "basis": basis,
                    "agrees_float32_rule": agrees32, "peer_chunk": peer_chunk,
                    "err_or_corr": decisive, "agrees": agrees, "win": agrees is True and tp > tx,
                    "note": note.lstrip("; "),
                    "load_before": load0, "load_after": os.getloadavg(), **extra,
                }
                rows.append(row)
                with open(os.path.join(args.out_dir, PARTIAL), "a") as fh:  # survives a crash of a later row
                    fh.write(json.dumps(row) + "\n")
                f = lambda e: "   n/a  " if e is None else f"{e:.2e}"  # noqa: E731
                print(f"{arch} b={b} {name:32s} {peer:16s} peer {tp:8.3f}s xaijax {tx:8.3f}s ratio {tp / tx:6.2f} "
                      f"{kind}: vs f32 {f(err32)} vs f64 {f(err64)} peer32-64 {f(drift)} x64 {f(x64err)} "
                      f"agrees {agrees} ({basis})"
                      + (f" final map {f(extra['final_map_err_peer_f32'])}/{f(extra['final_map_err_peer_f64'])}"
                         if "final_map_err_peer_f32" in extra else "")
                      + f" load {os.getloadavg()[0]:.1f}", flush=True)
            del fn
            jax.clear_caches()
            _release_memory()
    return rows


def merge_runs(path: str, rows: list[dict[str, Any]], meta: dict[str, Any],
               method_order: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """This run's ``rows`` merged into the results file ``path`` (``--update``).

    A row of the file is replaced by this run's row for the same (model, batch, method, peer);
    the others stay. Every row gets ``run``, the index into ``meta["runs"]`` (the metas of the
    runs in order; the file's own, or its ``runs``, first). Rows are ordered by model, batch and
    method as a single run writes them."""
    if not os.path.exists(path):
        raise SystemExit(f"--update: no results file to merge into at {path}")
    with open(path) as f:
        old = json.load(f)
    runs = old["meta"].get("runs") or [old["meta"]]
    if old["meta"]["size"] != meta["size"]:
        raise SystemExit(f"--update: {path} holds {old['meta']['size']} px rows, this run is {meta['size']} px")
    old_crit = old["meta"].get("criterion", "float32")  # files before issue 26: the float32 rule
    if old_crit != meta["criterion"]:
        raise SystemExit(f"--update: {path} was judged under the {old_crit} criterion, this run under "
                         f"{meta['criterion']}: run the whole table again (or pass --criterion {old_crit})")
    key = lambda r: (r["model"], r["batch"], r["method"], r["peer"])  # noqa: E731
    new_keys = {key(r) for r in rows}
    kept = [{"run": 0, **r} for r in old["rows"] if key(r) not in new_keys]
    rows = kept + [{**r, "run": len(runs)} for r in rows]
    model_rank = {"vgg16": 0, "resnet50": 1}
    rows.sort(key=lambda r: (model_rank.get(r["model"], 2), r["batch"],
                             method_order.index(r["method"]) if r["method"] in method_order else len(method_order)))
    merged = {**meta, "runs": runs + [{k: v for k, v in meta.items() if k != "runs"}],
              "load_min": min(m["load_min"] for m in runs + [meta]),
              "load_max": max(m["load_max"] for m in runs + [meta]),
              "notes": f"Rows from {len(runs) + 1} runs (the row's 'run' indexes 'runs'). " + meta["notes"]}
    return rows, merged


#: rows appended as they finish (JSON lines) in the output folder; removed when the run completes
PARTIAL = "bench_peers.partial.jsonl"


def write(rows: list[dict[str, Any]], meta: dict[str, Any], out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    js = os.path.join(out_dir, "bench_peers.json")
    tmp = js + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(tmp, js)
    e = lambda v: "n/a" if v is None else f"{v:.1e}"  # noqa: E731
    crit = meta.get("criterion", "float32")  # tables before issue 26: the float32 rule
    if crit == "float64":
        rule = (f"**Agreement criterion: float64.** An exact or raw-terms row agrees when err(xaijax float64, peer "
                f"float64) <= {meta.get('agree_f64', meta['agree_threshold']):g} (column \"xaijax f64 vs peer f64\"); "
                "without that error (no float64 peer, or xaijax's float64 run failed) the row is not judged "
                "(\"n/a\"). Extremal perturbation (optimisation) agrees when the energies at iteration 0 (reward and "
                "area regulariser, from the same initial masks on both sides) agree: xaijax float64 (one SGD step "
                f"with jax_enable_x64) vs TorchRay float64 <= {meta.get('agree_f64', meta['agree_threshold']):g} "
                "(that column), or, without xaijax's float64 energies, xaijax float32 (the timed run optimises in "
                f"float32) vs TorchRay float64 <= {meta.get('agree_energy', 1e-5):g}; its final masks' statistics "
                "(per mask: mean, fraction of pixels >= 0.5) are information: the area regulariser's sort and the "
                "ReLUs make the gradient discontinuous, so the SGD trajectories of any two implementations (TorchRay "
                "float32 against its own float64 run too) diverge after the first iterations. The float32 errors "
                "(err vs peer f32, err vs peer f64: xaijax float32 against the peer; peer f32 vs f64: the peer's own "
                "float32 error) are information.")
    else:
        rule = (f"**Agreement criterion: float32** (the rule of the tables before issue 26). A row agrees when "
                f"err(xaijax float32, peer float64) <= {meta.get('agree_f32', meta['agree_threshold']):g} "
                "(err vs peer f32 without the float64 peer); extremal perturbation compares its final masks.")
    if "runs" in meta:
        provenance = [f"**This table is NOT from one run**: rows from {len(meta['runs'])} runs of this script "
                      "(`--update` merges); the note names each row's run:", ""]
    else:
        start = meta.get("started") or meta.get("date") or "start not recorded"
        end = meta.get("finished") or "end not recorded"
        dur = f" ({meta['duration_s'] / 60:.0f} min)" if meta.get("duration_s") is not None else ""
        provenance = [f"One run from {start} to {end}{dur}, arguments "
                      f"`{' '.join(meta.get('argv') or []) or '(none)'}`.", ""]
    lines = [
        "# xaijax vs PyTorch peers",
        "",
        *provenance,
        f"{meta['machine']}; load average during the run {meta['load_min']:.1f}-{meta['load_max']:.1f}; "
        f"{meta['size']} px; repeats {meta['repeats']} (median after warm-up); torch threads {meta['torch_threads']}.",
        "",
        "err(a, b) = max|a - b| / max|b| after the documented transformation; xaijax is timed in float32, the peer "
        "in float32, and both run once more in float64 (not timed: the peer on a float64 copy of the model, xaijax "
        "with jax_enable_x64). " + rule + " ratio = peer time / xaijax time (> 1: xaijax faster); a win needs "
        "agreement. FullGrad compares the raw terms (pytorch-grad-cam's per-layer |b dS/dz| and |dS/dx x|, max "
        "over terms; its final map's error is in the note).",
        "",
        "| model | batch | method | peer | peer s | xaijax s | ratio | err vs peer f32 | err vs peer f64 "
        "| peer f32 vs f64 | xaijax f64 vs peer f64 | agrees | win | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    if "runs" in meta:

        def run_line(i: int, m: dict[str, Any]) -> str:
            argv = f"arguments `{' '.join(m['argv']) or '(none)'}`" if "argv" in m else "arguments not recorded"
            when = m.get("started") or m.get("date", "date not recorded")
            return (f"- run {i} ({sum(r.get('run') == i for r in rows)} rows of this table): "
                    f"{when} to {m.get('finished', 'end not recorded')}, {argv}, batches {m['batches']}, "
                    f"criterion {m.get('criterion', 'float32')}, load {m['load_min']:.1f}-{m['load_max']:.1f}. "
                    f"{m.get('notes', '')}")

        at = 2 + len(provenance)
        lines[at:at] = [run_line(i, m) for i, m in enumerate(meta["runs"])] + [""]
    for r in rows:
        note = r.get("note", "")
        if r.get("criterion", "float32") != crit:
            note = f"judged under the {r.get('criterion', 'float32')} criterion" + (f"; {note}" if note else "")
        if "run" in r:
            note = f"run {r['run']}" + (f"; {note}" if note else "")
        if r["comparison"] != "exact":
            note = (f"{r['comparison']}; " + note) if note else r["comparison"]
        if "final_map_err_peer_f32" in r:
            note += (f"; final map (its post-processing on xaijax's terms) {e(r['final_map_err_peer_f32'])} vs f32, "
                     f"{e(r.get('final_map_err_peer_f64'))} vs f64")
        ag = "n/a" if r["agrees"] is None else ("yes" if r["agrees"] else "NO")
        lines.append(f"| {r['model']} | {r['batch']} | {r['method']} | {r['peer']} | {r['peer_s']:.3f} | "
                     f"{r['xaijax_s']:.3f} | {r['ratio']:.2f} | {e(r['err_peer_f32'])} | {e(r['err_peer_f64'])} | "
                     f"{e(r['peer_f32_vs_f64'])} | {e(r.get('xaijax_f64_vs_peer_f64'))} | {ag} | "
                     f"{'yes' if r['win'] else 'no'} | {note} |")
    md = os.path.join(out_dir, "bench_peers.md")
    with open(md + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(md + ".tmp", md)


#: the peers' modules the bench imports (make_peer_references.peer_methods), checked before a run starts
PEER_MODULES = ("captum.attr", "zennit.composites", "pytorch_grad_cam", "torchray.attribution.extremal_perturbation",
                "torchray.attribution.rise", "torchray.attribution.excitation_backprop")


def _missing_peers() -> list[str]:
    """The modules of :data:`PEER_MODULES` that do not import (with the error's class)."""
    import importlib

    missing = []
    for mod in PEER_MODULES:
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - reported before the run
            missing.append(f"{mod} ({type(e).__name__})")
    return missing


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="xaijax vs zennit / Captum / TorchRay / pytorch-grad-cam")
    ap.add_argument("--quick", action="store_true", help="112 px, batch 1, cheap hyperparameters")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--models", nargs="+", default=["vgg", "resnet"], choices=["vgg", "resnet"])
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--criterion", choices=CRITERIA, default="float64",
                    help="agreement rule: float64 (default, issue 26): exact and raw-terms rows agree when "
                         "err(xaijax float64, peer float64) <= --agree, not judged without it; float32: the rule "
                         "of the tables before issue 26, err(xaijax float32, peer float64) <= --agree-f32, for "
                         "comparison with them")
    ap.add_argument("--agree", type=float, default=X64_SAME,
                    help="float64 criterion: max err(xaijax float64, peer float64) for 'agrees'; also extremal "
                         "perturbation's iteration-0 energies, xaijax float64 vs peer float64")
    ap.add_argument("--agree-f32", type=float, default=1e-4,
                    help="--criterion float32: max err(xaijax float32, peer float64) for 'agrees'")
    ap.add_argument("--agree-energy", type=float, default=1e-5,
                    help="float64 criterion, extremal perturbation without xaijax's float64 energies (--xaijax-f64 "
                         "never or its float64 run failed): max relative error of the iteration-0 energies (reward, "
                         "area regulariser), xaijax float32 (the timed run optimises in float32) vs peer float64")
    ap.add_argument("--peer-f64", action=argparse.BooleanOptionalAction, default=True,
                    help="also run each peer (untimed) on a float64 copy of the model, the agreement reference")
    ap.add_argument("--f64-chunk", type=int, default=4,
                    help="images per call of the float64 peer reference (its memory; the maps are per image)")
    ap.add_argument("--peer-chunk", type=int, default=4,
                    help="images per call of the timed float32 peer for FullGrad at larger batches (pytorch-grad-cam's "
                         "FullGrad peaks at ~17 GB for ResNet50 at batch 16 over the whole batch)")
    ap.add_argument("--xaijax-f64", choices=["auto", "always", "never"], default="always",
                    help="run xaijax in float64 (jax_enable_x64; extremal perturbation: one SGD step, its "
                         "iteration-0 energies) against the float64 peer: for all rows (always, the default: the "
                         "float64 criterion needs it), for the rows that fail the float32 rule (auto), or never "
                         "(the float64 criterion then judges no exact row)")
    ap.add_argument("--all-peers", action="store_true", help="also time TorchRay's gradient / guided backprop")
    ap.add_argument("--update", action="store_true",
                    help="merge into the existing bench_peers.json of --out-dir: this run's rows replace the rows "
                         "with the same model, batch, method and peer, the others are kept (each row records its run)")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "experiments", "results"))
    args = ap.parse_args(argv)
    if args.update and not os.path.exists(os.path.join(args.out_dir, "bench_peers.json")):
        ap.error(f"--update: no bench_peers.json in {args.out_dir} to merge into")
    missing = _missing_peers()
    if missing:  # a peer that fails to import would end the run in the middle (the table must be one run)
        ap.error(f"peer packages not importable: {', '.join(missing)} (see experiments/PEERS.md for the install)")
    t_start = time.time()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t_start))

    import jax
    import torch

    ncores = os.cpu_count() or 1
    torch.set_num_threads(ncores)
    size = args.size or (112 if args.quick else 224)
    batches = args.batches or ([1] if args.quick else [1, 16])
    cfg = {
        "repeats": args.repeats or (2 if args.quick else 3),
        "ig_steps": 8 if args.quick else 16,
        "sg_n": 8 if args.quick else 16,
        "sg_noise": 0.15,
        "ep_iter": 10 if args.quick else 40,  # extremal perturbation SGD steps (TorchRay default 800)
        "ep_areas": [0.05, 0.1],
        "ep_reward": 10.0,  # extremal reward scaled to this value at the clean image (None: the raw logit)
        "rise": {"n": 32 if args.quick else 128, "s": 7, "p": 0.5, "seed": 0},
        # batch 16 of these costs minutes per call on a shared 2-core machine
        "batch1_only": ("integrated-gradients", "smoothgrad", "rise", "extremal-perturbation"),
    }
    rows: list[dict[str, Any]] = []
    os.makedirs(args.out_dir, exist_ok=True)
    open(os.path.join(args.out_dir, PARTIAL), "w").close()
    loads = [os.getloadavg()[0]]
    for fam in args.models:
        rows += bench_family(fam, size, batches, cfg, args)
        loads.append(os.getloadavg()[0])
        loads += [r["load_before"][0] for r in rows] + [r["load_after"][0] for r in rows]
    meta = {
        "machine": f"{ncores} CPU cores (shared)", "date": started, "started": started,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "duration_s": round(time.time() - t_start),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "size": size, "batches": batches, "repeats": cfg["repeats"], "config": cfg,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_devices": [str(d) for d in jax.devices()],
        "versions": R.versions(), "load_min": min(loads), "load_max": max(loads),
        "criterion": args.criterion,
        "agree_threshold": args.agree if args.criterion == "float64" else args.agree_f32,
        "agree_f64": args.agree, "agree_f32": args.agree_f32, "agree_energy": args.agree_energy,
        "peer_f64": args.peer_f64, "f64_chunk": args.f64_chunk, "peer_chunk": args.peer_chunk,
        "xaijax_f64": args.xaijax_f64,
        "notes": "TorchRay's RISE is given xaijax's masks (filter_masks), so its time excludes mask generation.",
    }
    if args.update:
        rows, meta = merge_runs(os.path.join(args.out_dir, "bench_peers.json"), rows, meta, list(xaijax_methods(cfg)))
    write(rows, meta, args.out_dir)
    os.remove(os.path.join(args.out_dir, PARTIAL))
    print(f"wrote {os.path.join(args.out_dir, 'bench_peers.json')} and .md")


if __name__ == "__main__":
    main()
