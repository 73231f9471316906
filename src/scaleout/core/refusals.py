"""Why a client's update was left out of a round, as one word from a short fixed list.

Combiners report each refusal to the controller as text (what `session show --clients`
prints). Monitoring needs a label with few values instead, so a dashboard can count
refusals by cause: this maps a reason's text to one of ``REASONS``. Pure: text in, word out.
"""

from __future__ import annotations

import re

NON_FINITE = "non_finite"  # NaN or inf in a tensor
OUT_OF_RANGE = "out_of_range"  # a value the model's dtype cannot hold (1e300 for float32)
MISMATCH = "mismatch"  # tensors missing, extra, of another shape or a non-numeric dtype
NUM_EXAMPLES = "num_examples"  # no usable num_examples (the update's weight)
CORRUPT = "corrupt"  # not a safetensors payload, wrong size or sha256
TOO_LARGE = "too_large"  # the update or its metadata is larger than allowed
CLIENT_ERROR = "client_error"  # the package's train callback raised or returned nonsense
TIMEOUT = "timeout"  # no update (or not all of it) before the round's timeout
STALLED = "stalled"  # asked for its update, the client sent nothing for a while
DISCONNECTED = "disconnected"  # the client left (and did not come back in time)
UNREACHABLE = "unreachable"  # the combiner could not send the client its task
ABORTED = "aborted"  # the client's task was stopped (the session was)
OTHER = "other"

REASONS = (NON_FINITE, OUT_OF_RANGE, MISMATCH, NUM_EXAMPLES, CORRUPT, TOO_LARGE, CLIENT_ERROR, TIMEOUT, STALLED, DISCONNECTED, UNREACHABLE, ABORTED, OTHER)

# First match wins: the client's own failure first (its text may quote anything), then the
# checks a combiner runs on an update, then the ways an update never arrives.
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (reason, re.compile(pattern, re.I))
    for reason, pattern in (
        (
            CLIENT_ERROR,
            r"^train failed|^the train callback |the client reported a failure|^no train callback"
            r"|^train callback must return (a ScaleoutModel|\(model)",
        ),
        (ABORTED, r"^task aborted"),
        (NON_FINITE, r"contains NaN or inf|not finite"),
        (OUT_OF_RANGE, r"outside the model's|does not fit"),
        (NUM_EXAMPLES, r"num_examples|weight must be a finite number"),
        (MISMATCH, r"^tensor '.*': (missing from the update|is not a tensor of the model|dtype |shape )"),
        (TOO_LARGE, r"exceeds the limit|as JSON; the limit is"),
        (CORRUPT, r"safetensors|is corrupt|announced an update of|payload"),
        (STALLED, r"sent nothing for"),
        (TIMEOUT, r"timeout|timed out"),
        (DISCONNECTED, r"disconnected|left the round"),
        (UNREACHABLE, r"could not send the task|not connected to this combiner"),
    )
)


def refusal_reason(text: str | None) -> str:
    """The word for why an update was refused or never came (``OTHER`` if none fits)."""
    if not text:
        return OTHER
    for reason, pattern in _RULES:
        if pattern.search(text):
            return reason
    return OTHER
