"""Record reference maps of the PyTorch peers (zennit, Captum, TorchRay, pytorch-grad-cam).

Writes ``tests/fixtures/peer_refs_vgg.npz`` and ``tests/fixtures/peer_refs_resnet.npz``:
tiny VGG16-style and ResNet (Bottleneck) models with seeded random weights, two small
images, and the maps the peers compute for them. ``tests/test_peer_references.py`` reloads
the arrays with numpy only (no torch), ports the weights with
:func:`xaijax.checkpoints.from_torch_state_dict` and compares xaijax's methods with them.

The peers are never a dependency of xaijax or of CI. They live in their own virtualenv,
``/work/peer-venv``, built with (see ``experiments/PEERS.md`` for why torch is 2.14.1)::

    python3.11 -m venv /work/peer-venv
    /work/peer-venv/bin/pip install torch==2.13.0            # CPU build (as in the main venv)
    /work/peer-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/peer-venv/bin/pip install zennit captum grad-cam torchray
    /work/peer-venv/bin/pip install -e /work/main            # xaijax + jax in the same process

Every peer imports ``torchvision`` at import time, and the registry's torchvision wheels
are linked against the CUDA build of torch (``libc10_cuda.so``), so none of them loads
beside the CPU-only torch 2.13.0; torch 2.14.1 + torchvision 0.29.1 (CUDA build, run on
the CPU here) is the pairing that imports.

Run (about a minute)::

    /work/peer-venv/bin/python experiments/make_peer_references.py

npz layout (all float32 unless noted):

* ``meta``: a JSON string (provenance: versions, model configuration, hyperparameters,
  what each stored map is and which transformation makes it comparable);
* ``x``: inputs, NHWC (N, H, W, 3), already "normalised" (standard normal noise);
* ``target``: int64 (N,) class indices;
* ``sd/<torch key>``: the torch state dict (torchvision names; BatchNorm
  ``num_batches_tracked`` int64), random weights with random biases and BN statistics;
* ``sd_nobias/<torch key>``: only for the keys that differ in the bias-free variant on
  which the z+ composites were recorded (conv biases, BN ``bias`` and ``running_mean`` set
  to 0). Not needed for the definitions — zennit's ``ZPlus`` keeps ``b+`` in its
  denominator exactly as xaijax's z+ does (``--lrp-float64`` compares them on the biased
  networks to 2e-15) — but the recorded z+ maps are of that variant;
* ``out/<method>/<peer>``: the peer's map, (N, H, W) at input size unless ``meta`` says
  otherwise;
* ``rise_masks``: the (M, H, W) masks TorchRay was given (generated with
  :func:`xaijax.methods.perturbation.rise_masks`, so xaijax's RISE with the same seed uses
  the very same masks).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tiny models: xaijax constructors (the torch side is built to match)
TINY = {
    "vgg": {"arch": "vgg16", "kwargs": {"width": 1 / 16, "num_classes": 5, "hidden": 32, "pool_size": 1}},
    "resnet": {"arch": "resnet50", "kwargs": {"width": 4, "num_classes": 5, "layers": [1, 1, 1, 1]}},
}
SIZE = 48  # input side in pixels
TARGETS = np.array([1, 3], np.int64)
IG_STEPS = 16
RISE = {"n": 16, "s": 4, "p": 0.5, "seed": 3}
ZPLUS_STABILIZER = 1e-9  # xaijax's AlphaBeta default; zennit is given the same value
EPS = 1e-6  # LRP-epsilon (both libraries' default)


# --------------------------------------------------------------------------------------
# models shared with bench_peers.py
# --------------------------------------------------------------------------------------


def cam_layer(family: str, depth: str = "vgg16") -> str:
    """Default CAM layer (xaijax's): last ReLU of VGG16 ``features.29``, ResNet ``layer4``."""
    return "features.29" if family == "vgg" else "layer4"


def eb_layers(family: str) -> tuple[str, str, str]:
    """TorchRay's (saliency layer, contrast layer, classifier layer) for Excitation Backprop."""
    if family == "vgg":
        return "features.23", "classifier.4", "classifier.6"
    return "layer3", "avgpool", "fc"


def torch_model(family: str, num_classes: int, width: float | int = 1.0, hidden: int = 4096, pool_size: int = 7,
                layers: tuple[int, ...] = (3, 4, 6, 3)):
    """A torchvision VGG16 / ResNet (Bottleneck) with torchvision's classes, optionally tiny.

    Tiny variants are built from torchvision's own ``VGG``/``ResNet``/``Bottleneck`` classes
    (TorchRay and zennit recognise ResNet blocks by class) with the channel counts of the
    matching xaijax constructor. All ReLUs are made non-inplace (Captum's hooks need it;
    the maths is unchanged).
    """
    import torch.nn as tnn
    from torchvision.models import resnet as tvr
    from torchvision.models import vgg as tvv

    if family == "vgg":
        cfg = [v if v == "M" else max(1, int(v * width)) for v in tvv.cfgs["D"]]
        m = tvv.VGG.__new__(tvv.VGG)
        tnn.Module.__init__(m)
        m.features = tvv.make_layers(cfg, batch_norm=False)
        m.avgpool = tnn.AdaptiveAvgPool2d((pool_size, pool_size))
        c = cfg[-2]
        m.classifier = tnn.Sequential(
            tnn.Linear(c * pool_size * pool_size, hidden), tnn.ReLU(True), tnn.Dropout(),
            tnn.Linear(hidden, hidden), tnn.ReLU(True), tnn.Dropout(), tnn.Linear(hidden, num_classes),
        )
    else:
        w = int(width)
        m = tvr.ResNet.__new__(tvr.ResNet)
        tnn.Module.__init__(m)
        m._norm_layer, m.inplanes, m.dilation, m.groups, m.base_width = tnn.BatchNorm2d, w, 1, 1, 64
        m.conv1 = tnn.Conv2d(3, w, 7, 2, 3, bias=False)
        m.bn1 = tnn.BatchNorm2d(w)
        m.relu = tnn.ReLU(True)
        m.maxpool = tnn.MaxPool2d(3, 2, 1)
        for i, n in enumerate(layers):
            setattr(m, f"layer{i + 1}", m._make_layer(tvr.Bottleneck, w * 2**i, n, stride=1 if i == 0 else 2))
        m.avgpool = tnn.AdaptiveAvgPool2d((1, 1))
        m.fc = tnn.Linear(w * 8 * 4, num_classes)
    for mod in m.modules():
        if isinstance(mod, tnn.ReLU):
            mod.inplace = False
    return m.eval()


def randomize_state_dict(sd: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Random biases (N(0, 0.1)) and BN statistics (scale, var ~ U(0.5, 1.5); bias, mean ~ N(0, 0.1)).

    xaijax's :func:`random_variables` gives He-normal kernels but zero biases and identity
    BatchNorm, which would hide every bias-related difference (FullGrad's bias terms, the
    epsilon rule's bias absorption): this fills them with random values.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in sd.items():
        v = np.asarray(v)
        if k.endswith("num_batches_tracked"):
            out[k] = v
        elif k.endswith("running_var") or (k.endswith(".weight") and v.ndim == 1):
            out[k] = rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
        elif k.endswith(".bias") or k.endswith("running_mean"):
            out[k] = (0.1 * rng.standard_normal(v.shape)).astype(np.float32)
        else:
            out[k] = v.astype(np.float32)
    return out


def bias_free(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state dict with every *convolution-side* bias removed: conv biases, BN ``bias`` and
    ``running_mean`` set to 0 (so the BN-folded conv has no bias); dense biases kept."""
    out = dict(sd)
    for k, v in sd.items():
        is_bn = k.rsplit(".", 1)[0] + ".running_var" in sd
        conv_bias = k.endswith(".bias") and (k.rsplit(".", 1)[0] + ".weight") in sd and sd[k.rsplit(".", 1)[0] + ".weight"].ndim == 4
        if conv_bias or (is_bn and (k.endswith(".bias") or k.endswith("running_mean"))):
            out[k] = np.zeros_like(v)
    return out


def xaijax_model(family: str, **overrides: Any):
    """The xaijax zoo model matching :data:`TINY` (or overrides, e.g. full size)."""
    from xaijax import models

    spec = TINY[family]
    kw = dict(spec["kwargs"])
    kw.update(overrides)
    return models.get(spec["arch"], **kw)


def make_weights(family: str, model, size: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded random torch-named state dict for the xaijax ``model`` (He kernels + random biases)."""
    from xaijax import models
    from xaijax.checkpoints import to_torch_state_dict

    v = models.random_variables(model, (1, size, size, 3), seed=seed)
    return randomize_state_dict(to_torch_state_dict(model, v), seed + 1000)


def load_torch(m, sd: dict[str, np.ndarray]):
    import torch

    m.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=True)
    return m.eval()


# --------------------------------------------------------------------------------------
# peer calls (x: NCHW torch tensor, targets: int64 tensor (N,)); each returns numpy (N, H, W)
# --------------------------------------------------------------------------------------


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def onehot_seed(out, targets):
    import torch

    return torch.nn.functional.one_hot(targets, out.shape[-1]).to(out.dtype)


def peer_methods(family: str, rise_masks: np.ndarray | None = None, ig_steps: int = IG_STEPS,
                 sg_n: int = 50, sg_noise: float = 0.15, ig_baseline: np.ndarray | None = None,
                 side: dict | None = None, sg_eps: np.ndarray | None = None,
                 ep_areas: tuple[float, ...] = (0.1,), ep_iter: int = 800,
                 ep_reward_scale: "list[float] | None" = None) -> dict[str, dict[str, Callable]]:
    """``{method: {peer: fn(model, x, targets) -> (N, H, W) numpy}}`` for one model family.

    Only the definitions are set here; the map each peer returns is its own (normalised
    or not); ``meta`` in the fixtures and bench_peers.py say how they are compared.

    Every function also runs on a float64 model with a float64 input (``model.double()``,
    ``x.double()``, under :func:`float64_defaults`), for bench_peers.py's float64 reference;
    the returned map is rounded to float32 (a relative change <= 6e-8).

    ``side``: when given, pytorch-grad-cam's FullGrad stores its raw terms there
    (``fullgrad_terms``: per biased Conv2d/BatchNorm2d ``sum_c |b_c dS/dz_c|``, (N, h, w);
    ``fullgrad_input``: ``|dS/dx * x|``, (N, C, H, W)). ``sg_eps``: the standard-normal
    patterns (n, H, W, C) of :class:`xaijax.methods.combinators.Smooth` (see
    :func:`smoothgrad_eps`); adds ``smoothgrad-shared-noise`` (Captum with that very
    noise). ``ep_areas``/``ep_iter``: areas and iterations of
    ``extremal-perturbation-masks`` (TorchRay, masks (N, A, H, W)); ``ep_reward_scale``: per
    image, TorchRay's simple reward (the target logit) multiplied by this factor (None: 1).
    """
    import torch
    import torch.nn.functional as F

    cam = cam_layer(family)
    sal_layer, contrast_layer, classifier_layer = eb_layers(family)

    def get(m, name):
        mod = m
        for p in name.split("."):
            mod = getattr(mod, p)
        return mod

    def captum_saliency(m, x, t):
        from captum.attr import Saliency

        return _np(Saliency(m).attribute(x, target=t, abs=True).amax(1))

    def torchray_gradient(m, x, t):
        from torchray.attribution.gradient import gradient

        return _np(gradient(m, x.clone(), t)[:, 0])

    def captum_ixg(m, x, t):
        from captum.attr import InputXGradient

        return _np(InputXGradient(m).attribute(x, target=t).sum(1))

    def captum_guided(m, x, t):
        from captum.attr import GuidedBackprop

        return _np(GuidedBackprop(m).attribute(x, target=t).abs().amax(1))

    def torchray_guided(m, x, t):
        from torchray.attribution.guided_backprop import guided_backprop

        return _np(guided_backprop(m, x.clone(), t)[:, 0])

    def captum_ig(method, baseline: np.ndarray | None = None):
        def fn(m, x, t):
            from captum.attr import IntegratedGradients

            b = 0.0 if baseline is None else torch.from_numpy(np.ascontiguousarray(baseline.transpose(0, 3, 1, 2)))
            a = IntegratedGradients(m).attribute(x, baselines=b, target=t, n_steps=ig_steps, method=method,
                                                 internal_batch_size=None)
            return _np(a.sum(1))

        return fn

    def captum_smoothgrad(m, x, t):
        from captum.attr import NoiseTunnel, Saliency

        span = (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
        # Captum's stdevs is absolute: give it xaijax's fraction of each sample's range
        stdevs = tuple(float(sg_noise * s) for s in span) if len(span) > 1 else float(sg_noise * span[0])
        a = NoiseTunnel(Saliency(m)).attribute(x, nt_type="smoothgrad", nt_samples=sg_n, stdevs=stdevs, target=t,
                                               abs=True, nt_samples_batch_size=sg_n)
        # NoiseTunnel averages the per-channel |grad|, xaijax averages the channel max:
        # both are reported as computed (the maps are stochastic anyway)
        return _np(a.amax(1))

    def captum_layer_gradcam(m, x, t):
        from captum.attr import LayerGradCam

        a = LayerGradCam(m, get(m, cam)).attribute(x, target=t, relu_attributions=True)
        return _np(F.interpolate(a, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0])

    def pgc(cls_name, layer: str | None = None):
        def fn(m, x, t):
            import pytorch_grad_cam as P
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

            cls = getattr(P, cls_name)
            layers = [] if cls_name == "FullGrad" else [get(m, layer or cam)]
            with cls(model=m, target_layers=layers) as c:
                if cls_name == "FullGrad" and side is not None:
                    inner = c.compute_cam_per_layer

                    def capture(input_tensor, *a, **k):  # its input term |dS/dx * x|, before post-processing
                        side["fullgrad_input"] = (input_tensor.grad * input_tensor).detach().abs().cpu().numpy()
                        return inner(input_tensor, *a, **k)

                    c.compute_cam_per_layer = capture
                res = c(input_tensor=x, targets=[ClassifierOutputTarget(int(i)) for i in t]).astype(np.float32)
                if cls_name == "FullGrad" and side is not None:
                    # pytorch-grad-cam's own raw terms: |bias * dS/dz| summed over channels, per layer
                    grads = [g.cpu().numpy() for g in c.activations_and_grads.gradients]
                    side["fullgrad_terms"] = [np.abs(b[None, :, None, None] * g).sum(1).astype(np.float32)
                                              for b, g in zip(c.bias_data, grads)]
            return res

        return fn

    def zennit(kind: str):
        def fn(m, x, t):
            from zennit.attribution import Gradient as ZGradient
            from zennit.composites import EpsilonPlus, EpsilonPlusFlat, LayerMapComposite, layer_map_base
            from zennit.rules import Epsilon
            from zennit.torchvision import ResNetCanonizer, VGGCanonizer
            from zennit.types import Convolution

            canon = [ResNetCanonizer()] if family == "resnet" else [VGGCanonizer()]
            if kind == "epsilon":
                comp = LayerMapComposite(
                    layer_map=layer_map_base(ZPLUS_STABILIZER)
                    + [(Convolution, Epsilon(EPS)), (torch.nn.Linear, Epsilon(EPS))],
                    canonizers=canon,
                )
            elif kind == "epsilon-plus":
                comp = EpsilonPlus(epsilon=EPS, stabilizer=ZPLUS_STABILIZER, canonizers=canon)
            else:
                comp = EpsilonPlusFlat(epsilon=EPS, stabilizer=ZPLUS_STABILIZER, canonizers=canon)
            xx = x.clone().requires_grad_(True)
            with ZGradient(model=m, composite=comp) as attributor:
                # output relevance = target logit (xaijax's LRP seed * logits)
                _, rel = attributor(xx, attr_output=lambda out: out * onehot_seed(out, t))
            return _np(rel.sum(1))

        return fn

    def torchray_eb(m, x, t):
        from torchray.attribution.excitation_backprop import excitation_backprop, update_resnet

        if family == "resnet":
            update_resnet(m)
        return _np(excitation_backprop(m, x.clone(), t, saliency_layer=sal_layer, resize=False)[:, 0])

    def torchray_ceb(m, x, t):
        from torchray.attribution.excitation_backprop import contrastive_excitation_backprop, update_resnet

        if family == "resnet":
            update_resnet(m)
        s = contrastive_excitation_backprop(m, x.clone(), t, saliency_layer=sal_layer, contrast_layer=contrast_layer,
                                            classifier_layer=classifier_layer, resize=False)
        return _np(s[:, 0])

    def torchray_rise(m, x, t):
        from torchray.attribution.rise import rise

        class ProbLogit(torch.nn.Module):
            """logit(softmax(f(x))): TorchRay's sigmoid of it is the softmax probability."""

            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, z):
                return torch.logit(torch.softmax(self.inner(z).double(), -1)).to(z.dtype)

        masks = torch.from_numpy(np.ascontiguousarray(rise_masks))[:, None].to(x.dtype)
        s = rise(ProbLogit(m), x, filter_masks=masks, num_masks=len(masks), batch_size=min(len(masks), 256))
        return _np(s[torch.arange(len(t)), t])

    def torchray_extremal(m, x, t):
        from torchray.attribution.extremal_perturbation import extremal_perturbation

        maps = [extremal_perturbation(m, x[i:i + 1], int(t[i]), areas=[0.1], max_iter=800)[0] for i in range(len(t))]
        return _np(torch.cat(maps)[:, 0])

    def captum_smoothgrad_shared(m, x, t):
        """Captum's NoiseTunnel(Saliency) with xaijax's noise: raw gradients (abs=False), channel sum.

        Captum draws all its noise in one ``torch.normal(0, stdev_expanded)`` call of shape
        (N * n, C, H, W) and adds it to ``x.repeat_interleave(n, 0)`` (sample-major):
        ``torch.normal`` is replaced during the call by xaijax's ``sigma_i * eps_j``
        (``sigma_i = noise * (max x_i - min x_i)``, computed in ``x``'s dtype as Smooth does).
        """
        from captum.attr import NoiseTunnel, Saliency

        n = sg_eps.shape[0]
        eps = torch.from_numpy(np.ascontiguousarray(sg_eps.transpose(0, 3, 1, 2))).to(x.dtype)  # (n, C, H, W)
        span = x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))
        sigma = torch.tensor(sg_noise, dtype=x.dtype) * span  # (N,)
        noise = (sigma[:, None, None, None, None] * eps[None]).reshape(-1, *x.shape[1:])  # (N * n, C, H, W)
        real_normal = torch.normal

        def shared_normal(mean, std, *a, **k):
            if tuple(std.shape) != tuple(noise.shape) or a or k:
                raise RuntimeError(f"unexpected torch.normal call {tuple(std.shape)} (expected {tuple(noise.shape)})")
            return noise.clone()

        torch.normal = shared_normal
        try:
            a = NoiseTunnel(Saliency(m)).attribute(x, nt_type="smoothgrad", nt_samples=n, stdevs=1.0, target=t,
                                                   abs=False, nt_samples_batch_size=n)
        finally:
            torch.normal = real_normal
        return _np(a.sum(1))

    def torchray_extremal_masks(m, x, t):
        """TorchRay's masks, (N, A, H, W): one call per image (TorchRay explains one image)."""
        import contextlib
        import types

        import torchray.utils as tru
        from torchray.attribution.extremal_perturbation import extremal_perturbation, simple_reward

        def reward(i):
            if ep_reward_scale is None:
                return simple_reward
            scale = float(ep_reward_scale[i])
            return lambda activation, target, variant: scale * simple_reward(activation, target, variant)

        with contextlib.ExitStack() as stack:
            if x.dtype == torch.float64:
                # TorchRay's blur (utils.imsmooth) builds its taps in float32 and F.conv2d refuses
                # mixed dtypes: cast the taps to the image's dtype (the taps stay float32-rounded)
                real_f = tru.F
                tru.F = types.SimpleNamespace(
                    pad=real_f.pad,
                    conv2d=lambda inp, w, *a, **k: real_f.conv2d(inp, w.to(inp.dtype), *a, **k))
                stack.callback(setattr, tru, "F", real_f)
            runs = [extremal_perturbation(m, x[i:i + 1], int(t[i]), areas=list(ep_areas), max_iter=ep_iter,
                                          reward_func=reward(i))
                    for i in range(len(t))]
        if side is not None:  # energy history per image: (A, 2, T), [:, 0] reward, [:, 1] area regulariser
            side["extremal_hist"] = [h.detach().double().numpy() for _, h in runs]
        return _np(torch.stack([mk[:, 0] for mk, _ in runs]))

    methods: dict[str, dict[str, Callable]] = {
        "gradient": {"captum": captum_saliency, "torchray": torchray_gradient},
        "gradient-x-input": {"captum": captum_ixg},
        "guided-backprop": {"captum": captum_guided, "torchray": torchray_guided},
        "integrated-gradients": {"captum": captum_ig("gausslegendre")},
        "integrated-gradients-trapezoid": {"captum": captum_ig("riemann_trapezoid", ig_baseline)},
        "smoothgrad": {"captum": captum_smoothgrad},
        "grad-cam": {"captum": captum_layer_gradcam, "pytorch-grad-cam": pgc("GradCAM")},
        "grad-cam-plus-plus": {"pytorch-grad-cam": pgc("GradCAMPlusPlus")},
        # VGG: the conv before the CAM ReLU, where max-pool tie-breaking cannot matter
        "grad-cam-plus-plus@features.28": {"pytorch-grad-cam": pgc("GradCAMPlusPlus", "features.28")},
        "fullgrad": {"pytorch-grad-cam": pgc("FullGrad")},
        "lrp-epsilon": {"zennit": zennit("epsilon")},
        "lrp-epsilon-plus": {"zennit": zennit("epsilon-plus")},
        "lrp-epsilon-plus-flat": {"zennit": zennit("epsilon-plus-flat")},
        "excitation-backprop": {"torchray": torchray_eb},
        "contrastive-excitation-backprop": {"torchray": torchray_ceb},
        "extremal-perturbation": {"torchray": torchray_extremal},
    }
    methods["extremal-perturbation-masks"] = {"torchray": torchray_extremal_masks}
    if rise_masks is not None:
        methods["rise"] = {"torchray": torchray_rise}
    if sg_eps is not None:
        methods["smoothgrad-shared-noise"] = {"captum": captum_smoothgrad_shared}
    return methods


def fold_bn_eps(model):
    """The same network with every BatchNorm's ``eps`` folded into ``running_var`` (``eps = 0``).

    In exact arithmetic the function is unchanged. zennit's ``MergeBatchNorm`` (used by its
    ``ResNetCanonizer``) merges a BatchNorm into the preceding convolution and then sets the
    BatchNorm's statistics to ``running_var = 1, running_mean = 0, weight = 1, bias = 0`` but
    keeps its ``eps``: the "identity" left behind computes ``x / sqrt(1 + eps)`` (1 - 5e-6 for
    eps = 1e-5), so zennit explains a slightly different network (every merged BatchNorm
    scales its output). With ``eps = 0`` the merge is exact.
    """
    import torch

    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.eps != 0:
            mod.running_var.data += mod.eps
            mod.eps = 0.0
    return model


def smoothgrad_eps(n: int, shape_hwc: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """The standard-normal patterns (n, H, W, C) float32 that
    :class:`xaijax.methods.combinators.Smooth` draws for one image shape (shared by the batch)."""
    import jax

    return np.asarray(jax.random.normal(jax.random.key(seed), (n,) + tuple(shape_hwc), dtype=np.float32))


def float64_defaults():
    """Context manager: torch's default dtype float64 (peers' own tensors, e.g. TorchRay's
    extremal-perturbation parameters, Captum's step sizes, follow the float64 model)."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def ctx():
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            yield
        finally:
            torch.set_default_dtype(old)

    return ctx()


#: methods recorded in the fixtures (smoothgrad and extremal perturbation are stochastic or
#: slow: benchmark only)
RECORDED = (
    "gradient", "gradient-x-input", "guided-backprop", "integrated-gradients", "integrated-gradients-trapezoid",
    "grad-cam", "grad-cam-plus-plus", "grad-cam-plus-plus@features.28", "fullgrad", "lrp-epsilon", "lrp-epsilon-plus", "lrp-epsilon-plus-flat",
    "excitation-backprop", "contrastive-excitation-backprop", "rise",
)

#: state dict used per method: the z+ composites were recorded on the bias-free variant (see
#: bias_free). Historical: zennit's ZPlus counts b+ exactly as xaijax's z+ does (both put the
#: positive bias in the x+ W+ term's denominator), so the biased network would compare too.
NOBIAS_METHODS = ("lrp-epsilon-plus", "lrp-epsilon-plus-flat")


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for p in ("torch", "torchvision", "zennit", "captum", "grad-cam", "torchray", "jax", "jaxlib", "flax", "numpy"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


def record(family: str, out_path: str, seed: int = 0) -> dict[str, Any]:
    import torch

    from xaijax.methods.perturbation import rise_masks

    torch.manual_seed(seed)
    model = xaijax_model(family)
    sd = make_weights(family, model, SIZE, seed)
    sd_nb = bias_free(sd)
    kw = TINY[family]["kwargs"]
    if family == "vgg":
        tm = lambda: torch_model("vgg", kw["num_classes"], kw["width"], kw["hidden"], kw["pool_size"])  # noqa: E731
    else:
        tm = lambda: torch_model("resnet", kw["num_classes"], kw["width"], layers=tuple(kw["layers"]))  # noqa: E731
    rng = np.random.default_rng(seed + 7)
    x = rng.standard_normal((len(TARGETS), SIZE, SIZE, 3)).astype(np.float32)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    t = torch.from_numpy(TARGETS)
    masks = np.asarray(rise_masks(RISE["seed"], np.arange(RISE["n"]), (SIZE, SIZE), RISE["s"], RISE["p"]), np.float32)
    ig_baseline = (0.5 * rng.standard_normal((1, SIZE, SIZE, 3))).astype(np.float32)
    side: dict = {}
    methods = peer_methods(family, masks if family == "vgg" else None, ig_baseline=ig_baseline, side=side)
    if family != "vgg":
        del methods["grad-cam-plus-plus@features.28"]
    arrays: dict[str, np.ndarray] = {"x": x, "target": TARGETS, "ig_baseline": ig_baseline}
    arrays.update({f"sd/{k}": v for k, v in sd.items()})
    arrays.update({f"sd_nobias/{k}": v for k, v in sd_nb.items() if not np.array_equal(v, sd[k])})
    if family == "vgg":
        arrays["rise_masks"] = masks
    logits = load_torch(tm(), sd)(xt).detach().numpy()
    arrays["logits"] = logits.astype(np.float32)
    done = {}
    for name in RECORDED:
        if name not in methods:
            continue
        for peer, fn in methods[name].items():
            m = load_torch(tm(), sd_nb if name in NOBIAS_METHODS else sd)  # fresh model: peers patch modules
            arrays[f"out/{name}/{peer}"] = fn(m, xt.clone(), t)
            done.setdefault(name, []).append(peer)
            print(f"{family}: {name} / {peer}: {arrays[f'out/{name}/{peer}'].shape}", flush=True)
    for i, term in enumerate(side.get("fullgrad_terms", [])):
        arrays[f"fullgrad_terms/{i:02d}"] = term
    meta = {
        "family": family,
        "xaijax_constructor": TINY[family],
        "input_size": SIZE,
        "seed": seed,
        "versions": versions(),
        "recorded": done,
        "hyperparameters": {"ig_steps": IG_STEPS, "rise": RISE, "zplus_stabilizer": ZPLUS_STABILIZER, "eps": EPS,
                            "cam_layer": cam_layer(family), "eb_layers": eb_layers(family)},
        "notes": {
            "weights": "He-normal kernels (xaijax random_variables), random biases and BN statistics (randomize_state_dict)",
            "lrp": "zennit Gradient attributor with attr_output = one_hot * logits; channel sum; ResNetCanonizer/VGGCanonizer",
            "zplus": "z+ composites run on sd with sd_nobias overrides (both zennit's ZPlus and xaijax's z+ count b+; the bias-free variant is historical)",
            "pytorch-grad-cam": "maps are min-max normalised (x - min) / (max + 1e-7) after cv2 bilinear resize",
            "excitation-backprop": "TorchRay at the saliency layer, resize=False (layer resolution)",
            "integrated-gradients-trapezoid": "baseline ig_baseline (a zero baseline puts a node where max-pool ties make the gradient ambiguous)",
            "fullgrad_terms": "pytorch-grad-cam's |bias * dS/dz| summed over channels, per Conv2d/BatchNorm2d with bias, in module order",
            "rise": "TorchRay rise with filter_masks = rise_masks, model wrapped as logit(softmax(f)); TorchRay divides by N, not N*p",
        },
    }
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = out_path + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, out_path)
    return meta


# --------------------------------------------------------------------------------------
# float64 LRP references (zennit only; torch twins of tests/torch_ref_vgg_resnet.py)
# --------------------------------------------------------------------------------------

#: what --lrp-float64 records: the torch twins' constructors (xaijax: the same arch/kwargs)
LRP64_MODELS = {
    "vgg": {"arch": "vgg16", "kwargs": {"width": 1 / 16, "num_classes": 5, "hidden": 16, "pool_size": 1}},
    "resnet": {"arch": "resnet50", "kwargs": {"width": 4, "num_classes": 5, "layers": [1, 1, 1, 1]}},
}
LRP64_STABILIZER = 1e-9  # zennit's stabilizer (Gamma, ZBox, ZPlus, and Norm on sums / average pools)


def record_lrp_float64(out_path: str, seed: int = 0) -> dict[str, Any]:
    """zennit's EpsilonGammaBox and EpsilonPlus in float64 on tiny VGG16 / ResNet50 twins, with biases.

    The models are the plain-torch twins of ``tests/torch_ref_vgg_resnet.py`` (torchvision's
    module names), randomised by its ``randomize_(seed)`` (random biases and BatchNorm
    statistics), every BatchNorm's ``eps`` folded into ``running_var`` (``eps = 0``: zennit's
    merge is then exact; xaijax's port keeps ``eps = 1e-5``, so the test subtracts it from
    ``var``), all values rounded to float32 (the port reads them exactly) and run in float64.
    Only torch and zennit are needed: ``zennit.torchvision`` imports torchvision's ResNet block
    classes for its ``isinstance`` checks, and where torchvision does not load (the CPU torch
    build) those names are bound to the twins' block classes, which have torchvision's
    attributes. Output relevance: the target logit; maps summed over channels.
    """
    import types

    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import torch_ref_vgg_resnet as twins

    try:
        import torchvision.models.resnet  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure: bind the names zennit needs
        tv, tvm, tvr = (types.ModuleType(n) for n in ("torchvision", "torchvision.models", "torchvision.models.resnet"))
        tvr.Bottleneck, tvr.BasicBlock = twins.TorchBottleneck, twins.TorchBasicBlock
        tv.models, tvm.resnet = tvm, tvr
        sys.modules.update({"torchvision": tv, "torchvision.models": tvm, "torchvision.models.resnet": tvr})
    from zennit.attribution import Gradient as ZGradient
    from zennit.composites import EpsilonGammaBox, EpsilonPlus
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    low, high = (0 - mean) / std, (1 - mean) / std  # xaijax's ZBox default bounds
    cfg_d = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    x = np.random.default_rng(seed + 7).standard_normal((2, SIZE, SIZE, 3))
    arrays: dict[str, np.ndarray] = {"x": x, "target": TARGETS}
    for family, spec in LRP64_MODELS.items():
        kw = spec["kwargs"]
        if family == "vgg":
            m = twins.TorchVGG(cfg_d, num_classes=kw["num_classes"], width=kw["width"], hidden=kw["hidden"],
                               pool_size=kw["pool_size"])
            canon = VGGCanonizer
        else:
            m = twins.TorchResNet(twins.TorchBottleneck, tuple(kw["layers"]), num_classes=kw["num_classes"], width=kw["width"])
            canon = ResNetCanonizer
        twins.randomize_(m, seed=seed)
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_var.data += mod.eps
                mod.eps = 0.0
        m = m.float().double().eval()
        # float32 storage is exact (the values were rounded to float32 above)
        arrays.update({f"{family}/sd/{k}": (v.detach().float() if v.is_floating_point() else v).numpy() for k, v in m.state_dict().items()})
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        t = torch.from_numpy(TARGETS)
        arrays[f"{family}/logits"] = m(xt).detach().numpy()
        composites = {
            "lrp-epsilon-gamma-box": lambda: EpsilonGammaBox(
                low=torch.tensor(low).view(1, 3, 1, 1), high=torch.tensor(high).view(1, 3, 1, 1),
                epsilon=EPS, gamma=0.25, stabilizer=LRP64_STABILIZER, canonizers=[canon()]),
            "lrp-epsilon-plus": lambda: EpsilonPlus(epsilon=EPS, stabilizer=LRP64_STABILIZER, canonizers=[canon()]),
        }
        for name, make in composites.items():
            xx = xt.clone().requires_grad_(True)
            with ZGradient(model=m, composite=make()) as attributor:
                _, rel = attributor(xx, attr_output=lambda out: out * onehot_seed(out, t))
            arrays[f"{family}/out/{name}/zennit"] = rel.detach().numpy().sum(1)
            print(f"{family}: {name} / zennit (float64)", flush=True)
    meta = {
        "models": LRP64_MODELS,
        "input_size": SIZE,
        "seed": seed,
        "dtype": "float64",
        "versions": versions(),
        "hyperparameters": {"eps": EPS, "gamma": 0.25, "stabilizer": LRP64_STABILIZER, "low": list(low), "high": list(high)},
        "notes": {
            "models": "tests/torch_ref_vgg_resnet.py twins, randomize_(seed); BatchNorm eps folded into running_var (eps = 0); values rounded to float32",
            "zennit": "Gradient attributor, attr_output = one_hot * logits; EpsilonGammaBox / EpsilonPlus with ResNetCanonizer / VGGCanonizer; channel sum",
            "torchvision": "not loadable beside the CPU torch build: zennit.torchvision's Bottleneck/BasicBlock bound to the twins' classes",
            "stabilizer": "zennit's Norm rule on residual sums and average pools adds 1e-9 * sign; xaijax's z-rule there adds nothing",
        },
    }
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = out_path + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, out_path)
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "tests", "fixtures"))
    ap.add_argument("--families", nargs="+", default=["vgg", "resnet"], choices=["vgg", "resnet"])
    ap.add_argument("--lrp-float64", action="store_true",
                    help="record only the float64 zennit LRP references (peer_refs_lrp_float64.npz; torch + zennit suffice)")
    args = ap.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if args.lrp_float64:
        path = os.path.join(args.out_dir, "peer_refs_lrp_float64.npz")
        record_lrp_float64(path)
        print(f"wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB)")
        return
    for fam in args.families:
        path = os.path.join(args.out_dir, f"peer_refs_{fam}.npz")
        record(fam, path)
        print(f"wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB)")


if __name__ == "__main__":
    sys.exit(main())
