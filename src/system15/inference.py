"""Answering questions with a trained model: the Python API's `model.answer(...)`.

Each answer carries what it cost and how it was computed: the decoding steps, the FLOPs of
the layers that ran, and per decoding step the route it took through the layers (which ran
and which the shortcut replaced), with the step's criticality label where it is known.
Evaluation (`evaluate.evaluate`), the CLI's `eval` and `explain`, the ladder and the sweep
all answer through here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .data import DataError, Example, extract_answer, parse_number
from .engine import FULL, Generation, Route, generate
from .layout import encode, prompt, thought_critical


@dataclass
class StepRoute:
    """One decoding step: a thought step or a generated token, and the layers it ran."""

    kind: str                    # "thought" or "token"
    token: str | None            # the token the step wrote (None for a thought step)
    ran: list[bool]              # per layer: True where the layer ran, False where its shortcut replaced it
    critical: bool | None        # the step's label: thought steps from the question's CoT, tokens: digits

    @property
    def skipped(self) -> int:
        return sum(1 for r in self.ran if not r)


@dataclass
class Answer:
    question: str
    text: str                    # everything the model wrote after the prompt
    answer: str | None           # the text after the last answer marker, or None
    value: int | float | None    # `answer` as a number, or None
    thought_steps: int
    decoding_steps: int          # thought steps + generated tokens
    flops: int                   # matrix-product FLOPs of the layers that ran (flops.py)
    routes: list[StepRoute] = field(default_factory=list)
    source: str = ""             # "<file>:<line>" for data examples, "question <n>" otherwise


def _as_example(question, index: int) -> Example:
    if isinstance(question, Example):
        return question
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question {index + 1}: expected a non-empty string, got {question!r}")
    return Example(question, (), "", f"question {index + 1}")


def _value(answer: str | None) -> int | float | None:
    number = None if answer is None else parse_number(answer)
    if number is None:
        return None
    return int(number) if number.denominator == 1 else float(number)


def resolve_route(model, lambda_depth: float | None, kv_policy: str | None, shortcuts: bool) -> Route:
    """The route a model decodes with: its own threshold and K/V policy unless overridden.
    A threshold outside [0, 1] is refused for every model, with shortcuts or not."""
    spec = model.spec
    depth = spec.lambda_depth if lambda_depth is None else lambda_depth
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"lambda_depth: must lie in [0, 1], got {depth!r}")
    policy = spec.kv_policy if kv_policy is None else kv_policy
    if policy not in ("fill", "skip"):
        raise ValueError(f"kv_policy: must be fill or skip, got {policy!r}")
    if model.shortcuts is None or not shortcuts:
        return FULL
    return Route("hard", float(depth), policy)


def resolve_K(model, K: int | None) -> int | None:
    """Thought steps to take: the model's own unless given; None writes a chain (CoT)."""
    if K is None:
        return model.spec.K
    if isinstance(K, bool) or not isinstance(K, int) or K < 0:
        raise ValueError(f"K: must be an integer >= 0, got {K!r}")
    if K > 0 and model.thought is None:
        raise ValueError(f"K: this {model.method or 'token'} model has no thought steps; only K=0 (answer only) is possible")
    return K


def check_length(model, example: Example, prompt_ids: list[int], K: int | None, max_new_tokens: int) -> None:
    """Refuse a question that could run past the backbone's last position, naming where it came from."""
    need = len(prompt_ids) + (K + 1 if K is not None else 0) + max_new_tokens
    limit = model.backbone.max_positions
    if need > limit:
        raise DataError.at(example.source, "question",
                           f"{len(prompt_ids)} tokens, with {K or 0} thought steps and {max_new_tokens} new tokens, "
                           f"need {need} positions; the backbone has {limit}")


def answer(model, questions, *, K: int | None = None, lambda_depth: float | None = None, kv_policy: str | None = None,
           shortcuts: bool = True, batch_size: int = 64, max_new_tokens: int | None = None,
           progress: str | None = None) -> list[Answer]:
    """Greedy answers to `questions` (strings, or data Examples), in order.

    K: thought steps (default: the model's). lambda_depth, kv_policy: the router threshold and
    what a skipped layer leaves in its K/V cache (default: the model's; System-1.5 models).
    shortcuts=False runs every layer. `progress` labels a progress bar."""
    if isinstance(questions, (str, Example)):
        raise TypeError("answer() takes a list of questions")
    examples = [_as_example(q, i) for i, q in enumerate(questions)]
    K, route = resolve_K(model, K), resolve_route(model, lambda_depth, kv_policy, shortcuts)
    budget = model.spec.max_new_tokens if max_new_tokens is None else max_new_tokens
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    model.eval()
    tok = model.tokenizer
    encoded = [encode(tok, e) for e in examples]
    prompts = [prompt(tok, e) for e in encoded]
    for example, ids in zip(examples, prompts):
        check_length(model, example, ids, K, budget)
    out: list[Answer] = []
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc=progress or "answer", disable=progress is None, leave=False, dynamic_ncols=True):
        gens = generate(model, prompts[start:start + batch_size], K=K, route=route, max_new_tokens=budget)
        for i, gen in enumerate(gens, start):
            out.append(_answer(model, examples[i], encoded[i], gen, K))
    return out


def _answer(model, example: Example, encoded, gen: Generation, K: int | None) -> Answer:
    tok = model.tokenizer
    text = tok.decode(gen.tokens)
    thought_flags = thought_critical(encoded, K) if K and example.steps else []
    routes = []
    for i, (ran, emitted) in enumerate(zip(gen.ran, gen.emitted)):
        if emitted is None:
            critical = thought_flags[i] if i < len(thought_flags) else None
            routes.append(StepRoute("thought", None, list(ran), critical))
        else:
            piece = tok.decode([emitted])
            routes.append(StepRoute("token", piece, list(ran), any(ch.isdigit() for ch in piece)))
    predicted = extract_answer(text)
    return Answer(example.question, text, predicted, _value(predicted), gen.thought_steps, gen.decoding_steps,
                  gen.flops, routes, example.source)
