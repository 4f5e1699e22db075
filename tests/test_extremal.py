"""Extremal Perturbation: mask generator closed form, blur filter, a known optimum, the area
constraint, vmapped areas == separate runs, determinism, and parity with an independent
PyTorch implementation of TorchRay's algorithm."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xaijax.methods.perturbation import extremal as ex
from xaijax.methods import registry
from xaijax.models import layers

H, W = 16, 16
REGION = (slice(4, 8), slice(6, 10))  # horizontally symmetric about the image centre (jitter-invariant)
# horizontal stripes: blur destroys them, a horizontal flip (jitter) does not
PATTERN = jnp.asarray(np.broadcast_to((np.arange(H) % 2)[:, None] * 2.0 - 1.0, (H, W)), jnp.float32)[None, :, :, None]


class RegionScore(nn.Module):
    """Logit 0 = 10 x mean over REGION of (x * stripes); logit 1 = its negative.

    Only pixels in REGION matter and blurring destroys the stripes, so the best
    preserve-mask of a large enough area covers REGION.
    """

    @nn.compact
    def __call__(self, x):
        r = (x * PATTERN)[:, REGION[0], REGION[1], :].mean((1, 2, 3))
        return jnp.stack([10.0 * r, -10.0 * r], -1)


def _region_image() -> jax.Array:
    return (jnp.zeros((1, H, W, 3)).at[:, REGION[0], REGION[1], :].set(1.0) * PATTERN).astype(jnp.float32)


class TinyNet(nn.Module):
    """conv3x3 (4) -> ReLU -> global mean -> dense (3)."""

    @nn.compact
    def __call__(self, x):
        h = layers.ReLU(name="act")(layers.conv(4, 3, padding=1, name="conv")(x))
        h = layers.Flatten(name="flatten")(layers.AdaptiveAvgPool2d(1, name="avgpool")(h))
        return layers.dense(3, name="fc")(h)


@pytest.fixture(scope="module")
def tiny():
    model = TinyNet()
    tmpl = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, H, W, 3))))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(lambda l: jnp.asarray(rng.normal(size=l.shape) * 0.5, jnp.float32), tmpl)
    x = jnp.asarray(rng.normal(size=(2, H, W, 3)), jnp.float32)
    return model, variables, x


# ------------------------------------------------------------------ building blocks


def test_geometry_matches_torchray_sizes():
    # TorchRay's defaults on a 224 px image: 32x32 parameters, 260x260 full mask, crop 21
    g = ex.mask_geometry((224, 224), 7, 21.0)
    assert g.shape_in == (32, 32) and g.padding == 7 and g.radius == 4
    assert g.shape_out == (260, 260) and g.crop == 21


def test_mask_of_one_grid_point_is_the_closed_form():
    """One parameter v at grid point i, zeros elsewhere: every full-mask pixel u whose window
    holds i gets K = v k(|u - margin - step i| / sigma) plus (D^2 - 1) zeros, so the smooth max
    is K e^{20 K} / (e^{20 K} + D^2 - 1); pixels whose window misses i get 0."""
    step, sigma = 3, 4.0
    g = ex.mask_geometry((13, 11), step, sigma)
    d = 2 * g.radius + 1
    iy, ix, v = 2, 1, 0.8
    pm = jnp.zeros(g.shape_in).at[iy, ix].set(v)
    crop, full = ex.extremal_mask(pm, g)
    ref = np.zeros(g.shape_out)
    for uy in range(g.shape_out[0]):
        for ux in range(g.shape_out[1]):
            ky = iy - uy // step + g.padding
            kx = ix - ux // step + g.padding
            if 0 <= ky < d and 0 <= kx < d:
                dist = math.hypot(uy - (g.margin + step * iy), ux - (g.margin + step * ix)) / sigma
                kk = v * math.exp(-2 * max(dist - 0.5, 0.0) ** 2)
                ref[uy, ux] = kk * math.exp(20 * kk) / (math.exp(20 * kk) + d * d - 1)
    np.testing.assert_allclose(np.asarray(full), ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(full)[g.crop : g.crop + 13, g.crop : g.crop + 11])
    assert ref.max() > 0.5  # the grid point's own neighbourhood is (nearly) v


def test_mask_gradient_matches_autodiff_of_a_direct_gather():
    """The mask generator's custom VJP (fused smooth-max backward) equals plain autodiff of
    an independent formulation: per output pixel, gather its window by explicit indices and
    take ``sum v softmax(20 v)``."""
    step, sigma = 3, 4.0
    g = ex.mask_geometry((13, 11), step, sigma)
    d = 2 * g.radius + 1
    uy, ux = np.arange(g.shape_out[0]), np.arange(g.shape_out[1])
    iy = uy[:, None] // step + np.arange(d)[None, :]  # (Ho, D) padded grid row per window slot
    ix = ux[:, None] // step + np.arange(d)[None, :]
    dy = uy[:, None] - (g.margin + step * (iy - g.padding))
    dx = ux[:, None] - (g.margin + step * (ix - g.padding))
    dist = np.sqrt(dy[:, None, :, None] ** 2 + dx[None, :, None, :] ** 2) / sigma  # (Ho, Wo, D, D)
    kern = jnp.asarray(np.exp(-2 * np.maximum(dist - 0.5, 0) ** 2))

    def direct(pm):
        padded = jnp.pad(pm, g.padding)
        v = padded[iy[:, None, :, None], ix[None, :, None, :]] * kern  # (Ho, Wo, D, D)
        v = v.reshape(v.shape[0], v.shape[1], -1)
        return jnp.clip((v * jax.nn.softmax(20.0 * v, axis=-1)).sum(-1), 0.0, 1.0)

    pm = jax.random.uniform(jax.random.key(3), g.shape_in, minval=0.1, maxval=1.0)
    w = jax.random.normal(jax.random.key(4), g.shape_out)
    np.testing.assert_allclose(np.asarray(ex.extremal_mask(pm, g)[1]), np.asarray(direct(pm)), rtol=1e-5, atol=1e-6)
    ours = jax.grad(lambda p: (ex.extremal_mask(p, g)[1] * w).sum())(pm)
    ref = jax.grad(lambda p: (direct(p) * w).sum())(pm)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-4, atol=1e-5 * float(jnp.abs(ref).max()))


def test_blur_matrix_is_torchray_gaussian_with_zero_padding():
    ndimage = pytest.importorskip("scipy.ndimage")
    sigma, n = 1.7, 15
    m = ex.blur_matrix(n, sigma)
    width = math.ceil(4 * sigma)
    taps = np.exp(-0.5 * (np.arange(-width, width + 1) / sigma) ** 2)
    taps /= taps.sum()
    x = np.random.default_rng(0).normal(size=n)
    ref = ndimage.correlate1d(x, taps, mode="constant", cval=0.0)
    np.testing.assert_allclose(m @ x, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ex.blur_matrix(n, 0.0), np.eye(n, dtype=np.float32))


def test_perturbation_pyramid_and_interpolation():
    x = jax.random.normal(jax.random.key(1), (9, 7, 2))
    pyr = ex.perturbation_pyramid(x, "blur", num_levels=5, max_blur=3.0)
    assert pyr.shape == (5, 9, 7, 2)
    np.testing.assert_allclose(pyr[-1], x, atol=1e-6)  # last level: the image
    b = ex.blur_matrix(9, 3.0 * (1 - 1 / 4)), ex.blur_matrix(7, 3.0 * (1 - 1 / 4))
    np.testing.assert_allclose(pyr[1], np.einsum("hi,ijc,wj->hwc", b[0], np.asarray(x), b[1]), rtol=1e-5, atol=1e-6)
    # fade: levels x * l / (L - 1), so any mask gives x * m exactly
    fade = ex.perturbation_pyramid(x, "fade", num_levels=8)
    m = jax.random.uniform(jax.random.key(2), (9, 7))
    np.testing.assert_allclose(ex.apply_perturbation(fade, m), x * m[..., None], rtol=1e-5, atol=1e-6)
    # blur: m = 0.6 with 5 levels -> w = 2.4 -> 0.6 * level 2 + 0.4 * level 3
    got = ex.apply_perturbation(pyr, jnp.full((9, 7), 0.6))
    np.testing.assert_allclose(got, 0.6 * pyr[2] + 0.4 * pyr[3], rtol=1e-5, atol=1e-6)


def test_torch_sgd_matches_pytorch_dampening():
    torch = pytest.importorskip("torch")
    g_seq = np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32)
    p = torch.zeros(4, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.9)
    tx = ex.torch_sgd(0.1, 0.9, 0.9)
    q = jnp.zeros(4)
    st = tx.init(q)
    for g in g_seq:
        p.grad = torch.tensor(g)
        opt.step()
        u, st = tx.update(jnp.asarray(g), st, q)
        q = q + u
    np.testing.assert_allclose(np.asarray(q), p.detach().numpy(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ optimisation


FAST = dict(step=2, sigma=3.0, max_blur=3.0, max_iter=300)


def test_preserve_mask_covers_the_only_relevant_region():
    x = jnp.concatenate([_region_image()] * 2)
    g = ex.mask_geometry((H, W), 2, 3.0)
    region_frac = 16 / (g.shape_out[0] * g.shape_out[1])  # the 4x4 region is ~4% of the full (margin) mask
    areas = (0.08, 0.15)
    assert min(areas) > region_frac
    # sample 0 explains class 0 (wants the region kept), sample 1 class 1 (wants it destroyed)
    res = ex.ExtremalPerturbation(areas=areas, **FAST).optimise(RegionScore(), {}, x, jnp.array([0, 1]))
    for j, area in enumerate(areas):
        mask = np.asarray(res.masks[0, j])
        assert mask[REGION].min() > 0.6, (area, mask[REGION])
        # the mask's peak is on the relevant region: its best 4x4 window is (about) the region
        win = np.lib.stride_tricks.sliding_window_view(mask, (4, 4)).mean((-1, -2))
        iy, ix = np.unravel_index(win.argmax(), win.shape)
        assert abs(iy - 4) <= 1 and abs(ix - 6) <= 1, (area, iy, ix)
        # the reward approaches its maximum (10: the region kept intact)
        assert float(res.reward[-1, 0, j]) > 8.0
        # the class that prefers the region destroyed gets a mask away from it
        assert np.asarray(res.masks[1, j])[REGION].mean() < 0.5


def test_area_constraint_is_respected():
    """The full mask's area ends close to the target (areas a smooth mask of this geometry can
    take: a single grid point's bump already covers ~8% of the 19x19 full mask)."""
    x = _region_image()
    res = ex.ExtremalPerturbation(areas=(0.1, 0.3), **FAST).optimise(RegionScore(), {}, x, 0)
    for j, area in enumerate((0.1, 0.3)):
        full = np.asarray(res.full_masks[0, j])
        assert abs(full.mean() - area) < 0.03, (area, full.mean())
        assert abs((full > 0.5).mean() - area) < 0.06, (area, (full > 0.5).mean())
    # history: one (reward, regul) per iteration; the penalty shrinks as the area is reached
    assert res.reward.shape == res.regul.shape == (300, 1, 2)
    regul = np.asarray(res.regul[:, 0])
    lam = 300.0 * 1.0035 ** np.arange(300)
    assert np.all(regul <= 0) and np.all((-regul / lam[:, None])[-1] < 0.2 * (-regul / lam[:, None])[0])


