"""hello-python: a Marina app in Python, built into a wasi:http component by componentize-py.

`GET /` greets (the greeting comes from the `GREETING` variable of worker.config.json's `env`, if set),
`GET /env/NAME` answers the variable NAME of the app's environment (404 when unset), `GET /base` the prefix the
request came under (Marina's `x-marina-base` header, such as `/hello-python@1`), `POST /echo` answers the
request's body with its content type, and `GET /count` how many requests this instance has served, which shows
whether instances are reused (`ttl > 0`) or fresh (`ttl: 0`).
"""

import os

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports.streams import StreamError_Closed
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    Method_Get,
    Method_Post,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)

# Module state lives as long as the instance: one request with `ttl: 0`, many with `ttl > 0`.
served = 0

# The most bytes one `blocking-write-and-flush` may take (the wasi:io streams contract).
WRITE_CHUNK = 4096


def read_body(request: IncomingRequest) -> bytes:
    """The whole request body, read to its end."""
    body = request.consume()
    chunks = []
    with body.stream() as stream:
        while True:
            try:
                chunks.append(stream.blocking_read(65536))
            except Err as error:
                if isinstance(error.value, StreamError_Closed):
                    break
                raise
    body.__exit__(None, None, None)
    return b"".join(chunks)


def header(request: IncomingRequest, name: str) -> bytes:
    values = request.headers().get(name)
    return values[0] if values else b""


def respond(out: ResponseOutparam, status: int, data: bytes, content_type: bytes = b"text/plain; charset=utf-8"):
    response = OutgoingResponse(Fields.from_list([("content-type", content_type)]))
    response.set_status_code(status)
    body = response.body()
    ResponseOutparam.set(out, Ok(response))
    with body.write() as stream:
        try:
            for at in range(0, len(data), WRITE_CHUNK):
                stream.blocking_write_and_flush(data[at : at + WRITE_CHUNK])
        except Err:
            # The client went away: nothing more to send, and no reason to fail the instance.
            pass
    OutgoingBody.finish(body, None)


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, out: ResponseOutparam) -> None:
        global served
        served += 1
        method = request.method()
        path = (request.path_with_query() or "/").split("?", 1)[0]
        if isinstance(method, Method_Post) and path == "/echo":
            content_type = header(request, "content-type") or b"application/octet-stream"
            respond(out, 200, read_body(request), content_type)
        elif not isinstance(method, Method_Get):
            respond(out, 405, b"use GET, or POST /echo\n")
        elif path == "/":
            greeting = os.environ.get("GREETING", "Hello")
            respond(out, 200, f"{greeting} from Python\n".encode())
        elif path.startswith("/env/"):
            value = os.environ.get(path[len("/env/") :])
            if value is None:
                respond(out, 404, b"not set\n")
            else:
                respond(out, 200, value.encode())
        elif path == "/base":
            respond(out, 200, header(request, "x-marina-base"))
        elif path == "/count":
            respond(out, 200, f"{served}\n".encode())
        else:
            respond(out, 404, b"no such page\n")
