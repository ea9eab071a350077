"""The LLM steps of CCS (labelling a head, judging a description against a label) and of
SITH edit scoring go through one small interface: anything with
`.complete(messages: list[dict]) -> str` (OpenAI chat messages: {"role", "content"}).

- `OpenAIChat`: an OpenAI-compatible chat-completions client over httpx. Base URL, model
  and key come from arguments or the environment (FASTINTERP_LLM_BASE_URL /
  OPENAI_BASE_URL, FASTINTERP_LLM_MODEL, FASTINTERP_LLM_API_KEY / OPENAI_API_KEY). The
  timeout bounds the whole request (connect to last byte); every transport error
  (including resets and partial reads), 408/409/425/429/5xx and replies that are not a
  chat completion are retried with exponential backoff, Retry-After honoured.
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
import threading
import time
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


class _Deadline(Exception):
    """The whole request ran past its deadline (raised between body chunks)."""


class _Reply:
    """One HTTP exchange: status, headers, the full body (or the transport error)."""

    def __init__(self):
        self.status: int | None = None
        self.headers = None
        self.body: bytes | None = None
        self.error: BaseException | None = None


MAX_REPLY_BYTES = 8 << 20
"""A reply body larger than this is junk (a chat completion of a few tokens is ~1 KiB)."""


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date (RFC 9110); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        import email.utils
        from datetime import datetime, timezone

        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class OpenAIChat:
    """OpenAI-compatible chat-completions client over httpx.

    Args:
        base_url: API root, e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1"
            (default: $FASTINTERP_LLM_BASE_URL, $OPENAI_BASE_URL, then OpenAI's).
        model: model name (default: $FASTINTERP_LLM_MODEL, then "gpt-4o").
        api_key: bearer key (default: $FASTINTERP_LLM_API_KEY, $OPENAI_API_KEY; none is sent
            if unset, as local servers allow). Never logged, never part of an error message.
        timeout: seconds for the WHOLE request, connect to last byte (a server that sends
            headers and then trickles its body is cut off at the deadline); a timed-out
            request is retried.
        max_retries: extra attempts after the first on retryable failures: every transport
            error (refused or reset connections, partial reads, protocol errors, timeouts),
            HTTP 408/409/425/429/5xx, and replies that are not a chat completion.
        backoff: first wait in seconds, doubled each retry (capped at `max_backoff`), with
            jitter; a Retry-After header (seconds or an HTTP date) is honoured up to `max_backoff`.
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
        self._api_key = api_key if api_key is not None else (os.environ.get(ENV_API_KEY) or os.environ.get("OPENAI_API_KEY"))
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0 \
                or timeout == float("inf"):
            raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if not backoff >= 0 or not max_backoff >= 0:
            raise ValueError(f"backoff and max_backoff must be >= 0 seconds, got {backoff!r}, {max_backoff!r}")
        self.timeout, self.max_retries, self.backoff, self.max_backoff = float(timeout), max_retries, backoff, max_backoff
        self.temperature, self.max_tokens = temperature, max_tokens
        self._sleep = sleep
        self._http = None
        self.calls = 0  # HTTP attempts made (for logs and tests)

    def __repr__(self) -> str:  # no key
        return f"OpenAIChat(base_url={self.base_url!r}, model={self.model!r}, timeout={self.timeout})"

    @property
    def api_key(self) -> str | None:
        return self._api_key

    @property
    def url(self) -> str:
        return self.base_url + "/chat/completions"

    def _client(self):
        if self._http is None:
            import httpx

            # per-operation limits at the whole budget; the deadline below bounds the sum
            self._http = httpx.Client(timeout=httpx.Timeout(self.timeout), follow_redirects=False)
        return self._http

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _exchange(self, body: bytes, deadline: float, reply: _Reply) -> None:
        """One POST, streamed; the body is read chunk by chunk against the deadline."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        try:
            with self._client().stream("POST", self.url, content=body, headers=headers) as resp:
                reply.status, reply.headers = resp.status_code, resp.headers
                buf = bytearray()
                for chunk in resp.iter_bytes():
                    buf += chunk
                    if time.monotonic() > deadline:
                        raise _Deadline()
                    if len(buf) > MAX_REPLY_BYTES:
                        raise ValueError(f"the reply body is larger than {MAX_REPLY_BYTES} bytes")
                reply.body = bytes(buf)
        except BaseException as err:  # handed to the caller's thread
            reply.error = err

    def _request(self, body: bytes) -> _Reply:
        """The exchange in a worker thread, waited for until the deadline (connect to last byte)."""
        self.calls += 1
        deadline = time.monotonic() + self.timeout
        reply = _Reply()
        worker = threading.Thread(target=self._exchange, args=(body, deadline, reply), daemon=True,
                                  name="fastinterp-llm-request")
        worker.start()
        worker.join(self.timeout + 0.05)
        if worker.is_alive():  # stuck in a read: it ends by itself within one per-operation timeout
            reply.error = _Deadline()
        return reply

    def _wait(self, attempt: int, retry_after: str | None = None) -> None:
        delay = min(self.max_backoff, self.backoff * 2 ** attempt) * (1 + 0.1 * random.random())
        asked = _retry_after_seconds(retry_after)
        if asked is not None:
            delay = max(delay, min(self.max_backoff, asked))
        if delay > 0:
            self._sleep(delay)

    def _failure(self, reply: _Reply) -> tuple[str, bool]:
        """(what went wrong, whether it is worth retrying); ("", False) for a usable reply."""
        import httpx

        err = reply.error
        if isinstance(err, (_Deadline, httpx.TimeoutException, TimeoutError)):
            return f"timed out: no complete reply within {self.timeout:g} s", True
        if isinstance(err, httpx.ConnectError):
            return f"cannot connect: {err}", True
        if isinstance(err, (httpx.TransportError, httpx.StreamError, OSError)):
            return f"connection error ({type(err).__name__}: {err})", True  # resets, partial reads
        if err is not None:
            return f"{type(err).__name__}: {err}", isinstance(err, ValueError)
        if reply.status != 200:
            detail = (reply.body or b"")[:300].decode("utf-8", "replace")
            return f"HTTP {reply.status}: {detail}".strip(), reply.status in RETRY_STATUS
        return "", False

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
            reply = self._request(body)
            problem, retry = self._failure(reply)
            if not problem:
                try:
                    return _reply_text(json.loads(reply.body.decode("utf-8")))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    problem, retry = f"malformed JSON reply ({err}): {reply.body[:200]!r}", True
                except ValueError as err:
                    problem, retry = str(err), True
            problem = self._scrub(problem)
            if not retry:
                raise LLMError(f"{self.url} answered {problem} (not retried; check the URL, model name and API key)")
            errors.append(problem)
            if attempt < self.max_retries:
                self._wait(attempt, reply.headers.get("Retry-After") if reply.headers is not None else None)
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


_REFUSAL = re.compile(
    r"^(?:sorry|apolog|unfortunately|as an (?:ai|a\.i\.|language model)|i\b|i'm\b|im\b|i am\b|we\b|cannot\b|can't\b|"
    r"unable\b|not (?:sure|possible|applicable|enough|clear|determinable)|no (?:common|clear|single|answer|label|idea)|"
    r"n/?a$|na$|none$|nothing$|unknown$|unclear$|undetermined$|indeterminate$|null$|nil$|error$|"
    r"(?:there is|there's) no\b|it is (?:not|impossible|unclear)|hard to say|difficult to)")
"""Replies that refuse or give no label (first words, lower case): junk, never a label."""


def _first_line(reply) -> str:
    if not isinstance(reply, str):
        raise ValueError(f"expected the reply text, got {type(reply).__name__}")
    lines = [line for line in reply.strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else ""


def parse_label(reply: str) -> str:
    """The label in a reply: trimmed of quotes/punctuation, lower case, at most 3 words.
    ValueError (junk, asked again) for an empty, sentence-like, or refusing reply ("I
    cannot say.", "Sorry, I can't", "N/A", "As an AI ...", "none", "unknown")."""
    text = re.sub(r"^(label|answer|characteristic)\s*:\s*", "", _first_line(reply), flags=re.I)
    text = text.strip(" \t\"'`*.,;:!?()[]{}").lower()
    words = text.split()
    if not words or len(words) > 3 or not re.search(r"[a-z]", text):
        raise ValueError(f"expected a one-word label, got {reply[:120]!r}")
    if _REFUSAL.match(text) or "/" in text:
        raise ValueError(f"the reply is a refusal or no label: {reply[:120]!r}")
    return " ".join(words)


_JUDGE_TOKENS = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "yes": 1, "no": 0, "true": 1, "false": 0}
_JUDGE_CONFLICT = re.compile(r"\d|\b(?:yes|no|not|true|false)\b")


def parse_judgement(reply: str) -> int:
    """1 or 0 from a judge reply ("1", "0", "1.", "Score: 0", "yes", "no", "1 - it fits").
    The answer is the first token; anything after it may explain but not contradict (no
    other number, no yes/no/not). ValueError (junk) otherwise: "-1", "10", "0 or 1",
    "No, 1 is wrong", a refusal, an empty reply."""
    text = re.sub(r"^(score|answer|rating|judgement|judgment|label)\s*[:=]\s*", "",
                  _first_line(reply).lower().replace("**", ""))
    m = re.match(r"^[\"'`(\[]*([-+]?\d+(?:\.\d+)?|[a-z]+)[\"'`)\].,;:!?]*(?:\s+|$)(.*)$", text)
    if m is None or m.group(1) not in _JUDGE_TOKENS or _JUDGE_CONFLICT.search(m.group(2)):
        raise ValueError(f"expected 1 or 0, got {reply[:120]!r}")
    return _JUDGE_TOKENS[m.group(1)]


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


_SCORE_RE = re.compile(r"score\s*[:=]?\s*\**\s*([1-5])(?![\d.])", re.IGNORECASE)
_INT_RE = re.compile(r"(?<![\d.\-+])([1-5])(?![\d.])")  # not part of "-1", "10", "2.5"
_SCALE_RE = re.compile(r"\s*(?:/\s*5|out of 5|(?:to|-)\s*5\b)", re.IGNORECASE)


def parse_score(text: str, *, low: int = 1, high: int = 5) -> int:
    """An integer score from an LLM reply: 'Score: 4', '**Score**: 4', '4', 'I'd say 4/5'."""
    if not isinstance(text, str):
        raise TypeError(f"expected the reply text, got {type(text).__name__}")
    m = _SCORE_RE.search(text.replace("**", ""))
    if m:
        value = int(m.group(1))
    else:
        found = {int(t) for t in _INT_RE.findall(_SCALE_RE.sub("", text))}
        if not found:
            raise ValueError(f"no score {low}-{high} found in the reply {text[:200]!r}")
        if len(found) > 1:
            raise ValueError(f"the reply {text[:200]!r} names several scores {sorted(found)}; expected one")
        value = found.pop()
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
