//! Where the hub is and where its cache lives.
//!
//! [`HubConfig`] is passed explicitly to every fetch so tests and daemons never depend on the
//! process environment by accident; [`HubConfig::from_env`] builds one from the variables the
//! Hugging Face tools use, so a cache filled by other tools is shared.

use std::fmt;
use std::path::PathBuf;

use crate::{HubError, Result};

/// Settings for reaching the hub and its local cache.
#[derive(Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// Base URL of the hub's endpoint (`http(s)://host[:port]`, no trailing `/`). May be empty
    /// when [`offline`](Self::offline) is set; an online fetch with no endpoint is an error.
    pub endpoint: String,
    /// The hub cache directory (the one holding `models--owner--name/` folders).
    pub cache_dir: PathBuf,
    /// Access token sent as `Authorization: Bearer <token>`. Never printed: `Debug` redacts it.
    pub token: Option<String>,
    /// Resolve only from the cache; never contact the hub.
    pub offline: bool,
}

impl fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("offline", &self.offline)
            .finish()
    }
}

impl HubConfig {
    /// An online configuration for `endpoint` with the cache at `cache_dir` and no token.
    pub fn new(endpoint: impl Into<String>, cache_dir: impl Into<PathBuf>) -> HubConfig {
        HubConfig {
            endpoint: endpoint.into().trim_end_matches('/').to_string(),
            cache_dir: cache_dir.into(),
            token: None,
            offline: false,
        }
    }

    /// An offline configuration reading only the cache at `cache_dir`.
    pub fn offline(cache_dir: impl Into<PathBuf>) -> HubConfig {
        HubConfig {
            endpoint: String::new(),
            cache_dir: cache_dir.into(),
            token: None,
            offline: true,
        }
    }

    /// Builds a configuration from the process environment; see [`HubConfig::from_vars`].
    pub fn from_env() -> Result<HubConfig> {
        Self::from_vars(|name| std::env::var(name).ok(), std::env::home_dir())
    }

    /// Builds a configuration from environment-like variables (`var(name)`) and a home
    /// directory, honouring, as the Hugging Face tools do:
    ///
    /// - `HF_HUB_CACHE`: the cache directory itself; otherwise `$HF_HOME/hub`; otherwise
    ///   `$XDG_CACHE_HOME/huggingface/hub`; otherwise `~/.cache/huggingface/hub`;
    /// - `HF_ENDPOINT`: the hub's endpoint (left empty when unset: fetching online then
    ///   fails with [`HubError::NoEndpoint`]);
    /// - `HF_TOKEN`: the access token (empty means none);
    /// - `HF_HUB_OFFLINE`: `1`, `true`, `yes` or `on` (any case) means offline.
    ///
    /// Empty variables count as unset. Fails only when no cache directory can be derived.
    pub fn from_vars(
        var: impl Fn(&str) -> Option<String>,
        home: Option<PathBuf>,
    ) -> Result<HubConfig> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let cache_dir = if let Some(cache) = var("HF_HUB_CACHE") {
            PathBuf::from(cache)
        } else if let Some(hf_home) = var("HF_HOME") {
            PathBuf::from(hf_home).join("hub")
        } else if let Some(xdg) = var("XDG_CACHE_HOME") {
            PathBuf::from(xdg).join("huggingface").join("hub")
        } else if let Some(home) = home.filter(|h| !h.as_os_str().is_empty()) {
            home.join(".cache").join("huggingface").join("hub")
        } else {
            return Err(HubError::NoCacheDir);
        };
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        Ok(HubConfig {
            endpoint: var("HF_ENDPOINT")
                .map(|e| e.trim().trim_end_matches('/').to_string())
                .unwrap_or_default(),
            cache_dir,
            token: var("HF_TOKEN").map(|t| t.trim().to_string()),
            offline,
        })
    }

    /// Sets the token.
    pub fn with_token(mut self, token: impl Into<String>) -> HubConfig {
        self.token = Some(token.into());
        self
    }

    /// The endpoint, or [`HubError::NoEndpoint`] when none is configured.
    pub(crate) fn require_endpoint(&self) -> Result<&str> {
        let endpoint = self.endpoint.trim_end_matches('/');
        if endpoint.is_empty() {
            Err(HubError::NoEndpoint)
        } else {
            Ok(endpoint)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)], home: Option<&str>) -> Result<HubConfig> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubConfig::from_vars(|k| map.get(k).cloned(), home.map(PathBuf::from))
    }

    #[test]
    fn defaults_to_home_cache_without_endpoint() {
        let cfg = from(&[], Some("/home/u")).unwrap();
        assert_eq!(
            cfg.cache_dir,
            PathBuf::from("/home/u/.cache/huggingface/hub")
        );
        assert_eq!(cfg.endpoint, "");
        assert_eq!(cfg.token, None);
        assert!(!cfg.offline);
        assert!(matches!(cfg.require_endpoint(), Err(HubError::NoEndpoint)));
        assert!(matches!(from(&[], None), Err(HubError::NoCacheDir)));
    }

    #[test]
    fn honours_variables_in_order() {
        let cfg = from(
            &[
                ("HF_HOME", "/hf"),
                ("HF_ENDPOINT", "http://127.0.0.1:9/"),
                ("HF_TOKEN", "secret"),
                ("HF_HUB_OFFLINE", "1"),
            ],
            Some("/home/u"),
        )
        .unwrap();
        assert_eq!(cfg.cache_dir, PathBuf::from("/hf/hub"));
        assert_eq!(cfg.endpoint, "http://127.0.0.1:9");
        assert_eq!(cfg.token.as_deref(), Some("secret"));
        assert!(cfg.offline);
        assert!(!format!("{cfg:?}").contains("secret"));

        let cfg = from(
            &[
                ("HF_HOME", "/hf"),
                ("HF_HUB_CACHE", "/cache"),
                ("HF_HUB_OFFLINE", "0"),
                ("HF_TOKEN", ""),
            ],
            Some("/home/u"),
        )
        .unwrap();
        assert_eq!(cfg.cache_dir, PathBuf::from("/cache"));
        assert!(!cfg.offline);
        assert_eq!(cfg.token, None);

        let cfg = from(&[("XDG_CACHE_HOME", "/xdg")], Some("/home/u")).unwrap();
        assert_eq!(cfg.cache_dir, PathBuf::from("/xdg/huggingface/hub"));
    }
}
