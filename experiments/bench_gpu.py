"""GPU benchmark in one process under a time budget: RISE, rule methods / gradient, UCAG, eval pointing.

    python experiments/bench_gpu.py                   # one GPU, <= 8 minutes -> experiments/results/bench_gpu.json
    python experiments/bench_gpu.py --quick           # tiny models on the CPU, well under a minute (CI smoke test)
    xaijax bench --gpu -- --budget-s 300 --sections rise,methods

DESIGN.md section 6 on an accelerator: VGG16 and ResNet50 at 224 px with random seeded weights
(``models.random_variables``: timings do not depend on the weights), seeded Gaussian inputs,
every timing after warm-up (compile + one run), median of repeats, ``block_until_ready``.

Sections, run in this order (``--sections`` picks and orders them):

1. ``rise``: RISE with ``--rise-n`` (4000) masks, batch 1, jitted (one ``lax.scan`` over chunks
   of ``chunk`` masks), for each ``--rise-chunks`` value: seconds per image; the throughput
   of a jitted forward pass of one chunk of masked images (RISE's own batch) and the ratio of
   the two (target >= 0.9); XLA's FLOP count of one forward pass (cost analysis of the lowered
   program) and the FLOP limit ``forward FLOPs x N / peak`` where the device's peak is known
   (:data:`PEAK_TFLOPS`, dense, no sparsity; TF32 is what float32 convolutions use under JAX's
   default precision on Ampere and newer NVIDIA GPUs; ``--peak-tflops`` for other devices).
2. ``ucag``: UCAG over Grad-CAM with the whole-image map (``include_global=True``: 36 patches + 1
   whole image) vmapped (one batched call), against the 37 base calls (jitted Grad-CAM layer
   maps) made one by one, then the same jitted weighting / placement / post-processing; the two
   results are compared (``max_abs_diff``).
3. ``pointing``: ``xaijax eval pointing`` (:func:`xaijax.evaluation.run_experiment`) on the
   bundled synthetic benchmark and weights, with a small and a large image count in fresh
   results folders: end-to-end images/s of the large run (model loading, compilation, store
   writes included, as a user sees it) and the marginal images/s between the two runs.
4. ``methods``: the plain jitted input gradient and every propagation (rule) method of the
   registry (:func:`rule_methods`: LRP composites, CLRP, SGLRP, Excitation Backprop and its
   contrastive form, RAP, RSP, c*RSP, DeepLIFT, Guided Backprop, DeconvNet, ...) at each
   ``--batches`` size (64, 16, 1, in that order): median time, the ratio to the gradient timed
   in the same repeat (target <= 1.3 at batch 64), trace / compile times, XLA's FLOPs and
   temporary memory of each compiled program. Every method of one (model, batch) is traced
   in this thread, then compiled ``--compile-workers`` at a time in a thread pool (compilation
   is most of the time on a GPU); the gradient is compiled first and alone, so the
   convolution autotuning results it caches serve the others, and nothing is timed while
   anything compiles.

Time budget (``--budget-s``, default 480 s counted from the start of the process): before each
item the script estimates its cost from what it has measured so far and skips it when it would
not fit, listing it under ``skipped`` with the reason; a method whose estimate does not fit
is left out of its (model, batch) group the same way. The JSON is rewritten (atomically) after
every item, so an interrupted run keeps what it finished; a watchdog writes it and ends the
process (exit status 3, ``stopped`` set) if the budget is passed by more than ``--grace-s``.

Recorded: start and end time (UTC), the device kind and count, peak device memory
(``device.memory_stats()["peak_bytes_in_use"]`` where the backend reports it, else None), jax
and jaxlib (and CUDA plugin) versions, the CPU model, the XLA flags and the settings.
``--quick`` runs the same code on tiny models (32 px, width-reduced VGG16 / one-block-per-stage
ResNet50, 50 masks, batch 1 and 2, two rule methods, 2 + 4 images for pointing) with most of
XLA's optimisation passes off (``jax_disable_most_optimizations``: compile time is nearly all
of a tiny model's run; restored afterwards), and writes ``results/bench_gpu_quick.json`` unless
``--out`` is given (never the committed results). Its numbers test the code, not a machine.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # the budget counts from here: before jax is imported
_STARTED = time.time()

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, ClassVar, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from xaijax import methods, models  # noqa: E402
from xaijax.atomic import atomic_text  # noqa: E402
from xaijax.methods._core import Method  # noqa: E402
from xaijax.methods.cam import GradCAM  # noqa: E402
from xaijax.methods.combinators import Ucag  # noqa: E402
from xaijax.methods.gradient import ModifiedGradient  # noqa: E402
from xaijax.methods.perturbation import RISE, rise_masks  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model  # noqa: E402  (experiments/machine.py: one home for machine facts)
from quick_models import QUICK_MODELS  # noqa: E402  (experiments/quick_models.py: the --quick variants)

#: Dense (no sparsity) peak TFLOP/s by device kind substring, first match wins (NVIDIA datasheets).
#: ``tf32``: tensor cores on float32 inputs (JAX's default precision on Ampere and newer);
#: ``fp32``: plain float32 (``jax_default_matmul_precision="highest"``).
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"tf32": 417.5, "fp32": 60.0}),
    ("H100", {"tf32": 494.7, "fp32": 66.9}),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", {"tf32": 494.7, "fp32": 66.9}),
    ("A100", {"tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"tf32": 183.0, "fp32": 91.6}),
)

#: Modules whose registered classifier methods are propagation (rule) methods.
RULE_MODULES = ("xaijax.methods.lrp", "xaijax.methods.excitation", "xaijax.methods.rap", "xaijax.methods.rsp", "xaijax.methods.deeplift")
#: Timing order of the rule methods (what a short budget keeps); others follow alphabetically.
PRIORITY = (
    "lrp-epsilon", "lrp-epsilon-plus", "lrp-epsilon-plus-flat", "lrp-epsilon-gamma-box", "lrp-alpha1-beta0",
    "lrp-alpha2-beta1", "excitation-backprop", "contrastive-excitation-backprop", "rap", "rsp", "contrastive-rsp",
    "clrp", "sglrp", "guided-backprop", "deconvnet", "deeplift", "lrp-zplus-nobias-samplebox", "deeplift-shap",
)
QUICK_METHODS = ("lrp-epsilon", "excitation-backprop")
SECTIONS = ("rise", "ucag", "pointing", "methods")


# ------------------------------------------------------------------------------ machine facts
def _versions() -> dict[str, str]:
    """jax, jaxlib and any installed jax plugin (CUDA / ROCm) distribution versions."""
    from importlib import metadata

    found = {"jax": jax.__version__}
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        if name == "jaxlib" or name.startswith(("jax-cuda", "jax-rocm")):
            found[name] = dist.version
    return found


def peak_tflops(device_kind: str) -> dict[str, float] | None:
    """Dense peak TFLOP/s of a device kind (:data:`PEAK_TFLOPS`), None when unknown."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return dict(peaks)
    return None


