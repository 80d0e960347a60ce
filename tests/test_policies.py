"""Policies are plug-ins: one registered from this file is planned, listed and decoded with, through the same
entry points as the built-in ones, and nothing outside offload/policies/ names a policy or imports in a cycle."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import localkv
from localkv.cli import main
from localkv.errors import ContextOverflowError
from localkv.offload.attention import causal_attention
from localkv.offload.planner import make_plan
from localkv.offload.policies import base
from localkv.offload.policies.exact import DeviceExactKV
from localkv.offload.policies.exact.device import _ExactLayer
from tiny import write_model

PACKAGE = Path(localkv.__file__).parent


@dataclass
class WindowConfig:
    sink_tokens: int = 4
    """First tokens every step sees."""
    window_tokens: int = 64
    """Most recent tokens every step sees."""
    reserve_bytes: int = 0
    """Device bytes the policy says it holds besides the store (to exercise the planner)."""


class _WindowLayer(_ExactLayer):
    """Exact prefill; a decode step attends to the sink and the recent window only (StreamingLLM)."""

    def decode(self, q, k, v, rp):
        start = self._store(k, v, rp)
        end = start + k.shape[0]
        cfg = self.cache.config
        keep = torch.cat([torch.arange(min(cfg.sink_tokens, end)),
                          torch.arange(max(cfg.sink_tokens, end - cfg.window_tokens), end)])
        ks, vs = self.cache_k()[:, keep], self.cache_v()[:, keep]
        return causal_attention(rp.rotate(q), ks, vs, ks.shape[1] - q.shape[0])

    def cache_k(self):
        return self.k

    def cache_v(self):
        return self.v


class WindowKV(DeviceExactKV):
    name = "window"

    def __init__(self, args, capacity, config: WindowConfig):
        super().__init__(args, capacity)
        self.config = config
        self.layers = [_WindowLayer(self) for _ in range(args.n_layers)]
        self.decoded = 0

    def stats(self):
        return {**super().stats(), "window_tokens": self.config.window_tokens}


class WindowPolicy(base.Policy):
    name = "window"
    summary = "sink + recent window (a test's toy)"
    sparse = True
    config = WindowConfig

    def footprint(self, inputs):
        return base.Footprint(gpu_bytes=self.parse(inputs.options).reserve_bytes, what="window buffer")

    def estimate(self, inputs, fp, plan):
        window = self.parse(inputs.options).window_tokens
        return base.StepBytes(hbm=window * plan.kv_bytes_per_token, how="window: the window's KV once")

    def make(self, args, capacity, *, budgets, device, dtype, **options):
        return WindowKV(args, capacity, self.parse(options))


@pytest.fixture
def window(monkeypatch):
    monkeypatch.setitem(base._REGISTRY, "window", WindowPolicy())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("policies") / "tiny", "llama", seed=3)


def test_the_planner_places_and_refuses_from_the_footprint(window, tiny_dir):
    args = localkv.load(tiny_dir, device="cpu").loaded.args
    plan = make_plan(args, 1024, policy="window", gpu_mem=2**20, options={"reserve_bytes": 4096})
    exact = make_plan(args, 1024, policy="exact", gpu_mem=2**20)
    assert plan.gpu.budget == exact.gpu.budget - 4096
    assert plan.how.startswith("window:") and plan.ms_per_token < exact.ms_per_token
    with pytest.raises(ContextOverflowError, match="window window buffer"):
        make_plan(args, 1024, policy="window", gpu_mem=1024, options={"reserve_bytes": 4096})


def test_cli_plan_and_policies_list_it(window, tiny_dir, capsys):
    assert main(["plan", str(tiny_dir), "--ctx", "2K", "--policy", "window", "--policy-opt", "window_tokens=32",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "policy window" in out and "window: the window's KV once" in out
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    assert "window: sink + recent window" in out and "window_tokens=64  Most recent tokens every step sees." in out
    assert main(["plan", str(tiny_dir), "--policy", "window", "--policy-opt", "sink=1"]) == 2
    assert "unknown window option(s) sink" in capsys.readouterr().err


def test_decode_through_the_registry(window, tiny_dir):
    """A window that covers the context is exact attention: the same greedy tokens as the exact policy; a short
    window reads less and still decodes."""
    torch.manual_seed(0)
    prompt = [int(t) for t in torch.randint(3, 300, (40,))]
    exact = localkv.load(tiny_dir, device="cpu", ctx=256)
    wide = localkv.load(tiny_dir, device="cpu", ctx=256, policy="window", policy_options={"window_tokens": 512})
    narrow = localkv.load(tiny_dir, device="cpu", ctx=256, policy="window",
                          policy_options={"window_tokens": 8, "sink_tokens": 2})

    def greedy(llm):
        seq = llm.engine.new_sequence()
        logits = llm.engine.prefill(seq, prompt)
        out = []
        for _ in range(12):
            out.append(int(logits.argmax()))
            logits = llm.engine.decode_one(seq, out[-1])
        return out, seq.cache

    ref, _ = greedy(exact)
    same, cache = greedy(wide)
    assert same == ref and isinstance(cache, WindowKV) and cache.stats()["window_tokens"] == 512
    tokens, cache = greedy(narrow)
    assert len(tokens) == 12 and cache.stats()["window_tokens"] == 8


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _module_level_imports(name: str, path: Path) -> set[str]:
    """Modules ``name`` imports when it is imported (not those imported inside functions or for type checking)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    body = ast.parse(path.read_text()).body
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if isinstance(node, (ast.Import, ast.ImportFrom, ast.Try, ast.If)) else ():
            if isinstance(sub, ast.Import):
                out |= {a.name for a in sub.names}
            elif isinstance(sub, ast.ImportFrom):
                base_name = sub.module or ""
                if sub.level:
                    anchor = package.split(".")[:len(package.split(".")) - sub.level + 1]
                    base_name = ".".join(anchor + ([sub.module] if sub.module else []))
                out.add(base_name)
                out |= {f"{base_name}.{a.name}" for a in sub.names}
    return {m for m in out if m.startswith("localkv")}


