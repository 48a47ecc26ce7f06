"""What a client sent that does not decode: `WireError`, naming the offending place."""

from __future__ import annotations

from collections.abc import Sequence

TEXT_ONLY = "this server's models are text-only"


class WireError(ValueError):
    """A request body that does not decode into something this server can run.

    `message` is meant for the client and names the offending place; `loc` is that place as
    a path (`("data", 0, "loss_fn_inputs", "weights")`), `()` for the body as a whole.
    """

    def __init__(self, message: str, loc: tuple[str | int, ...] = (), status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.loc = tuple(loc)
        self.status = status  # 413: a body over a size limit


def where(loc: Sequence[str | int]) -> str:
    """("data", 0, "loss_fn_inputs", "weights") -> "data[0].loss_fn_inputs.weights"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out
