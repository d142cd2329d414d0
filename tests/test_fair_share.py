"""Scheduling policies (`EngineConfig.scheduling_policy`) on a tiny random model, counted in engine
steps: under fair a tenant arriving behind another's flood starts within a few steps (under fcfs it
waits for the flood), preemption by fair share keeps outputs and page accounting exact, weights split
the computed tokens, fcfs ignores priority, and a priority class still outranks fair share."""

from __future__ import annotations

import dataclasses
import random

import pytest

from jaxserve.config import EngineConfig
from jaxserve.engine.fair_share import FairShare
from jaxserve.engine.interface import Admission
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.engine.sequence import Sequence
from jaxserve.sampling_params import SamplingParams
from tests.tiny_models import SMALL_PAGES, tiny_config, tiny_params

# test_swap.py's limits and model (their programs are compiled once for both modules): 8 running
# slots, 64 tokens a step; ROOMY has pages for every slot, SMALL_PAGES for about two sequences.
ROOMY = dataclasses.replace(SMALL_PAGES, num_pages=400)
SWAP = dataclasses.replace(SMALL_PAGES, swap_space=0.01, preemption_mode="swap")


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config("llama", max_position_embeddings=256)
    return cfg, tiny_params(cfg)


def _engine(tiny, cfg: EngineConfig, policy: str) -> LLMEngine:
    model_cfg, params = tiny
    return LLMEngine(model_cfg, params, dataclasses.replace(cfg, scheduling_policy=policy), eos_token_ids=(2,))


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


class Driver:
    """Steps an engine, recording each request's tokens and the step of its first one."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine, self.steps = engine, 0
        self.tokens: dict[str, list[int]] = {}
        self.first: dict[str, int] = {}

    def step(self) -> None:
        for out in self.engine.step():
            self.first.setdefault(out.request_id, self.steps)
            if out.token_id is not None:
                self.tokens.setdefault(out.request_id, []).append(out.token_id)
        self.steps += 1

    def until_full(self) -> None:
        """Until every running slot is taken by a decoding sequence."""
        s, slots = self.engine.scheduler, self.engine.engine_config.max_num_seqs
        while len(s.running) < slots or any(q.num_tokens - q.num_computed > 1 for q in s.running):
            self.step()

    def finish(self) -> None:
        while self.engine.has_unfinished():
            self.step()


def _all_free(engine: LLMEngine) -> None:
    engine.blocks.check_consistency()
    assert engine.blocks.num_free == engine.num_pages - 1  # page 0 is the null page
    if engine.swapper is not None:
        engine.swapper.pool.check_consistency()
        assert engine.swapper.pool.num_free == engine.swapper.pool.num_pages


def _flood(engine: LLMEngine, rng: random.Random, vocab: int, count: int = 24) -> None:
    for i in range(count):
        engine.add_request(f"a{i}", [rng.randrange(3, vocab) for _ in range(40)], _greedy(40), Admission(tenant="A"))


@pytest.mark.parametrize("policy", ["fair", "fcfs"])
def test_a_tenant_behind_a_flood_starts_within_steps_under_fair_and_waits_for_it_under_fcfs(tiny, policy) -> None:
    """Tenant A's 24 long requests fill all 8 slots with 16 queued behind them; tenant B's 3 short
    ones arrive then. Under fair each gets its first token within 4 steps (an idle engine takes 1),
    while most of A's queue is still waiting; under fcfs only after all of A's queue has started."""
    vocab = tiny[0].vocab_size
    rng = random.Random(0)
    engine = _engine(tiny, ROOMY, policy)
    run = Driver(engine)
    _flood(engine, rng, vocab)
    run.until_full()
    arrival = run.steps
    for j in range(3):
        engine.add_request(f"b{j}", [rng.randrange(3, vocab) for _ in range(6)], _greedy(4), Admission(tenant="B"))
    run.finish()
    b_waits = [run.first[f"b{j}"] - arrival for j in range(3)]
    a_starts = sorted(run.first[f"a{i}"] for i in range(24))
    if policy == "fair":
        assert max(b_waits) < 4, b_waits
        assert sum(start > arrival + 4 for start in a_starts) >= 12  # most of A's queue starts after B
        assert engine.scheduler.num_preemptions > 0
    else:
        assert min(b_waits) > a_starts[-1] - arrival, (b_waits, a_starts)
        assert min(b_waits) > 50 and engine.scheduler.num_preemptions == 0
    assert len(run.tokens) == 27 and all(len(t) == 40 for rid, t in run.tokens.items() if rid[0] == "a")
    _all_free(engine)


def _mixed_requests(vocab: int, seed: int) -> dict[str, tuple[list[int], SamplingParams, Admission]]:
    """30 greedy requests from four tenants of different weights, A sending half of them."""
    rng = random.Random(seed)
    weights = {"A": 1.0, "B": 2.0, "C": 1.0, "D": 0.5}
    out = {}
    for i in range(30):
        tenant = rng.choice("AAABCD")
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(5, 50))]
        out[f"{tenant}{i}"] = (prompt, _greedy(rng.randint(10, 40)), Admission(tenant=tenant, weight=weights[tenant]))
    return out


@pytest.mark.parametrize("cfg", [ROOMY, SMALL_PAGES, SWAP], ids=["slots", "pages-recompute", "pages-swap"])
def test_fair_preemption_keeps_greedy_outputs_and_frees_every_page(tiny, cfg) -> None:
    """Four tenants' requests, A's all at once and the others' one a step: fair share preempts for
    slots (and, on a small cache, pages run out mid-step, and preempted sequences recompute or swap);
    every request still has the tokens of a roomy run without preemption, and every page ends free."""
    requests = _mixed_requests(tiny[0].vocab_size, seed=1)
    reference = _engine(tiny, ROOMY, "priority").run({rid: (prompt, sp) for rid, (prompt, sp, _) in requests.items()})
    engine = _engine(tiny, cfg, "fair")
    run = Driver(engine)
    for rid, (prompt, sp, admission) in requests.items():
        engine.add_request(rid, prompt, sp, admission)
        if admission.tenant != "A":
            run.step()
    run.finish()
    assert engine.scheduler.num_preemptions > 0
    assert run.tokens == {rid: out.outputs[0].token_ids for rid, out in reference.items()}
    if engine.swapper is not None:
        assert engine.stats().swap.swap_outs > 0
    _all_free(engine)


def test_weights_split_computed_tokens(tiny) -> None:
    """Tenants A (weight 1) and B (weight 3) both keep requests queued through a 200-step window:
    B computes 3 tokens for A's 1. Fair share holds their normalized usages (tokens / weight) within
    two steps' budgets of each other (a preemption margin is at most one budget per unit weight, and
    a step overshoots by at most another), checked at every step; so over the window A's tokens and
    a third of B's differ by at most twice that bound (A computes ~2,200 here: a ratio of 3 +- 0.35)."""
    vocab = tiny[0].vocab_size
    rng = random.Random(4)
    engine = _engine(tiny, ROOMY, "fair")
    for tenant, weight, count in (("A", 1.0, 45), ("B", 3.0, 135)):
        for i in range(count):
            prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(40, 60))]
            admission = Admission(tenant=tenant, weight=weight)
            engine.add_request(f"{tenant}{i}", prompt, _greedy(rng.randint(4, 16)), admission)
    run, share, bound = Driver(engine), engine.scheduler.share, 2 * ROOMY.max_num_batched_tokens
    for _ in range(10):
        run.step()
    start = share.usage()
    for _ in range(200):
        run.step()
        assert {s.tenant for s in engine.scheduler.waiting} == {"A", "B"}  # both still flooding
        assert abs(share.normalized("A") - share.normalized("B")) <= bound
    end = share.usage()
    a, b = end["A"] - start["A"], end["B"] - start["B"]
    print(f"window: A computed {a} tokens, B {b}: ratio {b / a:.3f}")
    assert abs(a - b / 3) <= 2 * bound
    assert a > 2000
    run.finish()
    _all_free(engine)


