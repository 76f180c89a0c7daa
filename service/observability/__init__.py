"""Metrics of every process of the service, aggregated into one ``/metrics``."""
