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
    ["preprocess", "pooling", "data", "anyres", "video", "sources"],
    ["vit"],
    ["registry"],
    ["checkpoints"],
    ["formats"],
    ["loading"],
    ["tower"],
    ["llava", "cache", "imagetext"],
    ["extract", "score"],
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
