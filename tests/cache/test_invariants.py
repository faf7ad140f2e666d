"""Random workloads: the byte budget, chain connectivity, pins and lookup results hold after every step."""

from hypothesis import given, settings
from hypothesis import strategies as st

from kvcellar.cache import Match, MemoryTier, PrefixCache, Priority

from .fakes import ATTENTION, B, RECURRENT, ROOT, SMALL_WINDOW, insert_chain, restored_tokens

MAX_PARTIALS = 3
prompts = st.lists(st.integers(0, 1), max_size=3 * B + 2)  # a 2-token vocabulary shares many prefixes
ops = st.one_of(
    st.tuples(st.just("insert"), prompts, st.sampled_from(Priority), st.integers(1, 30), st.booleans()),
    st.tuples(st.just("lookup"), prompts, st.booleans(), st.booleans()),
    st.tuples(st.just("budget"), st.integers(0, 150)),
    st.tuples(st.just("release")),
    st.tuples(st.just("discard"), st.integers(0, 50)),
)


def _insert(cache: PrefixCache, prompt: list[int], priority: Priority, num_bytes: int, with_logits: bool) -> None:
    keys = insert_chain(cache, prompt, num_bytes=num_bytes, priority=priority)
    if len(keys) < len(prompt) // B:
        return  # refused somewhere in the chain
    tail = prompt[len(keys) * B :]
    if tail or with_logits:
        parent = keys[-1] if keys else ROOT
        cache.insert_partial(parent, tail, "tail", max(1, num_bytes // 2), priority, with_logits)


def _check_match(cache: PrefixCache, match: Match, prompt: list[int], exact: bool) -> None:
    assert restored_tokens(match) == prompt[: match.num_tokens]
    assert match.num_tokens < len(prompt) or match.use_logits or not prompt
    if match.partial is not None and not (cache.capabilities.can_trim and not exact):
        assert match.num_partial_tokens == match.partial.num_tokens  # never trimmed
        assert match.partial.is_partial
    if exact:
        assert match.partial is None or match.use_logits
    assert sum(match.tokens_by_tier.values()) == match.num_tokens


def _check_tier(tier: MemoryTier, held: Match | None, connected: bool) -> None:
    if held is not None and connected:  # pinned entries are never evicted for space
        assert all(tier.get(entry.key) is entry for entry in held.entries)
    entries = tier.entries()
    assert tier.num_bytes <= tier.budget_bytes
    assert tier.num_bytes == sum(entry.num_bytes for entry in entries)
    assert sum(entry.is_partial for entry in entries) <= MAX_PARTIALS
    pinned = {id(entry) for entry in held.entries} if held is not None else set()
    assert all(entry.num_pins == (id(entry) in pinned) for entry in entries)
    if connected:  # no discard yet: evictions never broke a chain
        blocks = {entry.key for entry in entries if not entry.is_partial}
        assert all(entry.parent == ROOT or entry.parent in blocks for entry in entries)


@settings(max_examples=150, deadline=None)
@given(
    capabilities=st.sampled_from([ATTENTION, RECURRENT, SMALL_WINDOW]),
    policy=st.sampled_from(["priority-lru", "lru"]),
    budget=st.integers(0, 150),
    steps=st.lists(ops, max_size=40),
)
def test_random_workload_keeps_invariants(capabilities, policy, budget, steps) -> None:
    tier = MemoryTier(budget, policy=policy)
    cache = PrefixCache(ROOT, capabilities, [tier], max_partial_entries=MAX_PARTIALS)
    held: Match | None = None
    connected = True
    for step in steps:
        kind = step[0]
        if kind == "insert":
            _insert(cache, *step[1:])
        elif kind == "lookup":
            _, prompt, exact, hold = step
            match = cache.lookup(prompt, exact=exact)
            _check_match(cache, match, prompt, exact)
            if hold and held is None:
                held = match
            else:
                cache.release(match)
        elif kind == "budget":
            before = (tier.budget_bytes, tier.num_bytes, tier.num_entries)
            try:
                cache.set_budget_bytes(step[1])
            except ValueError:
                assert held is not None  # only pins can block a budget change here
                assert (tier.budget_bytes, tier.num_bytes, tier.num_entries) == before
            else:
                assert tier.budget_bytes == step[1]
        elif kind == "release" and held is not None:
            cache.release(held)
            held = None
        elif kind == "discard" and tier.num_entries:
            entries = tier.entries()
            cache.discard(entries[step[1] % len(entries)].key)
            connected = False
        _check_tier(tier, held, connected)
    if held is not None:
        cache.release(held)
    assert all(entry.num_pins == 0 for entry in tier.entries())
