"""Record pytorch-grad-cam references for the CAM catalogue (issue 22): HiResCAM, element-wise
Grad-CAM, Ablation-CAM, Eigen-CAM, EigenGrad-CAM, Grad-CAM with ``eigen_smooth`` and with
``aug_smooth``, Guided Backprop (``GuidedBackpropReLUModel``) for Guided Grad-CAM, and Deep
Feature Factorization's NMF reconstruction error.

Run in the peer virtualenv (torch, torchvision, grad-cam 1.5.7; xaijax installed editable)::

    /work/peer-venv/bin/python experiments/make_gradcam_references.py

Writes ``tests/fixtures/gradcam_refs.npz``: per family (``vgg``, ``resnet``: the tiny
torchvision-class models of :mod:`make_peer_references`, ``TINY``, with its seeded weights) the
torch-style state dict (float32 values), the inputs (float32 values), the targets and, run in float64
(``model.double()``):

* ``{family}/out/{name}``: pytorch-grad-cam's final maps (min-max normalised, cv2-resized, float32);
* ``{family}/layer/{name}``: its unnormalised layer maps, the output of ``get_cam_image`` before
  the ReLU (float64 where the peer keeps float64; ``get_2d_projection`` and Ablation-CAM's
  weights are float32);
* ``{family}/gb``: ``GuidedBackpropReLUModel`` input gradients (N, H, W, 3), one image at a time
  (float64 run, stored as float32); the peer's Guided Grad-CAM (its ``cam.py`` example) is
  ``gb * out/grad-cam[..., None]``;
* ``{family}/dff/relerr``: per image, ``||V - W H||_F / ||V||_F`` of the peer's ``dff`` (scikit-learn
  NMF) with ``n_components = 5`` on the offset activations ``V``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from make_peer_references import SIZE, TARGETS, TINY, cam_layer, load_torch, make_weights, torch_model, versions, xaijax_model  # noqa: E402

OUT = os.path.join(ROOT, "tests", "fixtures", "gradcam_refs.npz")
DFF_COMPONENTS = 5
METHODS = {  # recorded name -> (pytorch-grad-cam class, call keyword arguments)
    "hirescam": ("HiResCAM", {}),
    "grad-cam-elementwise": ("GradCAMElementWise", {}),
    "eigen-cam": ("EigenCAM", {}),
    "eigengrad-cam": ("EigenGradCAM", {}),
    "ablation-cam": ("AblationCAM", {}),
    "grad-cam+eigen_smooth": ("GradCAM", {"eigen_smooth": True}),
    "grad-cam+aug_smooth": ("GradCAM", {"aug_smooth": True}),
    "grad-cam": ("GradCAM", {}),
}


def _get(m, name: str):
    for n, mod in m.named_modules():
        if n == name:
            return mod
    raise KeyError(name)


def record_family(family: str, seed: int = 0) -> dict[str, np.ndarray]:
    import pytorch_grad_cam as P
    import torch
    from pytorch_grad_cam.feature_factorization.deep_feature_factorization import dff
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    kw = TINY[family]["kwargs"]
    sd = make_weights(family, xaijax_model(family), SIZE, seed)
    if family == "vgg":
        tm = lambda: torch_model("vgg", kw["num_classes"], kw["width"], kw["hidden"], kw["pool_size"])  # noqa: E731
    else:
        tm = lambda: torch_model("resnet", kw["num_classes"], kw["width"], layers=tuple(kw["layers"]))  # noqa: E731
    # float32 values (stored as float32, run as float64 on both sides)
    x = np.random.default_rng(seed + 11).standard_normal((len(TARGETS), SIZE, SIZE, 3)).astype(np.float32)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2).astype(np.float64)))
    layer = cam_layer(family)
    arrays: dict[str, np.ndarray] = {"x": x}
    arrays.update({f"sd/{k}": v for k, v in sd.items()})
    fresh = lambda: load_torch(tm(), sd).double()  # noqa: E731
    arrays["logits"] = fresh()(xt).detach().numpy()
    targets = [ClassifierOutputTarget(int(t)) for t in TARGETS]
    for name, (cls, call_kw) in METHODS.items():
        m = fresh()
        cam = getattr(P, cls)(model=m, target_layers=[_get(m, layer)])
        inner = cam.get_cam_image
        layer_maps = []

        def capture(*a, **k):
            out = inner(*a, **k)
            layer_maps.append(np.asarray(out))
            return out

        cam.get_cam_image = capture
        arrays[f"out/{name}"] = np.asarray(cam(input_tensor=xt.clone(), targets=targets, **call_kw))
        if not call_kw.get("aug_smooth"):
            arrays[f"layer/{name}"] = layer_maps[0]
        if name == "ablation-cam":
            acts = {}
            h = _get(m, layer).register_forward_hook(lambda mod, i, o: acts.setdefault("a", o.detach()))
            m(xt)
            h.remove()
            arrays["ablation_layer_min"] = np.array(float(acts["a"].min()))
        print(f"{family}: {name}", arrays[f"out/{name}"].shape, flush=True)
    # Guided Backprop, one image at a time (the peer explains output[0])
    gbs = []
    for i, t in enumerate(TARGETS):
        gbm = P.GuidedBackpropReLUModel(model=fresh(), device="cpu")
        gbs.append(gbm(xt[i : i + 1].clone(), target_category=int(t)))
    arrays["gb"] = np.stack(gbs).astype(np.float32)  # computed in float64, stored in float32 (size)
    # DFF: the peer's NMF on each image's offset activations
    m = fresh()
    acts = {}
    h = _get(m, layer).register_forward_hook(lambda mod, i, o: acts.__setitem__("a", o.detach().numpy()))
    m(xt)
    h.remove()
    rel = []
    for i in range(len(TARGETS)):
        a = acts["a"][i : i + 1].copy()
        concepts, expl = dff(a.copy(), n_components=DFF_COMPONENTS)
        v = a[0].reshape(a.shape[1], -1)
        offset = v.min(axis=-1, keepdims=True)
        w = concepts - offset
        hh = expl[0].reshape(DFF_COMPONENTS, -1)
        rel.append(np.linalg.norm(v - offset - w @ hh) / np.linalg.norm(v - offset))
    arrays["dff/relerr"] = np.array(rel)
    print(f"{family}: dff relerr {rel}", flush=True)
    return arrays


def main() -> None:
    arrays: dict[str, Any] = {"target": TARGETS}
    for family in ("vgg", "resnet"):
        arrays.update({f"{family}/{k}": v for k, v in record_family(family).items()})
    meta = {
        "families": {f: TINY[f] for f in ("vgg", "resnet")},
        "input_size": SIZE,
        "cam_layers": {f: cam_layer(f) for f in ("vgg", "resnet")},
        "versions": versions(),
        "dtype": "float64 torch model and input; pytorch-grad-cam casts final maps (and get_2d_projection, AblationCAM weights) to float32",
        "methods": {k: {"class": c, "call": kw} for k, (c, kw) in METHODS.items()},
        "dff": {"n_components": DFF_COMPONENTS, "nmf": "sklearn NMF(init='random', random_state=0), per image"},
        "weights": "make_peer_references.make_weights(family, model, SIZE, seed=0); inputs rng(seed 11) standard normal",
    }
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = OUT + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, OUT)
    print("wrote", OUT, os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()
