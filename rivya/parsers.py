"""Request parsers shared by the API."""

from __future__ import annotations

from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError

from rivya.errors import MAX_JSON_DEPTH, contains_surrogate, json_depth


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, refusing text no storage can hold.

    A body of valid UTF-8 can still carry an unpaired surrogate through a ``\\ud800`` escape;
    Python accepts it, then every encode (the database driver, a log line) fails with a 500. It
    is refused here, for every endpoint, as malformed input (400 ``malformed_request``); so is
    JSON nested deeper than ``MAX_JSON_DEPTH`` (or too deep for the parser itself).
    """

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply.") from None
        if json_depth(data) > MAX_JSON_DEPTH:
            raise ParseError(f"JSON parse error - nested deeper than {MAX_JSON_DEPTH} levels.")
        if contains_surrogate(data):
            raise ParseError("JSON parse error - unpaired surrogate in a string.")
        return data
