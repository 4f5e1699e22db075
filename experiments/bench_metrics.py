"""xaijax's evaluation metrics vs Quantus 0.6.0: time and peak memory on the same inputs.

One row per metric both libraries have: the xaijax callable, the Quantus callable and the
settings that make them compute the same thing (see each metric's docstring for the
alignment; rows whose two sides differ by design say so in ``note``). Every row runs on the
same data: ``N`` images ``(N, C, S, S)`` / ``(N, S, S, C)`` (standard normal, already
"normalised"), the same tiny CNN in torch and in Flax (one set of seeded torch weights, ported:
conv 3x3 C->4, ReLU, conv 3x3 4->4, ReLU, global mean, linear 4->classes), maps ``(N, S, S)``
(standard normal) and regions (a random box per image, 5-30% of the image).

For each row, each ``N`` of ``--sizes`` (8 and 64) and each side, a fresh subprocess builds the
data, calls the metric once (warm-up: xaijax's jit compile, Quantus' first call), then
``--repeats`` more times (none if the first call took over ``--slow`` seconds: Quantus'
model-based metrics at N = 64), and reports the median wall time, the peak resident memory above
what the process held before the first call (``ru_maxrss`` minus ``VmRSS``; it includes
compilation), and the values. The parent compares the two sides' values (largest absolute
difference over the images, NaN-aware) and writes ``experiments/results/bench_metrics.json``
and ``.md`` atomically.

Adding a family is one entry per metric in :data:`ROWS` (see :class:`Row`): a name, the
xaijax callable ``f(data) -> (N,) values``, the Quantus callable ``f(data) -> (N,) values``,
the settings (recorded), and optionally the channel count, number of classes, what the
comparison means (``exact`` or ``different draws``/``by design``) and a note.

Environment: the peer virtualenv (``experiments/PEERS.md``; it has xaijax installed
editable, jax and Quantus)::

    /work/peer-venv/bin/python experiments/bench_metrics.py                     # every row, N = 8 and 64
    /work/peer-venv/bin/python experiments/bench_metrics.py --rows auc,sparseness --sizes 8 --repeats 1
    /work/peer-venv/bin/python experiments/bench_metrics.py --list

Timings are for this machine's CPU; the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Data:
    """Everything a row may use; both sides see the same arrays."""

    x_nchw: np.ndarray  # (N, C, S, S) float32
    x_nhwc: np.ndarray  # (N, S, S, C) float32
    targets: np.ndarray  # (N,) int64
    maps: np.ndarray  # (N, S, S) float32
    regions: np.ndarray  # (N, S, S) bool
    quadrants: np.ndarray  # (N, 4) bool: focus' target quadrants
    torch_model: Any
    flax_model: Any
    variables: Any

    @property
    def pair_batch(self):
        from xaijax import metrics

        n = len(self.maps)
        return metrics.PairBatch(self.maps, self.regions, np.zeros(n, int), np.zeros(n, bool))

    def quantus_call(self, metric, **extra) -> np.ndarray:
        """``metric(model, x_batch, y_batch, a_batch, s_batch)`` channel-first, values as (N,)."""
        out = metric(
            model=self.torch_model,
            x_batch=self.x_nchw,
            y_batch=self.targets,
            a_batch=self.maps[:, None],
            s_batch=self.regions[:, None].astype(np.float32),
            channel_first=True,
            device="cpu",
            batch_size=len(self.maps),
            **extra,
        )
        return np.asarray(out, np.float64)


def torch_model(channels: int, classes: int, seed: int = 0):
    import torch

    torch.manual_seed(seed)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(channels, 4, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4, classes)

        def forward(self, x):
            return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))

    return Tiny().eval()


def flax_twin(model):
    """The same network in Flax, with the torch model's weights."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class Tiny(nn.Module):
        classes: int

        @nn.compact
        def __call__(self, x):
            h = jax.nn.relu(nn.Conv(4, (3, 3), padding=1, name="conv1")(x))
            h = jax.nn.relu(nn.Conv(4, (3, 3), padding=1, name="conv2")(h))
            return nn.Dense(self.classes, name="fc")(h.mean((1, 2)))

    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = {
        "conv1": {"kernel": jnp.asarray(sd["conv1.weight"].transpose(2, 3, 1, 0)), "bias": jnp.asarray(sd["conv1.bias"])},
        "conv2": {"kernel": jnp.asarray(sd["conv2.weight"].transpose(2, 3, 1, 0)), "bias": jnp.asarray(sd["conv2.bias"])},
        "fc": {"kernel": jnp.asarray(sd["fc.weight"].T), "bias": jnp.asarray(sd["fc.bias"])},
    }
    return Tiny(classes=sd["fc.weight"].shape[0]), {"params": params}