def device_peak_bytes() -> int | None:
    """The largest ``peak_bytes_in_use`` over the local devices since the process started
    (None where the backend keeps no statistics, e.g. the CPU)."""
    peaks = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - unsupported on some backends
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def _config(name: str) -> Any:
    """A JAX configuration value (None where this jax has no such option)."""
    try:
        return jax.config.read(name)
    except (AttributeError, KeyError, ValueError):
        return getattr(jax.config, name, None)


def machine() -> dict[str, Any]:
    d = jax.devices()[0]
    stats = None
    try:
        stats = d.memory_stats()
    except Exception:  # noqa: BLE001
        pass
    return {
        "backend": jax.default_backend(),
        "device_kind": d.device_kind,
        "device_count": jax.device_count(),
        "devices": [str(x) for x in jax.devices()],
        "device_memory_limit_bytes": int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None,
        "versions": _versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "default_matmul_precision": _config("jax_default_matmul_precision"),
        "peak_tflops": peak_tflops(d.device_kind),
    }


# ------------------------------------------------------------------------------ the recorder
def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Recorder:
    """The payload, its atomic JSON file, the budget and the watchdog.

    Every change goes through :meth:`add` (under a lock), which rewrites the JSON; the
    watchdog thread writes the payload as it stands and ends the process if the budget is
    passed by more than ``grace_s``.
    """

    def __init__(self, out: Path, payload: dict[str, Any], budget_s: float, grace_s: float, hard_stop: bool) -> None:
        self.out = out
        self.payload = payload
        self.deadline = _T0 + budget_s
        self.lock = threading.Lock()
        self._timer = None
        if hard_stop:
            self._timer = threading.Timer(max(0.0, self.deadline + grace_s - time.perf_counter()), self._stop)
            self._timer.daemon = True
            self._timer.start()

    def left(self) -> float:
        """Seconds left in the budget."""
        return self.deadline - time.perf_counter()

    def fits(self, estimate_s: float) -> bool:
        return estimate_s <= self.left()

    def skipped(self, section: str, item: str, estimate_s: float | None) -> bool:
        """Record ``item`` as skipped and return True when it would not fit: no time left, or
        ``estimate_s`` (None: nothing measured yet) more than what is left."""
        left = self.left()
        if left > 0 and (estimate_s is None or estimate_s <= left):
            return False
        est = "nothing measured yet" if estimate_s is None else f"estimated {estimate_s:.0f} s"
        self.skip(section, item, f"{est}, {max(left, 0.0):.0f} s of the budget left")
        return True

    def add(self, section: str, row: dict[str, Any], started: float | None = None) -> None:
        """Append ``row`` to ``section`` (with ``item_s``, the seconds since ``started``) and write."""
        if started is not None:
            row["item_s"] = round(time.perf_counter() - started, 2)
        with self.lock:
            self.payload[section].append(row)
            self._write()

    def put(self, container: dict[str, Any], key: str, value: Any) -> None:
        """``container[key] = value`` for a dict inside the payload, then write."""
        with self.lock:
            container[key] = value
            self._write()

    def skip(self, section: str, item: str, reason: str) -> None:
        print(f"  skip {section} {item}: {reason}", flush=True)
        self.add("skipped", {"section": section, "item": item, "reason": reason})

    def finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with self.lock:
            self._close()
            self.payload["markdown"] = markdown(self.payload)
            self._write()

    def _close(self) -> None:
        end = time.time()
        self.payload["ended_at"] = _utc(end)
        self.payload["wall_s"] = round(time.perf_counter() - _T0, 2)
        self.payload["peak_device_memory_bytes"] = device_peak_bytes()

    def _write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_text(self.out, json.dumps(self.payload, indent=2) + "\n")

    def _stop(self) -> None:  # the watchdog thread
        got = self.lock.acquire(timeout=5.0)
        try:
            try:
                self.payload = copy.deepcopy(self.payload)
            except RuntimeError:  # changed while copied (the lock was not free): keep the run's facts only
                self.payload = {k: v for k, v in self.payload.items() if k not in ("rise", "ucag", "pointing", "methods")}
            self.payload["stopped"] = f"passed the {round(self.deadline - _T0)} s budget by the grace time; the rest was not run"
            self._close()
            self._write()
        finally:
            if got:
                self.lock.release()
        print(f"bench_gpu: stopped at the time limit; partial results in {self.out}", file=sys.stderr, flush=True)
        os._exit(3)


