//! `[database]`: the settings of the optional PostgreSQL sink, their validation, and the
//! connection settings built from them with the password kept out of every log line.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio_postgres::config::Host;

use super::tls::{split_url, TlsSettings};

/// What a secret is shown as in logs, `--print-config` and `Debug` output.
const REDACTED: &str = "<redacted>";

/// The `[database]` section. Without `url` the sink is off and nothing here is used.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://USER@HOST:PORT/DB` (also `postgresql://`; libpq's query parameters such as
    /// `options=-c statement_timeout=5s` or `application_name` work, and TLS is set with libpq's
    /// `sslmode` and `sslrootcert`, see [`super::tls`]). Absent or empty: the sink is disabled.
    /// A password inside it is accepted but never logged; prefer `password`.
    pub url: Option<String>,
    /// The password, kept apart from `url` so it can come from a Kubernetes Secret through
    /// `ATTRSTREAM_DATABASE__PASSWORD`. Never logged.
    pub password: Option<String>,
    /// Most upserts written in one statement.
    pub max_batch_size: usize,
    /// Longest the first upsert of a batch waits for company before the batch is written.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Connections in the pool, which is also how many batches are written at once.
    pub pool_size: usize,
    /// Times a failed batch is retried (exponential backoff) before its events are
    /// dead-lettered with reason `database_write_failed`.
    pub retries: u32,
    /// Longest a connection attempt may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Apply the shipped migrations (schemas/postgres/*.sql) at start. When false the table
    /// must already exist (applied by hand or by another replica).
    pub run_migrations: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            password: None,
            max_batch_size: 64,
            max_wait: Duration::from_millis(20),
            pool_size: 4,
            retries: 5,
            connect_timeout: Duration::from_secs(5),
            run_migrations: true,
        }
    }
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("password", &self.password.as_ref().map(|_| REDACTED))
            .field("max_batch_size", &self.max_batch_size)
            .field("max_wait", &self.max_wait)
            .field("pool_size", &self.pool_size)
            .field("retries", &self.retries)
            .field("connect_timeout", &self.connect_timeout)
            .field("run_migrations", &self.run_migrations)
            .finish()
    }
}

impl DatabaseConfig {
    /// True when a URL is configured, i.e. the sink should run.
    pub fn enabled(&self) -> bool {
        self.url.as_deref().is_some_and(|u| !u.trim().is_empty())
    }

    /// How long one upsert may take to fail for good when the database does not answer: per
    /// attempt, waiting for a pooled connection and opening one (each up to
    /// `connect_timeout`), and between attempts the write backoff (at most 5 s, up to twice
    /// that with jitter). Statement time is not bounded here (set `statement_timeout` in the
    /// URL's `options` to bound it). `telemetry.stall_timeout` must exceed this.
    pub fn worst_retry_time(&self) -> Duration {
        let attempts = self.retries.saturating_add(1);
        self.connect_timeout.saturating_mul(2).saturating_mul(attempts)
            + Duration::from_secs(10).saturating_mul(self.retries)
    }

    /// Checks what serde cannot; errors name the `database.*` key and what to put there.
    /// A disabled sink is not checked beyond its numbers.
    pub fn validate(&self) -> Result<()> {
        if self.max_batch_size == 0 {
            bail!("database.max_batch_size must be at least 1");
        }
        if self.pool_size == 0 {
            bail!("database.pool_size must be at least 1");
        }
        if self.connect_timeout.is_zero() {
            bail!("database.connect_timeout must be longer than 0 (e.g. \"5s\")");
        }
        if self.enabled() {
            self.postgres_config()?;
        }
        Ok(())
    }

