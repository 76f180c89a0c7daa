"""Processes and their lives: the supervisor, the front-end and engine process entry points, drain."""
