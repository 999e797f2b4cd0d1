"""Relaying one request's output: the scheduler's token-id events become per-choice text deltas.

Text is the gateway's job (DESIGN.md §2): one IncrementalDetokenizer per choice holds back a
possible stop string, and when a stop string ends a choice, the choice is done; once every
choice is done the request is cancelled so the scheduler frees its KV blocks.

NOTE: nothing here logs prompt or output text: it is user content.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from common import redis_schema as schema
from common.convert import Choice, GenerateResult, StreamChunk
from common.detokenize import IncrementalDetokenizer
from common.logging_setup import prompts_allowed
from common.redis_schema import OutputEvent
from common.sampling_params import SamplingParams
from gateway.errors import GatewayError
from gateway.queue import EventsLost, RequestNotFound
from gateway.resume import RelayMeta

if TYPE_CHECKING:   # the state builds relays (GatewayState.start), so only for typing
    from gateway.state import GatewayState

logger = logging.getLogger(__name__)


class _ChoiceState:
    def __init__(self, index: int, detok: IncrementalDetokenizer, with_logprobs: bool) -> None:
        self.index = index
        self.detok = detok
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list | None = [] if with_logprobs else None
        self.finish_reason: str | None = None

    def result(self) -> Choice:
        return Choice(self.index, "".join(self.text), self.token_ids, self.logprobs, self.finish_reason)


class Generation:
    """Relays one request's output events as per-choice deltas (``StreamChunk``s).

    Iterate ``chunks()`` once; ``result()`` then holds the full choices. With ``last_index``
    (a resume) the events up to it rebuild the text state without being yielded again.
    A relay that stops before the end (the client went away) cancels the request on
    ``close()`` unless its disconnect policy is ``continue``.
    """

    def __init__(self, state: GatewayState, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams, disconnect: str = schema.DISCONNECT_CANCEL,
                 last_index: int = -1, meta: RelayMeta | None = None) -> None:
        self.state = state
        self.request_id = request_id
        # On a resume only the prompt's tail is known (the detokenizer's context); its
        # length comes from the record, for usage.
        self.prompt_token_ids = prompt_token_ids
        self.meta = meta
        self.num_prompt_tokens = meta.num_prompt_tokens if meta else len(prompt_token_ids)
        self.attached = 0   # the record's attach count as this relay attached (0: the first)
        self.params = params
        self.disconnect = disconnect
        self.done = False
        self._last_index = last_index
        self._choices = [
            _ChoiceState(i, IncrementalDetokenizer(
                state.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output),
                params.logprobs is not None)
            for i in range(params.n)]
        self.prompt_logprobs: list | None = [None] if params.prompt_logprobs is not None else None
        self._relay = state.telemetry.relay(request_id, resumed=last_index >= 0)
        self._error: str | None = None
        self.reservation: tuple[str, str, int] | None = None   # (tenant, id, tokens) to release
        self.rate_headers: dict[str, str] = {}
        self._started = False   # the first event was seen (the tenant's queued count dropped)

    @property
    def usage(self) -> tuple[int, int]:
        return self.num_prompt_tokens, sum(len(c.token_ids) for c in self._choices)

    def result(self) -> GenerateResult:
        return GenerateResult(self.request_id, [c.result() for c in self._choices], *self.usage)

    async def collect(self) -> GenerateResult:
        async for _ in self.chunks():
            pass
        return self.result()

    async def chunks(self) -> AsyncIterator[StreamChunk]:
        """One chunk per event that changed something; the last one carries usage."""
        try:
            async for ev in self.state.submitter.events(self.request_id):
                if ev.error is not None:
                    logger.warning("request %s failed: %s", self.request_id, ev.error,
                                   extra={"request_id": self.request_id})
                    self._error = ev.error
                    raise GatewayError(500, f"generation failed: {ev.error}")
                deltas = self._apply(ev)
                if self.reservation is not None and not self._started:
                    self._started = True
                    self.state.started_soon(*self.reservation[:2])   # (tenant, its entry's id)
                if ev.token_ids and ev.index > self._last_index:
                    self._relay.tokens(ev.seq_index)
                if all(c.finish_reason is not None for c in self._choices):
                    self.done = True
                    if not ev.final:   # ended by stop strings: free the scheduler's blocks
                        await self.state.submitter.cancel(self.request_id)
                if ev.index > self._last_index and (deltas or self.done):
                    yield StreamChunk(self.request_id, ev.index, deltas,
                                      self.usage if self.done else None)
                if self.done:
                    return
            raise GatewayError(500, "the request's output ended early")
        except RequestNotFound:
            raise GatewayError(404, f"request {self.request_id} is unknown or expired") from None
        except EventsLost as e:
            raise GatewayError(500, str(e)) from None

    def _apply(self, ev: OutputEvent) -> list[Choice]:
        """Fold one event into its choice; returns the deltas of the choices that changed."""
        if ev.prompt_logprobs and self.prompt_logprobs is not None and ev.seq_index == 0:
            self.prompt_logprobs.extend(ev.prompt_logprobs)
        if not 0 <= ev.seq_index < len(self._choices):
            raise GatewayError(500, f"event for sequence {ev.seq_index} of {len(self._choices)}")
        deltas = []
        c = self._choices[ev.seq_index]
        if c.finish_reason is None:   # else: tokens made before the scheduler saw our cancel
            d = c.detok.add_tokens(ev.token_ids)
            ids = list(ev.token_ids[:d.num_tokens])   # nothing past a stop string
            lps = [(t, lp, [(i, v) for i, v in top])
                   for t, lp, top in (ev.logprobs or [])[:len(ids)]]
            text = d.text
            if c.detok.stopped is not None:
                c.finish_reason = "stop"
            elif ev.finish_reason is not None:
                text += self._flush(c, ev.finish_reason)
            c.text.append(text)
            c.token_ids.extend(ids)
            if c.logprobs is not None:
                c.logprobs.extend(lps)
            if text or ids or c.finish_reason:
                deltas.append(Choice(c.index, text, ids, lps if c.logprobs is not None else None,
                                     c.finish_reason))
        if ev.final:
            # The request is over (e.g. aborted as a whole): close every choice still open.
            for other in self._choices:
                if other.finish_reason is None:
                    text = self._flush(other, ev.finish_reason or "abort")
                    other.text.append(text)
                    deltas.append(Choice(other.index, text, [],
                                         [] if other.logprobs is not None else None,
                                         other.finish_reason))
        return deltas

    @staticmethod
    def _flush(c: _ChoiceState, reason: str) -> str:
        """The scheduler ended the choice: release the held-back text (a stop string that
        completes in it still makes the reason "stop")."""
        text = c.detok.flush()
        c.finish_reason = "stop" if c.detok.stopped else reason
        return text

    def close(self) -> None:
        """The relay is over (the faces always call this). If the consumer stopped early,
        cancel unless the client asked to continue."""
        if not self._relay.ended:
            self._report()
        if self.reservation is not None:
            tenant, rid, reserved = self.reservation
            self.reservation = None
            if self.done or self.disconnect != schema.DISCONNECT_CONTINUE:
                # Finished, or about to be cancelled (which frees the scheduler at its next step).
                self.state.release_soon(tenant, rid, reserved - sum(self.usage))
            else:   # it goes on without its client: its slots stay taken until it finishes
                self.state.release_when_finished(tenant, rid, reserved, self.num_prompt_tokens)
        if not self.done:
            self.done = True
            if self.disconnect == schema.DISCONNECT_CONTINUE:
                self.state.detach_soon(self.request_id, self.attached)
            else:
                self.state.cancel_soon(self.request_id)

    def _report(self) -> None:
        """Metrics, relay span and the request's log line (text only with --log-prompts)."""
        fallback = "error" if self._error is not None else "abort"
        reasons = [c.finish_reason or fallback for c in self._choices]
        text = None
        if prompts_allowed():
            text = (self.state.tokenizer.decode(self.prompt_token_ids),
                    " | ".join("".join(c.text) for c in self._choices))
        self._relay.end(reasons, *self.usage, error=self._error, text=text)
