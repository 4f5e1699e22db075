"""Record the AttnLRP authors' ``lxt`` (efficient mode) on a tiny torchvision ViT (issue 20).

Run in the peer venv (``experiments/PEERS.md``, section "lxt (AttnLRP)")::

    /work/peer-venv/bin/python experiments/make_lxt_reference.py

Writes ``tests/fixtures/lxt_vit_ref.npz``: the torch state dict (float64 numpy), two 32-px
inputs (NCHW), the logits of the unpatched model, the targets, and lxt's input relevance
``x * x.grad`` (per channel, NCHW) for

* ``plain``: ``lxt.efficient.monkey_patch(vision_transformer)`` alone: lxt's default map for
  torchvision's ViT (``cp_LRP``: GELU identity rule, LayerNorm with the standard deviation
  detached, ``nn.MultiheadAttention`` with query and key detached); every linear layer and the
  patch convolution run through plain autograd, i.e. gradient x input;
* ``gamma``: the same plus ``lxt.efficient.monkey_patch_zennit()`` and zennit's
  ``LayerMapComposite([(nn.Conv2d, Gamma(0.25)), (nn.Linear, Gamma(0.05))])``, the recipe of
  lxt's ViT example (gammas: xaijax's ``VIT_CONV_GAMMA`` / ``VIT_DENSE_GAMMA``, from that
  example's grid).

Also per-layer relevance ``t * dt`` at the outputs of named torch modules (forward hooks that
keep the output and its gradient) for diagnosing differences, and the provenance (versions,
the calls) in ``meta`` (JSON). Everything in float64. lxt's patches act on the classes
(``torch.nn.LayerNorm``, ``GELU``, ``MultiheadAttention``), so the logits are computed before
patching.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "lxt_vit_ref.npz")

CFG = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3)
CONV_GAMMA, LIN_GAMMA = 0.25, 0.05
SEED = 20

#: modules whose output relevance (output * its gradient) is recorded
TAPS = ["conv_proj", "encoder.layers.encoder_layer_0.ln_1", "encoder.layers.encoder_layer_0.self_attention",
        "encoder.layers.encoder_layer_0.ln_2", "encoder.layers.encoder_layer_0.mlp.0",
        "encoder.layers.encoder_layer_0.mlp.1", "encoder.layers.encoder_layer_0",
        "encoder.layers.encoder_layer_1.ln_1", "encoder.layers.encoder_layer_1.self_attention",
        "encoder.layers.encoder_layer_1.ln_2", "encoder.layers.encoder_layer_1.mlp.0",
        "encoder.layers.encoder_layer_1.mlp.1", "encoder.layers.encoder_layer_1", "encoder.ln"]


def build_model():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(SEED)
    model = VisionTransformer(**CFG).double().eval()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            randn = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "encoder.ln.weight":
                p.copy_(1.0 + 0.3 * randn)  # LayerNorm scales
            elif p.ndim == 1 or name in ("class_token", "encoder.pos_embedding"):
                p.copy_(0.2 * randn)  # biases, LayerNorm shifts, class token, position embedding
            else:
                fan_in = p[0].numel()
                p.copy_(randn * (1.5 / fan_in) ** 0.5)
    return model


def run(model, x, target, tap_modules):
    """lxt's heatmap ``x * x.grad`` and ``t * dt`` at the taps for the target logit."""
    outs = {}

    def keep(name):
        def hook(mod, inp, out):
            t = out[0] if isinstance(out, tuple) else out
            t.retain_grad()
            outs[name] = t
        return hook

    handles = [tap_modules[n].register_forward_hook(keep(n)) for n in TAPS]
    x = x.clone().requires_grad_(True)
    y = model(x)
    y[torch.arange(len(x)), target].sum().backward()
    for h in handles:
        h.remove()
    taps = {n: (t * t.grad).detach().numpy() for n, t in outs.items()}
    return (x * x.grad).detach().numpy(), y.detach().numpy(), taps


def main():
    import importlib.metadata as md

    import torchvision
    from torchvision.models import vision_transformer

    torch.set_default_dtype(torch.float64)
    model = build_model()
    g = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn((2, 3, CFG["image_size"], CFG["image_size"]), generator=g, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x).numpy()
    target = np.array([int(np.argmax(logits[0])), int(np.argmin(logits[1]))])  # a top class and a bottom class

    from lxt.efficient import monkey_patch, monkey_patch_zennit

    monkey_patch(vision_transformer, verbose=True)
    mods = dict(model.named_modules())
    arrays = {}
    r, y, taps = run(model, x, torch.as_tensor(target), mods)
    assert np.allclose(y, logits, rtol=0, atol=1e-12), "patched forward changed the logits"
    arrays["relevance/plain"] = r
    for n, t in taps.items():
        arrays[f"taps/plain/{n}"] = t

    import zennit.rules as z_rules
    from zennit.composites import LayerMapComposite

    monkey_patch_zennit(verbose=True)
    comp = LayerMapComposite([(torch.nn.Conv2d, z_rules.Gamma(CONV_GAMMA)), (torch.nn.Linear, z_rules.Gamma(LIN_GAMMA))])
    comp.register(model)
    r, y, taps = run(model, x, torch.as_tensor(target), mods)
    comp.remove()
    assert np.allclose(y, logits, rtol=0, atol=1e-12)
    arrays["relevance/gamma"] = r
    for n, t in taps.items():
        arrays[f"taps/gamma/{n}"] = t

    for k, v in model.state_dict().items():
        arrays[f"sd/{k}"] = v.detach().numpy()
    arrays["x"] = x.numpy()
    arrays["logits"] = logits
    arrays["target"] = target
    meta = dict(
        dtype="float64",
        config=CFG,
        seed=SEED,
        conv_gamma=CONV_GAMMA,
        lin_gamma=LIN_GAMMA,
        taps=TAPS,
        versions={"lxt": md.version("lxt"), "zennit": md.version("zennit"), "torch": torch.__version__,
                  "torchvision": torchvision.__version__, "python": sys.version.split()[0]},
        calls={
            "plain": "lxt.efficient.monkey_patch(torchvision.models.vision_transformer); "
                     "y = model(x.requires_grad_()); y[i, target[i]].sum().backward(); heatmap = x * x.grad",
            "gamma": "then lxt.efficient.monkey_patch_zennit(); zennit.composites.LayerMapComposite("
                     f"[(torch.nn.Conv2d, zennit.rules.Gamma({CONV_GAMMA})), (torch.nn.Linear, zennit.rules.Gamma({LIN_GAMMA}))])"
                     ".register(model); same forward/backward; heatmap = x * x.grad",
        },
        heatmap="x * x.grad per channel (NCHW); lxt's examples sum it over channels",
    )
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({os.path.getsize(OUT) / 1024:.0f} KiB)")
    print("logits", logits, "target", target)
    for k in ("plain", "gamma"):
        rr = arrays[f"relevance/{k}"]
        print(k, "input totals", rr.sum(axis=(1, 2, 3)))


if __name__ == "__main__":
    main()
