"""The catalog of Simotel API v4 endpoints the worker may call, and nothing else.

The facts (path, method, kind, retry safety, required and optional body fields) live in
`api_v4_catalog.json` beside this module, taken from Simotel's wiki and its Postman collection:
the 79 documented endpoints plus `voicemails/audio/download`, which the collection has. Every
request the worker makes is to `base_url + endpoint.path` for an endpoint found here, so a
command can never make the worker call an arbitrary URL.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Literal

Kind = Literal["read", "write", "action", "upload", "download"]
Lane = Literal["fast", "slow"]

# Report searches and cursor walks can take Simotel seconds; they run in their own lane so they
# never hold up click-to-call and agent commands.
_SLOW_PREFIXES = ("reports/", "autodialer/reports/")


@dataclass(frozen=True, slots=True)
class Endpoint:
    path: str
    method: str
    kind: Kind
    retry_safe: bool
    required: tuple[str, ...]
    optional: tuple[str, ...]

    @property
    def lane(self) -> Lane:
        if self.kind in ("read", "download") and self.path.startswith(_SLOW_PREFIXES):
            return "slow"
        return "fast"

    @property
    def is_upload(self) -> bool:
        return self.kind == "upload"

    @property
    def is_download(self) -> bool:
        return self.kind == "download"

    @property
    def routing_suffix(self) -> str:
        """`call/originate/act` -> `call.originate.act` (the routing-key form)."""
        return self.path.replace("/", ".")


def _load() -> dict[str, Endpoint]:
    raw = json.loads(resources.files("bridge").joinpath("api_v4_catalog.json").read_text("utf-8"))
    catalog: dict[str, Endpoint] = {}
    for entry in raw:
        ep = Endpoint(
            path=entry["path"],
            method=entry["method"],
            kind=entry["kind"],
            retry_safe=bool(entry["retry_safe"]),
            required=tuple(entry["required"]),
            optional=tuple(entry["optional"]),
        )
        catalog[ep.path] = ep
    return catalog


CATALOG: Mapping[str, Endpoint] = _load()
BY_ROUTING_SUFFIX: Mapping[str, Endpoint] = {ep.routing_suffix: ep for ep in CATALOG.values()}


def lookup(action: str) -> Endpoint | None:
    """The endpoint for an action written as a path (`call/originate/act`) or in routing-key
    form (`call.originate.act`); None when it is not in the catalog."""
    return CATALOG.get(action) or BY_ROUTING_SUFFIX.get(action)
