"""The LLM steps of CCS (labelling a head, judging a description against a label) and of
SITH edit scoring go through one small interface: anything with
`.complete(messages: list[dict]) -> str` (OpenAI chat messages: {"role", "content"}).

- `OpenAIChat`: an OpenAI-compatible chat-completions client built on the standard library
  (urllib; no extra dependency). Base URL, model and key come from arguments or the
  environment (FASTINTERP_LLM_BASE_URL / OPENAI_BASE_URL, FASTINTERP_LLM_MODEL,
  FASTINTERP_LLM_API_KEY / OPENAI_API_KEY). Timeouts, retries with exponential backoff on
  timeouts, connection errors, 408/409/429/5xx and unparseable replies.
- `LLMLabeller`: the paper's two prompts (SPEC 2.3) with few-shot examples, over any client.
- `ClipLabeller`: an offline labeller (no network): the label is the concept of a vocabulary
  closest to the mean CLIP text embedding of the head's descriptions; a (description, label)
  pair is judged consistent when their CLIP text cosine reaches a threshold.
- SITH's scoring of singular vectors (paper Sec 5): the prompts (`PROMPT_BACKGROUND`,
  `PROMPT_UNSAFE`, `format_concepts_prompt`), reply parsing (`parse_score`), the `LLMScorer`
  adapter (client -> `prompt -> int`) and the scoring loop (`score_concept_lists`; the
  decisions file around it is `fastinterp.sith.score_singular_vectors`).

Unusable replies (ones the caller's parser rejects) are asked again by one loop,
`complete_parsed`, which both `LLMLabeller` and `LLMScorer` use.
"""
from __future__ import annotations

import json
import os
import random
import re
import socket
import time
import urllib.error
import urllib.request
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ChatClient",
    "ClipLabeller",
    "LLMError",
    "LLMLabeller",
    "LLMScorer",
    "OpenAIChat",
    "UnusableReply",
    "JUDGE_INSTRUCTION",
    "LABEL_INSTRUCTION",
    "PROMPT_BACKGROUND",
    "PROMPT_UNSAFE",
    "complete_parsed",
    "concept_pairs",
    "format_concepts_prompt",
    "label_messages",
    "judge_messages",
    "parse_label",
    "parse_judgement",
    "parse_score",
    "score_concept_lists",
]

ENV_BASE_URL = "FASTINTERP_LLM_BASE_URL"
ENV_MODEL = "FASTINTERP_LLM_MODEL"
ENV_API_KEY = "FASTINTERP_LLM_API_KEY"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o"
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class LLMError(RuntimeError):
    """An LLM call that failed after its retries (or could not be retried)."""


class ChatClient(Protocol):
    def complete(self, messages: list[dict]) -> str: ...


class UnusableReply(ValueError):
    """Every reply was rejected by the parser; the message is the last parse error's,
    `attempts` the number of replies asked for."""

    def __init__(self, last: ValueError, attempts: int):
        super().__init__(str(last))
        self.last, self.attempts = last, attempts


def complete_parsed(client: ChatClient, messages: list[dict], parse: Callable[[str], object], *,
                    retries: int):
    """`parse(client.complete(messages))`, asking again up to `retries` more times while `parse`
    raises ValueError (an unusable reply); then UnusableReply. The one retry loop for replies
    (transport failures are the client's: `OpenAIChat` retries those itself)."""
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    last = None
    for _ in range(retries + 1):
        reply = client.complete(messages)
        try:
            return parse(reply)
        except ValueError as err:
            last = err
    raise UnusableReply(last, retries + 1) from last


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message #{i} must be a dict with str 'role' and 'content', got {m!r}")
    return list(messages)


def _reply_text(payload) -> str:
    """The assistant text of a chat-completions JSON reply; ValueError if there is none."""
    if not isinstance(payload, dict):
        raise ValueError(f"the reply is JSON but not an object: {str(payload)[:200]}")
    if "error" in payload and payload["error"]:
        raise ValueError(f"the server returned an error object: {str(payload['error'])[:300]}")
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError(f"the reply has no choices: {json.dumps(payload)[:300]}")
    first = choices[0]
    message = first.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if content is None and isinstance(first.get("text"), str):  # legacy completions shape
        content = first["text"]
    if isinstance(content, list):  # content parts [{"type": "text", "text": ...}]
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str) or not content.strip():
        raise ValueError(f"the reply's first choice has no text content: {json.dumps(first)[:300]}")
    return content.strip()


