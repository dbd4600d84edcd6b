"""Which audit a POST means, decided with the store's conditional put so that racing API instances agree.

Two kinds of write-once index objects map a request to an audit id:

- ``idempotency/{sha256(key)}.json`` for a client's ``Idempotency-Key``: the key always means that audit.
- ``idempotency/spec/{fingerprint}/first.json``, then ``…/after-{id}.json``: a chain per spec. A keyless
  POST walks it to the first audit that is not finished; when every audit in it has finished, it claims
  the next link. Each link is written once (``put_if_absent``), so exactly one request wins each link and
  the chain never forks — no compare-and-swap is needed, only "create if absent".

The winner of a claim creates the audit under the id it claimed; a loser reads the winning id instead.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

from workers.pipeline.status import now
from workers.storage import ObjectNotFound, ObjectStore, StorageError


class Claim(NamedTuple):
    """Who an index object points to, and whether this caller just wrote it."""

    audit_id: str
    won: bool


class KeyReused(ValueError):  # noqa: N818 - names the condition, as the API reports it
    """An Idempotency-Key already names an audit with a different spec."""


class IdempotencyIndex:
    """The write-once index objects under ``idempotency/`` of the store."""

    def __init__(self, store: ObjectStore, root: str = "idempotency") -> None:
        self.store, self.root = store, root.strip("/")

    def key_slot(self, idempotency_key: str) -> str:
        """Where a client key's audit id lives (hashed: keys are client data, not key-safe, and may be long)."""
        return f"{self.root}/{hashlib.sha256(idempotency_key.encode()).hexdigest()}.json"

    def spec_slot(self, fingerprint: str, after: str | None = None) -> str:
        """A link of the spec's chain: the first audit of the spec, or the one after audit ``after``."""
        return f"{self.root}/spec/{fingerprint}/{'first' if after is None else f'after-{after}'}.json"

    def claim(self, slot: str, fingerprint: str, candidate: str) -> Claim:
        """Point ``slot`` at ``candidate`` unless it already points somewhere; return where it points."""
        entry = {"audit_id": candidate, "fingerprint": fingerprint, "claimed_at": now().isoformat()}
        for _ in range(5):
            if self.store.put_json(slot, entry, if_absent=True):
                return Claim(candidate, won=True)
            try:
                existing = self.store.get_json(slot)
            except ObjectNotFound:
                continue  # released (failed submission) between our put and our read: try again
            if existing.get("fingerprint") != fingerprint:
                raise KeyReused(
                    f"this Idempotency-Key already names audit {existing.get('audit_id')}, submitted with a "
                    "different spec"
                )
            return Claim(str(existing["audit_id"]), won=False)
        raise StorageError(f"index object {slot!r} kept disappearing while being claimed")

    def release(self, slot: str) -> None:
        """Forget a key's audit (its submission failed), so retrying with the same key starts afresh."""
        self.store.delete(slot)
