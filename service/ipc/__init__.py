"""The boundary between front-end processes and the engine process.

Pixels never cross it as messages: each front-end decodes straight into its own range of shared-memory
slots (``slots``) and sends the engine only slot indices; the engine answers with top-k indices and
scores (``protocol``). ``rundir`` names the files both sides open.
"""
