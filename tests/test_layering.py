"""Imports point one way, following the data flow (docs/design.md): a module may import its own layer
and the layers below it, never a layer above. The test reads every module's imports from its AST."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lmforge"

# Lowest first. A module's layer is that of its first path part (a package or a top-level module).
LAYERS = [
    {"errors"},
    {"config", "device"},
    {"tokenizers", "models"},
    {"data", "checkpoint"},
    {"training", "generation"},
    {"evaluation", "probe"},
    {"finetuning", "interop"},
    {"api"},
    {"compare", "bench", "serving", "chat"},
    {"cli", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def part_of(module: str) -> str:
    return module.split(".")[0]


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported lmforge module, line) for every import in the file, relative ones resolved."""
    package = list(path.relative_to(PACKAGE).with_suffix("").parts[:-1])  # the module's package, inside lmforge
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)] + ([node.module] if node.module else [])
            if node.module:
                found.append((".".join(base), node.lineno))
            else:  # from . import x: x is a module of that package
                found += [(".".join(base + [alias.name]), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmforge."):
            found.append((node.module.removeprefix("lmforge."), node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name.removeprefix("lmforge."), node.lineno) for a in node.names if a.name.startswith("lmforge.")]
    return found


def test_every_module_has_a_layer():
    parts = {part_of(".".join(p.relative_to(PACKAGE).with_suffix("").parts))
             for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE}
    assert parts - set(RANK) == set(), "add these to LAYERS"


def test_imports_point_down_the_data_flow():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("").parts
        if rel == ("__init__",):
            continue  # the package's lazy front door may name anything
        own = RANK[rel[0]]
        for module, line in imports(path):
            if RANK.get(part_of(module), -1) > own:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {module}")
    assert upward == []


def test_the_model_knows_nothing_of_decoding_training_or_data():
    for path in (PACKAGE / "models").glob("*.py"):
        for module, line in imports(path):
            assert part_of(module) in ("models", "errors", "config"), f"{path.name}:{line} imports {module}"