def test_vmapped_areas_equal_separate_runs_and_sum_convention(tiny):
    model, variables, x = tiny
    base = dict(step=4, sigma=5.0, max_blur=4.0, max_iter=40)
    both = ex.ExtremalPerturbation(areas=(0.1, 0.3), **base)
    target = jnp.array([0, 2])
    got = np.asarray(both.masks(model, variables, x, target))
    assert got.shape == (2, 2, H, W) and got.dtype == np.float32
    # each area alone, and sample 1 alone: the same masks (areas and samples are independent)
    for j, area in enumerate((0.1, 0.3)):
        one = np.asarray(ex.ExtremalPerturbation(areas=(area,), **base).masks(model, variables, x[1:], 2))
        np.testing.assert_allclose(got[1, j], one[0, 0], rtol=1e-4, atol=1e-5)
    assert np.abs(got[:, 0] - got[:, 1]).max() > 0.1  # the areas do give different masks
    # __call__: the sum over areas (TorchRay's benchmark convention)
    np.testing.assert_allclose(np.asarray(both(model, variables, x, target)), got.sum(1), rtol=1e-6)


def test_deterministic_jit_and_seed_targets(tiny):
    model, variables, x = tiny
    m = ex.ExtremalPerturbation(areas=(0.2,), step=4, sigma=5.0, max_blur=4.0, max_iter=20, variant="dual")
    a = np.asarray(m(model, variables, x, 1))
    np.testing.assert_array_equal(a, np.asarray(m(model, variables, x, 1)))
    jitted = jax.jit(m, static_argnums=0)
    np.testing.assert_allclose(np.asarray(jitted(model, variables, x, 1)), a, rtol=1e-5, atol=1e-6)
    # concrete inputs run the steps from a Python loop, traced ones as one lax.scan: same
    # masks and the same energy history
    loop = m.optimise(model, variables, x, 1)
    scan = jax.jit(m.optimise, static_argnums=0)(model, variables, x, 1)
    assert loop.reward.shape == scan.reward.shape == (20, 2, 1)
    for field in ("masks", "full_masks", "reward", "regul"):
        np.testing.assert_allclose(np.asarray(getattr(loop, field)), np.asarray(getattr(scan, field)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(loop.reward[0]), np.asarray(loop.reward[-1]))  # the masks moved
    # an explicit one-hot seed is the same as the class index
    seed = jax.nn.one_hot(jnp.array([1, 1]), 3)
    np.testing.assert_allclose(np.asarray(m(model, variables, x, seed)), a, rtol=1e-5, atol=1e-6)
    assert a.shape == (2, H, W) and a.min() >= 0.0 and a.max() <= 1.0


def test_progress_bar_changes_nothing_but_stderr(tiny, capsys):
    import dataclasses
    import warnings

    model, variables, x = tiny
    m = ex.ExtremalPerturbation(areas=(0.2,), step=4, sigma=5.0, max_blur=4.0, max_iter=12)
    shown = dataclasses.replace(m, progress=True)
    # progress is not configuration: equal, same hash (the jitted step is reused, not recompiled)
    assert shown == m and hash(shown) == hash(m)
    quiet = m.optimise(model, variables, x, 1)
    capsys.readouterr()
    loud = shown.optimise(model, variables, x, 1)
    err = capsys.readouterr().err
    assert "extremal perturbation" in err and "12/12" in err and "reward=" in err and "area=" in err
    for field in ("masks", "reward", "regul"):
        np.testing.assert_array_equal(np.asarray(getattr(loud, field)), np.asarray(getattr(quiet, field)))
    # under jit the steps are one lax.scan: no bar, and a warning says so
    with pytest.warns(UserWarning, match="no effect under jit"):
        jax.jit(shown.masks, static_argnums=0)(model, variables, x, 1)
    assert "extremal perturbation" not in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.jit(m.masks, static_argnums=0)(model, variables, x, 1)  # progress=False: silent
    assert ex.ExtremalPerturbation.runs_own_loop


class _ListAttr(nn.Module):
    """TinyNet with an unhashable (list) attribute: not usable as a static jit argument."""

    factors: list

    @nn.compact
    def __call__(self, x):
        return TinyNet(name="net")(x) * self.factors[0]


def test_unhashable_model_runs_and_zoo_kwargs_are_frozen(tiny):
    from xaijax import models

    model, variables, x = tiny
    odd = _ListAttr([1.0])
    with pytest.raises(TypeError):
        hash(odd)
    m = ex.ExtremalPerturbation(areas=(0.2,), step=4, sigma=5.0, max_blur=4.0, max_iter=5)
    want = np.asarray(m(model, variables, x, 1))
    got = np.asarray(m(odd, {"params": {"net": variables["params"]}}, x, 1))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # zoo models built from JSON kwargs (lists) are hashable: their kwargs become tuples
    a = models.get("resnet18", width=8, num_classes=3, layers=[1, 1, 1, 1])
    assert hash(a) == hash(models.get("resnet18", width=8, num_classes=3, layers=(1, 1, 1, 1)))


def test_torchray_parity_with_an_independent_torch_implementation(tiny):
    """TorchRay's algorithm, written again with torch primitives (unfold, nearest
    interpolation, grouped conv blur, gather, torch.sort, torch SGD with dampening)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    model, variables, x = tiny
    step, sigma, levels, max_blur, iters, areas = 4, 5.0, 4, 4.0, 25, (0.1, 0.3)
    target = 2
    p = variables["params"]
    kernel = torch.tensor(np.asarray(p["conv"]["kernel"]).transpose(3, 2, 0, 1).copy())
    cbias = torch.tensor(np.asarray(p["conv"]["bias"]))
    fw = torch.tensor(np.asarray(p["fc"]["kernel"]).T.copy())
    fb = torch.tensor(np.asarray(p["fc"]["bias"]))

    def tmodel(z):  # NCHW
        h = torch.relu(F.conv2d(z, kernel, cbias, padding=1))
        return h.mean((2, 3)) @ fw.T + fb

    xt = torch.tensor(np.asarray(x[:1]).transpose(0, 3, 1, 2).copy())
    c = xt.shape[1]
    pyr = []
    for lvl in range(levels):
        s = (1 - lvl / (levels - 1)) * max_blur
        wd = math.ceil(4 * s)
        f = torch.exp(-((torch.arange(-wd, wd + 1, dtype=torch.float32) / (math.sqrt(2) * s + 1.1920929e-07)) ** 2))
        f = f / f.sum()
        y = F.conv2d(xt, f.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(wd, 0), groups=c)
        pyr.append(F.conv2d(y, f.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, wd), groups=c))
    pyr = torch.cat(pyr, 0)  # (L, C, H, W)

    margin, pad, rad = sigma, 1 + math.ceil(2 * sigma / step), 1 + math.ceil(sigma / step)
    d = 2 * rad + 1
    s_in = [math.ceil(z / step) for z in (H, W)]
    s_mid = [z + 2 * pad - d + 1 for z in s_in]
    s_up = [step * z for z in s_mid]
    s_out = [z - step + 1 for z in s_up]
    weight = torch.zeros(1, d * d, *s_out)
    uy, ux = torch.meshgrid(torch.arange(s_out[0]).float(), torch.arange(s_out[1]).float(), indexing="ij")
    for ky in range(d):
        for kx in range(d):
            gy = torch.floor(uy / step) + ky - pad
            gx = torch.floor(ux / step) + kx - pad
            dist = torch.sqrt((uy - (margin + step * gy)) ** 2 + (ux - (margin + step * gx)) ** 2) / sigma
            weight[0, ky * d + kx] = torch.exp(-2 * (dist - 0.5).clamp(min=0) ** 2)

    def gen(pm):
        m = F.unfold(pm, (d, d), padding=pad).reshape(len(pm), d * d, *s_mid)
        m = F.interpolate(m, size=s_up, mode="nearest")[:, :, : s_out[0], : s_out[1]] * weight
        m = (m * F.softmax(20 * m, dim=1)).sum(1, keepdim=True).clamp(0, 1)
        cr = round(margin)
        return m[:, :, cr : cr + H, cr : cr + W], m

    def perturb(mask):
        wgt = mask * (levels - 1)
        k = wgt.floor()
        wgt = wgt - k
        k = k.long().expand(len(mask), c, H, W)
        y = pyr[None].expand(len(mask), *pyr.shape)
        y0 = torch.gather(y, 1, k[:, None])[:, 0]
        y1 = torch.gather(y, 1, (k + 1).clamp(max=levels - 1)[:, None])[:, 0]
        return (1 - wgt) * y0 + wgt * y1

    pm = torch.ones(len(areas), 1, *s_in, requires_grad=True)
    n_full = s_out[0] * s_out[1]
    ref = torch.ones(len(areas), n_full)
    for i, a in enumerate(areas):
        ref[i, : int(n_full * (1 - a))] = 0
    opt = torch.optim.SGD([pm], lr=0.01, momentum=0.9, dampening=0.9)
    lam, rewards = 300.0, []
    for it in range(iters):
        crop, full = gen(pm)
        z = perturb(crop)
        if it % 2 == 0:
            z = torch.flip(z, dims=(3,))
        reward = tmodel(z)[:, target]
        # stable sort: the full mask has exact ties (pixels with the same window pattern), and
        # which tied pixel meets the 0/1 step of the reference changes the gradient;
        # jnp.sort is stable, torch.sort is not unless asked
        regul = -((full.reshape(len(areas), -1).sort(dim=1, stable=True)[0] - ref) ** 2).mean(1) * lam
        opt.zero_grad()
        (-(reward + regul).sum()).backward()
        opt.step()
        pm.data = pm.data.clamp(0, 1)
        lam *= 1.0035
        rewards.append(reward.detach().numpy())

    method = ex.ExtremalPerturbation(areas=areas, step=step, sigma=sigma, num_levels=levels, max_blur=max_blur, max_iter=iters)
    res = method.optimise(model, variables, x[:1], target)
    np.testing.assert_allclose(np.asarray(res.reward[:, 0]), np.stack(rewards), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(res.masks[0]), crop.detach().numpy()[:, 0], atol=2e-4)
    np.testing.assert_allclose(np.asarray(res.full_masks[0]), full.detach().numpy()[:, 0], atol=2e-4)


# ------------------------------------------------------------------ registry and errors


def test_registered_defaults_and_validation():
    m = registry.get("extremal-perturbation")
    assert isinstance(m, ex.ExtremalPerturbation)
    assert (m.areas, m.variant, m.perturbation, m.max_iter, m.step, m.sigma, m.num_levels, m.max_blur) == (
        (0.1,), "preserve", "blur", 800, 7, 21.0, 8, 20.0
    )
    assert (m.learning_rate, m.momentum, m.dampening, m.regul_weight, m.regul_growth, m.jitter) == (
        0.01, 0.9, 0.9, 300.0, 1.0035, True
    )
    assert registry.get("extremal-perturbation", areas=0.2).areas == (0.2,)
    assert registry.get("extremal-perturbation", areas=[0.025, 0.05]).areas == (0.025, 0.05)
    for bad, match in [
        (dict(areas=(0.0,)), "area"),
        (dict(areas=(1.2,)), "area"),
        (dict(areas=()), "areas"),
        (dict(variant="keep"), "variant"),
        (dict(perturbation="noise"), "perturbation"),
        (dict(max_iter=0), "max_iter"),
        (dict(num_levels=1), "num_levels"),
        (dict(reward="max"), "reward"),
        (dict(combine="max"), "combine"),
    ]:
        with pytest.raises(ValueError, match=match):
            ex.ExtremalPerturbation(**bad)
    with pytest.raises(ValueError, match="class indices"):
        ex.ExtremalPerturbation(reward="contrastive", max_iter=1)(RegionScore(), {}, _region_image(), jnp.ones((1, 2)))
