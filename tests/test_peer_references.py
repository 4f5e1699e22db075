"""xaijax against the PyTorch tools people would otherwise use, on the same weights and images.

The reference maps were recorded by ``experiments/make_peer_references.py`` (run in the
separate peer virtualenv; see ``experiments/PEERS.md``) with zennit 0.5.1, Captum 0.9.0,
pytorch-grad-cam 1.5.7 and TorchRay 1.0.0.2 on tiny torchvision-class VGG16 / ResNet
(Bottleneck) models with random weights, and stored in ``tests/fixtures/peer_refs_*.npz``.
This file needs numpy only (no torch): it ports the stored torch state dict with
:func:`xaijax.checkpoints.from_torch_state_dict`, runs the xaijax method and compares.

Agreement is measured as ``max|xaijax - peer| / max|peer|`` (the error relative to the
map's scale; element-wise relative errors are meaningless where a map crosses zero) and
must stay below ``RTOL`` (float32 on both sides, different convolution kernels).

Where a peer defines a method differently, the documented transformation is applied here:

* pytorch-grad-cam min-max normalises its maps, ``(m - min) / (max(m - min) + 1e-7)``
  after its (cv2) bilinear resize: applied to xaijax's Grad-CAM / Grad-CAM++ maps
  (Grad-CAM++ with ``eps=1e-6``, pytorch-grad-cam's denominator term).
* pytorch-grad-cam's FullGrad post-processes xaijax's full-gradient decomposition
  differently from the reference (per-channel instead of per-layer normalisation): its
  post-processing is re-implemented here on :func:`xaijax.methods.gradient.fullgrad_decompose`
  (so the decomposition — input gradient and every conv/BN bias gradient — is what is tested).
* The z+ composites (``lrp-epsilon-plus``, ``lrp-epsilon-plus-flat``) were recorded on the
  network with its convolution-side biases set to zero (``sd_nobias``) and are compared
  there. That is historical, not a difference of definitions: zennit's z+ keeps ``b+`` in
  its denominator exactly as xaijax's does (the float64 references below compare
  ``lrp-epsilon-plus`` on the biased networks); removing the workaround needs those maps
  re-recorded on ``sd``. zennit was given xaijax's z+ stabiliser (1e-9); its output
  relevance was the target logit (xaijax's convention).
* ``peer_refs_lrp_float64.npz`` (``make_peer_references.py --lrp-float64``, zennit 0.5.1 on
  torch 2.13 CPU): zennit's EpsilonGammaBox and EpsilonPlus in float64 on the plain-torch
  twins of ``torch_ref_vgg_resnet.py`` with random biases and BatchNorm statistics
  (BatchNorm ``eps`` folded into ``running_var`` there: subtracted again after the port).
  zennit's Norm rule on residual sums and average pools adds its stabiliser (1e-9);
  xaijax's z-rule there adds nothing: with ``Epsilon(1e-9)`` on those layers the maps agree
  to float64 rounding, with xaijax's defaults to the stabiliser's ~1e-9.
* TorchRay's RISE divides by ``N`` (xaijax, like the paper: ``N * p``) and scores with a
  sigmoid: it was given xaijax's masks and the model ``logit(softmax(f))``, so its map is
  xaijax's RISE (softmax probability) times ``p``.
* TorchRay's (contrastive) Excitation Backprop is compared at layer resolution
  (``resize=False``); xaijax's one-pass c-EB equals TorchRay's two-pass form.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_helpers import fullgrad_postprocess, minmax

from xaijax import models
from xaijax.checkpoints import from_torch_state_dict
from xaijax.methods import get
from xaijax.methods.cam import GradCAMPlusPlus
from xaijax.methods.gradient import IntegratedGradients, fullgrad_decompose
from xaijax.methods.excitation import ExcitationBackprop
from xaijax.methods.perturbation import RISE, rise_masks

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
RTOL = 1e-4


class Ref:
    """One fixture file: model, ported variables, inputs and the peers' maps."""

    def __init__(self, family: str):
        path = os.path.join(FIXTURES, f"peer_refs_{family}.npz")
        with np.load(path) as z:
            self.arrays = {k: z[k] for k in z.files}
        self.meta = json.loads(str(self.arrays["meta"]))
        spec = self.meta["xaijax_constructor"]
        self.model = models.get(spec["arch"], **spec["kwargs"])
        size = self.meta["input_size"]
        sd = {k[3:]: v for k, v in self.arrays.items() if k.startswith("sd/")}
        nb = dict(sd)
        nb.update({k[10:]: v for k, v in self.arrays.items() if k.startswith("sd_nobias/")})
        self.variables = from_torch_state_dict(self.model, sd, input_shape=(1, size, size, 3))
        self.variables_nobias = from_torch_state_dict(self.model, nb, input_shape=(1, size, size, 3))
        self.x = jnp.asarray(self.arrays["x"])
        self.target = jnp.asarray(self.arrays["target"].astype(np.int32))

    def peer(self, method: str, peer: str) -> np.ndarray:
        return self.arrays[f"out/{method}/{peer}"]

    def run(self, method, nobias: bool = False) -> np.ndarray:
        v = self.variables_nobias if nobias else self.variables
        fn = jax.jit(lambda vv, xx, tt: method(self.model, vv, xx, tt))
        return np.asarray(fn(v, self.x, self.target))