# ------------------------------------------------------------------------------ timing helpers
def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def _flops(stage: Any) -> float | None:
    """XLA's cost-analysis FLOPs of a lowered or compiled program (None if unavailable)."""
    try:
        analysis = stage.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    flops = analysis.get("flops") if analysis else None
    return float(flops) if flops is not None and flops > 0 else None


def _temp_bytes(compiled: Any) -> int | None:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001
        return None


def _error(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"


def _sig(x: float, digits: int = 6) -> float:
    """``x`` to ``digits`` significant digits (FLOP counts of tiny and large models alike)."""
    return float(f"{x:.{digits}g}")


def _median(xs: Sequence[float], digits: int = 5) -> float:
    return round(statistics.median(xs), digits)


@dataclasses.dataclass
class Setup:
    """Model, random variables, a seeded input batch and targets."""

    arch: str
    model: Any
    variables: Any
    x: jax.Array
    target: jax.Array


def make_setup(arch: str, batch: int, size: int, quick: bool, seed: int = 1) -> Setup:
    kwargs = QUICK_MODELS.get(arch, {}) if quick else {}
    model = models.get(arch, **kwargs)
    variables = models.random_variables(model, (1, size, size, 3), seed=0)
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((batch, size, size, 3), np.float32))
    classes = int(kwargs.get("num_classes", 1000))
    target = jnp.asarray(np.arange(batch) % classes, jnp.int32)
    return Setup(arch, model, variables, x, target)


def _jit_method(s: Setup, method: Method) -> Callable:
    return jax.jit(lambda v, x, t: method(s.model, v, x, t))


