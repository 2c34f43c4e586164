"""The registry plugs a tuner type that PEFT's enum does not know into PEFT, end to end."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import peft_bayes
from peft_bayes import registry


@dataclass
class ScaleConfig(PeftConfig):
    """Minimal test tuner: multiplies each target Linear's output by (1 + s), s a learned vector."""

    target_modules: list[str] | str | None = field(default=None)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = registry.peft_type_of("pbtestscale")


class ScaleLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("pbtestscale_s",)

    def __init__(self, base_layer: nn.Linear, adapter_name: str):
        super().__init__()
        self.base_layer = base_layer
        self.pbtestscale_s = nn.ParameterDict()
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self.update_layer(adapter_name)

    def update_layer(self, adapter_name: str, **kwargs):
        self.pbtestscale_s[adapter_name] = nn.Parameter(torch.zeros(self.base_layer.out_features))
        self.set_adapter(self.active_adapters)

    def forward(self, x, *args, **kwargs):
        y = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return y
        for name in self.active_adapters:
            if name in self.pbtestscale_s:
                y = y * (1 + self.pbtestscale_s[name])
        return y


class ScaleModel(BaseTuner):
    prefix = "pbtestscale_"
    tuner_layer_cls = ScaleLayer
    target_module_mapping = {"llama": ["q_proj", "v_proj"]}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, ScaleLayer):
            target.update_layer(adapter_name)
        else:
            self._replace_module(parent, target_name, ScaleLayer(target, adapter_name), target)


@pytest.fixture(scope="module")
def registered():
    return registry.register_tuner("pbtestscale", ScaleConfig, ScaleModel)


def _tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def test_round_trip_through_peft(registered, tmp_path):
    model = get_peft_model(_tiny_llama(), ScaleConfig(task_type="CAUSAL_LM"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("pbtestscale_s" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "pbtestscale_s" in n:
                p.normal_(0, 0.5)
    ids = torch.randint(0, 64, (2, 7))
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert '"peft_type": "PBTESTSCALE"' in (tmp_path / "adapter_config.json").read_text()

    loaded = PeftModel.from_pretrained(_tiny_llama(), tmp_path).eval()
    assert isinstance(loaded.peft_config["default"], ScaleConfig)
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)
    with loaded.disable_adapter():
        torch.testing.assert_close(loaded(input_ids=ids).logits, _tiny_llama()(input_ids=ids).logits)


def test_register_is_idempotent_and_refuses_conflicts(registered):
    assert registry.register_tuner("pbtestscale", ScaleConfig, ScaleModel) == registered
    assert registry.registered_tuners()["pbtestscale"] == registered
    with pytest.raises(KeyError, match="already registered"):
        registry.register_tuner("lora", ScaleConfig, ScaleModel, prefix="pbtestscale2_")
    with pytest.raises(ValueError, match="prefix"):
        registry.register_tuner("pbother", ScaleConfig, ScaleModel)
    with pytest.raises(ValueError, match="lower-case"):
        registry.register_tuner("BadName", ScaleConfig, ScaleModel)


def test_peft_version_guard():
    registry.check_peft_version()  # the installed version is accepted
    with pytest.raises(ImportError, match=r"peft_bayes needs peft>=0\.21\.0,<0\.22\.0.*peft 0\.9\.0 is installed"):
        registry.check_peft_version("0.9.0")
    with pytest.raises(ImportError, match="0.22.1"):
        registry.check_peft_version("0.22.1")
    assert peft_bayes.__version__
