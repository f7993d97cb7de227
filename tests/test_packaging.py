"""Packaging: the runtime requirements are exactly what the package imports, and it works without the rest.

What is checked:

- `install_requires` in setup.cfg is exactly the set of distributions whose modules `perceiver_hf/` imports
  unconditionally (parsed with `ast`, at module level or inside functions), and every module it imports only
  behind a guard (`try: ... except ImportError`, or `if is_..._available():`) comes from a distribution that is
  in an extra, not in `install_requires`. `datasets`, `accelerate` and `evaluate` are in the `examples` and
  `testing` extras, which the examples and the tests need.
- The package imports and works in a child interpreter where Pillow, datasets, accelerate and evaluate cannot
  be imported: a saved processor and image model load, NumPy arrays and torch tensors are preprocessed (close
  to what the Pillow path gives: resizing falls back to torch's antialiased interpolation), the model runs,
  a tokenizer trains, and a Pillow-only resampling filter raises an `ImportError` saying what to install.
- The same in a fresh virtual environment (no system site-packages) where the package is pip-installed from a
  copy of its sources with its declared dependencies only, constrained by constraints.txt: about a minute,
  most of it unpacking torch (pip finds it in the machine's local wheel directory or its cache).
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement
from perceiver_tester import tiny_image_config

from perceiver_hf import PerceiverForImageClassification, PerceiverImageProcessor, PerceiverProcessor

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = REPO_ROOT / "perceiver_hf"
# Needed by the examples and the tests, never imported by the package.
NOT_RUNTIME = {"datasets", "accelerate", "evaluate", "pillow"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------------------------------------------
# install_requires against the package's imports (ast)
# ---------------------------------------------------------------------------------------------------


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:  # bare except
        return True
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    caught = {name.id if isinstance(name, ast.Name) else getattr(name, "attr", "") for name in names}
    return bool(caught & {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"})


def _is_availability_check(test: ast.expr) -> bool:
    """`if is_vision_available():`, `if is_torch_available() and ...:` and the like."""
    for node in ast.walk(test):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if re.fullmatch(r"is_\w+_available", name):
                return True
    return False


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def third_party_imports(source: str) -> tuple[set[str], set[str]]:
    """(unconditional, guarded) top-level names of the non-standard-library modules that `source` imports.

    Guarded: inside the body of a `try` that catches ImportError, or of an `if` that calls an `is_*_available()`
    function. Imports under `if TYPE_CHECKING:` never run and are left out; relative imports are the package's own.
    """
    required: set[str] = set()
    optional: set[str] = set()

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            catches = any(_catches_import_error(handler) for handler in node.handlers)
            for child in node.body:
                visit(child, guarded or catches)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, guarded)
            return
        if isinstance(node, ast.If):
            if _is_type_checking(node.test):
                for child in node.orelse:
                    visit(child, guarded)
                return
            if _is_availability_check(node.test):
                for child in node.body:
                    visit(child, True)
                for child in node.orelse:
                    visit(child, guarded)
                return
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        for module in modules:
            top = module.split(".")[0]
            if top not in sys.stdlib_module_names and top not in ("__future__", "perceiver_hf"):
                (optional if guarded else required).add(top)
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(ast.parse(source), False)
    return required, optional - required


def test_import_classifier_tells_guarded_from_unconditional_imports() -> None:
    source = textwrap.dedent(
        """
        from __future__ import annotations
        import os, numpy as np
        from torch import nn
        from .adapters import X
        from perceiver_hf import Y
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            import pandas
        try:
            import PIL.Image
        except ImportError:
            import imageio
        if is_vision_available():
            from PIL import Image
        else:
            import cv2
        def f():
            from transformers import AutoConfig
            try:
                import scipy
            except (ValueError, ModuleNotFoundError):
                pass
        """
    )
    assert third_party_imports(source) == ({"numpy", "torch", "imageio", "cv2", "transformers"}, {"PIL", "scipy"})


def package_imports() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(unconditional, guarded-only) imports of perceiver_hf/: top-level module -> files importing it."""
    required: dict[str, set[str]] = {}
    optional: dict[str, set[str]] = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        file_required, file_optional = third_party_imports(path.read_text())
        for module in file_required:
            required.setdefault(module, set()).add(path.name)
        for module in file_optional:
            optional.setdefault(module, set()).add(path.name)
    return required, {module: files for module, files in optional.items() if module not in required}