def make_data(n: int, size: int, channels: int, classes: int, seed: int = 0) -> Data:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, channels, size, size)).astype(np.float32)
    maps = rng.normal(size=(n, size, size)).astype(np.float32)
    regions = np.zeros((n, size, size), bool)
    for i in range(n):
        h, w = (rng.uniform(0.22, 0.55, 2) * size).astype(int) + 1
        y0, x0 = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        regions[i, y0 : y0 + h, x0 : x0 + w] = True
    quadrants = np.zeros((n, 4), bool)
    for i in range(n):
        quadrants[i, rng.choice(4, 2, replace=False)] = True
    tm = torch_model(channels, classes)
    fm, v = flax_twin(tm)
    return Data(x, x.transpose(0, 2, 3, 1).copy(), np.arange(n) % classes, maps, regions, quadrants, tm, fm, v)


# ----------------------------------------------------------------------------- rows


@dataclasses.dataclass(frozen=True)
class Row:
    """One metric both libraries have.

    ``xaijax(data)`` and ``quantus(data)`` return (N,) values; ``settings`` are recorded in the
    JSON (the arguments both sides were given); ``compare``: ``"exact"`` (the values should
    agree to float32 rounding), or a phrase saying why they need not (``"different random
    draws"``, ``"by design: ..."``); ``channels``/``classes``: the data the row needs.
    """

    name: str
    family: str
    xaijax: Callable[[Data], np.ndarray]
    quantus: Callable[[Data], np.ndarray]
    settings: dict = dataclasses.field(default_factory=dict)
    compare: str = "exact"
    channels: int = 3
    classes: int = 3
    note: str = ""


def _pair(name: str, key: str, **options):
    def run(d: Data) -> np.ndarray:
        from xaijax import metrics

        return np.asarray(metrics.get(name, **options)(d.pair_batch)[key], np.float64)

    return run


def _q(cls: str, **settings):
    def run(d: Data) -> np.ndarray:
        import quantus

        return d.quantus_call(getattr(quantus, cls)(disable_warnings=True, display_progressbar=False, **settings))

    return run


def _c(value):
    """A setting that does not depend on the data."""
    return lambda d: value