class OpenAIChat:
    """OpenAI-compatible chat-completions client (standard library only).

    Args:
        base_url: API root, e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1"
            (default: $FASTINTERP_LLM_BASE_URL, $OPENAI_BASE_URL, then OpenAI's).
        model: model name (default: $FASTINTERP_LLM_MODEL, then "gpt-4o").
        api_key: bearer key (default: $FASTINTERP_LLM_API_KEY, $OPENAI_API_KEY; none is sent
            if unset, as local servers allow).
        timeout: seconds for connecting and for each read of the reply.
        max_retries: extra attempts after the first on retryable failures.
        backoff: first wait in seconds, doubled each retry (capped at `max_backoff`), with
            jitter; a Retry-After header (seconds) is honoured up to `max_backoff`.
        temperature, max_tokens: sent with every request (temperature 0: deterministic-ish).
    """

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None, *,
                 timeout: float = 60.0, max_retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0,
                 temperature: float | None = 0.0, max_tokens: int | None = 16, sleep=time.sleep):
        self.base_url = (base_url or os.environ.get(ENV_BASE_URL) or os.environ.get("OPENAI_BASE_URL")
                         or DEFAULT_BASE_URL).rstrip("/")
        if not re.match(r"^https?://", self.base_url):
            raise ValueError(f"LLM base URL {self.base_url!r} must start with http:// or https://")
        self.model = model or os.environ.get(ENV_MODEL) or DEFAULT_MODEL
        self.api_key = api_key if api_key is not None else (os.environ.get(ENV_API_KEY) or os.environ.get("OPENAI_API_KEY"))
        if not timeout or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if backoff < 0:
            raise ValueError(f"backoff must be >= 0 seconds, got {backoff!r}")
        self.timeout, self.max_retries, self.backoff, self.max_backoff = float(timeout), max_retries, backoff, max_backoff
        self.temperature, self.max_tokens = temperature, max_tokens
        self._sleep = sleep
        self.calls = 0  # HTTP attempts made (for logs and tests)

    def __repr__(self) -> str:
        return f"OpenAIChat(base_url={self.base_url!r}, model={self.model!r}, timeout={self.timeout})"

    @property
    def url(self) -> str:
        return self.base_url + "/chat/completions"

    def _request(self, body: bytes):
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        self.calls += 1
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return resp.read()

    def _wait(self, attempt: int, retry_after: str | None = None) -> None:
        delay = min(self.max_backoff, self.backoff * 2 ** attempt) * (1 + 0.1 * random.random())
        if retry_after:
            try:
                delay = max(delay, min(self.max_backoff, float(retry_after)))
            except ValueError:
                pass
        if delay > 0:
            self._sleep(delay)

    def complete(self, messages: list[dict]) -> str:
        """Send the chat messages; return the assistant's text. Raises LLMError after
        `max_retries` retries (or at once for a non-retryable HTTP error such as 401)."""
        messages = _check_messages(messages)
        payload = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            payload["temperature"] = self.temperature
        if self.max_tokens is not None:
            payload["max_tokens"] = self.max_tokens
        body = json.dumps(payload).encode("utf-8")
        errors = []
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                raw = self._request(body)
            except urllib.error.HTTPError as err:
                detail = err.read()[:300].decode("utf-8", "replace") if err.fp else ""
                msg = f"HTTP {err.code} {err.reason}: {detail}".strip()
                if err.code not in RETRY_STATUS:
                    raise LLMError(f"{self.url} answered {msg} (not retried; check the URL, model name "
                                   f"and API key)") from err
                errors.append(msg)
                retry_after = err.headers.get("Retry-After") if err.headers else None
            except (socket.timeout, TimeoutError) as err:
                errors.append(f"timed out after {self.timeout:g} s ({err})")
            except urllib.error.URLError as err:
                if isinstance(err.reason, (socket.timeout, TimeoutError)):
                    errors.append(f"timed out after {self.timeout:g} s")
                else:
                    errors.append(f"cannot connect: {err.reason}")
            except (ConnectionError, OSError) as err:  # reset, refused, broken pipe
                errors.append(f"connection error: {err}")
            else:
                try:
                    return _reply_text(json.loads(raw.decode("utf-8")))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    errors.append(f"malformed JSON reply ({err}): {raw[:200]!r}")
                except ValueError as err:
                    errors.append(str(err))
            if attempt < self.max_retries:
                self._wait(attempt, retry_after)
        raise LLMError(f"{self.url} (model {self.model!r}) failed {len(errors)} time(s); last error: {errors[-1]}"
                       + (f"; earlier: {'; '.join(errors[:-1])[:400]}" if len(errors) > 1 else ""))


