"""Remote commands on `cmd/<name>`: parse, dispatch, and always answer on `cmd/<name>/reply`.

A malformed command gets an error reply with a stable code; no command payload ever reaches
eval, pickle or a shell. Standard library only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from edge_slm.errors import EdgeSlmError

log = logging.getLogger(__name__)
MAX_COMMAND_BYTES = 1 << 20

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class CommandError(EdgeSlmError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class CommandRouter:
    """name -> handler(args) -> result dict. handle() turns any payload into a reply dict."""

    def __init__(self, handlers: dict[str, Handler]) -> None:
        self.handlers = dict(handlers)

    def handle(self, name: str, payload: bytes) -> dict[str, Any]:
        reply: dict[str, Any] = {"schema_version": 1, "id": None, "command": name, "ok": False}
        try:
            request = self._parse(payload)
            reply["id"] = request.get("id")
            handler = self.handlers.get(name)
            if handler is None:
                raise CommandError("unknown_command", f"unknown command {name!r}; known: {', '.join(sorted(self.handlers))}")
            args = request.get("args", {})
            if not isinstance(args, dict):
                raise CommandError("bad_request", '"args" must be a JSON object')
            reply["result"] = handler(args)
            reply["ok"] = True
        except CommandError as exc:
            reply.update(error=exc.code, message=str(exc))
        except EdgeSlmError as exc:
            reply.update(error=getattr(exc, "code", "failed"), message=str(exc))
        except Exception as exc:  # a bug in a handler must not stop the agent
            log.exception("command %s failed", name)
            reply.update(error="internal_error", message=f"{type(exc).__name__}: {exc}")
        return reply

    @staticmethod
    def _parse(payload: bytes) -> dict[str, Any]:
        if len(payload) > MAX_COMMAND_BYTES:
            raise CommandError("too_large", f"command is {len(payload)} bytes; the limit is {MAX_COMMAND_BYTES}")
        if not payload.strip():
            return {}
        try:
            obj = json.loads(payload.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise CommandError("bad_encoding", "command payload is not UTF-8 JSON") from exc
        except (ValueError, RecursionError) as exc:
            raise CommandError("bad_json", f"command payload is not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise CommandError("bad_request", 'command payload must be a JSON object like {"id": "c1", "args": {}}')
        cid = obj.get("id")
        if cid is not None and (not isinstance(cid, (str, int)) or isinstance(cid, bool)):
            raise CommandError("bad_request", '"id" must be a string or an integer')
        if isinstance(cid, str):
            try:
                cid.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise CommandError("bad_request", '"id" is not valid Unicode') from exc
        return obj
