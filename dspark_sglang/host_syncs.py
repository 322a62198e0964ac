"""Count the host synchronizations a piece of code would make on a GPU, on any device.

A GPU stream runs ahead of the host until the host needs a value from it: `.item()`, `.tolist()`,
`bool(t)`, a copy to the host, or an op whose output size depends on the data (boolean-mask
indexing, `nonzero`, `repeat_interleave` without `output_size`). Each one stalls the host until the
queued kernels finish. `HostSyncCounter` sees those calls through a `TorchFunctionMode`, so it counts
the same calls on the CPU engine, where no test can observe a real GPU stall.

Which tensors live on the device: on a CPU every tensor is a CPU tensor, so the counter tracks
"host-ness" itself, the way the code would place tensors on a GPU:
- host: the result of `.cpu()`, `.to("cpu")` (the literal string: `.to(t.device)` follows `t`),
  `.numpy()`; a factory call without `device=`
  (`torch.tensor(list)`); an op whose tensor inputs are all host; anything passed to `mark_host`
  (e.g. SGLang's `seq_lens_cpu`);
- device: everything else (a factory with `device=`, an op with a device input, unknown tensors).
On a CUDA machine a tensor's own device decides instead.

Each sync is attributed to the innermost stack frame outside torch and this module, so a report
names the line that made it (`where`), and `ours` (the frame's module is dspark_sglang.*) separates
this package's syncs from SGLang's.
"""

from __future__ import annotations

import os
import sys
from collections import Counter, deque
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

ENV = "DSPARK_COUNT_HOST_SYNCS"
_HOST_ATTR = "_dspark_host"
_THIS_FILE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
# Methods that read a tensor's values on the host.
_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"}
# Ops whose output shape depends on the data (a GPU reports the size back to the host).
_DATA_SHAPED = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"}


@dataclass(frozen=True)
class SyncEvent:
    kind: str  # e.g. "tolist", "bool-mask index", "to(cpu)"
    where: str  # "path/to/file.py:123 function"
    ours: bool  # made by dspark_sglang code (not SGLang's or torch's)


def _is_to_cpu(name: str, args, kwargs) -> bool:
    """`.to("cpu", ...)` / `.to(device="cpu")`. Only the literal "cpu" names the host: `.to(t.device)`
    follows another tensor, which on a GPU server is a device tensor (on the CPU engine its
    torch.device is "cpu" too)."""
    return name == "to" and (any(isinstance(a, str) and a == "cpu" for a in args[1:]) or kwargs.get("device") == "cpu")


def _tensors(args, kwargs):
    for a in list(args) + list((kwargs or {}).values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, torch.Tensor))


