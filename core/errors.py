"""Errors that cross layers and map to gRPC status codes at the front door."""
from __future__ import annotations


class WorkerUnavailable(RuntimeError):
    """A worker holding part of a request's state died, restarted or stopped answering.

    The request cannot continue (its KV state is gone); the server answers UNAVAILABLE so
    the client may retry, and every other request carries on.
    """

    def __init__(self, message: str, actor_lost: bool = True):
        super().__init__(message)
        self.actor_lost = actor_lost      # False: the actor is fine but lost this request's state
