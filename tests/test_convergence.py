"""Order-independence: any delivery order, duplicates or re-sends converge on the same rows.

Hypothesis generates a Clerk history (creates, updates with increasing ``updated_at``, deletes at the
end of an entity's life, memberships before their user/org, user/org deletes that cascade to
memberships) and applies it three ways, each in its own id namespace of the same database:

a. in order, as signed deliveries through ``WebhookProcessor.process``;
b. a permutation with re-deliveries of the same svix id (deduplicated by the inbox);
c. a permutation where every event is sent twice under different svix ids, through
   ``Store.transaction()`` + ``record_delivery`` + ``apply_envelope``.

All three must equal the pure model (``plan`` + ``decide`` on the in-order history) and each other.
Live rows are compared on every Clerk-derived column; deleted rows only on being deleted, since
what a tombstone still holds depends on which updates reached it first, and nothing reads it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clerk_sync.engine import Entity
from clerk_sync.events import parse_envelope
from clerk_sync.ingest import WebhookProcessor, apply_envelope
from clerk_sync.store import Store
from clerk_sync.webhooks import WebhookVerifier
from tests._history import (
    TERMINAL_STATUSES,
    Ev,
    Final,
    Spec,
    bodies,
    build_history,
    db_rows,
    inbox,
    model,
    normalize,
    render,
    specs,
)
from tests.factories import signed


@st.composite
def histories(draw: st.DrawFn) -> list[Ev]:
    n_users = draw(st.integers(1, 3))
    n_orgs = draw(st.integers(1, 2))
    parents = draw(st.lists(st.tuples(st.integers(0, n_orgs - 1), st.integers(0, n_users - 1)),
                            min_size=1, max_size=4))
    entities = specs(n_users, n_orgs, parents)
    wants_delete = st.integers(0, 3).map(lambda x: x == 0)
    step = st.tuples(st.integers(0, len(entities) - 1), wants_delete, st.integers(0, 3))
    return build_history(entities, draw(st.lists(step, min_size=10, max_size=40)))


def expected_by_hand(history: Sequence[Ev], ns: str) -> Final:
    """The closed form, independent of ``decide``: last upsert wins; deletes (and their cascade) stick."""
    deleted = {ev.spec for ev in history if ev.op == "deleted"}

    def gone(spec: Spec) -> bool:
        if spec in deleted:
            return True
        if spec.entity is not Entity.MEMBERSHIP:
            return False
        return Spec(Entity.USER, spec.user or "") in deleted or Spec(Entity.ORGANIZATION, spec.org or "") in deleted

    last: dict[Spec, Ev] = {}
    for ev in history:
        if ev.op != "deleted" or ev.spec not in last:
            last[ev.spec] = ev
    out: Final = {}
    for spec, ev in last.items():
        key = (spec.entity.value, render(ev, ns)["data"]["id"])
        out[key] = None if gone(spec) else model([bodies([ev], ns)[0]])[key]
    return out


def run_in_order(processor: WebhookProcessor, history: Sequence[Ev], ns: str) -> None:
    for i, body in enumerate(bodies(history, ns)):
        outcome = processor.process(*signed(body, f"msg_{ns}_{i}"))
        assert outcome.status in TERMINAL_STATUSES


def run_with_redeliveries(processor: WebhookProcessor, history: Sequence[Ev], ns: str, order: list[int]) -> int:
    all_bodies = bodies(history, ns)
    duplicates = 0
    for i in order:
        outcome = processor.process(*signed(all_bodies[i], f"msg_{ns}_{i}"))
        duplicates += outcome.status == "duplicate"
    return duplicates


def run_resent(store: Store, history: Sequence[Ev], ns: str, order: list[tuple[int, int]]) -> None:
    all_bodies = bodies(history, ns)
    for i, copy in order:
        envelope = parse_envelope(all_bodies[i])
        svix_id = f"msg_{ns}_{i}_{copy}"
        with store.transaction() as writer:
            assert writer.record_delivery(svix_id, envelope.raw, event_type=envelope.type,
                                          instance_id=envelope.instance_id, event_timestamp=envelope.timestamp_ms)
            status, error = apply_envelope(writer, envelope)
            writer.finish_delivery(svix_id, status, error)
        assert error is None


def test_any_delivery_order_converges(db_url: str, store: Store, verifier: WebhookVerifier) -> None:
    processor = WebhookProcessor(store, verifier)
    examples = 40 if db_url.startswith("sqlite") else 25

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(history=histories(), data=st.data())
    def check(history: list[Ev], data: st.DataObject) -> None:
        base = uuid.uuid4().hex[:10]
        ns_a, ns_b, ns_c = f"{base}a", f"{base}b", f"{base}c"
        n = len(history)
        extra = data.draw(st.lists(st.integers(0, n - 1), max_size=n), label="redelivered")
        order_b = data.draw(st.permutations([*range(n), *extra]), label="order_b")
        order_c = data.draw(st.permutations([(i, c) for i in range(n) for c in (0, 1)]), label="order_c")

        run_in_order(processor, history, ns_a)
        duplicates = run_with_redeliveries(processor, history, ns_b, order_b)
        run_resent(store, history, ns_c, order_c)

        with store.connect() as conn:
            rows = {ns: db_rows(conn, ns) for ns in (ns_a, ns_b, ns_c)}
            inboxes = {ns: inbox(conn, f"msg_{ns}_") for ns in (ns_a, ns_b, ns_c)}

        for ns, got in rows.items():
            want = model(bodies(history, ns))
            assert got == want, f"namespace {ns[-1]}"
            assert want == expected_by_hand(history, ns)
        assert normalize(rows[ns_a], ns_a) == normalize(rows[ns_b], ns_b) == normalize(rows[ns_c], ns_c)
        # The pure model is order-independent too (on what it promises: live columns, deleted or not).
        permuted = bodies(history, ns_b)
        assert model(permuted[i] for i in order_b) == model(permuted)

        assert duplicates == len(extra)
        assert len(inboxes[ns_b]) == n
        assert len(inboxes[ns_c]) == 2 * n
        for ns, rows_by_id in inboxes.items():
            for svix_id, statuses in rows_by_id.items():
                assert len(statuses) == 1, svix_id
                assert statuses[0] in TERMINAL_STATUSES, (ns, svix_id, statuses)

    check()


@pytest.mark.parametrize("first", ["user", "organization"])
def test_membership_before_parent_then_parent_deleted(first: str, store: Store, verifier: WebhookVerifier) -> None:
    """A concrete case of the cascade: the membership arrives first, its parent is created and deleted."""
    entities = specs(1, 1, [(0, 0)])
    parent = 0 if first == "user" else 1
    history = build_history(entities, [(2, False, 1), (parent, False, 0), (parent, True, 0), (2, False, 2)])
    ns = uuid.uuid4().hex[:10]
    run_in_order(WebhookProcessor(store, verifier), history, ns)
    with store.connect() as conn:
        got = db_rows(conn, ns)
    assert got == model(bodies(history, ns))
    assert got[("organization_memberships", f"orgmem_{ns}_m0")] is None
