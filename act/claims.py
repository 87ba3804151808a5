"""Which thread steers which module: one thread at a time per module.

Forward hooks live on the module, so they act on every call of it, from any thread. Two
threads that each steered the same module would both get both transports; so a second
steering of a module from another thread, while the first is attached, is refused. One
thread may stack several steerings of a module (e.g. two transports chained).
"""

from __future__ import annotations

import threading
import weakref

from torch import nn

from .errors import ActError

_lock = threading.Lock()
# module -> {claim id: (thread id, thread name)}
_claims: weakref.WeakKeyDictionary[nn.Module, dict[int, tuple[int, str]]] = (
    weakref.WeakKeyDictionary()
)


def claim(modules: dict[str, nn.Module], claim_id: int) -> None:
    """Record that the current thread steers `modules` (name -> module) under `claim_id`.

    Raises:
        ActError: another thread steers one of the modules; nothing is recorded.
    """
    thread = threading.current_thread()
    with _lock:
        for name, module in modules.items():
            others = [
                owner for owner in _claims.get(module, {}).values() if owner[0] != thread.ident
            ]
            if others:
                raise ActError(
                    f"module {name!r} is already steered by thread {others[0][1]!r}; a model "
                    "can be steered by one thread at a time (its hooks act on every call, so "
                    "two requests would mix their transports): give each thread its own copy "
                    "of the model, or steer one request at a time"
                )
        for module in modules.values():
            _claims.setdefault(module, {})[claim_id] = (thread.ident, thread.name)


def release(modules: list[nn.Module], claim_id: int) -> None:
    """Forget the claim `claim_id` on `modules` (no error if it was never recorded)."""
    with _lock:
        for module in modules:
            owners = _claims.get(module)
            if owners is not None:
                owners.pop(claim_id, None)
                if not owners:
                    del _claims[module]