@pytest.fixture(scope="session", params=["vgg", "resnet"])
def ref(request) -> Ref:
    return Ref(request.param)


@pytest.fixture(scope="session")
def vgg() -> Ref:
    return Ref("vgg")


def rel_err(ours: np.ndarray, theirs: np.ndarray) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    scale = np.abs(theirs).max()
    assert scale > 0, "reference map is identically zero: the comparison would be vacuous"
    return float(np.abs(ours - theirs).max() / scale)


def test_fixture_provenance(ref):
    meta = ref.meta
    assert set(meta["versions"]) >= {"torch", "zennit", "captum", "grad-cam", "torchray"}
    # the ported network reproduces the torch logits: the port itself is right
    logits = np.asarray(jax.jit(ref.model.apply)(ref.variables, ref.x))
    assert rel_err(logits, ref.arrays["logits"]) < 1e-5


@pytest.mark.parametrize(
    "name,peers",
    [
        ("gradient", ("captum", "torchray")),
        ("gradient-x-input", ("captum",)),
        ("guided-backprop", ("captum", "torchray")),
    ],
)
def test_gradient_family(ref, name, peers):
    ours = ref.run(get(name))
    for p in peers:
        assert rel_err(ours, ref.peer(name, p)) < RTOL, (name, p)


def test_integrated_gradients_captum_gauss_legendre(ref):
    """Captum's ``gausslegendre`` with baseline 0 == xaijax's ``gauss-legendre`` rule."""
    ours = ref.run(IntegratedGradients(steps=ref.meta["hyperparameters"]["ig_steps"], rule="gauss-legendre"))
    assert rel_err(ours, ref.peer("integrated-gradients", "captum")) < RTOL


def test_integrated_gradients_captum_trapezoid(ref):
    """Captum's ``riemann_trapezoid`` puts nodes ``k / (m - 1)`` but weights ``1 / m`` (halved
    at both ends), which sum to ``(m - 1) / m``: Captum's map is xaijax's (weights
    ``1 / (m - 1)``, summing to 1) times ``(m - 1) / m``. Recorded with a random baseline:
    the trapezoid rule evaluates the gradient *at* the baseline, where a zero image makes
    max-pool windows tie (see test_grad_cam_plus_plus_at_the_relu)."""
    m = ref.meta["hyperparameters"]["ig_steps"]
    method = IntegratedGradients(steps=m, rule="trapezoid", baseline=jnp.asarray(ref.arrays["ig_baseline"]))
    ours = ref.run(method)
    assert rel_err(ours * (m - 1) / m, ref.peer("integrated-gradients-trapezoid", "captum")) < RTOL
    assert rel_err(ours, ref.peer("integrated-gradients-trapezoid", "captum")) > 0.5 / m  # the factor is real


