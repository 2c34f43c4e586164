"""The ``parallel`` tuner: parallel adapters beside target Linear layers (plain or scaled)."""

from __future__ import annotations

from peft_bayes.tuners.adapter_mlp import AdapterMLPModel
from peft_bayes.tuners.parallel.config import TARGET_MODULES
from peft_bayes.tuners.parallel.layer import ParallelLayer


class ParallelAdapterModel(AdapterMLPModel):
    """Puts a [`ParallelLayer`] on each target module of a transformers model.

    Created by `peft.get_peft_model(model, ParallelAdapterConfig(...))` once `peft_bayes` is imported.
    """

    prefix: str = "parallel_"
    tuner_layer_cls = ParallelLayer
    target_module_mapping = TARGET_MODULES