class HostSyncCounter(TorchFunctionMode):
    """`with HostSyncCounter() as c: ...`, then `c.events`, `c.count(ours=True)`, `c.by_site()`.

    `exclude`: "file.py" or "file.py:function" entries; a sync with such a frame anywhere on its
    stack is not counted (a benchmark's own baseline step inside the counted region, or code that
    only runs on a CPU)."""

    def __init__(self, exclude: tuple[str, ...] = ()):
        super().__init__()
        self.events: list[SyncEvent] = []
        self.exclude = exclude

    # ---- host-ness ----------------------------------------------------------------------------

    @staticmethod
    def mark_host(*tensors: torch.Tensor | None) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                setattr(t, _HOST_ATTR, True)

    @staticmethod
    def is_host(t: torch.Tensor) -> bool:
        if t.device.type != "cpu":
            return False
        return bool(getattr(t, _HOST_ATTR, False)) or not _cpu_means_device()

    # ---- the mode -----------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = list(_tensors(args, kwargs))
        kind = self._sync_kind(name, args, kwargs, inputs)
        if kind is not None:
            self._record(kind)
        out = func(*args, **kwargs)
        if (name == "cpu" or _is_to_cpu(name, args, kwargs)) and any(out is t for t in inputs):
            out = out.view(out.shape)  # on a CPU they return their input: a new object to mark host
        self._mark_outputs(name, args, kwargs, inputs, out)
        return out

    def _sync_kind(self, name: str, args, kwargs, inputs) -> str | None:
        if not inputs:
            return None
        first = inputs[0]
        if name in _READS or name in _DATA_SHAPED or _is_to_cpu(name, args, kwargs):
            return None if self.is_host(first) else ("to(cpu)" if name == "to" else name)
        if name == "repeat_interleave" and "output_size" not in kwargs:
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
            if isinstance(repeats, torch.Tensor) and not self.is_host(repeats):
                return "repeat_interleave"
            if len(args) == 1 and not self.is_host(first):  # repeat_interleave(counts)
                return "repeat_interleave"
            return None
        if name == "where" and len(args) == 1 and not kwargs:
            return None if self.is_host(first) else "where(cond)"
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            for idx in index:
                if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool and not self.is_host(idx):
                    return "bool-mask index" if name == "__getitem__" else "bool-mask assign"
        return None

    def _mark_outputs(self, name: str, args, kwargs, inputs, out) -> None:
        if not isinstance(out, torch.Tensor) or not _cpu_means_device() or out.device.type != "cpu":
            return
        if name == "cpu" or _is_to_cpu(name, args, kwargs):
            self.mark_host(out)
        elif inputs:
            if all(getattr(t, _HOST_ATTR, False) for t in inputs):
                self.mark_host(out)
        elif "device" not in kwargs:  # a factory without device=: a host tensor
            self.mark_host(out)

    def _record(self, kind: str) -> None:
        frames = []  # innermost first: (file, line, function, module)
        f = sys._getframe(1)
        while f is not None:
            frames.append((f.f_code.co_filename, f.f_lineno, f.f_code.co_name, f.f_globals.get("__name__", "")))
            f = f.f_back
        if self.exclude and any(os.path.basename(fr[0]) in self.exclude
                                or f"{os.path.basename(fr[0])}:{fr[2]}" in self.exclude for fr in frames):
            return
        site = next((fr for fr in frames if not _internal(fr[0])), frames[0])
        where = f"{_short(site[0])}:{site[1]} {site[2]}"
        self.events.append(SyncEvent(kind, where, site[3].split(".")[0] == "dspark_sglang"))

    # ---- reports ------------------------------------------------------------------------------

    def count(self, ours: bool | None = None) -> int:
        return sum(1 for e in self.events if ours is None or e.ours == ours)

    def by_site(self, ours: bool | None = None) -> dict[str, int]:
        """{"file:line function (kind)": count}, most frequent first."""
        c = Counter(f"{e.where} ({e.kind})" for e in self.events if ours is None or e.ours == ours)
        return dict(c.most_common())


def _cpu_means_device() -> bool:
    """On a machine without CUDA, CPU tensors stand for device tensors unless marked host."""
    return not torch.cuda.is_available()


def _internal(filename: str) -> bool:
    return filename.startswith(_TORCH_DIR) or os.path.abspath(filename) == _THIS_FILE or "<" in filename


def _short(filename: str) -> str:
    for root in sorted((p for p in sys.path if p), key=len, reverse=True):
        root = os.path.abspath(root) + os.sep
        if filename.startswith(root):
            return filename[len(root):]
    return os.path.basename(filename)


class RoundSyncLog:
    """Per-round sync counts of the worker's decode rounds (`DSPARK_COUNT_HOST_SYNCS=1`, benchmarks and
    tests only: the counter puts every torch call of the round through Python)."""

    def __init__(self, capacity: int = 4096):
        self.rounds: deque[dict] = deque(maxlen=capacity)
        self.sites: Counter = Counter()

    @classmethod
    def from_env(cls, environ=os.environ) -> "RoundSyncLog | None":
        return cls() if environ.get(ENV, "").strip() in ("1", "true", "yes") else None

    # The round probe's own plain-decode baseline, and the CPU-only torch_native attention override
    # (verify.fast_verify_attention: a GPU server runs its own attention backend instead). The
    # verify-length schedulers run on the host on any server: the worker hands them host copies
    # (the round's first sync, counted where it is made), and they keep their state where their
    # inputs are. On a CPU the counter cannot tell that state (built with `device=`) from device
    # tensors, so their reads of it are not syncs to count.
    EXCLUDE = ("round_probe.py", "verify.py:_sdpa_extend_new_queries_only", "schedulers.py", "schedule_cpu.py")

    def counter(self) -> HostSyncCounter:
        return HostSyncCounter(exclude=self.EXCLUDE)

    def record(self, counter: HostSyncCounter, batch_size: int) -> None:
        self.rounds.append(dict(batch=batch_size, ours=counter.count(ours=True), others=counter.count(ours=False)))
        self.sites.update(counter.by_site(ours=True))

    def as_dict(self) -> dict:
        ours = [r["ours"] for r in self.rounds]
        return dict(rounds=len(ours), max_ours=max(ours, default=0), mean_ours=sum(ours) / max(len(ours), 1),
                    per_round=list(self.rounds)[-64:], sites=dict(self.sites.most_common()))