    /// The TLS settings of `url` (`sslmode`, `sslrootcert`); the defaults when no URL is set.
    pub fn tls(&self) -> Result<TlsSettings> {
        match self.url.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
            Some(url) => split_url(url).map(|(_, tls)| tls),
            None => Ok(TlsSettings::default()),
        }
    }

    /// The connection settings: `url` parsed (its TLS parameters turned into the `sslmode`
    /// tokio-postgres enforces), `password` applied, `connect_timeout` set and
    /// `application_name` defaulted to `attrstream`.
    pub fn postgres_config(&self) -> Result<tokio_postgres::Config> {
        let Some(url) = self.url.as_deref().map(str::trim).filter(|u| !u.is_empty()) else {
            bail!("database.url is not set (the PostgreSQL sink is disabled)");
        };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            bail!(
                "database.url `{}` must be a postgres:// URL, e.g. postgres://attrstream@db:5432/attrstream",
                redact_url(url)
            );
        }
        let (rest, tls) = split_url(url)?;
        let mut config = tokio_postgres::Config::from_str(&rest)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("database.url `{}` is not a valid PostgreSQL URL", redact_url(url)))?;
        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            bail!(
                "database.url `{}` names no host (postgres://USER@HOST:PORT/DB)",
                redact_url(url)
            );
        }
        if let Some(host) = config
            .get_hosts()
            .iter()
            .find(|h| matches!(h, Host::Tcp(name) if name.is_empty()))
        {
            bail!("database.url has an empty host name ({host:?})");
        }
        config.ssl_mode(tls.mode.postgres());
        match (&self.password, config.get_password().is_some()) {
            (Some(_), true) => bail!(
                "the database password is set twice, in database.url and in database.password \
                 (ATTRSTREAM_DATABASE__PASSWORD); keep one"
            ),
            (Some(password), false) => {
                config.password(password.as_str());
            }
            _ => {}
        }
        config.connect_timeout(self.connect_timeout);
        if config.get_application_name().is_none() {
            config.application_name("attrstream");
        }
        Ok(config)
    }

    /// `url` without its password, for logs.
    pub fn display_url(&self) -> String {
        self.url.as_deref().map(redact_url).unwrap_or_default()
    }

    /// A copy safe to print: the password and any password inside `url` replaced.
    pub fn redacted(&self) -> Self {
        Self {
            url: self.url.as_deref().map(redact_url),
            password: self.password.as_ref().map(|_| REDACTED.to_string()),
            ..self.clone()
        }
    }
}

