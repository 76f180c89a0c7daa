"""The HTTP API of a front-end process: routers, dependencies, the error handler, response schemas."""
