"""The layout docs/architecture.md describes: imports point one way, no cycles, no reaching into
another module's underscore names, and the old import paths still work."""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A module may import modules of its own layer or below, never above (see docs/architecture.md).
LAYERS = [
    ["errors", "version", "distributed", "faults", "strings"],
    ["preprocess", "pooling", "data", "anyres", "video", "sources", "charts"],
    ["vit"],
    ["families"],
    ["registry"],
    ["checkpoints"],
    ["formats"],
    ["loading"],
    ["tower"],
    ["llava", "cache", "imagetext"],
    ["extract", "score", "show"],
    ["projector"],
    ["training"],
    ["cli", "__main__"],
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def modules(package: str) -> dict[str, Path]:
    out = {}
    for f in sorted((ROOT / package).rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, str]]:
    """(imported module, imported name) for every import in the file, function-level ones included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in known else target, alias.name))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return found


def graph() -> dict[str, set[str]]:
    mods = modules("vision_tower") | modules("projector")
    return {name: {m for m, _ in imports(name, path, set(mods)) if m in mods and m != name}
            for name, path in mods.items()}


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return RANK.get(parts[1]) if parts[0] == "vision_tower" and len(parts) > 1 else None


def test_there_are_no_import_cycles():
    edges = graph()

    def reaches(a: str, b: str) -> bool:
        seen, todo = set(), [a]
        while todo:
            for n in edges.get(todo.pop(), ()):
                if n == b:
                    return True
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return False

    cycles = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if reaches(b, a)})
    assert not cycles, cycles


def test_imports_point_down_the_layers():
    edges = graph()
    unlisted = sorted(m for m in edges if m.startswith("vision_tower.") and layer_of(m) is None)
    assert not unlisted, f"modules missing from LAYERS (and docs/architecture.md): {unlisted}"
    upward = [(a, b) for a, bs in edges.items() for b in bs
              if layer_of(a) is not None and layer_of(b) is not None and layer_of(b) > layer_of(a)]
    assert not upward, upward
    # the package's __init__ is the public face: nothing inside the library imports it back
    assert not [a for a, bs in edges.items() if "vision_tower" in bs and a.startswith("vision_tower.")]
    # the old `projector` package only re-exports the library (it never is imported by it)
    assert not [a for a, bs in edges.items() if a.startswith("vision_tower") and any(b.startswith("projector") for b in bs)]


def family_branches(path: Path, names: set[str]) -> list[str]:
    """Comparisons against a family's name (`x == "clip"`, `kind in ("clip", "siglip")`) and dicts keyed by
    family names: the string branches that keep a family from being a unit."""
    found = []

    def literal_names(node: ast.AST) -> set[str]:
        if isinstance(node, ast.Constant) and node.value in names:
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return {e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in names}
        return set()

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare) and any(literal_names(n) for n in [node.left, *node.comparators]):
            found.append(f"{path.name}:{node.lineno}")
        if isinstance(node, ast.Dict) and any(k is not None and literal_names(k) for k in node.keys):
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_code_outside_the_family_modules_branches_on_a_family_name():
    from vision_tower.families import FAMILIES

    names = set(FAMILIES)
    offenders = [hit for name, path in modules("vision_tower").items() if not name.startswith("vision_tower.families")
                 for hit in family_branches(path, names)]
    assert not offenders, offenders


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for package in ("vision_tower", "projector", "tests", "benchmarks"):
        known = set(modules(package))
        for name, path in modules(package).items():
            offenders += [(name, target, what) for target, what in imports(name, path, known)
                          if what.startswith("_") and not what.startswith("__")]
    assert not offenders, offenders


@pytest.mark.parametrize("statement", [
    "from projector import Projector, TokenPool, build_projector, pool_tokens, KINDS, POOL_MODES",
    "from projector.train import AlignConfig, AlignError, AlignModel, train, micro_batches, check_fsdp_plugin",
    "from projector.checkpoint import latest_checkpoint, load_checkpoint, projector_state, save_checkpoint",
    "from projector.formats import from_llava, export_llava, from_hf_llava, to_hf_llava, from_prismatic",
    "from projector.pooling import pool_tokens, TokenPool",
    "from vision_tower.extract import ExtractConfig, extract, list_keys, safe_path, dist_env, leave_process_group, inspect",
    "from vision_tower.cache import FeatureCache, CacheError, ShardWriter, write_json_atomic, FORMAT, VERSION",
    "from vision_tower.checkpoints import CheckpointError, WeightsUnavailableError",
    "from vision_tower.preprocess import ImageLoadError",
    "from vision_tower.tower import VisionTower, FusedVisionTower, resolve_dtype",
])
def test_old_import_paths_still_work(statement):
    exec(statement, {})


def test_the_public_api_imports_without_the_training_extra():
    """`import vision_tower` and the extraction path never import accelerate (the `train` extra)."""
    import subprocess
    import sys

    code = ("import sys; import vision_tower, vision_tower.extract, vision_tower.cache, vision_tower.llava; "
            "print('accelerate' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert importlib.import_module("vision_tower.training").train


def test_no_function_is_longer_than_100_lines():
    long = [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name, path in modules("vision_tower").items() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 100]
    assert not long, long


# config fields set by the CLI under another name, or only from Python (each said once, here)
CLI_ELSEWHERE = {"progress": "--quiet", "views": "--anyres / --video", "extra_metadata": "Python only",
                 "queue_mb": "Python only"}


@pytest.mark.parametrize("command, config", [("extract", "vision_tower.extract:ExtractConfig"),
                                             ("score", "vision_tower.score:ScoreConfig"),
                                             ("align", "vision_tower.training:AlignConfig")])
def test_the_cli_declares_each_config_field_once(command, config):
    """Every field of a run's config dataclass is a CLI option of the same name (or listed above), and every
    option is a field: a new field cannot be forgotten by the command line, nor an option drift from it."""
    import dataclasses

    from vision_tower.cli import build_parser

    module, cls = config.split(":")
    fields = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}
    parser = next(a for a in build_parser()._subparsers._group_actions if a.choices).choices[command]
    options = {a.dest for a in parser._actions} - {"help", "quiet", "anyres", "video"}
    assert fields - set(CLI_ELSEWHERE) == options - set(CLI_ELSEWHERE), (fields ^ options) - set(CLI_ELSEWHERE)
