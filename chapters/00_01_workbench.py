# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# (workbench)=
# # Appendix A: The workbench
#
# ```{admonition} At a glance
# :class: tip
# **Prerequisites:** Python, PyTorch tensors and modules. **Reading time:** ~10 min.
# **You will build** `ftbook.workbench`: the profile switch that lets every chapter run in seconds,
# on a laptop CPU or on a GPU; seeding; device choice; where files live; a figure and table helper;
# a timer and a peak-memory meter; the measured matmul peak of this machine; the model-FLOPs
# counter with which later chapters report utilization; and the meter that keeps a training
# loop's books.
# ```
#
# Every chapter of this book is a program. It trains models, measures them and draws what it
# measured, and the prose interprets the numbers that the run just produced. That only works if
# the same code runs in three very different settings, so this appendix builds the small amount of
# machinery all chapters share. Nothing here is about fine-tuning yet; it is the bench we work at.

# %% [markdown]
# ## Profiles
#
# A chapter has one frozen configuration per **profile**:
#
# | profile | runs on | models and data | used for |
# |---|---|---|---|
# | `smoke` | any CPU, seconds | randomly initialised tiny models, a few dozen rows | the tests |
# | `tiny` | a 2-core CPU (a GPU if present) | real small models, real data subsets | the default build |
# | `full` | one GPU | hub models, full datasets | the published results |
#
# The profile comes from `--profile` on the command line, else from the environment variable
# `FTBOOK_PROFILE`, else it is `tiny`. Inside a Jupyter kernel the command line belongs to the
# kernel, so it is ignored there. The code path is the same in all three profiles; only the
# configuration differs, which is what makes the smoke tests meaningful for the real runs.

# %%
#| export
"""The workbench: profiles, seeding, device, paths, figures, timing, memory and FLOPs.

Defined in Appendix A (`chapters/00_01_workbench.py`). Every chapter imports from here.
"""
import argparse
import gc
import importlib.metadata
import math
import os
import platform
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

PROFILES = ("smoke", "tiny", "full")
DEFAULT_PROFILE = "tiny"


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where `sys.argv` belongs to the kernel, not the chapter)."""
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def get_profile(argv: list[str] | None = None) -> str:
    """The active profile: `--profile` in `argv`, else `$FTBOOK_PROFILE`, else `tiny`.

    `argv` defaults to the command line when run as a script and to `[]` inside a kernel.
    Unknown arguments are ignored so that a chapter can be run under other launchers.
    """
    if argv is None:
        argv = [] if in_notebook() else sys.argv[1:]
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--profile", default=None)
    args, _ = parser.parse_known_args(argv)
    if args.profile is not None:
        profile, source = args.profile, "--profile"
    else:
        profile = os.environ.get("FTBOOK_PROFILE", DEFAULT_PROFILE)
        source = "FTBOOK_PROFILE"
    if profile not in PROFILES:
        raise ValueError(
            f"{source}={profile!r} is not a profile; choose one of {', '.join(PROFILES)}"
        )
    return profile


def rehearsing() -> bool:
    """True when `$FTBOOK_REHEARSE` is "1": a rehearsal of the `full` profile on a CPU, the same
    code path with random stand-in models on shrunk configurations (`ftbook.base_models`) and
    the smoke profile's sizes (`pick`), so that a full-profile breakage shows without a GPU."""
    return os.environ.get("FTBOOK_REHEARSE", "0") == "1"


def rehearsal_config(full: Any, smoke: Any) -> Any:
    """`full` with the sizes of `smoke`, field by field (nested dataclasses too): counts, steps,
    lengths and lists (seeds, betas) come from `smoke`; everything that chooses a code path
    stays `full`'s: booleans, strings, floats (learning rates, temperatures), and a None that
    means "all" or "every weight" unless the field is a count (`n_...`)."""
    import dataclasses

    if not dataclasses.is_dataclass(full):
        return smoke
    changes = {}
    for field in dataclasses.fields(full):
        f, s = getattr(full, field.name), getattr(smoke, field.name)
        if dataclasses.is_dataclass(f):
            changes[field.name] = rehearsal_config(f, s)
        elif isinstance(f, bool) or isinstance(f, (float, str)):
            continue
        elif f is None:
            if (field.name.startswith("n_") or "_n_" in field.name) and s is not None:
                changes[field.name] = s
        elif isinstance(f, (int, tuple, list)) and isinstance(s, type(f)):
            changes[field.name] = s
    return dataclasses.replace(full, **changes)


