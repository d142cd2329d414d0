"""Who sent a request: API keys mapped to tenants with limits, from `--api-keys-file` (YAML).

```yaml
keys:
  "sk-team-a-...":                 # the key itself, or "sha256:<hex>" of it (the file need hold no secret)
    tenant: team-a
    requests_per_minute: 30
    burst: 5                       # requests granted at once on top of the steady rate
    prompt_tokens_per_minute: 20000
    generated_tokens_per_minute: 4000
    max_concurrent: 8
    priority: 0                    # the best (lowest) priority its requests may ask for
    weight: 1.0                    # fair-share weight (--scheduling-policy fair)
    models: [smollm2-135m-instruct]
    admin: true                    # may read every tenant's usage (GET /v1/usage)
```

A tenant without limits is unlimited. Only sha256 digests of keys are kept after loading; a key is
found by comparing the digest of the one presented with every digest, in constant time and without
stopping at a match. Logs name a key by `key_id`, the first 12 hex digits of its digest.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from jaxserve.errors import UserError

_HASHED = re.compile(r"sha256:([0-9a-fA-F]{64})")


@dataclass(frozen=True)
class Tenant:
    """One tenant's identity and limits (None: unlimited)."""

    name: str
    requests_per_minute: int | None = None
    burst: int = 0  # requests on top of the steady rate: at most requests_per_minute + max(burst, 1) in any minute
    prompt_tokens_per_minute: int | None = None
    generated_tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    priority: int | None = None  # a request's own priority is clamped to be no better (lower) than this (None: no cap)
    weight: float = 1.0
    models: tuple[str, ...] | None = None  # None: every model
    admin: bool = False

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def limited(self) -> bool:
        return any(v is not None for v in (self.requests_per_minute, self.prompt_tokens_per_minute, self.generated_tokens_per_minute,
                                            self.max_concurrent))


ANONYMOUS = Tenant("anonymous")  # every request when the server has no keys: counted, never limited


# field -> (check, what it must be)
_FIELDS: dict[str, tuple[Any, str]] = {
    "tenant": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "requests_per_minute": (lambda v: _count(v) and v > 0, "an integer > 0"),
    "burst": (lambda v: _count(v), "an integer >= 0"),
    "prompt_tokens_per_minute": (lambda v: _count(v) and v > 0, "an integer > 0"),
    "generated_tokens_per_minute": (lambda v: _count(v) and v > 0, "an integer > 0"),
    "max_concurrent": (lambda v: _count(v) and v > 0, "an integer > 0"),
    "priority": (lambda v: isinstance(v, int) and not isinstance(v, bool) and -(2**31) <= v < 2**31, "a 32-bit integer"),
    "weight": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf"), "a number > 0"),
    "models": (lambda v: isinstance(v, list) and v and all(isinstance(m, str) and m for m in v), "a non-empty list of model names"),
    "admin": (lambda v: isinstance(v, bool), "true or false"),
}


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_id(key_digest: bytes) -> str:
    """How logs name a key: never the key, a short prefix of its digest."""
    return key_digest.hex()[:12]


class KeyTable:
    """Key digests and their tenants; `find` compares a presented key with all of them in constant time."""

    def __init__(self, entries: list[tuple[bytes, Tenant]]) -> None:
        self.entries = entries
        self.tenants = {t.name: t for _, t in entries}

    @classmethod
    def unlimited(cls, keys: tuple[str, ...], name: str = "default") -> KeyTable:
        """Plain `--api-key`s: one unlimited tenant, which may also read usage."""
        tenant = Tenant(name, admin=True)
        return cls([(digest(k), tenant) for k in keys])

    def find(self, key: str) -> tuple[bytes, Tenant] | None:
        """The presented key's digest and tenant, None for an unknown key."""
        return self.by_digest(digest(key))

    def by_digest(self, presented: bytes) -> tuple[bytes, Tenant] | None:
        """A key digest's entry and tenant (None: not in the table); every digest is compared, so the
        time taken says nothing about which one matched."""
        found = None
        for entry_digest, tenant in self.entries:
            if hmac.compare_digest(presented, entry_digest):
                found = (entry_digest, tenant)
        return found


def load_keys(path: str | Path) -> KeyTable:
    """Read a keys file; UserError naming the line and field of the first problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"cannot read the keys file {path}: {e.strerror}") from None
    where = f"keys file {path}"
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{where}{line}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), dict) or not data["keys"]:
        raise UserError(f"{where}: expected a mapping with a non-empty 'keys' mapping of key -> tenant settings")
    lines = _lines(root, where)
    entries: list[tuple[bytes, Tenant]] = []
    seen: dict[bytes, int] = {}
    by_name: dict[str, tuple[Tenant, int]] = {}
    for i, (key, settings) in enumerate(data["keys"].items()):
        line = lines.get((i, None), 0)
        at = f"{where}, line {line}"
        if not isinstance(key, str) or not key:
            raise UserError(f"{at}: a key must be a non-empty string")
        match = _HASHED.fullmatch(key)
        if key.startswith("sha256:") and match is None:
            raise UserError(f"{at}: a hashed key must be 'sha256:' and 64 hex digits")
        key_digest = bytes.fromhex(match.group(1)) if match else digest(key)
        if key_digest in seen:
            raise UserError(f"{at}: the same key as on line {seen[key_digest]}")
        seen[key_digest] = line
        if not isinstance(settings, dict) or "tenant" not in settings:
            raise UserError(f"{at}: each key needs its settings as a mapping with at least 'tenant'")
        for name, value in settings.items():
            field_at = f"{where}, line {lines.get((i, name), line)}, field '{name}'"
            if name not in _FIELDS:
                raise UserError(f"{field_at}: unknown field (known: {', '.join(_FIELDS)})")
            check, what = _FIELDS[name]
            if not check(value):
                raise UserError(f"{field_at}: must be {what}, got {value!r}")
        values = {("name" if k == "tenant" else k): (tuple(v) if k == "models" else v) for k, v in settings.items()}
        tenant = Tenant(**{**values, "weight": float(values.get("weight", 1.0))})
        if tenant.name in by_name and by_name[tenant.name][0] != tenant:
            raise UserError(f"{at}: tenant '{tenant.name}' has other settings on line {by_name[tenant.name][1]}; "
                            "keys of one tenant must agree")
        by_name.setdefault(tenant.name, (tenant, line))
        entries.append((key_digest, tenant))
    return KeyTable(entries)


def _lines(root: yaml.Node, where: str) -> dict[tuple[int, str | None], int]:
    """1-based line of each key entry (i, None) and of each of its fields (i, field), by entry index;
    UserError for a key written twice (YAML would keep only the last)."""
    out: dict[tuple[int, str | None], int] = {}
    keys = next((v for k, v in root.value if k.value == "keys"), None) if isinstance(root, yaml.MappingNode) else None
    if not isinstance(keys, yaml.MappingNode):
        return out
    first: dict[str, int] = {}
    for i, (key_node, settings) in enumerate(keys.value):
        out[(i, None)] = line = key_node.start_mark.line + 1
        if key_node.value in first:
            raise UserError(f"{where}, line {line}: the same key as on line {first[key_node.value]}")
        first[key_node.value] = line
        if isinstance(settings, yaml.MappingNode):
            for field_node, _ in settings.value:
                out[(i, str(field_node.value))] = field_node.start_mark.line + 1
    return out


def with_priority(tenant: Tenant, requested: int) -> int:
    """A request's priority, no better than its tenant's class."""
    return requested if tenant.priority is None else max(requested, tenant.priority)

