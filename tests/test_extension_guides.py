"""The extension guides run as written: `docs/adding_a_head.md` and `docs/adding_a_modality.md` (and the examples of
`docs/configuration.md`).

Each guide's ```python blocks run in order. A block that starts with `# tests/perceiver_tester.py` (the guide's
`HeadSpec`) runs in a copy of the tester's namespace, with an empty `HEAD_SPECS` to collect it; the others are
written together to one module file and imported, so `save_pretrained` can save the code of a head that the guide
registers for an Auto class. Then the guide's head trains a step, saves and reloads through its Auto class, and
its `HeadSpec` passes some of the shared tester's tests. What the guides register (an Auto class entry, an input
adapter name) is undone afterwards, so other tests never see it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import ModuleType

import perceiver_tester
import pytest
import torch
from perceiver_tester import HeadSpec
from transformers import AutoModelForTokenClassification

from perceiver_hf import PerceiverConfig
from perceiver_hf.configuration_perceiver import INPUT_ADAPTERS

DOCS = Path(__file__).resolve().parent.parent / "docs"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
TESTER_BLOCK = "# tests/perceiver_tester.py"
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class GuideHeadSpec(HeadSpec):
    """A guide's `HeadSpec`, with the `position_wise` edit the head guide makes to the tester."""

    per_position: bool = False

    @property
    def position_wise(self) -> bool:
        return self.per_position or super().position_wise


def python_blocks(guide: str) -> list[str]:
    blocks = PYTHON_BLOCK.findall((DOCS / guide).read_text())
    assert blocks, f"no python code blocks in docs/{guide}"
    return blocks


@contextmanager
def restored(mapping: MutableMapping, key: object) -> Iterator[None]:
    """Put `mapping[key]` back as it was (absent, or its old value) on exit."""
    previous = mapping.get(key, _MISSING)
    try:
        yield
    finally:
        if previous is _MISSING:
            mapping.pop(key, None)
        else:
            mapping[key] = previous


def run_guide(guide: str, directory: Path) -> tuple[ModuleType, list[GuideHeadSpec]]:
    """Import the guide's code as a module (written to `directory`), then run its tester blocks; returns the module
    and the `HeadSpec`s the guide adds."""
    blocks = python_blocks(guide)
    name = "guide_" + Path(guide).stem
    path = directory / f"{name}.py"
    path.write_text("\n\n".join(block for block in blocks if not block.startswith(TESTER_BLOCK)))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # where save_pretrained looks up the file of a class registered for an Auto class
    spec.loader.exec_module(module)

    namespace = {key: value for key, value in vars(module).items() if not key.startswith("__")}
    namespace.update(vars(perceiver_tester))
    namespace["HEAD_SPECS"] = []
    for block in blocks:
        if block.startswith(TESTER_BLOCK):
            exec(compile(block, f"docs/{guide} (tester block)", "exec"), namespace)
    return module, [
        GuideHeadSpec(**{f.name: getattr(s, f.name) for f in dataclasses.fields(s)}) for s in namespace["HEAD_SPECS"]
    ]


def train_save_reload(spec: HeadSpec, directory: Path) -> None:
    """One optimizer step with a finite loss that moves the weights, then `save_pretrained` and a reload through
    the spec's Auto class that gives the same outputs."""
    model = spec.build().train()
    inputs = spec.inputs(model.config, lengths=[7, 4])
    labels = spec.labels(model.config, inputs)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(**inputs, labels=labels).loss
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    moved = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert len(moved) >= 0.8 * len(before), sorted(set(before) - set(moved))

    model.eval().save_pretrained(directory)
    reloaded = spec.auto_class.from_pretrained(directory).eval()
    assert type(reloaded) is spec.model_class
    with torch.no_grad():
        torch.testing.assert_close(spec.main_output(reloaded(**inputs)), spec.main_output(model(**inputs)))


