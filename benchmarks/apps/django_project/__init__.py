"""The Django benchmark project: one database alias per variant, one view per alias (``<variant>/select1``)."""
