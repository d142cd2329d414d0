"""LoRA adapters served as models of their own: `--lora-modules` at start, and vLLM's runtime routes.

An adapter is served under its name on a base model: the default model, or the `base_model_name`
its module gives (NAME, so every version of that model holds it and it follows the traffic split,
or NAME@VERSION). It is read once per version and loaded into each replica's engine, where it takes
a device slot when a step first needs it; a version that loads later (lazy, or through the admin API)
gets the adapters of its model as it does. vLLM's `POST /v1/load_lora_adapter` and
`/v1/unload_lora_adapter` exist only with an admin key and need it; unloading lets accepted requests
finish with the adapter.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

from aiohttp import web

from jaxserve.errors import UserError
from jaxserve.models.lora import LoraAdapter
from jaxserve.server.admin import read_json
from jaxserve.server.deployment import Deployment
from jaxserve.server.model_spec import ID
from jaxserve.server.protocol import ApiError
from jaxserve.server.router import ModelRouter

log = logging.getLogger("jaxserve.adapters")

ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class LoraModule:
    """An adapter to serve: its id, its PEFT folder and the model it runs on (None: the default model)."""

    name: str
    path: str
    base: str | None = None

    @classmethod
    def from_flag(cls, value: str) -> LoraModule:
        """vLLM's `--lora-modules` forms: `NAME=PATH`, or JSON `{"name": ..., "path": ..., "base_model_name": ...}`."""
        if value.lstrip().startswith("{"):
            try:
                data = json.loads(value)
            except json.JSONDecodeError as e:
                raise UserError(f"--lora-modules {value}: not valid JSON: {e}") from None
            if not isinstance(data, dict) or not all(isinstance(data.get(k), str) and data[k] for k in ("name", "path")):
                raise UserError(f"--lora-modules {value}: give 'name' and 'path' (strings), and optionally 'base_model_name'")
            unknown = sorted(set(data) - {"name", "path", "base_model_name"})
            if unknown:
                raise UserError(f"--lora-modules {value}: unknown key {unknown[0]!r}")
            return cls(data["name"], data["path"], data.get("base_model_name"))
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--lora-modules {value!r}: write NAME=PATH (or vLLM's JSON form)")
        return cls(name, path)


class AdapterRegistry:
    """The adapters served, by id; keeps every version's engines holding those of its model."""

    def __init__(self, router: ModelRouter, enabled: bool) -> None:
        """`enabled`: whether the engines have adapter slots (`--enable-lora`, `--lora-modules`)."""
        self.router = router
        self.enabled = enabled
        self.modules: dict[str, LoraModule] = {}
        loaded = router.on_loaded
        router.on_loaded = lambda d: (loaded(d), self._catch_up(d))

    def _deployments(self, base: str) -> list[Deployment]:
        """The versions an adapter on `base` must be in: every version of a NAME, or the one NAME@VERSION names."""
        if base in self.router.models:
            return list(self.router.models[base].versions.values())
        name, _, version = base.rpartition("@")
        model = self.router.models.get(name)
        if model is None or version not in model.versions:
            raise UserError(f"no model '{base}' to load the adapter on (served: {', '.join(map(repr, self.router.models))})",
                            param="base_model_name", code="model_not_found")
        return [model.versions[version]]

    def read(self, module: LoraModule) -> list[tuple[Deployment, LoraAdapter]]:
        """The adapter read for every loaded version it must be in (blocking file reads: at start, or
        in a worker thread); UserError when it cannot be served."""
        if not self.enabled:
            raise UserError("LoRA is off: start the server with --enable-lora (or --lora-modules)", param="lora_name")
        self._check_free(module.name)
        return self._reads(module, self._deployments(self._base(module)))

    def _base(self, module: LoraModule) -> str:
        return module.base or self.router.default

    @staticmethod
    def _reads(module: LoraModule, deployments: list[Deployment]) -> list[tuple[Deployment, LoraAdapter]]:
        """The adapter read for each of `deployments` that has engines (blocking file reads)."""
        return [(d, d.engines[0].read_adapter(module.name, module.path)) for d in deployments if d.engines]

    def _check_free(self, name: str) -> None:
        if ID.fullmatch(name) is None:
            raise UserError(f"'{name}' is not a valid adapter name: letters, digits, '.', '_', ':' or '-' (no '@' or '/')", param="lora_name")
        if name in self.modules or name in self.router.models or name in self.router.adapters:
            raise UserError(f"the LoRA adapter '{name}' has already been loaded (or the id is a model's)", param="lora_name")

    def add(self, module: LoraModule, reads: list[tuple[Deployment, LoraAdapter]]) -> None:
        """Serve an adapter `read` gave (on the event loop); UserError, with nothing changed, when a
        version refuses it."""
        self._check_free(module.name)
        base = self._base(module)
        read = {id(d) for d, _ in reads}  # a version that finished loading since gets it too
        reads = reads + self._reads(module, [d for d in self._deployments(base) if id(d) not in read])
        self._install(module.name, reads)
        self.router.add_adapter(module.name, base, module.name, module.path)
        self.modules[module.name] = module
        log.info("LoRA adapter loaded", extra={"adapter": module.name, "base": base})

    @staticmethod
    def _install(name: str, reads: list[tuple[Deployment, LoraAdapter]]) -> None:
        """Load each version's adapter into every replica of it, or into none."""
        done = []
        try:
            for d, adapter in reads:
                for engine in d.engines:
                    engine.load_adapter(adapter)
                    done.append(engine)
        except UserError:
            for engine in done:
                engine.unload_adapter(name)
            raise

    def remove(self, name: str) -> None:
        """Stop serving an adapter; requests already accepted finish with it."""
        module = self.modules.pop(name, None)
        if module is None:
            raise UserError(f"the LoRA adapter '{name}' cannot be found", param="lora_name", code="model_not_found")
        self.router.remove_adapter(name)
        for d in self._deployments(self._base(module)):
            for engine in d.engines:
                if name in engine.adapters:  # a version that refused it never had it
                    engine.unload_adapter(name)
        log.info("LoRA adapter unloaded", extra={"adapter": name})

    def _catch_up(self, d: Deployment) -> None:
        """A version just loaded: load its model's adapters into it (one it refuses is logged and stays
        off that version). Reading blocks the event loop for the adapter's files, so that no request
        reaches the version before its adapters."""
        for module in self.modules.values():
            try:
                if d in self._deployments(self._base(module)) and module.name not in d.engines[0].adapters:
                    self._install(module.name, self._reads(module, [d]))
            except UserError as e:
                log.error("LoRA adapter %s not loaded into %s: %s", module.name, d.spec.id, e)

    # ---- vLLM's runtime routes -------------------------------------------------------------

    def routes(self, guarded: Callable[[Handler], Handler]) -> list[web.RouteDef]:
        return [web.post(ROUTES[0], guarded(self.load_route)), web.post(ROUTES[1], guarded(self.unload_route))]

    @staticmethod
    async def _fields(request: web.Request, *names: str) -> dict:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        for name in names:
            if not isinstance(body.get(name), str) or not body[name]:
                raise ApiError(400, f"'{name}' is required (a string)", name)
        return body

    async def load_route(self, request: web.Request) -> web.Response:
        body = await self._fields(request, "lora_name", "lora_path")
        base = body.get("base_model_name")
        if base is not None and not isinstance(base, str):
            raise ApiError(400, "'base_model_name' must be a string", "base_model_name")
        module = LoraModule(body["lora_name"], body["lora_path"], base)
        try:
            self.add(module, await asyncio.get_running_loop().run_in_executor(None, self.read, module))
        except UserError as e:
            raise ApiError(404 if e.code == "model_not_found" else 400, str(e), e.param or "lora_path", code=e.code) from None
        return web.Response(text=f"Success: LoRA adapter '{module.name}' added successfully.")

    async def unload_route(self, request: web.Request) -> web.Response:
        body = await self._fields(request, "lora_name")
        try:
            self.remove(body["lora_name"])
        except UserError as e:
            raise ApiError(404, str(e), "lora_name", "not_found_error", e.code) from None
        return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")

