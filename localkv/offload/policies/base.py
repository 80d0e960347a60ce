"""The interface a KV policy implements, and the registry through which the rest of localkv finds it.

A policy is a view over the tiered KV store that decides what each step attends to. It lives in one folder:

    offload/policies/NAME/
        __init__.py    ``register(NamePolicy())``: name, options, footprint, estimate, cache factory
        *.py           its cache (a `localkv.offload.kv.KVCache`) and what it is built from: index, selection,
                       fetch, each a file of its own
    kernels/OP.py      its Triton kernels, one op per file with a torch reference (shared ones reused)

A policy imports no other policy. What sparse policies share lives one level up: `offload.streamed` (exact
attention over the store, for prefill), `offload.chunks` (chunks read from any tier into a device slot cache).

The package imports every folder beside this file (`policies/__init__.py`), so a new policy is its folder and
nothing else: the planner, store, runtime, CLI and TUI know no policy by name. They ask the registry

    get(name) -> Policy     names() -> the registered names     reference() -> the policy others are held to

and a `Policy` answers, for the planner first and then for the engine:

    parse(options) -> config            the user's options, checked (a UserError names a bad one)
    store_parts(options) -> 1 | 2       what a page of the store holds: K and V, or V only
    footprint(inputs) -> Footprint      what it keeps on each tier besides the store's pages, for a context:
                                        the planner places that first, and refuses when it cannot fit
    estimate(inputs, fp, plan) -> StepBytes   bytes a decode step reads per link at full context
    make(args, capacity, ...) -> KVCache      a fresh cache (``budgets=None``: the KV whole on the device)
    calibrate(cache) -> options | None        options fitted to a model by a teacher-forced run (`localkv eval`)

and the cache it makes reports ``stats()`` (a dict: the side panel shows the keys it knows, lists the rest).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from ...errors import UserError
from ...models.args import ModelArgs

if TYPE_CHECKING:   # the planner's result, read by `estimate`; the planner imports this module, not the reverse
    from ..planner import Plan
    from ..kv import KVCache
    from ..store import Budgets


@dataclass
class PlanInputs:
    """What the planner knows when it asks a policy for its footprint."""

    args: ModelArgs
    ctx_tokens: int
    kv_dtype: torch.dtype
    device: torch.device
    gpu_room: int
    """Bytes the KV may take on the model's device (the user's ``--gpu-mem`` or what is free)."""
    cpu_room: int
    """Bytes of pinned CPU memory the KV may take (0 on a machine without a GPU: one memory)."""
    disk_room: int
    """Bytes the disk tier may take (0 without one)."""
    store_bytes: int
    """Bytes of the store's pages at full context (``store_parts`` parts a token)."""
    options: dict[str, Any]

    @property
    def elt(self) -> int:
        return self.kv_dtype.itemsize

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class Footprint:
    """What a policy keeps outside the store's pages, and how it wants the pages placed."""

    gpu_bytes: int = 0
    """Device memory held beside the pages (index, buffers), taken from the GPU tier before any page."""
    cpu_bytes: int = 0
    """Pinned CPU memory held beside the pages, taken from the CPU tier before any page."""
    what: str = "index"
    """What those bytes are, in the planner's messages ("the shadowkv index of a 1M-token context needs ...")."""
    gpu_values: bool = False
    """The GPU tier caches copies of values only (`KVStore.gpu_values`): twice the tokens, for a policy whose
    decode reads nothing else from the store."""
    disk_ratio: float = 1.0
    """Bytes a page takes on the disk tier over its bytes in memory (below 1 where the policy quantizes cold KV)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Choices the placement made, passed to the policy's cache (the user's own options take precedence)."""
    overflow_hint: str = ""
    """Appended to the planner's refusal when the context fits no tier: the policy's own way out, if any."""


@dataclass
class StepBytes:
    """Bytes one decode step reads at full context, per link, besides the weights; and what the table says."""

    hbm: float = 0.0
    """From device memory."""
    h2d: float = 0.0
    """Over PCIe from pinned CPU memory."""
    disk: float = 0.0
    """From the disk tier."""
    disk_reads: float = 0.0
    """Separate reads from the disk tier, for a policy that reads small scattered runs (0: few, large ones)."""
    how: str = ""
    """One line on what the estimate counts, for ``localkv plan``."""
    notes: list[str] = field(default_factory=list)


