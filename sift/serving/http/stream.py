"""Streaming answers (`stream: true`): server-sent events in OpenAI's chunk format.

The tokens come from the same greedy generation a request without streaming gets (the prompt
alone, no padding), and the text is released so that the pieces put together are exactly the
non-streamed answer: leading blanks dropped, trailing blanks held until more text follows
(the whole answer is stripped), a character still incomplete held back, and with stop strings
the last few characters held until it is clear no stop string starts there. A stop string ends
the generation early; the text up to it is what the non-streamed answer keeps.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from sift.models import model_device, prompt_ids


class _Tokens(BaseStreamer):
    """Receives generate()'s tokens (the prompt first, then one tensor per step) into a queue."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Any] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


class _Cancelled(StoppingCriteria):
    def __init__(self, flag: threading.Event):
        self.flag = flag

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_tokens(
    model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, cancel: threading.Event
) -> Iterator[list[int]]:
    """The new token ids of the greedy answer to `prompt`, step by step, from a generation that
    runs in its own thread (setting `cancel` ends it at the next step). Raises what it raised."""
    ids = torch.tensor([prompt_ids(tokenizer, prompt)], dtype=torch.long).to(model_device(model))
    tokens = _Tokens()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    streamer=tokens,
                    stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
                )
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
            failure.append(exc)
        finally:
            tokens.queue.put(None)

    worker = threading.Thread(target=run, name="sift-stream", daemon=True)
    worker.start()
    try:
        while (item := tokens.queue.get()) is not None:
            yield item
    finally:
        cancel.set()
        worker.join()
    if failure:
        raise failure[0]


class TextPieces:
    """Turns a growing list of token ids into text pieces whose concatenation is the stripped,
    stop-cut answer the non-streamed path gives (`final`)."""

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer, self.stops, self.ids = tokenizer, stops, []
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.sent = ""
        self.stopped = False  # a stop string has appeared: generation may end

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def feed(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        text = self._text().lstrip()
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            safe = text[: min(cuts)]
        else:
            safe = text.rstrip("\ufffd")  # an incomplete character decodes as U+FFFD until its last byte
            safe = safe[: max(len(safe) - self.hold, 0)]
        safe = safe.rstrip()
        if not safe.startswith(self.sent) or len(safe) <= len(self.sent):
            return ""
        piece, self.sent = safe[len(self.sent) :], safe
        return piece

    def final(self) -> tuple[str, str]:
        """(the whole answer, stripped as the non-streamed one is, the piece not sent yet)."""
        answer = self._text().strip()
        cuts = [i for i in (answer.find(s) for s in self.stops) if i >= 0]
        text = answer[: min(cuts)] if cuts else answer
        rest = text[len(self.sent) :] if text.startswith(self.sent) else ""
        return answer, rest
