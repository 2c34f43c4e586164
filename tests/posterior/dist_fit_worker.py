"""Worker of test_distributed_fit: fits a Laplace posterior on a fixed tiny model and data, in one process or under
``torchrun`` (gloo), and (rank 0) saves it with its log marginal likelihood.
Usage: worker.py OUT STRUCTURE FISHER [KFAC_RANK] (low-rank factors above width 8)."""

from __future__ import annotations

import json
import os
import sys

import torch


def main(out: str, structure: str, fisher: str, kfac_rank: str | None = None) -> None:
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model

    from peft_bayes.data.answers import infer_task
    from peft_bayes.data.synthetic import make_choice_problems
    from peft_bayes.evaluation.choice_scoring import example_options, gold_indices, label_pairs
    from peft_bayes.evaluation.predictive import PairScorer
    from peft_bayes.posterior import Laplace
    from peft_bayes.tiny import build_tiny_model, build_tokenizer

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_model("gpt2", tok, hidden_size=16, num_layers=2, num_heads=2).double()
    config = LoraConfig(r=2, target_modules=["c_attn", "mlp.c_proj"], init_lora_weights=False, fan_in_fan_out=True)
    model = get_peft_model(model, config).double().eval()
    records = make_choice_problems(10, seed=3, n_options=3)
    task = infer_task(records, "fit")
    options = [example_options(r, task) for r in records]
    pairs = [label_pairs(r["instruction"], o) for r, o in zip(records, options)]
    batches = PairScorer(model, tok, pairs, 2, "full", "none", gold_indices(records, options, "fit")).batches()
    low_rank = {"kfac_rank": int(kfac_rank), "kfac_threshold": 8} if kfac_rank else {}
    laplace = Laplace(model, structure=structure, fisher=fisher, fisher_samples=2, **low_rank)
    laplace.fit(batches)
    if not dist.is_initialized() or dist.get_rank() == 0:
        laplace.save(out)
        with open(os.path.join(out, "result.json"), "w", encoding="utf-8") as f:
            json.dump({"lml": float(laplace.log_marginal_likelihood()), "n_data": laplace.n_data}, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