def test_fcfs_ignores_priority(tiny) -> None:
    """Under fcfs a priority-0 request arriving behind priority-1 ones (every slot taken, two queued)
    preempts nothing and starts after the two queued ahead of it."""
    vocab = tiny[0].vocab_size
    rng = random.Random(5)
    engine = _engine(tiny, ROOMY, "fcfs")
    run = Driver(engine)
    for i in range(10):
        engine.add_request(f"s{i}", [rng.randrange(3, vocab) for _ in range(8)], _greedy(30 + i), Admission(priority=1))
    run.until_full()
    engine.add_request("urgent", [5, 6, 7, 8], _greedy(4), Admission(priority=0))
    run.finish()
    assert engine.scheduler.num_preemptions == 0
    assert run.first["urgent"] > max(run.first["s8"], run.first["s9"])
    _all_free(engine)


def test_a_priority_class_outranks_fair_share(tiny) -> None:
    """Under fair, tenant B (low usage) has requests queued behind tenant A's flood when A sends a
    priority -1 request: it preempts one of A's own streams and starts in the next step, ahead of B's."""
    vocab = tiny[0].vocab_size
    rng = random.Random(6)
    engine = _engine(tiny, ROOMY, "fair")
    run = Driver(engine)
    _flood(engine, rng, vocab)
    run.until_full()
    for j in range(6):
        engine.add_request(f"b{j}", [rng.randrange(3, vocab) for _ in range(20)], _greedy(20), Admission(tenant="B"))
    run.step()
    run.step()
    s = engine.scheduler
    assert s.share.normalized("B") < s.share.normalized("A") and sum(q.tenant == "B" for q in s.waiting) >= 3
    engine.add_request("urgent", [5, 6, 7, 8], _greedy(4), Admission(priority=-1, tenant="A"))
    arrival = run.steps
    run.step()
    assert run.first["urgent"] == arrival
    assert all(f"b{j}" not in run.first for j in range(3, 6))
    run.finish()
    _all_free(engine)


def _seq(tenant: str, weight: float = 1.0) -> Sequence:
    return Sequence("r", [1], SamplingParams(), 0, tenant=tenant, weight=weight)


def test_the_ledger_lifts_a_tenant_that_becomes_active_to_the_least_served() -> None:
    """A tenant returning from idle starts level with the least-served active tenant: not with credit
    banked while idle, nor behind by its own history; tokens count per unit of weight."""
    share = FairShare()
    share.sync({"A", "B"})
    share.charge(_seq("A"), 1000)
    share.charge(_seq("B", weight=2.0), 400)
    assert (share.normalized("A"), share.normalized("B")) == (1000.0, 200.0)
    share.sync({"B"})  # A goes idle
    share.charge(_seq("B", weight=2.0), 200)
    share.sync({"A", "B", "C"})  # A returns (ahead by its history), C is new (no history)
    assert (share.normalized("A"), share.normalized("B"), share.normalized("C")) == (300.0, 300.0, 300.0)
    share.sync({"A"})
    share.sync({"A", "C"})  # C was idle while A computed nothing: it gains no credit
    assert share.normalized("C") == share.normalized("A") == 300.0
    assert share.usage() == {"A": 1000, "B": 600}