def distribution_of(module: str) -> str:
    distributions = importlib.metadata.packages_distributions().get(module)
    assert distributions, f"no installed distribution provides the module {module!r} that perceiver_hf imports"
    return normalize(distributions[0])


def setup_cfg_requirements() -> tuple[set[str], dict[str, set[str]]]:
    """(install_requires, {extra: requirements}) of setup.cfg, as normalized distribution names."""
    parser = configparser.ConfigParser()
    parser.read(REPO_ROOT / "setup.cfg")

    def names(value: str) -> set[str]:
        lines = [line.split("#")[0].strip() for line in value.splitlines()]
        return {normalize(Requirement(line).name) for line in lines if line}

    extras = {extra: names(value) for extra, value in parser["options.extras_require"].items()}
    return names(parser["options"]["install_requires"]), extras


def test_install_requires_are_exactly_the_package_imports() -> None:
    install_requires, extras = setup_cfg_requirements()
    required, optional = package_imports()
    assert {"torch", "transformers"} <= set(required), required  # the parser sees the imports at all
    imported = {distribution_of(module): module for module in required}
    missing = {dist: sorted(required[module]) for dist, module in imported.items() if dist not in install_requires}
    assert not missing, f"imported by perceiver_hf (files listed) but not in install_requires: {missing}"
    unused = install_requires - set(imported)
    assert not unused, f"in install_requires but never imported by perceiver_hf: {sorted(unused)}"

    in_extras = set().union(*extras.values())
    for module, files in optional.items():
        dist = distribution_of(module)
        assert dist not in install_requires, f"{dist} is only imported behind a guard ({sorted(files)}): an extra"
        assert dist in in_extras, f"{dist} (guarded import in {sorted(files)}) is in no extra: {extras}"


def test_examples_and_testing_extras_keep_what_the_package_does_not_import() -> None:
    install_requires, extras = setup_cfg_requirements()
    assert not NOT_RUNTIME & install_requires
    for extra in ("examples", "testing"):
        assert extras[extra] >= NOT_RUNTIME, (extra, NOT_RUNTIME - extras[extra])
    assert "ruff" in extras["testing"]
    assert extras["vision"] == {"pillow"}


# ---------------------------------------------------------------------------------------------------
# Working without the optional dependencies
# ---------------------------------------------------------------------------------------------------

# Runs in a child interpreter. argv[1]: JSON {"block": top-level modules made unimportable, "model": saved model
# and processor, "data": inputs, "out": results}.
CHILD = textwrap.dedent(
    """
    import importlib.util, json, sys
    args = json.loads(sys.argv[1])
    for name in args["block"]:
        sys.modules[name] = None  # `import name` now raises ModuleNotFoundError; find_spec gives None
    for name in ("PIL", "datasets", "accelerate", "evaluate"):
        assert importlib.util.find_spec(name) is None, f"{name} is importable in the child"

    import torch
    import perceiver_hf
    from perceiver_hf import (
        PerceiverForImageClassification, PerceiverImageProcessor, PerceiverProcessor, train_wordpiece_tokenizer
    )
    from transformers.utils import is_vision_available

    assert not is_vision_available()
    data = torch.load(args["data"])
    images = [image.numpy() if is_array else image for image, is_array in zip(data["images"], data["is_array"])]
    # PerceiverProcessor loads its image processor without transformers' AutoImageProcessor (Pillow-only).
    processor = PerceiverProcessor.from_pretrained(args["model"])
    assert type(processor.image_processor) is PerceiverImageProcessor
    pixel_values = [
        processor(images=[image], return_tensors="pt")["pixel_values"][0] for image in images
    ]
    model = PerceiverForImageClassification.from_pretrained(args["model"]).eval()
    with torch.no_grad():
        logits = model(pixel_values=data["pixel_values"]).logits
    try:
        PerceiverImageProcessor(resample=1)(images=[images[0]])  # LANCZOS: Pillow only
        pillow_error = None
    except ImportError as error:
        pillow_error = str(error)
    tokenizer = train_wordpiece_tokenizer(["a tiny corpus", "of a few words", "a few more"], vocab_size=40)
    torch.save(
        {
            "module_file": perceiver_hf.__file__,
            "pixel_values": pixel_values,
            "logits": logits,
            "pillow_error": pillow_error,
            "tokens": tokenizer.tokenize("a tiny corpus"),
        },
        args["out"],
    )
    """
)