/// `url` with the password (if any) replaced by `<redacted>`; text that does not parse as a
/// URL is hidden whole after its scheme, since it may hold a password anywhere.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some(REDACTED));
            }
            // libpq also accepts `?password=...`.
            if parsed.query_pairs().any(|(k, _)| k == "password") {
                let pairs: Vec<(String, String)> = parsed
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if k == "password" {
                            REDACTED.to_string()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                parsed.query_pairs_mut().clear().extend_pairs(pairs);
            }
            parsed.to_string()
        }
        Err(_) => match url.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://{REDACTED}"),
            None => REDACTED.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_url(url: &str) -> DatabaseConfig {
        DatabaseConfig {
            url: Some(url.to_string()),
            ..Default::default()
        }
    }

    #[test]
    fn disabled_without_url_and_defaults_validate() {
        let c = DatabaseConfig::default();
        assert!(!c.enabled());
        c.validate().unwrap();
        assert!(!with_url("  ").enabled(), "an empty url disables the sink");
    }

    #[test]
    fn password_comes_from_the_url_or_the_password_key_but_not_both() {
        let c = with_url("postgres://writer@db.internal:6432/attrs?application_name=x");
        c.validate().unwrap();
        let pg = c.postgres_config().unwrap();
        assert_eq!(pg.get_user(), Some("writer"));
        assert_eq!(pg.get_dbname(), Some("attrs"));
        assert_eq!(pg.get_ports(), &[6432]);
        assert_eq!(pg.get_application_name(), Some("x"));
        assert_eq!(pg.get_connect_timeout(), Some(&Duration::from_secs(5)));
        assert_eq!(pg.get_password(), None);

        let secret = DatabaseConfig {
            password: Some("s3cret".into()),
            ..c.clone()
        };
        assert_eq!(secret.postgres_config().unwrap().get_password(), Some(&b"s3cret"[..]));

        let in_url = with_url("postgresql://writer:hunter2@db/attrs");
        assert_eq!(in_url.postgres_config().unwrap().get_password(), Some(&b"hunter2"[..]));
        assert_eq!(
            in_url.postgres_config().unwrap().get_application_name(),
            Some("attrstream")
        );
        let both = DatabaseConfig {
            password: Some("s3cret".into()),
            ..in_url
        };
        let err = both.validate().unwrap_err().to_string();
        assert!(err.contains("database.password") && !err.contains("hunter2"), "{err}");
    }

    #[test]
    fn tls_parameters_of_the_url_set_what_tokio_postgres_enforces() {
        use crate::sink::postgres::tls::{RootCerts, TlsMode};
        use tokio_postgres::config::SslMode;

        let c =
            with_url("postgres://writer@db/attrs?sslmode=verify-full&sslrootcert=/etc/db/ca.pem&application_name=x");
        c.validate().unwrap();
        let pg = c.postgres_config().unwrap();
        assert_eq!(pg.get_ssl_mode(), SslMode::Require, "verify-full must mean encrypted");
        assert_eq!(pg.get_application_name(), Some("x"), "other parameters are kept");
        let tls = c.tls().unwrap();
        assert_eq!(tls.mode, TlsMode::VerifyFull);
        assert_eq!(tls.root_cert, Some(RootCerts::File("/etc/db/ca.pem".into())));
        for (url, mode) in [
            ("postgres://writer@db/attrs", SslMode::Prefer),
            ("postgres://writer@db/attrs?sslmode=disable", SslMode::Disable),
            ("postgres://writer@db/attrs?sslmode=require", SslMode::Require),
            ("postgres://writer@db/attrs?sslmode=verify-ca", SslMode::Require),
        ] {
            assert_eq!(with_url(url).postgres_config().unwrap().get_ssl_mode(), mode, "{url}");
        }
        assert_eq!(DatabaseConfig::default().tls().unwrap().mode, TlsMode::Prefer);
    }

    #[test]
    fn errors_name_the_key_and_never_show_the_password() {
        for (url, needle) in [
            ("mysql://u:hunter2@db/x", "postgres://"),
            ("db.internal:5432", "postgres://"),
            ("postgres://u:hunter2@db/x?port=notaport", "database.url"),
            ("postgres://u:hunter2@db/x?sslmode=required", "sslmode=required"),
            (
                "postgres://u:hunter2@db/x?sslrootcert=system&sslmode=prefer",
                "verify-full",
            ),
            ("postgres://u:hunter2@db/x?bogus_option=1", "database.url"),
        ] {
            let err = format!("{:#}", with_url(url).validate().unwrap_err());
            assert!(err.contains(needle), "{url}: {err}");
            assert!(!err.contains("hunter2"), "{url}: {err}");
        }
        for (change, key) in [
            (
                DatabaseConfig {
                    max_batch_size: 0,
                    ..Default::default()
                },
                "database.max_batch_size",
            ),
            (
                DatabaseConfig {
                    pool_size: 0,
                    ..Default::default()
                },
                "database.pool_size",
            ),
            (
                DatabaseConfig {
                    connect_timeout: Duration::ZERO,
                    ..Default::default()
                },
                "database.connect_timeout",
            ),
        ] {
            let err = change.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure returns figment::Error
    fn the_section_loads_from_file_and_environment_and_validates_with_the_config() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "serve.toml",
                "[database]\nurl = \"postgres://writer@db/attrs\"\nmax_wait = \"50ms\"\n",
            )?;
            jail.set_env("ATTRSTREAM_DATABASE__PASSWORD", "from-a-secret");
            jail.set_env("ATTRSTREAM_DATABASE__POOL_SIZE", "9");
            let ids = [
                ("schemas.input_schema_id".to_string(), "1".to_string()),
                ("schemas.output_schema_id".to_string(), "2".to_string()),
                ("schemas.dead_letter_schema_id".to_string(), "3".to_string()),
            ];
            let c = crate::config::Config::load(Some(std::path::Path::new("serve.toml")), &ids)
                .map_err(|e| e.to_string())?;
            assert!(c.database.enabled());
            assert_eq!(c.database.max_wait, Duration::from_millis(50));
            assert_eq!(c.database.pool_size, 9);
            assert_eq!(c.database.max_batch_size, 64, "defaults fill the rest");
            let pg = c.database.postgres_config().map_err(|e| e.to_string())?;
            assert_eq!(pg.get_password(), Some(&b"from-a-secret"[..]));
            assert!(!format!("{c:?}").contains("from-a-secret"));
            jail.set_env("ATTRSTREAM_DATABASE__MAX_BATCH_SIZE", "0");
            let err = crate::config::Config::load(Some(std::path::Path::new("serve.toml")), &ids)
                .unwrap_err()
                .to_string();
            assert!(err.contains("database.max_batch_size"), "{err}");
            jail.set_env("ATTRSTREAM_DATABASE__MAX_BATCH_SIZE", "64");
            jail.set_env("ATTRSTREAM_DATABASE__URLL", "postgres://x@y/z");
            let err = crate::config::Config::load(Some(std::path::Path::new("serve.toml")), &ids)
                .unwrap_err()
                .to_string();
            assert!(err.contains("urll"), "unknown keys are errors: {err}");
            Ok(())
        });
    }

    #[test]
    fn debug_display_and_redacted_copies_hide_passwords() {
        let c = DatabaseConfig {
            url: Some("postgres://writer:hunter2@db/attrs?password=hunter3".into()),
            password: Some("hunter4".into()),
            ..Default::default()
        };
        for shown in [
            format!("{c:?}"),
            c.display_url(),
            toml::to_string(&c.redacted()).unwrap(),
        ] {
            for secret in ["hunter2", "hunter3", "hunter4"] {
                assert!(!shown.contains(secret), "{shown}");
            }
            assert!(shown.contains("writer") && shown.contains("db"), "{shown}");
        }
        assert_eq!(redact_url("not a url with hunter2"), "<redacted>");
        assert_eq!(
            redact_url("postgres://u:p@[bad"),
            "postgres://<redacted>",
            "unparsable text is hidden after its scheme"
        );
    }
}