def _steps64(d: Data) -> int:
    """``features_in_step`` for 64 steps over the image."""
    return max(1, d.maps[0].size // 64)


def _p8(d: Data) -> int:
    return 8 if d.maps.shape[1] >= 16 else 4


def _model(name: str, key: str, **settings: Callable[[Data], Any]):
    """An xaijax model-based metric on the tiny Flax CNN; ``settings``: functions of the data."""

    def run(d: Data) -> np.ndarray:
        import jax.numpy as jnp

        from xaijax import metrics
        from xaijax.metrics.faithfulness import classifier_fn

        metric = metrics.get_model_metric(name, **{k: f(d) for k, f in settings.items()})
        out = metric(classifier_fn(d.flax_model, d.variables), jnp.asarray(d.x_nhwc), d.maps, jnp.asarray(d.targets, jnp.int32))
        return np.asarray(out[key], np.float64)

    return run


def _qm(cls: str, **settings: Callable[[Data], Any]):
    """A Quantus metric on the tiny torch CNN; ``settings``: functions of the data."""

    def run(d: Data) -> np.ndarray:
        import quantus

        metric = getattr(quantus, cls)(disable_warnings=True, display_progressbar=False, **{k: f(d) for k, f in settings.items()})
        return d.quantus_call(metric)

    return run


#: Quantus' per-image max normalisation (its default normalises over the whole batch)
PER_IMAGE = {"normalise_axes": [1, 2, 3]}
_NOT_ALIGNED = "not compared here (own random draws / randomised weights); parity: tests/test_robustness_randomisation.py"


def _method(name: str, options: dict):
    """An xaijax method metric re-running the gradient saliency on the tiny Flax CNN."""

    def run(d: Data) -> np.ndarray:
        import jax
        import jax.numpy as jnp

        from xaijax.methods import get
        from xaijax.metrics import get_method_metric

        out = get_method_metric(name, **options)(d.flax_model, d.variables, get("gradient", reduce="abs-sum"), jnp.asarray(d.x_nhwc), d.targets)
        out = jax.block_until_ready(out)
        first = next(v for v in out.values() if np.ndim(v) == 1)
        return np.asarray(first, np.float64)

    return run


def _qx(cls: str, **settings):
    """A Quantus metric that explains with ``quantus.explain`` (method ``Saliency``)."""

    def run(d: Data) -> np.ndarray:
        import quantus

        metric = getattr(quantus, cls)(disable_warnings=True, display_progressbar=False, **settings)
        out = metric(model=d.torch_model, x_batch=d.x_nchw, y_batch=d.targets, a_batch=None, channel_first=True, device="cpu",
                     explain_func=quantus.explain, explain_func_kwargs={"method": "Saliency"}, batch_size=64)
        if isinstance(out, dict):  # MPRT / SmoothMPRT: scores per randomised layer; keep the last (all layers randomised)
            out = list(out.values())[-1]
        return np.asarray(out, np.float64).reshape(len(d.targets), -1)[:, 0]

    return run


def _top_k(d: Data) -> int:
    return min(1000, d.maps[0].size // 10)


def _xaijax_top_k(d: Data) -> np.ndarray:
    from xaijax import metrics

    return np.asarray(metrics.get("top-k-intersection", k=_top_k(d))(d.pair_batch)["top_k_intersection"], np.float64)


def _quantus_top_k(d: Data) -> np.ndarray:
    import quantus

    return d.quantus_call(quantus.TopKIntersection(k=_top_k(d), disable_warnings=True))


def _xaijax_focus(d: Data) -> np.ndarray:
    from xaijax.metrics.localisation import focus

    return np.asarray(focus(d.maps, d.quadrants), np.float64)


def _quantus_focus(d: Data) -> np.ndarray:
    import quantus

    return d.quantus_call(quantus.Focus(disable_warnings=True), custom_batch=[list(map(int, q)) for q in d.quadrants])


def _pointing(d: Data) -> np.ndarray:
    from xaijax import metrics

    return np.asarray(metrics.get("pointing-game", tolerance=1.0)(d.pair_batch)["hit"], np.float64)


ROAD_PERCENTAGES = list(range(1, 100, 2))  # both libraries' default


def _xaijax_road(d: Data) -> np.ndarray:
    """xaijax ROAD without noise: the per-percentage accuracy, mean over the images."""
    import jax.numpy as jnp

    from xaijax import metrics
    from xaijax.metrics.faithfulness import classifier_fn

    metric = metrics.get_model_metric("road", noise=0.0)
    out = metric(classifier_fn(d.flax_model, d.variables), jnp.asarray(d.x_nhwc), d.maps, jnp.asarray(d.targets, jnp.int32))
    return np.asarray(out["correct"], np.float64).mean(0)


def _quantus_road(d: Data) -> np.ndarray:
    """Quantus ROAD without noise: its per-percentage accuracy over the images (a dict)."""
    import quantus

    metric = quantus.ROAD(noise=0.0, percentages=ROAD_PERCENTAGES, disable_warnings=True, display_progressbar=False)
    out = metric(model=d.torch_model, x_batch=d.x_nchw, y_batch=d.targets, a_batch=d.maps[:, None], channel_first=True,
                 device="cpu", batch_size=len(d.maps))
    return np.asarray(list(out.values()), np.float64)


def _xaijax_sufficiency(d: Data) -> np.ndarray:
    import jax.numpy as jnp

    from xaijax.metrics.faithfulness import classifier_fn
    from xaijax.metrics.faithfulness_curves import Sufficiency

    out = Sufficiency()(classifier_fn(d.flax_model, d.variables), jnp.asarray(d.x_nhwc), d.maps, jnp.asarray(d.targets, jnp.int32))
    return np.asarray(out["sufficiency"], np.float64)


ROWS: list[Row] = [
    # --- localisation (xaijax/metrics/localisation.py)
    Row("relevance-mass-accuracy", "localisation", _pair("relevance-mass-accuracy", "relevance_mass_accuracy", transform="signed"),
        _q("RelevanceMassAccuracy"), {"transform": "signed (Quantus abs=False)"}),
    Row("relevance-rank-accuracy", "localisation", _pair("relevance-rank-accuracy", "relevance_rank_accuracy"), _q("RelevanceRankAccuracy")),
    Row("top-k-intersection", "localisation", _xaijax_top_k, _quantus_top_k, {"k": "min(1000, HW / 10) pixels"}),
    Row("attribution-localisation", "localisation", _pair("attribution-localisation", "attribution_localisation", transform="abs"),
        _q("AttributionLocalisation"), {"transform": "abs (Quantus abs=True)"}),
    Row("auc", "localisation", _pair("auc", "localisation_auc"), _q("AUC")),
    Row("focus (kernel)", "localisation", _xaijax_focus, _quantus_focus, {"quadrants": "two random per map"},
        note="the scoring of given mosaic maps; building and explaining the mosaics is not timed"),
    Row("pointing-game", "localisation", _pointing, _q("PointingGame"), {"tolerance": "1 px (xaijax default 15)"},
        note="xaijax: the first maximum within the tolerance; Quantus: any maximum in the region (the same without ties)"),
    # --- complexity (xaijax/metrics/complexity.py)
    Row("sparseness", "complexity", _pair("sparseness", "sparseness", offset=1e-7), _q("Sparseness"), {"offset": 1e-7},
        compare="by design: Quantus normalises by the batch maximum before its 1e-7 offset, xaijax per map (differences ~1e-7)"),
    Row("complexity", "complexity", _pair("complexity", "complexity"), _q("Complexity")),
    Row("effective-complexity", "complexity", _pair("effective-complexity", "effective_complexity"), _q("EffectiveComplexity"), {"eps": 1e-5},
        compare="by design: Quantus thresholds maps normalised by the batch maximum, xaijax by each map's"),
    # --- faithfulness (xaijax/metrics/faithfulness_curves.py, faithfulness_correlation.py): single-channel
    # --- images, where Quantus' features (channel-pixels) are xaijax's (pixels); 64 steps per curve
    Row("pixel-flipping", "faithfulness", _model("pixel-flipping", "curve", features_in_step=_steps64), _qm("PixelFlipping", features_in_step=_steps64),
        {"features_in_step": "H*W / 64"}, channels=1),
    Row("region-perturbation", "faithfulness", _model("region-perturbation", "curve", patch_size=_p8), _qm("RegionPerturbation", patch_size=_p8),
        {"patch_size": 8, "order": "morf", "regions_evaluation": 100}, channels=1),
    Row("selectivity", "faithfulness", _model("selectivity", "curve", patch_size=_p8), _qm("Selectivity", patch_size=_p8), {"patch_size": 8}, channels=1),
    Row("faithfulness-estimate", "faithfulness", _model("faithfulness-estimate", "correlation", features_in_step=_steps64),
        _qm("FaithfulnessEstimate", features_in_step=_steps64), {"features_in_step": "H*W / 64"}, channels=1),
    Row("monotonicity", "faithfulness", _model("monotonicity", "monotonic", features_in_step=_steps64), _qm("Monotonicity", features_in_step=_steps64),
        {"features_in_step": "H*W / 64"}, channels=1,
        compare="by design: Quantus 0.6.0 never inserts the image (constant curve, always True); xaijax inserts it"),
    Row("faithfulness-correlation", "faithfulness", _model("faithfulness-correlation", "correlation", nr_runs=_c(100), subset_size=_c(224)),
        _qm("FaithfulnessCorrelation", nr_runs=_c(100), subset_size=_c(224), return_aggregate=_c(False)),
        {"nr_runs": 100, "subset_size": 224}, compare="different random subsets", channels=1),
    Row("monotonicity-correlation", "faithfulness", _model("monotonicity-correlation", "correlation", nr_samples=_c(10), features_in_step=_steps64),
        _qm("MonotonicityCorrelation", nr_samples=_c(10), features_in_step=_steps64), {"nr_samples": 10, "features_in_step": "H*W / 64"},
        compare="different random draws", channels=1),
    Row("infidelity", "faithfulness", _model("infidelity", "infidelity"), _qm("Infidelity"), {"defaults": "both libraries' (Quantus')"},
        compare="exact (both deterministic with patch perturbations)", channels=1),
    Row("road", "faithfulness", _xaijax_road, _quantus_road, {"percentages": "1, 3, ..., 99", "noise": 0.0},
        channels=1, compare="exact (per-percentage accuracy, mean over the images)"),
    Row("irof", "faithfulness", _model("irof", "aoc", running_mean=_c(True)), _qm("IROF", return_aggregate=_c(False)),
        {"running_mean": True}, channels=1, compare="exact where an image has the batch's largest superpixel count"),
    Row("sufficiency", "faithfulness", _xaijax_sufficiency, _qm("Sufficiency"), {"threshold": 0.6}, channels=1),
    # --- robustness / randomisation / axioms (xaijax/metrics/robustness.py, randomisation.py, axioms.py):
    # --- they re-run the explanation: xaijax ``gradient`` with ``reduce="abs-sum"`` == Quantus'
    # --- ``quantus.explain`` method ``Saliency`` (Captum |gradient| summed over channels); settings
    # --- 10 noise samples (Quantus' default is 200)
    Row("max-sensitivity", "robustness", _method("max-sensitivity", {"n_samples": 10}), _qx("MaxSensitivity", nr_samples=10), {"xaijax": '{"n_samples": 10}'}, compare=_NOT_ALIGNED),
    Row("avg-sensitivity", "robustness", _method("avg-sensitivity", {"n_samples": 10}), _qx("AvgSensitivity", nr_samples=10), {"xaijax": '{"n_samples": 10}'}, compare=_NOT_ALIGNED),
    Row("local-lipschitz", "robustness", _method("local-lipschitz", {"n_samples": 10}), _qx("LocalLipschitzEstimate", nr_samples=10, normalise_func_kwargs=PER_IMAGE), {"xaijax": '{"n_samples": 10}'}, compare=_NOT_ALIGNED),
    Row("ris", "robustness", _method("ris", {"n_samples": 10}), _qx("RelativeInputStability", nr_samples=10), {"xaijax": '{"n_samples": 10}'}, compare=_NOT_ALIGNED),
    Row("ros", "robustness", _method("ros", {"n_samples": 10}), _qx("RelativeOutputStability", nr_samples=10), {"xaijax": '{"n_samples": 10}'}, compare=_NOT_ALIGNED),
    Row("rrs", "robustness", _method("rrs", {"n_samples": 10, "layers": ("conv2",)}), _qx("RelativeRepresentationStability", nr_samples=10, layer_names=["conv2"]), {"xaijax": '{"n_samples": 10, "layers": ("conv2",)}'}, compare=_NOT_ALIGNED),
    Row("continuity", "robustness", _method("continuity", {}), _qx("Continuity", normalise_func_kwargs=PER_IMAGE), {"xaijax": '{}'}, compare=_NOT_ALIGNED),
    Row("consistency", "robustness", _method("consistency", {}), _qx("Consistency", normalise_func_kwargs=PER_IMAGE), {"xaijax": '{}'}, compare=_NOT_ALIGNED),
    Row("mprt", "randomisation", _method("mprt", {}), _qx("MPRT", normalise_func_kwargs=PER_IMAGE), {"xaijax": '{}'}, compare=_NOT_ALIGNED),
    Row("smooth-mprt", "randomisation", _method("smooth-mprt", {"n_samples": 10}), _qx("SmoothMPRT", nr_samples=10, normalise_func_kwargs=PER_IMAGE), {"xaijax": '{"n_samples": 10}'}, compare=_NOT_ALIGNED),
    Row("efficient-mprt", "randomisation", _method("efficient-mprt", {}), _qx("EfficientMPRT"), {"xaijax": '{}'}, compare=_NOT_ALIGNED),
    Row("random-logit", "randomisation", _method("random-logit", {}), _qx("RandomLogit", num_classes=3, normalise_func_kwargs=PER_IMAGE), {"xaijax": '{}'}, compare=_NOT_ALIGNED),
    Row("completeness", "axioms", _method("completeness", {}), _qx("Completeness", normalise=False), {"xaijax": '{}'}, compare=_NOT_ALIGNED),
    Row("non-sensitivity", "axioms", _method("non-sensitivity", {"unit": "value"}), _qx("NonSensitivity", normalise_func_kwargs=PER_IMAGE), {"xaijax": '{"unit": "value"}'}, compare=_NOT_ALIGNED),
    Row("input-invariance", "axioms", _method("input-invariance", {}), _qx("InputInvariance"), {"xaijax": '{}'}, compare=_NOT_ALIGNED),
]


# ----------------------------------------------------------------------------- measurement


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(name: str, side: str, n: int, size: int, repeats: int, slow: float) -> dict:
    """Run one (row, side, N) measurement in this process; returns a JSON-able dict. A first call
    slower than ``slow`` seconds is the only one (its time is the median; ``calls_timed`` 1)."""
    import importlib
    import warnings

    for module in ("jax", "quantus", "torch"):  # import cost outside the measurement
        importlib.import_module(module)
    warnings.filterwarnings("ignore")
    if not hasattr(np, "trapz"):  # Quantus 0.6.0 calls np.trapz, removed in NumPy 2.4
        np.trapz = np.trapezoid
    row = {r.name: r for r in ROWS}[name]
    d = make_data(n, size, row.channels, row.classes)
    fn = row.xaijax if side == "xaijax" else row.quantus
    base = _rss_kb()
    t0 = time.perf_counter()
    values = fn(d)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats if first < slow else 0):
        t0 = time.perf_counter()
        values = fn(d)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "first_s": first,
        "median_s": statistics.median(times) if times else first,
        "calls_timed": len(times) or 1,
        "peak_mb": max(0, peak - base) / 1024,
        "values": [None if not np.isfinite(v) else float(v) for v in np.asarray(values, np.float64).ravel()],
    }


