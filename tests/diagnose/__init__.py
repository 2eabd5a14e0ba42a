"""poolguard/diagnose: the doctor and the connection budget."""
