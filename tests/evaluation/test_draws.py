"""N posterior draws in one batch (row i with draw i's LoRA factors) against the same draws one pass at a time."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_bayes import BayesLoraConfig
from peft_bayes.evaluation.draws import DrawSet, capture
from peft_bayes.posterior import BayesLoraPosterior, Ensemble, MCDropout
from peft_bayes.posterior.base import Posterior, swapped_weights
from peft_bayes.tiny import build_tiny_model

N = 3
CLOSE = {"rtol": 1e-5, "atol": 1e-5}  # float32 logits: bmm against addmm, a few ulp of values of order 1


class NoisyLora(Posterior):
    """Hand-made draws: every LoRA factor plus seeded noise of scale 0.3."""

    name = "noisy-lora-test"

    def sample(self, seed: int):
        params = [p for n, p in self.model.named_parameters() if "lora_" in n]
        gen = torch.Generator().manual_seed(seed)
        return swapped_weights(params, [p + 0.3 * torch.randn(p.shape, generator=gen) for p in params])


@pytest.fixture(scope="module")
def base(tiny_tokenizer):
    return build_tiny_model("llama", tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=4).eval()


def lora(base, seed=0, config=None):
    torch.manual_seed(seed)
    config = config or LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(copy.deepcopy(base), config).eval()


def prompt(tokenizer) -> torch.Tensor:
    return tokenizer("3+4= the answer", return_tensors="pt")["input_ids"]


def sequential_logits(posterior, ids, n_answer) -> torch.Tensor:
    out = []
    for context, _ in posterior.passes(N, 7):
        with context, torch.no_grad():
            out.append(posterior.model(input_ids=ids).logits[:, -n_answer - 1 : -1])
    return torch.cat(out)


def check_batched_equals_sequential(posterior, tokenizer) -> None:
    draws = DrawSet(posterior, N, 7)
    assert draws.batched
    ids = prompt(tokenizer)
    batched = draws.logits(ids, 4)
    torch.testing.assert_close(batched, sequential_logits(posterior, ids, 4), **CLOSE)
    assert not torch.allclose(batched[0], batched[1])  # the draws really differ
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    together = draws.generate(ids, **kw)
    draws.batched = False  # the same draws, one generate call per pass
    assert [t.tolist() for t in together] == [t.tolist() for t in draws.generate(ids, **kw)]


def test_weight_draws_run_as_one_batch(base, tiny_tokenizer):
    model = lora(base)
    before = [p.clone() for p in model.parameters()]
    check_batched_equals_sequential(NoisyLora(model), tiny_tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model is as it was
    assert all("forward" not in vars(m) for m in model.modules())  # every patched forward is gone


def test_bayeslora_pass_draws_are_their_materialised_factor(base, tiny_tokenizer):
    model = lora(base, config=BayesLoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], init_std=0.3))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    check_batched_equals_sequential(BayesLoraPosterior(model, draw="pass"), tiny_tokenizer)


def test_ensemble_members_run_as_one_batch(base, tiny_tokenizer, tmp_path):
    folders = []
    for seed in range(N):
        folder = str(tmp_path / f"m{seed}")
        lora(base, seed).save_pretrained(folder)
        folders.append(folder)
    check_batched_equals_sequential(Ensemble.from_folders(copy.deepcopy(base), folders), tiny_tokenizer)


def test_draws_that_are_not_weight_values_run_pass_by_pass(base, tiny_tokenizer):
    model = lora(base, config=LoraConfig(r=4, target_modules=["v_proj"], lora_dropout=0.3, init_lora_weights=False))
    posterior = MCDropout(model)
    assert capture(posterior, N, 0) is None
    draws = DrawSet(posterior, N, 0)
    assert not draws.batched
    got = draws.logits(prompt(tiny_tokenizer), 2)
    assert got.shape[0] == N and not torch.allclose(got[0], got[1])
    forward = BayesLoraPosterior(lora(base, config=BayesLoraConfig(r=4, target_modules=["v_proj"])), draw="forward")
    assert not DrawSet(forward, N, 0).batched
    assert DrawSet(NoisyLora(lora(base)), 0, 0).logits(prompt(tiny_tokenizer), 2).shape[0] == 1  # the mean alone


def test_temperature_scales_the_token_probabilities(base, tiny_tokenizer):
    from peft_bayes.evaluation.answer_uncertainty import AnswerAnalyzer
    from peft_bayes.posterior import PointEstimate, TemperatureScaling

    model = lora(base)
    ids, answer = prompt(tiny_tokenizer), torch.tensor([5, 9, 11])
    plain = AnswerAnalyzer(PointEstimate(model), tiny_tokenizer, 0).analyse(ids, answer)
    hot = AnswerAnalyzer(TemperatureScaling(model, temperature=3.0), tiny_tokenizer, 0).analyse(ids, answer)
    logits = DrawSet(PointEstimate(model), 0, 0).logits(torch.cat([ids, answer.view(1, -1)], 1), 3)[0].double()
    want = (logits / 3.0).log_softmax(-1).gather(-1, answer.view(-1, 1)).squeeze(-1).exp()
    torch.testing.assert_close(torch.tensor(hot.per_token["bma_prob"], dtype=torch.float64), want)
    assert hot.means["predictive_entropy"] > plain.means["predictive_entropy"]  # T > 1 flattens every token
    assert hot.totals["mutual_information"] == plain.totals["mutual_information"] == 0.0
