"""ViT (torchvision names) and DeiT (timm names): forward parity with torch references, porting,
taps on attention, strict-key errors, position-embedding resampling.

The torch references below are written here from torchvision's ``vision_transformer.py`` and
timm's ``vision_transformer.py`` descriptions (neither package is installed), with their module
and parameter names, so their state dicts have the keys and shapes of the real checkpoints.
"""

from __future__ import annotations

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax import checkpoints, models
from xaijax.checkpoints import CheckpointMismatchError, vit_mapping
from xaijax.models import taps, vit

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

TINY = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5)


# --------------------------------------------------------------------------------------------
# torch references


class TVEncoderBlock(tnn.Module):
    def __init__(self, d, heads, mlp):
        super().__init__()
        self.ln_1 = tnn.LayerNorm(d, eps=1e-6)
        self.self_attention = tnn.MultiheadAttention(d, heads, batch_first=True)
        self.dropout = tnn.Dropout(0.0)
        self.ln_2 = tnn.LayerNorm(d, eps=1e-6)
        self.mlp = tnn.Sequential(tnn.Linear(d, mlp), tnn.GELU(), tnn.Dropout(0.0), tnn.Linear(mlp, d), tnn.Dropout(0.0))

    def forward(self, inp):
        x = self.ln_1(inp)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + inp
        return x + self.mlp(self.ln_2(x))


