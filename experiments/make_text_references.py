"""Record Captum's token attributions of a tiny Hugging Face BERT (peer reference for issue 24).

Writes ``tests/fixtures/text_refs.npz``. ``tests/test_token_attribution.py`` reloads it with
numpy only, ports the weights with :func:`xaijax.checkpoints.load_bert` (Hugging Face names)
and compares :func:`xaijax.methods.text.explain_tokens` with the recorded maps.

Runs in the peer virtualenv (torch, transformers, captum; see ``experiments/PEERS.md``)::

    /work/peer-venv/bin/python experiments/make_text_references.py

Model: ``transformers.BertForSequenceClassification`` (vocab 64, hidden 16, 2 layers, 2 heads,
intermediate 32, 32 positions, 3 labels, exact GELU, eager attention, no dropout) in float64
with seeded random weights larger than the 0.02 initialisation (so that attributions are not
all alike): embeddings N(0, 1), linear weights N(0, 1/fan_in), LayerNorm weights U(0.5, 1.5),
biases N(0, 0.3^2), each rounded to float32 (xaijax's port stores float32 parameters; cast
back to float64 they are exactly the reference's weights, so the comparison is float64 to
float64). Three sentence pairs of different lengths, padded with id 0 (``[PAD]``;
``[CLS]`` = 2, ``[SEP]`` = 3 as in :func:`xaijax.data.tokenizer.write_vocab`).

Captum explains ``forward(inputs_embeds) = model(inputs_embeds=e, token_type_ids, attention_mask).logits``
— the *word* embeddings, with position and token-type embeddings added inside, which is
xaijax's explanation view — with, per stored map (``out/<name>``, float64):

* ``ig_pad_riemann_right``: ``IntegratedGradients``, 32 steps, ``method="riemann_right"``,
  baseline the ``[PAD]`` embedding at every position except ``[CLS]``/``[SEP]`` (their own
  embedding; Captum's BERT tutorial's reference) — (N, T, D);
* ``ig_zero_gausslegendre``: 24 steps, ``method="gausslegendre"``, all-zero baseline — (N, T, D);
* ``input_x_gradient``: ``InputXGradient`` — (N, T, D);
* ``saliency``: ``Saliency(abs=False)``, the raw gradient — (N, T, D).

xaijax sums over D (``reduce="sum"``) for the first three and takes the L2 norm of the
gradient for ``gradient`` (the text default), so the test reduces the stored arrays the same way.
"""

from __future__ import annotations

import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "text_refs.npz")

PAD, CLS, SEP = 0, 2, 3
PAIRS = [(7, 3), (4, 5), (9, 8)]  # (premise words, hypothesis words): lengths 13, 12, 20


def _batch(rng):
    rows = []
    for a, b in PAIRS:
        words_a = rng.integers(5, 64, a).tolist()
        words_b = rng.integers(5, 64, b).tolist()
        rows.append(([CLS] + words_a + [SEP] + words_b + [SEP], [0] * (a + 2) + [1] * (b + 1)))
    t = max(len(r[0]) for r in rows)
    ids = np.full((len(rows), t), PAD, np.int64)
    types = np.zeros((len(rows), t), np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for i, (r, ty) in enumerate(rows):
        ids[i, : len(r)] = r
        types[i, : len(r)] = ty
        mask[i, : len(r)] = 1
    return ids, types, mask


def main() -> None:
    import captum
    import torch
    import transformers
    from captum.attr import InputXGradient, IntegratedGradients, Saliency
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, type_vocab_size=2, num_labels=3, hidden_act="gelu", layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification._from_config(cfg, attn_implementation="eager").double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
            elif "embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / np.sqrt(p.shape[1]))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            p.copy_(p.float().double())  # float32-representable: the port (float32 parameters) is exact
    ids, types, mask = _batch(rng)
    tid, ttypes, tmask = (torch.from_numpy(a) for a in (ids, types, mask))
    word = model.bert.embeddings.word_embeddings
    with torch.no_grad():
        emb = word(tid)
        special = (tid == CLS) | (tid == SEP)
        base_pad = torch.where(special[..., None], emb, word(torch.full_like(tid, PAD)))
        logits = model(input_ids=tid, token_type_ids=ttypes, attention_mask=tmask).logits
    target = torch.tensor([0, 1, 2])

    def forward(e, tt, am):
        return model(inputs_embeds=e, token_type_ids=tt, attention_mask=am).logits

    extra = (ttypes, tmask)
    out = {}
    ig = IntegratedGradients(forward)
    out["ig_pad_riemann_right"] = ig.attribute(emb, baselines=base_pad, target=target, additional_forward_args=extra,
                                               n_steps=32, method="riemann_right")
    out["ig_zero_gausslegendre"] = ig.attribute(emb, baselines=torch.zeros_like(emb), target=target,
                                                additional_forward_args=extra, n_steps=24, method="gausslegendre")
    out["input_x_gradient"] = InputXGradient(forward).attribute(emb.clone().requires_grad_(True), target=target, additional_forward_args=extra)
    out["saliency"] = Saliency(forward).attribute(emb.clone().requires_grad_(True), target=target, additional_forward_args=extra, abs=False)
    arrays = {f"out/{k}": v.detach().numpy().astype(np.float64) for k, v in out.items()}
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    arrays.update({f"sd/{k}": v for k, v in sd.items()})
    meta = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "captum": captum.__version__},
        "config": {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool, type(None), dict, list))},
        "special_ids": {"pad": PAD, "cls": CLS, "sep": SEP},
        "maps": {
            "ig_pad_riemann_right": "IntegratedGradients n_steps=32 riemann_right, baseline [PAD] embeddings except [CLS]/[SEP]; (N,T,D)",
            "ig_zero_gausslegendre": "IntegratedGradients n_steps=24 gausslegendre, zero baseline; (N,T,D)",
            "input_x_gradient": "InputXGradient on inputs_embeds; (N,T,D)",
            "saliency": "Saliency abs=False (raw gradient) on inputs_embeds; (N,T,D)",
        },
        "forward": "model(inputs_embeds=e, token_type_ids, attention_mask).logits, float64, eval mode",
        "script": "experiments/make_text_references.py",
    }
    np.savez_compressed(OUT, meta=np.asarray(json.dumps(meta)), input_ids=ids, token_type_ids=types, attention_mask=mask,
                        target=target.numpy(), logits=logits.numpy(), **arrays)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
