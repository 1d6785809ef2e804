"""A tiny service for the serve tests: answers on $MERCATO_SERVICE_SOCKET."""

import os
import sys

from aiohttp import web


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def whoami(request: web.Request) -> web.Response:
    return web.json_response({"pid": os.getpid(), "path": request.path_qs})


async def echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read())


app = web.Application()
app.router.add_get("/healthz", healthz)
app.router.add_get("/whoami", whoami)
app.router.add_post("/echo", echo)
print("listening", flush=True)
web.run_app(app, path=os.environ["MERCATO_SERVICE_SOCKET"], print=None, access_log=None)
sys.exit(0)
