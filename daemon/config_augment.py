"""The ``[augment]`` config section: which augmentation method, how much, and with what.

``method`` names a method registered as kind ``"augment"`` (:mod:`policies.augment`;
plugins add more) and ``params`` holds that method's own parameters, checked by its
class, so ``config show`` prints the class's defaults and a typo fails at load with its
key path. The other keys are shared by every method (copies per chunk, budgets) or by
every model-based one (server, prompts, the busy check).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from daemon.config_sections import DAY_S, Section, num, opt
from policies import base as policy_base
from policies.params import ParamError

DEFAULT_PROMPTS = {
    "paraphrase": (
        "Rewrite the following passage in your own words. Keep every name, number and "
        "fact; add nothing.\n\nPassage:\n{text}\n\nRewritten passage:\n"
    ),
    "qa": (
        "Read the passage, then write questions a student could ask about it, each "
        "followed by its answer from the passage, as lines 'Q: ...' and 'A: ...'.\n\n"
        "Passage:\n{text}\n\nQuestions and answers:\n"
    ),
}
_LABEL = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class AugmentConfig(Section):
    method: str = opt(
        "none",
        "Augmentation method (kind 'augment' in the policy registry): none, permute "
        "(sentence/paragraph orders), sentences (each sentence alone), edit (noisy copies: "
        "words around the names deleted, swapped, inserted), self (the served model writes "
        "paraphrases and Q/A pairs).",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="The method's own parameters (permute: shuffle_paragraphs, "
        "shuffle_sentences; sentences: anchor, max_samples; edit: p_delete, p_swap, "
        "p_insert, shuffle_sentences).",
    )
    k: int = num(
        2,
        1,
        64,
        "Copies per chunk: orderings (permute), edits (edit) or samples per prompt (self).",
    )
    max_chunks_per_run: int = num(
        32, 1, 1_000_000, "Pending train chunks augmented per call (the rest wait for the next)."
    )
    min_chars: int = num(20, 1, 1_000_000, "Synthetic texts shorter than this are dropped.")
    seed: int = num(0, 0, 2**32 - 1, "Seed of the model-free methods (same seed, same text).")
    endpoint: str = opt(
        "", "OpenAI-compatible base URL for model-based methods (empty = the served vLLM)."
    )
    api_key_file: str = opt(
        "", "File holding the endpoint's API key (empty = the served vLLM's key, or none)."
    )
    model: str = opt("", "Model name sent to the endpoint (empty = serving.model_name).")
    api: Literal["completions", "chat"] = opt(
        "completions", "'completions' (/v1/completions, any base model) or 'chat'."
    )
    prompts: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_PROMPTS),
        description="Prompt templates of model-based methods, label -> text with {text}"
        " where the chunk goes; each is sampled k times.",
    )
    max_new_tokens: int = num(256, 1, 1_000_000, "Tokens generated per sample at most.")
    temperature: float = num(0.8, 0, 2, "Sampling temperature of model-based methods.")
    token_budget: int = num(
        16_384, 1, 10**12, "Generated tokens per call at most (model-based methods)."
    )
    time_budget_s: float = num(
        60.0, 1, DAY_S, "Wall time per call at most (one request may overrun it by its timeout)."
    )
    request_timeout_s: float = num(30.0, 0.1, 3600, "HTTP timeout of one generation request.")
    busy_check: bool = opt(
        True,
        "Generate only while the endpoint's vllm:num_requests_running <= max_running "
        "(an endpoint without /metrics then counts as busy: turn this off for it).",
    )
    max_running: int = num(0, 0, 100_000, "Running requests above which the server is busy.")

    @model_validator(mode="after")
    def _method_and_prompts(self) -> AugmentConfig:
        """Resolve ``params`` against the method's class; check prompt labels and slots."""
        if "name" in self.params:
            raise ParamError("params.name", "set the method with augment.method")
        try:
            table = policy_base.with_defaults(
                "augment", {"name": self.method, **self.params}, "params"
            )
        except ParamError as exc:
            if exc.path == "params.name":
                raise ParamError("method", exc.problem) from None
            raise
        self.params = {k: v for k, v in table.items() if k != "name"}
        for label, template in self.prompts.items():
            if not _LABEL.match(label):
                raise ParamError(f"prompts.{label}", "labels are lower_snake_case, <= 32 chars")
            if template and "{text}" not in template:
                raise ParamError(f"prompts.{label}", "a template must contain {text}")
        if self.uses_model() and not any(self.prompts.values()):
            raise ParamError("prompts", f"method {self.method!r} needs at least one template")
        return self

    def build(self) -> Any:
        """The configured method object (a registered ``policies.augment`` class)."""
        return policy_base.build("augment", {"name": self.method, **self.params})

    def uses_model(self) -> bool:
        return bool(getattr(policy_base.get("augment", self.method), "uses_model", False))
