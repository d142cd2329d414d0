"""Grammar matchers for one tokenizer (llguidance): compiled once per distinct guide, copied per
sequence, and filling the per-step token bitmasks.

A compiled matcher is kept in an LRU cache keyed by the guide; each constrained sequence gets a deep
copy, which costs microseconds, so only the first request with a new schema pays for compiling it.
Compiling releases the GIL; the server compiles in a worker thread before a request reaches the
engine, which then finds it cached (it compiles again only if the entry was evicted in between).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Sequence

import llguidance
import llguidance.numpy
import numpy as np

from jaxserve.errors import UserError
from jaxserve.structured.guide import Guide
from jaxserve.tokenizer import Tokenizer


class GrammarCompiler:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, capacity: int = 256) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.capacity = capacity
        self._compiled: collections.OrderedDict[Guide, llguidance.LLMatcher] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._ll: llguidance.LLTokenizer | None = None
        self._ll_error: str | None = None
        self._executor: llguidance.LLExecutor | None = None  # a thread pool for the per-step masks, on first use
        self.num_compiles = 0  # fresh compiles (cache misses) since start

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use (~0.2 s for a 49k vocabulary), so servers that never constrain never pay.
        A vocabulary llguidance cannot take (no EOS, more tokens than the model) makes every
        constrained request a UserError saying so."""
        with self._lock:
            if self._ll is None and self._ll_error is None:
                try:
                    self._ll = llguidance.LLTokenizer(
                        self.tokenizer.grammar_tokenizer(), n_vocab=self.vocab_size, eos_token=list(self.tokenizer.eos_token_ids)
                    )
                except Exception as e:
                    self._ll_error = f"constrained decoding is not available for this model's tokenizer: {e}"
            if self._ll is None:
                raise UserError(self._ll_error)
            return self._ll

    def compile(self, guide: Guide) -> llguidance.LLMatcher:
        """The compiled matcher of `guide` (cached); UserError saying what is wrong with a bad one."""
        return self._compile(guide)[0]

    def prepare(self, guide: Guide) -> float | None:
        """Compile `guide` unless it is cached: the seconds a fresh compile took, else None."""
        return self._compile(guide)[1]

    def _compile(self, guide: Guide) -> tuple[llguidance.LLMatcher, float | None]:
        with self._lock:
            if guide in self._compiled:
                self._compiled.move_to_end(guide)
                return self._compiled[guide], None
        start = time.perf_counter()
        try:
            grammar = guide.grammar()
        except ValueError as e:
            raise UserError(f"invalid {guide.description}: {e}") from None
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)  # reports errors, never raises
        if matcher.is_error():
            raise UserError(f"invalid {guide.description}: {matcher.get_error().strip()}")
        seconds = time.perf_counter() - start
        with self._lock:
            self.num_compiles += 1
            self._compiled[guide] = matcher
            while len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
        return matcher, seconds

    def matcher(self, guide: Guide) -> llguidance.LLMatcher:
        """A fresh matcher for one sequence."""
        return self.compile(guide).deep_copy()

    def fill(self, rows: Sequence[tuple[llguidance.LLMatcher, int]], mask: np.ndarray) -> None:
        """Write the allowed-token bits of each (matcher, row) into `mask` [R, words], in parallel."""
        with self._lock:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
        llguidance.numpy.fill_next_token_bitmask_par(self._executor, list(rows), mask)