def pick(profile: str, configs: Mapping[str, Any]) -> Any:
    """The chapter's configuration for `profile`, with an error that lists what exists; in a
    rehearsal of `full` (`rehearsing`), the full configuration with the smoke sizes."""
    if profile not in configs:
        raise KeyError(f"no configuration for profile {profile!r}; defined: {sorted(configs)}")
    if profile == "full" and rehearsing() and "smoke" in configs:
        return rehearsal_config(configs["full"], configs["smoke"])
    return configs[profile]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices) so that a rerun repeats its numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def get_device() -> torch.device:
    """CUDA when present, else CPU; `$FTBOOK_DEVICE` overrides (e.g. `cpu` on a GPU machine)."""
    name = os.environ.get("FTBOOK_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# %% [markdown]
# ## Where things live
#
# A chapter never relies on `__file__` (a kernel has none) or on the working directory (Jupyter
# Book runs each chapter from its own folder). It walks up to the folder that holds `_config.yml`,
# the book's root. Data comes from `FTBOOK_DATA`, a folder laid out like the repository's
# `../shared/data`; caches (the book's pretrained base model, tokenizers, trained adapters) live
# under `.cache/` at the root, or `FTBOOK_CACHE`; figures and tables a script writes go to
# `outputs/<chapter>/`.

# %%
#| export
class DataDirError(FileNotFoundError):
    """The data folder is not configured or does not exist; the message says how to fix it."""


def _walk_up_to_config(start: Path) -> Path | None:
    for folder in [start, *start.parents]:
        if (folder / "_config.yml").is_file():
            return folder
    return None


def repo_root() -> Path:
    """The book's root: `$FTBOOK_ROOT`, else the first folder above the working directory that
    holds `_config.yml`, else the one above the installed package (an editable install)."""
    env = os.environ.get("FTBOOK_ROOT")
    if env:
        return Path(env).resolve()
    starts = [Path.cwd().resolve()]
    module_file = globals().get("__file__")  # absent when this cell runs inside a kernel
    if module_file:
        starts.append(Path(module_file).resolve().parent)
    for start in starts:
        found = _walk_up_to_config(start)
        if found is not None:
            return found
    raise FileNotFoundError(
        "cannot find the book's root (a folder holding _config.yml) above "
        f"{Path.cwd()}; run from inside the repository or set FTBOOK_ROOT"
    )


def data_dir() -> Path:
    """The local data folder: `$FTBOOK_DATA`, else `<root>/data`, else `<root>/../shared/data`."""
    env = os.environ.get("FTBOOK_DATA")
    if env:
        path = Path(env).expanduser().resolve()
        if not path.is_dir():
            raise DataDirError(
                f"FTBOOK_DATA={env!r} is not a folder. Point it at a folder laid out like "
                "shared/data (see its README.md), e.g. `export FTBOOK_DATA=../shared/data`, "
                "or unset it to use the hub when online."
            )
        return path
    root = repo_root()
    for candidate in (root / "data", root.parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    raise DataDirError(
        "no local data folder: FTBOOK_DATA is not set and neither <root>/data nor "
        "<root>/../shared/data exists. Set FTBOOK_DATA to a folder laid out like shared/data "
        "(see its README.md), or go online to use the hub loaders."
    )


def cache_dir(*parts: str) -> Path:
    """A folder under the book's cache (`$FTBOOK_CACHE` or `<root>/.cache`), created if needed;
    a rehearsal (`rehearsing`) keeps its own, so that its stand-ins never pass for full results."""
    env = os.environ.get("FTBOOK_CACHE")
    base = Path(env) if env else repo_root() / ".cache"
    if rehearsing():
        base = base / "rehearsal"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def outputs_dir(chapter: str) -> Path:
    """`<root>/outputs/<chapter>/`, created if needed: where figures and tables are written
    (`<root>/outputs/rehearsal/<chapter>/` in a rehearsal)."""
    path = repo_root() / "outputs" / ("rehearsal" if rehearsing() else "") / chapter
    path.mkdir(parents=True, exist_ok=True)
    return path


# %% [markdown]
# ## Figures, tables and progress
#
# In the kernel a figure is shown inline; as a script it is written as a PNG. Both paths also
# save the PNG, so a reader who runs `python chapters/13_02_lora.py` finds every figure of the
# chapter under `outputs/13_02_lora/`. Tables are pandas data frames, shown as HTML in the book
# and as text in a terminal, and saved as CSV beside the figures.

# %%
#| export
def show_figure(fig: Any, name: str, chapter: str) -> Path:
    """Save `fig` as `outputs/<chapter>/<name>.png`; show it inline in a kernel; close it."""
    import matplotlib.pyplot as plt

    path = outputs_dir(chapter) / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    if in_notebook():
        from IPython.display import display

        display(fig)
    else:
        print(f"[figure] {path}")
    plt.close(fig)
    return path


def show_table(df: Any, name: str, chapter: str, floatfmt: str = "{:.4g}") -> Path:
    """Save a pandas DataFrame as CSV under `outputs/<chapter>/`, and display or print it."""
    path = outputs_dir(chapter) / f"{name}.csv"
    df.to_csv(path, index=True)
    if in_notebook():
        from IPython.display import display

        # escaped: a cell such as "<|im_end|>" must show, not vanish as an HTML tag
        display(df.style.format(escape="html").format(
            floatfmt, subset=df.select_dtypes("float").columns, escape="html"))
    else:
        with_floats = df.copy()
        for col in with_floats.select_dtypes("float").columns:
            with_floats[col] = with_floats[col].map(floatfmt.format)
        print(with_floats.to_string())
    return path


def progress(iterable: Iterable | None = None, **kwargs: Any) -> Any:
    """A text progress bar (tqdm) for long loops; `$FTBOOK_NO_PROGRESS=1` silences it."""
    from tqdm import tqdm

    kwargs.setdefault("disable", os.environ.get("FTBOOK_NO_PROGRESS") == "1")
    kwargs.setdefault("mininterval", 2.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def check_finite(value: float | torch.Tensor, what: str, step: int) -> float:
    """Return `value` as a float; raise a clear error if it is NaN or infinite."""
    number = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(number):
        raise FloatingPointError(
            f"{what} became {number} at step {step}; lower the learning rate, check the data "
            "for empty targets, or enable gradient clipping"
        )
    return number


# %% [markdown]
# ## Time and memory
#
# Wall time on a GPU needs a synchronisation before the clock is read, since kernels run
# asynchronously. Peak memory is `torch.cuda.max_memory_allocated` on a GPU. A CPU has no such
# counter, so the meter samples the process's resident set size (RSS) from a background thread
# every millisecond or two and reports the peak above the level at entry. Before it starts, it
# hands memory that earlier code freed back to the operating system (`malloc_trim`), otherwise a
# block could reuse pages that an earlier run left cached and appear to need less memory than it
# does. RSS sees everything the process holds, so measure one thing per block.

# %%
#| export
def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall-clock time of a block, synchronising CUDA before and after: `with Timer() as t: ...`."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.seconds = float("nan")

    def __enter__(self) -> "Timer":
        _sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync(self.device)
        self.seconds = time.perf_counter() - self._start


def median_forward_seconds(models: dict[str, torch.nn.Module], batch: dict[str, torch.Tensor],
                           repeats: int) -> dict[str, float]:
    """Median forward time of each model on `batch`, measured round-robin so that every model
    sees the same machine state (the first model timed on a CPU otherwise pays for cold caches)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model.eval()(**batch)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                with Timer(next(model.parameters()).device) as timer:
                    model(**batch)
                times[name].append(timer.seconds)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def process_rss_bytes() -> int:
    """Resident set size of this process, from `/proc/self/statm` (Linux), else `ru_maxrss`."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_freed_memory() -> None:
    """Return memory that Python and PyTorch freed to the OS (glibc `malloc_trim`), so that the
    RSS at the start of a measurement is not inflated by an earlier run's cached pages."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


class PeakMemory:
    """Peak memory used by a block, in bytes above the level at entry (`.peak_bytes`).

    On CUDA: `torch.cuda.max_memory_allocated`. On CPU: the process RSS sampled every
    `interval` seconds by a background thread (see the text for what RSS includes).
    """

    def __init__(self, device: torch.device | None = None, interval: float = 0.001) -> None:
        self.device = device if device is not None else torch.device("cpu")
        self.interval = interval
        self.peak_bytes = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        gc.collect()
        release_freed_memory()
        self._base = process_rss_bytes()
        self._peak = self._base
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, process_rss_bytes())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, process_rss_bytes())
        self.peak_bytes = self._peak - self._base


# %% [markdown]
# A quick check of both meters: allocating a 64 MiB tensor should raise the peak by about
# 64 MiB, and a 50 ms sleep should take about 50 ms.

# %%
with Timer() as timer:
    time.sleep(0.05)
with PeakMemory() as meter:
    block = torch.ones(16 * 1024 * 1024)  # (16M,) float32 = 64 MiB, touched so it is resident
    time.sleep(0.02)
del block
print(f"sleep(0.05): {timer.seconds * 1e3:.1f} ms; 64 MiB tensor: peak +{meter.peak_bytes / 2**20:.1f} MiB")
# Guarantees, not measurements: `time.sleep` never returns early, and the 64 MiB are resident
# when the meter takes its last sample. The upper bounds are loose on purpose: a loaded machine
# may wake the sleeper late, and they are there only to catch a unit or reference-point bug.
assert 0.045 < timer.seconds < 5
assert 60 * 2**20 < meter.peak_bytes < 200 * 2**20

# %% [markdown]
# ## Counting model FLOPs
#
# Utilization compares the arithmetic a training step *must* do with what the hardware can do.
# For a transformer almost all of that arithmetic is matrix multiplication. A linear layer
# $y = xW^\top$ with $W \in \mathbb{R}^{d_\text{out} \times d_\text{in}}$ costs one multiply and
# one add per weight per token, so the forward pass over $T$ tokens costs
#
# $$
# C^\text{lin}_\text{fwd} = 2\,T\,N_\text{lin}, \qquad N_\text{lin} = \textstyle\sum_{\text{linear}} d_\text{out} d_\text{in},
# \tag{A.1}
# $$
#
# where $N_\text{lin}$ counts every weight that enters a matmul (all projections and the output
# head; not the embedding lookup, not norms or biases). Attention adds two matmuls per layer that
# have no weights: the scores $QK^\top$ and the mix $\operatorname{softmax}(\cdot)V$. For a sequence
# of length $T$ and attention width $d_\text{attn}$ each costs $2T^2 d_\text{attn}$, so per layer
#
# $$
# C^\text{attn}_\text{fwd} = 4\,T^2\,d_\text{attn}.
# \tag{A.2}
# $$
#
# The backward pass multiplies each matmul twice more (the gradient with respect to the input and
# the gradient with respect to the weight), hence the familiar training cost (Kaplan et al. 2020,
# §2.1; Hoffmann et al. 2022, App. F)
#
# $$
# C_\text{train} = 3\,(C^\text{lin}_\text{fwd} + L\,C^\text{attn}_\text{fwd}) \approx 6\,N\,T
# \quad\text{for } T \ll 6N/(4 L d_\text{attn}) .
# \tag{A.3}
# $$
#
# Two caveats matter later. A frozen weight (feature extraction, LoRA's base) needs no weight
# gradient, so it costs $4$ rather than $6$ FLOPs per token; and a causal kernel that skips masked
# blocks does about half the attention work of (A.2). We count the dense work in (A.2), which is
# what PyTorch's own FLOP counter reports.

# %%
#| export
def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters, each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def linear_weight_count(model: torch.nn.Module) -> int:
    """N_lin of eq. (A.1): weights of every `nn.Linear` (and HF `Conv1D`), tied ones once."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
        if is_linear and weight is not None and id(weight) not in seen:
            seen.add(id(weight))
            total += weight.numel()
    return total


def transformer_flops(model: torch.nn.Module, batch: int, seq_len: int, training: bool = True,
                      n_layers: int | None = None, d_attn: int | None = None) -> float:
    """Model FLOPs of one forward (or forward+backward) pass, eqs. (A.1)-(A.3).

    `n_layers` and `d_attn` default to the model's `config` (`num_hidden_layers`, and
    `num_attention_heads * head_dim`, with `head_dim = hidden_size / num_attention_heads`
    unless the config sets it).
    """
    config = getattr(model, "config", None)
    if n_layers is None:
        n_layers = config.num_hidden_layers
    if d_attn is None:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        d_attn = heads * head_dim
    tokens = batch * seq_len
    forward = 2 * tokens * linear_weight_count(model) + n_layers * batch * 4 * seq_len**2 * d_attn
    return 3.0 * forward if training else float(forward)


def measured_flops(fn: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs that PyTorch's `FlopCounterMode` counts while running `fn(*args, **kwargs)`."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


# %% [markdown]
# **Check of (A.1)–(A.3).** We count the FLOPs of one training step of a small random Llama with
# PyTorch's `FlopCounterMode`, which intercepts every matmul at the operator level, and compare
# them with the formula. Training is counted as forward plus backward of a scalar loss. The
# attention is computed by the "eager" implementation so that every matmul is visible to the
# counter.

# %%
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

torch.manual_seed(0)
check_config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                           max_position_embeddings=128, attn_implementation="eager")
check_model = LlamaForCausalLM(check_config)
check_ids = torch.randint(0, 512, (3, 40))  # (batch, seq)


def check_train_step() -> None:
    check_model(input_ids=check_ids, labels=check_ids).loss.backward()


counted = measured_flops(check_train_step)
predicted = transformer_flops(check_model, batch=3, seq_len=40, training=True)
print(f"FlopCounterMode: {counted:,}   formula (A.3): {predicted:,.0f}   ratio {counted / predicted:.4f}")
rotary = 2 * (check_config.hidden_size // check_config.num_attention_heads // 2) * 40
print(f"difference {counted - predicted:,.0f} FLOPs = rotary frequencies x positions ({rotary})")
assert counted - predicted == rotary


# %% [markdown]
# The two agree to a few parts in a million. The difference is the one weightless matmul that
# (A.1)–(A.2) leave out: the rotary embedding multiplies its $d_\text{head}/2$ frequencies by the
# $T$ positions once per forward pass ($2 \cdot \tfrac{d_\text{head}}{2} \cdot T$ FLOPs, no
# gradient). Norms, softmax and activations are elementwise and excluded by both counts. With the
# model's FLOPs known, utilization is
#
# $$
# \text{MFU} = \frac{C_\text{train}\ /\ \text{step time}}{\text{peak FLOP/s of the device}} .
# \tag{A.4}
# $$
#
# ## The peak of this machine
#
# Vendors publish peak FLOP/s for GPUs; for a CPU the honest reference is the fastest large matmul
# we can measure. Below we time square matmuls in float32 and bfloat16. On recent Intel Xeons
# with AMX tiles (`amx_bf16` in `/proc/cpuinfo`), oneDNN runs bfloat16 matmuls on the tile unit,
# several times faster than float32; this is why the book's CPU training uses bfloat16 autocast.

# %%
#| export
def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048,
                        device: torch.device | None = None, repeats: int = 5) -> float:
    """The best of `repeats` timed `n x n @ n x n` matmuls, in FLOP/s (2 n^3 per matmul)."""
    device = device if device is not None else get_device()
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up: first call picks kernels and allocates
    best = float("inf")
    for _ in range(repeats):
        with Timer(device) as t:
            a @ b
        best = min(best, t.seconds)
    return 2 * n**3 / best


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True)
class RunInfo:
    """What the device cell reports: where and how a chapter runs."""

    device: str
    profile: str
    seed: int
    threads: int
    versions: dict[str, str]


def quiet_libraries() -> None:
    """Silence transformers' per-load reports and info logs (warnings and errors still show)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def device_cell(profile: str, seed: int, device: torch.device | None = None) -> RunInfo:
    """Print the device, profile, seed and library versions at the top of a chapter, and quiet
    the libraries' load reports (`quiet_libraries`)."""
    quiet_libraries()
    device = device if device is not None else get_device()
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
    else:
        where = f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)"
    packages = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets")
    info = RunInfo(where, profile, seed, torch.get_num_threads(),
                   {p: _version(p) for p in packages})
    print(f"device  : {info.device}\nprofile : {profile}\nseed    : {seed}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info.versions.items()))
    return info


# %% [markdown]
# ## A training loop's bookkeeping
#
# Every training loop of the book keeps the same books around its algorithm: a progress bar, the
# wall time of each step and of the whole run, the model FLOPs of the passes it makes (A.1–A.3),
# one log row per step, a check that the loss is still a number, and an optional callback that
# adds an evaluation to the row. `StepMeter` keeps all of them, so that a loop body reads as the
# algorithm's numbered steps, as in CleanRL's single-file PPO (Huang et al. 2022), with the
# bookkeeping in three places: `for step in meter.steps(n)` starts each step's clock,
# `meter.flops += transformer_flops(...)` counts a pass where it is made, and
# `meter.record(step, row, model)` ends the step: it stamps the step's seconds into the row,
# checks its loss, adds the callback's entries and appends it to `meter.history`. The meter
# only reads the clock and adds numbers the loop hands it: the algorithm's arithmetic and random
# draws are the same with it as without it.

# %%
#| export
class StepMeter:
    """The bookkeeping of a training loop (Appendix A, "A training loop's bookkeeping"): its
    steps behind a progress bar (`steps`), the wall time of each step (`row["seconds"]`, unless
    `step_seconds` is False) and of the run (`seconds`), the model FLOPs the loop adds to
    `flops` (eqs. A.1-A.3), and one row per step in `history` (`record`), whose `loss_key`
    entry must be finite (`check_finite`; None: not checked) and to which
    `callback(step + 1, model)` adds its entries."""

    def __init__(self, desc: str, callback: Callable[[int, Any], dict] | None = None, *,
                 loss_key: str | None = "loss", step_seconds: bool = True) -> None:
        self.desc, self.callback = desc, callback
        self.loss_key, self.step_seconds = loss_key, step_seconds
        self.history: list[dict] = []
        self.flops = 0.0
        self._start = self._step_start = time.perf_counter()

    def steps(self, n: int, bar: bool = True) -> Iterator[int]:
        """0, 1, ..., n - 1, behind a progress bar unless `bar` is False; each step's clock starts
        when it is handed out."""
        for step in progress(range(n), desc=self.desc) if bar else range(n):
            self._step_start = time.perf_counter()
            yield step

    def record(self, step: int, row: dict, model: Any = None) -> dict:
        """End step `step` (0-based): put its wall time in `row` as "seconds", check the loss,
        add `callback(step + 1, model)`'s entries, append the row to `history`, return it."""
        if self.step_seconds:
            row["seconds"] = time.perf_counter() - self._step_start
        if self.loss_key is not None:
            check_finite(row[self.loss_key], f"{self.desc} {self.loss_key}", step)
        if self.callback is not None:
            row.update(self.callback(step + 1, model))
        self.history.append(row)
        return row

    @property
    def seconds(self) -> float:
        """Wall time since the meter was made."""
        return time.perf_counter() - self._start

    def column(self, key: str) -> list:
        """`row[key]` of every recorded row, in step order."""
        return [row[key] for row in self.history]


# %% [markdown]
# A quick check on a loop without a model: three steps of 10 ms each, a pass of 1000 FLOPs per
# step, a callback that adds the step number; then a loss that turns into NaN at the third step,
# which stops the loop with an error that names the step.

# %%
toy_meter = StepMeter("toy", callback=lambda k, model: {"callback_step": k})
for step in toy_meter.steps(3, bar=False):
    time.sleep(0.01)
    toy_meter.flops += 1000.0
    toy_meter.record(step, {"step": step + 1, "loss": 1.0 / (step + 1)})
print(f"rows: {[{k: v for k, v in row.items() if k != 'seconds'} for row in toy_meter.history]}")
print(f"FLOPs {toy_meter.flops:.0f}; losses {toy_meter.column('loss')}")
assert toy_meter.flops == 3000.0 and toy_meter.column("callback_step") == [1, 2, 3]
assert all(s >= 0.01 for s in toy_meter.column("seconds"))  # sleep never returns early
assert toy_meter.seconds >= sum(toy_meter.column("seconds"))
nan_meter = StepMeter("toy")
try:
    for step in nan_meter.steps(5, bar=False):
        nan_meter.record(step, {"loss": float("nan") if step == 2 else 0.5})
except FloatingPointError as error:
    print(f"FloatingPointError: {error}")
assert len(nan_meter.history) == 2

# %% [markdown]
# ## Tolerances from the arithmetic
#
# The book's checks compare two computations of the same quantity: a from-scratch
# implementation against a library, a derivation against autograd, one process against two.
# Their difference is rounding, and its size depends on the order in which a machine adds
# numbers: BLAS kernels block and vectorise sums differently on Intel with AMX, AMD without
# it, one thread or two. A tolerance read off one machine's output can fail on the next.
# What holds on every machine is the classical bound for a floating-point sum
# (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §4.2 and Lemma 3.1):
# for $n$ terms $x_i$ added in **any** order,
#
# $$
# \Bigl|\operatorname{fl}\Bigl(\sum_{i=1}^n x_i\Bigr) - \sum_{i=1}^n x_i\Bigr|
# \le \gamma_{n-1} \sum_{i=1}^n |x_i|,
# \qquad \gamma_n = \frac{n u}{1 - n u},
# \tag{A.5}
# $$
#
# with $u$ the unit roundoff ($2^{-24}$ in float32, $2^{-53}$ in float64, $2^{-8}$ in
# bfloat16). A dot product of length $n$ obeys the same bound with $\gamma_n$ and the terms
# $x_i y_i$. Two implementations that each satisfy (A.5) differ by at most twice the bound.
# The bound is pessimistic (typical errors grow like $\sqrt{n}\,u$), which is what a check
# that must pass on every machine wants: a real bug is orders of magnitude above it.
# Where a chain of layers makes a bound unwieldy, the book compares the two computations in
# float64 instead, where rounding is $10^{9}$ times smaller than any discrepancy that matters.
# That works for the book's own code and for PEFT's layers, but not for a whole transformers
# model: its Llama and Qwen2 code computes RMSNorm, the eager softmax and the rotary angles in
# float32 even in a float64 model, so float64 buys nothing there. Those comparisons use a bound
# built from (A.5) layer by layer (`transformer_tolerance`, {ref}`instruction-tuning`).

# %%
#| export
def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    """Unit roundoff u = eps / 2 of a floating-point type (2^-24 for float32)."""
    return torch.finfo(dtype).eps / 2


def rounding_bound(n_terms: int, abs_sum: float, dtype: torch.dtype = torch.float32) -> float:
    """Higham's bound (A.5) on the rounding error of a sum of `n_terms` terms whose absolute
    values add up to `abs_sum`, for any summation order: gamma_{n-1} * abs_sum (Appendix A,
    "Tolerances from the arithmetic"). For a dot product pass n_terms = n + 1."""
    nu = max(n_terms - 1, 1) * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"rounding_bound: n_terms={n_terms} is too large for {dtype}")
    return nu / (1 - nu) * abs_sum


# %% [markdown]
# A check of (A.5): a float32 sum of $10^5$ numbers in three orders (forward, reversed,
# PyTorch's own blocked reduction) against the exact sum in float64. Each error is far below
# the bound, which is the point: the bound is a theorem, not a measurement.

# %%
x = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 10  # (n,) float32
exact = x.double().sum().item()
bound = rounding_bound(x.numel(), x.abs().double().sum().item())
forward = torch.cumsum(x, 0)[-1].item()
reverse = torch.cumsum(x.flip(0), 0)[-1].item()
blocked = x.sum().item()
for name, value in [("forward", forward), ("reversed", reverse), ("torch.sum", blocked)]:
    print(f"{name:9s}: error {abs(value - exact):.3e}   bound (A.5) {bound:.3e}")
    assert abs(value - exact) <= bound

# %% [markdown]
# ## Measurements and their uncertainty
#
# An experiment's number is a measurement: an accuracy on $n$ held-out examples, a mean over
# seeds. The book reports it with an interval and lets the prose claim only what holds beyond
# it (a single-seed outcome is never asserted). Two intervals cover almost every case. For a
# proportion $\hat p = k/n$, the Wilson score interval (Wilson 1927; Brown, Cai & DasGupta
# 2001, *Statist. Sci.* 16(2)) at normal quantile $z$,
#
# $$
# \frac{\hat p + \frac{z^2}{2n} \pm z \sqrt{\frac{\hat p (1-\hat p)}{n} + \frac{z^2}{4n^2}}}
# {1 + \frac{z^2}{n}},
# \tag{A.6}
# $$
#
# which stays inside $[0, 1]$ and behaves at $\hat p = 0$ or $1$, where the textbook
# $\hat p \pm z\sqrt{\hat p(1-\hat p)/n}$ collapses to a point. For a mean of $m$ values
# (seeds, prompts), the mean $\pm\, t_{m-1}\, s/\sqrt m$ with $s$ the sample standard
# deviation and $t_{m-1}$ Student's quantile.

# %%
#| export
def binomial_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (A.6) for a proportion k/n (Appendix A, "Measurements and their
    uncertainty")."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"binomial_interval: need 0 <= k <= n and n > 0, got k={k}, n={n}")
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + level / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean of `values` and the half-width of its Student-t interval (nan for one value)."""
    from scipy.stats import t as student_t

    m = len(values)
    if m == 0:
        raise ValueError("mean_interval: no values")
    mean = sum(values) / m
    if m == 1:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (m - 1))
    return mean, float(student_t.ppf(0.5 + level / 2, m - 1)) * sd / math.sqrt(m)


# %% [markdown]
# A check of both against their definitions: Wilson's interval for 0/20 starts at 0 and is not
# a point; its exact coverage at $n = 50$, $p = 0.3$ (the binomial probability of every $k$
# whose interval contains $p$, summed: a computation, not a simulation) is close to the 95% it
# promises; and the $t$ interval of the two values $\{0, 2\}$ is $1 \pm 12.706 \cdot s/\sqrt 2$
# with $s = \sqrt 2$.

# %%
low, high = binomial_interval(0, 20)
print(f"0/20: [{low:.3f}, {high:.3f}]")
assert low == 0.0 and high > 0.1
pmf = torch.distributions.Binomial(50, torch.tensor(0.3, dtype=torch.float64)).log_prob(
    torch.arange(51, dtype=torch.float64)).exp()  # (51,)
coverage = sum(pmf[k].item() for k in range(51)
               if binomial_interval(k, 50)[0] <= 0.3 <= binomial_interval(k, 50)[1])
print(f"exact coverage of Wilson 95% at n = 50, p = 0.3: {coverage:.4f}")
assert abs(coverage - 0.95) < 0.02
mean, half = mean_interval([0.0, 2.0])
print(f"mean_interval([0, 2]) = {mean} ± {half:.3f}")
assert mean == 1.0 and abs(half - 12.706) < 1e-3

# %% [markdown]
# ## The device cell
#
# Every chapter begins with a cell like the one below: it reads the profile, seeds everything and
# prints where it runs, so a reader comparing numbers knows what produced them.

# %%
PROFILE = get_profile()
SEED = 0
seed_everything(SEED)
DEVICE = get_device()
RUN_INFO = device_cell(PROFILE, SEED, DEVICE)

# %% [markdown]
# Now the matmul peak of this machine, for the two dtypes. The smoke profile uses a small matrix
# so the tests stay fast; the number it gives is not a peak.

# %%
import pandas as pd  # noqa: E402

matmul_n = pick(PROFILE, {"smoke": 256, "tiny": 2048, "full": 8192})
peaks = pd.DataFrame(
    {"TFLOP/s": [measure_matmul_peak(dt, n=matmul_n, device=DEVICE) / 1e12
                 for dt in (torch.float32, torch.bfloat16)]},
    index=["float32", "bfloat16"],
)
peaks["vs float32"] = peaks["TFLOP/s"] / peaks.loc["float32", "TFLOP/s"]
show_table(peaks, "matmul_peak", "00_01_workbench")

# %% [markdown]
# The table is this run's measurement: on a CPU with AMX the bfloat16 row is several times the
# float32 row, and chapters that report utilization divide by the peak of the dtype they train in.
# A model's step rarely comes close to this peak: small matrices, elementwise work (norms,
# activations, softmax) and the optimizer all run far below it, which is why the book reports
# MFU rather than assuming it.
#
# ## Pitfalls
#
# - **Profiles are read once.** A chapter reads its profile at the top; changing
#   `FTBOOK_PROFILE` in a running kernel does nothing until the kernel restarts.
# - **CPU memory is process-wide.** The RSS meter sees everything the process holds; measure one
#   thing per block and compare differences, not absolute values.
# - **Cached builds.** Jupyter's cache keys on code cells only, so the book build forces
#   execution (see {doc}`../book/setup`).
#
# ## Summary
#
# - `get_profile`, `pick` and a frozen config per profile let one code path serve tests (`smoke`),
#   CPU readers (`tiny`) and the published GPU build (`full`).
# - `repo_root`, `data_dir` and `cache_dir` find the book, its data and its caches without relying
#   on the working directory.
# - `Timer`, `PeakMemory`, `transformer_flops` and `measure_matmul_peak` turn "fast" and "small"
#   into numbers; (A.3) matches PyTorch's operator-level count exactly.
# - `StepMeter` keeps a training loop's books (progress, step and run time, FLOPs, log rows,
#   the finite-loss check, the callback), so the loop body shows only the algorithm.
# - `rounding_bound` turns (A.5) into the tolerance of a check that must hold on every machine,
#   whatever order its BLAS adds in; `binomial_interval` (A.6) and `mean_interval` give every
#   measured number its uncertainty.
#
# ## Exercises
#
# 1. Extend `transformer_flops` with a `frozen_fraction` argument that charges 4 instead of 6 FLOPs
#    per token to frozen weights, and check it with `measured_flops` on a model whose first layer
#    has `requires_grad=False`.
# 2. Measure `measure_matmul_peak` for `n` = 256, 512, …, 4096 and plot it. Where does the CPU
#    reach its plateau, and what does that say about the hidden size of the book's base model?
# 3. Switch `attn_implementation` to `"sdpa"` in the check above. Does `FlopCounterMode` still see
#    the attention matmuls?
# 4. Plot the error of the float32 sum against $n$ for $n = 10^2, \dots, 10^7$ next to the bound
#    (A.5) and next to $\sqrt{n}\,u \sum_i |x_i|$. Which one predicts the typical error, and
#    why must a portable check still use the first?
#
# ## References
#
# - Kaplan et al. (2020), *Scaling Laws for Neural Language Models*, arXiv:2001.08361, §2.1.
# - Hoffmann et al. (2022), *Training Compute-Optimal Large Language Models*, arXiv:2203.15556,
#   Appendix F.
# - Chowdhery et al. (2022), *PaLM*, arXiv:2204.02311, Appendix B (model FLOPs utilization).
# - Huang et al. (2022), *CleanRL: High-quality Single-file Implementations of Deep
#   Reinforcement Learning Algorithms*, JMLR 23(274), arXiv:2111.08819.
