"""A handwritten-digit classifier behind a small HTTP server (the inference example).

At start it trains a support vector classifier on scikit-learn's bundled digits data
set (1,797 8x8 images; 1,500 to train, the rest to report accuracy: about a second
on one core), then serves:

* ``GET /healthz``: 200 with the held-out accuracy once the model is ready;
* ``POST /predict``: ``{"images": [[64 numbers 0-16], ...]}`` -> ``{"digits": [...]}``;
* ``GET /sample?n=3``: a few held-out images with their labels, to try /predict with.

Under ``mercato serve`` it listens on the Unix socket ``$MERCATO_SERVICE_SOCKET`` in
its work directory (the sandbox has no network); the provider publishes it. Run it
yourself with ``--socket PATH`` or ``--port N`` (loopback).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from aiohttp import web
from sklearn.datasets import load_digits
from sklearn.svm import SVC

MAX_IMAGES = 256


def train() -> tuple[SVC, list[list[float]], list[int], float]:
    digits = load_digits()
    x, y = digits.data.tolist(), digits.target.tolist()
    model = SVC(gamma=0.001, C=10.0).fit(x[:1500], y[:1500])
    accuracy = float(model.score(x[1500:], y[1500:]))
    return model, x[1500:], y[1500:], accuracy


def build_app() -> web.Application:
    started = time.monotonic()
    model, held_x, held_y, accuracy = train()
    print(f"trained in {time.monotonic() - started:.2f} s, accuracy {accuracy:.4f}", flush=True)
    served = 0

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "accuracy": accuracy, "served": served})

    async def sample(request: web.Request) -> web.Response:
        n = max(1, min(16, int(request.query.get("n", "3"))))
        return web.json_response({"images": held_x[:n], "labels": held_y[:n]})

    async def predict(request: web.Request) -> web.Response:
        nonlocal served
        try:
            data = await request.json()
            images = data["images"]
            if not (isinstance(images, list) and 0 < len(images) <= MAX_IMAGES):
                raise ValueError(f"images: a list of 1 to {MAX_IMAGES} images")
            rows = [[float(v) for v in image] for image in images]
            if any(len(r) != 64 or not all(0 <= v <= 16 for v in r) for r in rows):
                raise ValueError("each image is 64 numbers from 0 to 16 (8x8 pixels)")
        except (ValueError, KeyError, TypeError) as e:
            return web.json_response({"error": str(e)}, status=400)
        served += len(rows)
        return web.json_response({"digits": [int(d) for d in model.predict(rows)]})

    app = web.Application(client_max_size=1 << 20)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/sample", sample)
    app.router.add_post("/predict", predict)
    return app


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", default=os.environ.get("MERCATO_SERVICE_SOCKET"))
    parser.add_argument("--port", type=int, help="listen on 127.0.0.1:PORT instead")
    args = parser.parse_args(argv)
    app = build_app()
    if args.port is not None:
        web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)
    elif args.socket:
        print(f"listening on {args.socket}", flush=True)
        web.run_app(app, path=args.socket, print=None, access_log=None)
    else:
        print("give --socket or --port (or set MERCATO_SERVICE_SOCKET)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
