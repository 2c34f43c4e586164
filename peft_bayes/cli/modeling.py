"""Loading base models and tokenizers for the scripts: packaged models (``smollm2-135m``), local paths or Hub ids,
optional 8-bit / 4-bit bases."""

from __future__ import annotations

import functools
import os
import sys

import torch

from peft_bayes.errors import InputError
from peft_bayes.models import resolve_model

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
    from peft_bayes.data import Prompter
    from peft_bayes.data.prompts import CHAT

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
