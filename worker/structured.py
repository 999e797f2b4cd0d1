"""Structured output on the worker: per-sequence grammar matchers and the sampler's bitmask.

NOTE on state: a matcher's state is a function of the sequence's output tokens, never of
what this process happened to see. `SequenceGrammar.sync(tokens)` brings the matcher to
exactly `tokens` (accepting the new ones, rolling back any it accepted that are not there),
so a worker that first sees a sequence (new, re-sent after preemption or a reset, moved to
another worker group, re-planned by a standby scheduler) replays its emitted tokens into a
fresh matcher, and a sampler called with several rows of one sequence (draft positions of
speculative decoding) just syncs each row to its own tokens. This is what other engines get
wrong (duplicated JSON after migration, "failed to advance FSM" under speculation).

The bitmask is applied to the logits before any other processing (`apply_grammar_bitmask`,
called first thing by the sampler), on the constrained rows only, with xgrammar's kernels:
its C++ CPU kernel for CPU logits, its Triton kernel on CUDA. EOS is in the mask only where
the grammar may end; once the grammar is complete only EOS is, so the request stops there.

Compiling runs on a background thread as soon as the worker learns the sequence (the gateway
compiled the same spec already, so this is usually a cache hit in the gateway's process and
a fresh compile here once per distinct spec, ~10-30 ms after `GrammarBackend.prewarm`). A
sequence whose grammar still compiles at its first sampling is not sampled in that step
(`StepOutput.deferred`): the scheduler runs its last token again in a later one, so the others
in the step never wait for it; only a step of nothing but such sequences waits for the compile.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from common.grammar import GrammarCompiler, import_xgrammar
from common.structured_outputs import StructuredOutputs

logger = logging.getLogger(__name__)


class SequenceGrammar:
    """The grammar state of one sequence: an xgrammar GrammarMatcher kept in step with the
    sequence's output tokens. The API speculative decoding needs is here too: `accept`,
    `rollback`, `fill_bitmask`, `is_terminated`, `count_valid(drafts)`."""

    def __init__(self, compiled: Future) -> None:
        self._compiled = compiled
        self._matcher: Any = None
        self.tokens: list[int] = []      # what the matcher has accepted, in order
        self.broken: str | None = None   # why it cannot constrain (then only EOS is allowed)

    def _ready(self) -> bool:
        if self._matcher is None and self.broken is None:
            try:
                compiled = self._compiled.result()
                self._matcher = import_xgrammar().GrammarMatcher(compiled)
            except Exception as e:   # unavailable here, or a spec the gateway should have refused
                self.broken = f"{type(e).__name__}: {e}"
                logger.error("structured output for a sequence failed: %s", self.broken)
        return self._matcher is not None

    def compiling(self) -> bool:
        """Its grammar is still compiling: using it now would wait for the compile."""
        return self._matcher is None and self.broken is None and not self._compiled.done()

    def accept(self, token_id: int) -> bool:
        """Advance by one token; False (and no change) if the grammar does not allow it."""
        if not self._ready() or not self._matcher.accept_token(int(token_id)):
            return False
        self.tokens.append(int(token_id))
        return True

    def rollback(self, n: int) -> None:
        """Undo the last n accepted tokens."""
        n = min(n, len(self.tokens))
        if n > 0:
            self._matcher.rollback(n)
            del self.tokens[-n:]

    def sync(self, tokens: Sequence[int]) -> bool:
        """Make the matcher's state the one after exactly `tokens`. False when the grammar
        rejects one of them (the state then stops before it)."""
        if not self._ready():
            return False
        n = len(self.tokens)
        if len(tokens) < n or list(tokens[:n]) != self.tokens:
            common = 0
            for a, b in zip(tokens, self.tokens):
                if a != b:
                    break
                common += 1
            self.rollback(n - common)
        for t in tokens[len(self.tokens):]:
            if not self.accept(t):
                return False
        return True

    def count_valid(self, drafts: Sequence[int]) -> int:
        """How many leading draft tokens the grammar accepts from the current state (the
        state is left unchanged)."""
        k = 0
        for t in drafts:
            if not self.accept(t):
                break
            k += 1
        self.rollback(k)
        return k

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> bool:
        """Row `row` of an int32 [R, ceil(V / 32)] CPU bitmask: the tokens allowed next.
        False (row untouched) when the grammar cannot constrain (`broken`)."""
        if not self._ready():
            return False
        self._matcher.fill_next_token_bitmask(bitmask, row)
        return True

    def is_terminated(self) -> bool:
        """The grammar accepted its stop token (EOS): nothing may follow."""
        return self._ready() and self._matcher.is_terminated()


class GrammarBackend:
    """A worker's compiled-grammar cache (common.grammar's LRU) and its compile thread.
    Built from the model directory on the first structured sequence."""

    def __init__(self, model_dir: str | None, vocab_size: int,
                 eos_token_ids: Sequence[int]) -> None:
        self.model_dir, self.vocab_size = model_dir, vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self._compiler: GrammarCompiler | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")

    def _compiler_for_model(self) -> GrammarCompiler:
        if self._compiler is None:   # only ever on the grammar thread
            if self.model_dir is None:
                raise RuntimeError("this worker was built without a model directory, so it "
                                   "has no tokenizer for structured output")
            from common.tokenizer import Tokenizer

            self._compiler = GrammarCompiler(Tokenizer.from_dir(self.model_dir),
                                             self.vocab_size, self.eos_token_ids)
        return self._compiler

    def _compile(self, spec: StructuredOutputs) -> Any:
        return self._compiler_for_model().compile(spec)

    def _prepare(self) -> None:
        try:
            self._compiler_for_model().prepare()
        except Exception as e:   # noqa: BLE001 - a structured sequence meets it again, alone
            logger.warning("structured output is not available on this worker: %s", e)

    def prewarm(self) -> Future:
        """Import xgrammar and build the tokenizer's grammar tables now, on the grammar thread.

        NOTE: done lazily, the first structured sequence a worker ever saw waited ~1.5 s for
        them (xgrammar's import, which brings transformers, and a pass over the vocabulary)
        and every sequence in its step waited with it. A serving worker calls this once at
        start; a spec of its own then compiles in ~10-30 ms."""
        return self._pool.submit(self._prepare)

    def matcher(self, spec: StructuredOutputs) -> SequenceGrammar:
        """A fresh matcher for a sequence; its grammar compiles in the background."""
        return SequenceGrammar(self._pool.submit(self._compile, spec))


def apply_grammar_bitmask(logits: torch.Tensor, rows: Sequence[Any]) -> None:
    """Mask, IN PLACE, the logits of the rows whose `grammar` is set to the tokens their
    grammar allows next (-inf elsewhere). Each row's matcher is first synced to the row's
    output tokens. A row whose grammar cannot constrain (broken, or it rejects the row's own
    tokens) may only end: EOS alone stays allowed."""
    idx = [i for i, r in enumerate(rows) if getattr(r, "grammar", None) is not None]
    if not idx:
        return
    xgr = None
    S, V = logits.shape
    bitmask = torch.full((S, (V + 31) // 32), -1, dtype=torch.int32)
    ended: list[int] = []
    for i in idx:
        g: SequenceGrammar = rows[i].grammar
        if (g.sync(rows[i].output_token_ids) and not g.is_terminated()
                and g.fill_bitmask(bitmask, i)):
            xgr = xgr or import_xgrammar()
        else:
            if g.broken is None:
                logger.warning("a structured sequence's tokens do not match its grammar: "
                               "ending it")
            ended.append(i)
    if xgr is not None:
        live = [i for i in idx if i not in ended]
        mask = bitmask.to(logits.device, non_blocking=True)
        try:
            xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=V, indices=live)
        except ImportError:   # a CUDA machine without triton: xgrammar's plain torch path
            xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=V, indices=live,
                                            backend="torch_native")
    for i in ended:
        eos = [t for t in rows[i].eos_token_ids if t < V]
        if eos:
            keep = logits[i, eos].clone()
            logits[i].fill_(float("-inf"))
            logits[i, eos] = keep