def test_grad_cam(ref):
    ours = ref.run(get("grad-cam"))
    assert rel_err(ours, ref.peer("grad-cam", "captum")) < RTOL  # LayerGradCam + F.interpolate
    assert rel_err(minmax(ours), ref.peer("grad-cam", "pytorch-grad-cam")) < RTOL


def test_grad_cam_plus_plus(ref):
    """ResNet at ``layer4``; VGG at ``features.28`` (the convolution before the CAM ReLU: the
    max-pool tie issue below cannot reach gradients there, the ReLU zeroes them)."""
    if ref.meta["family"] == "vgg":
        ours = ref.run(GradCAMPlusPlus(layer="features.28", eps=1e-6))
        theirs = ref.peer("grad-cam-plus-plus@features.28", "pytorch-grad-cam")
    else:
        ours = ref.run(GradCAMPlusPlus(eps=1e-6))
        theirs = ref.peer("grad-cam-plus-plus", "pytorch-grad-cam")
    assert rel_err(minmax(ours), theirs) < RTOL


# MaxPool2d routes the gradient of tied maxima to the first one, as torch does; after a ReLU
# all-zero windows tie, and Grad-CAM++ (nonlinear in the gradient) would differ otherwise.
def test_grad_cam_plus_plus_at_the_relu(vgg):
    ours = vgg.run(GradCAMPlusPlus(eps=1e-6))
    assert rel_err(minmax(ours), vgg.peer("grad-cam-plus-plus", "pytorch-grad-cam")) < RTOL


def test_fullgrad_decomposition_matches_pytorch_grad_cam(ref):
    """pytorch-grad-cam's FullGrad, rebuilt from xaijax's decomposition.

    Its post-processing: ``|input grad * x|`` and ``|bias * dS/dz|`` of every Conv2d /
    BatchNorm2d with a bias, each *channel* min-max normalised per sample, bilinearly
    resized to the input (half-pixel centres), summed over channels and layers, and the
    sum min-max normalised.
    """
    gx, biases, _ = jax.jit(lambda v, x, t: fullgrad_decompose(ref.model, v, x, t))(ref.variables, ref.x, ref.target)
    # dense layers' terms are not 2-D and pytorch-grad-cam does not use them
    spatial = [np.asarray(term) for term in biases.values() if np.ndim(term) == 4]
    assert len(spatial) >= 13 if ref.meta["family"] == "vgg" else len(spatial) >= 10
    rebuilt = fullgrad_postprocess(np.asarray(gx), spatial)
    # the per-channel normalisation (x - min) / (max - min + 1e-7) turns rounding noise in
    # channels that are constant (range 0 in torch, ~1e-9 here) into values up to ~0.01:
    # the final map agrees to ~1e-2 only; the raw terms below agree to float precision
    assert rel_err(rebuilt, ref.peer("fullgrad", "pytorch-grad-cam")) < 2e-2


def test_fullgrad_bias_terms_match_pytorch_grad_cam(ref):
    """pytorch-grad-cam's own raw terms ``sum_c |b_c * dS/dz_c|`` per biased Conv2d/BatchNorm2d
    (module order) == xaijax's :func:`fullgrad_decompose` bias terms."""
    _, biases, _ = jax.jit(lambda v, x, t: fullgrad_decompose(ref.model, v, x, t))(ref.variables, ref.x, ref.target)
    theirs = [ref.arrays[k] for k in sorted(k for k in ref.arrays if k.startswith("fullgrad_terms/"))]
    ours = {name: np.abs(np.asarray(b)).sum(-1) for name, b in biases.items() if np.ndim(b) == 4}
    assert len(ours) == len(theirs) > 0
    # match by shape and value: the decomposition's keys are layer names, pytorch-grad-cam's are in module order
    unmatched = list(ours.values())
    for t in theirs:
        errs = [rel_err(o, t) if o.shape == t.shape else np.inf for o in unmatched]
        i = int(np.argmin(errs))
        assert errs[i] < RTOL, f"no xaijax bias term matches a pytorch-grad-cam term (best error {errs[i]:.2e})"
        unmatched.pop(i)