# ------------------------------------------------------------------------------ 1. RISE
def bench_rise(rec: Recorder, arch: str, size: int, n: int, chunk: int, repeats: int, quick: bool, peaks: dict | None) -> None:
    item = f"{arch} {size}px N={n} chunk={chunk}"
    est = rec.payload["_estimates"].get("rise")
    if rec.skipped("rise", item, est):
        return
    t_item = time.perf_counter()
    s = make_setup(arch, 1, size, quick)
    chunk = min(chunk, n)
    fwd = jax.jit(s.model.apply)
    lowered = fwd.lower(s.variables, s.x)  # one image
    fwd_flops = _flops(lowered) or _flops(lowered.compile())  # the uncompiled HLO's count where the backend gives one
    masks = rise_masks(0, jnp.arange(chunk), (size, size))
    xb = s.x * masks[:, :, :, None].astype(s.x.dtype)  # (chunk, H, W, 3): the masked images RISE forwards
    rise = _jit_method(s, RISE(n=n, chunk=chunk))
    calls = {"forward_chunk": lambda: fwd(s.variables, xb), "rise": lambda: rise(s.variables, s.x, s.target)}
    try:
        first = {k: round(_timed(c), 3) for k, c in calls.items()}
        for c in calls.values():
            _timed(c)
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(repeats):
            for k, c in calls.items():
                times[k].append(_timed(c))
            if rec.left() < 0:
                break
    except Exception as e:  # noqa: BLE001 - out of memory and the like: record it and go on
        rec.add("rise", {"arch": arch, "size": size, "n": n, "chunk": chunk, "error": _error(e)})
        return
    t_rise, t_fwd = statistics.median(times["rise"]), statistics.median(times["forward_chunk"])
    row: dict[str, Any] = {
        "arch": arch,
        "size": size,
        "n": n,
        "chunk": chunk,
        "repeats": len(times["rise"]),
        "first_call_s": first,
        "rise_s_per_image": round(t_rise, 4),
        "forward_chunk_s": round(t_fwd, 5),
        "forward_images_per_s": round(chunk / t_fwd, 2),
        "rise_masks_per_s": round(n / t_rise, 2),
        "throughput_ratio": round((n / t_rise) / (chunk / t_fwd), 3),
        "forward_gflop_per_image": _sig(fwd_flops / 1e9) if fwd_flops else None,
        "achieved_tflops": _sig(fwd_flops * n / t_rise / 1e12, 4) if fwd_flops else None,
        # forward FLOPs x N / peak: the time of RISE's forward passes at the device's peak rate
        "flop_limit_s": {k: _sig(fwd_flops * n / (v * 1e12), 4) for k, v in peaks.items()} if (peaks and fwd_flops) else None,
        "device_peak_bytes": device_peak_bytes(),
        "target": "throughput_ratio >= 0.9; VGG16 224 px N=4000: < 1 s per image",
    }
    rec.payload["_estimates"]["rise"] = max(est or 0.0, time.perf_counter() - t_item)
    print(f"  rise {item}: {row['rise_s_per_image']:.3f} s/image, throughput ratio {row['throughput_ratio']:.2f}", flush=True)
    rec.add("rise", row, t_item)


# ------------------------------------------------------------------------------ 2. UCAG
@dataclasses.dataclass(frozen=True, eq=False)
class _GivenLayerMaps(Method):
    """Stand-in base method of the looped UCAG: returns Grad-CAM layer maps computed one call
    at a time elsewhere (the 36 patches' or, for the whole image, the global one)."""

    kind: ClassVar[str] = "cam"
    has_layer_map: ClassVar[bool] = True

    patch_maps: jax.Array  # (n * n, h, w)
    global_map: jax.Array  # (1, h', w')

    def layer_map(self, model, variables, x, target):
        return self.patch_maps if x.shape[0] == self.patch_maps.shape[0] else self.global_map

    def __call__(self, model, variables, x, target):
        return self.layer_map(model, variables, x, target)


def bench_ucag(rec: Recorder, arch: str, size: int, repeats: int, quick: bool) -> None:
    item = f"{arch} {size}px"
    est = rec.payload["_estimates"].get("ucag")
    if rec.skipped("ucag", item, est):
        return
    t_item = time.perf_counter()
    s = make_setup(arch, 1, size, quick)
    u = Ucag(GradCAM(), include_global=True)
    k = u.n * u.n
    vmapped = _jit_method(s, u)
    layer_map = jax.jit(lambda v, x, t: GradCAM().layer_map(s.model, v, x, t))
    patches = jax.jit(lambda x: u.patches(x).reshape((k,) + u.patches(x).shape[2:]))

    @jax.jit
    def combine(patch_maps, global_map, v, x, t):
        return dataclasses.replace(u, method=_GivenLayerMaps(patch_maps, global_map))(s.model, v, x, t)

    def looped():
        p = patches(s.x)  # (36, S, S, 3)
        maps = [layer_map(s.variables, p[i : i + 1], s.target) for i in range(k)]
        whole = layer_map(s.variables, s.x, s.target)
        return combine(jnp.concatenate(maps, 0), whole, s.variables, s.x, s.target)

    calls = {"vmapped": lambda: vmapped(s.variables, s.x, s.target), "loop": looped}
    try:
        first = {name: round(_timed(c), 3) for name, c in calls.items()}
        a, b = np.asarray(calls["vmapped"]()), np.asarray(calls["loop"]())
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(repeats):
            for name, c in calls.items():
                times[name].append(_timed(c))
            if rec.left() < 0:
                break
    except Exception as e:  # noqa: BLE001
        rec.add("ucag", {"arch": arch, "size": size, "error": _error(e)})
        return
    g = u.geometry((size, size))
    tv, tl = statistics.median(times["vmapped"]), statistics.median(times["loop"])
    row = {
        "arch": arch,
        "size": size,
        "patches": k,
        "patch_px": list(g.patch),
        "zoom_px": list(g.zoom),
        "base_calls_looped": k + 1,
        "repeats": len(times["vmapped"]),
        "first_call_s": first,
        "vmapped_s": round(tv, 5),
        "loop_s": round(tl, 5),
        "vmapped_over_loop": round(tv / tl, 4),
        "max_abs_diff": float(np.abs(a - b).max()),
        "device_peak_bytes": device_peak_bytes(),
        "target": "vmapped_over_loop < 1",
    }
    rec.payload["_estimates"]["ucag"] = max(est or 0.0, time.perf_counter() - t_item)
    print(f"  ucag {item}: vmapped {tv:.3f} s, loop {tl:.3f} s", flush=True)
    rec.add("ucag", row, t_item)