def run_one(name: str, side: str, n: int, size: int, repeats: int, timeout: float, slow: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, side, str(n), "--size", str(size), "--repeats", str(repeats), "--slow", str(slow)]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _max_diff(a: list, b: list) -> float | None:
    x = np.asarray([np.nan if v is None else v for v in a], np.float64)
    y = np.asarray([np.nan if v is None else v for v in b], np.float64)
    if x.shape != y.shape:
        return None
    both = np.isfinite(x) & np.isfinite(y)
    if (np.isfinite(x) != np.isfinite(y)).any():
        return float("inf")
    return float(np.abs(x[both] - y[both]).max()) if both.any() else 0.0


def _markdown(result: dict) -> str:
    lines = [
        "# xaijax metrics vs Quantus 0.6.0",
        "",
        f"{result['size']} x {result['size']} px; median of {result['repeats']} calls after a warm-up call; "
        "peak = resident memory above the process's before the first call (compilation included). "
        f"Load average before / after: {result['load_before']} / {result['load_after']}.",
        "",
        "| metric | family | N | xaijax (s) | Quantus (s) | speed-up | xaijax first call (s) | peak xaijax / Quantus (MB) | max abs diff | comparison |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        xa, qu = r.get("xaijax", {}), r.get("quantus", {})
        if "error" in xa or "error" in qu:
            lines.append(f"| {r['name']} | {r['family']} | {r['n']} | {xa.get('error', '')} | {qu.get('error', '')} | | | | | |")
            continue
        ratio = qu["median_s"] / xa["median_s"] if xa["median_s"] > 0 else float("inf")
        diff = r["max_abs_diff"]
        lines.append(
            f"| {r['name']} | {r['family']} | {r['n']} | {xa['median_s']:.4f} | {qu['median_s']:.4f} | {ratio:.1f}x | "
            f"{xa['first_s']:.2f} | {xa['peak_mb']:.0f} / {qu['peak_mb']:.0f} | "
            f"{'n/a' if diff is None else f'{diff:.1e}'} | {r['compare']} |"
        )
    notes = [f"- **{r.name}**: {r.note}" for r in ROWS if r.note]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 64], help="numbers of images N")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per (row, side, N)")
    ap.add_argument("--slow", type=float, default=20.0, help="a first call slower than this is the only timed call")
    ap.add_argument("--out", default=os.path.join(RESULTS, "bench_metrics.json"))
    ap.add_argument("--list", action="store_true", help="list the rows and exit")
    ap.add_argument("--child", nargs=3, metavar=("ROW", "SIDE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        name, side, n = args.child
        print(json.dumps(child(name, side, int(n), args.size, args.repeats, args.slow)))
        return
    if args.list:
        for r in ROWS:
            print(f"{r.name:28s} {r.family:14s} {r.compare}")
        return
    chosen = [r for r in ROWS if not args.rows or r.name in set(args.rows.split(","))]
    unknown = set(filter(None, args.rows.split(","))) - {r.name for r in chosen}
    if unknown:
        raise SystemExit(f"unknown rows: {sorted(unknown)}; see --list")
    import quantus

    from xaijax.atomic import atomic_text

    result = {
        "quantus": getattr(quantus, "__version__", "0.6.0"),
        "size": args.size,
        "repeats": args.repeats,
        "sizes": args.sizes,
        "cpu_count": os.cpu_count(),
        "load_before": [round(v, 2) for v in os.getloadavg()],
        "rows": [],
    }
    for r in chosen:
        for n in args.sizes:
            entry = {"name": r.name, "family": r.family, "n": n, "settings": {k: str(v) for k, v in r.settings.items()}, "compare": r.compare}
            for side in ("xaijax", "quantus"):
                entry[side] = run_one(r.name, side, n, args.size, args.repeats, args.timeout, args.slow)
            ok = "values" in entry["xaijax"] and "values" in entry["quantus"]
            entry["max_abs_diff"] = _max_diff(entry["xaijax"]["values"], entry["quantus"]["values"]) if ok else None
            result["rows"].append(entry)
            xa, qu = entry["xaijax"], entry["quantus"]
            print(f"{r.name:28s} N={n:3d}  xaijax {xa.get('median_s', xa.get('error'))}  quantus {qu.get('median_s', qu.get('error'))}  diff {entry['max_abs_diff']}", flush=True)
    result["load_after"] = [round(v, 2) for v in os.getloadavg()]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_text(args.out, json.dumps(result, indent=1) + "\n")
    atomic_text(os.path.splitext(args.out)[0] + ".md", _markdown(result))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
