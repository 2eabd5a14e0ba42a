"""poolguard: keeps a web service's database connection pool healthy from inside the app."""
