"""tome-serve's HTTP service: FastAPI app, dynamic batcher, metrics (``create_app``, ``tome-serve``)."""
