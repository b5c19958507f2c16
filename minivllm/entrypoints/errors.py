"""Errors as the OpenAI API sends them: a status code and `{"error": {message, type, param, code}}`.

Every way a request can fail ends here, so a client always gets the same shape:

    400  a field is wrong (its name is in `param`), the JSON is malformed, the prompt is too long
    401  the API key is missing or wrong
    404  an unknown model or route
    500  the engine step computing the request failed (the server keeps serving the others)
    503  the server is shutting down

`OpenAIError` is raised anywhere in a handler; the app's exception handlers turn it, pydantic's
validation errors and Starlette's HTTP errors into the JSON body.
"""

from __future__ import annotations

import re

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from minivllm.entrypoints.protocol import ErrorInfo, ErrorResponse

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 500: "server_error", 503: "server_error"}


class OpenAIError(Exception):
    """An error answer: status code, message, and the request field it is about (`param`)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    def body(self) -> ErrorResponse:
        error_type = _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return ErrorResponse(error=ErrorInfo(message=self.message, type=error_type, param=self.param,
                                             code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status)


def from_validation_error(exc: RequestValidationError) -> OpenAIError:
    """The first problem pydantic found, as a 400 that names the field (`messages[0].content`)."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [part for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first.get("msg", ""))
        return OpenAIError(f"the request body is not valid JSON: {detail}", code="invalid_json")
    if not loc:
        if first.get("type") == "missing":
            return OpenAIError("the request needs a JSON object as its body")
        return OpenAIError(f"the request body must be a JSON object: {first.get('msg')}")
    param = _field_path(loc)
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return OpenAIError(f"{param}: {first.get('msg')}{more}", param=param)


def _field_path(loc: list) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'. pydantic also puts the name of the
    union member it tried in the path (`list[int]`, `str`): those are not fields, so they go."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(part)):
            path += f".{part}" if path else str(part)
    return path


def from_value_error(err: Exception, fields) -> OpenAIError:
    """A ValueError/TypeError of the engine or of SamplingParams as a 400. Their messages start
    with the argument they are about ("max_tokens must be ...", "prompt 1: ..."); when that is a
    request field, it becomes `param`."""
    message = str(err)
    words = re.findall(r"[A-Za-z_]+", message)
    param = next((w for w in words[:3] if w in fields), None)
    return OpenAIError(message, param=param)