class TVEncoder(tnn.Module):
    def __init__(self, seq, layers, d, heads, mlp):
        super().__init__()
        self.pos_embedding = tnn.Parameter(torch.empty(1, seq, d).normal_(std=0.02))
        self.dropout = tnn.Dropout(0.0)
        self.layers = tnn.Sequential(collections.OrderedDict((f"encoder_layer_{i}", TVEncoderBlock(d, heads, mlp)) for i in range(layers)))
        self.ln = tnn.LayerNorm(d, eps=1e-6)

    def forward(self, x):
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class TorchViT(tnn.Module):
    """torchvision's ``VisionTransformer`` (no representation layer)."""

    def __init__(self, image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim, num_classes):
        super().__init__()
        self.patch_size = patch_size
        self.conv_proj = tnn.Conv2d(3, hidden_dim, patch_size, patch_size)
        self.class_token = tnn.Parameter(torch.zeros(1, 1, hidden_dim))
        seq = (image_size // patch_size) ** 2 + 1
        self.encoder = TVEncoder(seq, num_layers, hidden_dim, num_heads, mlp_dim)
        self.heads = tnn.Sequential(collections.OrderedDict(head=tnn.Linear(hidden_dim, num_classes)))

    def forward(self, x):
        n = x.shape[0]
        x = self.conv_proj(x)
        x = x.reshape(n, x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


class TimmAttention(tnn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.num_heads, self.scale = heads, (d // heads) ** -0.5
        self.qkv = tnn.Linear(d, 3 * d)
        self.proj = tnn.Linear(d, d)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TimmMlp(tnn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = tnn.Linear(d, hidden), tnn.GELU(), tnn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(tnn.Module):
    def __init__(self, d, heads, mlp):
        super().__init__()
        self.norm1 = tnn.LayerNorm(d, eps=1e-6)
        self.attn = TimmAttention(d, heads)
        self.norm2 = tnn.LayerNorm(d, eps=1e-6)
        self.mlp = TimmMlp(d, mlp)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmPatchEmbed(tnn.Module):
    def __init__(self, p, d):
        super().__init__()
        self.proj = tnn.Conv2d(3, d, p, p)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TorchDeiT(tnn.Module):
    """timm's ``VisionTransformer`` (class-token pooling) / ``VisionTransformerDistilled`` in eval mode."""

    def __init__(self, image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim, num_classes, distilled=False):
        super().__init__()
        self.distilled = distilled
        self.patch_embed = TimmPatchEmbed(patch_size, hidden_dim)
        self.cls_token = tnn.Parameter(torch.zeros(1, 1, hidden_dim))
        if distilled:
            self.dist_token = tnn.Parameter(torch.zeros(1, 1, hidden_dim))
        prefix = 2 if distilled else 1
        self.pos_embed = tnn.Parameter(torch.zeros(1, (image_size // patch_size) ** 2 + prefix, hidden_dim))
        self.blocks = tnn.Sequential(*[TimmBlock(hidden_dim, num_heads, mlp_dim) for _ in range(num_layers)])
        self.norm = tnn.LayerNorm(hidden_dim, eps=1e-6)
        self.head = tnn.Linear(hidden_dim, num_classes)
        if distilled:
            self.head_dist = tnn.Linear(hidden_dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        n = x.shape[0]
        prefix = [self.cls_token.expand(n, -1, -1)] + ([self.dist_token.expand(n, -1, -1)] if self.distilled else [])
        x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        if not self.distilled:
            return self.head(x[:, 0])
        return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2


def _randomize(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("weight") and p.ndim == 1:  # LayerNorm
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            else:
                fan_in = p.shape[1] * (p[0, 0].numel() if p.ndim == 4 else 1) if p.ndim >= 2 else 1
                std = 0.3 if p.ndim < 2 or name.endswith(("token", "embed", "embedding")) else 1.0 / math.sqrt(fan_in)
                p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m.eval()


def _torch_model(kind, **kw):
    """A float64 torch reference whose weights are float32 values (the porter stores float32),
    so the Flax model gets exactly the same numbers."""
    cfg = {**TINY, **kw}
    m = TorchViT(**cfg) if kind == "vit" else TorchDeiT(**cfg, distilled=(kind == "deit_distilled"))
    return _randomize(m).float().double()


def _flax_model(kind, **kw):
    cfg = {**TINY, **kw}
    if kind == "vit":
        return vit.VisionTransformer(**cfg)
    return vit.DeiT(**cfg, distilled=(kind == "deit_distilled"))


def _state_dict(tm):
    return {k: v.detach().numpy() for k, v in tm.state_dict().items()}


def _f64(variables):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float64)), variables)


def _images(n=2, size=32, seed=1):
    return np.random.default_rng(seed).standard_normal((n, size, size, 3))


def _port64(kind, **kw):
    """(flax model, float64 variables, torch model) on one set of random weights."""
    tm = _torch_model(kind, **kw)
    fm = _flax_model(kind, **kw)
    variables = checkpoints.from_torch_state_dict(fm, {k: v.astype(np.float64) for k, v in _state_dict(tm).items()})
    return fm, _f64(variables), tm


# --------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("kind", ["vit", "deit", "deit_distilled"])
def test_forward_parity_float64(kind, x64):
    fm, variables, tm = _port64(kind)
    x = _images()
    ref = tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).detach().numpy()
    out = np.asarray(fm.apply(variables, jnp.asarray(x)))
    assert out.dtype == np.float64 and out.shape == (2, 5)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6 * max(1.0, np.abs(ref).max()))
    assert np.abs(ref).max() > 0.1  # the outputs are not trivially small


def test_taps_capture_attention_probabilities_and_tokens(x64):
    fm, variables, tm = _port64("vit")
    x = _images()
    attn_names = list(fm.attention_layers)
    assert attn_names[0] == "encoder.layers.encoder_layer_0.self_attention.attn"
    _, cap = taps.forward(fm, variables, jnp.asarray(x), capture=attn_names + list(fm.block_layers))
    t = fm.num_tokens
    for name in attn_names:
        a = np.asarray(cap[name])
        assert a.shape == (2, fm.num_heads, t, t)
        assert (a >= 0).all()
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-12)
    assert cap[fm.block_layers[-1]].shape == (2, t, fm.hidden_dim) and fm.cam_layer == fm.block_layers[-1] + ".ln_1"
    # the probabilities of block 0 are torch's MultiheadAttention weights (per head)
    with torch.no_grad():
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        tok = tm.conv_proj(xt).flatten(2).transpose(1, 2)
        tok = torch.cat([tm.class_token.expand(2, -1, -1), tok], 1) + tm.encoder.pos_embedding
        blk = tm.encoder.layers.encoder_layer_0
        h = blk.ln_1(tok)
        _, w = blk.self_attention(h, h, h, need_weights=True, average_attn_weights=False)
        out0 = blk(tok)
    np.testing.assert_allclose(np.asarray(cap[attn_names[0]]), w.numpy(), atol=1e-12)
    np.testing.assert_allclose(np.asarray(cap["encoder.layers.encoder_layer_0"]), out0.numpy(), atol=1e-10)


def test_deit_attention_names_and_layer_list():
    fm = _flax_model("deit_distilled")
    v = models.random_variables(fm, (1, 32, 32, 3))
    names = taps.layer_names(fm, v, jnp.zeros((1, 32, 32, 3)))
    for n in ("patch_embed.proj", "blocks.1.attn.qkv", "blocks.1.attn.qk", "blocks.1.attn.attn", "blocks.1.attn.av", "blocks.1.attn.proj",
              "blocks.1.mlp.fc1", "blocks.1.mlp.act", "blocks.1.norm2", "norm", "head", "head_dist", "head_mean"):
        assert n in names, n
    assert fm.attention_layers == ("blocks.0.attn.attn", "blocks.1.attn.attn") and fm.cam_layer == "blocks.1.norm1"
    assert fm.num_prefix_tokens == 2 and fm.num_tokens == 18


# --------------------------------------------------------------------------------------------
# registry


def test_registry_entries():
    expect = {
        "vit_b_16": ("vit", 16, 12, 768), "vit_b_32": ("vit", 32, 12, 768), "vit_l_16": ("vit", 16, 24, 1024),
        "deit_tiny_patch16_224": ("deit", 16, 12, 192), "deit_small_patch16_224": ("deit", 16, 12, 384),
        "deit_base_patch16_224": ("deit", 16, 12, 768), "deit_tiny_distilled_patch16_224": ("deit", 16, 12, 192),
    }  # fmt: skip
    for name, (fam, p, depth, d) in expect.items():
        s = models.spec(name)
        m = s.build()
        assert (s.family, m.patch_size, m.num_layers, m.hidden_dim, s.input_size) == (fam, p, depth, d, 224)
        assert s.cam_layer == m.block_layers[-1] + (".ln_1" if fam == "vit" else ".norm1")
    assert models.get("deit_tiny_distilled_patch16_224").distilled
    assert models.get("vit_l_16").num_heads == 16 and models.get("deit_small_patch16_224").num_heads == 6
    # torchvision's shapes for vit_b_16 (traced only)
    t = checkpoints.variable_template(models.get("vit_b_16"))["params"]
    assert t["encoder"]["pos_embedding"].shape == (1, 197, 768)
    assert t["encoder"]["layers"]["encoder_layer_11"]["self_attention"]["in_proj"]["kernel"].shape == (768, 2304)


# --------------------------------------------------------------------------------------------
# strict keys, bad input


def test_strict_errors_name_every_key():
    tm = _torch_model("vit")
    sd = _state_dict(tm)
    del sd["encoder.layers.encoder_layer_1.self_attention.in_proj_weight"]
    sd["encoder.layers.encoder_layer_0.extra.weight"] = np.zeros(3)
    sd["heads.head.weight"] = np.zeros((7, 16))
    with pytest.raises(CheckpointMismatchError) as e:
        checkpoints.from_torch_state_dict(_flax_model("vit"), sd)
    msg = str(e.value)
    assert "missing keys (1): encoder.layers.encoder_layer_1.self_attention.in_proj_weight" in msg
    assert "unexpected keys (1): encoder.layers.encoder_layer_0.extra.weight" in msg
    assert "heads.head.weight: checkpoint (7, 16)" in msg and "num_classes=7" in msg
    # non-strict: unexpected keys are dropped, missing still raise
    sd2 = _state_dict(tm)
    sd2["extra"] = np.zeros(1)
    checkpoints.from_torch_state_dict(_flax_model("vit"), sd2, strict=False)


def test_other_layout_and_depth_are_named():
    deit_sd = _state_dict(_torch_model("deit"))
    with pytest.raises(CheckpointMismatchError, match=r"timm DeiT/ViT \(use a deit_\* architecture\)") as e:
        checkpoints.from_torch_state_dict(_flax_model("vit"), deit_sd)
    assert "class_token" in str(e.value) and "cls_token" in str(e.value)
    with pytest.raises(CheckpointMismatchError, match=r"num_layers=2 \(model 3\)"):
        checkpoints.from_torch_state_dict(_flax_model("deit", num_layers=3), deit_sd)
    with pytest.raises(CheckpointMismatchError, match="has a distillation token"):
        checkpoints.from_torch_state_dict(_flax_model("deit"), _state_dict(_torch_model("deit_distilled")))
    with pytest.raises(CheckpointMismatchError, match="patch_size=8 \\(model 16\\)"):
        checkpoints.from_torch_state_dict(_flax_model("deit", patch_size=16), deit_sd)


def test_wrong_input_size_says_how():
    fm = _flax_model("vit")
    v = models.random_variables(fm, (1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"built for 32x32 inputs.*image_size=48.*resample_pos_embed"):
        fm.apply(v, jnp.zeros((1, 48, 48, 3)))


# --------------------------------------------------------------------------------------------
# position embeddings


@pytest.mark.parametrize("old,new", [(4, 6), (4, 3), (5, 2), (3, 3)])
def test_resample_pos_embed_matches_torch_bicubic(old, new):
    rng = np.random.default_rng(0)
    pe = rng.standard_normal((1, 2 + old * old, 5))
    out = vit_mapping.resample_pos_embed(pe, new, num_prefix_tokens=2)
    assert out.shape == (1, 2 + new * new, 5)
    np.testing.assert_array_equal(out[:, :2], pe[:, :2])  # class and distillation tokens kept
    grid = torch.from_numpy(pe[:, 2:].reshape(1, old, old, 5)).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(new, new), mode="bicubic", antialias=True, align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(1, new * new, 5).numpy()
    np.testing.assert_allclose(out[:, 2:], ref, atol=1e-12)


def test_resample_pos_embed_errors():
    with pytest.raises(ValueError, match="not a square grid"):
        vit_mapping.resample_pos_embed(np.zeros((1, 1 + 12, 4)), 3)
    with pytest.raises(ValueError, match=r"\(1, tokens, dim\)"):
        vit_mapping.resample_pos_embed(np.zeros((13, 4)), 3)


def test_port_to_another_image_size_resamples(x64):
    tm = _torch_model("vit")
    sd = {k: v.astype(np.float64) for k, v in _state_dict(tm).items()}
    fm = _flax_model("vit", image_size=48)
    variables = _f64(checkpoints.from_torch_state_dict(fm, sd))
    want = vit_mapping.resample_pos_embed(sd["encoder.pos_embedding"], 6)
    np.testing.assert_allclose(np.asarray(variables["params"]["encoder"]["pos_embedding"]), want, atol=1e-7)
    assert fm.apply(variables, jnp.asarray(_images(1, 48))).shape == (1, 5)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)encoder.pos_embedding: checkpoint \(1, 17, 16\).*4x4 grid"):
        vit_mapping.from_torch_state_dict(fm, sd, resample=False)


# --------------------------------------------------------------------------------------------
# files: load / port, round trip


def test_round_trip_to_torch():
    for kind in ("vit", "deit_distilled"):
        tm = _torch_model(kind)
        sd = {k: v.astype(np.float32) for k, v in _state_dict(tm).items()}
        fm = _flax_model(kind)
        back = checkpoints.to_torch_state_dict(fm, checkpoints.from_torch_state_dict(fm, sd))
        assert sorted(back) == sorted(sd)
        for k in sd:
            np.testing.assert_array_equal(back[k], sd[k])


def test_load_and_port_files(tmp_path):
    tm = _torch_model("deit").float()
    path = tmp_path / "deit_tiny.pth"
    torch.save(tm.state_dict(), path)
    kw = {k: v for k, v in TINY.items() if k not in ("num_classes", "image_size")}
    model, variables, info = checkpoints.load("deit_tiny_patch16_224", path, **kw)
    assert model.num_classes == 5 and model.image_size == 32  # read off the head and the position embedding
    x = _images(2).astype(np.float32)
    ref = tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).detach().numpy()
    np.testing.assert_allclose(np.asarray(model.apply(variables, jnp.asarray(x))), ref, atol=1e-4)
    dst = tmp_path / "deit_tiny.safetensors"
    checkpoints.port("deit_tiny_patch16_224", path, dst, **kw)
    model2, variables2, _ = checkpoints.load(None, dst)
    assert model2 == model
    np.testing.assert_array_equal(np.asarray(model2.apply(variables2, jnp.asarray(x))), np.asarray(model.apply(variables, jnp.asarray(x))))
    # a ViT checkpoint under a DeiT architecture: named keys, no file written
    torch.save(_torch_model("vit").float().state_dict(), tmp_path / "vit.pth")
    bad = tmp_path / "bad.safetensors"
    with pytest.raises(CheckpointMismatchError, match="torchvision ViT"):
        checkpoints.port("deit_tiny_patch16_224", tmp_path / "vit.pth", bad, **kw)
    assert not bad.exists()
