"""The module layout of docs/design.md, checked on the source: each module imports only what its row allows."""

import ast
from pathlib import Path

PKG = Path(__file__).parents[1] / "hf_taujp"

# docs/design.md, "may import" column (package-internal modules; torch / HF libraries are free).
ALLOWED = {
    "errors": set(),
    "safetensors_io": {"errors"},
    "hub": {"errors", "safetensors_io"},
    "compat": {"errors"},
    "tied": {"errors", "hub"},
    "fingerprints": {"errors"},
    "attention": {"errors", "attention_jvp"},
    "attention_jvp": {"errors"},
    "low_rank": {"errors"},
    "low_rank_tau": {"errors", "safetensors_io"},
    "linearize": {"errors", "attention", "low_rank", "generation"},
    "generation": {"errors", "attention", "linearize"},
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