def test_no_import_cycle():
    modules = dict(_modules())
    graph = {name: {m for m in _module_level_imports(name, path) if m in modules and m != name}
             for name, path in modules.items()}
    for name, path in modules.items():   # a package that imports its subpackages by walking its folder
        if path.name == "__init__.py" and "pkgutil.iter_modules" in path.read_text():
            graph[name] |= {m for m in modules if m.rpartition(".")[0] == name and (modules[m].name == "__init__.py")}
    assert "localkv.offload.policies.shadowkv" in graph["localkv.offload.policies"]
    # A package's own submodules import the package (Python runs its __init__ first): not an edge that counts.
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(n, trail):
        state[n] = 1
        for m in graph[n]:
            if state.get(m) == 1:
                raise AssertionError(" -> ".join(trail[trail.index(m):] + [n, m]) if m in trail else f"{n} -> {m}")
            if m not in state:
                visit(m, trail + [n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])


def test_nothing_outside_the_policies_names_one():
    """No import of a policy's folder and no policy's name as a string in code outside offload/policies/ (the
    kernels, which a policy brings along, may say whose they are in their docs)."""
    names = set(base.names())
    for name, path in _modules():
        if name.startswith("localkv.offload.policies"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and re.search(r"policies\.(?!base$)", node.module):
                assert False, f"{path}: imports {node.module}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                assert node.value not in names, f"{path}:{node.lineno} names the policy {node.value!r}"


def test_no_policy_imports_another():
    """What sparse policies share lives beside the store (`offload.chunks`, `offload.streamed`): a policy's folder
    imports no other policy's."""
    folders = {n for n, p in _modules() if p.name == "__init__.py" and n.count(".") == 3
               and n.startswith("localkv.offload.policies.")}
    assert {"localkv.offload.policies.exact", "localkv.offload.policies.shadowkv"} <= folders
    for name, path in _modules():
        own = next((f for f in folders if name == f or name.startswith(f + ".")), None)
        if own is None:
            continue
        for m in _module_level_imports(name, path):
            other = next((f for f in folders if m == f or m.startswith(f + ".")), None)
            assert other in (None, own), f"{path}: {name} imports {m}"