@pytest.fixture(scope="module")
def saved_image_model(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny image model and its processor saved together, inputs (arrays of other sizes, RGBA, a float tensor)
    and what this process, with Pillow, makes of them."""
    directory = tmp_path_factory.mktemp("packaging")
    torch.manual_seed(0)
    config = tiny_image_config()
    model = PerceiverForImageClassification(config).eval()
    image_processor = PerceiverImageProcessor.from_perceiver_config(config)
    model.save_pretrained(directory / "model")
    PerceiverProcessor(image_processor=image_processor).save_pretrained(directory / "model")
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (13, 11, 3), dtype=np.uint8),  # HWC, downsampled
        rng.integers(0, 256, (5, 4, 4), dtype=np.uint8),  # RGBA, upsampled
        torch.rand(3, 9, 12),  # CHW float tensor in [0, 1]
    ]
    pixel_values = [image_processor(images=[image], return_tensors="pt")["pixel_values"][0] for image in images]
    batch = torch.stack(pixel_values)
    with torch.no_grad():
        logits = model(pixel_values=batch).logits
    # NumPy arrays travel as tensors: the child's torch.load takes tensors only (weights_only).
    is_array = [isinstance(image, np.ndarray) for image in images]
    images = [torch.from_numpy(image) if array else image for image, array in zip(images, is_array, strict=True)]
    torch.save({"images": images, "is_array": is_array, "pixel_values": batch}, directory / "data.pt")
    # One grey level and a half, in normalized units: Pillow resizes 8-bit pixels, torch floats.
    atol = 1.5 / 255 / min(image_processor.image_std)
    return {"dir": directory, "pixel_values": pixel_values, "logits": logits, "atol": atol}


def run_child(python: str, saved: dict, block: list[str], env: dict[str, str]) -> dict:
    out = saved["dir"] / f"out-{len(block)}-{time.monotonic_ns()}.pt"
    args = {
        "block": block,
        "model": str(saved["dir"] / "model"),
        "data": str(saved["dir"] / "data.pt"),
        "out": str(out),
    }
    result = subprocess.run(
        [python, "-c", CHILD, json.dumps(args)],
        cwd=saved["dir"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


def check_child_results(results: dict, saved: dict) -> None:
    assert len(results["pixel_values"]) == len(saved["pixel_values"])
    for got, expected in zip(results["pixel_values"], saved["pixel_values"], strict=True):
        assert got.shape == expected.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=saved["atol"])
    torch.testing.assert_close(results["logits"], saved["logits"])
    assert results["pillow_error"] is not None, "a Pillow-only filter worked without Pillow"
    assert "pip install pillow" in results["pillow_error"], results["pillow_error"]
    assert results["tokens"] and all(isinstance(token, str) for token in results["tokens"])


def child_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def test_package_works_where_pillow_and_the_extras_cannot_be_imported(saved_image_model: dict) -> None:
    env = child_env()
    env["PYTHONPATH"] = str(REPO_ROOT)  # the checkout, also where the package is not pip-installed
    results = run_child(sys.executable, saved_image_model, ["PIL", "datasets", "accelerate", "evaluate"], env)
    assert Path(results["module_file"]).resolve().is_relative_to(PACKAGE_DIR)
    check_child_results(results, saved_image_model)


def test_fresh_venv_with_only_the_declared_dependencies(saved_image_model: dict, tmp_path: Path) -> None:
    """pip-installs a copy of the package's sources (no extras) into a new venv without system site-packages."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(PACKAGE_DIR, source / "perceiver_hf", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = tmp_path / "venv"
    env = child_env()
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env, timeout=300)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "-c", str(REPO_ROOT / "constraints.txt"), str(source)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, (install.stdout + install.stderr)[-4000:]
    installed = subprocess.run(
        [python, "-m", "pip", "list", "--format=json"], env=env, capture_output=True, text=True, check=True
    )
    names = {normalize(package["name"]) for package in json.loads(installed.stdout)}
    assert {"perceiver-hf", "torch", "transformers"} <= names
    assert not names & NOT_RUNTIME, sorted(names & NOT_RUNTIME)
    print(f"venv and install: {time.monotonic() - start:.0f} s")

    results = run_child(python, saved_image_model, [], env)
    assert Path(results["module_file"]).resolve().is_relative_to(venv), results["module_file"]
    check_child_results(results, saved_image_model)