# ------------------------------------------------------------------------------ 3. pointing
def bench_pointing(rec: Recorder, weights: str, method: str, counts: tuple[int, int], batch: int) -> None:
    """``xaijax eval pointing`` on the synthetic benchmark: ``counts = (small, large)`` images."""
    from xaijax.checkpoints import bundled_weights
    from xaijax.evaluation import EvalConfig, run_experiment

    item = f"{weights} {method} {counts[1]} images"
    est = rec.payload["_estimates"].get("pointing")
    if rec.skipped("pointing", item, est):
        return
    t_item = time.perf_counter()
    w = str(bundled_weights(f"{weights}.safetensors"))
    seconds, last = [], None
    try:
        with tempfile.TemporaryDirectory() as d:
            for i, count in enumerate(counts):  # fresh folders: nothing resumed
                t0 = time.perf_counter()
                last = run_experiment(
                    EvalConfig("pointing", Path(d) / f"run{i}", (method,), weights=w, images=count, batch=batch), progress=False
                )
                seconds.append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        rec.add("pointing", {"weights": weights, "method": method, "error": _error(e)})
        return
    r = last["rows"][0]
    dn, dt = counts[1] - counts[0], seconds[1] - seconds[0]
    row = {
        "weights": weights,
        "method": method,
        "batch": batch,
        "images": [counts[0], int(r["images"])],
        "pairs": int(r["pairs"]),
        "seconds": [round(t, 3) for t in seconds],
        "images_per_s": round(int(r["images"]) / seconds[1], 3),
        # None when the larger run was not slower (timer noise on a few images)
        "marginal_images_per_s": round(dn / dt, 3) if dt > 0 and dn > 0 else None,
        "pointing_all": float(r["pointing_all"]),
        "device_peak_bytes": device_peak_bytes(),
    }
    rec.payload["_estimates"]["pointing"] = max(est or 0.0, time.perf_counter() - t_item)
    print(f"  pointing {item}: {row['images_per_s']} images/s (marginal {row['marginal_images_per_s']})", flush=True)
    rec.add("pointing", row, t_item)


# ------------------------------------------------------------------------------ 4. methods
def rule_methods() -> list[str]:
    """The registry's propagation (rule) methods for classifiers: those defined in
    :data:`RULE_MODULES` and the modified-gradient rules (Guided Backprop, DeconvNet),
    minus the transformer-only composites (``attnlrp``, ``cp-lrp``; not defined for CNNs'
    purpose), in :data:`PRIORITY` order, then alphabetically."""
    found = []
    for name in methods.names():
        m = methods.get(name)
        if m.kind != "attribution" or name in ("attnlrp", "cp-lrp"):
            continue
        if type(m).__module__ in RULE_MODULES or isinstance(m, ModifiedGradient):
            found.append(name)
    rank = {n: i for i, n in enumerate(PRIORITY)}
    return sorted(found, key=lambda n: (rank.get(n, len(rank)), n))


def _estimate(hist: dict[str, dict[str, float]], name: str, batch: int, workers: int, repeats: int) -> float:
    """Seconds to trace, compile and time ``name`` from an earlier (model, batch) group's numbers."""
    h = hist.get(name)
    if h is None:
        return 0.0
    run = h["run_s"] * max(1.0, batch / h["batch"])  # time per call grows at most linearly with the batch
    return h["lower_s"] + h["compile_s"] / workers + (repeats + 2) * (run + hist.get("gradient", h)["run_s"])