@pytest.mark.parametrize("name", ["lrp-epsilon", "lrp-epsilon-plus", "lrp-epsilon-plus-flat"])
def test_lrp_zennit(ref, name):
    ours = ref.run(get(name), nobias=name != "lrp-epsilon")
    assert rel_err(ours, ref.peer(name, "zennit")) < RTOL


@pytest.mark.parametrize("contrastive", [False, True])
def test_excitation_backprop_torchray(ref, contrastive):
    name = "contrastive-excitation-backprop" if contrastive else "excitation-backprop"
    ours = ref.run(ExcitationBackprop(contrastive=contrastive, resize=False))
    assert rel_err(ours, ref.peer(name, "torchray")) < RTOL


def test_rise_torchray(vgg):
    hp = vgg.meta["hyperparameters"]["rise"]
    size = vgg.meta["input_size"]
    masks = np.asarray(rise_masks(hp["seed"], np.arange(hp["n"]), (size, size), hp["s"], hp["p"]))
    np.testing.assert_allclose(masks, vgg.arrays["rise_masks"], rtol=0, atol=1e-6)  # the very masks TorchRay used
    ours = vgg.run(RISE(n=hp["n"], s=hp["s"], p=hp["p"], seed=hp["seed"], chunk=8))
    assert rel_err(ours * hp["p"], vgg.peer("rise", "torchray")) < RTOL


@pytest.mark.parametrize("family", ["vgg", "resnet"])
@pytest.mark.parametrize("name", ["lrp-epsilon-gamma-box", "lrp-epsilon-plus"])
def test_lrp_zennit_float64_with_biases(x64, family, name):
    """zennit's EpsilonGammaBox (sign-aware Gamma, issue 25) and EpsilonPlus (z+ with ``b+``)
    against xaijax in float64 on biased tiny VGG16 / ResNet50 (Bottleneck) twins."""
    from xaijax.methods.lrp import LRP
    from xaijax.propagation import Epsilon, composites

    with np.load(os.path.join(FIXTURES, "peer_refs_lrp_float64.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    assert meta["dtype"] == "float64" and "zennit" in meta["versions"]
    spec = meta["models"][family]
    kwargs = dict(spec["kwargs"], **({"layers": tuple(spec["kwargs"]["layers"])} if "layers" in spec["kwargs"] else {}))
    model = models.get(spec["arch"], **kwargs)
    sd = {k[len(family) + 4:]: v for k, v in arrays.items() if k.startswith(f"{family}/sd/")}
    size = meta["input_size"]
    v = from_torch_state_dict(model, sd, input_shape=(1, size, size, 3))
    v = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float64)), v)
    # the torch side has BatchNorm eps folded into running_var (eps = 0); xaijax adds 1e-5 itself
    v = jax.tree_util.tree_map_with_path(lambda p, a: a - 1e-5 if getattr(p[-1], "key", None) == "var" else a, v)
    x, t = jnp.asarray(arrays["x"]), jnp.asarray(arrays["target"].astype(np.int32))
    np.testing.assert_allclose(np.asarray(model.apply(v, x)), arrays[f"{family}/logits"], rtol=1e-12, atol=1e-12)
    theirs = arrays[f"{family}/out/{name}/zennit"]
    comp = composites.get(name[len("lrp-"):])
    ours = np.asarray(jax.jit(lambda vv, xx: LRP(comp)(model, vv, xx, t))(v, x))
    assert rel_err(ours, theirs) < 1e-7  # zennit's 1e-9 on sums / average pools (measured up to 2e-8)
    same = comp.replace(kinds={"add": Epsilon(1e-9), "avgpool": Epsilon(1e-9)})
    ours = np.asarray(jax.jit(lambda vv, xx: LRP(same)(model, vv, xx, t))(v, x))
    assert rel_err(ours, theirs) < 1e-12  # measured 1.6e-15 - 6.4e-15
