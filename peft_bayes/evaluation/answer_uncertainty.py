"""How sure a posterior is of a generated answer: the answer teacher-forced under N weight draws (token level) and
N answers generated one per draw (answer level), both as one batch where the draws allow it (``DrawSet``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from peft_bayes.data.answers import TaskSpec, extract_number, get_task
from peft_bayes.evaluation.draws import DrawSet
from peft_bayes.evaluation.uncertainty import AnswerUncertainty, Thresholds, describe, token_uncertainty

DEFAULT_GENERATE_SAMPLES = 8  # generate.py's N when --samples is not given (fewer for a smaller ensemble)


def generate_samples(posterior, requested: int | None) -> int:
    """generate.py's number of draws: ``requested``, else the posterior's default capped at 8 (0 for a point
    estimate)."""
    if requested is not None:
        return posterior.resolve_samples(requested)
    return min(posterior.resolve_samples(None), DEFAULT_GENERATE_SAMPLES)


def answer_ids(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    """The generated ids without trailing end-of-sequence and padding tokens."""
    stop = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    end = len(ids)
    while end and int(ids[end - 1]) in stop:
        end -= 1
    return ids[:end]


class AnswerAnalyzer:
    """Scores answers of one prompt template under ``samples`` draws of ``posterior`` (seeded by ``seed``).

    Args:
        posterior: Any [`Posterior`]; its ``model`` generates and scores.
        tokenizer: The model's tokenizer.
        samples: N draws (0: the point estimate alone, epistemic part 0).
        seed: Seed of the draws (the same draws for every answer).
        gen_kwargs: ``generate`` keyword arguments of the sampled answers.
        task: How the sampled answers are grouped: ``"auto"`` (by the final number when the main answer has one,
            else by normalised text), ``"text"``, a task name or a ``TaskSpec`` (its answer extraction).
        thresholds: When an answer is called uncertain, and how many tokens are marked.
    """

    def __init__(self, posterior, tokenizer, samples: int, seed: int = 0, gen_kwargs: dict | None = None,
                 task: TaskSpec | str = "auto", thresholds: Thresholds | None = None) -> None:  # fmt: skip
        self.posterior, self.tokenizer, self.samples, self.seed = posterior, tokenizer, samples, seed
        self.gen_kwargs = {"max_new_tokens": 128, "do_sample": False, **(gen_kwargs or {})}
        self.gen_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        self.task, self.thresholds = task, thresholds
        self._draws: DrawSet | None = None

    def set_samples(self, requested: int) -> int:
        """Changes N (the web page's control): the posterior's ``resolve_samples``; the draws are read again."""
        n = self.posterior.resolve_samples(requested)
        if n != self.samples:
            self.samples, self._draws = n, None
        return n

    def task_for(self, answer: str) -> TaskSpec | None:
        """The answer extraction that groups the sampled answers of ``answer`` (None: normalised text)."""
        if isinstance(self.task, TaskSpec):
            return self.task
        if self.task == "text" or (self.task == "auto" and extract_number(answer) is None):
            return None
        return get_task("gsm8k" if self.task == "auto" else self.task)

    @property
    def draws(self) -> DrawSet:
        if self._draws is None:  # read off the posterior once: the same N draws for every answer
            self._draws = DrawSet(self.posterior, self.samples, self.seed)
        return self._draws

    def analyse(self, prompt_ids: torch.Tensor, generated: torch.Tensor,
                progress: Callable[[str], None] | None = None) -> AnswerUncertainty:  # fmt: skip
        """The uncertainty of the main answer ``generated`` (ids after the (1, T) ``prompt_ids``)."""
        say = progress or (lambda _: None)
        main = answer_ids(self.tokenizer, generated.to(prompt_ids.device))
        samples: list[str] = []
        if self.samples:
            say(f"generating {self.samples} answers, one per posterior draw")
            texts = self.draws.generate(prompt_ids, **self.gen_kwargs)
            samples = [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in texts]
        say(f"scoring the answer's tokens under {max(self.samples, 1)} draw(s)")
        ids = main if len(main) else generated[:1].to(prompt_ids.device)
        logits = self.draws.logits(torch.cat([prompt_ids, ids.view(1, -1)], dim=1), len(ids))
        metrics = token_uncertainty(logits / self.posterior.token_temperature(), ids)
        if not len(main):  # an empty answer: nothing to score
            metrics = {k: v[:0] for k, v in metrics.items()}
        text = self.tokenizer.decode(main, skip_special_tokens=True)
        tokens = [self.tokenizer.decode([int(i)], skip_special_tokens=True) for i in main]
        result = describe(text, tokens, [int(i) for i in main], metrics, samples, max(self.samples, 1),
                          self.task_for(text), self.thresholds)  # fmt: skip
        result.extra = {"batched_draws": self.draws.batched, "posterior": self.posterior.name}
        return result
