"""The policy's regular expressions, on RE2.

RE2 is the engine of Envoy's `safe_regex`, which OSM programs for `pathRegex` and header
patterns, and its syntax is the one of the Rust regex crate that Linkerd's proxy matches
Gateway API `RegularExpression`s with: Unicode classes (`\\pL`), POSIX classes
(`[[:alpha:]]`) and `\\z` are accepted, lookaround and backreferences are not. Above
all, a match takes time linear in the text whatever the pattern: a path or header
value chosen by the workload cannot make a careless pattern such as `(a+)+$` backtrack
for minutes and stall the worker, as Python's re would.

A pattern is text, compiled as UTF-8; the values it is matched against are a request's
bytes (the HTTP layers decode them as latin-1, one character per byte), which RE2 reads
as UTF-8: `/caf\\pL` matches the path `/café` sent in UTF-8, and `.` is one character.
"""

from __future__ import annotations

import re2

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a bad pattern is reported as a policy error, not on stderr
_OPTIONS.never_capture = True  # only whether it matches is asked


class RegexError(ValueError):
    """A pattern RE2 does not accept; the message is RE2's, e.g. `missing ): (a`."""


class Pattern:
    """A compiled pattern that matches whole values only (Gateway API's and OSM's sense)."""

    __slots__ = ("_compiled",)

    def __init__(self, text: str) -> None:
        try:
            self._compiled = re2.compile(text.encode(), _OPTIONS)
        except UnicodeEncodeError:
            raise RegexError("not valid Unicode (a lone surrogate)") from None
        except re2.error as error:
            reason = error.args[0] if error.args else "invalid"
            raise RegexError(
                reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
            ) from None

    def fullmatch(self, value: str) -> bool:
        """value: a request's bytes, one character per byte (see the module's note)."""
        return self._compiled.fullmatch(value.encode("latin-1")) is not None