def run_shared_tester(spec: HeadSpec, directory: Path) -> None:
    """Some of the tests that `HEAD_SPECS` parametrizes, on the guide's spec: what adding it there gives for free."""
    import test_hf_integration
    import test_modeling

    test_modeling.test_head_output_shapes_and_loss(spec)
    test_modeling.test_head_eager_equals_sdpa(spec)
    test_modeling.test_head_batch_independence(spec)
    if spec.is_text:
        test_modeling.test_head_padding_invariance(spec, "sdpa")
    directory.mkdir()
    test_hf_integration.test_save_and_load_round_trip_is_bit_exact(spec, directory)


def test_adding_a_head_guide_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the guide saves to a relative folder
    extra_models = AutoModelForTokenClassification._model_mapping._extra_content
    before = dict(extra_models)
    with restored(extra_models, PerceiverConfig), restored(sys.modules, "guide_adding_a_head"):
        module, (spec,) = run_guide("adding_a_head.md", tmp_path)
        head = module.PerceiverForTokenClassification
        assert spec.model_class is head and spec.auto_class is AutoModelForTokenClassification
        assert type(AutoModelForTokenClassification.from_config(spec.make_config())) is head
        # The guide's own run saved the model with its code (`register_for_auto_class`).
        saved = tmp_path / "token-classifier"
        assert (saved / "guide_adding_a_head.py").exists()
        auto_map = json.loads((saved / "config.json").read_text())["auto_map"]
        assert auto_map["AutoModelForTokenClassification"] == "guide_adding_a_head.PerceiverForTokenClassification"

        spec = dataclasses.replace(spec, per_position=True)  # the guide's `position_wise` edit
        assert spec.output_shape(spec.make_config(), 2, 9) == (2, 9, perceiver_tester.NUM_LABELS)
        train_save_reload(spec, tmp_path / "trained")
        run_shared_tester(spec, tmp_path / "round_trip")
    assert extra_models == before


def test_adding_a_modality_guide_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    adapters_before = dict(INPUT_ADAPTERS)
    with ExitStack() as stack:
        stack.enter_context(restored(INPUT_ADAPTERS, "points"))
        stack.enter_context(restored(sys.modules, "guide_adding_a_modality"))
        module, (spec,) = run_guide("adding_a_modality.md", tmp_path)

        # The guide's run: latents of the padded clouds, and a classifier saved with the adapter's settings nested.
        assert module.latents.shape == (2, 8, 16)
        assert torch.isfinite(module.loss)
        saved = json.loads((tmp_path / "point-classifier" / "config.json").read_text())
        assert saved["input_adapter"] == "points"
        assert saved["input_adapter_config"] == {
            "num_point_channels": 4, "num_coordinates": 3, "num_frequency_bands": 4, "max_frequency": 32.0
        }  # fmt: skip
        assert type(module.reloaded) is module.PerceiverForPointCloudClassification

        config = spec.make_config()
        adapter = module.PointCloudInputAdapter(4, 3, 3, 32.0)
        assert adapter(torch.zeros(2, 5, 4)).shape == (2, 5, 4 + 2 * 3 * 3) and adapter.num_input_channels == 22
        with pytest.raises(ValueError, match=r"points must have shape \(batch, points, 4\)"):
            adapter(torch.zeros(2, 5, 3))
        with pytest.raises(ValueError, match=r"num_coordinates \(5\) must not exceed num_point_channels \(3\)"):
            PerceiverConfig(input_adapter="points", num_coordinates=5)
        assert config.num_point_channels == 4 and "num_point_channels" not in config.to_dict()
        train_save_reload(spec, tmp_path / "trained")
        run_shared_tester(spec, tmp_path / "round_trip")
    assert adapters_before == INPUT_ADAPTERS


def test_configuration_guide_runs() -> None:
    """The examples of `docs/configuration.md` (adapter settings, the weight-sharing patterns) hold."""
    namespace: dict = {}
    for block in python_blocks("configuration.md"):
        exec(compile(block, "docs/configuration.md", "exec"), namespace)
