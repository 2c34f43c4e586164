"""One invariant battery for every adapter the library offers (PEFT's ``test_custom_models.py`` style).

The cases come from ``peft_bayes.tuners.catalogue.ADAPTERS``: the PEFT-native methods train.py offers and this
package's own tuners, built by the same code train.py uses. A tuner registered later joins by getting an
``--adapter_name`` entry; ``test_every_registered_tuner_is_in_the_battery`` fails until it does.

Invariants, on tiny LLaMA / GPT-2 / OPT / BLOOM / GPT-J / GPT-NeoX:
  identity-initialised adapters start equal to the base; ``disable_adapter()`` equals the base; only adapter
  parameters require grad and only they change in an optimizer step; save -> ``PeftModel.from_pretrained`` gives
  identical outputs; two adapters (both perturbed) switch cleanly; an adapter saved under any name loads back
  exactly under any name, and our tuners' checkpoint keys carry no adapter name; gradient checkpointing gives the
  same gradients; bf16 bases; a 4-bit base on CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_bayes import registry
from peft_bayes.cli.train import build_parser
from peft_bayes.errors import InputError
from peft_bayes.models import disable_bnb_cpu_repacking, enable_activation_checkpointing
from peft_bayes.tiny import TINY_ARCHITECTURES, build_tiny_model, save_tiny_model
from peft_bayes.tuners import catalogue as adapters

# PEFT's LoHa, LoKr and OFT wrap nn.Linear only, not GPT-2's Conv1D: attaching them must fail with a clear error.
UNSUPPORTED = {("loha", "gpt2"), ("lokr", "gpt2"), ("oft", "gpt2")}
NAMES = list(adapters.ADAPTERS)
CASES = [(n, a) for n in NAMES for a in TINY_ARCHITECTURES if (n, a) not in UNSUPPORTED]
IDENTITY_CASES = [(n, a) for n, a in CASES if not adapters.ADAPTERS[n].prompt_learning]
IDS = torch.tensor([[5, 17, 42, 99, 7, 120, 33], [64, 8, 8, 250, 31, 2, 77]])
SMALL = [
    "--base_model", "unused", "--lora_r", "4", "--lora_dropout", "0", "--oft_block_size", "4",
    "--num_virtual_tokens", "3", "--encoder_hidden_size", "16", "--bottleneck_size", "8",
]  # fmt: skip


def make_config(name: str, model_type: str, **overrides):
    args = build_parser().parse_args([*SMALL, "--adapter_name", name])
    config = adapters.build_peft_config(args, model_type, total_steps=10)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@pytest.fixture(scope="module")
def bases(tiny_tokenizer):
    return {a: build_tiny_model(a, tiny_tokenizer, hidden_size=32, num_heads=4).eval() for a in TINY_ARCHITECTURES}


def fresh(bases, arch):
    return copy.deepcopy(bases[arch])


def adapt(bases, name, arch, seed=0):
    torch.manual_seed(seed)
    return get_peft_model(fresh(bases, arch), make_config(name, bases[arch].config.model_type)).eval()


def renamed(param_name: str, old: str, new: str) -> str:
    """``param_name`` with its adapter-name component ``old`` (wherever it sits, last included) set to ``new``."""
    return f".{param_name}.".replace(f".{old}.", f".{new}.")[1:-1]


def perturb(model, adapter_name: str = "default", seed: int = 1, scale: float = 0.3) -> None:
    """Moves one adapter's weights away from their (often identity) initial values, active (trainable) or not.

    Parameters that are frozen by design (AdaLoRA's ``ranknum``) are recognised as those frozen in the trainable
    ``default`` adapter, and left alone: call this while ``default`` is the active adapter.
    """
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    in_default = [n for n in params if ".default." in f".{n}."]
    fixed = {renamed(n, "default", adapter_name) for n in in_default if not params[n].requires_grad}
    with torch.no_grad():
        for name, p in params.items():
            if f".{adapter_name}." in f".{name}." and p.is_floating_point() and name not in fixed:
                p.add_(scale * torch.randn(p.shape, generator=gen).to(p.dtype))


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids).logits
    return out[:, -ids.shape[1] :]  # prompt/p-tuning prepend virtual tokens


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_every_registered_tuner_is_in_the_battery():
    offered = {t for spec in adapters.ADAPTERS.values() for t in (spec.peft_type, *spec.also_builds)}
    for name, tuner in registry.registered_tuners().items():
        if not name.startswith("pbtest"):  # test_registry's throwaway tuner
            assert tuner.peft_type in offered, f"tuner {name} has no --adapter_name entry, so no battery coverage"


@pytest.mark.parametrize("name,arch", sorted(UNSUPPORTED))
def test_unsupported_layer_types_get_a_clear_error(bases, name, arch):
    with pytest.raises(InputError, match="cannot wrap this model's layers"):
        adapters.attach_adapter(fresh(bases, arch), make_config(name, "gpt2"))


@pytest.mark.parametrize("name,arch", IDENTITY_CASES)
def test_starts_equal_to_base(bases, name, arch):
    model = adapt(bases, name, arch)
    torch.testing.assert_close(logits(model), logits(bases[arch]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,arch", CASES)
def test_disabled_equals_base(bases, name, arch):
    model = adapt(bases, name, arch)
    perturb(model)
    base = logits(bases[arch])
    assert (logits(model) - base).abs().max() > 1e-3, "the perturbed adapter should change the outputs"
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base, rtol=0, atol=1e-6)
    assert (logits(model) - base).abs().max() > 1e-3, "leaving disable_adapter() re-enables the adapter"


@pytest.mark.parametrize("name,arch", CASES)
def test_only_adapter_parameters_train(bases, name, arch):
    model = adapt(bases, name, arch)
    perturb(model)  # so that every adapter weight gets a gradient (LoRA's A gets none while B = 0)
    trainable = trainable_names(model)
    assert trainable, "nothing to train"
    assert all(".default." in f".{n}." or "prompt_encoder" in n for n in trainable), sorted(trainable)[:5]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=IDS, labels=IDS).loss.backward()
    got_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert got_grad <= trainable
    assert changed and changed == got_grad, sorted(changed ^ got_grad)[:5]


@pytest.mark.parametrize("name,arch", CASES)
def test_save_load_round_trip(bases, name, arch, tmp_path):
    model = adapt(bases, name, arch)
    perturb(model)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(fresh(bases, arch), tmp_path).eval()
    assert type(loaded.peft_config["default"]) is type(model.peft_config["default"])
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)


def add_second_adapter(model, bases, name, arch, adapter_name: str = "other") -> None:
    """Adds a second adapter of the same kind, perturbed (non-identity) with another seed, left inactive."""
    # AdaLoRA allows one trainable adapter only; the second one is added for inference.
    second = make_config(name, bases[arch].config.model_type, inference_mode=(name == "adalora"))
    model.add_adapter(adapter_name, second)
    perturb(model, adapter_name, seed=2)


@pytest.mark.parametrize("name,arch", CASES)
def test_switching_between_two_adapters(bases, name, arch):
    model = adapt(bases, name, arch)
    perturb(model, "default", seed=1)
    out_default, base = logits(model), logits(bases[arch])
    add_second_adapter(model, bases, name, arch)
    torch.testing.assert_close(logits(model), out_default, rtol=0, atol=0)  # adding does not activate
    model.set_adapter("other")
    out_other = logits(model)
    assert (out_other - base).abs().max() > 1e-3, "the second adapter should be perturbed away from the base"
    assert (out_other - out_default).abs().max() > 1e-3, "the two adapters should differ"
    model.set_adapter("default")
    torch.testing.assert_close(logits(model), out_default, rtol=0, atol=0)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    torch.testing.assert_close(logits(model), out_default, rtol=0, atol=0)


@pytest.mark.filterwarnings("error:Found missing adapter keys")
@pytest.mark.parametrize("name,arch", CASES)
def test_named_adapter_round_trip(bases, name, arch, tmp_path):
    """An adapter saved under a name other than ``default`` loads back exactly, under any name."""
    model = adapt(bases, name, arch)
    perturb(model, "default", seed=1)
    out_default = logits(model)
    add_second_adapter(model, bases, name, arch)
    model.set_adapter("other")
    out_other = logits(model)
    assert (out_other - out_default).abs().max() > 1e-3 and (out_other - logits(bases[arch])).abs().max() > 1e-3
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    loaded = PeftModel.from_pretrained(fresh(bases, arch), tmp_path / "other").eval()  # as "default"
    torch.testing.assert_close(logits(loaded), out_other, rtol=0, atol=0)
    renamed_model = PeftModel.from_pretrained(fresh(bases, arch), tmp_path / "other", adapter_name="mine").eval()
    torch.testing.assert_close(logits(renamed_model), out_other, rtol=0, atol=0)
    model.set_adapter("default")
    model.save_pretrained(tmp_path / "first", selected_adapters=["default"])
    loaded.load_adapter(tmp_path / "first", adapter_name="first")  # a default-named save, loaded as "first"
    loaded.set_adapter("first")
    torch.testing.assert_close(logits(loaded), out_default, rtol=0, atol=0)
    loaded.set_adapter("default")
    torch.testing.assert_close(logits(loaded), out_other, rtol=0, atol=0)


OWN_TYPES = {t.peft_type for t in registry.registered_tuners().values()}
OWN_CASES = [(n, a) for n, a in CASES if adapters.ADAPTERS[n].peft_type in OWN_TYPES]


@pytest.mark.parametrize("name,arch", OWN_CASES)
def test_saved_keys_carry_no_adapter_name(bases, name, arch):
    """Our tuners' checkpoint keys are the same whatever the adapter is called: PEFT strips the name on saving and
    puts the loading adapter's name back, but only where its own tuners keep it (``lora_A.<name>.weight``)."""
    model = adapt(bases, name, arch)
    add_second_adapter(model, bases, name, arch, adapter_name="second")
    keys = {a: set(get_peft_model_state_dict(model, adapter_name=a)) for a in ("default", "second")}
    assert keys["default"] and keys["default"] == keys["second"], sorted(keys["default"] ^ keys["second"])[:4]
    stray = [k for k in keys["second"] if {"default", "second"} & set(k.split("."))]
    assert not stray, stray[:4]


def _grads(model) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # the same dropout masks and posterior draws (bayeslora samples in training mode)
    model.train()
    model.zero_grad()
    model(input_ids=IDS, labels=IDS).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,arch", CASES)
def test_gradient_checkpointing_gives_the_same_gradients(bases, name, arch):
    if not adapters.ADAPTERS[name].checkpointing_ok:
        pytest.skip(f"{name} does not support gradient checkpointing (train.py refuses the combination)")
    model = adapt(bases, name, arch)
    perturb(model)
    plain = _grads(model)
    enable_activation_checkpointing(model.base_model)
    model.enable_input_require_grads()
    checkpointed = _grads(model)
    assert plain and plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,arch", CASES)
def test_bf16_base(bases, name, arch, tmp_path):
    model = adapt(bases, name, arch)
    perturb(model)
    expected, base32 = logits(model), logits(bases[arch])
    model.save_pretrained(tmp_path)
    base16 = fresh(bases, arch).to(torch.bfloat16)
    if not adapters.ADAPTERS[name].prompt_learning:
        fresh16 = get_peft_model(copy.deepcopy(base16), make_config(name, bases[arch].config.model_type)).eval()
        start, base_out = logits(fresh16).float(), logits(base16).float()
        if name == "dora":  # DoRA rescales W by m / ||W||, recomputed in bf16: 1 up to bf16 rounding, not exactly
            assert (start - base_out).norm() / base_out.norm() < 0.02
        else:
            torch.testing.assert_close(start, base_out, rtol=0, atol=1e-6)
    loaded = PeftModel.from_pretrained(base16, tmp_path).eval()
    out = logits(loaded)
    assert out.dtype == torch.bfloat16 and out.isfinite().all()
    # bf16 keeps ~3 significant digits. Normwise, the bf16 logits are within 8% of the fp32 ones (measured: at most
    # 3.6% over all cases) and, more tellingly, their error is under a tenth of what the adapter changes (at most
    # 2.8%); an adapter ignored or mis-cast in bf16 would miss the latter by a factor of ten.
    err = (out.float() - expected).norm()
    assert err / expected.norm() < 0.08
    assert err / (expected - base32).norm() < 0.1


QUANT_CASES = [(n, a) for n in NAMES for a in ("llama", "gpt2") if (n, a) not in UNSUPPORTED]


@pytest.fixture(scope="module")
def quantized_dirs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("q4")
    return {a: save_tiny_model(root / a, a, tokenizer=tiny_tokenizer, hidden_size=64) for a in ("llama", "gpt2")}


def _load_4bit(folder):
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=q).eval()
    disable_bnb_cpu_repacking(model)  # these tests train after an eval forward (see the function's docstring)
    return model


@pytest.mark.parametrize("name,arch", QUANT_CASES)
def test_4bit_base(quantized_dirs, name, arch, tmp_path):
    import bitsandbytes as bnb

    spec = adapters.ADAPTERS[name]
    if not spec.quantized_ok:
        pytest.skip(f"PEFT's {name} does not support bitsandbytes layers (train.py refuses the combination)")
    base = _load_4bit(quantized_dirs[arch])
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    base_out = logits(base)
    torch.manual_seed(0)
    model = get_peft_model(base, make_config(name, base.config.model_type)).eval()
    if not spec.prompt_learning:
        torch.testing.assert_close(logits(model), base_out, rtol=0, atol=1e-6)
    perturb(model)
    expected = logits(model)
    assert (expected - base_out).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base_out, rtol=0, atol=1e-6)
    grads = _grads(model)
    assert grads and set(grads) <= trainable_names(model)
    model.eval().save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_load_4bit(quantized_dirs[arch]), tmp_path).eval()
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)