def bench_methods(
    rec: Recorder, arch: str, batch: int, size: int, repeats: int, names: list[str], quick: bool, workers: int
) -> None:
    """Gradient and every rule method at one batch size; ratios paired per repeat."""
    group = f"{arch} b={batch} {size}px"
    # what this model measured at an earlier batch size; else the other model's numbers; else nothing
    estimates = rec.payload["_estimates"]
    hist: dict[str, dict[str, float]] = estimates.get(f"methods/{arch}") or next(
        (v for k, v in estimates.items() if k.startswith("methods/") and v), {}
    )
    if rec.skipped("methods", group, _estimate(hist, "gradient", batch, 1, repeats) if hist else None):
        return
    t_item = time.perf_counter()
    s = make_setup(arch, batch, size, quick)
    args = (s.variables, s.x, s.target)
    row: dict[str, Any] = {"arch": arch, "batch": batch, "size": size, "repeats": repeats, "methods": {}}

    def lower(name: str):
        t0 = time.perf_counter()
        lowered = _jit_method(s, methods.get(name)).lower(*args)
        return lowered, time.perf_counter() - t0

    try:
        lowered, lower_s = lower("gradient")
        t0 = time.perf_counter()
        grad = lowered.compile()
        compile_s = time.perf_counter() - t0
        g_first = _timed(lambda: grad(*args))
        g_run = _timed(lambda: grad(*args))
    except Exception as e:  # noqa: BLE001
        row["error"] = _error(e)
        rec.add("methods", row, t_item)
        return
    g_flops = _flops(grad)
    row["gradient"] = {
        "lower_s": round(lower_s, 3), "compile_s": round(compile_s, 3), "first_run_s": round(g_first, 4),
        "gflop": _sig(g_flops / 1e9) if g_flops else None, "temp_bytes": _temp_bytes(grad),
    }
    new_hist: dict[str, dict[str, float]] = {"gradient": {"lower_s": lower_s, "compile_s": compile_s, "run_s": g_run, "batch": batch}}
    row["gradient"]["median_s"] = round(g_run, 5)  # until the paired repeats below replace it
    row["compile_workers"] = workers
    rec.add("methods", row)  # in the JSON from now on: a stopped run keeps the methods already timed

    # which methods fit: each one's estimate from the history (0 when unknown: then it runs)
    plan, total = [], _estimate(hist, "gradient", batch, 1, repeats)
    for name in names:
        est = _estimate(hist, name, batch, workers, repeats)
        if total + est > rec.left():
            rec.skip("methods", f"{group} {name}", f"estimated {est:.0f} s, {rec.left() - total:.0f} s left after those before it")
            continue
        total += est
        plan.append(name)

    def compile_one(lowered: Any) -> tuple[Any, float]:
        t0 = time.perf_counter()
        try:
            return lowered.compile(), time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - e.g. a compile-time out of memory
            return e, time.perf_counter() - t0

    # trace here, one method after the other; each compiles in the pool as soon as it is traced
    lower_s_of: dict[str, float] = {}
    pending = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for name in plan:
            if rec.left() <= 0:
                rec.skip("methods", f"{group} {name}", "budget spent while tracing")
                continue
            try:
                lowered, lower_s_of[name] = lower(name)
            except Exception as e:  # noqa: BLE001 - e.g. NotApplicable
                rec.put(row["methods"], name, {"error": _error(e)})
                continue
            pending[name] = pool.submit(compile_one, lowered)
        compiled = {name: f.result() for name, f in pending.items()}  # nothing is timed while anything compiles
    order = list(compiled)

    g_times: list[float] = []
    for name in order:
        exe, c_s = compiled.pop(name)
        l_s = lower_s_of[name]
        if isinstance(exe, BaseException):
            rec.put(row["methods"], name, {"error": _error(exe), "lower_s": round(l_s, 3), "compile_s": round(c_s, 3)})
            continue
        if rec.left() <= 0:
            rec.skip("methods", f"{group} {name}", "budget spent before timing")
            continue
        try:
            first = _timed(lambda: exe(*args))
            _timed(lambda: exe(*args))
            ts, rs = [], []
            for _ in range(repeats):
                tg = _timed(lambda: grad(*args))
                t = _timed(lambda: exe(*args))
                g_times.append(tg)
                ts.append(t)
                rs.append(t / tg)
                if rec.left() < 0:
                    break
        except Exception as e:  # noqa: BLE001 - e.g. out of device memory at batch 64
            rec.put(row["methods"], name, {"error": _error(e), "lower_s": round(l_s, 3), "compile_s": round(c_s, 3)})
            continue
        flops = _flops(exe)
        result = {
            "median_s": _median(ts),
            "ratio_to_gradient": round(statistics.median(rs), 4),
            "repeats": len(ts),
            "lower_s": round(l_s, 3),
            "compile_s": round(c_s, 3),
            "first_run_s": round(first, 4),
            "gflop": _sig(flops / 1e9) if flops else None,
            "flops_ratio_to_gradient": round(flops / g_flops, 4) if (flops and g_flops) else None,
            "temp_bytes": _temp_bytes(exe),
        }
        rec.put(row["methods"], name, result)
        new_hist[name] = {"lower_s": l_s, "compile_s": c_s, "run_s": statistics.median(ts), "batch": batch}
        print(f"  {group} {name}: {result['median_s']:.4f} s, {result['ratio_to_gradient']:.2f}x gradient", flush=True)
    with rec.lock:
        row["gradient"]["median_s"] = _median(g_times) if g_times else round(g_run, 5)
        row["gradient"]["timings"] = len(g_times) or 1
        row["device_peak_bytes"] = device_peak_bytes()
        row["item_s"] = round(time.perf_counter() - t_item, 2)
        rec.payload["_estimates"][f"methods/{arch}"] = {**rec.payload["_estimates"].get(f"methods/{arch}", {}), **new_hist}
    rec.put(row, "complete", True)


