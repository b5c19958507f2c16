"""The repository must not own an import name that an installed package uses.

Python puts the current directory first on `sys.path` (`python -m ...`, `python -c`, and
pytest's rootdir), and a folder with an `__init__.py` found there wins over any installed package
of the same name. A top-level `kernels/` once shadowed Hugging Face's `kernels` package, which
transformers imports when a model module loads, and broke every model from the repository root.
"""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run from the repository root, as `python -m minivllm ...` would: for each name, where does it
# resolve? Printed as JSON {name: origin or null}.
_RESOLVE = """
import importlib.util, json, sys
out = {}
for name in sys.argv[1:]:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    out[name] = None if spec is None else (spec.origin or list(spec.submodule_search_locations or []))
print(json.dumps(out))
"""


def installed_top_level_names() -> set[str]:
    """Every top-level import name some installed distribution other than minivllm provides."""
    names = set()
    for name, dists in importlib.metadata.packages_distributions().items():
        if name.isidentifier() and set(dists) != {"minivllm"}:
            names.add(name)
    return names


def resolve_from_root(names) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _RESOLVE, *sorted(names)],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=120,
    )
    return json.loads(result.stdout)


def test_no_installed_package_resolves_into_the_repository():
    names = installed_top_level_names() | {"kernels"}  # kernels: the name that bit us, installed or not
    shadowed = {}
    for name, origin in resolve_from_root(names).items():
        paths = origin if isinstance(origin, list) else [origin]
        if any(p and Path(p).resolve().is_relative_to(ROOT) for p in paths):
            shadowed[name] = origin
    assert not shadowed, f"repository folders shadow installed packages from its root: {shadowed}"


def test_the_resolver_sees_a_shadowing_folder(tmp_path):
    """The check above can fail: a planted top-level package is found, and reported, by it."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    result = subprocess.run(
        [sys.executable, "-c", _RESOLVE, "kernels"],
        cwd=tmp_path, capture_output=True, text=True, check=True, timeout=60,
    )
    origin = json.loads(result.stdout)["kernels"]
    assert Path(origin).resolve() == (tmp_path / "kernels" / "__init__.py").resolve()
