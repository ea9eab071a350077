"""The package's layering, checked from the source: entry points (cli) -> methods -> building
blocks -> kernels / ViT view / models / io, every import pointing down (or sideways)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastinterp"
KERNELS = ROOT / "kernels"

LEVEL = {
    "cli": 4,
    "sweep": 3.5,  # runs the methods over a grid (task graph, engines); only the cli is above it
    "sith": 3, "ccs": 3, "mutual": 3, "mutual_figures": 3, "pruning": 3,
    "sparse": 2, "textspan": 2, "ablation": 2, "vision": 2, "concepts": 2, "zeroshot": 2, "llm": 2,
    "images": 2, "reference": 2,
    "kernels": 1, "vit": 1, "models": 1, "io": 1, "data": 1, "model_configs": 1,
}
MAX_MODULE_LINES = 700


def _sources():
    for base, top in ((PACKAGE, None), (KERNELS, "kernels")):
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base)
            if top is None:
                component = rel.parts[0][:-3] if len(rel.parts) == 1 else rel.parts[0]
                dotted = ["fastinterp", *rel.with_suffix("").parts]
            else:
                component = "kernels"
                dotted = ["fastinterp", "kernels", *rel.with_suffix("").parts]
            if dotted[-1] == "__init__":
                dotted = dotted[:-1]
                is_package = True
            else:
                is_package = False
            yield path, component, dotted, is_package


def _main_guard_nodes(tree):
    """Nodes under `if __name__ == "__main__":`: a module's entry-point shim may call the cli."""
    inside = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"):
            inside |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return inside


def _imported_components(tree, dotted, is_package):
    """(line, fastinterp component) of every import of the package, function-level ones too."""
    package = dotted if is_package else dotted[:-1]
    shims = _main_guard_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in shims:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                if node.module is None:  # from . import x
                    names = [".".join(target + [a.name]) for a in node.names]
                else:
                    names = [".".join(target)]
            else:
                names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "fastinterp" and len(parts) > 1:
                yield node.lineno, parts[1]


def test_every_component_has_a_level():
    components = {c for _, c, _, _ in _sources()} - {"__init__", "__main__"}
    assert components <= set(LEVEL), f"give these a level in LEVEL: {sorted(components - set(LEVEL))}"


def test_imports_point_down():
    bad = []
    for path, component, dotted, is_package in _sources():
        if component in ("__init__",):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for line, target in _imported_components(tree, dotted, is_package):
            if target == component:
                continue
            if component == "kernels":
                bad.append(f"{path.relative_to(ROOT)}:{line} imports fastinterp.{target} (kernels know nothing of CLIP)")
            elif LEVEL.get(target, 0) > LEVEL[component]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({component}, level {LEVEL[component]}) imports "
                           f"fastinterp.{target} (level {LEVEL[target]})")
    assert not bad, "imports pointing up:\n" + "\n".join(bad)


def _calls_outside_cli(predicate):
    hits = []
    for path, component, _, _ in _sources():
        if component == "cli":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if predicate(node):
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return hits


def test_argparse_and_matplotlib_backend_only_in_the_cli():
    def imports_argparse_or_pyplot(node):
        if isinstance(node, ast.Import):
            return any(a.name in ("argparse", "matplotlib.pyplot") for a in node.names)
        if isinstance(node, ast.ImportFrom):
            return node.module in ("argparse", "matplotlib.pyplot") or (
                node.module == "matplotlib" and any(a.name == "pyplot" for a in node.names))
        return False

    def sets_backend(node):
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "use"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "matplotlib")

    assert _calls_outside_cli(imports_argparse_or_pyplot) == []
    assert _calls_outside_cli(sets_backend) == []


@pytest.mark.parametrize("module", ["sith", "ccs", "mutual", "pruning", "textspan", "ablation"])
def test_methods_export_no_cli(module):
    import importlib

    mod = importlib.import_module(f"fastinterp.{module}")
    cli_like = [n for n in getattr(mod, "__all__", []) if n.startswith(("cmd_", "register", "add_", "demo_section"))
                or n.endswith("_cli")]
    assert cli_like == []
    assert not hasattr(mod, "register_cli") and not hasattr(mod, "demo_section")


def test_no_module_over_the_size_limit():
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p, *_ in _sources()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert long == []


def test_import_is_lazy_and_every_method_reachable_from_the_package():
    code = ("import sys, fastinterp; heavy = [m for m in ('torch', 'open_clip', 'numba', 'matplotlib') "
            "if m in sys.modules]; print('heavy:', heavy); "
            "[getattr(fastinterp, m) for m in ('sith', 'ccs', 'mutual', 'textspan', 'ablation', 'sparse', "
            "'pruning', 'kernels', 'vit', 'io')]; "
            "print(fastinterp.sith.vo_svd.__module__, fastinterp.mutual.__name__, fastinterp.vit_info.__module__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "heavy: []"
    assert lines[1].split() == ["fastinterp.sith.vo", "fastinterp.mutual", "fastinterp.vit"]


def test_every_package_folder_is_installed():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {"fastinterp." + ".".join(p.parent.relative_to(PACKAGE).parts) if p.parent != PACKAGE else "fastinterp"
               for p in PACKAGE.rglob("__init__.py")}
    assert folders - {"fastinterp.kernels"} <= listed, f"add to pyproject's packages: {sorted(folders - listed)}"
    assert config["package-dir"] == {"fastinterp.kernels": "kernels"} and "fastinterp.kernels" in listed