# ------------------------------------------------------------------------------ report
def markdown(p: dict[str, Any]) -> str:
    m = p["machine"]
    out = [f"{m['device_kind']} x{m['device_count']} ({m['backend']}), jax {m['versions'].get('jax')}, "
           f"CPU {m['cpu_model']}; {p['started_at']} to {p.get('ended_at')}; peak device memory "
           f"{p.get('peak_device_memory_bytes')} bytes"]
    if p["rise"]:
        out += ["", "| RISE | px | N | chunk | s / image | forward img/s | ratio | FLOP limit s (tf32 / fp32) |",
                "|---|---|---|---|---|---|---|---|"]
        for r in p["rise"]:
            if "error" in r:
                out.append(f"| {r['arch']} | {r['size']} | {r['n']} | {r['chunk']} | {r['error']} | | | |")
                continue
            lim = r["flop_limit_s"]
            lim_s = f"{lim.get('tf32')} / {lim.get('fp32')}" if lim else "-"
            out.append(f"| {r['arch']} | {r['size']} | {r['n']} | {r['chunk']} | **{r['rise_s_per_image']:.3f}** | "
                       f"{r['forward_images_per_s']:.0f} | {r['throughput_ratio']:.2f} | {lim_s} |")
    if p["ucag"]:
        out += ["", "| UCAG(Grad-CAM) | px | vmapped s | 37 calls s | vmapped / loop |", "|---|---|---|---|---|"]
        for r in p["ucag"]:
            if "error" in r:
                out.append(f"| {r['arch']} | {r['size']} | {r['error']} | | |")
            else:
                out.append(f"| {r['arch']} | {r['size']} | {r['vmapped_s']:.4f} | {r['loop_s']:.4f} | **{r['vmapped_over_loop']:.3f}** |")
    if p["pointing"]:
        out += ["", "| eval pointing | method | images | images/s | marginal images/s |", "|---|---|---|---|---|"]
        for r in p["pointing"]:
            if "error" in r:
                out.append(f"| {r['weights']} | {r['method']} | {r['error']} | | |")
            else:
                out.append(f"| {r['weights']} | {r['method']} | {r['images'][1]} | {r['images_per_s']} | {r['marginal_images_per_s']} |")
    rows = [r for r in p["methods"] if "gradient" in r]
    if rows:
        cols = [f"{r['arch']} b{r['batch']}" for r in rows]
        out += ["", "| method / gradient | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        out.append("| gradient (s) | " + " | ".join(f"{r['gradient']['median_s']:.4f}" for r in rows) + " |")
        for name in dict.fromkeys(n for r in rows for n in r["methods"]):
            cells = []
            for r in rows:
                c = r["methods"].get(name)
                cells.append("-" if c is None else ("error" if "error" in c else f"{c['ratio_to_gradient']:.2f}x"))
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    if p["skipped"]:
        out += ["", f"skipped for the time budget: {len(p['skipped'])} item(s), see `skipped`"]
    return "\n".join(out)


# ------------------------------------------------------------------------------ main
def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models on the CPU (CI smoke test; see the module docstring)")
    ap.add_argument("--out", default=None, help="JSON output (default experiments/results/bench_gpu.json; "
                    "--quick: results/bench_gpu_quick.json)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="time budget of the whole process in seconds (480)")
    ap.add_argument("--grace-s", type=float, default=30.0, help="past the budget by this much, the watchdog stops the process")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, in order (default {','.join(SECTIONS)})")
    ap.add_argument("--archs", default="vgg16,resnet50")
    ap.add_argument("--size", type=int, default=None, help="input side in pixels (224; --quick 32)")
    ap.add_argument("--batches", default=None, help="method batch sizes, in order (64,16,1; --quick 1,2)")
    ap.add_argument("--methods", default=None, help="comma-separated rule methods (default: every one, see rule_methods)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (5; --quick 2)")
    ap.add_argument("--rise-n", type=int, default=None, help="RISE masks (4000; --quick 50)")
    ap.add_argument("--rise-chunks", default=None, help="RISE masks per scan step, comma-separated (100,400; --quick 25)")
    ap.add_argument("--ucag-size", type=int, default=None, help="UCAG input side (default --size)")
    ap.add_argument("--pointing-images", default=None, help="small,large image counts (64,512; --quick 2,4)")
    ap.add_argument("--pointing-batch", type=int, default=None, help="eval batch (64; --quick 2)")
    ap.add_argument("--pointing-methods", default=None, help="grad-cam,rsp; --quick grad-cam")
    ap.add_argument("--compile-workers", type=int, default=None,
                    help="threads compiling a (model, batch) group's methods (min(8, CPUs/2); 1 = one at a time)")
    ap.add_argument("--compile-cache", default=None, metavar="DIR",
                    help="JAX's persistent compilation cache in DIR: a second run on the same machine skips most "
                    "compile time (and so fits more into the budget); compile_s then counts cache reads")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak TFLOP/s, if not in PEAK_TFLOPS")
    return ap


def main(argv: Sequence[str] | None = None, hard_stop: bool = True) -> dict[str, Any]:
    """Run the benchmark; returns the payload written to ``--out``. ``hard_stop=False``: no
    watchdog that ends the process (for a caller that must survive a run past the budget)."""
    args = parser().parse_args(argv)
    flag, before = "jax_disable_most_optimizations", None
    if args.quick:  # a smoke test of the code paths: XLA's optimisation passes are most of a tiny model's compile time
        try:
            before = jax.config.read(flag)
            jax.config.update(flag, True)
        except (AttributeError, KeyError, ValueError):  # a jax without the option: compile as usual
            before = None
    try:
        return run(args, list(sys.argv[1:] if argv is None else argv), hard_stop)
    finally:
        if before is not None:
            jax.config.update(flag, before)


def run(args: argparse.Namespace, argv: list[str], hard_stop: bool) -> dict[str, Any]:
    """:func:`main` after parsing."""
    q = args.quick
    sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise SystemExit(f"unknown section(s) {bad}; choose from {SECTIONS}")
    archs = [a for a in args.archs.split(",") if a]
    size = args.size or (32 if q else 224)
    batches = _ints(args.batches or ("1,2" if q else "64,16,1"))
    repeats = args.repeats or (2 if q else 5)
    rise_n = args.rise_n or (50 if q else 4000)
    rise_chunks = _ints(args.rise_chunks or ("25" if q else "100,400"))
    ucag_size = args.ucag_size or size
    counts = _ints(args.pointing_images or ("2,4" if q else "64,512"))
    if len(counts) != 2 or not 0 < counts[0] < counts[1]:
        raise SystemExit(f"--pointing-images: two counts, small < large; got {args.pointing_images}")
    p_batch = args.pointing_batch or (2 if q else 64)
    p_methods = (args.pointing_methods or ("grad-cam" if q else "grad-cam,rsp")).split(",")
    workers = args.compile_workers or min(8, max(1, (os.cpu_count() or 2) // 2))
    names = rule_methods()
    if args.methods or q:
        wanted = args.methods.split(",") if args.methods else list(QUICK_METHODS)
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise SystemExit(f"not rule methods of the registry: {unknown}; available: {names}")
        names = wanted
    out = Path(args.out or ("results/bench_gpu_quick.json" if q else "experiments/results/bench_gpu.json"))

    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", str(args.compile_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    facts = machine()
    peaks = facts["peak_tflops"]
    if args.peak_tflops:
        peaks = {"given": float(args.peak_tflops)}
    payload: dict[str, Any] = {
        "what": "GPU benchmark (DESIGN.md section 6): RISE s/image, UCAG vmapped/loop, eval pointing images/s, "
                "rule methods / jitted gradient; random weights",
        "quick": q,
        "argv": argv,
        "settings": {
            "sections": sections, "archs": archs, "size": size, "batches": batches, "repeats": repeats, "rise_n": rise_n,
            "rise_chunks": rise_chunks, "ucag_size": ucag_size, "pointing_images": counts, "pointing_batch": p_batch,
            "pointing_methods": p_methods, "methods": names, "compile_workers": workers, "budget_s": args.budget_s,
            "compile_cache": args.compile_cache,
            "quick_models": QUICK_MODELS if q else None, "peak_tflops_used": peaks,
            "jax_disable_most_optimizations": _config("jax_disable_most_optimizations"),
        },
        "started_at": _utc(_STARTED),
        "ended_at": None,
        "wall_s": None,
        "stopped": None,
        "machine": facts,
        "peak_device_memory_bytes": None,
        "rise": [],
        "ucag": [],
        "pointing": [],
        "methods": [],
        "skipped": [],
        "_estimates": {},
    }
    rec = Recorder(out, payload, args.budget_s, args.grace_s, hard_stop)
    print(f"bench_gpu: {facts['device_kind']} ({facts['backend']}), budget {args.budget_s:.0f} s, "
          f"{rec.left():.0f} s left after start-up; writing {out}", flush=True)
    for section in sections:
        if section == "rise":
            for arch in archs:
                for chunk in rise_chunks:
                    bench_rise(rec, arch, size, rise_n, chunk, repeats, q, peaks)
        elif section == "ucag":
            for arch in archs:
                bench_ucag(rec, arch, ucag_size, repeats, q)
        elif section == "pointing":
            for method in p_methods:
                bench_pointing(rec, "synthetic_vgg16", method, (counts[0], counts[1]), p_batch)
        else:
            for batch in batches:
                for arch in archs:
                    bench_methods(rec, arch, batch, size, repeats, names, q, workers)
    del payload["_estimates"]
    rec.finish()
    print(payload["markdown"])
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
