"""The provider: a victim model behind a FastAPI prediction API, with its keys and query log."""