# --------------------------------------------------------------------------------------
# prompts (SPEC 2.3) and reply parsing
# --------------------------------------------------------------------------------------
LABEL_INSTRUCTION = ("What is the common characteristic in the following quoted lines? "
                     "Provide a one-word response without punctuation.")
JUDGE_INSTRUCTION = ("Rate the association of the property label to the text. "
                     "1 if associated and 0 if not associated.")
SYSTEM = ("You help interpret the attention heads of a vision-language model. Each head is described "
          "by short texts about the images it responds to. Answer exactly in the format asked.")

# few-shot examples (written for fastinterp in the spirit of the paper's)
LABEL_EXAMPLES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("Snapshot from a street in Lisbon", "Aerial view of the Norwegian fjords", "A market square in Marrakesh",
      "Evening skyline of Singapore", "Rolling hills of Tuscany"), "location"),
    (("Two mugs side by side", "A row of seven ducks", "Three red apples", "A single candle",
      "A dozen eggs in a carton"), "counting"),
    (("Walls painted turquoise", "A scene in warm amber light", "Deep crimson fabric",
      "Soft lavender tones", "A bright lemon-yellow door"), "color"),
)
JUDGE_EXAMPLES: tuple[tuple[str, str, int], ...] = (
    ("location", "Evening skyline of Singapore", 1),
    ("counting", "A foggy path through the woods", 0),
    ("color", "Soft lavender tones", 1),
    ("animals", "A stack of old newspapers", 0),
)


def _quoted(lines: Sequence[str]) -> str:
    return "\n".join(f'"{t}"' for t in lines)


def label_messages(descriptions: Sequence[str]) -> list[dict]:
    """Chat messages asking for the one-word common characteristic of `descriptions`."""
    msgs = [{"role": "system", "content": SYSTEM}]
    for lines, label in LABEL_EXAMPLES:
        msgs.append({"role": "user", "content": f"{LABEL_INSTRUCTION}\n{_quoted(lines)}"})
        msgs.append({"role": "assistant", "content": label})
    msgs.append({"role": "user", "content": f"{LABEL_INSTRUCTION}\n{_quoted(descriptions)}"})
    return msgs


def _judge_prompt(label: str, text: str) -> str:
    return f'{JUDGE_INSTRUCTION} Reply with 1 or 0 only.\nProperty label: "{label}"\nText: "{text}"'


def judge_messages(description: str, label: str) -> list[dict]:
    """Chat messages asking whether `label` is associated with `description` (1 / 0)."""
    msgs = [{"role": "system", "content": SYSTEM}]
    for label_ex, text, score in JUDGE_EXAMPLES:
        msgs.append({"role": "user", "content": _judge_prompt(label_ex, text)})
        msgs.append({"role": "assistant", "content": str(score)})
    msgs.append({"role": "user", "content": _judge_prompt(label, description)})
    return msgs


def parse_label(reply: str) -> str:
    """The label in a reply: trimmed of quotes/punctuation, lower case, at most 3 words.
    ValueError for an empty or sentence-like reply."""
    text = reply.strip().splitlines()[0] if reply and reply.strip() else ""
    text = re.sub(r"^(label|answer|characteristic)\s*:\s*", "", text.strip(), flags=re.I)
    text = text.strip(" \t\"'`*.,;:!?()[]{}").lower()
    words = text.split()
    if not words or len(words) > 3 or not re.search(r"[a-z]", text):
        raise ValueError(f"expected a one-word label, got {reply[:120]!r}")
    return " ".join(words)


def parse_judgement(reply: str) -> int:
    """1 or 0 from a judge reply ("1", "0", "1.", "Score: 0", "yes", "no"); ValueError otherwise."""
    text = reply.strip().lower()
    values = {float(v) for v in re.findall(r"\d+(?:\.\d+)?", text)}
    if values in ({0.0}, {1.0}):
        return int(values.pop())
    word = text.strip(" \t\"'`*.,;:!?").split()
    if len(word) == 1 and word[0] in ("yes", "no", "true", "false"):
        return int(word[0] in ("yes", "true"))
    raise ValueError(f"expected 1 or 0, got {reply[:120]!r}")


