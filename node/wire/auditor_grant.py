"""An auditor grant: the provider's signed permission for one auditor's key to read its full ledger entries over
/llorch/ledger/1 for a while. Checkpoints and proofs are public; entries go only to the node's trusted gateways and
to the holder of a grant (docs/protocol.md §7).

The provider makes one with `llorch node grant-auditor PEER_ID --days N` and hands the file to the auditor, who
presents it in every `get_entries` request (`llorch ledger fetch --grant FILE`). The node checks that it signed the
grant itself, that the stream's remote peer is the grant's auditor, and that the grant is in force.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llorch.ledger.errors import EncodingError
from llorch.ledger.objects import SignedObject

GRANT_DAYS_MAX = 366
GRANT_VALIDITY_MS_MAX = GRANT_DAYS_MAX * 86_400_000
GRANT_BYTES_MAX = 1024


@dataclass(frozen=True)
class AuditorGrant(SignedObject):
    SIGNED_TYPE: ClassVar[str] = "auditor_grant"
    SIGNER_FIELD: ClassVar[str] = "provider_key"
    FIELDS: ClassVar[dict[str, str]] = {
        "v": "uint", "provider_key": "key", "auditor_key": "key", "issued_ms": "uint", "expires_ms": "uint",
    }

    v: int
    provider_key: bytes
    auditor_key: bytes
    issued_ms: int
    expires_ms: int

    def _validate(self) -> None:
        if not self.issued_ms < self.expires_ms <= self.issued_ms + GRANT_VALIDITY_MS_MAX:
            raise EncodingError(f"an auditor grant runs from issued_ms for at most {GRANT_DAYS_MAX} days")
        if self.auditor_key == self.provider_key:
            raise EncodingError("a provider needs no grant to read its own ledger")

    def in_force(self, now_ms: int, clock_skew_ms: int) -> bool:
        return self.issued_ms <= now_ms + clock_skew_ms and now_ms < self.expires_ms
