"""The API process's configuration: environment variables prefixed ``DFC_`` (documented in SETTINGS.md).

Secrets (API keys, the S3 secret key) are ``SecretStr`` so they never print in a repr, a log line or an
error; :meth:`Settings.store_settings` is the one place the S3 secret is unwrapped, for boto3.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from workers.analysis.llm import ExplainerSettings

MIN_API_KEY_CHARS = 16
"""Shorter keys are guessable; `openssl rand -hex 32` makes a good one."""

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def split_list(value: str) -> list[str]:
    """Items of a comma-separated setting, stripped, empty ones dropped."""
    return [item.strip() for item in value.split(",") if item.strip()]


class Settings(BaseSettings):
    """Everything the API process reads from its environment (``DFC_<NAME>``, case-insensitive)."""

    # hide_input_in_errors: a validation error would otherwise print the raw DFC_API_KEYS value.
    model_config = SettingsConfigDict(env_prefix="DFC_", extra="ignore", frozen=True, hide_input_in_errors=True)

    store_url: str = Field(
        "./.dfc-audit/bucket",
        description="Where audits live: s3://bucket/prefix, file:///path or a local folder (the embedded default).",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, SeaweedFS, Ceph, R2…); empty for AWS S3."
    )
    s3_region: str | None = Field(None, description="S3 region; empty for boto3's default (us-east-1).")
    s3_access_key: str | None = Field(
        None, description="S3 access key id; empty for boto3's credential chain (env, profile, instance role)."
    )
    s3_secret_key: SecretStr | None = Field(None, description="S3 secret access key (kept out of logs and reprs).")
    s3_connect_timeout_s: float = Field(
        5.0, gt=0, le=120, description="Seconds to wait for the S3 endpoint to accept a connection."
    )
    s3_max_attempts: int = Field(
        3, ge=1, le=10, description="Attempts per S3 request; keeps /readyz quick when the store is down."
    )
    api_keys: SecretStr = Field(
        SecretStr(""),
        description="Comma-separated bearer API keys accepted on /audits (at least 16 characters each).",
    )
    auth_disabled: bool = Field(
        False, description="Accept requests without a key: only for a local, single-user API on loopback."
    )
    ray_address: str = Field(
        "",
        description="Empty: a local Ray instance in the API process. http(s)://head:8265: submit to that "
        "cluster with the Ray Jobs API. Anything else (auto, ray://host:10001): connect to it as a driver.",
    )
    ray_max_retries: int = Field(
        2, ge=0, le=20, description="Local Ray: times an audit task is restarted after its worker process dies."
    )
    ray_job_runtime_env: dict[str, Any] = Field(
        default_factory=dict,
        description='Ray Jobs: extra runtime_env (JSON, e.g. {"image_uri": "…"}) merged into every submission.',
    )
    resume_orphans: bool = Field(
        True,
        description="Settle unfinished audits whose driver is gone, at start-up and every DFC_ORPHAN_CHECK_S: "
        "local Ray resumes them where they stopped; with the Ray Jobs API, a failed or stopped job fails them.",
    )
    orphan_check_s: float = Field(
        60.0, ge=0, le=24 * 3600, description="Seconds between orphan checks after the one at start-up; 0: only that."
    )
    driver_lease_s: float = Field(
        60.0,
        ge=3,
        le=3600,
        description="Local Ray: a running audit's driver record is renewed every third of this; an API on another "
        "host counts as gone once its record is this old (on the same host its process id is checked).",
    )
    max_body_bytes: int = Field(
        64 * 1024, ge=1024, le=16 * 1024 * 1024, description="Largest accepted request body; larger gets 413."
    )
    trusted_models: str = Field(
        "", description="Comma-separated model ids allowed to run custom modelling code (trust_remote_code)."
    )
    allow_local_paths: bool = Field(
        False,
        description="Accept model ids and corpus files that are paths on the workers' filesystem; off by "
        "default so an API client cannot make a worker read arbitrary files into a report.",
    )
    page_size_default: int = Field(20, ge=1, le=1000, description="GET /audits page size when no limit is given.")
    page_size_max: int = Field(100, ge=1, le=1000, description="Largest limit GET /audits accepts.")
    presigned_url_expires_s: int = Field(
        3600, ge=60, le=7 * 24 * 3600, description="Lifetime of the URLs from GET /audits/{id}/report/url."
    )
    metrics_cache_s: float = Field(
        5.0, ge=0, le=300, description="Seconds a scrape's store-derived metrics are reused by the next scrape."
    )
    log_level: LogLevel = Field("INFO", description="Level of the service's own loggers (service.*).")
    explainer: ExplainerSettings = Field(
        default_factory=ExplainerSettings,
        description="The LLM endpoint for feature explanations (DFC_EXPLAINER_*; SETTINGS.md, Explainer).",
    )

    @model_validator(mode="after")
    def _keys_unless_disabled(self) -> Settings:
        keys = self.api_key_list()
        if not keys and not self.auth_disabled:
            raise ValueError(
                "no API keys: set DFC_API_KEYS to one or more comma-separated keys "
                "(or DFC_AUTH_DISABLED=true for a local, single-user API)"
            )
        short = sum(len(k) < MIN_API_KEY_CHARS for k in keys)
        if short:
            # Count only: the message must not echo any part of a key.
            raise ValueError(
                f"{short} of the DFC_API_KEYS is shorter than {MIN_API_KEY_CHARS} characters; "
                "generate keys with `openssl rand -hex 32`"
            )
        if self.page_size_default > self.page_size_max:
            raise ValueError("DFC_PAGE_SIZE_DEFAULT must not exceed DFC_PAGE_SIZE_MAX")
        return self

    def api_key_list(self) -> list[str]:
        """The accepted API keys, unwrapped (for the auth dependency only)."""
        return split_list(self.api_keys.get_secret_value())

    def trusted_model_list(self) -> list[str]:
        """Model ids allowed to run custom code."""
        return split_list(self.trusted_models)

    def store_settings(self) -> dict[str, Any]:
        """Keyword arguments for ``workers.storage.open_store`` (an S3 store uses them, a local one ignores them)."""
        settings: dict[str, Any] = {
            "connect_timeout": self.s3_connect_timeout_s,
            "max_attempts": self.s3_max_attempts,
        }
        if self.s3_endpoint_url:
            settings["endpoint_url"] = self.s3_endpoint_url
        if self.s3_region:
            settings["region"] = self.s3_region
        if self.s3_access_key:
            settings["access_key"] = self.s3_access_key
        if self.s3_secret_key is not None:
            settings["secret_key"] = self.s3_secret_key.get_secret_value()
        return settings

    def job_env(self) -> dict[str, str]:
        """Non-secret settings the pipeline needs, passed to its Ray task or job as environment variables.

        Secrets are left out on purpose: Ray shows a job's runtime_env on its dashboard, so the workers
        get the S3 secret and HF token from their own environment (a Kubernetes Secret).
        """
        env = {"DFC_STORE_URL": self.store_url, "DFC_LOG_LEVEL": self.log_level}
        optional = {
            "DFC_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "DFC_S3_REGION": self.s3_region,
            "DFC_TRUSTED_MODELS": self.trusted_models,
        }
        env.update({name: value for name, value in optional.items() if value})
        return env | self.explainer.public_env()  # its key stays with the workers' own environment

    def apply_log_level(self) -> None:
        """Set the level of the service's loggers, and give them a handler when nothing else configured one."""
        logger = logging.getLogger("service")
        logger.setLevel(self.log_level)
        # uvicorn configures only its own loggers; without this, request lines would go nowhere under
        # `dfc-audit serve`. A host that set up logging (pytest, a logging config) keeps full control.
        if not logger.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
