"""Fixed-width verify tiers: the static verify shapes a CUDA graph can replay.

The ragged verify (the default) gives request r a window of W_r = 1 + verify_len_r rows, so the
batch's token count changes every round and no captured graph fits it. With tiers, every request of
a round verifies the same width W, the smallest tier that holds the longest window; the rows past a
request's own verify length are computed and ignored: acceptance stops at ``verify_lens`` (the
scheduler's choice, unchanged), and a causal forward makes rows <= verify_len independent of the
rows after them. The token count is then R x W for one of a few W: the shapes SGLang's TARGET_VERIFY
graph runner captures (one graph per batch-size bucket and width), as its built-in DSPARK worker's
uniform "cap-accept" verify does.

Spelling (``DSPARK_VERIFY_TIERS``): ``off`` (ragged), ``auto`` (2, 4, 8, ... up to gamma + 1, and
gamma + 1 itself) or a comma list of widths (anchor row included), each in [2, gamma + 1]; gamma + 1
is always added so that every window fits. A round in which no request verifies a draft keeps width
1: a plain DECODE forward.

Pure (torch only): the worker applies the chosen width in `verify.layout_windows`.
"""

from __future__ import annotations

import bisect

__all__ = ["VerifyTierError", "parse_tiers", "check_tier_spelling", "pick_width"]


class VerifyTierError(ValueError):
    """A DSPARK_VERIFY_TIERS value that names no usable widths."""


def check_tier_spelling(text: str) -> None:
    """Syntax only (gamma is not known yet when settings are read): off | auto | widths >= 2."""
    value = text.strip().lower()
    if value in ("off", "auto"):
        return
    try:
        widths = [int(w) for w in value.split(",") if w.strip()]
    except ValueError:
        raise VerifyTierError(f"verify_tiers: expected off, auto or comma-separated widths, got {text!r}") from None
    if not widths or min(widths) < 2:
        raise VerifyTierError(f"verify_tiers: widths count the anchor row and must be >= 2, got {text!r}")


def parse_tiers(text: str, gamma: int) -> tuple[int, ...] | None:
    """The sorted widths for a drafter of ``gamma`` drafts per block, or None for ``off``."""
    check_tier_spelling(text)
    value = text.strip().lower()
    if value == "off":
        return None
    widest = gamma + 1
    if value == "auto":
        widths = {1 << k for k in range(1, widest.bit_length()) if 1 << k <= widest}
    else:
        widths = {int(w) for w in value.split(",") if w.strip()}
        too_wide = sorted(w for w in widths if w > widest)
        if too_wide:
            raise VerifyTierError(f"verify_tiers: widths {too_wide} exceed gamma + 1 = {widest}")
    return tuple(sorted(widths | {widest}))


def pick_width(longest_window: int, tiers: tuple[int, ...]) -> int:
    """The smallest tier >= ``longest_window`` (1 + the round's longest verify length); 1 stays 1
    (no request verifies a draft: a DECODE forward)."""
    if longest_window <= 1:
        return 1
    index = bisect.bisect_left(tiers, longest_window)
    if index == len(tiers):
        raise VerifyTierError(f"a window of {longest_window} rows exceeds the widest tier {tiers[-1]}")
    return tiers[index]
