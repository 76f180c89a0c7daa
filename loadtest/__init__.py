"""Load tests for tome-serve: locust users (locustfile.py) and a headless runner (run.py)."""