def parse_options(config: type, policy: str, options: dict[str, Any]) -> Any:
    """``config(**options)`` (an options dataclass), a UserError naming any option it does not have."""
    known = {f.name for f in fields(config)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"unknown {policy} option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return config(**options)


class Policy:
    """A KV policy as the planner and the engine see it. Subclasses set the class attributes and ``make``."""

    name: str = ""
    summary: str = ""
    """One line for ``localkv policies`` and the help."""
    sparse: bool = False
    """Attends to a selection of the KV: its rows sweep ``budget`` (bench, eval) and are held to ``reference``.
    A sparse policy's options include ``budget`` (tokens, or a share of the context as a float; None: its
    default) and ``measure_recall`` (report ``attention_recall`` in ``stats``, for evaluation)."""
    config: type | None = None
    """The options dataclass (fields with one-line docstrings); None for a policy that takes none."""

    def parse(self, options: dict[str, Any] | None) -> Any:
        """The options as ``config``, checked: a UserError names an unknown or bad one."""
        options = dict(options or {})
        if self.config is None:
            if options:
                raise UserError(f"the {self.name} policy takes no options (got {', '.join(sorted(options))})")
            return None
        return parse_options(self.config, self.name, options)

    def store_parts(self, options: dict[str, Any]) -> int:
        """Parts of a store page under these options: 2 (K and V) or 1 (values only)."""
        return 2

    def footprint(self, inputs: PlanInputs) -> Footprint:
        """What the policy keeps besides the store's pages at ``inputs.ctx_tokens``; by default nothing."""
        return Footprint()

    def estimate(self, inputs: PlanInputs, fp: Footprint, plan: "Plan") -> StepBytes:
        """Bytes a decode step reads at full context, once the pages are placed (``plan.gpu/cpu/disk``). By
        default every byte of KV once, from wherever it lives: what exact attention reads."""
        return StepBytes(hbm=plan.gpu.bytes, h2d=plan.cpu.bytes if inputs.on_gpu else 0, disk=plan.disk.bytes,
                         how=f"{self.name}: weights once from GPU memory, every KV byte once over PCIe / from disk")

    def calibrate(self, cache: "KVCache") -> dict[str, Any] | None:
        """Options fitted to a model from a cache of this policy after a teacher-forced run (``localkv eval
        --calibrate`` stores them beside the model, and the engine uses them as defaults); None: nothing to fit."""
        return None

    def make(self, args: ModelArgs, capacity: int, *, budgets: "Budgets | None", device: torch.device,
             dtype: torch.dtype, **options) -> "KVCache":
        """A fresh cache of ``capacity`` tokens; ``budgets=None`` keeps the KV whole in the device's memory."""
        raise NotImplementedError

    def option_help(self) -> list[tuple[str, str, str]]:
        """(name, default, one line) per option, for ``localkv policies``."""
        if self.config is None:
            return []
        docs = _field_docs(self.config)
        return [(f.name, repr(f.default), docs.get(f.name, "")) for f in fields(self.config)]


def _field_docs(cls: type) -> dict[str, str]:
    """The first line of each field's attribute docstring (the string right after it in the class body)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body, docs = tree.body[0].body, {}
    for a, b in zip(body, body[1:]):
        if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def scoped(options: dict[str, Any], policy: str) -> dict[str, Any]:
    """The options of ``policy`` among options given to several (``--policy-opt`` of bench and eval): a plain key
    applies to every policy, ``policy.key`` to that one only (``louiskv.tau=0.8``)."""
    out = {k: v for k, v in options.items() if "." not in k}
    out.update({k.partition(".")[2]: v for k, v in options.items() if k.partition(".")[0] == policy and "." in k})
    return out


_REGISTRY: dict[str, Policy] = {}
REFERENCE = "exact"
"""The policy every other is held to (eval's reference, the bench's floor rows, TriForce's verifier)."""
DEFAULT = "exact"
"""The policy ``localkv run`` and ``localkv.load`` use unless told otherwise."""


def register(policy: Policy) -> Policy:
    """Make ``policy`` known by its name (a policy's ``__init__.py`` calls this; a test may too)."""
    if not policy.name or not policy.name.isidentifier():
        raise ValueError(f"a policy needs an identifier for a name, got {policy.name!r}")
    _REGISTRY[policy.name] = policy
    return policy


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def names() -> list[str]:
    """The registered policies, the reference first."""
    return sorted(_REGISTRY, key=lambda n: (n != REFERENCE, n))


def get(name: str) -> Policy:
    """The policy called ``name``; a UserError lists the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown policy {name!r} (available: {', '.join(names())})") from None


def reference() -> str:
    return REFERENCE
