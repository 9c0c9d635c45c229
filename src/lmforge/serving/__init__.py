"""Serving a trained run: the OpenAI-compatible HTTP API and web playground (`app`), the thread that
batches requests (`worker`), the request schemas, and the load benchmark (`load`)."""