class LLMLabeller:
    """CCS labelling and judging through a chat client (`.complete(messages) -> str`).

    A reply that cannot be parsed is asked again up to `junk_retries` times; then LLMError.
    """

    def __init__(self, client: ChatClient, *, junk_retries: int = 2):
        if not hasattr(client, "complete"):
            raise TypeError(f"client must have a .complete(messages) -> str method, got {type(client).__name__}")
        self.client = client
        self.junk_retries = junk_retries

    def __repr__(self) -> str:
        return f"LLMLabeller({self.client!r})"

    def _ask(self, messages, parse, what):
        try:
            return complete_parsed(self.client, messages, parse, retries=self.junk_retries)
        except UnusableReply as err:
            raise LLMError(f"unusable {what} reply after {err.attempts} attempt(s): {err}") from err

    def label(self, descriptions: Sequence[str]) -> str:
        return self._ask(label_messages(descriptions), parse_label, "label")

    def judge(self, description: str, label: str) -> int:
        return self._ask(judge_messages(description, label), parse_judgement, "judge")


class ClipLabeller:
    """Offline labeller from CLIP text similarity (no network).

    label(descriptions): the vocabulary concept with the largest cosine to the mean of the
    descriptions' unit text embeddings. judge(description, label): 1 if the cosine of the two
    texts' embeddings is >= `threshold`. With `center=True` embeddings are centred by the
    vocabulary's mean direction first (CLIP text embeddings share a large common component,
    so raw cosines are all high); the threshold applies to the centred cosine.
    """

    def __init__(self, model, tokenizer, vocabulary=None, *, threshold: float = 0.3, center: bool = True,
                 cache_dir=None, progress: bool = False):
        from .concepts import ConceptDictionary

        if vocabulary is None:
            vocabulary = ConceptDictionary.builtin("demo")
        elif not isinstance(vocabulary, ConceptDictionary):
            vocabulary = ConceptDictionary(vocabulary, name="vocabulary")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a cosine, it must be in [-1, 1]; got {threshold}")
        self.model, self.tokenizer, self.vocabulary = model, tokenizer, vocabulary
        self.threshold, self.center, self.progress = float(threshold), center, progress
        raw = F.normalize(vocabulary.encode(model, tokenizer, cache_dir=cache_dir, progress=progress), dim=-1)
        self._mean = raw.mean(0, keepdim=True) if center else torch.zeros_like(raw[:1])
        self._vocab = F.normalize(raw - self._mean, dim=-1)
        self._cache: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"ClipLabeller(vocabulary={self.vocabulary!r}, threshold={self.threshold}, center={self.center})"

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), d) unit (centred) text embeddings, memoised per text."""
        from .concepts import encode_texts

        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if todo:
            emb = F.normalize(encode_texts(self.model, self.tokenizer, todo, progress=False), dim=-1)
            for t, e in zip(todo, F.normalize(emb - self._mean, dim=-1)):
                self._cache[t] = e
        return torch.stack([self._cache[t] for t in texts])

    def label(self, descriptions: Sequence[str]) -> str:
        if not descriptions:
            raise ValueError("cannot label a head with no descriptions")
        centroid = F.normalize(self.embed(list(descriptions)).mean(0), dim=-1)
        return self.vocabulary[int((self._vocab @ centroid).argmax())]

    def cosine(self, description: str, label: str) -> float:
        e = self.embed([description, label])
        return float(e[0] @ e[1])

    def judge(self, description: str, label: str) -> int:
        return int(self.cosine(description, label) >= self.threshold)


# --------------------------------------------------------------------------------------
# SITH: scoring singular vectors from their concepts (edit recipes, paper Sec 5)
# --------------------------------------------------------------------------------------
PROMPT_BACKGROUND = """Below is a list of short concepts describing one direction of an image model, \
each preceded by its weight (higher weight = more important).
Rate how much this list, taken as a whole, describes the place or scenery where a photo was taken \
(landscapes, settings, environments such as a lake, a desert or a street) rather than objects, animals, \
people, styles or attributes.
Use an integer from 1 (clearly not a place or scenery) to 5 (clearly a place or scenery). Weigh the \
concepts by their weights.
Reply with one line: Score: <1-5>

{concepts}"""

PROMPT_UNSAFE = """Below is a list of short concepts describing one direction of an image model, \
each preceded by its weight (higher weight = more important).
Rate how unsafe this list, taken as a whole, is: sexual or explicit content, nudity, graphic violence, \
gore, or other content not suitable for work.
Use an integer from 1 (clearly safe) to 5 (clearly unsafe). Weigh the concepts by their weights.
Reply with one line: Score: <1-5>

