"""Who may call what: the three roles and the one table of the role each RPC requires.

Roles are ordered, each including the ones below it: ``reader`` searches and explains,
``writer`` also changes indexes, ``admin`` may do everything (including RPCs added later and not
yet in the table, which default to ``admin`` so that a new RPC is never open by accident;
``tests/unit/gateway/test_auth.py`` checks that the table names every RPC of the service).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2 as pb

__all__ = [
    "HEALTH_SERVICE",
    "REFLECTION_SERVICES",
    "ROLES",
    "RPC_ROLES",
    "STORE_RESULTS_ROLE",
    "Principal",
    "Role",
    "required_role",
]

Role = Literal["reader", "writer", "admin"]
#: Lowest to highest; a role grants every role before it.
ROLES: tuple[Role, ...] = ("reader", "writer", "admin")

#: The role each RPC of ``histoxplain.v1.RetrievalService`` requires, keyed by the RPC's name
#: in the service descriptor.
RPC_ROLES: Mapping[str, Role] = {
    "Search": "reader",
    "SearchAndExplain": "reader",
    "Explain": "reader",
    "DescribeIndex": "reader",
    "ListIndexes": "reader",
    "GetModelInfo": "reader",
    "ExplainDicomRegion": "reader",  # and STORE_RESULTS_ROLE to write its results into the PACS
    "IndexImages": "writer",
    "DeleteImages": "writer",
    "IndexDicom": "writer",
}

#: The role ExplainDicomRegion needs in addition when ``store_results`` writes into the PACS
#: (checked by the servicer: the table above is per RPC, this depends on a request field).
STORE_RESULTS_ROLE: Role = "writer"

#: Health answers without credentials: load balancers and the kubelet hold none.
HEALTH_SERVICE = "grpc.health.v1.Health"
#: Reflection lists the API; any authenticated principal may read it.
REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")

_RETRIEVAL = pb.DESCRIPTOR.services_by_name["RetrievalService"]
_METHOD_ROLES: dict[str, Role] = {
    f"/{_RETRIEVAL.full_name}/{method.name}": RPC_ROLES.get(method.name, "admin") for method in _RETRIEVAL.methods
}


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a name for the log and the roles it holds (unknown role names
    from an identity provider are kept but grant nothing)."""

    name: str
    roles: frozenset[str]
    mechanism: str

    def has_role(self, required: Role) -> bool:
        """True when one of the principal's roles is ``required`` or above it."""
        rank = ROLES.index(required)
        return any(role in ROLES[rank:] for role in self.roles)


def service_of(method: str) -> str:
    """``/package.Service/Method`` -> ``package.Service``."""
    return method.lstrip("/").partition("/")[0]


def required_role(method: str) -> Role:
    """The role a full method name (``/histoxplain.v1.RetrievalService/Search``) requires."""
    if method in _METHOD_ROLES:
        return _METHOD_ROLES[method]
    if service_of(method) in REFLECTION_SERVICES:
        return "reader"
    return "admin"


def roles_from(values: Iterable[str]) -> frozenset[str]:
    return frozenset(value.strip() for value in values if value.strip())
