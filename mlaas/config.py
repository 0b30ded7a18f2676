"""Settings both halves share, read from ``MLAAS_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """Where the testbed keeps what it makes (``var/``) and where it looks for data sets."""

    model_config = SettingsConfigDict(env_prefix="MLAAS_", extra="ignore")

    var_dir: Path = Path("var")
    data_dir: Path | None = None
    """Looked in first for data sets; defaults to ``<var_dir>/data``."""

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else self.var_dir / "data"
