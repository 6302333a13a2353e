"""The layout is the architecture (docs/architecture.md), checked over the source with `ast`:

- the core (`hsplitlora`) imports nothing above it; `edge_sdk`, `server` and `export` import the
  core and not each other; only `app` (the command and the demo) sits above all four;
- no import circles among the project's modules;
- one module defines the round the simulation and the server both call, one module per strategy,
  and no code outside the strategies asks which method it is;
- header names and the tensor-key codec are written once (the protocol module, `Target.key`).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hsplitlora", "edge_sdk", "server", "export", "app")
MAY_IMPORT = {
    "hsplitlora": {"hsplitlora"},
    "edge_sdk": {"hsplitlora", "edge_sdk"},
    "server": {"hsplitlora", "server"},
    "export": {"hsplitlora", "export"},
    "app": set(PACKAGES),
}


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, anywhere in it (lazy imports in functions too)."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` runs a, a.b and a.b.c: each is a dependency.
            parts = target.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in known)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, name, known) for name, path in known.items()}


def test_each_layer_imports_only_what_is_below_it():
    wrong = []
    for name, deps in graph().items():
        layer = name.split(".")[0]
        wrong += [f"{name} imports {dep}" for dep in sorted(deps) if dep.split(".")[0] not in MAY_IMPORT[layer]]
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    deps = graph()
    # A package's __init__ importing its own submodules is how a package re-exports; the circle
    # that matters is between modules, so a package's own __init__ is not an edge back to it.
    for name in deps:
        deps[name] = {d for d in deps[name] if not name.startswith(d + ".")}
    state, cycles = {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(deps.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [node, dep]) if dep in stack
                              else f"{node} -> {dep}")
            elif dep not in state:
                visit(dep, stack + [node])
        state[node] = "done"

    for name in sorted(deps):
        if name not in state:
            visit(name, [])
    assert not cycles, "\n".join(cycles)


def _defines(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name for n in tree.body)


def test_one_round_that_the_simulation_and_the_server_both_call():
    known = modules()
    defining = [m for m, p in known.items() if _defines(p, "close_round")]
    assert defining == ["hsplitlora.federation.round"]
    deps = graph()
    assert "hsplitlora.federation.round" in deps["hsplitlora.simulate"]
    assert "hsplitlora.federation.round" in deps["server.trainer"]
    for caller in ("hsplitlora/simulate.py", "server/trainer.py"):
        assert "close_round(" in (ROOT / caller).read_text(), caller


def test_one_module_per_strategy_and_no_method_checks_outside_them():
    from hsplitlora.federation.strategies import STRATEGIES

    for name, cls in STRATEGIES.items():
        assert cls.__module__ == f"hsplitlora.federation.strategies.{name}", (name, cls.__module__)
    names = set(STRATEGIES)
    asking = []
    for module, path in modules().items():
        if module.startswith("hsplitlora.federation.strategies"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            # `x.method == "hetlora"`, `method in {"naa", ...}`: the strategy should be asked instead.
            if isinstance(node, ast.Compare):
                strings = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
                if strings & (names | {"naa", "fedavg"}) and "method" in ast.unparse(node):
                    asking.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    assert not asking, "\n".join(asking)


def test_header_names_and_the_tensor_key_codec_are_written_once():
    protocol = ROOT / "hsplitlora/federation/protocol.py"
    headers = re.compile(r"""["']X-[A-Z]""")
    # '<t>.A' built by hand: an f-string ending in .A / .B / .delta, or a suffix test or cut of one.
    codec = re.compile(r"""\}\.(A|B|delta)["']|endswith\(["']\.(A|B|delta)["']\)|\[:-2\]""")
    wrong = []
    for module, path in modules().items():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if headers.search(line) and path != protocol:
                wrong.append(f"{module}:{number}: header literal: {line.strip()}")
            if codec.search(line):
                wrong.append(f"{module}:{number}: tensor key by hand: {line.strip()}")
    assert not wrong, "\n".join(wrong)
