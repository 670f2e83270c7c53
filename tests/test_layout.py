"""The module layout of docs/modules.md (the rules of docs/design.md), checked on the source: each module imports
only what its row allows; no import cycle; no module over 500 lines and no function over 150."""

import ast
from pathlib import Path

PKG = Path(__file__).parents[1] / "hf_taujp"

# docs/modules.md, "may import" column (package-internal modules; torch / HF libraries are free).
ALLOWED = {
    "errors": set(),
    "safetensors_io": {"errors"},
    "hub": {"errors", "safetensors_io"},
    "compat": {"errors"},
    "tied": {"errors", "hub"},
    "fingerprints": {"errors"},
    "attention": {"errors", "attention_jvp"},
    "attention_jvp": {"errors", "attention_blocks", "attention_shapes"},
    "attention_blocks": set(),
    "attention_shapes": {"errors"},
    "jvp_context": {"errors"},
    "forward_inputs": set(),
    "linearized_outputs": {"errors", "forward_inputs"},
    "low_rank": {"errors"},
    "low_rank_tau": {"errors", "safetensors_io"},
    "linearize": {"errors", "attention", "low_rank", "generation", "jvp_context", "forward_inputs", "linearized_outputs"},
    "generation": {"errors", "attention", "jvp_context"},
    "peft_registration": {"tuners"},
    "tuners": {"errors", "linearize", "low_rank", "low_rank_tau", "peft_registration", "tuners"},
    "trainer": {"errors", "linearize", "low_rank", "attention", "trainer", "compat", "fingerprints", "merging",
                "peft_conversion"},
    "peft_conversion": {"errors", "hub", "fingerprints", "low_rank", "low_rank_tau"},
    "task_vector": {"errors", "hub", "compat", "fingerprints", "low_rank_tau", "peft_conversion", "linearize", "tuners",
                    "lora_extraction"},
    "lora_extraction": {"errors", "tied", "low_rank_tau", "peft_conversion"},
    "merging": {"errors", "hub", "safetensors_io", "compat", "tied", "fingerprints", "linearize", "low_rank_tau",
                "task_vector", "merging"},
    "evaluation": {"errors", "hub", "linearize", "trainer", "merging", "evaluation"},
}


def _unit(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    return rel.parts[0]


def _imports(path: Path) -> set[str]:
    """Top-level hf_taujp units imported by ``path`` (relative or absolute imports, anywhere in the file)."""
    pkg_parts = ["hf_taujp", *path.relative_to(PKG).parent.parts]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                mod = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.startswith("hf_taujp"):
                mod = node.module.split(".")
            else:
                continue
            if len(mod) > 1:
                out.add(mod[1])
            else:  # "from . import hub" / "from hf_taujp import x"
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("hf_taujp."))
    return out


def test_every_module_imports_only_what_its_row_allows():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        unit = _unit(path)
        if unit in ALLOWED:
            extra = _imports(path) - ALLOWED[unit] - {unit}
            if extra:
                bad.append(f"{path.relative_to(PKG)} imports {sorted(extra)}")
    assert not bad, "\n".join(bad)


def test_nothing_in_the_library_imports_the_applications():
    for path in sorted(PKG.rglob("*.py")):
        if _unit(path) in ALLOWED:
            assert not _imports(path) & {"recipes", "demo", "cli"}, path


# ------------------------------------------------------------------ no cycles, no oversized modules / functions
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_imports(path: Path, modules: set[str]) -> set[str]:
    """hf_taujp modules ``path`` imports anywhere (functions too), except under ``if TYPE_CHECKING:``; a package's
    imports of its own submodules (its re-exports) are not edges."""
    me, is_pkg = _module_name(path), path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".") if is_pkg else me.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + (node.module.split(".") if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                out.add(f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {t for t in out if t in modules and t != me and not t.startswith(me + ".")}


def test_no_import_cycle_between_modules():
    """Tarjan's strongly connected components of the module import graph: none has two modules (a function-level
    import that only dodges a cycle at import time still counts)."""
    paths = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {m: _module_imports(p, set(paths)) for m, p in paths.items()}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_no_module_over_500_lines_and_no_function_over_150():
    big, long = [], []
    for path in sorted(PKG.rglob("*.py")):
        src = path.read_text()
        if src.count("\n") > 500:
            big.append(f"{path.relative_to(PKG)}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 150:
                long.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1}")
    assert not big and not long, "\n".join(big + long)
