"""Model shapes for the planner: a known model's name (fixtures/*.json, copies of the published config.json shapes),
a Hugging Face folder or config.json, or a ModelSpec YAML (as saved beside converted checkpoints).

Why fixtures: the planner must run on a login node with no checkpoint at hand; shapes are all it needs.
"""
from __future__ import annotations

import json
from pathlib import Path

from megatron_topd.models.spec import ModelSpec

FIXTURES = Path(__file__).parent / "fixtures"


def known_models() -> list[str]:
    return sorted(p.stem for p in FIXTURES.glob("*.json"))


def load_spec(source: str | Path) -> ModelSpec:
    """ModelSpec from a fixture name (e.g. "Llama-3.1-70B"), an HF folder, a config.json or a model_spec.yaml."""
    from megatron_topd.convert.families import spec_from_hf_config

    path = Path(source)
    if not path.exists():
        fixture = FIXTURES / f"{source}.json"
        if not fixture.exists():
            raise FileNotFoundError(f"{source!r} is neither a path nor a known model; known models: {known_models()}")
        path = fixture
    if path.is_dir():
        if (path / "config.json").exists():
            path = path / "config.json"
        elif (path / "model_spec.yaml").exists():
            return ModelSpec.load_yaml(path / "model_spec.yaml")
        else:
            raise FileNotFoundError(f"{path} has neither config.json nor model_spec.yaml")
    if path.suffix in (".yaml", ".yml"):
        return ModelSpec.load_yaml(path)
    return spec_from_hf_config(json.loads(path.read_text()))


def find_spec(inline: ModelSpec | None, paths) -> tuple[ModelSpec | None, list[str]]:
    """A run's model shape: ``inline`` (the config's own spec section) if given, else `load_spec` of the first of
    ``paths`` (checkpoint folder, HF folder) that exists here; also the paths tried that do not exist."""
    missing = []
    for path in paths:
        if inline is not None:
            break
        if path and Path(path).exists():
            inline = load_spec(path)
        elif path:
            missing.append(str(path))
    return inline, missing
