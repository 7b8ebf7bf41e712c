"""JSON responses encoded with orjson (both services' hot path; about 5-10x faster than ``json``)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import JSONResponse as _StdJSONResponse


class JSONResponse(_StdJSONResponse):
    """Starlette's ``JSONResponse`` with orjson encoding; NumPy scalars and arrays encode natively.

    Non-finite floats become ``null`` (``json`` would write ``NaN``, which is not JSON).
    """

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


__all__ = ["JSONResponse"]