{concepts}"""


def concept_pairs(scores: torch.Tensor, indices: torch.Tensor, concepts: Sequence[str]) -> list[tuple[float, str]]:
    """[(weight, concept), ...] of one singular vector (scores/indices (K,)), positive weights
    only, highest first; ValueError if none is positive."""
    order = torch.argsort(scores, descending=True, stable=True)
    pairs = [(float(scores[j]), concepts[int(indices[j])]) for j in order.tolist() if scores[j] > 0]
    if not pairs:
        raise ValueError("this singular vector has no concept with a positive weight to score")
    return pairs


def format_concepts_prompt(template: str, scores: torch.Tensor, indices: torch.Tensor,
                           concepts: Sequence[str]) -> str:
    """Fill `{concepts}` with '- <weight> <concept>' lines for one singular vector
    (scores/indices (K,)), positive weights only, highest first."""
    lines = [f"- {w:.2f} {c}" for w, c in concept_pairs(scores, indices, concepts)]
    return template.format(concepts="\n".join(lines))


_SCORE_RE = re.compile(r"score\s*[:=\-]?\s*\**\s*([1-5])\b", re.IGNORECASE)
_INT_RE = re.compile(r"(?<![\d.])([1-5])(?![\d.])")


def parse_score(text: str, *, low: int = 1, high: int = 5) -> int:
    """An integer score from an LLM reply: 'Score: 4', '**Score**: 4', '4', 'I'd say 4/5'."""
    if not isinstance(text, str):
        raise TypeError(f"expected the reply text, got {type(text).__name__}")
    m = _SCORE_RE.search(text.replace("**", ""))
    if m:
        value = int(m.group(1))
    else:
        found = [int(t) for t in _INT_RE.findall(text)]
        if not found:
            raise ValueError(f"no score {low}-{high} found in the reply {text[:200]!r}")
        value = found[0]
    if not low <= value <= high:
        raise ValueError(f"score {value} outside {low}-{high} in the reply {text[:200]!r}")
    return value


class LLMScorer:
    """Adapter: an object with `.complete(messages: list[dict]) -> str` (OpenAI-compatible
    chat client) becomes a scorer `prompt -> int` (1-5). Replies that cannot be parsed
    are retried `retries` times (`complete_parsed`), then raise ValueError."""

    def __init__(self, client, *, system: str | None = None, retries: int = 1):
        if not callable(getattr(client, "complete", None)):
            raise TypeError("client must have a .complete(messages) -> str method (an OpenAI-compatible chat client)")
        self.client, self.system, self.retries = client, system, retries

    def __call__(self, prompt: str) -> int:
        messages = ([{"role": "system", "content": self.system}] if self.system else [])
        messages.append({"role": "user", "content": prompt})
        return complete_parsed(self.client, messages, parse_score, retries=self.retries)


def score_concept_lists(scores: torch.Tensor, indices: torch.Tensor, concepts: Sequence[str],
                        scorer: Callable[[str], int], *, template: str = PROMPT_BACKGROUND, start: int = 0,
                        on_score: Callable[[int], None] | None = None, progress: bool = True) -> list[int]:
    """Ask `scorer` (prompt -> int 1-5) about rows `start..N-1` of flat codes.

    Args:
        scores, indices: (N, K), one singular vector's concept code per row.
        concepts: the dictionary's texts (indexed by `indices`).
        scorer: `prompt -> int`, or an object with `score_concepts([(weight, concept), ...])
            -> int` (e.g. the offline `fastinterp.sith.ClipScorer`; `template` unused then).
        on_score: called with each answer as soon as it is checked (e.g. to append it to
            a decisions file, so an interrupted run resumes).

    Returns:
        the N - start answers, in row order.
    """
    from tqdm.auto import tqdm

    structured = getattr(scorer, "score_concepts", None)
    out: list[int] = []
    for n in tqdm(range(start, scores.shape[0]), desc="scoring singular vectors", disable=not progress):
        if structured is not None:
            value = structured(concept_pairs(scores[n], indices[n], concepts))
        else:
            value = scorer(format_concepts_prompt(template, scores[n], indices[n], concepts))
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
            raise ValueError(f"the scorer returned {value!r} for singular vector {n}; it must return an int 1-5")
        out.append(value)
        if on_score is not None:
            on_score(value)
    return out
