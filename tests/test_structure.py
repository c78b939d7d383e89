"""The layering and ownership rules of docs/CONTRACT.md ("Import direction", "Who owns what"),
checked on the source: imports read with `ast` (top-level and inside functions), so a rule
broken in any code path fails here, not at some later import."""

import ast
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Above the kernels: what kernels/ and csrc/ must never import.
UPPER = ("speed_fast.ops", "speed_fast.training", "speed_fast.commands", "speed_fast.evaluation")


def _package_of(path: Path) -> str:
    """The dotted package a source file is imported as (kernels/ and csrc/ install as speed_fast.*)."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("kernels", "csrc"):
        parts = ["speed_fast", *parts]
    return ".".join(parts[:-1]) if parts[-1] != "__init__" else ".".join(parts[:-1])


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it, relative imports resolved to absolute names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _package_of(path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)  # `from speed_fast import ops`
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_import_reader_sees_relative_function_level_and_dynamic_imports(tmp_path, monkeypatch):
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    f = tmp_path / "kernels" / "x.py"
    f.parent.mkdir()
    f.write_text("def f():\n    from ..ops import validate\n    import importlib\n"
                 "    importlib.import_module('speed_fast.training.config')\nfrom speed_fast import evaluation\n")
    names = imported_modules(f)
    assert "speed_fast.ops" in names and "speed_fast.training.config" in names
    assert "speed_fast.evaluation" in names


@pytest.mark.parametrize("path", sorted([*ROOT.glob("kernels/*.py"), *ROOT.glob("csrc/*.py")]),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_kernels_and_csrc_import_nothing_above_them(path):
    bad = sorted(n for n in imported_modules(path) if _under(n, UPPER))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}; kernels/ and csrc/ are the ground floor"


@pytest.mark.parametrize("name", ["paths", "layout", "data/beton"])
def test_leaf_modules_import_nothing_of_speed_fast(name):
    names = imported_modules(ROOT / "speed_fast" / f"{name}.py")
    assert not [n for n in names if _under(n, ("speed_fast",))]


def test_rng_imports_nothing_of_speed_fast():
    assert not [n for n in imported_modules(ROOT / "speed_fast" / "rng.py") if _under(n, ("speed_fast",))]


def test_latents_does_not_import_digits():
    """digits.py writes through latents.py; the reverse import was a cycle (the cache dir now comes from paths)."""
    assert "speed_fast.data.digits" not in imported_modules(ROOT / "speed_fast" / "data" / "latents.py")


def test_commands_import_no_other_command():
    from speed_fast.cli import COMMANDS

    commands = {f"speed_fast.commands.{m}" for m in COMMANDS.values()}
    for module in sorted(commands):
        path = ROOT / Path(*module.split(".")).with_suffix(".py")
        others = sorted(n for n in imported_modules(path) if _under(n, commands - {module}))
        assert not others, f"{module} imports {others}: shared code belongs in a library module"


def test_no_comment_points_outside_the_repository():
    """The contract is docs/CONTRACT.md, in the repository; nothing cites a design file that is not here."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for rel in files:
        if rel.endswith((".py", ".sh", ".cpp", ".h", ".toml", ".md")) and rel != "tests/test_structure.py":
            text = (ROOT / rel).read_text(errors="replace")
            hits += [f"{rel}: {m.group(0)}" for m in re.finditer(r"[\w./-]*DESIGN\.md", text)]
    assert not hits, hits
    assert (ROOT / "docs" / "CONTRACT.md").is_file()


def test_speed_fast_cache_moves_every_cache(tmp_path, monkeypatch):
    """One variable moves the digits .beton, the verified-file list, the Inception weights' default
    place and the C++ build folder."""
    from speed_fast import paths
    from speed_fast.data.digits import ensure_digits_beton
    from speed_fast.data.latents import check_crc, read_latent_meta
    from speed_fast.evaluation import default_inception_path, load_inception
    from speed_fast.ops import _cpp

    cache = tmp_path / "cache"
    monkeypatch.setenv("SPEED_FAST_CACHE", str(cache))
    for name in ("SPEED_FAST_INCEPTION", "TORCH_EXTENSIONS_DIR", "SPEED_FAST_BUILD_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert paths.cache_dir() == str(cache)
    beton = ensure_digits_beton()
    assert Path(beton).parent == cache and Path(beton).is_file()
    assert check_crc(beton, read_latent_meta(beton), force=True)
    assert (cache / "verified-latents.json").is_file()
    assert default_inception_path() == cache / "inception-2015-12-05.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(cache / "inception-2015-12-05.pt"))):
        load_inception()
    assert _cpp.build_dir().parent == cache
    # The more specific variables still win where they are set.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert _cpp.build_dir().parent == tmp_path / "ext"
    monkeypatch.setenv("SPEED_FAST_INCEPTION", str(tmp_path / "net.pt"))
    assert default_inception_path() == tmp_path / "net.pt"
    monkeypatch.delenv("SPEED_FAST_CACHE")
    assert paths.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "speed_fast")
