"""What the database server sees: ``poolguard doctor`` and ``poolguard budget``."""
